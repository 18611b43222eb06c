"""What makes a CPU training step faster, one change at a time, on the same packed row (issue 18's trials).

SmolLM2-135M, fp32, one 1,024-token packed row of the demo data (curated and prepared by our pipeline), 2 threads
unless a trial says otherwise. Each trial times the part of the step it changes, best of ``--repeat`` after one
warm-up, every alternative in the same process, one after the other:

- attention: forward + backward of the whole model, transformers' ``sdpa`` (one masked SDPA over the packed row)
  vs ``sdpa_varlen`` (one causal SDPA per sample);
- LM head + loss: forward + backward from the decoder's output, full logits vs checkpointed chunks vs the fused
  chunks (gradients computed in the forward pass);
- optimizer: one AdamW step over the model's parameters, torch for-loop (the CPU default) vs foreach vs fused vs
  DeepSpeed's ``DeepSpeedCPUAdam`` (``--ds-adam``: compiles a C++ op on first use), with the largest difference
  from the for-loop's updated weights;
- threads: forward + backward with 1 thread vs all;
- ZeRO: whole optimizer steps of ``sft_engine.train.train`` (2 micro-batches each) at stage 2 (kept in one process
  by the override JSON) vs stage 0 (what one process now runs for ``train.zero_stage=2``).

    python benchmarks/train_cpu_trials.py --work-dir /tmp/bench_train            # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import build_data


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/bench_train", help="curated/prepared demo data (reused across runs)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--ds-adam", action="store_true", help="also DeepSpeedCPUAdam (builds its C++ op once, ~1 min)")
    p.add_argument("--skip-zero", action="store_true", help="leave out the ZeRO trial (the longest)")
    args = p.parse_args()

    from sft_engine.attention import VARLEN, register
    from sft_engine.data import PackedDataset, collate
    from sft_engine.loss import chunked_token_losses, fused_linear_loss, logit_token_losses, loss_coefficients
    from sft_engine.model import load_model

    model_dir, data_path, _ = build_data("smollm2-135m", 1024, Path(args.work_dir))
    data = PackedDataset(data_path)
    batch = collate([data[0]])
    print(f"row 0: samples of {data[0]['seq_lens'].tolist()} tokens; torch threads {torch.get_num_threads()}")
    register()
    model = load_model(model_dir)
    model.config.use_cache = False
    head = model.get_output_embeddings()
    coef = loss_coefficients(batch["labels"], batch["position_ids"], None, "token")
    rows: list[tuple[str, str, float, str]] = []

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        fused_linear_loss(hidden, head.weight, batch["labels"], coef, 1024)[0].backward()

    for attn in ("sdpa", VARLEN):
        model.set_attn_implementation(attn)
        rows.append(("attention", attn, best_of(fwd_bwd, args.repeat), "model forward + backward"))

    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state.detach()
    labels = batch["labels"]

    def head_full() -> None:
        h = hidden.clone().requires_grad_(True)
        (logit_token_losses(head(h), labels) * coef).sum().backward()

    def head_checkpointed() -> None:
        h = hidden.clone().requires_grad_(True)
        (chunked_token_losses(h, head, labels, 1024) * coef).sum().backward()

    def head_fused() -> None:
        h = hidden.clone().requires_grad_(True)
        fused_linear_loss(h, head.weight, labels, coef, 1024)[0].backward()

    for name, fn in (("full logits", head_full), ("checkpointed chunks", head_checkpointed), ("fused chunks", head_fused)):
        model.zero_grad(set_to_none=True)
        rows.append(("LM head + loss", name, best_of(fn, args.repeat), "from the decoder's output"))

    params = [q for q in model.parameters()]
    grads = [torch.randn_like(q) * 1e-3 for q in params]
    kw = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0}
    makers: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "torch AdamW, for-loop (CPU default)": lambda ps: torch.optim.AdamW(ps, foreach=False, **kw),
        "torch AdamW, foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "torch AdamW, fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
    }
    if args.ds_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        t = time.perf_counter()
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(8))], lr=1e-4)
        print(f"DeepSpeedCPUAdam op ready in {time.perf_counter() - t:.1f} s")
        makers["DeepSpeedCPUAdam"] = lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **kw)
    reference = None
    for name, make in makers.items():
        ps = [q.detach().clone().requires_grad_(True) for q in params]
        for q, g in zip(ps, grads, strict=True):
            q.grad = g.clone()
        opt = make(ps)
        seconds = best_of(opt.step, args.repeat + 2)
        if reference is None:
            reference, note = ps, "reference"
        else:
            note = f"max |w - reference| {max(float((a - b).abs().max()) for a, b in zip(ps, reference, strict=True)):.1e}"
        rows.append(("optimizer step", name, seconds, note))

    model.set_attn_implementation(VARLEN)
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        rows.append(("threads", f"{n}", best_of(fwd_bwd, args.repeat), "model forward + backward"))
    torch.set_num_threads(threads)

    if not args.skip_zero:
        from sft_engine.config import TrainConfig
        from sft_engine.train import train

        with tempfile.TemporaryDirectory() as tmp:
            over = Path(tmp) / "stage2.json"
            over.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
            for name, extra in (("stage 2 in one process", {"deepspeed_overrides": str(over)}), ("stage 0", {})):
                cfg = TrainConfig(zero_stage=2, precision="fp32", grad_accum=2, max_steps=3, warmup_steps=0, **extra)
                res = train(model_dir, data_path, Path(tmp) / "out", cfg, seed=0, show_progress=False)
                secs = [h["train/step_seconds"] for h in res.history[1:]]
                rows.append(("ZeRO, whole step", name, min(secs), f"losses {[round(x, 4) for x in res.losses]}"))

    print(f"\n{'trial':18} {'alternative':38} {'seconds':>8}  note")
    for trial, name, seconds, note in rows:
        print(f"{trial:18} {name:38} {seconds:8.3f}  {note}")


if __name__ == "__main__":
    main()
