"""Preparation throughput, side by side: ours vs TRL's SFTTrainer data preparation.

Same conversations, same tokenizer (SmolLM2's, stock ChatML template), same sequence length:
render the chat template, tokenize, assistant-only loss mask, best-fit-decreasing packing.
Each side runs in its own fresh subprocess (imports and interpreter start-up are not timed) and
reports tokens/s, packing fill, supervised tokens and its peak RSS.

    python benchmarks/prepare_vs_trl.py --n 100000 --max-seq-len 2048   # needs trl (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_data(n: int, folder: Path) -> None:
    """N conversations: every chitchat window, then 3-question verifiable-task chats; Parquet (ours) + HF dataset (TRL)."""
    import polars as pl
    from datasets import Dataset

    from sft_engine.curate import MESSAGE, normalize_row
    from sft_engine.demo_data import chitchat_rows, verifiable_task_rows

    convs = [r["messages"] for r in chitchat_rows()][:n]
    tasks = [normalize_row(r)[0] for r in verifiable_task_rows(3 * n, seed=1)]
    i = 0
    while len(convs) < n:
        convs.append(tasks[i] + tasks[i + 1] + tasks[i + 2])
        i += 3
    plain = [[{"role": m["role"], "content": m["content"]} for m in c] for c in convs]
    pl.DataFrame({"messages": [[{**m, "train": None} for m in c] for c in plain]}, schema={"messages": pl.List(MESSAGE)}).write_parquet(
        folder / "convs.parquet"
    )
    Dataset.from_dict({"messages": plain}).save_to_disk(str(folder / "convs_hf"))


def run_ours(folder: Path, max_seq_len: int) -> dict:
    from sft_engine.config import PrepareConfig
    from sft_engine.data import prepare_split
    from sft_engine.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    cfg = PrepareConfig(max_seq_len=max_seq_len, overlong="truncate")
    t = time.perf_counter()
    stats, lengths = prepare_split(folder / "convs.parquet", tok, cfg, folder / "ours.arrow")
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds, "tokens": int(lengths.sum()), "packed_tokens": stats.tokens, "rows": stats.rows_packed,
        "fill": stats.fill, "supervised": stats.supervised_tokens, "samples": stats.samples_packed,
    }


# SmolLM2's ChatML template with {% generation %} around each assistant reply and its <|im_end|>: TRL refuses
# the stock template for assistant_only_loss. It renders character for character like the stock one (checked
# below), and marks exactly what our masks supervise, so supervised-token counts can be compared.
MARKED_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def run_trl(folder: Path, max_seq_len: int, num_proc: int) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sft_engine.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    ds = load_from_disk(str(folder / "convs_hf"))
    stock = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    tok.chat_template = MARKED_SMOLLM2
    assert tok.apply_chat_template(ds[0]["messages"], tokenize=False) == stock
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(
        output_dir=str(folder / "trl_out"), max_length=max_seq_len, packing=True, packing_strategy="bfd",
        assistant_only_loss=True, dataset_num_proc=num_proc if num_proc > 1 else None, report_to=[], bf16=False, use_cpu=True,
    )
    t = time.perf_counter()
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=ds, processing_class=tok)
    seconds = time.perf_counter() - t
    out = trainer.train_dataset
    lengths = [len(x) for x in out["input_ids"]]
    packed = sum(lengths)
    supervised = 0
    for labels, seq in zip(out["labels"], out["seq_lengths"], strict=True):
        starts = [0]
        for n in seq[:-1]:
            starts.append(starts[-1] + n)
        # Count as ours does: a sample's first position never carries a loss across a packing boundary.
        supervised += sum(1 for x in labels if x != -100) - sum(1 for s in starts if labels[s] != -100)
    return {
        "seconds": seconds, "tokens": packed, "packed_tokens": packed, "rows": len(lengths),
        "fill": packed / (len(lengths) * max_seq_len), "supervised": supervised,
    }


def _side(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    result = run_ours(folder, args.max_seq_len) if args.side == "ours" else run_trl(folder, args.max_seq_len, args.num_proc)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_children_mb"] = children
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="conversations")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=2, help="TRL dataset_num_proc")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        _side(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_data(args.n, folder)
        results = {}
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--folder", tmp, "--max-seq-len", str(args.max_seq_len),
                   "--num-proc", str(args.num_proc)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[len("RESULT "):])
    print(f"{args.n} conversations, SmolLM2 tokenizer, max_seq_len {args.max_seq_len}, TRL dataset_num_proc={args.num_proc}")
    print(f"{'side':6} {'seconds':>8} {'tokens':>11} {'tokens/s':>11} {'rows':>7} {'fill':>7} {'supervised':>11} {'peak RSS MB':>12}")
    for side, r in results.items():
        rss = max(r["peak_rss_mb"], r["peak_rss_children_mb"])
        print(f"{side:6} {r['seconds']:8.1f} {r['tokens']:11d} {r['tokens'] / r['seconds']:11,.0f} {r['rows']:7d} "
              f"{100 * r['fill']:6.2f}% {r['supervised']:11d} {rss:12.0f}")
    o, t = results["ours"], results["trl"]
    print(f"throughput ratio ours/TRL: {(o['tokens'] / o['seconds']) / (t['tokens'] / t['seconds']):.2f}x; "
          f"supervised tokens identical: {o['supervised'] == t['supervised']} ({o['supervised']} vs {t['supervised']})")


if __name__ == "__main__":
    main()
