"""Same config and seed: byte-identical curated and packed outputs, and the same loss curve on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_engine import stages
from sft_engine.config import load_config
from sft_engine.curation import stage as curation
from sft_engine.io import digest_file

pytestmark = pytest.mark.slow


def test_same_config_gives_identical_outputs_in_separate_work_dirs(tiny_model: Path, tmp_path: Path) -> None:
    def run(work: Path):
        cfg = load_config(None, [
            f"work_dir={work}", f"model={tiny_model}", "curate.heldout_fraction=0.1", "prepare.max_seq_len=256",
            "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 150}, {name: c, builtin: chitchat, limit: 60, weight: 1.5}]",
            "train.max_steps=3", "train.grad_accum=2", "train.lr=3e-3",
        ])
        curated = curation.run_curate(cfg).path
        prepared = stages.run_prepare(cfg, curated).path
        trained = stages.run_train(cfg, prepared).path
        files = {n: digest_file(curated / n) for n in ("train.parquet", "heldout.parquet", "rejected.parquet")}
        files |= {n: digest_file(prepared / n) for n in ("train.arrow", "heldout.arrow")}
        files["model.safetensors"] = digest_file(trained / "model" / "model.safetensors")
        return files, [h["train/loss"] for h in json.loads((trained / "stats.json").read_text())["history"]]

    first, losses_a = run(tmp_path / "a")
    second, losses_b = run(tmp_path / "b")
    assert first == second
    assert losses_a == losses_b and len(losses_a) == 3
