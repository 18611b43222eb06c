"""The one file reader: JSONL (also gzipped), JSON arrays, Parquet and saved Hugging Face ``datasets`` folders.

Curation, decontamination's eval sets and the evaluation items all read files through here. ``iter_records``
never fails on a bad row: it yields ``(object, None, preview)`` for a good one and ``(None, reason, preview)``
for one it cannot parse, so curation can quarantine it. Only a file that cannot be read at all (missing,
a truncated gzip stream, a JSON document that is not an array of rows) raises ``SourceError``, naming the file.

A JSON array cut short (a truncated download) keeps every complete element before the cut; what follows is one
``read_truncated`` record whose detail gives the byte offset. A ``.json`` file that is really JSON Lines (one
object per line, a common mislabel) is read as JSON Lines.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from sft_engine.errors import DataError
from sft_engine.io import parquet_batches

# Raw preview kept for a rejected row, so a curator sees what was wrong without the 10 MB row itself.
RAW_PREVIEW_CHARS = 500


class SourceError(DataError):
    """A file that cannot be read at all; the message names the file, the cause and the fix (exit 5)."""


@dataclass(frozen=True)
class Record:
    """One row of a file: the parsed object, or why it could not be parsed (``reason``) with a ``detail``;
    ``raw`` is the row's bytes (JSON Lines) or text, kept for a preview when the row is quarantined."""

    obj: Any
    reason: str | None = None
    raw: bytes | str = b""
    detail: str | None = None

    @property
    def preview(self) -> str:
        """The first 500 characters of the raw row (decoded only when asked: most rows never are)."""
        return _preview(self.raw)


def _preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        return raw[:RAW_PREVIEW_CHARS].decode("utf-8", errors="replace")
    return raw[:RAW_PREVIEW_CHARS]


def _jsonl(lines: Iterable[bytes], max_row_bytes: int) -> Iterator[Record]:
    for line in lines:
        if not line or line.isspace():
            continue  # blank lines (and the newline ending the last row) separate rows, they are not rows
        if len(line) > max_row_bytes:
            yield Record(None, "read_row_too_large", line[:RAW_PREVIEW_CHARS], f"{len(line):,} bytes > curate.max_row_bytes={max_row_bytes:,}")
            continue
        try:
            # orjson reads the bytes and checks them as UTF-8 itself; only a failure is looked at more closely.
            yield Record(orjson.loads(line), raw=line)
        except orjson.JSONDecodeError as exc:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                yield Record(None, "read_bad_utf8", line, f"byte {bad.start} of the line is not UTF-8")
                continue
            yield Record(None, "read_bad_json", line, str(exc))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_array_prefix(text: str, path: Path) -> Iterator[Record]:
    """The complete elements of a JSON array that does not parse whole, then one ``read_truncated`` record."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0) + 1  # past '['
    n = 0
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            rest = text[pos + 1 :].strip()
            if rest:
                at = len(text[: pos + 1].encode())
                yield Record(None, "read_truncated", rest, f"{len(rest.encode()):,} bytes of trailing data after the array ends at byte {at:,}")
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            at, total = len(text[:pos].encode()), len(text.encode())
            yield Record(
                None, "read_truncated", text[pos : pos + RAW_PREVIEW_CHARS],
                f"{path.name}: the JSON array breaks at byte {at:,} of {total:,} ({exc.msg}); {n:,} complete rows before it were kept",
            )
            return
        yield Record(obj)
        n += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            at = len(text[:pos].encode())
            yield Record(None, "read_truncated", text[pos : pos + RAW_PREVIEW_CHARS], f"{path.name}: the JSON array breaks at byte {at:,}; {n:,} complete rows before it were kept")
            return


def _json(data: bytes, path: Path, max_row_bytes: int) -> Iterator[Record]:
    try:
        arr = orjson.loads(data)
    except orjson.JSONDecodeError:
        arr = None
        text = data.decode("utf-8", errors="replace")
        start = _skip_ws(text, 0)
        if start < len(text) and text[start] == "{":
            yield from _jsonl(data.split(b"\n"), max_row_bytes)  # JSON Lines under a .json name
            return
        if start >= len(text) or text[start] != "[":
            raise SourceError(f"source file '{path}' is not a JSON array of rows (it starts with {text[start:start + 20]!r}); use .jsonl for one object per line") from None
        yield from _json_array_prefix(text, path)
        return
    if not isinstance(arr, list):
        raise SourceError(f"source file '{path}' holds a JSON {type(arr).__name__}, expected an array of rows")
    for obj in arr:
        yield Record(obj)


def _datasets_folder(path: Path) -> Iterator[Record]:
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(str(path))
    if not isinstance(ds, Dataset):
        splits = ", ".join(ds)
        raise SourceError(f"source folder '{path}' holds a DatasetDict with splits [{splits}]; point the path at one split, e.g. '{path}/{next(iter(ds))}'")
    for obj in ds:
        yield Record(obj)


def _file_errors(path: Path) -> Callable[[BaseException], SourceError]:
    def why(exc: BaseException) -> SourceError:
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            return SourceError(f"source file '{path}' is truncated or corrupt ({exc}); re-export or re-download it")
        return SourceError(f"cannot read source '{path}': {exc}")
    return why


_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError, pl.exceptions.PolarsError, ValueError)
# Rows per Parquet batch turned into Python objects: a file's memory is one batch's, not the file's.
PARQUET_BATCH = 4096


def _parquet(path: Path) -> Iterator[Record]:
    try:
        for batch in parquet_batches(path, PARQUET_BATCH):
            rows = pl.from_arrow(batch).to_dicts()  # type: ignore[union-attr]
            yield from (Record(obj) for obj in rows)
    except _READ_ERRORS as exc:
        raise _file_errors(path)(exc) from exc


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a JSON Lines file (gzipped or not), without their newline, read as the file streams."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line in f:
                yield line[:-1] if line.endswith(b"\n") else line
    except _READ_ERRORS as exc:
        raise _file_errors(path)(exc) from exc


def iter_records(path: Path, max_row_bytes: int = 1_000_000) -> Iterator[Record]:
    """Every row of one file or saved ``datasets`` folder, parsed or quarantined (see the module docstring).

    JSON Lines and Parquet stream (a line, a batch of rows at a time); a JSON array is read whole."""
    name = path.name.lower()
    if path.is_dir():
        try:
            yield from _datasets_folder(path)
        except SourceError:
            raise
        except _READ_ERRORS as exc:
            raise _file_errors(path)(exc) from exc
        return
    if name.endswith(".parquet"):
        yield from _parquet(path)
        return
    if not name.endswith((".json", ".json.gz")):
        yield from _jsonl(_lines(path), max_row_bytes)
        return
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except _READ_ERRORS as exc:
        raise _file_errors(path)(exc) from exc
    yield from _json(data, path, max_row_bytes)


def match_files(pattern: str, what: str) -> list[Path]:
    """The files a path or glob names, sorted; ``SourceError`` naming ``what`` when there are none."""
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise SourceError(f"{what}: path '{pattern}' matches no file; check the path or glob")
    return files


def read_objects(pattern: str, what: str) -> list[Any]:
    """Every row of the files a path or glob names, for data that must be whole (evaluation items): a row
    that does not parse is an error naming the file and the row, not a quarantine."""
    out = []
    for path in match_files(pattern, what):
        for i, rec in enumerate(iter_records(path, max_row_bytes=1 << 62), start=1):
            if rec.reason is not None:
                raise SourceError(f"{what}: row {i} of '{path}' cannot be read ({rec.reason}: {rec.detail}); fix or remove it")
            out.append(rec.obj)
    return out
