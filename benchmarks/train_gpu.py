"""Training throughput, side by side: our DeepSpeed trainer vs TRL's SFTTrainer, same model, same packed rows.

One invocation builds packed rows with our pipeline (conf/demo.yaml data: curate + prepare), then trains on
them twice, each side in its own fresh subprocess (interpreter start-up, imports, model load and engine
set-up are not timed):

- ours: ``sft_engine.train.train`` (DeepSpeed engine, token-normalized loss, AdamW).
- TRL:  ``SFTTrainer`` fed the SAME packed rows, in the SAME order, padding-free: one dataset row per packed
  row (``input_ids``, ``labels``, ``seq_lengths``; the trailing pad segment kept as its own segment with no
  loss, exactly as ours trains it), ``dataset_kwargs={"skip_prepare_dataset": True}`` so TRL does no
  tokenization or packing, TRL's own ``DataCollatorForLanguageModeling(padding_free=True)`` (position ids
  restart per sample, ``cu_seq_lens`` for varlen kernels), sequential sampler.

Both sides: same micro batch, gradient accumulation, sequence length, precision (bf16 on GPU, fp32 on CPU),
attention (each side its best for packed rows: see --attn), AdamW(lr 1e-4, betas 0.9/0.95, wd 0; torch's fused kernel on
both sides: TRL's default optim with torch >= 2.8, ours always), no warmup, cosine to 0.1 x lr, grad clip 1.0,
no gradient checkpointing (TRL's default is on; turned off so both do the same work), no eval, no saving.

Step time is the wall time between consecutive step ends (data loading, forward/backward, optimizer and
per-step logging all count); the first ``--warmup`` steps are left out. Tokens per step =
micro_batch x grad_accum x seq_len (packed rows, pad slots included, on both sides).

    python benchmarks/train_gpu.py --device cpu                          # small CPU run (seq 1024, 6 steps)
    python benchmarks/train_gpu.py --model /path/to/hf_folder            # GPU: a local 0.5-1B HF folder
    python benchmarks/train_gpu.py --model-config benchmarks/model_configs/llama-3.2-1b.json   # GPU, random weights

``--model-config`` builds the model from a real published ``config.json`` with random weights (seeded, saved once,
loaded by both sides): tokens/s, MFU and memory do not depend on the weights' values, and nothing comes from the hub.
Its vocabulary must cover the data's token ids (those configs' 128-152k do; the data is tokenized by ``--model``'s
tokenizer, the packaged SmolLM2's by default). ``--data`` trains on an already prepared ``train.arrow`` (its
``manifest.json`` beside it), e.g. one built on another machine, so the GPU box needs no curation inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEFAULTS = {  # per device: seq_len, steps, warmup, micro_batch, grad_accum
    "cpu": {"seq_len": 1024, "steps": 6, "warmup": 1, "micro_batch": 1, "grad_accum": 2},
    "cuda": {"seq_len": 2048, "steps": 20, "warmup": 5, "micro_batch": 1, "grad_accum": 8},
}


# ---- shared helpers ----------------------------------------------------------------------------------


def consumed_rows(n: int, micro_batch: int, seed: int, micro_batches: int) -> list[int]:
    """Row indices in the order our trainer reads them (one process), from the trainer's own sampler."""
    from itertools import islice

    from sft_engine.data import batch_indices

    return [int(i) for mine in islice(batch_indices(n, micro_batch, seed), micro_batches) for i in mine]


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def step_seconds(ends: list[float], first: float) -> list[float]:
    """Durations from step-end timestamps; the first step is measured from ``first``."""
    return [b - a for a, b in zip([first, *ends[:-1]], ends, strict=True)]


# ---- the two sides (each in a fresh subprocess) --------------------------------------------------------


def run_ours(spec: dict) -> dict:
    from sft_engine.config import TrainConfig
    from sft_engine.train import train

    cfg = TrainConfig(
        zero_stage=spec["zero_stage"], precision=spec["precision"], micro_batch_size=spec["micro_batch"],
        grad_accum=spec["grad_accum"], max_steps=spec["steps"], lr=1e-4, warmup_steps=0, min_lr_ratio=0.1,
        betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, attn_implementation=spec["attn_ours"],
        lm_head_chunk=spec["lm_head_chunk"] or None,
    )
    ends: list[float] = []
    cpu: list[float] = []
    peak: list[float] = []

    def on_step(step: int, metrics: dict) -> None:
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        peak.append(peak_memory_gb(spec["device"]))

    res = train(Path(spec["model_dir"]), Path(spec["data_path"]), Path(spec["out"]) / "ours_model", cfg, seed=spec["seed"],
                on_step=on_step, show_progress=False)
    h = res.history
    # Step 1 starts inside train(); its own step_seconds stands in (it is a warm-up step and not counted).
    secs = step_seconds(ends, ends[0] - h[0]["train/step_seconds"])
    return {"step_seconds": secs, "step_end_cpu": cpu, "losses": [m["train/loss"] for m in h],
            "grad_norms": [m["train/grad_norm"] for m in h], "peak_memory_gb": peak[-1], "threads": torch_threads()}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft_engine.data import PackedDataset
    from sft_engine.model import load_model, load_tokenizer

    packed = PackedDataset(spec["data_path"])
    rows = [packed[i] for i in spec["order"]]
    ds = Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "labels": [r["labels"].tolist() for r in rows],
        "seq_lengths": [r["seq_lens"].tolist() for r in rows],
    })
    torch.manual_seed(spec["seed"])
    model_dir = Path(spec["model_dir"])
    model = load_model(model_dir, dtype=torch.float32, attn_implementation=spec["attn_trl"])
    model.config.use_cache = False
    tok = load_tokenizer(model_dir)
    on_cpu = spec["device"] == "cpu"
    args = SFTConfig(
        output_dir=str(Path(spec["out"]) / "trl_out"), max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"], learning_rate=1e-4, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, optim="adamw_torch_fused", bf16=spec["precision"].startswith("bf16"), fp16=False, use_cpu=on_cpu,
        gradient_checkpointing=False, padding_free=True, packing=False, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True}, train_sampling_strategy="sequential", report_to=[], logging_steps=1,
        save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
    )
    begins: list[float] = []
    ends: list[float] = []
    cpu: list[float] = []
    peak: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            peak.append(peak_memory_gb(spec["device"]))

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"step_seconds": step_seconds(ends, begins[0]), "step_end_cpu": cpu, "losses": [x["loss"] for x in logs],
            "grad_norms": [x.get("grad_norm", float("nan")) for x in logs], "peak_memory_gb": peak[-1], "threads": torch_threads()}


def _side(side: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_ours(spec) if side == "ours" else run_trl(spec)
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ----------------------------------------------------------------------------------------------


def build_data(model: str, seq_len: int, work: Path) -> tuple[Path, Path, dict]:
    """Curate + prepare the demo data with our pipeline; returns (model_dir, train.arrow, manifest)."""
    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation
    from sft_engine.model import resolve_model

    cfg = load_config(ROOT / "conf" / "demo.yaml", [f"work_dir={work}", f"model={model}", f"prepare.max_seq_len={seq_len}"])
    curated = curation.run_curate(cfg).path
    prepared = stages.run_prepare(cfg, curated).path
    return resolve_model(cfg.model), prepared / "train.arrow", json.loads((prepared / "manifest.json").read_text())


def random_init_model(config_file: Path, tokenizer_dir: Path, out: Path, seed: int, device: str) -> Path:
    """A Hugging Face folder with ``config_file``'s architecture, random weights (bf16, seeded) and ``tokenizer_dir``'s
    tokenizer files."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_file.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    print(f"model: {config_file.name} ({config.model_type}, {n_params / 1e6:,.1f} M parameters), random weights (seed {seed})")
    return out


def pick_attn(device: str, requested: str) -> tuple[str, str]:
    """(ours, TRL's) attention: the same kernel when one is named; with auto, ours resolves its own default
    (train.attn_implementation=auto: FlashAttention 2 if installed on a GPU, else sdpa_varlen) and TRL gets
    transformers' best for packed rows (FlashAttention 2 if installed on a GPU, else sdpa with the packed mask)."""
    if requested != "auto":
        return requested, requested
    import importlib.util

    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return ("auto", "flash_attention_2" if flash else "sdpa")


def run_side(side: str, spec_file: Path, device: str) -> dict:
    env = {**os.environ, **OFFLINE}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run on a GPU box stays on the CPU
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--side", side, "--spec", str(spec_file)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["process_seconds"] = time.perf_counter() - t
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (packaged) or a local Hugging Face folder")
    p.add_argument("--model-config", type=Path, help="a model config.json: train that architecture with random weights "
                   "(and --model's tokenizer) instead of --model's weights")
    p.add_argument("--data", type=Path, help="an already prepared train.arrow (manifest.json beside it) instead of curating "
                   "and preparing conf/demo.yaml's data here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seq-len", type=int, help="packed row length (default 2048 on GPU, 1024 on CPU)")
    p.add_argument("--steps", type=int, help="optimizer steps per side (default 20 GPU, 4 CPU)")
    p.add_argument("--warmup", type=int, help="first steps left out of tokens/s, at least 1 (default 5 GPU, 1 CPU)")
    p.add_argument("--micro-batch", type=int, help="packed rows per forward (default 1)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 8 GPU, 2 CPU)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2, help="our DeepSpeed ZeRO stage (default 2, as shipped)")
    p.add_argument("--attn", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto",
                   help="both sides' kernel; auto (default): each side's best for packed rows, ours as shipped "
                   "(sdpa_varlen, or flash_attention_2 on a GPU with flash-attn), TRL flash_attention_2 or sdpa")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16-mixed"], default="auto",
                   help="default: bf16 on GPU, fp32 on CPU. TRL's bf16 is autocast over fp32 weights; ours: bf16 = bf16 weights + "
                   "fp32 master, bf16-mixed = autocast over fp32 weights (like for like with TRL)")
    p.add_argument("--lm-head-chunk", type=int, default=1024,
                   help="our train.lm_head_chunk (default 1024, as shipped; 0 = full logits)")
    p.add_argument("--work-dir", help="keep curated/prepared data here (reused across runs); default: a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        _side(args.side, args.spec)
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    d = DEFAULTS[device]
    seq_len, steps = args.seq_len or d["seq_len"], args.steps or d["steps"]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    mb, ga = args.micro_batch or d["micro_batch"], args.grad_accum or d["grad_accum"]
    if not 1 <= warmup < steps:
        raise SystemExit("--warmup must be at least 1 and below --steps")
    precision = ("bf16" if device == "cuda" else "fp32") if args.precision == "auto" else args.precision
    attn_ours, attn_trl = pick_attn(device, args.attn)

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp) / "work"
        t = time.perf_counter()
        if args.data:
            from sft_engine.model import resolve_model

            data_path, manifest = args.data, json.loads((args.data.parent / "manifest.json").read_text())
            model_dir = Path(args.model) if Path(args.model).is_dir() else resolve_model(args.model)
        else:
            model_dir, data_path, manifest = build_data(args.model, seq_len, work)
        from sft_engine.data import PackedDataset

        packed = PackedDataset(data_path)
        n_rows = len(packed)
        if packed[0]["input_ids"].shape[0] != seq_len:
            raise SystemExit(f"--data rows are {packed[0]['input_ids'].shape[0]} tokens long, not --seq-len {seq_len}")
        if args.model_config:
            model_dir = random_init_model(args.model_config, model_dir, Path(tmp) / "random_model", args.seed, device)
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            top = max(int(packed[i]["input_ids"].max()) for i in range(n_rows))
            if top >= vocab:
                raise SystemExit(f"--model-config's vocab_size {vocab} does not cover the data's token id {top}")
        print(f"data: {n_rows} packed rows of {seq_len} (fill {100 * manifest['splits']['train']['fill']:.1f}%), "
              f"built in {time.perf_counter() - t:.0f}s; model {model_dir}")
        spec = {
            "model_dir": str(model_dir), "data_path": str(data_path), "out": tmp, "device": device, "precision": precision,
            "attn_ours": attn_ours, "attn_trl": attn_trl, "zero_stage": args.zero_stage, "lm_head_chunk": args.lm_head_chunk, "seq_len": seq_len, "steps": steps, "micro_batch": mb, "grad_accum": ga,
            "seed": args.seed, "order": consumed_rows(n_rows, mb, args.seed, steps * ga),
        }
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        results = {side: run_side(side, spec_file, device) for side in ("ours", "trl")}
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_dir)
    model_name = args.model_config.stem + " (random weights)" if args.model_config else Path(str(model_dir)).name

    from sft_engine.train import PEAK_BF16_FLOPS, flops_per_token

    fpt = flops_per_token(model_config, seq_len)
    peak = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    tokens_per_step = mb * ga * seq_len
    for r in results.values():
        timed = r["step_seconds"][warmup:]
        r["tokens_per_s"] = tokens_per_step * len(timed) / sum(timed)
        r["tokens_per_s_median_step"] = tokens_per_step / statistics.median(timed)
        r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None
        # CPU seconds the process used per wall second and thread over the timed steps: well below 100% on a CPU
        # run means other jobs took the cores (or the side idles); rerun on a quiet machine.
        cpu = r["step_end_cpu"]
        r["cpu_busy"] = (cpu[-1] - cpu[warmup - 1]) / sum(timed) / r["threads"]

    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{model_name} on {dev}: seq_len {seq_len}, micro_batch {mb} x grad_accum {ga} = {tokens_per_step} "
          f"tokens/step, {steps} steps ({warmup} warm-up not timed), {precision}, attn ours {attn_ours} / TRL {attn_trl}, ours train.zero_stage={args.zero_stage}, "
          f"lm_head_chunk {args.lm_head_chunk or 'off'}")
    mem = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    busy = "CPU busy"
    print(f"{'side':5} {'tokens/s':>10} {'(median)':>9} {'s/step':>8} {mem:>13} {'MFU':>7} {busy:>9} {'loss@1':>8} {'gnorm@1':>8} "
          f"{'loss@end':>9} {'process s':>10}")
    for side, r in results.items():
        mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else f"{'-':>7}"
        cpu_busy = f"{100 * r['cpu_busy']:8.0f}%" if device == "cpu" else f"{'-':>9}"
        timed = r["step_seconds"][warmup:]
        print(f"{side:5} {r['tokens_per_s']:10,.0f} {r['tokens_per_s_median_step']:9,.0f} {sum(timed) / len(timed):8.2f} "
              f"{r['peak_memory_gb']:13.2f} {mfu} {cpu_busy} {r['losses'][0]:8.4f} {r['grad_norms'][0]:8.3f} {r['losses'][-1]:9.4f} "
              f"{r['process_seconds']:10.0f}")
    o, t_ = results["ours"], results["trl"]
    for side, r in results.items():
        print(f"{side} step seconds: " + " ".join(f"{x:.2f}" for x in r["step_seconds"]))
    print(f"load average (1 min) before/after: {load0:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"ratio ours/TRL: tokens/s {o['tokens_per_s'] / t_['tokens_per_s']:.2f}x "
          f"(median step {o['tokens_per_s_median_step'] / t_['tokens_per_s_median_step']:.2f}x), "
          f"peak memory {o['peak_memory_gb'] / t_['peak_memory_gb']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_name, "device": dev, "spec": {k: v for k, v in spec.items() if k != "order"},
                                               "warmup": warmup, "flops_per_token": fpt, "results": results}, indent=1))


if __name__ == "__main__":
    main()
