"""Near-duplicate detection: MinHash sketches, LSH banding, exact-Jaccard verification, clusters.

Everything runs vectorized over all documents at once (no per-document Python on the hashing path):

1. Words: Polars lowercases and splits every text; each word is hashed once (``Series.hash``).
2. Shingles: word n-grams (default 5) are combined from the word hashes with NumPy arithmetic
   on the flat array, windows never crossing a document boundary.
3. Sketch: one-permutation MinHash with rotation densification (Shrivastava & Li, 2014): each
   shingle hash is hashed once, its top bits pick one of ``num_perm`` bins, the bin keeps its
   minimum; empty bins borrow the next non-empty bin's value. It estimates Jaccard like
   ``num_perm`` independent permutations at the cost of one hash per shingle.
4. LSH: ``bands`` x ``rows`` (= num_perm) band keys; documents sharing a key are candidates.
5. Verification: each candidate pair's exact Jaccard on the shingle sets must reach ``threshold``,
   so sketch noise costs recall at worst, never precision.
6. Clusters: union-find over verified pairs; the first document (input order) of each cluster is
   kept, the others are marked as duplicates of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Odd 64-bit multipliers for combining the words of a shingle (position-dependent, so order matters).
_MULTS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
     0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9, 0x2545F4914F6CDD1D, 0x9FB21C651E98DF25,
     0x7FB5D329728EA185, 0x81DADEF4BC2DD44D, 0xD9E5B6A7C3F1A3E1],
    dtype=np.uint64,
)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a strong 64-bit bijective mix, vectorized."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def shingle_hashes(texts: pl.Series, ngram: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word ``ngram``-shingle of every text, flat, plus per-document offsets.

    Texts are lowercased and split into words at every run of non-alphanumerics (whitespace of any
    kind included). A text with fewer than
    ``ngram`` words yields one shingle of all its words; an empty text yields none.
    """
    if ngram > len(_MULTS):
        raise ValueError(f"ngram must be at most {len(_MULTS)}")
    # Any run of non-alphanumerics (spaces, newlines, tabs, punctuation) separates words.
    words = texts.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.split(" ").list.eval(
        pl.element().filter(pl.element() != "")
    )
    counts = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode().drop_nulls().hash(seed=seed).to_numpy().astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_shingles = np.where(counts >= ngram, counts - ngram + 1, (counts > 0).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(n_shingles)]).astype(np.int64)
    doc_of = np.repeat(np.arange(len(counts)), n_shingles)
    first = np.arange(offsets[-1]) - offsets[doc_of] + starts[doc_of]
    width = np.minimum(counts[doc_of], ngram)
    out = np.zeros(offsets[-1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        padded = np.concatenate([flat, np.zeros(ngram, dtype=np.uint64)])
        for j in range(ngram):
            take = j < width
            out += np.where(take, padded[first + j] * _MULTS[j], np.uint64(0))
    return _mix(out), offsets


def minhash_signatures(shingles: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """(n_docs, num_perm) uint32 sketches by one-permutation hashing with rotation densification."""
    if num_perm & (num_perm - 1):
        raise ValueError("num_perm must be a power of two (bins are picked by the top bits)")
    n_docs = len(offsets) - 1
    bits = int(np.log2(num_perm))
    h = _mix(shingles ^ np.uint64(_mix(np.array([seed], dtype=np.uint64))[0]))
    bins = (h >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(h), dtype=np.int64)
    values = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    doc = np.repeat(np.arange(n_docs), np.diff(offsets))
    empty = np.uint32(0xFFFFFFFF)
    sig = np.full(n_docs * num_perm, empty, dtype=np.uint32)
    _group_min(sig, doc * num_perm + bins, values)
    sig = sig.reshape(n_docs, num_perm)
    # Rotation densification: an empty bin takes the next non-empty bin to its right (circularly),
    # offset by the distance so borrowed values differ from genuine ones.
    filled = sig != empty
    rows = np.flatnonzero(~filled.all(axis=1) & filled.any(axis=1))
    if len(rows):
        sub, ok = sig[rows], filled[rows]
        out, done = sub.copy(), ok.copy()
        for t in range(1, num_perm):
            if done.all():
                break
            src = np.roll(sub, -t, axis=1)
            src_ok = np.roll(ok, -t, axis=1)
            take = ~done & src_ok
            out[take] = (src[take].astype(np.uint64) + np.uint64(t * 0x9E3779B1) & np.uint64(0xFFFFFFFE)).astype(np.uint32)
            done |= take
        sig[rows] = out
    return sig


def _group_min(sig: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
    """sig[k] = min(values with key k); a multi-threaded Polars aggregation (np.minimum.at is slow)."""
    if not len(keys):
        return
    mins = pl.DataFrame({"k": keys, "v": values}).group_by("k").agg(pl.col("v").min())
    sig[mins["k"].to_numpy()] = mins["v"].to_numpy()


def lsh_candidates(sig: np.ndarray, bands: int) -> np.ndarray:
    """Candidate pairs (i, j), i < j, from documents sharing any band key; star-shaped per bucket."""
    n, k = sig.shape
    if k % bands:
        raise ValueError(f"bands ({bands}) must divide num_perm ({k})")
    rows = k // bands
    pairs = []
    with np.errstate(over="ignore"):
        for b in range(bands):
            block = sig[:, b * rows : (b + 1) * rows].astype(np.uint64)
            key = np.zeros(n, dtype=np.uint64)
            for r in range(rows):
                key = _mix(key ^ block[:, r] ^ np.uint64(r + 1))
            df = pl.DataFrame({"key": key, "doc": np.arange(n)}).group_by("key").agg(pl.col("doc").min().alias("head"), pl.col("doc"))
            df = df.filter(pl.col("doc").list.len() > 1).explode("doc").filter(pl.col("doc") != pl.col("head"))
            if df.height:
                pairs.append(df.select("head", "doc").to_numpy())
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def exact_jaccard(shingles: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of each pair."""
    sets: dict[int, np.ndarray] = {}

    def get(i: int) -> np.ndarray:
        if i not in sets:
            sets[i] = np.unique(shingles[offsets[i] : offsets[i + 1]])
        return sets[i]

    out = np.empty(len(pairs))
    for n, (i, j) in enumerate(pairs.tolist()):
        a, b = get(i), get(j)
        inter = len(np.intersect1d(a, b, assume_unique=True))
        union = len(a) + len(b) - inter
        out[n] = inter / union if union else 1.0
    return out


def _clusters(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find: the smallest index in each connected component, per document."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


@dataclass
class NearDupResult:
    """Per document: the kept document it duplicates (-1 if kept); plus what the search did."""

    duplicate_of: np.ndarray
    candidates: int
    verified: int
    lsh_threshold: float

    @property
    def cluster_sizes(self) -> list[int]:
        heads = self.duplicate_of[self.duplicate_of >= 0]
        return sorted((np.bincount(heads)[np.unique(heads)] + 1).tolist(), reverse=True) if len(heads) else []


def near_duplicates(
    texts: pl.Series, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128, bands: int = 16, seed: int = 0
) -> NearDupResult:
    """Find near-duplicates among ``texts`` (Jaccard of word n-gram sets >= ``threshold``)."""
    n = len(texts)
    shingles, offsets = shingle_hashes(texts, ngram, seed)
    sig = minhash_signatures(shingles, offsets, num_perm, seed)
    # Documents without shingles (empty text) have no sketch and match nothing.
    sig[np.diff(offsets) == 0] = np.arange(num_perm, dtype=np.uint32)[None, :] ^ np.uint32(0x5BD1E995)
    pairs = lsh_candidates(sig, bands)
    has = np.diff(offsets) > 0
    pairs = pairs[has[pairs[:, 0]] & has[pairs[:, 1]]] if len(pairs) else pairs
    sims = exact_jaccard(shingles, offsets, pairs) if len(pairs) else np.zeros(0)
    edges = pairs[sims >= threshold]
    root = _clusters(n, edges)
    dup = np.where(root != np.arange(n), root, -1)
    rows = num_perm // bands
    return NearDupResult(dup, int(len(pairs)), int(len(edges)), float((1 / bands) ** (1 / rows)))
