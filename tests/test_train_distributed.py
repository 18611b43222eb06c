"""Multi-process training, kill-and-resume, and the DeepSpeed config derivation (real DeepSpeed, gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft_engine.config import ConfigError, TrainConfig
from sft_engine.train import COMPLETE, deepspeed_config, latest_checkpoint, train

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "scripts" / "train_worker.py"
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_processes_match_one_process_with_same_global_batch(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    common = {"zero_stage": 2, "max_steps": 3, "lr": 2e-3, "warmup_steps": 0, "precision": "fp32"}
    two = TrainConfig(micro_batch_size=1, grad_accum=2, **common)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), str(WORKER), str(tiny_model), str(packed), str(tmp_path / "m2"),
        two.model_dump_json(), str(tmp_path / "r2.json"),
    ]
    subprocess.run(cmd, env=_env(), check=True, timeout=300, capture_output=True)
    two_proc = json.loads((tmp_path / "r2.json").read_text())["losses"]
    one = train(tiny_model, packed, tmp_path / "m1", TrainConfig(micro_batch_size=1, grad_accum=4, **common), seed=0, show_progress=False)
    assert len(two_proc) == 3
    assert two_proc == pytest.approx(one.losses, abs=1e-5)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sigkill_mid_run_then_resume_gives_the_same_loss_curve(tiny_model: Path, packed: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(zero_stage=2, max_steps=6, grad_accum=2, micro_batch_size=1, lr=2e-3, warmup_steps=1,
                      checkpoint_every=1, keep_checkpoints=2)
    ref = train(tiny_model, packed, tmp_path / "ref", cfg.model_copy(update={"checkpoint_every": None}), seed=0, show_progress=False)

    ckpt = tmp_path / "ckpt"
    args = [sys.executable, str(WORKER), str(tiny_model), str(packed), str(tmp_path / "out"), cfg.model_dump_json(),
            str(tmp_path / "res.json"), "--ckpt", str(ckpt)]
    proc = subprocess.Popen([*args, "--sleep", "2"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step 3 "):
            break
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "res.json").exists()
    tag = latest_checkpoint(ckpt)
    assert tag is not None and int(tag.split("-")[1]) >= 2
    # Only the last K complete checkpoints are kept.
    assert len([p for p in ckpt.iterdir() if (p / COMPLETE).is_file()]) <= 2

    subprocess.run(args, env=_env(), check=True, timeout=300, capture_output=True)
    resumed = json.loads((tmp_path / "res.json").read_text())
    assert resumed["resumed_from"] == int(tag.split("-")[1])
    assert resumed["losses"] == pytest.approx(ref.losses, abs=1e-6)


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / COMPLETE).write_text("2\n")
    (tmp_path / "step-00000003").mkdir()  # crashed mid-save: no marker
    assert latest_checkpoint(tmp_path) == "step-00000002"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_deepspeed_overrides_merge_and_batch_check(tmp_path: Path) -> None:
    over = tmp_path / "ds.json"
    over.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "gradient_clipping": 0.3}))
    ds = deepspeed_config(TrainConfig(zero_stage=2, deepspeed_overrides=str(over)), world_size=2, precision="fp32")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}
    assert ds["gradient_clipping"] == 0.3 and ds["train_batch_size"] == 1 * 4 * 2
    over.write_text(json.dumps({"train_batch_size": 7}))
    with pytest.raises(ConfigError, match=r"train_batch_size \(7\) must equal .* = 8"):
        deepspeed_config(TrainConfig(deepspeed_overrides=str(over)), world_size=2, precision="fp32")
    off = deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_param=True), 1, precision="fp32")
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False
    fp16 = deepspeed_config(TrainConfig(), 1, precision="fp16")
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    with pytest.raises(ValueError, match="offload_param needs train.zero_stage=3"):
        TrainConfig(zero_stage=2, offload_param=True)
