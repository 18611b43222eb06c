"""Runs sft_engine.train.train in its own process (for kill/resume and multi-process tests).

usage: train_worker.py MODEL DATA OUT TRAIN_CONFIG_JSON RESULT_JSON [--ckpt DIR] [--sleep S]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()

from sft_engine.config import TrainConfig
from sft_engine.train import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("result")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    a = p.parse_args()

    def on_step(step: int, metrics: dict) -> None:
        print(f"step {step} loss {metrics['train/loss']:.6f}", flush=True)
        time.sleep(a.sleep)

    cfg = TrainConfig.model_validate(json.loads(a.config))
    res = train(Path(a.model), Path(a.data), Path(a.out), cfg, seed=0, on_step=on_step, show_progress=False,
                checkpoint_dir=Path(a.ckpt) if a.ckpt else None)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(a.result).write_text(json.dumps({"losses": res.losses, "resumed_from": res.resumed_from}))


if __name__ == "__main__":
    main()
