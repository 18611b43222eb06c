"""Shingle hashing and sketching on real conversations with non-Latin scripts: this checkout vs an earlier revision.

100,000 documents built from chitchat-dataset (the demo's real chats, windows of up to 8 messages, joined by newlines);
30 % of them are transliterated letter by letter into Cyrillic, Greek, CJK or Devanagari (real word statistics in
non-Latin scripts: what the non-ASCII path of the word splitter sees), with a dash and guillemets appended. Both
versions of ``sft_engine.curation.near_dedup`` hash the same texts in blocks of 8,192 documents (as ``sketch`` does),
twice each, interleaved; the outputs must be identical (a digest of the shingle hashes and of the band keys).

    python benchmarks/near_dedup_non_latin.py --base 8ef3425     # the revision before the regex-free non-ASCII path
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

SCRIPTS = {
    "cyrillic": dict(zip("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопкрстувшхыз", strict=True)),
    "greek": dict(zip("abcdefghijklmnopqrstuvwxyz", "αβψδεφγηιξκλμνοπθρστυωςχυζ", strict=True)),
    "cjk": {c: chr(0x4E00 + 37 * i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
    "devanagari": {c: chr(0x0905 + i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
}


def corpus(n: int, seed: int = 0) -> pl.Series:
    from sft_engine.demo_data import chitchat_rows

    texts = ["\n".join(m["content"] for m in r["messages"]) for r in chitchat_rows(limit=None, max_messages=8)]
    rng = random.Random(seed)
    docs = []
    while len(docs) < n:
        t = texts[len(docs) % len(texts)]
        if rng.random() < 0.3:
            table = SCRIPTS[rng.choice(list(SCRIPTS))]
            t = "".join(table.get(ch, ch) for ch in t.lower()) + " — «ok»"
        docs.append(t)
    return pl.Series(docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose near_dedup.py to compare against")
    p.add_argument("--n", type=int, default=100_000)
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        old_file = Path(tmp) / "near_dedup_base.py"
        old_file.write_text(subprocess.run(["git", "show", f"{args.base}:sft_engine/curation/near_dedup.py"], cwd=root,
                                           capture_output=True, text=True, check=True).stdout)
        spec = importlib.util.spec_from_file_location("near_dedup_base", old_file)
        old = importlib.util.module_from_spec(spec)
        sys.modules["near_dedup_base"] = old  # its dataclasses look their module up
        spec.loader.exec_module(old)
    from sft_engine.curation import near_dedup as new

    s = corpus(args.n)
    non_ascii = float((s.str.len_bytes() != s.str.len_chars()).mean())
    print(f"{len(s):,} documents, {100 * non_ascii:.1f} % with non-ASCII characters, {s.str.len_chars().mean():.0f} characters on average")
    new.shingle_hashes(pl.Series(["é"]))  # the code-point table is built once per process (~0.5 s), outside the timing
    for name, mod in ((args.base, old), ("this checkout", new)) * 2:
        t = time.perf_counter()
        parts = [mod.shingle_hashes(s.slice(a, 8192)) for a in range(0, len(s), 8192)]
        hashing = time.perf_counter() - t
        t = time.perf_counter()
        keys, _ = mod.sketch(s)
        sketching = time.perf_counter() - t
        digest = hash(np.concatenate([sh for sh, _ in parts]).tobytes()) ^ hash(keys.tobytes())
        print(f"{name:14} shingle hashing {hashing:5.2f} s, sketch {sketching:5.2f} s ({len(s) / sketching:,.0f} docs/s), "
              f"output digest {digest & 0xFFFFFFFF:08x}")


if __name__ == "__main__":
    main()
