"""Preparation outputs and training batches.

Packed rows are stored as Arrow IPC files (``input_ids``, ``labels``, ``seq_lens`` list columns) so
training memory-maps them instead of loading them; a ``manifest.json`` beside them records token
counts, fill and the digest of everything they were made from.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from sft_engine.chat import encode_rendered, label_encoded, render_batch
from sft_engine.config import PrepareConfig
from sft_engine.constants import IGNORE_INDEX
from sft_engine.packing import pack_rows, plan_packing, position_ids_from_lens

PACKED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("num_pad", pa.int32()),
    ]
)


def iter_conversations(parquet_path: Path, batch_size: int) -> Iterator[list[list[dict[str, Any]]]]:
    """Stream the ``messages`` column of a curated Parquet file in batches (never the whole file)."""
    pf = pq.ParquetFile(parquet_path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=["messages"]):
        yield batch.column(0).to_pylist()


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    """A list<int32> Arrow array built from flat values and offsets (no per-element Python objects)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


TOKENIZED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def tokenize_to_arrow(
    parquet_path: Path, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig, dest: Path, progress: Any = None
) -> tuple[np.ndarray, list[str | None]]:
    """Tokenize a curated split batch by batch into an Arrow file; returns lengths and drop reasons.

    The next batch is rendered (Python, holds the GIL) on a worker thread while this one is
    tokenized (Rust, releases the GIL, all cores).
    """
    lengths: list[np.ndarray] = []
    reasons: list[str | None] = []
    batches = iter_conversations(parquet_path, cfg.tokenize_batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool, pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_file(sink, TOKENIZED_SCHEMA) as writer:
        convs = next(batches, None)
        ahead = pool.submit(render_batch, tokenizer, convs, cfg.mask) if convs is not None else None
        while ahead is not None:
            rendered = ahead.result()
            nxt = next(batches, None)
            ahead = pool.submit(render_batch, tokenizer, nxt, cfg.mask) if nxt is not None else None
            tok = label_encoded(rendered, encode_rendered(tokenizer, rendered))
            writer.write_batch(pa.record_batch([_list_array(tok.input_ids), _list_array(tok.labels)], schema=TOKENIZED_SCHEMA))
            lengths.append(np.fromiter((len(x) for x in tok.input_ids), dtype=np.int64, count=len(tok.input_ids)))
            reasons += tok.drop_reason
            if progress is not None:
                progress(len(rendered))
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), reasons


class _Samples:
    """Random access to tokenized samples in a memory-mapped Arrow file.

    ``release()`` drops the mapped pages from this process's resident set (the file is read-only,
    so they are re-read from the page cache when touched again): packing visits samples in
    best-fit order, all over the file, and without it resident memory would grow with the data.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - lives as long as the mapping
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        table = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map))).read_all()
        self._cols = {}
        for name in ("input_ids", "labels"):
            chunks = table.column(name).chunks
            self._cols[name] = [(np.asarray(c.offsets), np.asarray(c.values)) for c in chunks]
        sizes = [len(c) for c in table.column("input_ids").chunks]
        self._chunk_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def get(self, name: str, i: int) -> np.ndarray:
        c = int(np.searchsorted(self._chunk_start, i, side="right") - 1)
        offsets, values = self._cols[name][c]
        j = i - int(self._chunk_start[c])
        return values[offsets[j] : offsets[j + 1]]

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


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
    parquet_path: Path, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig, out: Path, progress: Any = None,
    rows_per_batch: int = 1024,
) -> tuple[SplitStats, np.ndarray]:
    """Tokenize, mask, pack and write one split with memory bounded by a batch, not by the data.

    Pass 1 streams conversations into a temporary tokenized Arrow file and keeps only lengths;
    best-fit decreasing plans bins from lengths alone; pass 2 assembles packed rows from the
    memory-mapped tokens and appends them to ``out``. Returns the stats and kept sample lengths.
    """
    tmp = out.with_name(out.name + ".tokens.arrow")
    lengths, reasons = tokenize_to_arrow(parquet_path, tokenizer, cfg, tmp, progress)
    ok = np.asarray([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    plan = plan_packing(lengths[ok].tolist(), cfg.max_seq_len, cfg.overlong)
    dropped: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    if plan.dropped:
        dropped["pack_too_long"] = len(plan.dropped)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = _Samples(tmp)
    tokens = supervised = 0
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        for start in range(0, len(plan.bins), rows_per_batch):
            bins = [[int(ok[j]) for j in b] for b in plan.bins[start : start + rows_per_batch]]
            needed = sorted({i for b in bins for i in b})
            local = {i: k for k, i in enumerate(needed)}
            rows = pack_rows(
                [samples.get("input_ids", i) for i in needed], [samples.get("labels", i) for i in needed],
                [[local[i] for i in b] for b in bins], cfg.max_seq_len, int(pad_id),
            )
            tokens += sum(min(int(lengths[i]), cfg.max_seq_len) for b in bins for i in b)
            supervised += int(sum(int((lab != IGNORE_INDEX).sum()) for lab in rows["labels"]))
            columns = [_list_array(rows[k]) for k in ("input_ids", "labels", "seq_lens")]
            writer.write_batch(pa.record_batch([*columns, pa.array(rows["num_pad"], pa.int32())], schema=PACKED_SCHEMA))
            samples.release()
    del samples
    tmp.unlink()
    stats = SplitStats(
        rows_in=len(reasons),
        rows_packed=len(plan.bins),
        samples_packed=sum(len(b) for b in plan.bins),
        dropped_by_reason=dropped,
        truncated=len(plan.truncated),
        tokens=tokens,
        supervised_tokens=supervised,
        slots=len(plan.bins) * cfg.max_seq_len,
    )
    assert stats.rows_in == stats.samples_packed + sum(dropped.values()), "preparation counts do not balance"
    return stats, lengths[ok]


class PackedDataset:
    """Memory-mapped packed rows from an Arrow IPC file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self._table = pa.ipc.open_file(self._source).read_all()

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self._table.slice(i, 1)
        out: dict[str, Any] = {k: np.asarray(row.column(k)[0].values, dtype=np.int64) for k in ("input_ids", "labels", "seq_lens")}
        out["num_pad"] = int(row.column("num_pad")[0].as_py())
        return out


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch with position ids that restart per sample."""
    return {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows])),
        "labels": torch.from_numpy(np.stack([r["labels"] for r in rows])),
        "position_ids": torch.from_numpy(np.stack([position_ids_from_lens(r["seq_lens"]) for r in rows])),
        "real_tokens": torch.tensor(sum(len(r["input_ids"]) - r.get("num_pad", 0) for r in rows)),
    }


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of row indices for one epoch, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """Endless row indices of each micro-batch for one rank, over seeded epochs.

    Each global micro-batch takes the next ``micro_batch_size * world_size`` rows of the epoch's
    permutation; rank r takes its slice. The order depends only on (seed, epoch), so a position is
    fully described by the number of micro-batches consumed.
    """
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
        yield order[pos + rank * micro_batch_size : pos + (rank + 1) * micro_batch_size]
        pos += global_batch


def iter_batches(
    ds: PackedDataset, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated micro-batches (see ``batch_indices``); ``skip`` fast-forwards past that many
    micro-batches without reading rows (exact resume)."""
    for k, mine in enumerate(batch_indices(len(ds), micro_batch_size, seed, rank, world_size)):
        if k >= skip:
            yield collate([ds[int(i)] for i in mine])
