"""Best-fit decreasing packing of tokenized samples into rows of ``max_seq_len`` tokens.

Layout of one packed row (``max_seq_len`` = 12, three samples, two pad slots)::

    input_ids     a0 a1 a2 a3 | b0 b1 b2 | c0 c1 c2 | p  p
    position_ids   0  1  2  3 |  0  1  2 |  0  1  2 | 0  1
    labels         -  x  x  x |  -  -  x |  -  x  x | -  -      (- = IGNORE_INDEX)
    seq_lens      [4, 3, 3, 2]                        (padding is its own segment)

    block-causal attention: each token sees only earlier tokens of its own segment
        a: ■□□□□□□□□□□□    b: ....■□□....    c: .......■□□..
           ■■□□                  ■■□                ■■□
           ■■■□                  ■■■                ■■■
           ■■■■

Position ids restart at 0 for every sample; the model derives the block-diagonal mask from them
(FlashAttention varlen on GPU, SDPA with a block mask on CPU), so samples never attend to each other.
Each sample's first label is ignored, so nothing learns to predict across a boundary.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from sft_engine.constants import IGNORE_INDEX


@dataclass
class PackResult:
    """Bins as lists of sample indices, and what happened to over-long samples."""

    bins: list[list[int]]
    truncated: list[int]
    dropped: list[int]


def best_fit_decreasing(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity``: longest first, each into the fullest bin it fits.

    O(n log C): open bins are indexed by remaining capacity in a sorted list of the distinct
    capacities (at most C + 1 of them), so each placement is one bisect. Ties go to the bin
    opened first, which makes the result deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > capacity).any() or (lengths <= 0).any():
        raise ValueError(f"every length must be in 1..{capacity}; truncate or drop longer samples first")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free_caps: list[int] = []  # sorted distinct remaining capacities with at least one open bin
    by_cap: dict[int, deque[int]] = {}  # remaining capacity -> open bin ids (FIFO)
    for item in order.tolist():
        need = int(lengths[item])
        pos = bisect.bisect_left(free_caps, need)
        if pos < len(free_caps):
            cap = free_caps[pos]
            queue = by_cap[cap]
            b = queue.popleft()
            if not queue:
                del by_cap[cap]
                free_caps.pop(pos)
        else:
            b, cap = len(bins), capacity
            bins.append([])
        bins[b].append(item)
        rest = cap - need
        if rest > 0:
            if rest not in by_cap:
                by_cap[rest] = deque()
                bisect.insort(free_caps, rest)
            by_cap[rest].append(b)
    return bins


def plan_packing(lengths: list[int], max_seq_len: int, overlong: str = "drop") -> PackResult:
    """Decide truncation/dropping of over-long samples, then pack with best-fit decreasing."""
    truncated = [i for i, n in enumerate(lengths) if n > max_seq_len and overlong == "truncate"]
    dropped = [i for i, n in enumerate(lengths) if n > max_seq_len and overlong == "drop"]
    keep = [i for i, n in enumerate(lengths) if n <= max_seq_len or overlong == "truncate"]
    fitted = [min(lengths[i], max_seq_len) for i in keep]
    bins = best_fit_decreasing(fitted, max_seq_len) if keep else []
    return PackResult([[keep[j] for j in b] for b in bins], truncated, dropped)


def pack_rows(
    input_ids: list[np.ndarray], labels: list[np.ndarray], bins: list[list[int]], max_seq_len: int, pad_id: int,
    weights: list[np.ndarray | None] | None = None,
) -> dict[str, list[Any]]:
    """Materialize packed rows: concatenated ids/labels padded to ``max_seq_len``, ``seq_lens`` and ``num_pad``;
    with per-sample token ``weights`` (None: all 1), a row holding a weighted sample gets a ``weights`` array (else None).

    Samples longer than ``max_seq_len`` (only present when truncation was chosen) are cut at the end.
    """
    rows_ids, rows_labels, rows_lens, rows_pad, rows_w = [], [], [], [], []
    for b in bins:
        ids = [input_ids[i][:max_seq_len] for i in b]
        labs = [labels[i][:max_seq_len] for i in b]
        lens = [len(x) for x in ids]
        used = sum(lens)
        pad = max_seq_len - used
        if pad:
            ids.append(np.full(pad, pad_id, dtype=np.int64))
            labs.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            lens.append(pad)
        rows_ids.append(np.concatenate(ids).astype(np.int32))
        row_labels = np.concatenate(labs).astype(np.int32)
        starts = np.cumsum([0] + lens[:-1])
        row_labels[starts] = IGNORE_INDEX
        rows_labels.append(row_labels)
        rows_lens.append(np.asarray(lens, dtype=np.int32))
        rows_pad.append(pad)
        if weights is not None and any(weights[i] is not None for i in b):
            parts = [(weights[i] if weights[i] is not None else np.ones(len(input_ids[i]), np.float32))[:max_seq_len] for i in b]
            rows_w.append(np.concatenate([*parts, np.zeros(pad, np.float32)]).astype(np.float32))
        else:
            rows_w.append(None)
    return {"input_ids": rows_ids, "labels": rows_labels, "seq_lens": rows_lens, "num_pad": rows_pad, "weights": rows_w}


def position_ids_from_lens(seq_lens: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 for each segment: [3, 2] -> [0, 1, 2, 0, 1]."""
    total = int(np.sum(seq_lens))
    starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
    return np.arange(total, dtype=np.int64) - starts


def cu_seqlens(seq_lens: np.ndarray) -> np.ndarray:
    """Cumulative boundaries as FlashAttention varlen expects: [3, 2] -> [0, 3, 5]."""
    return np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
