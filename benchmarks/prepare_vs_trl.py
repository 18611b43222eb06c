"""Preparation throughput, side by side: ours vs TRL's SFTTrainer data preparation.

Same conversations, same tokenizer (SmolLM2's, stock ChatML template), same sequence length:
render the chat template, tokenize, assistant-only loss mask, best-fit-decreasing packing.
Each side runs in its own fresh subprocess; interpreter start-up, imports and tokenizer loading are
not timed (reported as "startup s"). Per side: tokens/s (tokens of the tokenized conversations, before
any truncation, / seconds of preparation), packing fill, supervised tokens and peak memory.

    python benchmarks/prepare_vs_trl.py --n 100000 --max-seq-len 2048   # needs trl (benchmarks/requirements.txt)

Over-long conversations: ours runs with overlong="truncate" (keep the first max_seq_len tokens), which is
what TRL's "bfd" strategy does (pc.list_slice(0, max_length); the overflow is discarded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_data(n: int, folder: Path) -> None:
    """N conversations: every chitchat window, then 3-question verifiable-task chats; Parquet (ours) + HF dataset (TRL)."""
    import polars as pl
    from datasets import Dataset, disable_progress_bars

    from sft_engine.curation.formats import normalize_row
    from sft_engine.curation.schema import MESSAGE
    from sft_engine.demo_data import chitchat_rows, verifiable_task_rows

    convs = [r["messages"] for r in chitchat_rows()][:n]
    tasks = [normalize_row(r)["messages"] for r in verifiable_task_rows(3 * n, seed=1)]
    i = 0
    while len(convs) < n:
        convs.append(tasks[i] + tasks[i + 1] + tasks[i + 2])
        i += 3
    disable_progress_bars()
    plain = [[{"role": m["role"], "content": m["content"]} for m in c] for c in convs]
    pl.DataFrame({"messages": [[{**m, "train": None} for m in c] for c in plain]}, schema={"messages": pl.List(MESSAGE)}).write_parquet(
        folder / "convs.parquet"
    )
    Dataset.from_dict({"messages": plain}).save_to_disk(str(folder / "convs_hf"))


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its reaped children: less sensitive to a busy machine than wall time."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _rss_now_mb() -> dict:
    """Peak RSS so far: this process (VmHWM) and its largest finished child (ru_maxrss of RUSAGE_CHILDREN).

    Not ru_maxrss of RUSAGE_SELF: Linux carries the pre-exec high-water mark of the forking parent's image into it,
    so a side started from a big orchestrator would report the orchestrator's size.
    """
    hwm_kb = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return {"rss_self_mb": hwm_kb / 1024, "rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_ours(folder: Path, max_seq_len: int) -> dict:
    from sft_engine.config import PrepareConfig
    from sft_engine.data import prepare_split
    from sft_engine.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    cfg = PrepareConfig(max_seq_len=max_seq_len, overlong="truncate")
    cpu, t = _cpu_s(), time.perf_counter()
    stats, lengths = prepare_split(folder / "convs.parquet", tok, cfg, folder / "ours.arrow")
    seconds, cpu = time.perf_counter() - t, _cpu_s() - cpu
    rss = _rss_now_mb()  # before any bookkeeping of our own
    return {
        "seconds": seconds, "cpu_s": cpu, "tokens": int(lengths.sum()), "packed_tokens": stats.tokens, "rows": stats.rows_packed,
        "slots": stats.slots, "fill": stats.fill, "supervised": stats.supervised_tokens, "samples": stats.samples_packed,
        "truncated": stats.truncated, "dropped": stats.dropped_by_reason, **rss,
    }


# SmolLM2's ChatML template with {% generation %} around each assistant reply and its <|im_end|>: TRL refuses
# the stock template for assistant_only_loss. It renders character for character like the stock one (checked
# below), and marks exactly what our masks supervise (reply + <|im_end|>; not the header, not the newline after).
MARKED_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def run_trl(folder: Path, max_seq_len: int, num_proc: int) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import torch
    import trl
    import trl.trainer.sft_trainer as sft_module
    from datasets import load_from_disk
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sft_engine.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    ds = load_from_disk(str(folder / "convs_hf"))
    probes = [ds[i]["messages"] for i in sorted({0, len(ds) // 2, len(ds) - 1})]
    stock = [tok.apply_chat_template(m, tokenize=False) for m in probes]
    tok.chat_template = MARKED_SMOLLM2
    assert [tok.apply_chat_template(m, tokenize=False) for m in probes] == stock, "marked template renders differently"
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(
        output_dir=str(folder / "trl_out"), max_length=max_seq_len, packing=True, packing_strategy="bfd",
        assistant_only_loss=True, dataset_num_proc=num_proc if num_proc > 1 else None, report_to=[], bf16=False, use_cpu=True,
    )

    # Instrumentation (its own time is subtracted): the tokenized dataset just before packing gives TRL's token
    # count before truncation; _prepare_dataset is timed on its own, apart from the rest of the constructor.
    seen: dict = {"probe_s": 0.0, "prepare_s": 0.0, "cpu_s": 0.0}
    pack = sft_module.pack_dataset

    def counting_pack(dataset, *a, **k):
        t0 = time.perf_counter()
        table = dataset.data.table
        seen["tokens"] = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
        seen["supervised_before_pack"] = int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), -100)).as_py())
        seen["probe_s"] += time.perf_counter() - t0
        return pack(dataset, *a, **k)

    sft_module.pack_dataset = counting_pack
    prepare = SFTTrainer._prepare_dataset

    def timed_prepare(self, *a, **k):
        cpu0, t0 = _cpu_s(), time.perf_counter()
        out = prepare(self, *a, **k)
        seen["prepare_s"] += time.perf_counter() - t0
        seen["cpu_s"] += _cpu_s() - cpu0
        return out

    SFTTrainer._prepare_dataset = timed_prepare
    t = time.perf_counter()
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=ds, processing_class=tok)
    constructor_s = time.perf_counter() - t - seen["probe_s"]
    rss = _rss_now_mb()  # before counting below (vectorized, but keep it out of the figure)

    table = trainer.train_dataset.data.table
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    labels = pc.list_flatten(table.column("labels")).to_numpy()
    seq = pc.list_flatten(table.column("seq_lengths")).to_numpy().astype(np.int64)
    starts = np.cumsum(seq) - seq  # rows are padding-free: a row's values are its samples back to back
    packed = int(lengths.sum())
    return {
        "seconds": seen["prepare_s"] - seen["probe_s"], "cpu_s": seen["cpu_s"] - seen["probe_s"], "constructor_s": constructor_s, "tokens": seen["tokens"],
        "packed_tokens": packed, "rows": len(lengths), "slots": len(lengths) * max_seq_len,
        "fill": packed / (len(lengths) * max_seq_len), "supervised": int((labels != -100).sum()),
        "supervised_before_pack": seen["supervised_before_pack"], "samples": len(seq),
        "supervised_at_sample_start": int((labels[starts] != -100).sum()),
        "versions": {"trl": trl.__version__, **_versions()}, **rss,
    }


def _versions() -> dict:
    import datasets
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


def _side(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    result = run_ours(folder, args.max_seq_len) if args.side == "ours" else run_trl(folder, args.max_seq_len, args.num_proc)
    print("RESULT " + json.dumps(result))


def _run_side(side: str, tmp: str, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter; sample the PSS of its whole process tree (workers included)."""
    import psutil
    from _measure import tree_pss  # sibling module: scripts run as python benchmarks/<name>.py

    cmd = [sys.executable, __file__, "--side", side, "--folder", tmp, "--max-seq-len", str(args.max_seq_len),
           "--num-proc", str(args.num_proc)]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        root, tree_peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            tree_peak = max(tree_peak, tree_pss(root))
            time.sleep(0.05)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{side} failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["process_s"] = wall
    r["tree_peak_mb"] = tree_peak / 2**20
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="conversations")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=2, help="TRL dataset_num_proc (1 = in-process, passed as None)")
    p.add_argument("--side", choices=["build", "ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "build":
        build_data(args.n, Path(args.folder))
        return
    if args.side:
        _side(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()  # in its own process too, so this one stays small
        subprocess.run([sys.executable, __file__, "--side", "build", "--folder", tmp, "--n", str(args.n)], check=True)
        build_s = time.perf_counter() - t
        load_before = os.getloadavg()[0]
        results = {side: _run_side(side, tmp, args) for side in ("ours", "trl")}
        load_after = os.getloadavg()[0]
    o, t = results["ours"], results["trl"]
    v = t["versions"]
    print(f"{args.n} conversations (built in {build_s:.1f} s, not timed), SmolLM2 tokenizer, max_seq_len {args.max_seq_len}, "
          f"TRL {v['trl']} dataset_num_proc={args.num_proc} (transformers {v['transformers']}, datasets {v['datasets']}, "
          f"tokenizers {v['tokenizers']}); load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"{'side':5} {'prep s':>7} {'cpu s':>6} {'startup s':>9} {'tokens':>11} {'tokens/s':>10} {'rows':>6} {'fill':>7} "
          f"{'supervised':>11} {'peak RSS MB':>11} {'tree PSS MB':>11}")
    for side, r in results.items():
        rss = max(r["rss_self_mb"], r["rss_children_mb"])
        print(f"{side:5} {r['seconds']:7.1f} {r['cpu_s']:6.1f} {r['process_s'] - r['seconds']:9.1f} {r['tokens']:11d} {r['tokens'] / r['seconds']:10,.0f} "
              f"{r['rows']:6d} {100 * r['fill']:6.2f}% {r['supervised']:11d} {rss:11.0f} {r['tree_peak_mb']:11.0f}")
    print(f"throughput ratio ours/TRL: {(o['tokens'] / o['seconds']) / (t['tokens'] / t['seconds']):.2f}x "
          f"(wall); CPU seconds TRL/ours: {t['cpu_s'] / o['cpu_s']:.2f}x")
    same = o["supervised"] == t["supervised"]
    print(f"supervised tokens identical: {same} (ours {o['supervised']}, TRL {t['supervised']}; "
          f"TRL before packing/truncation {t['supervised_before_pack']})")
    print(f"tokenized tokens identical: {o['tokens'] == t['tokens']}; packed tokens ours {o['packed_tokens']} "
          f"(over-long samples truncated: {o['truncated']}, dropped: {o['dropped'] or 'none'}), TRL {t['packed_tokens']} "
          f"({t['tokens'] - t['packed_tokens']} tokens cut past max_length)")
    print(f"TRL constructor {t['constructor_s']:.1f} s (of which _prepare_dataset {t['seconds']:.1f} s, the timed part); "
          f"samples packed ours {o['samples']}, TRL {t['samples']}")
    if t["supervised_at_sample_start"]:
        print(f"note: TRL supervises {t['supervised_at_sample_start']} tokens at a sample's first position")
    print("prep s: wall seconds of the preparation alone; cpu s: its user + system CPU seconds, workers included; "
          "startup s: the rest of the side's process (interpreter, imports, tokenizer, TRL's model/trainer set-up)")
    print("peak RSS MB: largest single process of the side (VmHWM / children's ru_maxrss); tree PSS MB: peak of the summed PSS "
          "of the side's process tree (workers included, shared pages split between them), sampled every 50 ms")


if __name__ == "__main__":
    main()
