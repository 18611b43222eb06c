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

from sft_engine.chat import Labeler, Planner
from sft_engine.config import PrepareConfig
from sft_engine.constants import IGNORE_INDEX
from sft_engine.io import parquet_batches
from sft_engine.packing import pack_rows, plan_packing, position_ids_from_lens

# ``weights``: per-token loss weights of a row whose samples carry message weights (null: every weight is 1).
PACKED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("num_pad", pa.int32()),
        ("weights", pa.list_(pa.float32())),
    ]
)
ROW_COLUMNS = ("messages", "tools", "chat_template_kwargs")


def iter_rows(parquet_path: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Stream the rows of a curated Parquet file in batches (never the whole file): what a template renders."""
    columns = [c for c in ROW_COLUMNS if c in pq.read_schema(parquet_path).names]
    for batch in parquet_batches(parquet_path, batch_size, columns):
        # Column by column, and an all-null column (most rows have no tools) as nothing: row-wise to_pylist of the
        # whole batch costs 3x more on this, the one per-row Python step of the main thread.
        cols = {name: batch.column(name) for name in columns}
        present = {name: col.to_pylist() for name, col in cols.items() if col.null_count < len(col)}
        yield [{name: values[i] for name, values in present.items()} for i in range(batch.num_rows)]


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    """A list<int32> Arrow array built from flat values and offsets (no per-element Python objects)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


TOKENIZED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32()))])


def _weights_array(weights: list[np.ndarray | None]) -> pa.ListArray:
    """A nullable list<float32> array: null where a sample trains every token with weight 1."""
    if all(w is None for w in weights):
        return pa.nulls(len(weights), pa.list_(pa.float32()))
    return pa.array([None if w is None else w.astype(np.float32) for w in weights], pa.list_(pa.float32()))


def tokenize_to_arrow(
    parquet_path: Path, planner: Planner, labeler: Labeler, batch_size: int, dest: Path, progress: Any = None
) -> tuple[np.ndarray, list[str | None], dict[str, int]]:
    """Tokenize a curated split batch by batch into an Arrow file of samples (a conversation may give several,
    see ``chat``); returns the sample lengths, each conversation's drop reason (None: kept) and the counts.

    The next batch is planned and rendered (Python, holds the GIL) on a worker thread while this one is
    tokenized (Rust, releases the GIL, all cores).
    """
    lengths: list[np.ndarray] = []
    reasons: list[str | None] = []
    counts: dict[str, int] = {}
    batches = iter_rows(parquet_path, batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool, pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_file(sink, TOKENIZED_SCHEMA) as writer:
        rows = next(batches, None)
        ahead = pool.submit(planner.plan, rows) if rows is not None else None
        while ahead is not None:
            planned = ahead.result()
            nxt = next(batches, None)
            ahead = pool.submit(planner.plan, nxt) if nxt is not None else None
            tok = labeler.label(planned)
            writer.write_batch(pa.record_batch(
                [_list_array(tok.input_ids), _list_array(tok.labels), _weights_array(tok.weights)], schema=TOKENIZED_SCHEMA
            ))
            lengths.append(np.fromiter((len(x) for x in tok.input_ids), dtype=np.int64, count=len(tok.input_ids)))
            reasons += tok.drop_reason
            for k, v in tok.stats.items():
                counts[k] = counts.get(k, 0) + v
            if progress is not None:
                progress(len(planned.samples))
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), reasons, counts


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
        self._weights = table.column("weights")
        sizes = [len(c) for c in table.column("input_ids").chunks]
        self._chunk_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def get(self, name: str, i: int) -> np.ndarray:
        c = int(np.searchsorted(self._chunk_start, i, side="right") - 1)
        offsets, values = self._cols[name][c]
        j = i - int(self._chunk_start[c])
        return values[offsets[j] : offsets[j + 1]]

    def weights(self, i: int) -> np.ndarray | None:
        w = self._weights[i]
        return None if not w.is_valid else np.asarray(w.values, dtype=np.float32)

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


@dataclass
class SplitStats:
    """What preparation did to one split. Conversations balance: ``rows_in`` = rows with samples + rows dropped
    by a ``mask_*`` reason; samples balance: ``samples`` = ``samples_packed`` + ``pack_too_long``.
    ``expanded_samples`` / ``expanded_tokens``: turns trained in a sample of their own (``prepare.history``);
    ``stop_token_appended``: targets the template ends without a stop token, given the model's eos;
    ``targets_spliced``: turns whose inference prompt is not a prefix of their render (``chat.inference_target``);
    ``boundary_retokenized``: samples tokenized piece by piece because a token straddled a prompt/target boundary;
    ``reasoning_not_rendered``: kept rows whose reasoning the template does not render (their replies train alone)."""

    rows_in: int
    rows_packed: int
    samples_packed: int
    dropped_by_reason: dict[str, int]
    truncated: int
    tokens: int
    supervised_tokens: int
    slots: int
    samples: int = 0
    expanded_samples: int = 0
    expanded_tokens: int = 0
    stop_token_appended: int = 0
    targets_spliced: int = 0
    boundary_retokenized: int = 0
    reasoning_not_rendered: int = 0
    weighted_samples: int = 0

    @property
    def fill(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    @property
    def expansion(self) -> float:
        """Extra tokens the expanded samples cost, as a share of the tokens without them."""
        base = self.tokens_tokenized - self.expanded_tokens
        return self.expanded_tokens / base if base else 0.0

    tokens_tokenized: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fill": self.fill, "expansion": self.expansion}


def prepare_split(
    parquet_path: Path, tokenizer: PreTrainedTokenizerBase, cfg: PrepareConfig, out: Path, progress: Any = None,
    rows_per_batch: int = 1024, extra_stop_ids: tuple[int, ...] = (),
) -> tuple[SplitStats, np.ndarray]:
    """Tokenize, mask, pack and write one split with memory bounded by a batch, not by the data.

    Pass 1 streams conversations into a temporary tokenized Arrow file of samples and keeps only lengths;
    best-fit decreasing plans bins from lengths alone; pass 2 assembles packed rows from the
    memory-mapped tokens and appends them to ``out``. Returns the stats and kept sample lengths.
    ``extra_stop_ids``: the model's generation-config eos ids (stop tokens besides the tokenizer's eos).
    """
    tmp = out.with_name(out.name + ".tokens.arrow")
    planner = Planner(tokenizer, cfg.mask, cfg.history, cfg.chat_template_kwargs, extra_stop_ids)
    lengths, reasons, counts = tokenize_to_arrow(parquet_path, planner, Labeler(tokenizer), cfg.tokenize_batch_size, tmp, progress)
    plan = plan_packing(lengths.tolist(), cfg.max_seq_len, cfg.overlong)
    dropped: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    if plan.dropped:
        dropped["pack_too_long"] = len(plan.dropped)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = _Samples(tmp)
    tokens = supervised = weighted = 0
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        for start in range(0, len(plan.bins), rows_per_batch):
            bins = [[int(j) for j in b] for b in plan.bins[start : start + rows_per_batch]]
            needed = sorted({i for b in bins for i in b})
            local = {i: k for k, i in enumerate(needed)}
            sample_weights = [samples.weights(i) for i in needed]
            weighted += sum(w is not None for w in sample_weights)
            rows = pack_rows(
                [samples.get("input_ids", i) for i in needed], [samples.get("labels", i) for i in needed],
                [[local[i] for i in b] for b in bins], cfg.max_seq_len, int(pad_id), sample_weights,
            )
            tokens += sum(min(int(lengths[i]), cfg.max_seq_len) for b in bins for i in b)
            supervised += int(sum(int((lab != IGNORE_INDEX).sum()) for lab in rows["labels"]))
            columns = [_list_array(rows[k]) for k in ("input_ids", "labels", "seq_lens")]
            writer.write_batch(pa.record_batch(
                [*columns, pa.array(rows["num_pad"], pa.int32()), _weights_array(rows["weights"])], schema=PACKED_SCHEMA
            ))
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
        samples=len(lengths),
        expanded_samples=counts.get("expanded_samples", 0),
        expanded_tokens=counts.get("expanded_tokens", 0),
        stop_token_appended=counts.get("stop_token_appended", 0),
        targets_spliced=counts.get("targets_spliced", 0),
        boundary_retokenized=counts.get("boundary_retokenized", 0),
        reasoning_not_rendered=counts.get("reasoning_not_rendered", 0),
        weighted_samples=weighted,
        tokens_tokenized=int(lengths.sum()),
    )
    row_drops = sum(n for r, n in dropped.items() if r != "pack_too_long")
    assert stats.rows_in == sum(r is None for r in reasons) + row_drops, "preparation row counts do not balance"
    assert stats.samples == stats.samples_packed + len(plan.dropped), "preparation sample counts do not balance"
    return stats, lengths


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
        w = row.column("weights")[0] if "weights" in self._table.column_names else None
        out["weights"] = None if w is None or not w.is_valid else np.asarray(w.values, dtype=np.float32)
        return out


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch with position ids that restart per sample; ``weights`` (per-token loss weights)
    only when a row has any."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows])),
        "labels": torch.from_numpy(np.stack([r["labels"] for r in rows])),
        "position_ids": torch.from_numpy(np.stack([position_ids_from_lens(r["seq_lens"]) for r in rows])),
        "real_tokens": torch.tensor(sum(len(r["input_ids"]) - r.get("num_pad", 0) for r in rows)),
    }
    if any(r.get("weights") is not None for r in rows):
        batch["weights"] = torch.from_numpy(np.stack([
            r["weights"] if r.get("weights") is not None else np.ones(len(r["input_ids"]), dtype=np.float32) for r in rows
        ]))
    return batch


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
