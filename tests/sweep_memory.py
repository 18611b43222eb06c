"""Two sweep variants in one process, as the sweep flow runs them: train, then score base and tuned (held-out loss and
knowledge through lm-eval). Prints one JSON line: the peak and current RSS after the shared data stages and after each
variant. Run by tests/test_memory.py in a fresh interpreter, so that the peak is this sequence's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()


def _rss() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"peak_kib": int(fields["VmHWM"].split()[0]), "rss_kib": int(fields["VmRSS"].split()[0])}


def main(work: str) -> None:
    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    base = [
        f"work_dir={work}", "model=smollm2-135m", "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 120}]",
        "curate.heldout_fraction=0.1", "prepare.max_seq_len=512", "train.max_steps=1", "train.grad_accum=1",
        "train.precision=fp32", "evaluate.knowledge.sets=[boolq]", "evaluate.knowledge.limit=4", "evaluate.ifbench.limit=0",
        "evaluate.verifiable.limit=0", "evaluate.samples.n=0", "evaluate.heldout.max_rows=4",
    ]
    cfg = load_config(None, base)
    curated = curation.run_curate(cfg).path
    prepared = stages.run_prepare(cfg, curated).path
    points = {"data": _rss()}
    for name, lr in (("variant 1", "1e-4"), ("variant 2", "3e-4")):
        vcfg = load_config(None, [*base, f"train.lr={lr}"])
        tuned = stages.run_train(vcfg, prepared).path / "model"
        stages.run_evaluate(vcfg, curated, prepared, tuned)  # the base model's scores are reused by variant 2
        points[name] = _rss()
    print("MEMORY " + json.dumps(points), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
