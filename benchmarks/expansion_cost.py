"""What `prepare.history` costs: the same multi-turn conversations prepared under SmolLM2's ChatML template (every
turn in place: one sample a conversation) and under Qwen3's template (history turns lose their think block, so each
earlier turn is trained in a sample of its own), with each history policy. Same tokenizer (SmolLM2's) on every row,
so only the template differs. Per row: samples, tokens tokenized, extra tokens from expansion, supervised tokens,
packed rows, seconds and tokens/s.

    python benchmarks/expansion_cost.py --n 20000 --max-seq-len 2048     # needs `make assets` (the Qwen3 template)

The conversations are prepare_vs_trl.py's: every chitchat window, then 3-question verifiable-task chats.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="conversations (default: %(default)s)")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    args = ap.parse_args()

    from prepare_vs_trl import build_data

    from sft_engine.config import HistoryPolicy, PrepareConfig
    from sft_engine.data import prepare_split
    from sft_engine.model import cache_root, load_tokenizer, resolve_model

    qwen3 = cache_root() / "assets" / "llama.cpp" / "templates" / "Qwen-Qwen3-0.6B.jinja"
    if not qwen3.is_file():
        sys.exit(f"{qwen3} missing: run `make assets`")
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    chatml = tok.chat_template
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_data(args.n, folder)
        runs = [("SmolLM2 ChatML", chatml, HistoryPolicy.EXPAND)] + [
            ("Qwen3", qwen3.read_text(), h) for h in (HistoryPolicy.EXPAND, HistoryPolicy.LAST_ONLY, HistoryPolicy.CONTEXT_ONLY)]
        for name, template, history in runs:
            tok.chat_template = template
            cfg = PrepareConfig(max_seq_len=args.max_seq_len, overlong="truncate", history=history)
            t = time.perf_counter()
            st, _ = prepare_split(folder / "convs.parquet", tok, cfg, folder / "out.arrow")
            seconds = time.perf_counter() - t
            os.unlink(folder / "out.arrow")
            rows.append((name, history.value, st, seconds))
            print(f"{name:15s} {history.value:12s} samples {st.samples:>7,}  tokens {st.tokens_tokenized:>11,}  "
                  f"expanded {st.expanded_tokens:>10,} (+{100 * st.expansion:.1f} %)  supervised {st.supervised_tokens:>10,}  "
                  f"rows {st.rows_packed:>6,}  {seconds:6.1f} s  {st.tokens_tokenized / seconds / 1e6:.2f}M tok/s", flush=True)
    base = rows[0][2]
    print(f"\n{args.n:,} conversations, {base.rows_in:,} in; relative to ChatML's tokens ({base.tokens_tokenized:,}):")
    for name, history, st, seconds in rows:
        print(f"| {name} | {history} | {st.samples:,} | {st.tokens_tokenized:,} | {st.expanded_tokens:,} | "
              f"{st.tokens_tokenized / base.tokens_tokenized:.2f}x | {st.supervised_tokens:,} | {st.rows_packed:,} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
