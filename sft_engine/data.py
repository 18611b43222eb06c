"""Preparation outputs and training batches.

Packed rows are stored as Arrow IPC files (``input_ids``, ``labels``, ``seq_lens`` list columns) so
training memory-maps them instead of loading them; a ``manifest.json`` beside them records token
counts, fill and the digest of everything they were made from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from sft_engine.chat import tokenize_conversations
from sft_engine.config import PrepareConfig
from sft_engine.constants import IGNORE_INDEX
from sft_engine.packing import pack_rows, plan_packing, position_ids_from_lens

PACKED_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("seq_lens", pa.list_(pa.int32()))]
)


def _messages(df: pl.DataFrame) -> list[list[dict[str, Any]]]:
    return df["messages"].to_list() if df.height else []


def tokenize_frame(
    df: pl.DataFrame, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig, progress: Any = None
) -> tuple[list[np.ndarray], list[np.ndarray], list[str | None]]:
    """Tokenize a canonical frame in batches; returns ids, labels and per-row drop reasons."""
    convs = _messages(df)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    reasons: list[str | None] = []
    for start in range(0, len(convs), cfg.tokenize_batch_size):
        tok = tokenize_conversations(tokenizer, convs[start : start + cfg.tokenize_batch_size], cfg.mask)
        ids += tok.input_ids
        labels += tok.labels
        reasons += tok.drop_reason
        if progress is not None:
            progress(len(tok.input_ids))
    return ids, labels, reasons


def write_packed(path: Path, rows: dict[str, list[np.ndarray]]) -> None:
    """Write packed rows as one Arrow IPC file."""
    table = pa.table(
        {k: pa.array([r.tolist() for r in rows[k]], type=pa.list_(pa.int32())) for k in ("input_ids", "labels", "seq_lens")},
        schema=PACKED_SCHEMA,
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=4096)


@dataclass
class SplitStats:
    """What preparation did to one split."""

    rows_in: int
    rows_packed: int
    samples_packed: int
    dropped_by_reason: dict[str, int]
    truncated: int
    tokens: int
    supervised_tokens: int
    slots: int

    @property
    def fill(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fill": self.fill}


def prepare_split(
    df: pl.DataFrame, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig, out: Path, progress: Any = None
) -> tuple[SplitStats, list[int]]:
    """Tokenize, mask, pack and write one split; returns its stats and every kept sample's length."""
    ids, labels, reasons = tokenize_frame(df, tokenizer, cfg, progress)
    ok = [i for i, r in enumerate(reasons) if r is None]
    lengths = [len(ids[i]) for i in ok]
    plan = plan_packing(lengths, cfg.max_seq_len, cfg.overlong)
    dropped: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    if plan.dropped:
        dropped["pack_too_long"] = len(plan.dropped)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bins = [[ok[j] for j in b] for b in plan.bins]
    rows = pack_rows(ids, labels, bins, cfg.max_seq_len, int(pad_id))
    write_packed(out, rows)
    n_real = sum(min(len(ids[i]), cfg.max_seq_len) for b in bins for i in b)
    supervised = int(sum(int((lab != IGNORE_INDEX).sum()) for lab in rows["labels"]))
    stats = SplitStats(
        rows_in=df.height,
        rows_packed=len(bins),
        samples_packed=sum(len(b) for b in bins),
        dropped_by_reason=dropped,
        truncated=len(plan.truncated),
        tokens=n_real,
        supervised_tokens=supervised,
        slots=len(bins) * cfg.max_seq_len,
    )
    assert stats.rows_in == stats.samples_packed + sum(dropped.values()), "preparation counts do not balance"
    return stats, lengths


class PackedDataset:
    """Memory-mapped packed rows from an Arrow IPC file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self._table = pa.ipc.open_file(self._source).read_all()

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self._table.slice(i, 1)
        return {k: np.asarray(row.column(k)[0].values, dtype=np.int64) for k in ("input_ids", "labels", "seq_lens")}

    def supervised_tokens(self, indices: list[int] | None = None) -> int:
        idx = range(len(self)) if indices is None else indices
        return int(sum(int((self[i]["labels"] != IGNORE_INDEX).sum()) for i in idx))


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch with position ids that restart per sample."""
    return {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows])),
        "labels": torch.from_numpy(np.stack([r["labels"] for r in rows])),
        "position_ids": torch.from_numpy(np.stack([position_ids_from_lens(r["seq_lens"]) for r in rows])),
    }


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of row indices for one epoch, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iter_batches(
    ds: PackedDataset, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches over seeded epochs; each rank takes every ``world_size``-th batch."""
    n = len(ds)
    if n == 0:
        raise ValueError("the packed training data is empty; check the curation and preparation stats")
    global_batch = micro_batch_size * world_size
    epoch, pos = 0, 0
    order = epoch_order(n, seed, epoch)
    while True:
        if pos + global_batch > n:
            epoch, pos = epoch + 1, 0
            order = epoch_order(n, seed, epoch)
            if global_batch > n:
                order = np.resize(order, global_batch)
        mine = order[pos + rank * micro_batch_size : pos + (rank + 1) * micro_batch_size]
        pos += global_batch
        yield collate([ds[int(i)] for i in mine])
