"""Near-duplicate detection: MinHash sketches, LSH banding, exact-Jaccard verification, clusters.

The loops over bytes, words and shingles are compiled (numba, ``cache=True``: machine code is kept beside this file
and loaded by later processes in ~0.3 s) and run over whole blocks of documents; NumPy and Polars do the rest:

1. Words: one pass over the raw UTF-8 bytes of a block. ASCII texts are lowercased as they are read;
   other texts a code point at a time through a table of Polars' own case mapping (Polars lowercases
   the rare texts the table cannot: final sigma, U+0130). A word is a maximal run of letters/digits
   (``[\\p{L}\\p{N}]+``): ASCII bytes are classified by arithmetic, other characters by their code point
   in a table built once from the same regex class. Each word is hashed from its bytes read 8 at a
   time (one unaligned load each) and a 64-bit mix.
2. Shingles: word n-grams (default 5) are position-weighted sums of the word hashes, windows never
   crossing a document boundary.
3. Sketch: one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification (Shrivastava
   2017): each shingle hash is mixed once, its top bits pick one of ``num_perm`` bins, the bin keeps
   its minimum; an empty bin ``j`` takes the value of the first non-empty bin along its own
   pseudo-random probe sequence ``probe(j, 1), probe(j, 2), ...``, the same sequence for every
   document. Two sketches then agree in a bin with probability equal to the Jaccard similarity, at
   the cost of one hash per shingle instead of ``num_perm``.
4. LSH: ``bands`` x ``rows`` (= num_perm / bands) band keys; documents sharing a key are candidates.
   Documents are sketched in blocks (``block_docs``) and only the band keys are kept, so memory
   grows by 8 x ``bands`` bytes per document, not with the text.
5. Verification: each candidate pair's exact Jaccard on the shingle sets must reach ``threshold``,
   so sketch noise costs recall at worst, never precision. Shingles are recomputed for the
   documents that appear in a candidate pair only (cheaper than keeping every document's), and each
   pair's sets are intersected through one hash table (no sort).
6. Clusters: union-find over verified pairs; the first document (input order) of each cluster is
   kept, the others are marked as duplicates of it.

Every hash, sketch and decision equals the NumPy implementation this replaced, bit for bit (checked on the
benchmark's 100k conversations and a corpus of special case-mapping characters), so units curated before it
pair with units curated after.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
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


# Code points past plane 3 are unassigned (planes 4-13), tags and variation selectors (14) or private use (15-16):
# none is a letter or digit or has a lowercase form (tests/curation/test_near_dedup.py asks Polars about all of them).
_LAST_CASED_PLANE_END = 0x40000
# Capital sigma lowercases by context (final sigma), U+0130 to two code points: texts with these (and any code point
# whose lowercase is not one code point) are lowercased by Polars itself.
_SPECIAL_LOWER = (0x3A3, 0x130)


@functools.cache
def _char_tables(end: int = _LAST_CASED_PLANE_END) -> tuple[np.ndarray, np.ndarray]:
    """Per code point: whether it is a letter or digit, as the regex class ``[\\p{L}\\p{N}]`` decides, and its
    lowercase code point as ``str.to_lowercase`` maps it (-1: ``_SPECIAL_LOWER``). Polars' own Rust regex and case
    mapping, asked once for every non-ASCII code point below ``end``: ~0.15 s, then 5.6 MB."""
    cps = np.arange(0x80, end)
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]  # surrogates never occur in UTF-8 text
    chars = pl.Series([chr(c) for c in cps.tolist()], dtype=pl.String)
    alnum = np.zeros(0x110000, dtype=bool)
    alnum[cps] = chars.str.contains(r"^[\p{L}\p{N}]$").to_numpy()
    lows = chars.str.to_lowercase()
    one = (lows.str.len_chars() == 1).to_numpy()
    lower = np.arange(0x110000, dtype=np.int32)
    lower[cps[one]] = np.frombuffer("".join(lows.filter(one).to_list()).encode("utf-32-le"), dtype=np.uint32)
    lower[cps[~one]] = -1
    lower[list(_SPECIAL_LOWER)] = -1
    return alnum, lower


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_LEN_MULT = np.uint64(0xD6E8FEB86659FD93)


@numba.njit(inline="always")
def _mix_one(x: np.uint64) -> np.uint64:
    """``_mix`` of one value, in compiled code."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


@numba.njit(inline="always")
def _load(blocks: np.ndarray, at: int, n: int) -> np.uint64:
    """The ``n`` (at most 8) bytes from ``at`` on as a little-endian uint64, the rest zero: ``blocks`` is the bytes seen
    as uint64 at every byte offset (an unaligned view), so this is one load."""
    return blocks[at] & _LOW_BYTES[min(n, 8)]


_LOW7, _HIGH = np.uint64(0x7F7F7F7F7F7F7F7F), np.uint64(0x8080808080808080)
_TO_A, _PAST_Z, _S2 = np.uint64(0x3F3F3F3F3F3F3F3F), np.uint64(0x2525252525252525), np.uint64(2)


@numba.njit(inline="always")
def _ascii_lower(x: np.uint64) -> np.uint64:
    """The bytes A-Z of ``x`` lowercased, all at once: a byte's high bit marks it (>= 'A' and not > 'Z' and ASCII)."""
    low7 = x & _LOW7
    upper = (low7 + _TO_A) & ~(low7 + _PAST_Z) & ~x & _HIGH
    return x | (upper >> _S2)


@numba.njit(inline="always")
def _decode(data: np.ndarray, i: int) -> tuple[int, int]:
    """The code point of the UTF-8 character whose lead byte is at ``i`` (not ASCII), and its byte length."""
    b = data[i]
    if b >= 0xF0:
        return ((b & 0x07) << 18) | ((data[i + 1] & 0x3F) << 12) | ((data[i + 2] & 0x3F) << 6) | (data[i + 3] & 0x3F), 4
    if b >= 0xE0:
        return ((b & 0x0F) << 12) | ((data[i + 1] & 0x3F) << 6) | (data[i + 2] & 0x3F), 3
    return ((b & 0x1F) << 6) | (data[i + 1] & 0x3F), 2


@numba.njit(cache=True, nogil=True)
def _lower_pass(data: np.ndarray, offsets: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The texts that are not ASCII, lowercased one code point at a time through ``lower``, as UTF-8 bytes back to
    back, their offsets, which texts they are, and which of them hold a code point ``lower`` leaves to Polars (-1;
    their bytes here are incomplete)."""
    n = len(offsets) - 1
    docs = np.empty(n, dtype=np.int64)
    n_docs = size = 0
    for d in range(n):
        for i in range(offsets[d], offsets[d + 1]):
            if data[i] >= 0x80:
                docs[n_docs] = d
                n_docs += 1
                size += offsets[d + 1] - offsets[d]
                break
    docs = docs[:n_docs]
    out = np.empty(2 * size + 4, dtype=np.uint8)  # a lowercase is at most 1.5x the bytes
    out_off = np.zeros(len(docs) + 1, dtype=np.int64)
    special = np.zeros(len(docs), dtype=np.bool_)
    w = 0
    for k in range(len(docs)):
        i, end = offsets[docs[k]], offsets[docs[k] + 1]
        while i < end:
            b = data[i]
            if b < 0x80:
                out[w] = b | 0x20 if 0x41 <= b <= 0x5A else b
                w += 1
                i += 1
                continue
            cp, size = _decode(data, i)
            i += size
            m = lower[cp]
            if m < 0:
                special[k] = True
            elif m < 0x800:
                out[w], out[w + 1] = 0xC0 | (m >> 6), 0x80 | (m & 0x3F)
                w += 2
            elif m < 0x10000:
                out[w], out[w + 1], out[w + 2] = 0xE0 | (m >> 12), 0x80 | ((m >> 6) & 0x3F), 0x80 | (m & 0x3F)
                w += 3
            else:
                out[w], out[w + 1] = 0xF0 | (m >> 18), 0x80 | ((m >> 12) & 0x3F)
                out[w + 2], out[w + 3] = 0x80 | ((m >> 6) & 0x3F), 0x80 | (m & 0x3F)
                w += 4
        out_off[k + 1] = w
    return out[:w], out_off, docs, special


@numba.njit(cache=True, nogil=True)
def _word_pass(bufs: tuple, blocks: tuple, offs: tuple, src: np.ndarray, at: np.ndarray, alnum: np.ndarray,
               space_split: bool, key: np.uint64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the texts' UTF-8 bytes: every word's 64-bit hash, the per-text word offsets (n + 1), and the
    (index, source, start, end) of each word over ``_LONG_WORD`` bytes, whose hash the caller completes.

    Text ``d`` is the ``at[d]``-th text of source ``src[d]`` (``bufs``, their bytes seen as uint64 at every offset in
    ``blocks``, their offsets in ``offs``): source 0 holds ASCII texts, lowercased here, the others lowercased texts.
    A word is a maximal run of bytes that are letters, digits, or part of a non-ASCII character whose code point
    ``alnum`` marks (``space_split``: of bytes other than U+0020). Its hash reads its lowercased bytes 8 at a time,
    little-endian, each block folded in with a mix, then mixes in its length and ``key``.
    """
    n = len(src)
    total = 0
    for buf in bufs:
        total += len(buf)
    # A word and the byte after it: a text of L bytes holds at most (L + 1) / 2 words.
    hashes = np.empty((total + n) // 2 + n + 1, dtype=np.uint64)
    word_off = np.zeros(n + 1, dtype=np.int64)
    long_words = [0]  # (index, source, start, end) after this placeholder, which types the list
    n_words = 0
    for d in range(n):
        data, view, off = bufs[src[d]], blocks[src[d]], offs[src[d]]
        i, end, fold = off[at[d]], off[at[d] + 1], src[d] == 0
        start = -1
        while i <= end:
            step = 1
            if i == end:
                word = False
            elif space_split:
                word = data[i] != 0x20  # no multi-byte UTF-8 character contains the byte 0x20
            elif data[i] < 0x80:
                b = data[i]
                word = (0x61 <= (b | 0x20) <= 0x7A) or (0x30 <= b <= 0x39)
            else:  # a lead byte (Arrow strings are valid UTF-8); the character's continuation bytes follow it
                cp, step = _decode(data, i)
                word = alnum[cp]
            if word and start < 0:
                start = i
            elif not word and start >= 0:
                length = i - start
                if length > _LONG_WORD:
                    long_words.append(n_words)
                    long_words.append(src[d])
                    long_words.append(start)
                    long_words.append(i)
                    h = np.uint64(0)
                else:
                    h = _load(view, start, length)
                    if fold:
                        h = _ascii_lower(h)
                    k = 1
                    while length > 8 * k:
                        block = _load(view, start + 8 * k, length - 8 * k)
                        h = _mix_one(h) ^ (_ascii_lower(block) if fold else block)
                        k += 1
                hashes[n_words] = _mix_one(h ^ (np.uint64(length) * _LEN_MULT) ^ key)
                n_words += 1
                start = -1
            i += step
        word_off[d + 1] = n_words
    return hashes[:n_words].copy(), word_off, np.array(long_words[1:], dtype=np.int64).reshape(-1, 4)


def _blocks_of(data: np.ndarray) -> np.ndarray:
    """``data``'s bytes seen as a little-endian uint64 at every byte offset (a copy padded with 8 zero bytes, viewed
    unaligned): one load reads 8 bytes of a word."""
    # Two positions more than needed: NumPy calls a view of 0 or 1 elements contiguous, and the compiled loop takes
    # the three sources' views as one (non-contiguous) array type.
    padded = np.concatenate([data, np.zeros(10, dtype=np.uint8)])
    return np.ndarray(shape=(len(data) + 2,), dtype="<u8", buffer=padded, strides=(1,))


def _bytes_and_blocks(texts: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The texts' UTF-8 bytes back to back, ``_blocks_of`` them, and the n + 1 byte offsets."""
    data, offsets = _utf8_buffer(texts)
    return data, _blocks_of(data), offsets


def word_hashes(texts: pl.Series, split: str = "non_alnum", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of every lowercased text, flat, plus per-text offsets (n + 1).

    ``split="non_alnum"`` (near-dedup, decontamination): words are maximal runs of letters and digits.
    ``split="space"``: words are what ``str.split(" ")`` gives, empty strings dropped. Equal words
    hash equal; different words differ but for 64-bit collisions.
    """
    if split not in ("non_alnum", "space"):
        raise ValueError(f"split must be 'non_alnum' or 'space', got {split!r}")
    if texts.dtype != pl.String:
        texts = texts.cast(pl.String)
    if texts.null_count():
        texts = texts.fill_null("")
    # ASCII texts are lowercased as their words are hashed, the others a code point at a time through the table of
    # Polars' own case mapping; Polars lowercases the few the table cannot (final sigma). No text is copied whole.
    alnum, lower = _char_tables()
    raw, raw_blocks, raw_off = _bytes_and_blocks(texts)
    src = np.zeros(len(texts), dtype=np.int64)
    at = np.arange(len(texts), dtype=np.int64)
    low, low_off, non_ascii, special = _lower_pass(raw, raw_off, lower)
    src[non_ascii], at[non_ascii] = 1, np.arange(len(non_ascii))
    special = non_ascii[special]
    by_polars = pl.Series([], dtype=pl.String)
    if len(special):  # Lazy: collect() releases the GIL, so blocks sketched on several threads lowercase in parallel.
        by_polars = pl.LazyFrame({"t": texts.gather(special)}).select(pl.col("t").str.to_lowercase()).collect()["t"]
        src[special], at[special] = 2, np.arange(len(special))
    sources = [(raw, raw_blocks, raw_off), (low, _blocks_of(low), low_off), _bytes_and_blocks(by_polars)]
    for data, _, _ in sources:  # one array type for the three (Arrow's buffers are read-only): one compiled loop
        data.setflags(write=False)
    key = _seed_key(seed, 1)
    hashes, word_off, long_words = _word_pass(tuple(b for b, _, _ in sources), tuple(v for _, v, _ in sources),
                                              tuple(o for _, _, o in sources), src, at, alnum, split == "space", key)
    for i, source, a, b in long_words.tolist():  # words over _LONG_WORD bytes (long tokens, base64): blake2b, rare
        word = sources[source][0][a:b].tobytes()
        h = np.uint64(int.from_bytes(hashlib.blake2b(word.lower() if source == 0 else word, digest_size=8).digest(), "little"))
        with np.errstate(over="ignore"):
            hashes[i] = _mix(np.array([h ^ (np.uint64(b - a) * _LEN_MULT) ^ key], dtype=np.uint64))[0]
    return hashes, word_off


@numba.njit(cache=True, nogil=True)
def _shingle_pass(words: np.ndarray, word_off: np.ndarray, ngram: int, mults: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every text's word ``ngram``-shingles from its word hashes (position-weighted sums), and per-text offsets; a text
    of fewer words gives one shingle of all of them, a text of none gives none."""
    n = len(word_off) - 1
    offsets = np.zeros(n + 1, dtype=np.int64)
    for d in range(n):
        c = word_off[d + 1] - word_off[d]
        offsets[d + 1] = offsets[d] + (c - ngram + 1 if c >= ngram else min(c, 1))
    out = np.empty(offsets[n], dtype=np.uint64)
    for d in range(n):
        first, c, at = word_off[d], word_off[d + 1] - word_off[d], offsets[d]
        for k in range(offsets[d + 1] - at):
            h = np.uint64(0)
            for j in range(min(ngram, c)):
                h += words[first + k + j] * mults[j]
            out[at + k] = h
    return out, offsets


def shingle_hashes(texts: pl.Series, ngram: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word ``ngram``-shingle of every text, flat, plus per-document offsets.

    Texts are lowercased and split into words at every run of characters that are not letters or
    digits (whitespace of any kind and punctuation included). A text with fewer than ``ngram`` words
    yields one shingle of all its words; an empty text yields none.
    """
    if not 1 <= ngram <= len(_MULTS):
        raise ValueError(f"ngram must be between 1 and {len(_MULTS)}, got {ngram}")
    words, word_off = word_hashes(texts, seed=seed)
    return _shingle_pass(words, word_off, ngram, _MULTS)


def _probe(bins: np.ndarray, attempt: np.ndarray | int, bits: int, seed: int) -> np.ndarray:
    """The attempt-th bin that an empty bin borrows from (same for every document): a hash of (bin, attempt)."""
    with np.errstate(over="ignore"):
        x = bins.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(attempt, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        return (_mix(x ^ _seed_key(seed, 3)) >> np.uint64(64 - bits)).astype(np.int64)


@functools.cache
def _probe_sequences(bits: int, seed: int) -> np.ndarray:
    """``table[j, a - 1]``: the bin that empty bin ``j`` borrows from at attempt ``a`` (1 to ``_MAX_PROBES``), int16
    (1 MB for 128 bins)."""
    bins = np.arange(1 << bits)[:, None]
    return _probe(bins, np.arange(1, _MAX_PROBES + 1)[None, :], bits, seed).astype(np.int16)


@numba.njit(cache=True, nogil=True)
def _minhash_pass(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, bits: int, key: np.uint64,
                  probes: np.ndarray) -> np.ndarray:
    """Per document: each shingle, mixed once, keeps its low 32 bits in the bin its top bits pick if smaller; an empty
    bin takes the value of the first filled bin along its probe sequence (``probes``, the same for every document)."""
    n = len(offsets) - 1
    out = np.full((n, num_perm), _EMPTY, dtype=np.uint32)
    sig = np.empty(num_perm, dtype=np.uint32)
    shift = np.uint64(64 - bits)
    for d in range(n):
        if offsets[d + 1] == offsets[d]:
            continue
        sig[:] = _EMPTY
        for s in range(offsets[d], offsets[d + 1]):
            h = _mix_one(shingles[s] ^ key)
            v = np.uint32(min(h & np.uint64(0xFFFFFFFF), np.uint64(0xFFFFFFFE)))
            b = h >> shift
            sig[b] = min(sig[b], v)
        for j in range(num_perm):
            if sig[j] != _EMPTY:
                out[d, j] = sig[j]
                continue
            found = False
            for a in range(probes.shape[1]):  # the first filled bin along j's probe sequence
                src = probes[j, a]
                if sig[src] != _EMPTY:
                    out[d, j] = sig[src]
                    found = True
                    break
            if not found:  # never seen in practice: the next filled bin to the right
                for t in range(1, num_perm):
                    if sig[(j + t) % num_perm] != _EMPTY:
                        out[d, j] = sig[(j + t) % num_perm]
                        break
    return out


def minhash_signatures(shingles: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """(n_docs, num_perm) uint32 sketches: one-permutation hashing with optimal densification.

    A document without shingles gets an all-empty sketch (every value 0xFFFFFFFF).
    """
    if num_perm < 2 or num_perm & (num_perm - 1):
        raise ValueError(f"num_perm must be a power of two >= 2 (bins are picked by the top bits), got {num_perm}")
    bits = num_perm.bit_length() - 1
    return _minhash_pass(shingles, np.asarray(offsets, dtype=np.int64), num_perm, bits, _seed_key(seed, 2),
                         _probe_sequences(bits, seed))


_BAND_MULT = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True)
def _band_pass(sig: np.ndarray, bands: int) -> np.ndarray:
    """Band b's key: starting from (b + 1) * _BAND_MULT, each of its sketch values in turn xor-ed in with its row
    number (1..rows) and mixed."""
    n, rows = sig.shape[0], sig.shape[1] // bands
    out = np.empty((n, bands), dtype=np.uint64)
    for d in range(n):
        for b in range(bands):
            key = np.uint64(b + 1) * _BAND_MULT
            for r in range(rows):
                key = _mix_one(key ^ np.uint64(sig[d, b * rows + r]) ^ np.uint64(r + 1))
            out[d, b] = key
    return out


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """(n_docs, bands) uint64 LSH keys: band b hashes sketch columns [b * rows, (b + 1) * rows)."""
    k = sig.shape[1]
    if k % bands:
        raise ValueError(f"bands ({bands}) must divide num_perm ({k})")
    return _band_pass(np.ascontiguousarray(sig), bands)


# Peak bytes per (key, doc) entry while its partition is paired, measured with the NumPy pairing the compiled walk
# replaced: the entry (16), the sort order (8), the sorted copies (16), the group heads (8), masks and the pair codes,
# and what the allocators keep of them (3M rows in 8 partitions raised the peak by 0.66 GiB for a 384 MiB budget; in
# 16, by 0.17 GiB). The walk holds only the entry, the order and the codes, so the figure now errs on the safe side.
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


@numba.njit(cache=True, nogil=True)
def _star_codes(key: np.ndarray, doc: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """Walking the entries in key order: in each group of equal keys, ``head * n + doc`` for its smallest document
    (the head) with each other one."""
    codes = np.empty(len(order), dtype=np.int64)
    w, a = 0, 0
    while a < len(order):
        b, head = a + 1, doc[order[a]]
        while b < len(order) and key[order[b]] == key[order[a]]:
            head = min(head, doc[order[b]])
            b += 1
        if b - a > 1:
            for t in range(a, b):
                if doc[order[t]] != head:
                    codes[w] = head * n + doc[order[t]]
                    w += 1
        a = b
    return codes[:w]


def pairs_in_partition(key: np.ndarray, doc: np.ndarray, n: int) -> np.ndarray:
    """Candidate pairs among entries that hold every copy of their keys, as sorted unique codes ``head * n + doc``:
    in each group of equal keys, its smallest document with each other one."""
    if len(key) < 2:
        return np.zeros(0, dtype=np.int64)
    order = pl.Series(key).arg_sort().to_numpy()  # Polars' sort is multi-threaded
    # head-major codes: np.unique sorts them by (head, doc) and drops a pair found in several bands.
    return np.unique(_star_codes(key, np.asarray(doc, dtype=np.int64), order, n))


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
    sets.add(shingles, offsets)
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


def _sketch_block(texts: pl.Series, ngram: int, num_perm: int, bands: int, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Band keys of one block of texts, which of them have at least one shingle, and the shingles (values, offsets)."""
    shingles, offsets = shingle_hashes(texts, ngram, seed)
    sig = minhash_signatures(shingles, offsets, num_perm, seed)
    return band_keys(sig, bands), np.diff(offsets) > 0, (shingles, offsets)


def _sketch(
    texts: pl.Series, ngram: int, num_perm: int, bands: int, seed: int, block_docs: int, workers: int, keep_bytes: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``sketch``, plus every document's shingles (values, offsets) while they total at most ``keep_bytes``, else None."""
    n = len(texts)
    if num_perm % bands:
        raise ValueError(f"bands ({bands}) must divide num_perm ({num_perm})")
    keys = np.zeros((n, bands), dtype=np.uint64)
    has = np.zeros(n, dtype=bool)
    spans = [(a, min(a + block_docs, n)) for a in range(0, n, block_docs)]

    def run(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        return _sketch_block(texts.slice(span[0], span[1] - span[0]), ngram, num_perm, bands, seed)

    kept: list[tuple[np.ndarray, np.ndarray]] | None = [] if keep_bytes > 0 else None
    held = 0
    with ThreadPoolExecutor(workers) if workers > 1 and len(spans) > 1 else contextlib.nullcontext() as pool:
        for (a, b), (k, h, sets) in zip(spans, pool.map(run, spans) if pool else map(run, spans)):
            keys[a:b], has[a:b] = k, h
            held += sets[0].nbytes
            if kept is not None and held <= keep_bytes:
                kept.append(sets)
            else:
                kept = None
    return keys, has, None if kept is None else join_shingles(kept)


def join_shingles(blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive blocks' shingles (values, offsets) as those of all their documents in order."""
    values = np.concatenate([v for v, _ in blocks]) if blocks else np.zeros(0, dtype=np.uint64)
    starts = np.cumsum([0] + [o[-1] for _, o in blocks])
    return values, np.concatenate([[0], *(o[1:] + base for (_, o), base in zip(blocks, starts))]).astype(np.int64)


def sketch(
    texts: pl.Series, ngram: int = 5, num_perm: int = 128, bands: int = 16, seed: int = 0, block_docs: int = 8192, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Band keys (n x ``bands``, uint64) of each text, and whether it has any shingle.

    Row-local, so curation computes it per shard and its global step holds only these keys. Documents
    are sketched in blocks of ``block_docs``, on ``workers`` threads if more than one; the result does
    not depend on either. One thread is the default: on the shared 2-core machines this was measured
    on, a second thread gave no speed-up (see docs/benchmarks.md).
    """
    keys, has, _ = _sketch(texts, ngram, num_perm, bands, seed, block_docs, workers)
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
    shingles: tuple[np.ndarray, np.ndarray] | None = None,
) -> NearDupResult:
    """Candidates from shared band keys, verified by exact Jaccard, resolved into clusters (``verify_pairs``)."""
    n, bands = keys.shape
    return verify_pairs(n, candidates_from_keys(keys, has), texts_of, threshold, ngram, num_perm, bands, seed, block_docs,
                        shingles=shingles)


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
    shingles: tuple[np.ndarray, np.ndarray] | None = None,
) -> NearDupResult:
    """Candidate pairs of ``n`` documents verified by exact Jaccard, resolved into clusters.

    With ``shingles`` (every document's shingle hashes and offsets, kept from the sketch) the sets are taken from
    there. Else ``texts_of(indices)`` returns the texts of those documents (ascending, in that order); it is called
    for the documents of candidate pairs only, ``block_docs`` at a time, so the caller never needs every text in
    memory. Each document's shingles are kept in memory, or in a file under ``scratch`` when those of all candidate
    documents would pass ``budget_bytes``: the pairs then read their two documents' shingles back one pair at a time.
    """
    rows = num_perm // bands
    sims = np.zeros(0)
    if len(pairs) and shingles is not None:
        sims = _jaccard_pairs(shingles[0], shingles[1], np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    elif len(pairs):
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


@numba.njit(cache=True, nogil=True)
def _jaccard_hashed(a: np.ndarray, b: np.ndarray, slots: np.ndarray, seen: np.ndarray, used: np.ndarray) -> float:
    """Jaccard of the sets of values in ``a`` and ``b`` (repeats allowed; two empty sets: 1.0), through one
    open-addressing table (``slots``/``seen``, a power of two of at least twice ``len(a) + len(b)`` entries, ``seen``
    all zero on entry and on return; ``used`` notes the slots taken, to empty them): no sort."""
    mask = np.uint64(len(slots) - 1)
    n_used = in_a = in_b = both = 0
    for side in range(2):
        values, bit = (a, 1) if side == 0 else (b, 2)
        for v in values:
            at = _mix_one(v) & mask
            while seen[at] != 0 and slots[at] != v:
                at = (at + np.uint64(1)) & mask
            if seen[at] == 0:
                slots[at] = v
                used[n_used] = at
                n_used += 1
            if not seen[at] & bit:
                seen[at] |= bit
                if bit == 1:
                    in_a += 1
                else:
                    in_b += 1
                    if seen[at] & 1:
                        both += 1
    for t in range(n_used):  # the table empty again for the next pair
        seen[used[t]] = 0
    union = in_a + in_b - both
    return both / union if union else 1.0


@numba.njit(cache=True, nogil=True)
def _table_for(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_jaccard_hashed``'s table and notes for pairs of at most ``n`` values together."""
    size = 16
    while size < 2 * n:
        size *= 2
    return np.empty(size, dtype=np.uint64), np.zeros(size, dtype=np.uint8), np.empty(n, dtype=np.uint64)


@numba.njit(cache=True, nogil=True)
def _jaccard_pairs(values: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    out = np.empty(len(pairs))
    largest = 0
    for k in range(len(pairs)):
        i, j = pairs[k, 0], pairs[k, 1]
        largest = max(largest, offsets[i + 1] - offsets[i] + offsets[j + 1] - offsets[j])
    slots, seen, used = _table_for(largest)
    for k in range(len(pairs)):
        i, j = pairs[k, 0], pairs[k, 1]
        out[k] = _jaccard_hashed(values[offsets[i]:offsets[i + 1]], values[offsets[j]:offsets[j + 1]], slots, seen, used)
    return out


class _ShingleSets:
    """The shingle hashes of documents added block by block, in memory or appended to ``path``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.sizes: list[np.ndarray] = []
        self.parts: list[np.ndarray] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb+") if path is not None else None  # noqa: SIM115 - closed by close()

    def add(self, shingles: np.ndarray, offsets: np.ndarray) -> None:
        """Add the documents whose shingles are ``shingles[offsets[d]:offsets[d + 1]]``."""
        offsets = np.asarray(offsets, dtype=np.int64)
        values = shingles[offsets[0]:offsets[-1]]
        self.sizes.append(np.diff(offsets))
        if self.file is not None:
            self.file.write(values.tobytes())
        else:
            self.parts.append(values)

    def jaccard(self, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard of each pair of (added-order) documents' sets (two empty sets: 1.0)."""
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if self.file is None:
            values = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.uint64)
            self.parts = [values]
            return _jaccard_pairs(values, offsets, pairs)
        self.file.flush()
        fd = self.file.fileno()
        get = lambda d: np.frombuffer(os.pread(fd, int(8 * sizes[d]), int(8 * offsets[d])), dtype=np.uint64)
        out = np.empty(len(pairs))
        for k, (i, j) in enumerate(pairs.tolist()):
            a, b = get(i), get(j)
            out[k] = _jaccard_hashed(a, b, *_table_for(len(a) + len(b)))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            assert self.path is not None
            self.path.unlink()


def near_duplicates(
    texts: pl.Series,
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    bands: int = 16,
    seed: int = 0,
    block_docs: int = 8192,
    workers: int = 1,
    budget_bytes: int = 1 << 30,
) -> NearDupResult:
    """Find near-duplicates among ``texts`` (Jaccard of word n-gram sets >= ``threshold``): ``sketch``, then ``resolve``.

    The shingle hashes the sketch computed are kept for verification while they total at most ``budget_bytes``
    (8 bytes a shingle: ~0.75 KB for a 100-word document); beyond it, the candidate documents are shingled again
    from their text, as curation's global step does. The result is the same either way.
    """
    keys, has, kept = _sketch(texts, ngram, num_perm, bands, seed, block_docs, workers, budget_bytes)
    return resolve(keys, has, texts.gather, threshold, ngram, num_perm, seed, block_docs, shingles=kept)
