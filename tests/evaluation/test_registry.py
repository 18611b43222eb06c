"""One registry: the config's sections, decontamination, the table, the gate and the sweep read it, and no list of
suite names or metric directions is written anywhere else."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from sft_engine.config import ConfigError, EvalConfig, load_config
from sft_engine.evaluation.items import MULTIPLE_CHOICE
from sft_engine.evaluation.registry import BUILT_IN, FROM_FILES, configured_suites, metric_specs

ROOT = Path(__file__).resolve().parents[2]
SUITES = ROOT / "tests" / "data" / "suites"
EVERY_KIND = [
    (f"evaluate.suites=[{{name: arith, kind: generation, path: {SUITES / 'arithmetic.jsonl'}}}, "
    f"{{name: caps, kind: multiple_choice, path: {SUITES / 'capitals.jsonl'}}}, {{name: support, kind: loss, path: {SUITES / 'support_chats.jsonl'}}}]"),
    "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 10}]",
]


def _names() -> tuple[set[str], set[str]]:
    """(suite kinds and set names, lower-is-better metric names) as the registry knows them."""
    cfg = load_config(None, [*EVERY_KIND, f"evaluate.knowledge.sets=[{', '.join(MULTIPLE_CHOICE)}]"])
    kinds = {cls.kind for cls in (*BUILT_IN, *FROM_FILES)} | set(MULTIPLE_CHOICE)
    lower = {m for m, spec in metric_specs(cfg.evaluate).items() if spec.lower_is_better}
    return kinds, lower


def repeated_lists(source: str, kinds: set[str], lower: set[str]) -> list[str]:
    """Collection literals (list, tuple, set, dict keys) that hold two or more suite or set names, or any
    lower-is-better metric name: a second copy of what the registry says."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            strings = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(strings & kinds) >= 2 or strings & lower:
                found.append(f"line {node.lineno}: {sorted(strings & (kinds | lower))}")
    return found


def test_no_list_of_suite_names_or_metric_directions_is_written_twice() -> None:
    kinds, lower = _names()
    assert "heldout.loss" in lower and "support.loss" in lower and "arith.exact_match" not in lower
    found = {}
    for package in ("sft_engine", "flows", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            hits = repeated_lists(path.read_text(), kinds, lower)
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    # The one list: the multiple-choice sets and their files, where the items are read; and the knowledge suite's default
    # selection among them (a choice, validated against that list).
    assert {k: len(v) for k, v in found.items()} == {"sft_engine/evaluation/items.py": 1, "sft_engine/evaluation/knowledge.py": 1}
    # The check catches the lists this registry replaced.
    assert repeated_lists('LOWER_IS_BETTER = ("heldout.loss", "heldout.perplexity")', kinds, lower)
    assert repeated_lists('BuiltinEvalSet = Literal["verifiable", "ifbench", "mmlu"]', kinds, lower)


def test_the_config_has_one_section_per_built_in_suite_and_the_file_kinds_from_the_registry() -> None:
    for cls in BUILT_IN:
        assert EvalConfig.model_fields[cls.kind].annotation is cls.Settings
    union = typing.get_args(typing.get_args(EvalConfig.model_fields["suites"].annotation)[0])[0]
    assert set(typing.get_args(union)) == {cls.Settings for cls in FROM_FILES}
    cfg = load_config(None, EVERY_KIND)
    assert [s.name for s in configured_suites(cfg.evaluate)] == ["heldout", "knowledge", "ifbench", "verifiable", "arith", "caps", "support"]
    off = load_config(None, [*EVERY_KIND, "evaluate.knowledge.sets=[]", "evaluate.ifbench.limit=0", "evaluate.verifiable.limit=0"])
    assert [s.name for s in configured_suites(off.evaluate)] == ["heldout", "arith", "caps", "support"]


def test_renamed_keys_and_taken_names_are_errors_that_say_the_fix() -> None:
    base = EVERY_KIND[1:]
    with pytest.raises(ConfigError, match=r"evaluate.tasks_limit is now evaluate.verifiable.limit; evaluate.knowledge.tasks is now evaluate.knowledge.sets"):
        load_config(None, [*base, "evaluate.tasks_limit=3", "evaluate.knowledge.tasks=[mmlu]"])
    with pytest.raises(ConfigError, match=r"the set 'verifiable_tasks_eval' is now 'verifiable'"):
        load_config(None, [*base, "curate.decontaminate.eval_sets=[{name: t, builtin: verifiable_tasks_eval}]"])
    with pytest.raises(ConfigError, match=r"unknown built-in set 'mmlu2'; choose from mmlu, openbookqa, commonsenseqa, piqa, siqa, boolq, ifbench, verifiable"):
        load_config(None, [*base, "curate.decontaminate.eval_sets=[{name: t, builtin: mmlu2}]"])
    with pytest.raises(ConfigError, match=r"the name 'knowledge' is taken by a built-in suite; give the suite another name"):
        load_config(None, [*base, f"evaluate.suites=[{{name: knowledge, kind: loss, path: {SUITES / 'support_chats.jsonl'}}}]"])
    with pytest.raises(ConfigError, match=r"evaluate.suites.0.generation.metric"):
        load_config(None, [*base, "evaluate.suites=[{name: a, kind: generation, path: x.jsonl, metric: bleu}]"])
