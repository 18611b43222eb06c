"""Near-duplicate detection: MinHash sketches, LSH banding, exact-Jaccard verification, clusters.

Everything runs vectorized over whole blocks of documents (no per-document Python on the hashing path):

1. Words: Polars lowercases the texts; NumPy then works on the raw UTF-8 bytes of the whole block.
   A word is a maximal run of letters/digits (``[\\p{L}\\p{N}]+``): ASCII bytes are classified by byte
   arithmetic, non-ASCII characters by their code point (decoded from the bytes, vectorized) in a
   table of every code point's class, built once from the same regex class. Each word is hashed
   from its bytes read 8 at a time (one gather per 8 bytes of the longest word) and a 64-bit mix.
2. Shingles: word n-grams (default 5) are combined from the word hashes with NumPy arithmetic on the
   flat array, windows never crossing a document boundary.
3. Sketch: one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification (Shrivastava
   2017): each shingle hash is mixed once, its top bits pick one of ``num_perm`` bins, the bin keeps
   its minimum (``np.minimum.at``); an empty bin ``j`` takes the value of the first non-empty bin
   along its own pseudo-random probe sequence ``probe(j, 1), probe(j, 2), ...``, the same sequence for
   every document. Two sketches then agree in a bin with probability equal to the Jaccard similarity,
   at the cost of one hash per shingle instead of ``num_perm``.
4. LSH: ``bands`` x ``rows`` (= num_perm / bands) band keys; documents sharing a key are candidates.
   Documents are sketched in blocks (``block_docs``) and only the band keys are kept, so memory
   grows by 8 x ``bands`` bytes per document, not with the text.
5. Verification: each candidate pair's exact Jaccard on the shingle sets must reach ``threshold``,
   so sketch noise costs recall at worst, never precision. Shingles are recomputed for the
   documents that appear in a candidate pair only.
6. Clusters: union-find over verified pairs; the first document (input order) of each cluster is
   kept, the others are marked as duplicates of it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

# Odd 64-bit multipliers for combining the words of a shingle (position-dependent, so order matters).
_MULTS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
     0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9, 0x2545F4914F6CDD1D, 0x9FB21C651E98DF25,
     0x7FB5D329728EA185, 0x81DADEF4BC2DD44D, 0xD9E5B6A7C3F1A3E1],
    dtype=np.uint64,
)
# Words longer than this many bytes (rare: long tokens, base64) are hashed one by one with blake2b.
_LONG_WORD = 256
_EMPTY = np.uint32(0xFFFFFFFF)
# _LOW_BYTES[k]: a mask of the low k bytes of a little-endian uint64 (k = 0..8).
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)
# Densification gives up probing after this many attempts (a sketch with one filled bin needs ~num_perm
# on average; failing 4,096 in a row has probability below 1e-13) and takes the next filled bin instead.
_MAX_PROBES = 4096


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a strong 64-bit bijective mix, vectorized (a new array; one temporary)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        t = np.empty_like(x)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= np.right_shift(x, np.uint64(27), out=t)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= np.right_shift(x, np.uint64(31), out=t)
        return x


def _seed_key(seed: int, salt: int) -> np.uint64:
    return _mix(np.array([(seed * 0x9E3779B1 + salt) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def _utf8_buffer(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of all texts back to back (uint8, a view where possible) and the n + 1 byte offsets."""
    arr = texts.rechunk().to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    data = data[offsets[0] : offsets[-1]]
    return data, offsets - offsets[0]


@functools.cache
def _alnum_table() -> np.ndarray:
    """``table[cp]``: whether code point ``cp`` is a letter or digit, as the regex class ``[\\p{L}\\p{N}]`` decides
    (Polars' own Rust regex, asked once for every non-ASCII code point: ~0.3 s, then 1.1 MB in memory)."""
    cps = np.arange(0x80, 0x110000)
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]  # surrogates never occur in UTF-8 text
    chars = pl.Series([chr(c) for c in cps.tolist()], dtype=pl.String)
    table = np.zeros(0x110000, dtype=bool)
    table[cps] = chars.str.contains(r"^[\p{L}\p{N}]$").to_numpy()
    return table


def _mark_non_ascii_alnum(data: np.ndarray, is_word: np.ndarray) -> None:
    """Set ``is_word`` on every byte of each non-ASCII letter or digit in the UTF-8 ``data`` (in place), vectorized:
    each character's code point is decoded from its lead and continuation bytes and looked up in ``_alnum_table``."""
    lead = np.flatnonzero(data >= 0xC0)
    if not len(lead):
        return
    # The 4 bytes from each lead on as one little-endian uint32 (an unaligned view: one gather per character).
    padded = np.concatenate([data, np.zeros(3, dtype=np.uint8)])
    w = np.ndarray(shape=(len(data),), dtype="<u4", buffer=padded, strides=(1,))[lead]
    b0 = w & 0xFF
    c1, c2, c3 = (w >> 8) & 0x3F, (w >> 16) & 0x3F, (w >> 24) & 0x3F
    three, four = b0 >= 0xE0, b0 >= 0xF0
    cp = np.where(three, ((b0 & 0x0F) << 12) | (c1 << 6) | c2, ((b0 & 0x1F) << 6) | c1)
    if four.any():
        cp[four] = ((b0[four] & 0x07) << 18) | (c1[four] << 12) | (c2[four] << 6) | c3[four]
    alnum = _alnum_table()[cp]
    # The lead and its continuation bytes take the character's class.
    is_word[lead] = alnum
    is_word[lead + 1] = alnum
    is_word[lead[three] + 2] = alnum[three]
    if four.any():
        is_word[lead[four] + 3] = alnum[four]


def _words(texts: pl.Series, split: str = "non_alnum") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bytes of the lowercased texts, word start and end byte positions, and per-text word offsets (n + 1).

    ``split="non_alnum"``: words are maximal runs of letters and digits. ``split="space"``: maximal runs of
    anything but U+0020 (what ``str.split(" ")`` gives once empty strings are dropped).
    """
    # A space after every text: no word runs from one text into the next. (Lazy: collect() releases
    # the GIL, so blocks sketched on several threads lowercase in parallel.)
    text = pl.col("t").cast(pl.String).fill_null("")
    low = pl.LazyFrame({"t": texts}).select(text.str.to_lowercase() + " ").collect()["t"]
    data, offsets = _utf8_buffer(low)
    if split == "space":
        is_word = (data != 0x20).view(np.int8)  # no UTF-8 multi-byte character contains the byte 0x20
    elif split == "non_alnum":
        # Word bytes: a-z, 0-9, and every byte of a non-ASCII character that is a letter or digit.
        scratch = data - np.uint8(ord("a"))
        is_word = scratch < 26
        np.subtract(data, np.uint8(ord("0")), out=scratch)
        is_word |= scratch < 10
        _mark_non_ascii_alnum(data, is_word)
        is_word = is_word.view(np.int8)
    else:
        raise ValueError(f"split must be 'non_alnum' or 'space', got {split!r}")
    edge = np.empty(len(data) + 1, dtype=np.int8)  # +1 where a word starts, -1 after it ends
    if len(data):
        edge[0] = is_word[0]
        np.subtract(is_word[1:], is_word[:-1], out=edge[1:-1])
        edge[-1] = -is_word[-1]
    else:
        edge[0] = 0
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)
    return data, starts, ends, np.searchsorted(starts, offsets)


def word_hashes(texts: pl.Series, split: str = "non_alnum", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of every lowercased text, flat, plus per-text offsets (n + 1).

    ``split="non_alnum"`` (near-dedup, decontamination): words are maximal runs of letters and digits.
    ``split="space"``: words are what ``str.split(" ")`` gives, empty strings dropped. Equal words
    hash equal; different words differ but for 64-bit collisions.
    """
    data, starts, ends, offsets = _words(texts, split)
    return _word_hashes(data, starts, ends, seed), offsets


def _word_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, seed: int) -> np.ndarray:
    """64-bit hash of each word's bytes: 8-byte blocks, each folded in with a mix."""
    lengths = ends - starts
    if not len(starts):
        return np.zeros(0, dtype=np.uint64)
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    # Element i = the 8 bytes from byte i on, as a little-endian uint64 (an unaligned view: one gather
    # reads a whole 8-byte block of a word).
    blocks = np.ndarray(shape=(len(data),), dtype="<u8", buffer=padded, strides=(1,))

    def block(first: np.ndarray, left: np.ndarray) -> np.ndarray:
        # The 8 bytes at each position in ``first``, those past the word's end (``left`` bytes remain) zeroed.
        return blocks[first] & np.take(_LOW_BYTES, np.minimum(left, 8))

    h = block(starts, lengths)
    more = np.flatnonzero(lengths > 8)
    k = 1
    while len(more) and 8 * k < _LONG_WORD:
        h[more] = _mix(h[more]) ^ block(starts[more] + 8 * k, lengths[more] - 8 * k)
        k += 1
        more = more[lengths[more] > 8 * k]
    for i in more.tolist():  # words over _LONG_WORD bytes: rare enough for a loop
        digest = hashlib.blake2b(data[starts[i] : ends[i]].tobytes(), digest_size=8).digest()
        h[i] = np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):
        return _mix(h ^ (lengths.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)) ^ _seed_key(seed, 1))


def shingle_hashes(texts: pl.Series, ngram: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word ``ngram``-shingle of every text, flat, plus per-document offsets.

    Texts are lowercased and split into words at every run of characters that are not letters or
    digits (whitespace of any kind and punctuation included). A text with fewer than ``ngram`` words
    yields one shingle of all its words; an empty text yields none.
    """
    if not 1 <= ngram <= len(_MULTS):
        raise ValueError(f"ngram must be between 1 and {len(_MULTS)}, got {ngram}")
    data, starts, ends, word_off = _words(texts)
    wh = _word_hashes(data, starts, ends, seed)
    del data
    counts = np.diff(word_off)
    n_words = len(wh)
    full = counts >= ngram
    n_shingles = np.where(full, counts - ngram + 1, (counts > 0).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(n_shingles)]).astype(np.int64)
    with np.errstate(over="ignore"):
        if n_words >= ngram:
            # Every window of ngram consecutive words of the flat array, then drop those crossing a document end.
            windows = wh[: n_words - ngram + 1] * _MULTS[0]
            for j in range(1, ngram):
                windows += wh[j : n_words - ngram + 1 + j] * _MULTS[j]
            valid = np.ones(len(windows), dtype=bool)
            tail = (word_off[1:][:, None] - np.arange(1, ngram)[None, :]).ravel()  # the last ngram-1 starts of each text
            valid[tail[(tail >= 0) & (tail < len(windows))]] = False
            windows = windows[valid]
        else:
            windows = np.zeros(0, dtype=np.uint64)
        short = np.flatnonzero(~full & (counts > 0))
        if len(short):
            # Texts with fewer than ngram words: one shingle of all their words.
            first, cnt = word_off[short], counts[short]
            one = np.zeros(len(short), dtype=np.uint64)
            for j in range(ngram - 1):
                take = j < cnt
                one[take] += wh[first[take] + j] * _MULTS[j]
            out = np.empty(offsets[-1], dtype=np.uint64)
            is_short = np.zeros(offsets[-1], dtype=bool)
            is_short[offsets[short]] = True
            out[is_short] = one
            out[~is_short] = windows
        else:
            out = windows
    return out, offsets


def _probe(bins: np.ndarray, attempt: int, bits: int, seed: int) -> np.ndarray:
    """The attempt-th bin that an empty bin borrows from (same for every document): a hash of (bin, attempt)."""
    with np.errstate(over="ignore"):
        x = bins.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(attempt) * np.uint64(0xC2B2AE3D27D4EB4F)
        return (_mix(x ^ _seed_key(seed, 3)) >> np.uint64(64 - bits)).astype(np.int64)


@functools.cache
def _first_probe(bits: int, seed: int) -> np.ndarray:
    """``table[j, b]``: the first attempt at which empty bin ``j``'s probe sequence lands on bin ``b`` (``_MAX_PROBES``
    + 1 if it never does within ``_MAX_PROBES``), as int16. The first filled bin along ``j``'s sequence is then the
    filled ``b`` with the smallest entry: densification without walking the sequence (64 KB for 128 bins)."""
    size = 1 << bits
    never = _MAX_PROBES + 1
    table = np.full((size, size), never, dtype=np.int16)
    bins = np.arange(size)
    for attempt in range(_MAX_PROBES, 0, -1):  # backwards, so the earliest attempt writes last
        table[bins, _probe(bins, attempt, bits, seed)] = attempt
    return table


# Densification walks every empty bin's probe sequence this many steps, then looks the rest up in ``_first_probe``:
# documents with few shingles would otherwise take hundreds of steps.
_WALK = 12


def minhash_signatures(shingles: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """(n_docs, num_perm) uint32 sketches: one-permutation hashing with optimal densification.

    A document without shingles gets an all-empty sketch (every value 0xFFFFFFFF).
    """
    if num_perm < 2 or num_perm & (num_perm - 1):
        raise ValueError(f"num_perm must be a power of two >= 2 (bins are picked by the top bits), got {num_perm}")
    n_docs = len(offsets) - 1
    bits = num_perm.bit_length() - 1
    h = _mix(shingles ^ _seed_key(seed, 2))
    # Bin-major (num_perm, n_docs): a step of every bin's probe sequence is then a gather of whole rows.
    keys = (h >> np.uint64(64 - bits)).astype(np.int64) * n_docs + np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(offsets))
    # Low 32 bits as the value (independent of the bin bits); 0xFFFFFFFF is reserved for "empty".
    values = np.minimum((h & np.uint64(0xFFFFFFFF)).astype(np.uint32), _EMPTY - np.uint32(1))
    del h
    sig = np.full(num_perm * n_docs, _EMPTY, dtype=np.uint32)
    np.minimum.at(sig, keys, values)
    sig = sig.reshape(num_perm, n_docs)
    filled = sig != _EMPTY
    # Optimal densification: every empty bin of a non-empty sketch walks its probe sequence until it
    # lands on a bin that was filled by a shingle, and copies that bin's value. The first steps run on
    # whole rows (cheap while most bins are filled), the rest is looked up in _first_probe.
    need = ~filled & filled.any(axis=0)[None, :]
    out = sig.copy()
    every_bin = np.arange(num_perm)
    for attempt in range(1, _WALK + 1):
        src = _probe(every_bin, attempt, bits, seed)
        hit = need & filled[src]
        np.copyto(out, sig[src], where=hit)
        need &= ~hit
        if attempt % 2 == 0 and not need.any():
            break
    out = np.ascontiguousarray(out.T)
    sig, filled, need = sig.T, filled.T, need.T
    doc, empty_bin = np.nonzero(need)
    if len(doc):
        # What the walk would reach, without walking: for each remaining (doc, bin), the filled bin of that doc that
        # comes first along the bin's sequence. One entry per remaining bin x filled bin of its doc (a few hundred
        # per document at most after the walk: docs with many filled bins have almost none left).
        fdoc, fbin = np.nonzero(filled)
        count = np.bincount(fdoc, minlength=n_docs)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        reps = count[doc]
        pair = np.repeat(np.arange(len(doc)), reps)
        within = np.arange(len(pair)) - np.repeat(np.cumsum(reps) - reps, reps)
        b = fbin[start[doc][pair] + within]
        # Attempts are distinct per bin (each step lands on one bin), so (attempt, bin) packed in one int32 has one minimum.
        packed = _first_probe(bits, seed)[empty_bin[pair], b].astype(np.int32) << 16 | b.astype(np.int32)
        best = np.minimum.reduceat(packed, np.cumsum(reps) - reps)
        src, ok = best & 0xFFFF, (best >> 16) <= _MAX_PROBES
        out[doc[ok], empty_bin[ok]] = sig[doc[ok], src[ok]]
        doc, empty_bin = doc[~ok], empty_bin[~ok]
    for d, j in zip(doc.tolist(), empty_bin.tolist()):  # never seen in practice: the next filled bin to the right
        out[d, j] = sig[d, (j + int(np.roll(filled[d], -j).argmax())) % num_perm]
    return out


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """(n_docs, bands) uint64 LSH keys: band b hashes sketch columns [b * rows, (b + 1) * rows)."""
    n, k = sig.shape
    if k % bands:
        raise ValueError(f"bands ({bands}) must divide num_perm ({k})")
    rows = k // bands
    block = sig.reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15), (n, bands)).copy()
        for r in range(rows):
            key = _mix(key ^ block[:, :, r] ^ np.uint64(r + 1))
    return key


# Peak bytes per (key, doc) entry while its partition is paired: the entry (16), the sort order (8), the sorted
# copies (16), the group heads (8), masks and the pair codes, and what the allocators keep of them (measured: 3M
# rows in 8 partitions raised the peak by 0.66 GiB for a 384 MiB budget; in 16, by 0.17 GiB).
BYTES_PER_KEY = 128


def key_partition(keys: np.ndarray, bits: int) -> np.ndarray:
    """Which of ``2**bits`` partitions each band key falls in (its top bits): every copy of a key lands in one."""
    return (keys >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(keys.shape, dtype=np.int64)


def partition_bits(entries: int, budget_bytes: int) -> int:
    """The fewest top bits of the key that cut ``entries`` (key, doc) entries into partitions that fit the budget
    (hash-distributed, so each holds about entries / 2**bits)."""
    bits = 0
    while bits < 16 and entries * BYTES_PER_KEY / 2**bits > budget_bytes:
        bits += 1
    return bits


def pairs_in_partition(key: np.ndarray, doc: np.ndarray, n: int) -> np.ndarray:
    """Candidate pairs among entries that hold every copy of their keys, as sorted unique codes ``head * n + doc``:
    in each group of equal keys, its smallest document with each other one."""
    if len(key) < 2:
        return np.zeros(0, dtype=np.int64)
    order = pl.Series(key).arg_sort().to_numpy()  # Polars' sort is multi-threaded; the head is a minimum, not the first
    key, doc = key[order], doc[order]
    del order
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    del key
    sizes = np.diff(np.append(starts, len(doc)))
    heads = np.repeat(np.minimum.reduceat(doc, starts), sizes)
    other = heads != doc  # every entry but its group's head (a group of one is its own head)
    # head-major codes: np.unique sorts them by (head, doc) and drops a pair found in several bands.
    return np.unique(heads[other] * n + doc[other])


def candidate_pairs(parts: Iterable[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Candidate pairs (i, j), i < j, sorted, from ``(key, doc)`` partitions of the band keys of ``n`` documents.

    Each partition holds every copy of its keys (``key_partition``), documents ascending within a key, so
    partitions are paired one at a time: memory follows the largest partition, not the corpus.
    """
    codes = [pairs_in_partition(key, doc, n) for key, doc in parts]
    merged = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return np.stack([merged // n, merged % n], axis=1) if n else np.zeros((0, 2), dtype=np.int64)


def candidates_from_keys(keys: np.ndarray, has: np.ndarray | None = None, budget_bytes: int = 1 << 30) -> np.ndarray:
    """Candidate pairs (i, j), i < j, of documents sharing a band key; star-shaped per bucket (first doc to each other).

    Documents where ``has`` is False (no shingle) match nothing. Band keys are seeded by the band index, so one
    flat key column holds every band; it is paired in key partitions of at most ``budget_bytes``.
    """
    n, bands = keys.shape
    docs = np.arange(n, dtype=np.int64) if has is None else np.flatnonzero(has)
    flat = (keys if has is None else keys[docs]).ravel()
    doc = np.repeat(docs, bands)
    bits = partition_bits(len(flat), budget_bytes)
    if not bits:
        return candidate_pairs([(flat, doc)], n)
    part = key_partition(flat, bits)
    return candidate_pairs(((flat[sel], doc[sel]) for sel in (np.flatnonzero(part == p) for p in range(2**bits))), n)


def lsh_candidates(sig: np.ndarray, bands: int) -> np.ndarray:
    """Candidate pairs (i, j), i < j, from documents sharing any band key; star-shaped per bucket."""
    return candidates_from_keys(band_keys(sig, bands))


def exact_jaccard(shingles: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of each pair (two empty sets: 1.0)."""
    sets = _ShingleSets(None)
    sets.add(shingles.copy(), offsets)  # add sorts in place: the caller's array stays as given
    return sets.jaccard(pairs)


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
    # Roots are the smallest index of their component; parents always point to smaller indices,
    # so one pass in index order resolves every document.
    root = parent.copy()
    for i in np.flatnonzero(root != np.arange(n)).tolist():
        root[i] = root[root[i]]
    return root


def lsh_recall(similarity: float, bands: int, rows: int) -> float:
    """Probability that a pair of this Jaccard similarity shares at least one band (the LSH S-curve)."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@dataclass
class NearDupResult:
    """Per document: the kept document it duplicates (-1 if kept); plus what the search did.

    ``lsh_threshold`` is the S-curve midpoint (1/bands)^(1/rows) where a pair becomes a candidate with
    probability ~1/2; ``recall_at_threshold`` is that probability at the verification threshold. The
    effective threshold of the decision is the exact-Jaccard ``threshold`` itself: no pair below it is
    ever marked.
    """

    duplicate_of: np.ndarray
    candidates: int
    verified: int
    lsh_threshold: float
    recall_at_threshold: float = float("nan")

    @property
    def cluster_sizes(self) -> list[int]:
        heads = self.duplicate_of[self.duplicate_of >= 0]
        return sorted((np.bincount(heads)[np.unique(heads)] + 1).tolist(), reverse=True) if len(heads) else []


def _sketch_block(texts: pl.Series, ngram: int, num_perm: int, bands: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Band keys of one block of texts, and which of them have at least one shingle."""
    shingles, offsets = shingle_hashes(texts, ngram, seed)
    sig = minhash_signatures(shingles, offsets, num_perm, seed)
    return band_keys(sig, bands), np.diff(offsets) > 0


def sketch(
    texts: pl.Series, ngram: int = 5, num_perm: int = 128, bands: int = 16, seed: int = 0, block_docs: int = 8192, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Band keys (n x ``bands``, uint64) of each text, and whether it has any shingle.

    Row-local, so curation computes it per shard and its global step holds only these keys. Documents
    are sketched in blocks of ``block_docs``, on ``workers`` threads if more than one; the result does
    not depend on either. One thread is the default: on the shared 2-core machines this was measured
    on, a second thread gave no speed-up (see docs/benchmarks.md).
    """
    n = len(texts)
    if num_perm % bands:
        raise ValueError(f"bands ({bands}) must divide num_perm ({num_perm})")
    keys = np.zeros((n, bands), dtype=np.uint64)
    has = np.zeros(n, dtype=bool)
    spans = [(a, min(a + block_docs, n)) for a in range(0, n, block_docs)]

    def run(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return _sketch_block(texts.slice(span[0], span[1] - span[0]), ngram, num_perm, bands, seed)

    if workers > 1 and len(spans) > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(run, spans)
            for (a, b), (k, h) in zip(spans, results):
                keys[a:b], has[a:b] = k, h
    else:
        for a, b in spans:
            keys[a:b], has[a:b] = run((a, b))
    return keys, has


def resolve(
    keys: np.ndarray,
    has: np.ndarray,
    texts_of: Callable[[np.ndarray], pl.Series],
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 0,
    block_docs: int = 8192,
) -> NearDupResult:
    """Candidates from shared band keys, verified by exact Jaccard, resolved into clusters (``verify_pairs``)."""
    n, bands = keys.shape
    return verify_pairs(n, candidates_from_keys(keys, has), texts_of, threshold, ngram, num_perm, bands, seed, block_docs)


def verify_pairs(
    n: int,
    pairs: np.ndarray,
    texts_of: Callable[[np.ndarray], pl.Series],
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    bands: int = 16,
    seed: int = 0,
    block_docs: int = 8192,
    budget_bytes: int = 1 << 30,
    scratch: Path | None = None,
) -> NearDupResult:
    """Candidate pairs of ``n`` documents verified by exact Jaccard, resolved into clusters.

    ``texts_of(indices)`` returns the texts of those documents (ascending, in that order); it is called for the
    documents of candidate pairs only, ``block_docs`` at a time, so the caller never needs every text in memory.
    Each document's shingle set is kept sorted, in memory, or in a file under ``scratch`` when the sets of all
    candidate documents would pass ``budget_bytes``: the pairs then read their two sets back one pair at a time.
    """
    rows = num_perm // bands
    sims = np.zeros(0)
    if len(pairs):
        docs, local = np.unique(pairs, return_inverse=True)
        spill = scratch is not None and _SET_BYTES_PER_DOC * len(docs) > budget_bytes
        sets = _ShingleSets(scratch / "shingle_sets.bin" if spill and scratch is not None else None)
        for a in range(0, len(docs), block_docs):
            sets.add(*shingle_hashes(texts_of(docs[a:a + block_docs]), ngram, seed))
        sims = sets.jaccard(local.reshape(-1, 2))
        sets.close()
    edges = pairs[sims >= threshold]
    root = _clusters(n, edges)
    dup = np.where(root != np.arange(n), root, -1)
    return NearDupResult(
        dup, len(pairs), len(edges), float((1 / bands) ** (1 / rows)), lsh_recall(threshold, bands, rows)
    )


# What a candidate document's shingle set is assumed to cost in memory when deciding to spill (~500 words of chat).
_SET_BYTES_PER_DOC = 4096


class _ShingleSets:
    """The sorted, distinct shingle hashes of documents added block by block, in memory or appended to ``path``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.sizes: list[np.ndarray] = []
        self.parts: list[np.ndarray] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb+") if path is not None else None  # noqa: SIM115 - closed by close()

    def add(self, shingles: np.ndarray, offsets: np.ndarray) -> None:
        """Add the documents whose shingles are ``shingles[offsets[d]:offsets[d + 1]]`` (sorted in place)."""
        # A sort per document: 14x faster than one lexsort by (document, shingle) over the block (0.08 vs 1.08 s for
        # 8,192 documents of 200-600 shingles), as the documents are already contiguous.
        for a, b in itertools.pairwise(offsets.tolist()):
            shingles[a:b].sort()
        doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        keep = np.ones(len(shingles), dtype=bool)
        keep[1:] = (shingles[1:] != shingles[:-1]) | (doc[1:] != doc[:-1])
        self.sizes.append(np.bincount(doc[keep], minlength=len(offsets) - 1))
        if self.file is not None:
            self.file.write(shingles[keep].tobytes())
        else:
            self.parts.append(shingles[keep])

    def jaccard(self, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard of each pair of (added-order) documents' sets (two empty sets: 1.0)."""
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        if self.file is None:
            # Views into each block's array: no second copy of every set.
            views = [part[a:b] for part, z in zip(self.parts, self.sizes, strict=True)
                     for a, b in zip(np.cumsum(z) - z, np.cumsum(z), strict=True)]
            get = views.__getitem__
        else:
            self.file.flush()
            fd = self.file.fileno()
            get = lambda d: np.frombuffer(os.pread(fd, int(8 * sizes[d]), int(8 * offsets[d])), dtype=np.uint64)
        out = np.empty(len(pairs))
        for k, (i, j) in enumerate(pairs.tolist()):
            out[k] = _jaccard_sorted(get(i), get(j))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            assert self.path is not None
            self.path.unlink()


def _jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted sets of distinct values (two empty sets: 1.0)."""
    if len(a) > len(b):
        a, b = b, a
    # a is the smaller set: look each of its elements up in b.
    inter = int(np.count_nonzero(b[np.minimum(np.searchsorted(b, a), len(b) - 1)] == a)) if len(a) else 0
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def near_duplicates(
    texts: pl.Series,
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    bands: int = 16,
    seed: int = 0,
    block_docs: int = 8192,
    workers: int = 1,
) -> NearDupResult:
    """Find near-duplicates among ``texts`` (Jaccard of word n-gram sets >= ``threshold``): ``sketch``, then ``resolve``."""
    keys, has = sketch(texts, ngram, num_perm, bands, seed, block_docs, workers)
    return resolve(keys, has, texts.gather, threshold, ngram, num_perm, seed, block_docs)
