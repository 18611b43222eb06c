"""Decontamination: find training conversations that share a word n-gram with an evaluation item.

Eval items and conversations are shingled with the same vectorized hashing as near-dedup
(lowercased, punctuation-stripped word n-grams); an item shorter than ``ngram`` words is one
shingle of all its words. A conversation matches if any of its shingles is an eval shingle; the
first matching eval set and item are reported.
"""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from sft_engine.config import DecontamConfig, EvalSetConfig
from sft_engine.curation.near_dedup import shingle_hashes
from sft_engine.curation.read import SourceError, read_objects
from sft_engine.evaluation.registry import builtin_texts, suite_from_view


def eval_items(es: EvalSetConfig) -> list[str]:
    """The text of every item of one eval set: a built-in set's or an evaluation suite's as the suite says, a file's
    configured fields present, joined."""
    if es.builtin is not None:
        return builtin_texts(es.builtin)
    if es.suite is not None:
        return suite_from_view(es.suite).decontam_sets()[es.name]()
    assert es.path is not None
    rows = read_objects(es.path, f"eval set '{es.name}'")
    if not rows:
        raise SourceError(f"eval set '{es.name}': '{es.path}' holds no items")
    return [" ".join(str(r[f]) for f in es.fields if isinstance(r, dict) and r.get(f) not in (None, "")) for r in rows]


def _fold(s: pl.Series) -> pl.Series:
    """Case and whitespace folded, punctuation kept (so '37 + 45' never matches '37 - 45')."""
    return s.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


@dataclass(frozen=True)
class _EvalIndex:
    """One eval set, ready to match: its short items (folded text -> item), and its long items' n-gram
    hashes sorted, with the item of each, plus the distinct hashes for the membership test."""

    short: dict[str, int]
    sorted_hashes: np.ndarray
    item_of_sorted: np.ndarray
    distinct: pl.Series


def _files_stamp(es: EvalSetConfig) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of an eval set's files: part of the cache key, so a long-lived process (a served
    deployment) sees an edited eval file."""
    path = es.path if es.suite is None else es.suite["path"]
    if path is None:
        return ()
    return tuple((p, (st := Path(p).stat()).st_size, st.st_mtime_ns) for p in sorted(glob.glob(path)))


@functools.lru_cache(maxsize=64)
def _eval_index(es_json: str, ngram: int, seed: int, stamp: tuple[tuple[str, int, int], ...]) -> _EvalIndex:
    """Built once per process and eval set, not once per shard (a 1M-row run has dozens of shards)."""
    items = eval_items(EvalSetConfig.model_validate_json(es_json))
    n_words = [len(t.split()) for t in items]
    folded = _fold(pl.Series(items, dtype=pl.String)).to_list()
    short = {f: i for i, f in reversed(list(enumerate(folded))) if n_words[i] < ngram and f}
    long_items = [t if n_words[i] >= ngram else "" for i, t in enumerate(items)]
    ev_sh, ev_off = shingle_hashes(pl.Series(long_items, dtype=pl.String), ngram, seed)
    item_of = np.repeat(np.arange(len(items)), np.diff(ev_off))
    order = np.argsort(ev_sh, kind="stable")
    return _EvalIndex(short, ev_sh[order], item_of[order], pl.Series(ev_sh).unique())


def find_contamination(texts: pl.Series, cfg: DecontamConfig, seed: int = 0) -> list[str | None]:
    """Per text, 'set:item' of the first eval item it overlaps, or None.

    Items of at least ``ngram`` words match through a shared word n-gram; shorter items match when
    the whole item occurs in the text (Aho-Corasick over all short items at once).
    """
    out: list[str | None] = [None] * len(texts)
    if not cfg.eval_sets or len(texts) == 0:
        return out
    doc_sh, doc_off = shingle_hashes(texts, cfg.ngram, seed)
    doc_of = np.repeat(np.arange(len(texts)), np.diff(doc_off))
    folded = _fold(texts)
    doc_hashes = pl.Series(doc_sh)
    for es in cfg.eval_sets:
        index = _eval_index(es.model_dump_json(), cfg.ngram, seed, _files_stamp(es))
        if index.short:
            found = folded.str.extract_many(list(index.short), overlapping=False)
            for d, matches in enumerate(found.to_list()):
                if out[d] is None and matches:
                    out[d] = f"{es.name}:{index.short[matches[0]]}"
        if len(index.sorted_hashes) == 0:
            continue
        # A hash-set membership test first (Polars' is_in); the binary search that names the item runs
        # only on the few shingles that hit. 10x faster than searching every document shingle.
        cand = np.flatnonzero(doc_hashes.is_in(index.distinct).to_numpy())
        pos = np.searchsorted(index.sorted_hashes, doc_sh[cand])
        for shingle_idx, p in zip(cand.tolist(), pos.tolist(), strict=True):
            d = int(doc_of[shingle_idx])
            if out[d] is None:
                out[d] = f"{es.name}:{int(index.item_of_sorted[p])}"
    return out
