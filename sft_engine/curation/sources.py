"""A configured source as canonical rows: its files (or a built-in generator) read, each row normalized by its
format and repaired, a row that cannot be kept carrying its drop reason instead of failing the run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from sft_engine.curation.formats import normalize_row
from sft_engine.curation.read import RAW_PREVIEW_CHARS, Record, iter_records, match_files
from sft_engine.curation.reasons import Drop
from sft_engine.curation.repair import repair_messages
from sft_engine.curation.schema import READ, rows_frame
from sft_engine.demo_data import builtin_rows

if TYPE_CHECKING:
    from pathlib import Path

    from sft_engine.config import CurateConfig, SourceConfig


def source_files(source: SourceConfig) -> list[Path]:
    """The files of a path source, sorted; ``SourceError`` when the path or glob matches none."""
    assert source.path is not None
    return match_files(source.path, f"source '{source.name}'")


def _records(source: SourceConfig, max_row_bytes: int, seed: int) -> Iterable[Record]:
    if source.builtin is not None:
        return (Record(obj) for obj in builtin_rows(source.builtin, source.limit, seed))
    return (rec for path in source_files(source) for rec in iter_records(path, max_row_bytes))


def read_source_batches(source: SourceConfig, cfg: CurateConfig, seed: int = 0, batch_rows: int | None = None) -> Iterator[pl.DataFrame]:
    """Every row of one source in the ``schema.READ`` layout, ``batch_rows`` rows at a time (all at once when None):
    canonical rows, repaired, or a drop reason with a detail and a raw preview. Rows are numbered from 1 across the
    batches. A caller holding one batch at a time holds a batch's Python objects, not the source's."""
    records: list[dict[str, Any]] = []
    n = 0
    for rec in _records(source, cfg.max_row_bytes, seed):
        n += 1
        row: dict[str, Any] = {"source": source.name, "row": n}
        reason, detail = rec.reason, rec.detail
        if reason is None:
            try:
                canonical = normalize_row(rec.obj, source.format, source.columns)
                messages, repairs = repair_messages(canonical["messages"], cfg.repair)
                row.update(messages=messages, tools=canonical["tools"], chat_template_kwargs=canonical.get("chat_template_kwargs"), repairs=repairs)
            except Drop as drop:
                reason, detail = drop.reason, drop.detail
        if reason is not None:
            # Only rows that failed to read or normalize keep a preview: the others are shown by their messages.
            raw = rec.preview or orjson.dumps(rec.obj, default=str)[:RAW_PREVIEW_CHARS].decode("utf-8", errors="replace")
            row.update(drop_reason=reason, drop_detail=detail, raw=raw or None)
        records.append(row)
        if source.limit is not None and n >= source.limit:
            break
        if batch_rows is not None and len(records) >= batch_rows:
            yield rows_frame(records, READ)
            records = []
    if records or n == 0:
        yield rows_frame(records, READ)


def read_source(source: SourceConfig, cfg: CurateConfig, seed: int = 0) -> pl.DataFrame:
    """Every row of one source in the ``schema.READ`` layout (``read_source_batches`` in one frame)."""
    return next(read_source_batches(source, cfg, seed))
