"""Exact and near dedup across every source, and the held-out split.

Each unit stores the row-local halves (``with_dedup_keys``): a blake2b-128 of the folded conversation text and
its tools (exact dedup), the split bucket (a seeded Polars hash of the folded text), and the near-dedup band
keys of rows still alive. The global step (``dedup_and_split``) holds the keys, drop reasons, hash and bucket (~28 bytes
a row in the stage's compact types), never the corpus: band keys come chunk by chunk from ``bands_of`` and are paired in memory or, beyond
``curate.memory_budget``, by hash partition through scratch files (``band_partitions``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from sft_engine.config import memory_bytes
from sft_engine.curation.near_dedup import candidate_pairs, key_partition, partition_bits, sketch, verify_pairs
from sft_engine.curation.schema import KEY

if TYPE_CHECKING:
    from sft_engine.config import CurateConfig


def with_dedup_keys(df: pl.DataFrame, cfg: CurateConfig, seed: int = 0) -> pl.DataFrame:
    """Add ``_dedup_hash``, ``_split_bucket`` and (near-dedup on) ``_bands`` / ``_has_shingles`` from ``norm_text``.

    Tools count for exact dedup (the same chat against other functions teaches something else) but not for
    near-dedup: rows of one tool-calling dataset share long schemas, which would make every pair look alike.
    """
    tools = df["tools"].list.join("\n").to_list() if "tools" in df.columns else [None] * df.height
    digests = [
        None if t is None else hashlib.blake2b((t if tl is None else f"{t}\ntools: {tl}").encode(), digest_size=16).digest()
        for t, tl in zip(df["norm_text"].to_list(), tools, strict=True)
    ]
    df = df.with_columns(
        _dedup_hash=pl.Series(digests, dtype=pl.Binary),
        # Seeded, by content: the same rows stay held out whatever the mix.
        _split_bucket=(pl.col("norm_text").hash(seed=seed) % 10_000).cast(pl.UInt16),
    )
    nd = cfg.near_dedup
    if not nd.enabled:
        return df
    alive = np.flatnonzero(df["drop_reason"].is_null().to_numpy())
    keys, has = sketch(df["norm_text"].gather(alive), nd.ngram, nd.num_perm, nd.bands, seed)
    bands = np.zeros((df.height, nd.bands), dtype=np.uint64)
    bands[alive] = keys
    has_all = np.zeros(df.height, dtype=bool)
    has_all[alive] = has
    return df.with_columns(_bands=pl.Series(bands, dtype=pl.Array(pl.UInt64, nd.bands)), _has_shingles=pl.Series(has_all))


# Key rows spilled at a time by band_partitions (~5 arrays of rows x bands x 8 bytes while they are split).
SPILL_ROWS = 16_384


def band_partitions(
    chunks: Iterable[np.ndarray], docs: np.ndarray, bits: int, scratch: Path | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The band keys of ``docs`` (``chunks``: their (k, bands) key rows, in order) as ``(key, doc)`` partitions by the
    keys' top ``bits`` (``near_dedup.key_partition``), documents ascending within each: in memory when ``bits`` is 0,
    else spilled chunk by chunk to one pair of files per partition under ``scratch`` and read back one at a time."""
    if not bits:
        keys = np.concatenate(list(chunks)) if len(docs) else np.zeros((0, 1), dtype=np.uint64)
        yield keys.ravel(), np.repeat(docs, keys.shape[1])
        return
    assert scratch is not None, "partitioned pairing needs a scratch folder"
    scratch.mkdir(parents=True, exist_ok=True)
    start = 0
    # A few thousand rows at a time: a chunk is a whole unit's key rows, and units grow with the corpus.
    pieces = (chunk[i:i + SPILL_ROWS] for chunk in chunks for i in range(0, len(chunk), SPILL_ROWS))
    for piece in pieces:
        flat = piece.ravel()
        doc = np.repeat(docs[start:start + len(piece)], piece.shape[1])
        start += len(piece)
        part = key_partition(flat, bits)
        order = np.argsort(part, kind="stable")  # keeps each partition's entries in document order
        bounds = np.searchsorted(part[order], np.arange(2**bits + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            sel = order[bounds[p]:bounds[p + 1]]
            with open(scratch / f"{p:04d}.key", "ab") as fk, open(scratch / f"{p:04d}.doc", "ab") as fd:
                fk.write(flat[sel].tobytes())
                fd.write(doc[sel].tobytes())
    for p in range(2**bits):
        key_file, doc_file = scratch / f"{p:04d}.key", scratch / f"{p:04d}.doc"
        if key_file.exists():
            yield np.fromfile(key_file, dtype=np.uint64), np.fromfile(doc_file, dtype=np.int64)
            key_file.unlink()
            doc_file.unlink()


def _near_dedup(
    df: pl.DataFrame,
    cfg: CurateConfig,
    seed: int,
    texts_of: Callable[[np.ndarray], pl.Series],
    bands_of: Callable[[np.ndarray], Iterable[np.ndarray]],
    scratch: Path | None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Mark near-duplicates among surviving rows as ``dedup_near``, with ``dup_of`` = 'source:row' of the kept row.

    Works from the stored band keys, ``bands_of(positions)`` (positions in ``df``, ascending: their key rows, in
    chunks), paired in memory or, beyond ``curate.memory_budget``, partition by partition through ``scratch``.
    ``texts_of(positions)`` gives the folded text of rows and is asked only for rows in a candidate pair.
    """
    nd = cfg.near_dedup
    alive = np.flatnonzero(df["drop_reason"].is_null().to_numpy())
    # Rows without a shingle (empty text) match nothing: they are left out of the pairing.
    docs = np.flatnonzero(df["_has_shingles"].gather(alive).to_numpy())
    budget = memory_bytes(cfg.memory_budget)
    bits = partition_bits(len(docs) * nd.bands, budget)
    pairs = candidate_pairs(band_partitions(bands_of(alive[docs]), docs, bits, scratch), len(alive))
    # Blocks of 2,048 candidate texts: the shingling of a block is verification's high-water mark (8,192 a block
    # added ~0.45 GiB at 1M and 3M rows, 2,048 ~0.28 GiB, in the same time).
    res = verify_pairs(len(alive), pairs, lambda local: texts_of(alive[local]), nd.threshold, nd.ngram, nd.num_perm, nd.bands, seed,
                       block_docs=2048, budget_bytes=budget, scratch=scratch)
    head = res.duplicate_of
    dup_pos, of_pos = alive[head >= 0], alive[head[head >= 0]]
    labels = df.select(KEY).gather(of_pos).select(pl.col("source").cast(pl.String) + ":" + pl.col("row").cast(pl.String)).to_series()
    if len(dup_pos):
        # Scattered into the few rows that are near-dups (dup_of is all null until here): whole-column expressions
        # made three more string columns of every row at the global step's high-water mark.
        df = df.with_columns(
            drop_reason=df["drop_reason"].clone().scatter(dup_pos, "dedup_near"),
            dup_of=pl.repeat(None, df.height, dtype=pl.String, eager=True).scatter(dup_pos, labels),
        )
    info = {
        "candidates": res.candidates,
        "verified_pairs": res.verified,
        "lsh_threshold": res.lsh_threshold,
        # P(a pair at exactly the threshold becomes a candidate); the decision itself is exact Jaccard >= threshold.
        "lsh_recall_at_threshold": res.recall_at_threshold,
        "threshold": nd.threshold,
        "cluster_sizes": res.cluster_sizes,
    }
    return df, info


def dedup_and_split(
    df: pl.DataFrame,
    cfg: CurateConfig,
    seed: int = 0,
    texts_of: Callable[[np.ndarray], pl.Series] | None = None,
    bands_of: Callable[[np.ndarray], Iterable[np.ndarray]] | None = None,
    scratch: Path | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Global steps over all checked rows: exact and near dedup, then the held-out split.

    ``df`` needs the marks and ``with_dedup_keys``' columns, not the text: ``texts_of(positions)`` supplies
    the folded text of the few rows near-dedup verifies (default: ``df['norm_text']``), ``bands_of(positions)``
    their band keys (default: ``df['_bands']``), and ``scratch`` is where band keys spill beyond
    ``curate.memory_budget``. Returns every input row, in order, with ``drop_reason`` (null = kept), ``dup_of`` and
    ``split`` ('train'/'heldout'), plus the near-dedup report.
    """
    if texts_of is None:
        texts_of = df["norm_text"].gather
    if bands_of is None:
        bands = cfg.near_dedup.bands
        bands_of = lambda positions: [df["_bands"].gather(positions).to_numpy().reshape(len(positions), bands)]
    if cfg.dedup:
        # Among surviving rows only, in (source, row) order: the first copy of each text wins.
        alive = np.flatnonzero(df["drop_reason"].is_null().to_numpy())
        later = alive[~df["_dedup_hash"].gather(alive).is_first_distinct().to_numpy()]
        df = df.with_columns(df["drop_reason"].clone().scatter(later, "dedup_exact"))
    df = df.with_columns(dup_of=pl.lit(None, dtype=pl.String))
    near_info: dict[str, Any] = {}
    if cfg.near_dedup.enabled:
        df, near_info = _near_dedup(df, cfg, seed, texts_of, bands_of, scratch)
    threshold = int(cfg.heldout_fraction * 10_000)
    # Split by content hash, seeded: fixed whatever the mix, so held-out items never move into training.
    df = df.with_columns(split=pl.when(pl.col("_split_bucket") < threshold).then(pl.lit("heldout")).otherwise(pl.lit("train")))
    return df, near_info
