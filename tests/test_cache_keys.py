"""Every config field feeds a stage's cache key or says why it changes no output; the keys read those declarations.

A field with neither would silently reuse stale outputs when changed: this test fails on one.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel, Field

from sft_engine import stages
from sft_engine.config import PipelineConfig, load_config
from sft_engine.curation import stage as curation
from sft_engine.evaluation.registry import configured_suites
from sft_engine.evaluation.suite import Suite
from sft_engine.fields import CACHE_LEVELS, cache_marker, cache_view, keyed


def _models(annotation: object) -> list[type[BaseModel]]:
    """The config models an annotation holds (directly, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def unmarked_fields(root: type[BaseModel]) -> list[str]:
    """Fields reachable from ``root`` through PER_FIELD sub-configs that declare no cache marker (or a bad one)."""
    bad, todo, seen = [], [root], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            marker = cache_marker(field)
            where = f"{model.__name__}.{name}"
            if marker == "per_field":
                subs = _models(field.annotation)
                if not subs:
                    bad.append(f"{where} (per_field, but not a config type)")
                todo += subs
            elif not isinstance(marker, list) or not set(marker) <= set(CACHE_LEVELS):
                bad.append(where)
            elif not marker and not (field.json_schema_extra or {}).get("not_keyed_because"):
                bad.append(f"{where} (unkeyed without a reason)")
    return sorted(bad)


def test_every_field_of_every_stage_config_is_keyed_or_declared_unkeyed() -> None:
    assert unmarked_fields(PipelineConfig) == []


def test_a_new_unmarked_field_is_caught() -> None:
    class Sub(BaseModel):
        a: int = Field(default=1, json_schema_extra=keyed("prepare"))
        b: int = 2  # a new field someone forgot to key

    class Root(BaseModel):
        sub: Sub = Field(default_factory=Sub, json_schema_extra={"cache": "per_field"})
        c: int = Field(default=0, json_schema_extra={"cache": []})  # unkeyed, but no reason given

    assert unmarked_fields(Root) == ["Root.c (unkeyed without a reason)", "Sub.b"]


def test_every_level_is_read_by_a_key() -> None:
    used = set()
    for module in (stages, curation):
        used |= set(__import__("re").findall(r'cache_view\([^,]+, "([a-z.]+)"\)', Path(module.__file__).read_text()))
    assert used == set(CACHE_LEVELS)


ARITH = Path(__file__).parent / "data" / "suites" / "arithmetic.jsonl"
BASE = [
    "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 10}, {name: c, builtin: chitchat, limit: 5}]",
    f"evaluate.suites=[{{name: arith, kind: generation, path: {ARITH}, metric: numeric}}]",
]


def _cfg(*extra: str) -> PipelineConfig:
    return load_config(None, [*BASE, *extra])


@pytest.mark.parametrize(
    ("override", "changes"),
    [
        ("curate.quality.max_symbol_fraction=0.5", {"source", "dedup", "curate"}),
        ("curate.repair.trailing_user=drop_row", {"source", "dedup", "curate"}),
        ("curate.quality.line_min_alnum=3", {"source", "dedup", "curate"}),
        ("curate.sources.0.limit=11", {"source", "dedup", "curate"}),
        ("seed=1", {"source", "dedup", "curate"}),
        ("curate.near_dedup.threshold=0.9", {"dedup", "curate"}),
        ("curate.heldout_fraction=0.2", {"dedup", "curate"}),
        ("curate.sources.0.weight=2.0", {"curate"}),
        ("curate.sources.1.weight=2.0", {"curate"}),
        ("runner.files_per_shard=2", set()),
        # A suite's scoring settings are not what decontamination reads: curation is not redone.
        ("evaluate.suites.0.metric=contains", set()),
        ("evaluate.suites.0.max_new_tokens=9", set()),
        ("evaluate.suites.0.answer_field=question", {"source", "dedup", "curate"}),
        ("work_dir=/tmp/elsewhere", set()),
        ("train.lr=1e-3", set()),
    ],
)
def test_curation_keys_follow_the_declarations(override: str, changes: set[str]) -> None:
    a, b = _cfg(), _cfg(override)
    keys = {
        "source": lambda c: curation.source_key(c, c.curate.sources[0]),
        "dedup": curation.dedup_key,
        "curate": curation.curate_key,
    }
    assert {name for name, key in keys.items() if key(a) != key(b)} == changes


@pytest.fixture(scope="module")
def stage_inputs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Minimal real inputs for the downstream keys: curated splits, a packed manifest, a held-out file."""
    d = tmp_path_factory.mktemp("key_inputs")
    for split in ("train", "heldout"):
        pl.DataFrame({"x": [1]}).write_parquet(d / f"{split}.parquet")
    (d / "manifest.json").write_text(json.dumps({"digest": "abc"}))
    (d / "heldout.arrow").write_bytes(b"rows")
    return d, tiny_model, d / "heldout.arrow"


@pytest.mark.parametrize(
    ("override", "changes"),
    [
        ("prepare.max_seq_len=512", {"prepare"}),
        ("prepare.tokenize_batch_size=7", set()),
        ("train.lr=1e-3", {"train"}),
        ("seed=3", {"train"}),
        ("train.log_model=true", set()),
        ("train.checkpoint_every=5", set()),
        ("train.threads=1", set()),
        # Changing one suite re-scores only that suite (and redoes the comparison).
        ("evaluate.verifiable.limit=3", {"verifiable", "evaluate"}),
        ("evaluate.knowledge.limit=3", {"knowledge", "evaluate"}),
        ("evaluate.heldout.max_rows=3", {"heldout", "evaluate"}),
        ("evaluate.suites.0.metric=contains", {"arith", "evaluate"}),
        ("evaluate.samples.n=1", {"samples", "evaluate"}),
        ("evaluate.precision=bf16", {"heldout", "knowledge", "ifbench", "verifiable", "arith", "samples", "evaluate"}),
        ("evaluate.compare_base=false", {"evaluate"}),
        ("evaluate.gate.max_knowledge_drop=50", set()),
        ("evaluate.register_model=m", set()),
        ("experiment=other", set()),
    ],
)
def test_downstream_keys_follow_the_declarations(stage_inputs: tuple[Path, Path, Path], override: str, changes: set[str]) -> None:
    d, model, heldout = stage_inputs
    prompts = pl.DataFrame({"messages": [[{"role": "user", "content": "hi"}]]})
    keys = {
        "prepare": lambda c: stages.prepare_key(c, d, model),
        "train": lambda c: stages.train_key(c, d, model),
        **{name: (lambda c, name=name: stages.suite_key(c, model, _suite(c, name), heldout))
           for name in ("heldout", "knowledge", "ifbench", "verifiable", "arith")},
        "samples": lambda c: stages.samples_key(c, model, prompts),
        "evaluate": lambda c: stages.evaluate_key(c.model_copy(update={"model": str(model)}), d, model, d),
    }
    a, b = _cfg(), _cfg(override)
    assert {name for name, key in keys.items() if key(a) != key(b)} == changes


def _suite(cfg: PipelineConfig, name: str) -> Suite:
    return next(s for s in configured_suites(cfg.evaluate) if s.name == name)


def test_a_changed_suite_file_re_scores_that_suite_and_redoes_decontamination(stage_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _d, model, heldout = stage_inputs
    path = tmp_path / "arith.jsonl"
    path.write_text(ARITH.read_text())
    cfg = _cfg(f"evaluate.suites.0.path={path}")
    before = {"arith": stages.suite_key(cfg, model, _suite(cfg, "arith"), heldout), "curate": curation.source_key(cfg, cfg.curate.sources[0]),
              "verifiable": stages.suite_key(cfg, model, _suite(cfg, "verifiable"), heldout)}
    path.write_text(ARITH.read_text().replace('"answer": 5', '"answer": 7'))
    after = {"arith": stages.suite_key(cfg, model, _suite(cfg, "arith"), heldout), "curate": curation.source_key(cfg, cfg.curate.sources[0]),
             "verifiable": stages.suite_key(cfg, model, _suite(cfg, "verifiable"), heldout)}
    assert {k for k in before if before[k] != after[k]} == {"arith", "curate"}


def test_cache_view_holds_exactly_the_declared_fields() -> None:
    view = cache_view(_cfg(), "curate.mix")
    empty_suites = {"samples": {}, "suites": [{}], "heldout": {}, "knowledge": {}, "ifbench": {}, "verifiable": {}}
    assert view == {"seed": 0, "curate": {"sources": [{"weight": 1.0, "target_rows": None, "max_rows": None}] * 2, "near_dedup": {}},
                    "prepare": {}, "train": {}, "evaluate": empty_suites}
    assert set(cache_view(_cfg(), "prepare")["prepare"]) == {"max_seq_len", "mask", "overlong", "history", "chat_template_kwargs"}
