"""Launching training in several processes (one machine) or on several nodes (hostfile).

The pipeline writes a job file (paths + resolved train config) and starts this module under a
launcher; rank 0 appends each step's metrics to a JSON-lines file that the parent process reads
while the job runs, so tracking works the same as in-process training.

    one machine:  python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1 \\
                      --master_port P -m sft_engine.launch JOB.json
    several:      deepspeed --hostfile HOSTFILE --master_port P --module sft_engine.launch JOB.json
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_engine.config import TrainConfig


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(cfg: TrainConfig, job_file: Path, port: int | None = None) -> list[str]:
    """The exact command that runs the training job described by ``job_file``."""
    port = port or _port()
    if cfg.hostfile:
        return ["deepspeed", "--hostfile", cfg.hostfile, "--master_port", str(port), "--module", "sft_engine.launch", str(job_file)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "sft_engine.launch", str(job_file),
    ]


def write_job(job_file: Path, **job: Any) -> Path:
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in job.items()}, indent=2))
    return job_file


def run_launched(
    cmd: list[str], metrics_file: Path, on_step: Callable[[int, dict[str, float]], None] | None, log_file: Path
) -> None:
    """Run a launcher command, forwarding rank 0's per-step metrics as they appear; raise with the log tail on failure."""
    seen = 0

    def forward() -> None:
        nonlocal seen
        if not metrics_file.exists():
            return
        lines = metrics_file.read_text().splitlines()
        for line in lines[seen:]:
            rec = json.loads(line)
            if on_step is not None:
                on_step(int(rec["step"]), rec["metrics"])
        seen = len(lines)

    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            forward()
            time.sleep(0.5)
    forward()
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training launcher exited with {proc.returncode}: {' '.join(cmd)}\n--- last lines of {log_file} ---\n{tail}")


def main(argv: list[str] | None = None) -> None:
    """Entry point run by the launcher on every rank."""
    from sft_engine.runtime import apply_env_defaults

    apply_env_defaults()
    import torch.distributed as dist

    from sft_engine.train import train

    args = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--local_rank")]
    job = json.loads(Path(args[0]).read_text())
    metrics_file = Path(job["metrics_file"])

    def on_step(step: int, metrics: dict[str, float]) -> None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    result = train(
        Path(job["model_dir"]), Path(job["data"]), Path(job["output_dir"]), TrainConfig.model_validate(job["train"]),
        seed=job["seed"], on_step=on_step, show_progress=False,
        checkpoint_dir=Path(job["checkpoint_dir"]) if job.get("checkpoint_dir") else None,
        eval_data=Path(job["eval_data"]) if job.get("eval_data") else None,
    )
    if dist.get_rank() == 0:
        Path(job["result_file"]).write_text(json.dumps({
            "steps": result.steps, "losses": result.losses, "tokens": result.tokens,
            "supervised_tokens": result.supervised_tokens, "seconds": result.seconds,
            "history": result.history, "resumed_from": result.resumed_from,
        }))


if __name__ == "__main__":
    main()
