"""Training with a DeepSpeed engine over packed, memory-mapped rows.

Loss normalization: for each optimizer step the supervised tokens of the whole accumulation
window, over all ranks, are counted first (``N``). Each micro-batch then back-propagates
``sum_of_token_losses * world_size / N``; DeepSpeed's gradient averaging divides by the world size
again, so the step's gradient is exactly that of (sum of token losses) / N over the global batch,
whatever the split into micro-batches and ranks. ``loss_norm=sample`` does the same with per-sample
mean losses and the global sample count.

Checkpoints: every ``checkpoint_every`` steps a DeepSpeed checkpoint (model, optimizer, scheduler)
is written with the step, the loss history and RNG states as client state; a ``_COMPLETE`` marker
is written only after every rank has finished, so a crash mid-save leaves a folder that resume
ignores. The data position needs no state of its own: the batch order is a pure function of
(seed, micro-batches consumed).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft_engine.config import ConfigError, TrainConfig
from sft_engine.data import PackedDataset, iter_batches
from sft_engine.loss import (
    chunked_token_losses,
    fused_linear_loss,
    logit_token_losses,
    loss_coefficients,
    sample_count,
    supervised_count,
    token_loss_sum,
)
from sft_engine.model import load_model, load_tokenizer
from sft_engine.runtime import bound_heap, notice

COMPLETE = "_COMPLETE"

# Dense bf16 peak FLOP/s for MFU, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed once per process (gloo on CPU, NCCL on GPU); returns (rank, world_size).

    A plain single process gets the rendezvous variables a launcher would set, so DeepSpeed
    does not fall back to MPI discovery.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        if os.environ["WORLD_SIZE"] == "1" or "MASTER_PORT" not in os.environ:
            # One rank has no peer to agree on a port with, so it always takes a fresh one: an inherited
            # MASTER_PORT (a Dask worker inherits its parent's environment) may be held by the parent's store.
            os.environ["MASTER_PORT"] = str(_free_port())
        ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
        if os.environ["WORLD_SIZE"] == "1":
            # The shared-memory op only speeds up all-reduce between ranks on one host; a single rank never
            # calls it, and building it costs a first run 30-45 s of compiling on 2 cores.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        elif not torch.cuda.is_available() and os.environ.get("TORCH_EXTENSIONS_DIR") and not ext.is_file():
            notice(f"building DeepSpeed's shared-memory op once (~30-45 s on 2 cores; cached in {ext.parent.parent})")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_precision(cfg: TrainConfig) -> str:
    """bf16 on GPU and fp32 on CPU unless the config says otherwise."""
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    return cfg.precision


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON derived from our training config (never hand-copied), merged with user overrides.

    Raises ConfigError if the batch sizes do not satisfy
    train_batch_size = micro_batch x grad_accum x world_size after the merge. One process runs stages 1-2 as stage 0
    (nothing to partition) unless it offloads the optimizer or the override JSON sets the stage itself.
    """
    precision = precision or resolve_precision(cfg)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer or cfg.offload_param:
        # Our optimizer is a client torch AdamW; let DeepSpeed keep it rather than demand its CPU Adam.
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.grad_clip is not None:
        ds["gradient_clipping"] = cfg.grad_clip
    overridden_stage = False
    if cfg.deepspeed_overrides:
        path = Path(cfg.deepspeed_overrides)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_overrides: file '{path}' does not exist")
        try:
            over = json.loads(path.read_text())
            overridden_stage = "stage" in over.get("zero_optimization", {})
            ds = _merge(ds, over)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train.deepspeed_overrides: '{path}' is not valid JSON: {exc}") from exc
    mb, ga, tb = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    if tb != mb * ga * world_size:
        raise ConfigError(
            f"DeepSpeed train_batch_size ({tb}) must equal train_micro_batch_size_per_gpu ({mb}) x "
            f"gradient_accumulation_steps ({ga}) x world size ({world_size}) = {mb * ga * world_size}; "
            "set train.micro_batch_size / train.grad_accum instead of batch fields in the override JSON"
        )
    if (mb, ga) != (cfg.micro_batch_size, cfg.grad_accum):
        raise ConfigError("the DeepSpeed override JSON may not change batch sizes; set train.micro_batch_size / train.grad_accum")
    if world_size == 1 and ds["zero_optimization"]["stage"] in (1, 2) and not cfg.offload_optimizer and not overridden_stage:
        # Stages 1-2 partition optimizer state and gradients across processes; one process keeps them all anyway, and
        # the stage only adds a flat fp32 copy of the weights and bucket copies of every gradient (0.6 GiB and ~30 % of
        # a CPU step for a 135M model, docs/benchmarks.md). Same updates at stage 0 (tests/test_train.py).
        ds["zero_optimization"]["stage"] = 0
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


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters in matmuls + attention scores (Kaplan/PaLM formula)."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * (h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o, k, v, gate/up/down
    matmul_params = n_layers * per_layer + config.vocab_size * h  # lm head
    return 6 * matmul_params + 12 * n_layers * h * seq_len


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
    resumed_from: int = 0


def flatten_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows as one row (padding-free layout).

    transformers derives FlashAttention's varlen boundaries from restarting position ids only for
    batch size 1, so with several rows it would let samples attend across them. One row is exact:
    position ids still restart per sample, and every row already starts with an ignored label, so
    nothing is predicted across the seams.
    """
    return {k: (v.reshape(1, -1) if k in ("input_ids", "labels", "position_ids", "weights") else v) for k, v in batch.items()}


def micro_batch_loss(engine: Any, chunk: int | None, norm: str, zero_stage: int,
                     autocast: torch.dtype | None = None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The training forward: a micro-batch's loss sum ``sum_t coef_t * loss_t`` (``loss.loss_coefficients``: token
    weights, and per-sample means for ``norm="sample"``), which the caller divides by the global batch's count.

    With ``chunk``, the engine's forward projects no position onto the vocabulary (``logits_to_keep`` of no
    positions, which every transformers causal LM takes); the decoder's output is taken by a hook and the LM head and
    the loss run ``chunk`` tokens at a time: fused with their gradients (``loss.fused_linear_loss``, the head computed
    once) below ZeRO-3, and at ZeRO-3, where the head's weight exists only inside its module's forward, through the
    module under checkpointing (``loss.chunked_token_losses``, the head computed again in the backward pass). The
    forward still goes through the engine, so ZeRO-3 gathers and releases parameters as it always does. With
    ``autocast`` (``train.precision=bf16-mixed``) the forward, the head and their backward run their matmuls in that dtype.
    """
    module = engine.module

    def mixed() -> Any:
        return torch.autocast(engine.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)

    def coef(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_coefficients(b["labels"], b["position_ids"], b.get("weights"), norm).to(engine.device)

    transform = _logit_transform(module.config)
    if chunk is not None and transform:
        notice(f"train.lm_head_chunk: this model's forward applies {transform} to its logits after the LM head; "
               "training on full logits instead")
        chunk = None
    if chunk is None:

        def full(b: dict[str, torch.Tensor]) -> torch.Tensor:
            with mixed():
                logits = _forward(engine, b).logits
            return (logit_token_losses(logits, b["labels"]) * coef(b)).sum()

        return full
    head = module.get_output_embeddings()
    fused = zero_stage < 3 and getattr(head, "bias", None) is None
    captured: list[torch.Tensor] = []
    armed = [False]  # only the training forward's output is kept (not the held-out evaluation's)

    def keep_hidden(_: Any, __: Any, out: Any) -> None:
        if armed[0]:
            captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    module.get_decoder().register_forward_hook(keep_hidden)
    nothing = torch.zeros(0, dtype=torch.long)

    def loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        captured.clear()
        armed[0] = True
        try:
            with mixed():
                _forward(engine, b, logits_to_keep=nothing.to(engine.device))
        finally:
            armed[0] = False
        hidden = captured.pop()
        if fused:
            return fused_linear_loss(hidden, head.weight, b["labels"], coef(b), chunk, autocast)[0]
        with mixed():
            return (chunked_token_losses(hidden, head, b["labels"], chunk) * coef(b)).sum()

    return loss


def resolve_attention(requested: str, model_dir: Path) -> str:
    """The attention kernel to load: ``auto`` is FlashAttention 2 on a GPU where flash-attn is installed, else
    ``sdpa_varlen`` (one causal SDPA per packed sample; PyTorch's FlashAttention varlen kernel on a GPU in bf16), else ``sdpa`` for a model whose attention ``sdpa_varlen`` cannot
    compute (soft-capped scores, sinks)."""
    import importlib.util

    from transformers import AutoConfig

    from sft_engine.attention import VARLEN, register, unsupported

    if requested == "auto" and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if requested not in ("auto", VARLEN):
        return requested
    why = unsupported(AutoConfig.from_pretrained(model_dir))
    if why is not None:
        if requested == VARLEN:
            raise ConfigError(f"train.attn_implementation={VARLEN} cannot compute this model's attention ({why}); set "
                              "train.attn_implementation=sdpa or eager")
        return "sdpa"
    register()
    return VARLEN


def _logit_transform(config: Any) -> str | None:
    """What a model's causal-LM forward does to the LM head's output besides returning it (Gemma 2/3 soft-cap the
    logits, Cohere and Granite scale them), or None: the chunked path computes the plain head only."""
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    return None


def _forward(engine: Any, b: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    return engine(input_ids=b["input_ids"].to(engine.device), position_ids=b["position_ids"].to(engine.device), use_cache=False, **kwargs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:
        # Gathers the partitioned parameters (collective: every rank calls it).
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def latest_checkpoint(ckpt_dir: Path | None) -> str | None:
    """Tag of the newest checkpoint with a completion marker, or None."""
    if ckpt_dir is None or not ckpt_dir.is_dir():
        return None
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())
    return tags[-1] if tags else None


def _save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int, rank: int) -> None:
    tag = f"step-{step:08d}"
    state = {**state, "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(f"{step}\n")
        complete = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in (p for p in ckpt_dir.iterdir() if p.is_dir() and not (p / COMPLETE).is_file() and p.name < tag):
            shutil.rmtree(partial, ignore_errors=True)
    torch.distributed.barrier()


@torch.no_grad()
def engine_heldout_loss(engine: Any, data: PackedDataset, micro_batch_size: int, max_rows: int | None, rank: int, world: int) -> float:
    """Loss per supervised token on held-out rows, evaluated through the engine on every rank (ZeRO-3 safe)."""
    from sft_engine.data import collate

    n = len(data) if max_rows is None else min(len(data), max_rows)
    engine.eval()
    # Collectives run on the engine's device: NCCL has no CPU tensors.
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
    per_rank = math.ceil(n / world)
    for start in range(0, per_rank, micro_batch_size):
        idx = [rank * per_rank + i for i in range(start, min(per_rank, start + micro_batch_size))]
        real = [i for i in idx if i < n]
        batch = collate([data[i if i < n else 0] for i in idx])
        out = engine(input_ids=batch["input_ids"].to(engine.device), position_ids=batch["position_ids"].to(engine.device), use_cache=False)
        if real:
            keep = torch.tensor([i < n for i in idx])
            sums[0] += float(token_loss_sum(out.logits[keep.to(out.logits.device)], batch["labels"][keep]))
            sums[1] += supervised_count(batch["labels"][keep])
    torch.distributed.all_reduce(sums)
    engine.train()
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def train(
    model_dir: Path,
    data_path: Path,
    output_dir: Path,
    cfg: TrainConfig,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
    checkpoint_dir: Path | None = None,
    eval_data: Path | None = None,
) -> TrainResult:
    """Fine-tune the model in ``model_dir`` on packed rows and save a Hugging Face folder to ``output_dir``."""
    import deepspeed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bound_heap()
    rank, world = init_distributed()
    precision = resolve_precision(cfg)
    ds_cfg = deepspeed_config(cfg, world, precision)
    stage = int(ds_cfg["zero_optimization"]["stage"])
    if stage != cfg.zero_stage and stage == 0 and world == 1 and rank == 0:
        notice(f"train.zero_stage={cfg.zero_stage}: one process has nothing to partition; training at ZeRO stage {stage} "
               "(same updates, less memory and copying)")
    _seed_everything(seed)
    ds_data = PackedDataset(data_path)
    steps = total_steps(cfg, len(ds_data), world)
    attn = resolve_attention(cfg.attn_implementation, model_dir)
    model = load_model(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    fpt = flops_per_token(model.config, int(ds_data[0]["input_ids"].shape[0]))
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name()), None)
    # torch's fused AdamW: one kernel over all tensors, 6.8x the CPU default's for-loop on SmolLM2-135M (0.077 vs 0.525 s
    # a step, weights within 1.2e-7), ahead of DeepSpeedCPUAdam (0.125 s, and 95 s of compiling on first use).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.min_lr_ratio))
    if cfg.gradient_checkpointing:
        # Non-reentrant: the packed rows' position ids and the chunked head's own checkpoints nest inside it.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if world == 1 and stage == 0 and precision in ("fp32", "bf16-mixed"):
        # One rank has nobody to average with, yet DeepSpeed would flatten every gradient into buckets, "all-reduce"
        # them and copy them back at each step (0.36 s a step for 135M parameters). bf16/fp16 keep it: their
        # optimizer wrappers hook into that path.
        engine.enable_backward_allreduce = False
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    micro_loss = micro_batch_loss(engine, cfg.lm_head_chunk, cfg.loss_norm, stage, autocast)

    start_step, losses, history = 0, [], []
    tokens = supervised_total = 0
    tag = latest_checkpoint(checkpoint_dir) if cfg.resume == "auto" else None
    if tag is not None:
        _, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        start_step, losses, history = client["step"], client["losses"], client["history"]
        tokens, supervised_total = client["tokens"], client["supervised_tokens"]
        random.setstate(client["rng"]["python"])
        np.random.set_state(client["rng"]["numpy"])
        torch.set_rng_state(client["rng"]["torch"])
    batches = iter_batches(ds_data, cfg.micro_batch_size, seed, rank=rank, world_size=world, skip=start_step * cfg.grad_accum)
    eval_ds = PackedDataset(eval_data) if eval_data is not None and cfg.eval_every else None

    progress = None
    if show_progress and rank == 0:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        bar = progress.add_task("train", total=steps, completed=start_step, loss=losses[-1] if losses else float("nan"))
        progress.start()
    engine.train()
    started = time.perf_counter()
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            lr = float(optimizer.param_groups[0]["lr"])
            window = [next(batches) for _ in range(cfg.grad_accum)]
            counts = torch.tensor(
                [sum(supervised_count(b["labels"]) for b in window), sum(sample_count(b["labels"], b["position_ids"]) for b in window)],
                dtype=torch.float64, device=engine.device,  # NCCL reduces device tensors only
            )
            torch.distributed.all_reduce(counts)
            n_tokens, n_samples = max(1.0, float(counts[0])), max(1.0, float(counts[1]))
            denom = n_tokens if cfg.loss_norm == "token" else n_samples
            loss_sum = 0.0
            grad_norm = None
            for k, b in enumerate(window):
                if attn == "flash_attention_2":
                    b = flatten_batch(b)
                part = micro_loss(b)
                engine.backward(part * world / denom, scale_wrt_gas=False)
                if stage == 0 and k == len(window) - 1:
                    # DeepSpeed reports no grad norm at stage 0 in fp32; take it before the step clips.
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
                engine.step()
                loss_sum += float(part.detach())
            total = torch.tensor([loss_sum], dtype=torch.float64, device=engine.device)
            torch.distributed.all_reduce(total)
            loss = float(total.item()) / denom
            dt = time.perf_counter() - t0
            step_tokens = sum(int(b["input_ids"].numel()) for b in window) * world
            real_tokens = sum(int(b["real_tokens"]) for b in window) * world
            tokens += step_tokens
            supervised_total += int(n_tokens)
            losses.append(loss)
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            metrics = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/tokens_per_s": step_tokens / dt,
                "train/supervised_tokens_per_s": n_tokens / dt,
                "train/samples_per_s": n_samples / dt,
                "train/supervised_tokens": float(supervised_total),
                "train/step_seconds": dt,
                "train/fill": real_tokens / step_tokens,
                "train/peak_memory_gb": _peak_memory_gb(),
            }
            if peak_flops is not None:
                metrics["train/mfu"] = step_tokens * fpt / dt / (peak_flops * world)
            if eval_ds is not None and len(eval_ds) and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
                # One row per forward under FlashAttention (see flatten_batch).
                eval_mb = 1 if attn == "flash_attention_2" else cfg.micro_batch_size
                with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=autocast is not None):
                    metrics["eval/loss"] = engine_heldout_loss(engine, eval_ds, eval_mb, cfg.eval_max_rows, rank, world)
            history.append({"step": float(step + 1), **metrics})
            if on_step is not None and rank == 0:
                on_step(step + 1, metrics)
            if progress is not None:
                progress.update(bar, advance=1, loss=loss)
            if checkpoint_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                state = {"step": step + 1, "losses": losses, "history": history, "tokens": tokens, "supervised_tokens": supervised_total}
                _save_checkpoint(engine, checkpoint_dir, step + 1, state, cfg.keep_checkpoints, rank)
    finally:
        if progress is not None:
            progress.stop()
    seconds = time.perf_counter() - started
    state_dict = _full_state_dict(engine, stage)
    if rank == 0:
        save_hf_folder(engine.module, state_dict, model_dir, output_dir)
    torch.distributed.barrier()
    return TrainResult(steps, losses, tokens, supervised_total, seconds, output_dir, history, resumed_from=start_step)


def save_hf_folder(module: Any, state: dict[str, torch.Tensor], model_dir: Path, output_dir: Path) -> None:
    """Write safetensors weights, config, generation config and tokenizer (with chat template)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    module.config.use_cache = True
    module.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(output_dir)
