"""Curation at scale: N synthetic conversations (default 1,000,000, ~500 tokens each) curated end to end.

Generates sharded sources once (kept in --data and reused), then runs the real curation stage
(``sft_engine.curation.stage.run_curate`` with a config, as the pipeline does) in a fresh subprocess on an empty
work dir and reports wall time and peak memory.

The data (deterministic for a given --n and --seed):

* Source ``chat``: JSONL shards (``chat-*.jsonl``) in the OpenAI ``messages`` format, half of the rows.
* Source ``sharegpt``: Parquet shards (``sharegpt-*.parquet``) in the ShareGPT format (``conversations`` with
  ``from``/``value``, human/gpt/system), the other half.
* A conversation: an optional system prompt, then 1-4 user/assistant exchanges; turns are sentences drawn
  Zipf-like from a pool of 200,000 sentences whose words are drawn by frequency from the real chats of
  chitchat-dataset (a project dependency). ~380 words, ~2,000 characters, ~500 tokens each.
* Planted: ~2% exact duplicates (copies of an earlier conversation, some with case / whitespace changes),
  ~2% near duplicates (a few word edits in one assistant turn), ~0.3% bad rows (broken JSON, unknown role,
  empty turn, wrong turn order) and ~0.5% refusals, so every curation step has work to do.

Columns printed: rows in / kept and the drop counts by reason (from the stage's stats.json), wall seconds of the
curation subprocess (interpreter start and imports included), rows/s, its CPU seconds (user + system, with the
pool workers it waited for: CPU s / wall shows how many of the cores it kept busy), peak RSS = ru_maxrss of that
subprocess and its workers (os.wait4: the largest single process), tree PSS = peak summed PSS of its process tree
(the subprocess and its pool workers together), sampled every 0.5 s, and the 1-minute load average before and
after. With several --n, a table of them all at the end.

    python benchmarks/curate_1m.py                          # 1,000,000 rows, 16 shards
    python benchmarks/curate_1m.py --n 200000 1000000 3000000   # the scaling table (docs/benchmarks.md)
    python benchmarks/curate_1m.py --n 100000 --profile     # plus a cProfile of the curation
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _chat_vocab(size: int = 20_000):
    """The most frequent words of the real chats in chitchat-dataset (a project dependency) and their counts."""
    import re
    from collections import Counter

    from sft_engine.demo_data import chitchat_path

    counts: Counter[str] = Counter()
    for chat in json.loads(chitchat_path().read_text()).values():
        for group in chat["messages"]:
            for u in group:
                counts.update(re.findall(r"[a-z']+", u["text"].lower()))
    words, freq = zip(*counts.most_common(size))
    return list(words), list(freq)


def _sentences(rng, n: int) -> list[str]:
    """A pool of n sentences (4-24 words drawn by frequency from real chat words; capital, comma, end mark)."""
    import numpy as np

    words, freq = _chat_vocab()
    vocab = np.array(words, dtype=object)
    p = np.array(freq, dtype=float)
    p /= p.sum()
    lengths = rng.integers(4, 25, n)
    ids = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
    ends = rng.choice([".", ".", ".", "?", "!"], size=n)
    out, pos = [], 0
    for L, end in zip(lengths.tolist(), ends.tolist()):
        ws = vocab[ids[pos:pos + L]].tolist()
        pos += L
        if L > 8:
            ws[L // 2] += ","
        out.append(" ".join(ws).capitalize() + end)
    return out


def _conversations(rng, n: int, pool: list[str]) -> list[list[tuple[str, str]]]:
    """n conversations as lists of (role, content)."""
    import numpy as np

    n_pool = len(pool)
    # Zipf-ish sentence popularity: a few sentences recur across conversations, like boilerplate does.
    weights = 1.0 / np.arange(1, n_pool + 1) ** 0.6
    weights /= weights.sum()
    convs = []
    exchanges = rng.choice([1, 2, 3, 4], size=n, p=[0.35, 0.35, 0.2, 0.1])
    has_system = rng.random(n) < 0.3
    total_sent = n * 40
    picks = rng.choice(n_pool, size=total_sent, p=weights).tolist()
    k = 0
    for i in range(n):
        e = int(exchanges[i])
        msgs = []
        if has_system[i]:
            msgs.append(("system", pool[picks[k]] + " " + pool[picks[k + 1]]))
            k += 2
        # ~375 words over e exchanges: user turns short, assistant turns long (~14 words per sentence).
        a_sent = max(1, round(24 / e))
        for _ in range(e):
            u = int(rng.integers(1, 4))
            msgs.append(("user", " ".join(pool[p] for p in picks[k:k + u])))
            k += u
            msgs.append(("assistant", " ".join(pool[p] for p in picks[k:k + a_sent])))
            k += a_sent
            if k > total_sent - 64:
                picks = rng.choice(n_pool, size=total_sent, p=weights).tolist()
                k = 0
        convs.append(msgs)
    return convs


def generate(folder: Path, n: int, shards: int, seed: int) -> dict:
    """Write the shards (chat-*.jsonl: messages; sharegpt-*.parquet: ShareGPT) and return what was planted."""
    import numpy as np
    import orjson
    import polars as pl

    rng = np.random.default_rng(seed)
    pool = _sentences(rng, 200_000)
    folder.mkdir(parents=True, exist_ok=True)
    planted = {"exact_copies": 0, "near_copies": 0, "bad_rows": 0, "refusals": 0}
    per_shard = -(-n // shards)
    recent: list[list[tuple[str, str]]] = []
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    written = 0
    for s in range(shards):
        m = min(per_shard, n - written)
        if m <= 0:
            break
        convs = _conversations(rng, m, pool)
        kind = rng.random(m)
        remember = rng.random(m) < 0.05  # sources for later copies
        for i in range(m):
            if recent and kind[i] < 0.02:  # exact copy of an earlier conversation (maybe case / whitespace changed)
                src = recent[int(rng.integers(len(recent)))]
                style = int(rng.integers(3))
                convs[i] = [(r, c.upper() if style == 1 else c.replace(" ", "  ") if style == 2 else c) for r, c in src]
                planted["exact_copies"] += 1
            elif recent and kind[i] < 0.04:  # near copy: a few word edits in one assistant turn
                src = [list(t) for t in recent[int(rng.integers(len(recent)))]]
                turns = [j for j, (r, _) in enumerate(src) if r == "assistant"]
                j = turns[int(rng.integers(len(turns)))]
                words = src[j][1].split(" ")
                for _ in range(int(rng.integers(1, 4))):
                    words[int(rng.integers(len(words)))] = pool[int(rng.integers(len(pool)))].split(" ")[0].lower()
                src[j][1] = " ".join(words)
                convs[i] = [tuple(t) for t in src]
                planted["near_copies"] += 1
            elif kind[i] < 0.045:
                convs[i][-1] = ("assistant", "I'm sorry, but I am unable to help with that request. " + convs[i][-1][1][:200])
                planted["refusals"] += 1
            if remember[i]:
                recent.append(convs[i])
        recent = recent[-20_000:]
        bad = np.flatnonzero(rng.random(m) < 0.003).tolist()
        planted["bad_rows"] += len(bad)
        bad_kind = {i: int(rng.integers(4)) for i in bad}
        if s % 2 == 0:
            lines = []
            for i, c in enumerate(convs):
                msgs = [{"role": r, "content": t} for r, t in c]
                b = bad_kind.get(i)
                if b == 1:
                    msgs[-1]["role"] = "wizard"
                elif b == 2:
                    msgs[-1]["content"] = "   "
                elif b == 3:
                    msgs = msgs[::-1]
                line = orjson.dumps({"messages": msgs})
                lines.append(line[: len(line) // 2] if b == 0 else line)
            (folder / f"chat-{s:03d}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        else:
            rows = []
            for i, c in enumerate(convs):
                turns = [{"from": sharegpt_role[r], "value": t} for r, t in c]
                b = bad_kind.get(i)
                if b in (0, 1):
                    turns[-1]["from"] = "wizard"
                elif b == 2:
                    turns[-1]["value"] = ""
                elif b == 3:
                    turns = turns[::-1]
                rows.append({"id": f"sg-{written + i}", "conversations": turns})
            pl.DataFrame(rows).write_parquet(folder / f"sharegpt-{s:03d}.parquet", row_group_size=16_384)
        written += m
    sample = [" ".join(t for _, t in c) for c in convs[:2000]]
    words = float(np.mean([len(x.split()) for x in sample]))
    chars = float(np.mean([len(x) for x in sample]))
    info = {"n": written, "shards": shards, "seed": seed, "planted": planted, "words_per_conv": words, "chars_per_conv": chars}
    (folder / "_generated.json").write_text(json.dumps(info))
    return info


def _count_tokens(folder: Path, rows: int = 2000) -> float | None:
    """Mean tokens per conversation (SmolLM2 tokenizer, text only) over the first rows of the first shard, if it loads."""
    try:
        import orjson

        from sft_engine.model import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m"))
        first = min(folder.glob("chat-*.jsonl"))
        texts = []
        with first.open("rb") as f:  # the first lines only: a shard of 3M rows is 415 MB
            lines = list(itertools.islice(f, rows))
        for line in lines:
            try:
                texts.append("\n".join(m["content"] for m in orjson.loads(line)["messages"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):  # a planted bad row
                continue
        return sum(len(ids) for ids in tok(texts)["input_ids"]) / len(texts) if texts else None
    except Exception as exc:  # noqa: BLE001 - the figure is informative only
        print(f"(token count skipped: {exc})", file=sys.stderr)
        return None


def _reset_high_water() -> None:
    """Linux counts the peak RSS of the process a child was spawned from (its memory at exec) in the child's
    ru_maxrss: a subprocess of a 1.1 GiB parent reports 1.1 GiB however small it stays. Reset this process's peak
    to its current size (/proc/self/clear_refs, Linux 4.0+) before spawning the measured run, and spawn it before
    anything large is loaded here. The token count that read a whole 415 MB shard first made the 3M row read
    1.16-1.28 GiB where the curation's largest process peaked at 0.97."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def curate_side(args: argparse.Namespace) -> None:
    """In a fresh process: run the curation stage on the generated shards and print its result."""
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    data = Path(args.data)
    overrides = [
        f"work_dir={args.work}",
        "curate.sources=[{name: chat, path: '" + str(data / "chat-*.jsonl") + "'}, {name: sharegpt, path: '"
        + str(data / "sharegpt-*.parquet") + "'}]",
        "curate.max_chars=40000",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    t = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        out = prof.runcall(curation.run_curate, cfg)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    else:
        out = curation.run_curate(cfg)
    seconds = time.perf_counter() - t
    stats = json.loads((out.path / "stats.json").read_text())
    print("RESULT " + json.dumps({"seconds": seconds, "stats": {k: stats[k] for k in ("rows_in", "rows_kept", "dropped_by_reason",
                                                                                          "rows_train", "rows_heldout")},
                                  "near_dedup": {k: v for k, v in stats.get("near_dedup", {}).items() if k != "cluster_sizes"}}))


def measure(args: argparse.Namespace, n: int) -> dict:
    """Generate (or reuse) n rows and curate them in a fresh subprocess; print the run and return its figures."""
    import psutil
    from _measure import tree_pss  # sibling module: scripts run as python benchmarks/<name>.py

    data = Path(args.data or f"/tmp/sft_curate_{n}")
    marker = data / "_generated.json"
    if marker.exists() and json.loads(marker.read_text())["n"] == n and json.loads(marker.read_text())["seed"] == args.seed:
        info = json.loads(marker.read_text())
        print(f"reusing {data}", file=sys.stderr)
    else:
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        # In a spawned child: generating holds the rows in this process, and its memory would be counted in the
        # measured subprocess's ru_maxrss (see _reset_high_water): 2.11 GiB at 1M on a first run, not the curation's.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            info = pool.submit(generate, data, n, args.shards, args.seed).result()
        print(f"generated {n} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in data.iterdir())

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="curate_1m_"))
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, __file__, "--side", "curate", "--data", str(data), "--work", str(work)]
    cmd += [x for s in args.set for x in ("--set", s)] + (["--profile"] if args.profile else [])
    load_before = os.getloadavg()[0]
    _reset_high_water()
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=sys.stderr, text=True)
        root, tree_peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, tree_pss(root))
            time.sleep(0.5)
        wall = time.perf_counter() - t
        out.seek(0)
        stdout = out.read()
    load_after = os.getloadavg()[0]
    tokens = _count_tokens(data)  # after the run: see _reset_high_water
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if os.waitstatus_to_exitcode(status) or line is None:
        sys.exit(f"curation failed (exit {os.waitstatus_to_exitcode(status)}):\n{stdout[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    st = r["stats"]
    cpu = ru.ru_utime + ru.ru_stime  # the subprocess and the pool workers it waited for
    tok = f", ~{tokens:.0f} tokens (SmolLM2, text only)" if tokens else ""
    print(f"data: {info['n']:,} conversations in {info['shards']} shards (JSONL messages + Parquet ShareGPT), {size / 2**30:.2f} GiB; "
          f"~{info['words_per_conv']:.0f} words, {info['chars_per_conv']:.0f} chars per conversation{tok}; planted {info['planted']}")
    print(f"curation (run_curate, fresh process, empty work dir): {wall:.1f} s wall ({r['seconds']:.1f} s in run_curate), "
          f"{info['n'] / wall:,.0f} rows/s; {cpu:.0f} CPU s ({cpu / wall:.2f} per wall second); peak RSS of one process "
          f"{ru.ru_maxrss / 2**20:.2f} GiB, tree PSS {tree_peak / 2**30:.2f} GiB; load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    print(f"rows in {st['rows_in']:,}, kept {st['rows_kept']:,} (train {st['rows_train']:,}, held out {st['rows_heldout']:,}); "
          f"dropped {json.dumps(st['dropped_by_reason'])}")
    print(f"near-dedup: {json.dumps(r['near_dedup'])}", flush=True)
    return {"rows": info["n"], "wall": wall, "cpu": cpu, "rss": ru.ru_maxrss / 2**20, "pss": tree_peak / 2**30,
            "kept": st["rows_kept"], "dropped": sum(st["dropped_by_reason"].values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="conversations (several sizes: one run each, one table)")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="folder for the generated shards (default /tmp/sft_curate_<n>); reused when complete")
    p.add_argument("--work", help="work dir of the curation run (default: a fresh temp dir, removed afterwards)")
    p.add_argument("--set", action="append", default=[], help="extra config override for the curation, e.g. curate.near_dedup.enabled=false")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the curation (slows it down)")
    p.add_argument("--side", choices=["curate"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "curate":
        curate_side(args)
        return
    if args.data and len(args.n) > 1:
        p.error("--data names one folder: give one --n with it")
    rows = [measure(args, n) for n in args.n]
    print("\n| rows | wall s | rows/s | CPU s | CPU s / wall | peak RSS, one process (GiB) | tree PSS (GiB) | kept | dropped |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']:,} | {r['wall']:.1f} | {r['rows'] / r['wall']:,.0f} | {r['cpu']:.0f} | {r['cpu'] / r['wall']:.2f} | "
              f"{r['rss']:.2f} | {r['pss']:.2f} | {r['kept']:,} | {r['dropped']:,} |")


if __name__ == "__main__":
    main()
