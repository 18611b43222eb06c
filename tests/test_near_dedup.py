from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl

from sft_engine.config import CurateConfig
from sft_engine.curate import curate
from sft_engine.near_dedup import exact_jaccard, minhash_signatures, near_duplicates, shingle_hashes


def _corpus(n_base: int = 1500, n_planted: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(4000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(60, 160))) for _ in range(n_base)]
    for k in range(n_planted):
        words = docs[rng.randrange(n_base)].split()
        for _ in range(rng.randint(0, 5)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        docs.append(" ".join(words).upper() if k % 4 == 0 else " ".join(words))
    return docs


def test_shingles_are_word_ngrams_within_documents() -> None:
    sh, off = shingle_hashes(pl.Series(["a b c d e f", "A, b! c d e f", "x y", "", "a\tb\nc  d\r\ne f"]), ngram=5)
    assert off.tolist() == [0, 2, 4, 5, 5, 7]
    # Newlines and tabs separate words like spaces do.
    assert sh[5:7].tolist() == sh[0:2].tolist()
    # Case and punctuation do not matter; short texts give one shingle; empty ones none.
    assert sh[0:2].tolist() == sh[2:4].tolist()
    assert len(set(sh[0:2].tolist())) == 2


def test_sketch_estimates_jaccard() -> None:
    docs = _corpus(200, 100, seed=1)
    sh, off = shingle_hashes(pl.Series(docs))
    sig = minhash_signatures(sh, off, 128)
    pairs = np.array([(i, j) for i in range(0, 300, 7) for j in range(200, 300, 9) if i < j])
    exact = exact_jaccard(sh, off, pairs)
    est = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    assert np.abs(est - exact).mean() < 0.05


def test_recall_and_precision_against_exact_jaccard() -> None:
    docs = _corpus()
    res = near_duplicates(pl.Series(docs), threshold=0.8)
    sh, off = shingle_hashes(pl.Series(docs))
    n = len(docs)
    pairs = np.array([(i, j) for j in range(1500, n) for i in range(j)])
    truth = pairs[exact_jaccard(sh, off, pairs) >= 0.8]
    true_dups = set(truth[:, 1].tolist())
    flagged = set(np.flatnonzero(res.duplicate_of >= 0).tolist())
    assert len(true_dups) > 100  # enough true pairs for the rates below to mean something (138 with this seed)
    assert len(true_dups & flagged) / len(true_dups) >= 0.95
    assert flagged <= true_dups  # verified by exact Jaccard: no false positives
    # Deterministic: the first document of each cluster is kept.
    assert (res.duplicate_of[res.duplicate_of >= 0] < np.flatnonzero(res.duplicate_of >= 0)).all()
    assert near_duplicates(pl.Series(docs), threshold=0.8).duplicate_of.tolist() == res.duplicate_of.tolist()


def test_curation_marks_near_duplicates_with_the_row_they_duplicate(tmp_path: Path) -> None:
    base = "the committee met on tuesday to discuss the budget for the new library and agreed to fund the children's wing"
    rows = [
        {"messages": [{"role": "user", "content": "Summarize the meeting."}, {"role": "assistant", "content": base + "."}]},
        {"messages": [{"role": "user", "content": "Summarize the meeting!"}, {"role": "assistant", "content": base + " fully."}]},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    ]
    src = tmp_path / "n.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, _, rejected, stats = curate(CurateConfig(sources=[{"name": "n", "path": str(src)}], heldout_fraction=0.0))
    assert rejected.select("row", "drop_reason", "dup_of").rows() == [(2, "dedup_near", "n:1")]
    assert sorted(train["row"].to_list()) == [1, 3]
    assert stats["near_dedup"]["verified_pairs"] == 1 and stats["near_dedup"]["cluster_sizes"] == [2]
    off = curate(CurateConfig(sources=[{"name": "n", "path": str(src)}], heldout_fraction=0.0, near_dedup={"enabled": False}))
    assert off[0].height == 3
