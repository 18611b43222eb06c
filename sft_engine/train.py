"""Training with a DeepSpeed engine over packed, memory-mapped rows.

Loss normalization: for each optimizer step the supervised tokens of the whole accumulation
window, over all ranks, are counted first (``N``). Each micro-batch then back-propagates
``sum_of_token_losses * world_size / N``; DeepSpeed's gradient averaging divides by the world size
again, so the step's gradient is exactly that of (sum of token losses) / N over the global batch,
whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft_engine.config import TrainConfig
from sft_engine.data import PackedDataset, iter_batches
from sft_engine.loss import supervised_count, token_loss_sum
from sft_engine.model import load_model, load_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed once per process (gloo on CPU, NCCL on GPU); returns (rank, world_size).

    A plain single process gets the rendezvous variables a launcher would set, so DeepSpeed
    does not fall back to MPI discovery.
    """
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_precision(cfg: TrainConfig) -> str:
    """bf16 on GPU and fp32 on CPU unless the config says otherwise."""
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON derived from our training config (never hand-copied)."""
    precision = resolve_precision(cfg)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip is not None:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, n_rows: int, world_size: int) -> int:
    """Optimizer steps: ``max_steps`` if set, else epochs over the packed rows (at least one)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil(cfg.epochs * n_rows / per_step))


@dataclass
class TrainResult:
    """Summary of a finished training run."""

    steps: int
    losses: list[float]
    tokens: int
    supervised_tokens: int
    seconds: float
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:
        # Gathers the partitioned parameters onto rank 0.
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def train(
    model_dir: Path,
    data_path: Path,
    output_dir: Path,
    cfg: TrainConfig,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune the model in ``model_dir`` on packed rows and save a Hugging Face folder to ``output_dir``."""
    import deepspeed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = init_distributed()
    _seed_everything(seed)
    ds_data = PackedDataset(data_path)
    steps = total_steps(cfg, len(ds_data), world)
    model = load_model(model_dir, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world)
    )
    batches = iter_batches(ds_data, cfg.micro_batch_size, seed, rank=rank, world_size=world)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    tokens = supervised_total = 0
    start = time.perf_counter()
    progress = None
    if show_progress and rank == 0:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        bar = progress.add_task("train", total=steps, loss=float("nan"))
        progress.start()
    engine.train()
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            lr = float(optimizer.param_groups[0]["lr"])
            window = [next(batches) for _ in range(cfg.grad_accum)]
            local = sum(supervised_count(b["labels"]) for b in window)
            count = torch.tensor([local], dtype=torch.float64)
            torch.distributed.all_reduce(count)
            n_window = max(1.0, float(count.item()))
            loss_sum = 0.0
            for b in window:
                out = engine(
                    input_ids=b["input_ids"].to(engine.device), position_ids=b["position_ids"].to(engine.device), use_cache=False
                )
                ce = token_loss_sum(out.logits, b["labels"])
                engine.backward(ce * world / n_window, scale_wrt_gas=False)
                engine.step()
                loss_sum += float(ce.detach())
            total = torch.tensor([loss_sum], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            loss = float(total.item()) / n_window
            dt = time.perf_counter() - t0
            step_tokens = sum(int(b["input_ids"].numel()) for b in window) * world
            tokens += step_tokens
            supervised_total += int(n_window)
            losses.append(loss)
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/tokens_per_s": step_tokens / dt,
                "train/supervised_tokens_per_s": n_window / dt,
                "train/supervised_tokens": float(supervised_total),
                "train/step_seconds": dt,
            }
            history.append({"step": float(step + 1), **metrics})
            if on_step is not None and rank == 0:
                on_step(step + 1, metrics)
            if progress is not None:
                progress.update(bar, advance=1, loss=loss)
    finally:
        if progress is not None:
            progress.stop()
    seconds = time.perf_counter() - start
    state = _full_state_dict(engine, cfg.zero_stage)
    if rank == 0:
        save_hf_folder(engine.module, state, model_dir, output_dir)
    torch.distributed.barrier()
    return TrainResult(steps, losses, tokens, supervised_total, seconds, output_dir, history)


def save_hf_folder(module: Any, state: dict[str, torch.Tensor], model_dir: Path, output_dir: Path) -> None:
    """Write safetensors weights, config, generation config and tokenizer (with chat template)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    module.config.use_cache = True
    module.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(output_dir)
