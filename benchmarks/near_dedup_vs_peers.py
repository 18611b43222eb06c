"""MinHash near-dedup, side by side: ours (sft_engine.curation.near_dedup) vs datasketch, rensa and datatrove.

One invocation, the SAME synthetic corpus for every method:

* N documents (default 100,000) of ~450 words (350-550) drawn Zipf-like from 5,000 generated, real-looking words,
  with sentence capitals, commas, full stops and paragraph breaks.
* About 13% of them are planted copies of an earlier base document (a source gets 1-3 copies, always placed after
  it): "case" (upper / lower / title / swapcase of the whole copy), "whitespace" (some single spaces become double
  spaces, newlines or tabs; paragraph breaks removed or kept), "edit" (1-20 random word substitutions, insertions or
  deletions, so some copies fall below the threshold on purpose) and "edit+case".
* Ground truth: words = maximal runs of letters/digits of the lowercased text, shingles = the SET of word 5-grams
  (as tuples of strings), Jaccard computed with plain Python sets over every pair inside each planted group
  (source + its copies). Base documents are independent random draws, so two of them share a 5-gram with
  negligible probability and no other pair can reach 0.8. A document is a true duplicate when some EARLIER
  document has Jaccard >= 0.8 with it. The build step also recomputes these pairs with our exact_jaccard (our own
  tokenizer) and prints how many disagree.

Each method runs in its own fresh subprocess (one at a time); interpreter start-up, imports, reading the corpus
from disk and one untimed run over the first 1,000 documents (numba loading our compiled loops from its cache, our
code point tables; the peers' first-call costs alike) are not timed, except for datatrove, whose pipeline reads its
own JSONL files (that is how it runs). Ours' untimed first call is printed as "first call".

* ours: near_duplicates(pl.Series(texts), threshold=0.8, ngram=5, num_perm=128, bands=16) with its defaults (blocks of
  8,192 documents, one thread): words and 5-gram shingle hashes in compiled loops (numba) over the UTF-8 bytes of a
  whole block, one-permutation MinHash with optimal densification (one hash per shingle), 16 x 8 LSH, every
  candidate pair verified by exact Jaccard; flagged = duplicate_of >= 0. "ours_2threads" is the same with workers=2.
* datasketch: Python shingling (the ground-truth tokenizer), MinHash.generator(num_perm=128) (default affine32
  scheme, SHA1 token hash), MinHashLSH(threshold=0.8, num_perm=128) with its automatic banding; streaming: each
  document queries the index (flagged if any earlier document is a candidate), then is inserted.
* rensa: the same Python shingling, RMinHashDeduplicator(threshold=0.8, num_perm=128, use_lsh=True, num_bands=16)
  .add_pairs(...) (LSH candidates checked against the sketch-estimated Jaccard); flagged = not kept.
* datatrove: its MinHash pipeline on local files in a temp dir: JsonlReader over 2 JSONL shards +
  MinhashDedupSignature (2 tasks, 2 workers), MinhashDedupBuckets (14 tasks, 2 workers), MinhashDedupCluster
  (1 task, save_cluster_id=True); MinhashConfig defaults: 5-grams, 14 buckets x 8 hashes (112 hashes), 64-bit
  xxhash, English spaCy word tokenizer. The filter stage (rewriting the corpus) is not run. Flagged = every member
  of a datatrove cluster except its earliest document (same count as its .remove files; its own union-by-size may
  keep a later member).

Columns: docs/s = N / timed seconds (with --repeat R: the median of R interleaved runs); CPU s = CPU time of the
side's own process over the timed part (datatrove's workers are other processes: not shown); precision / recall of
the flagged DOCUMENTS against the ground truth; peak RSS = ru_maxrss of the side's subprocess from os.wait4 (the same
figure RUSAGE_CHILDREN reports, per side: the largest single process among the side and the descendants it reaped);
tree PSS = peak of the summed PSS of the side's process tree (datatrove's workers included), sampled every 0.2 s.

    python benchmarks/near_dedup_vs_peers.py                      # N=100,000, every method once
    python benchmarks/near_dedup_vs_peers.py --repeat 3 --sides ours,ours_2threads,datasketch,rensa   # medians of 3
    python benchmarks/near_dedup_vs_peers.py --n 5000 --profile   # plus a cProfile of ours by stage

Needs datasketch, rensa, datatrove (+ orjson, spacy, xxhash<4) in the running interpreter; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _conversations import build_conversations, words_alnum, words_space  # sibling module, like _measure
from _conversations import truth as conv_truth

THRESHOLD = 0.8
NGRAM = 5
NUM_PERM = 128
# Documents each side processes once, untimed, before its timed run (first-call costs: caches, tables, imports).
WARMUP_DOCS = 1000
SIDES = ("ours", "ours_2threads", "datasketch", "rensa", "datatrove")
KINDS = ("base", "case", "whitespace", "edit", "edit+case")

# ---- corpus ----------------------------------------------------------------------------------------------------


def _vocab(rng, size: int) -> list[str]:
    onsets = ["", "", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cl",
              "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sp", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ee", "ou"]
    codas = ["", "", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck"]
    words: set[str] = set()
    out: list[str] = []
    while len(out) < size:
        n_syll = int(rng.choice([1, 2, 3, 4], p=[0.42, 0.4, 0.15, 0.03]))
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] + codas[rng.integers(len(codas))]
                    for _ in range(n_syll))
        if w not in words:
            words.add(w)
            out.append(w)
    return out


def build_corpus(n: int, seed: int = 0, copy_frac: float = 0.13):
    """Texts in final order, plus per doc: planted kind, group id (-1 for unplanted base docs), edits."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = _vocab(rng, 5000)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    # frequency rank: shorter words tend to be the frequent ones, as in real text
    perm = np.argsort(np.array([len(w) for w in vocab]) + rng.random(len(vocab)) * 6, kind="stable")
    # variant v of word w: caps (0/1) x punct ("", ",", ".") x trailing separator (" ", "\n\n")
    variants = []
    for w in vocab:
        for cap in (w, w.capitalize()):
            for punct in ("", ",", "."):
                for sep in (" ", "\n\n"):
                    variants.append(cap + punct + sep)
    variants = np.array(variants, dtype=object)

    n_copies = round(copy_frac * n)
    n_base = n - n_copies
    lengths = rng.integers(350, 551, n_base)
    total = int(lengths.sum())
    ids = perm[rng.choice(len(vocab), size=total, p=zipf)]
    end = rng.random(total) < 1 / 15  # sentence ends
    para = end & (rng.random(total) < 0.1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    end[starts + lengths - 1] = True
    para[starts + lengths - 1] = False
    cap = np.zeros(total, dtype=bool)
    cap[1:] = end[:-1]
    cap[starts] = True
    comma = ~end & (rng.random(total) < 0.05)
    var = cap * 6 + np.where(end, 2, np.where(comma, 1, 0)) * 2 + para
    base_ids = [ids[s:s + L] for s, L in zip(starts.tolist(), lengths.tolist())]
    base_var = [var[s:s + L] for s, L in zip(starts.tolist(), lengths.tolist())]

    def render(wid, v) -> str:
        return "".join(variants[wid * 12 + v].tolist()).rstrip()

    # planted groups: sources get 1-3 copies until n_copies are placed
    n_per = []
    while sum(n_per) < n_copies:
        n_per.append(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])))
    n_per[-1] -= sum(n_per) - n_copies
    if n_per[-1] == 0:
        n_per.pop()
    sources = rng.choice(n_base, size=len(n_per), replace=False)

    base_key = rng.random(n_base) * 0.9  # final order: sort by key; copies come after their source
    docs, keys, kinds, groups, edits = [], [], [], [], []
    for i in range(n_base):
        docs.append(render(base_ids[i], base_var[i]))
        keys.append(base_key[i])
        kinds.append(0)
        groups.append(-1)
        edits.append(0)
    case_fns = (str.upper, str.lower, str.title, str.swapcase)
    seps, seps_p = np.array([" ", "  ", "\n", "\t", " \n"], dtype=object), [0.85, 0.06, 0.04, 0.03, 0.02]
    for g, (src, k) in enumerate(zip(sources.tolist(), n_per)):
        groups[src] = g
        for _ in range(k):
            kind = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.2, 0.45, 0.15]))
            n_edit = 0
            if kind in (1, 2):
                text = docs[src]
            else:
                wid, v = base_ids[src].tolist(), base_var[src].tolist()
                n_edit = int(rng.integers(1, 21))
                for _e in range(n_edit):
                    op, pos = int(rng.integers(3)), int(rng.integers(len(wid)))
                    new = int(perm[rng.choice(len(vocab), p=zipf)])
                    if op == 0:
                        wid[pos] = new
                    elif op == 1:
                        wid.insert(pos, new)
                        v.insert(pos, 0)
                    elif len(wid) > NGRAM + 1:
                        del wid[pos], v[pos]
                v[-1] = v[-1] & ~1
                text = render(np.array(wid), np.array(v))
            if kind in (1, 4):
                text = case_fns[int(rng.integers(4))](text)
            if kind == 2:
                if rng.random() < 0.5:
                    text = text.replace("\n\n", " ")
                parts = text.split(" ")
                gaps = rng.choice(seps, size=len(parts) - 1, p=seps_p).tolist()
                text = "".join(p + s for p, s in zip(parts, gaps + [""]))
            docs.append(text)
            keys.append(base_key[src] + (1 - base_key[src]) * rng.random())
            kinds.append(kind)
            groups.append(g)
            edits.append(n_edit)
    order = np.argsort(np.array(keys), kind="stable")
    return ([docs[i] for i in order.tolist()], np.array(kinds, dtype=np.int8)[order], np.array(groups)[order],
            np.array(edits, dtype=np.int16)[order])


_WORD = re.compile(r"[^\W_]+")


def py_words(text: str) -> list[str]:
    """The ground-truth tokenizer: maximal runs of letters/digits of the lowercased text."""
    return _WORD.findall(text.lower())


def py_shingles(text: str, n: int = NGRAM) -> list[str]:
    """Word n-grams joined by a space (what datasketch and rensa hash); a short text is one shingle."""
    w = py_words(text)
    if len(w) < n:
        return [" ".join(w)] if w else []
    return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]


def build(args: argparse.Namespace) -> None:
    """Corpus (Parquet for ours/datasketch/rensa, 2 JSONL shards for datatrove) + ground truth (truth.npz)."""
    import numpy as np
    import orjson
    import polars as pl

    folder = Path(args.folder)
    t = time.perf_counter()
    if args.corpus == "conversations":
        texts, kinds, groups, edits, scripts = build_conversations(args.n, args.seed)
    else:
        texts, kinds, groups, edits = build_corpus(args.n, args.seed)
    gen_s = time.perf_counter() - t
    pl.DataFrame({"text": texts}).write_parquet(folder / "docs.parquet")
    (folder / "dt_in").mkdir()
    half = (len(texts) + 1) // 2
    for shard, (a, b) in enumerate([(0, half), (half, len(texts))]):
        with open(folder / "dt_in" / f"{shard:05d}.jsonl", "wb") as f:
            f.writelines(orjson.dumps({"id": str(i), "text": texts[i]}) + b"\n" for i in range(a, b))

    if args.corpus == "conversations":
        _write_conversation_truth(folder, texts, kinds, edits, scripts, gen_s)
        return
    # ground truth: every pair inside each planted group, plain Python sets of 5-gram tuples
    t = time.perf_counter()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        if g >= 0:
            members.setdefault(g, []).append(i)
    sets: dict[int, set] = {}
    for idx in members.values():
        for i in idx:
            w = py_words(texts[i])
            sets[i] = {tuple(w[k:k + NGRAM]) for k in range(len(w) - NGRAM + 1)}
    pairs, sims = [], []
    for idx in members.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]  # i < j: members are in document order
                inter = len(sets[i] & sets[j])
                pairs.append((i, j))
                sims.append(inter / (len(sets[i]) + len(sets[j]) - inter))
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    sims = np.array(sims)
    truth_s = time.perf_counter() - t
    true = pairs[sims >= THRESHOLD]
    flagged = np.zeros(len(texts), dtype=bool)
    flagged[true[:, 1]] = True
    best = np.zeros(len(texts))  # best Jaccard with an earlier document (group pairs only)
    np.maximum.at(best, pairs[:, 1], sims)

    # cross-check with our exact_jaccard (our tokenizer + 64-bit shingle hashes) on the same pairs
    from sft_engine.curation.near_dedup import exact_jaccard, shingle_hashes

    sh, off = shingle_hashes(pl.Series(texts), NGRAM)
    ours_sims = exact_jaccard(sh, off, pairs)
    diff = np.abs(ours_sims - sims) > 1e-9
    flip = (sims >= THRESHOLD) & (ours_sims < THRESHOLD)  # true pairs that our tokenizer puts below the threshold
    flip_ws = int((flip & (kinds[pairs].max(axis=1) >= 0) & ((kinds[pairs] == 2).any(axis=1))).sum())
    np.savez(folder / "truth.npz", pairs=pairs, sims=sims, flagged=flagged, kinds=kinds, best=best, edits=edits)
    kind_counts = {KINDS[k]: int(c) for k, c in zip(*np.unique(kinds, return_counts=True))}
    print("BUILD " + json.dumps({
        "gen_s": gen_s, "truth_s": truth_s, "docs": len(texts), "words_mean": float(np.diff(off).mean() + NGRAM - 1),
        "kinds": kind_counts, "group_pairs": len(pairs), "true_pairs": len(true), "true_dup_docs": int(flagged.sum()),
        "ours_exact_jaccard_disagree": int(diff.sum()), "ours_flip": int(flip.sum()), "ours_flip_whitespace": flip_ws,
    }))


def _write_conversation_truth(folder: Path, texts: list[str], kinds, edits, scripts, gen_s: float) -> None:
    """Exact all-pairs ground truth under the letters/digits tokenizer (ours, datasketch and rensa use it) and under
    whitespace tokens; the same truth.npz keys as the synthetic corpus, plus the whitespace truth."""
    import numpy as np
    import polars as pl

    from sft_engine.curation.near_dedup import exact_jaccard, shingle_hashes

    t = time.perf_counter()
    same = conv_truth(texts, words_alnum, NGRAM, THRESHOLD)
    space = conv_truth(texts, words_space, NGRAM, THRESHOLD)
    truth_s = time.perf_counter() - t
    sh, off = shingle_hashes(pl.Series(texts), NGRAM)
    ours_sims = exact_jaccard(sh, off, same["pairs"])
    np.savez(folder / "truth.npz", flagged=same["flagged"], best=same["best"], kinds=kinds, edits=edits,
             flagged_ws=space["flagged"], best_ws=space["best"])
    s = pl.Series(texts)
    print("BUILD " + json.dumps({
        "gen_s": gen_s, "truth_s": truth_s, "docs": len(texts), "words_mean": float(np.diff(off).mean() + NGRAM - 1),
        "kinds": {KINDS[k]: int(c) for k, c in zip(*np.unique(kinds, return_counts=True))},
        "scripts": {str(k): int(c) for k, c in zip(*np.unique(scripts, return_counts=True))},
        "non_ascii_docs": float((s.str.len_bytes() != s.str.len_chars()).mean()),
        "group_pairs": len(same["pairs"]), "true_pairs": len(same["pairs"]), "true_dup_docs": int(same["flagged"].sum()),
        "true_dup_docs_ws": int(space["flagged"].sum()), "true_dup_unplanted": int((same["flagged"] & (kinds == 0)).sum()),
        "ours_exact_jaccard_disagree": int((np.abs(ours_sims - same["sims"]) > 1e-9).sum()),
        "ours_flip": int((ours_sims < THRESHOLD).sum()), "ours_flip_whitespace": 0,
    }))


# ---- the four methods (each in its own subprocess) --------------------------------------------------------------


def _texts(folder: Path) -> list[str]:
    import polars as pl

    return pl.read_parquet(folder / "docs.parquet")["text"].to_list()


def run_ours(folder: Path, args: argparse.Namespace, workers: int = 1, name: str = "ours") -> dict:
    import numpy as np
    import polars as pl

    from sft_engine.curation.near_dedup import near_duplicates

    texts = pl.read_parquet(folder / "docs.parquet")["text"]
    # Not timed, as each side's: the first call in a process loads the compiled loops (numba's cache) and builds the
    # code point tables; reported apart as first_call_s.
    t = time.perf_counter()
    warm = texts.slice(0, WARMUP_DOCS)
    near_duplicates(pl.concat([warm, warm]), threshold=THRESHOLD, ngram=NGRAM, num_perm=NUM_PERM, bands=16, seed=0, workers=workers)
    first_call_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    res = near_duplicates(texts, threshold=THRESHOLD, ngram=NGRAM, num_perm=NUM_PERM, bands=16, seed=0, workers=workers)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    np.save(folder / f"flags_{name}.npy", res.duplicate_of >= 0)
    out = {"seconds": seconds, "cpu_s": cpu, "first_call_s": first_call_s, "candidates": res.candidates, "verified": res.verified,
           "lsh_threshold": res.lsh_threshold, "recall_at_threshold": res.recall_at_threshold,
           "versions": {"polars": pl.__version__, "numpy": np.__version__}}
    if args.profile and name == "ours":
        out["profile"] = _profile_ours(texts)
    return out


def _profile_ours(texts) -> dict:
    """Stage times of a second run (the public functions, called one after another) and a cProfile top list."""
    import cProfile
    import io
    import pstats

    import numpy as np

    from sft_engine.curation import near_dedup as nd

    stages = dict.fromkeys(["shingle_hashes", "minhash_signatures", "band_keys"], 0.0)
    keys, kept = [], []
    for a in range(0, len(texts), 8192):  # the blocks near_duplicates sketches, one thread
        t = time.perf_counter()
        sh, off = nd.shingle_hashes(texts.slice(a, 8192), NGRAM, 0)
        stages["shingle_hashes"] += time.perf_counter() - t
        t = time.perf_counter()
        sig = nd.minhash_signatures(sh, off, NUM_PERM, 0)
        stages["minhash_signatures"] += time.perf_counter() - t
        t = time.perf_counter()
        keys.append(nd.band_keys(sig, 16))
        stages["band_keys"] += time.perf_counter() - t
        kept.append((sh, off))
    t = time.perf_counter()  # near_duplicates keeps the sketch's shingles for verification (within its budget)
    values, offsets = nd.join_shingles(kept)
    stages["shingles kept (joined)"] = time.perf_counter() - t
    t = time.perf_counter()
    pairs = nd.candidates_from_keys(np.concatenate(keys))
    stages["candidates_from_keys"] = time.perf_counter() - t
    t = time.perf_counter()
    sims = nd._jaccard_pairs(values, offsets, pairs)
    stages["exact_jaccard"] = time.perf_counter() - t
    t = time.perf_counter()
    nd._clusters(len(texts), pairs[sims >= THRESHOLD])
    stages["_clusters"] = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    nd.near_duplicates(texts, threshold=THRESHOLD, ngram=NGRAM, num_perm=NUM_PERM, bands=16, seed=0)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(18)
    return {"stages": stages, "pairs": len(pairs), "cprofile": buf.getvalue(), "np": np.__version__}


def run_datasketch(folder: Path, args: argparse.Namespace) -> dict:
    import datasketch
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    texts = _texts(folder)
    warm = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)  # not timed, as ours' first call is not
    for i, m in enumerate(MinHash.generator(([s.encode() for s in py_shingles(x)] for x in texts[:WARMUP_DOCS]), num_perm=NUM_PERM)):
        warm.insert(i, m)
    t, cpu = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    flags = np.zeros(len(texts), dtype=bool)
    gen = MinHash.generator(([s.encode() for s in py_shingles(x)] for x in texts), num_perm=NUM_PERM)
    for i, m in enumerate(gen):
        if lsh.query(m):
            flags[i] = True
        lsh.insert(i, m)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    np.save(folder / "flags_datasketch.npy", flags)
    return {"seconds": seconds, "cpu_s": cpu, "bands_rows": [lsh.b, lsh.r], "versions": {"datasketch": datasketch.__version__}}


def run_rensa(folder: Path, args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    import numpy as np
    from rensa import RMinHashDeduplicator

    texts = _texts(folder)
    RMinHashDeduplicator(threshold=THRESHOLD, num_perm=NUM_PERM, use_lsh=True, num_bands=16).add_pairs(
        (str(i), py_shingles(x)) for i, x in enumerate(texts[:WARMUP_DOCS]))  # not timed, as ours' first call is not
    t, cpu = time.perf_counter(), time.process_time()
    dedup = RMinHashDeduplicator(threshold=THRESHOLD, num_perm=NUM_PERM, use_lsh=True, num_bands=16)
    keep = dedup.add_pairs((str(i), py_shingles(x)) for i, x in enumerate(texts))
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    np.save(folder / "flags_rensa.npy", ~np.asarray(keep, dtype=bool))
    return {"seconds": seconds, "cpu_s": cpu, "versions": {"rensa": version("rensa")}}


def run_datatrove(folder: Path, args: argparse.Namespace) -> dict:
    import logging
    import struct
    from importlib.metadata import version

    import numpy as np
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader

    logging.disable(logging.WARNING)
    work = folder / "dt_work"
    cfg = MinhashConfig()  # defaults: 5-grams, 14 buckets x 8 hashes, 64-bit xxhash
    stages = {}
    t0 = t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(folder / "dt_in")), MinhashDedupSignature(str(work / "sigs"), config=cfg)],
                          tasks=2, workers=2, logging_dir=str(work / "logs1")).run()
    stages["signatures"] = time.perf_counter() - t
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
                          tasks=cfg.num_buckets, workers=2, logging_dir=str(work / "logs2")).run()
    stages["buckets"] = time.perf_counter() - t
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg,
                                                        save_cluster_id=True)],
                          tasks=1, workers=1, logging_dir=str(work / "logs3")).run()
    stages["cluster"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    # Not timed: stop the forkserver that started the workers and wait for it, so that its ru_maxrss (which covers
    # the workers it reaped) reaches this process's RUSAGE_CHILDREN; otherwise the workers' memory is not seen.
    import multiprocess.forkserver

    multiprocess.forkserver._forkserver._stop()

    # global index = shard offset + doc index within the shard (a shard file per signature task)
    sizes = [p.read_bytes().count(b"\n") for p in sorted((folder / "dt_in").glob("*.jsonl"))]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    cluster = np.full(n, -1, dtype=np.int64)
    for p in sorted((work / "remove").glob("*.clusters")):
        a = np.frombuffer(p.read_bytes(), dtype="<u4").reshape(-1, 2)
        cluster[offsets[int(p.name.split(".")[0])] + a[:, 0]] = a[:, 1]
    n_remove = sum(len(p.read_bytes()) // struct.calcsize("<I") for p in (work / "remove").glob("*.remove"))
    flags = np.zeros(n, dtype=bool)
    in_cl = np.flatnonzero(cluster >= 0)
    if len(in_cl):
        first = {}
        for i in in_cl.tolist():  # ascending: the first seen is the earliest member
            first.setdefault(int(cluster[i]), i)
        flags[in_cl] = np.array([first[int(cluster[i])] != i for i in in_cl.tolist()])
    np.save(folder / "flags_datatrove.npy", flags)
    return {"seconds": seconds, "stages": stages, "removed_by_datatrove": n_remove,
            "config": f"{cfg.n_grams}-grams {cfg.num_buckets}x{cfg.hashes_per_bucket} {cfg.hash_config}",
            "versions": {"datatrove": version("datatrove"), "spacy": version("spacy"), "xxhash": version("xxhash")}}


# ---- orchestration ------------------------------------------------------------------------------------------------


def _run_side(side: str, folder: str, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter: its ru_maxrss via os.wait4, and the summed PSS of its process tree."""
    import psutil
    from _measure import tree_pss  # sibling module: scripts run as python benchmarks/<name>.py

    cmd = [sys.executable, __file__, "--side", side, "--folder", folder, "--n", str(args.n)] + (["--profile"] if args.profile else [])
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        root, tree_peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, tree_pss(root))
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"!! {side} failed (rc {proc.returncode}):\n{stderr[-3000:]}", file=sys.stderr)
        return {"failed": True}
    r = json.loads(line[len("RESULT "):])
    r.update(process_s=wall, maxrss_mb=ru.ru_maxrss / 1024, tree_pss_mb=tree_peak / 2**20)
    return r


def _score(folder: Path, side: str, truth) -> dict:
    import numpy as np

    flags = np.load(folder / f"flags_{side}.npy")
    true = truth["flagged"]
    tp = int((flags & true).sum())
    out = {"flagged": int(flags.sum()), "tp": tp, "precision": tp / max(int(flags.sum()), 1), "recall": tp / max(int(true.sum()), 1)}
    kinds, best = truth["kinds"], truth["best"]
    out["recall_by_kind"] = {KINDS[k]: (int((flags & true & (kinds == k)).sum()), int((true & (kinds == k)).sum()))
                             for k in range(1, len(KINDS))}
    bins = {"0.80-0.85": (0.8, 0.85), "0.85-0.90": (0.85, 0.9), "0.90-1": (0.9, 0.999999), "=1": (0.999999, 1.01)}
    out["recall_by_j"] = {k: (int((flags & true & (best >= a) & (best < b)).sum()), int((true & (best >= a) & (best < b)).sum()))
                          for k, (a, b) in bins.items()}
    fp = flags & ~true
    out["fp_near_miss"] = int((fp & (best > 0)).sum())  # planted copies (or, on conversations, any pair) below the threshold
    if "flagged_ws" in truth:
        ws = truth["flagged_ws"]
        tp_ws = int((flags & ws).sum())
        out.update(precision_ws=tp_ws / max(int(flags.sum()), 1), recall_ws=tp_ws / max(int(ws.sum()), 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", choices=["synthetic", "conversations"], default="synthetic",
                   help="synthetic: generated words, planted copies (the default, the recorded figures); conversations: "
                        "real chats, 38 %% in non-Latin scripts, exact all-pairs ground truth (benchmarks/_conversations.py)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument("--profile", action="store_true", help="also print a stage breakdown + cProfile of ours")
    p.add_argument("--repeat", type=int, default=1, help="runs per side, interleaved; the median is reported (datatrove runs once)")
    p.add_argument("--side", choices=["build", *SIDES], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "build":
        build(args)
        return
    if args.side:
        fn = {"ours": run_ours, "ours_2threads": lambda f, a: run_ours(f, a, workers=2, name="ours_2threads"),
              "datasketch": run_datasketch, "rensa": run_rensa, "datatrove": run_datatrove}[args.side]
        print("RESULT " + json.dumps(fn(Path(args.folder), args)))
        return

    import numpy as np

    sides = [s for s in args.sides.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="near_dedup_bench_") as tmp:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--side", "build", "--folder", tmp, "--n", str(args.n), "--seed", str(args.seed),
                              "--corpus", args.corpus],
                             check=True, capture_output=True, text=True).stdout
        b = json.loads(next(ln for ln in out.splitlines() if ln.startswith("BUILD "))[6:])
        build_s = time.perf_counter() - t
        truth = dict(np.load(Path(tmp) / "truth.npz"))
        load_before = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        repeated = [s for s in sides if s != "datatrove"] if args.repeat > 1 else sides
        for rep in range(args.repeat):
            for side in sides if rep == 0 else repeated:  # interleaved, so load drifts hit every side alike
                r = _run_side(side, tmp, args)
                if not r.get("failed"):
                    r.update(_score(Path(tmp), side, truth))
                    r["load"] = os.getloadavg()[0]
                runs[side].append(r)
                print(f"  [{side} run {rep + 1} done: {r.get('seconds', float('nan')):.1f} s, load {os.getloadavg()[0]:.2f}]",
                      file=sys.stderr, flush=True)
        load_after = os.getloadavg()[0]
        results = {}
        for side, rs in runs.items():
            ok = [r for r in rs if not r.get("failed")]
            if not ok:
                results[side] = {"failed": True}
                continue
            # The run with the median time represents the side; every time is listed below the table.
            results[side] = sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2]
            results[side]["all_seconds"] = [r["seconds"] for r in ok]

    n = args.n
    if args.corpus == "conversations":
        print(f"{n} real-conversation docs (~{b['words_mean']:.0f} words; built in {build_s:.1f} s, not timed): scripts "
              f"{b['scripts']}, {100 * b['non_ascii_docs']:.1f} % with non-ASCII characters; planted {b['kinds']}; ground "
              f"truth (exact all-pairs, word 5-gram sets, J >= {THRESHOLD}): {b['true_dup_docs']} duplicate docs with the "
              f"letters/digits tokenizer ({b['true_dup_unplanted']} of them not planted), {b['true_dup_docs_ws']} with "
              f"whitespace tokens; our exact_jaccard disagrees on {b['ours_exact_jaccard_disagree']} of {b['true_pairs']} "
              f"true pairs, {b['ours_flip']} fall below {THRESHOLD}")
    else:
        print(f"{n} docs (~{b['words_mean']:.0f} words; built in {build_s:.1f} s, not timed): planted {b['kinds']}; "
              f"ground truth (plain Python sets of word 5-gram tuples, J >= {THRESHOLD}): {b['true_pairs']} true pairs of "
              f"{b['group_pairs']} planted-group pairs, {b['true_dup_docs']} true duplicate docs")
        print(f"cross-check, our exact_jaccard on the same pairs: {b['ours_exact_jaccard_disagree']} pairs disagree "
              f"of {b['group_pairs']}; {b['ours_flip']} true pairs fall below {THRESHOLD} with our tokenizer, "
              f"{b['ours_flip_whitespace']} of them involve a 'whitespace' copy)")
    print(f"load average {load_before:.2f} before the sides, {load_after:.2f} after; datatrove runs 2 workers, ours_2threads 2 threads, "
          f"the others one thread; {args.repeat} interleaved run(s) per side (datatrove once), median shown")
    print(f"{'method':13} {'seconds':>8} {'docs/s':>9} {'ours/peer':>9} {'CPU s':>7} {'flagged':>8} {'precision':>9} {'recall':>7} "
          f"{'peak RSS MB':>11} {'tree PSS MB':>11}")
    ours_rate = n / results["ours"]["seconds"] if "ours" in results and not results["ours"].get("failed") else None
    for side, r in results.items():
        if r.get("failed"):
            print(f"{side:13} FAILED")
            continue
        rate = n / r["seconds"]
        ratio = f"{ours_rate / rate:8.1f}x" if ours_rate else "-"
        cpu = f"{r['cpu_s']:7.2f}" if "cpu_s" in r else f"{'-':>7}"
        print(f"{side:13} {r['seconds']:8.2f} {rate:9,.0f} {ratio:>9} {cpu} {r['flagged']:8d} {r['precision']:9.4f} {r['recall']:7.4f} "
              f"{r['maxrss_mb']:11.0f} {r['tree_pss_mb']:11.0f}")
    print("recall by planted kind (found/true) and by best Jaccard with an earlier doc; FP on planted near-misses:")
    for side, r in results.items():
        if not r.get("failed"):
            kinds = " ".join(f"{k} {a}/{t}" for k, (a, t) in r["recall_by_kind"].items())
            js = " ".join(f"J{k} {a}/{t}" for k, (a, t) in r["recall_by_j"].items())
            print(f"  {side:13} {kinds} | {js} | FP {r['flagged'] - r['tp']} (near-miss {r['fp_near_miss']})")
    if args.corpus == "conversations":
        print("precision / recall against the whitespace-token ground truth: " + "; ".join(
            f"{side} {r['precision_ws']:.4f} / {r['recall_ws']:.4f}" for side, r in results.items() if not r.get("failed")))
    if args.repeat > 1:
        print("every timed run (s): " + "; ".join(f"{side} " + ", ".join(f"{x:.2f}" for x in r["all_seconds"])
                                              for side, r in results.items() if not r.get("failed")))
    versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", python {sys.version.split()[0]}")
    if "ours" in results and not results["ours"].get("failed"):
        o = results["ours"]
        print(f"ours: {o['candidates']} LSH candidates (16 x 8: S-curve midpoint {o['lsh_threshold']:.3f}, P(candidate | J = {THRESHOLD}) "
              f"{o['recall_at_threshold']:.3f}), {o['verified']} verified by exact Jaccard >= {THRESHOLD} (the effective threshold); "
              f"{o['cpu_s']:.2f} CPU s in {o['seconds']:.2f} s wall; first call (untimed, 2 x {WARMUP_DOCS} documents) "
              f"{o['first_call_s']:.2f} s")
    if "datasketch" in results and not results["datasketch"].get("failed"):
        print(f"datasketch: automatic banding {results['datasketch']['bands_rows'][0]} bands x {results['datasketch']['bands_rows'][1]} rows")
    if "datatrove" in results and not results["datatrove"].get("failed"):
        d = results["datatrove"]
        print(f"datatrove ({d['config']}): stages " + ", ".join(f"{k} {v:.1f} s" for k, v in d["stages"].items())
              + f"; {d['removed_by_datatrove']} docs in its .remove files")
    two = results.get("ours_2threads", {})
    for side, r in results.items():
        if ours_rate and not side.startswith("ours") and not r.get("failed"):
            extra = f" (2 threads: {r['seconds'] / two['seconds']:.2f}x)" if two and not two.get("failed") else ""
            print(f"throughput ratio ours/{side}: {ours_rate / (n / r['seconds']):.2f}x{extra}")
    if args.profile and "profile" in results.get("ours", {}):
        pr = results["ours"]["profile"]
        print("ours, stage times of a second run: " + ", ".join(f"{k} {v:.2f} s" for k, v in pr["stages"].items()))
        print(pr["cprofile"])


if __name__ == "__main__":
    main()
