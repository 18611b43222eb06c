"""Knowledge retention: log-likelihood multiple choice through lm-evaluation-harness, fully offline.

lm-eval scores each choice by the log-likelihood of ``" " + choice`` after ``Question: ...\\nAnswer:``
(the cloze form, which small models handle better than letter answers) and reports ``acc`` and
``acc_norm`` (length-normalized) with their standard errors. The items come from
``sft_engine.evalsets`` and are written as local JSONL beside generated task YAMLs, so the harness
loads them with ``dataset_path: json`` and never reaches the hub.
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
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft_engine.evalsets import multiple_choice_items

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


def write_tasks(folder: Path, names: list[str], limit: int | None) -> list[str]:
    """Write one lm-eval task YAML + JSONL per set into ``folder``; returns the task names (``sft_<set>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name in names:
        items = multiple_choice_items(name)[:limit]
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(_TASK_YAML.format(task=f"sft_{name}", data=data.resolve()), encoding="utf-8")
        tasks.append(f"sft_{name}")
    return tasks


def run_knowledge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    folder: Path,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Score ``model`` on the named multiple-choice sets with lm-eval.

    Returns:
        ``{set: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}`` and one record per item
        (set, id, gold, chosen, correct, per-choice log-likelihoods) for inspection.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(folder, names, limit)
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
    for name, task in zip(names, tasks, strict=True):
        r = res["results"][task]
        scores[name] = {
            "acc": float(r["acc,none"]),
            "acc_stderr": float(r["acc_stderr,none"]),
            "acc_norm": float(r["acc_norm,none"]),
            "acc_norm_stderr": float(r["acc_norm_stderr,none"]),
            "n": float(r.get("sample_len") or len(res["samples"][task])),
        }
        for s in res["samples"][task]:
            lls = [float(x[0]) for x in s["filtered_resps"]]
            chosen = max(range(len(lls)), key=lls.__getitem__)
            items.append({
                "suite": "knowledge", "set": name, "id": s["doc"]["id"], "gold": int(s["target"]), "chosen": chosen,
                "correct": bool(s["acc"]), "loglikelihoods": lls,
            })
    return scores, items


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
