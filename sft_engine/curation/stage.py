"""The curation stage: cached row-local units, one global step, their cache keys, and the report.

Three cached levels, so a curator changing one source or only the mix redoes only what changed:

    curate_sources/<name>-<key>/  rows.parquet   a source's (or shard's) rows after reading, repairs and the row rules,
                                                 with the row-local halves of dedup       key: curate.rows fields
    curate_dedup/<key>/           marks.parquet  one row of marks per input row after exact + near dedup and the split
                                                 key: the unit keys + curate.dedup fields
    curate/<key>/                 train.parquet heldout.parquet rejected.parquet stats.json report.md drop_samples/ *.png
                                                 key: the dedup key + curate.mix fields

Which config fields feed which key is declared at the fields (``config.keyed``); the functions here read it
through ``config.cache_view``.
"""

from __future__ import annotations

import glob
import html
import importlib.metadata
import itertools
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sft_engine import __version__, plots
from sft_engine.config import PipelineConfig, SourceConfig, config_to_dict
from sft_engine.curation.curate import check_rows
from sft_engine.curation.dedup import dedup_and_split
from sft_engine.curation.mix import MARK_COLUMNS, REJECTED_COLUMNS, plan_outputs
from sft_engine.curation.rules import all_reasons
from sft_engine.curation.schema import CANONICAL_COLUMNS, KEY, row_dicts
from sft_engine.curation.sources import read_source_batches, source_files
from sft_engine.fields import cache_view
from sft_engine.io import (
    StageOutput,
    atomic_dir,
    digest_files,
    digest_json,
    digest_path,
    is_complete,
    read_json,
    stage_dir,
    write_inputs,
    write_json_atomic,
)

ROW_GROUP = 8192
# What a unit folder holds; bumped when its columns change, so old unit folders are never read as new ones.
UNIT_FORMAT = 4
DROP_SAMPLES = 20

# ---- keys ---------------------------------------------------------------------------------------


def _source_identity(s: SourceConfig, digests: dict[Path, str] | None = None) -> Any:
    """Content identity of a source: file digests (``digests`` when already computed), or the generator's package version."""
    if s.builtin == "chitchat":
        return [s.builtin, importlib.metadata.version("chitchat-dataset")]
    if s.builtin is not None:
        return [s.builtin, __version__]
    if digests is None:
        digests = {p: digest_path(p) for p in source_files(s)}
    return [[str(p), d] for p, d in digests.items()]


def _eval_sets_identity(cfg: PipelineConfig) -> list[Any]:
    """Contents of the eval sets decontamination checks against (a changed eval file invalidates the cache)."""
    out: list[Any] = []
    for es in cfg.curate.decontaminate.eval_sets:
        if es.builtin is not None:
            out.append([es.name, es.builtin, __version__])
        else:
            path = es.path if es.suite is None else es.suite["path"]
            out.append([es.name, [[p, digest_path(Path(p))] for p in sorted(glob.glob(path or ""))]])
    return out


def _row_checks(cfg: PipelineConfig) -> dict[str, Any]:
    """The curate.rows fields but the sources' own (each unit hashes only its source), and what they read."""
    checks = cache_view(cfg, "curate.rows")
    checks["curate"].pop("sources")
    checks["eval_sets_identity"] = _eval_sets_identity(cfg)
    checks["unit_format"] = UNIT_FORMAT
    return checks


def _source_key(s: SourceConfig, checks: dict[str, Any], digests: dict[Path, str] | None = None) -> str:
    source = cache_view(s, "curate.rows")
    return digest_json({"source": source, "identity": _source_identity(s, digests), "checks": checks, "v": __version__})


def source_key(cfg: PipelineConfig, s: SourceConfig) -> str:
    """Key of one source's row-local curation: its content, its reading options, the row checks. Not its weight."""
    return _source_key(s, _row_checks(cfg))


def _shard_key(s: SourceConfig, checks: dict[str, Any], digests: dict[Path, str]) -> str:
    """Key of one shard's row-local curation: its own files (not the glob, not the other shards), the reading options, the checks."""
    source = {k: v for k, v in cache_view(s, "curate.rows").items() if k != "path"}
    shard = [[str(p), d] for p, d in digests.items()]
    return digest_json({"shard": shard, "source": source, "checks": checks, "v": __version__})


def _dedup_key(cfg: PipelineConfig, source_keys: list[str]) -> str:
    return digest_json({"sources": source_keys, "dedup": cache_view(cfg, "curate.dedup")})


def dedup_key(cfg: PipelineConfig) -> str:
    """Key of the global dedup + split: every source's key and the curate.dedup fields. Not the weights."""
    checks = _row_checks(cfg)
    return _dedup_key(cfg, [_source_key(s, checks) for s in cfg.curate.sources])


def _curate_key(cfg: PipelineConfig, dedup: str) -> str:
    return digest_json({"dedup": dedup, "mix": cache_view(cfg, "curate.mix"), "v": __version__})


def curate_key(cfg: PipelineConfig) -> str:
    """Key of the final curated splits: the dedup key plus the curate.mix fields (weights, targets, caps)."""
    return _curate_key(cfg, dedup_key(cfg))


# ---- units and the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CurateUnit:
    """Row-local curation work: a whole source, or one shard (a group of files) of a glob source."""

    source: str
    label: str  # the source's name for a whole source, ``name[i]`` for its i-th shard
    files: tuple[str, ...] | None  # the shard's files; None = the whole source
    folder: Path  # curate_sources/<name>-<key>


@dataclass(frozen=True)
class CuratePlan:
    """Curation's output folders, and the row-local units its global step still needs."""

    out: Path  # curate/<key>: the mixed splits
    dedup: Path  # curate_dedup/<key>: the marks of every row after global dedup + split (marks.parquet)
    units: tuple[CurateUnit, ...]  # empty when ``out`` is already complete


def plan_curate(cfg: PipelineConfig) -> CuratePlan:
    """Key every curation level and cut the sources into units of row-local work.

    A source is one unit, except a glob of several files without ``limit``: that is one unit per
    ``runner.files_per_shard`` files, keyed by those files alone, so adding a shard to the glob leaves
    the other shards' work cached. Each file is digested once, here.
    """
    checks = _row_checks(cfg)
    source_keys: list[str] = []
    units: list[CurateUnit] = []
    for s in cfg.curate.sources:
        files = source_files(s) if s.path is not None else []
        digests = {p: digest_path(p) for p in files}
        source_keys.append(_source_key(s, checks, digests))
        # `limit` counts rows across the whole source, so a limited source cannot be cut.
        step = cfg.runner.files_per_shard if s.limit is None else max(1, len(files))
        groups = [files[i:i + step] for i in range(0, len(files), step)]
        if len(groups) <= 1:
            units.append(CurateUnit(s.name, s.name, None, stage_dir(cfg.work_dir, "curate_sources", f"{s.name}-{source_keys[-1]}")))
            continue
        for i, group in enumerate(groups):
            key = _shard_key(s, checks, {p: digests[p] for p in group})
            folder = stage_dir(cfg.work_dir, "curate_sources", f"{s.name}-{key}")
            units.append(CurateUnit(s.name, f"{s.name}[{i}]", tuple(str(p) for p in group), folder))
    dedup = stage_dir(cfg.work_dir, "curate_dedup", _dedup_key(cfg, source_keys))
    out = stage_dir(cfg.work_dir, "curate", _curate_key(cfg, dedup.name))
    # The outputs take the conversations from the unit folders, so they are needed unless the outputs exist.
    return CuratePlan(out, dedup, () if is_complete(out, cfg.verify_reuse) else tuple(units))


def run_curate_unit(cfg: PipelineConfig, unit: CurateUnit) -> StageOutput:
    """Row-local curation of one unit (read, normalize, repair, the row rules) into ``<unit.folder>/rows.parquet``,
    written atomically; reused when complete.

    Units share nothing, so they may run in any order, at once, in other processes or on other machines
    (the folder must be on storage they all see). A unit reads, checks and writes ``runner.batch_rows`` rows at a
    time, so its memory does not grow with its size.
    """
    if is_complete(unit.folder, cfg.verify_reuse):
        return StageOutput(unit.folder, reused=True)
    source = {s.name: s for s in cfg.curate.sources}[unit.source]
    with atomic_dir(unit.folder, cfg.verify_reuse) as tmp:
        if tmp is None:  # another run finished this unit first
            return StageOutput(unit.folder, reused=True)
        _write_batches((check_rows(batch, cfg.curate, cfg.seed) for batch in _unit_batches(cfg, unit, source)), tmp / "rows.parquet")
    return StageOutput(unit.folder, reused=False)


def _unit_batches(cfg: PipelineConfig, unit: CurateUnit, source: SourceConfig) -> Iterator[pl.DataFrame]:
    """The unit's rows, ``runner.batch_rows`` at a time; a shard's rows numbered 1.. across its files (the global step
    numbers them across the whole source)."""
    if unit.files is None:
        yield from read_source_batches(source, cfg.curate, cfg.seed, cfg.runner.batch_rows)
        return
    offset = 0
    for f in unit.files:  # each file through the same reader, as a literal path, its rows numbered 1.. across its batches
        rows = 0
        for batch in read_source_batches(source.model_copy(update={"path": glob.escape(f)}), cfg.curate, cfg.seed, cfg.runner.batch_rows):
            yield batch.with_columns(row=pl.col("row") + offset)
            rows += batch.height
        offset += rows


def _write_batches(frames: Iterable[pl.DataFrame], dest: Path) -> None:
    """Frames of one schema into one Parquet file, a frame at a time (an empty frame only when all are)."""
    import pyarrow.parquet as pq

    writer = None
    first: pl.DataFrame | None = None
    try:
        for frame in frames:
            if first is None:
                first = frame
            if frame.height == 0:
                continue
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(dest, table.schema, compression="zstd")
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)  # e.g. a column that is all null in this batch
            writer.write_table(table, row_group_size=ROW_GROUP)
        if writer is None and first is not None:
            first.write_parquet(dest)
    finally:
        if writer is not None:
            writer.close()


def _unit_spans(plan: CuratePlan) -> list[tuple[CurateUnit, int, int]]:
    """Each unit with the offset of its rows within its source (a shard numbers its rows from 1) and its row count,
    from the Parquet footers."""
    offsets: dict[str, int] = {}
    spans = []
    for unit in plan.units:
        n = pl.scan_parquet(unit.folder / "rows.parquet").select(pl.len()).collect().item()
        offset = offsets.get(unit.source, 0)
        spans.append((unit, offset, n))
        offsets[unit.source] = offset + n
    return spans


def _unit_rows(
    plan: CuratePlan, columns: list[str], spans: list[tuple[CurateUnit, int, int]] | None = None, recast: Sequence[pl.Expr] = ()
) -> pl.LazyFrame:
    """Those columns of every unit's checked rows, in plan order, with each sharded source's rows
    numbered 1.. across its shards, each unit's columns passed through ``recast`` before they are concatenated.
    Lazy, so each reader takes only the columns it needs."""
    return pl.concat([
        pl.scan_parquet(unit.folder / "rows.parquet").select(columns).with_columns(*recast, row=pl.col("row") + offset)
        for unit, offset, _ in (spans or _unit_spans(plan))
    ])


def _row_groups(path: Path, columns: list[str], offset: int, wanted: pl.Series) -> Iterator[pl.DataFrame]:
    """Those columns of a unit file's rows that ``wanted`` numbers (within the source: the unit's rows are offset+1..),
    a row group at a time, reading only row groups that hold some. Rows are picked in Arrow, into fresh buffers:
    a Polars frame of a few rows would keep its whole row group's strings alive."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    wanted = wanted.sort() - offset
    first = 1
    for g in range(meta.num_row_groups):
        n = meta.metadata.row_group(g).num_rows
        lo, hi = wanted.search_sorted(first), wanted.search_sorted(first + n)
        if hi > lo:
            table = meta.read_row_group(g, columns=columns)
            table = table.filter(pc.is_in(table["row"], value_set=pa.array(wanted.slice(lo, hi - lo).to_numpy())))
            yield pl.from_arrow(table).with_columns(row=pl.col("row") + offset)  # type: ignore[union-attr]
            del table
        first += n


def _texts_by_key(plan: CuratePlan, want: pl.DataFrame, spans: list[tuple[CurateUnit, int, int]] | None = None) -> pl.Series:
    """The folded text of the rows ``want`` names (source, row), in its order: read a row group at a time, only the
    row groups holding wanted rows, so one row group's text column is in memory at a time, never a unit's or the corpus's."""
    want = want.select(KEY).with_row_index("_want")
    parts = []
    for unit, offset, n in spans or _unit_spans(plan):
        need = want.filter((pl.col("source") == unit.source) & pl.col("row").is_between(offset + 1, offset + n))
        if need.height:
            for rows in _row_groups(unit.folder / "rows.parquet", [*KEY, "norm_text"], offset, need["row"].unique()):
                parts.append(need.join(rows, on=KEY, how="inner"))
    got = pl.concat(parts) if parts else want.with_columns(norm_text=pl.lit(None, pl.String))
    return got.sort("_want")["norm_text"]


def write_ordered(
    outputs: dict[Path, tuple[pl.DataFrame, list[str]]], plan: CuratePlan, scratch: Path, bucket_rows: int = 8_192, workers: int = 1
) -> None:
    """For each ``dest: (keys, columns)``, write those columns of the rows ``keys`` names (source, row; in their order,
    repeats kept; mark columns ``keys`` carries are taken from it) to ``dest``, holding a few row groups per unit and
    two buckets of output rows at a time, never the corpus.

    Pass 1 reads each unit once, for every output, and files the rows it owes, ``2 * bucket_rows`` at a time, into
    Arrow IPC scratch files with one record batch per bucket of ``bucket_rows`` output positions, ``workers`` units at
    a time (threads: Arrow and Polars release the GIL); pass 2 writes each output's buckets in order, reading each
    bucket's batches back and sorting them by position, the next bucket assembled while one is compressed and
    written. Small row groups let preparation stream the splits batch by batch.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    scratch.mkdir(exist_ok=True)
    order = list(outputs)
    wanted = pl.concat([
        keys.select(KEY).with_row_index("_pos").with_columns(_out=pl.lit(i, pl.UInt8), _bucket=(pl.col("_pos") // bucket_rows).cast(pl.UInt32))
        for i, (keys, _) in enumerate(outputs.values())
    ])
    marks = {i: [c for c in keys.columns if c not in KEY] for i, (keys, _) in enumerate(outputs.values())}
    content_cols = sorted({c for i, (_, cols) in enumerate(outputs.values()) for c in cols if c not in KEY and c not in marks[i]})

    # (output, bucket) -> where its rows are: (scratch file, first record batch, batch count)
    filed: dict[tuple[int, int], list[tuple[Path, int, int]]] = {}
    files: dict[int, list[Path]] = {i: [] for i in range(len(order))}

    def flush(held: list[pl.DataFrame], u: int, flushes: int) -> None:
        # One scratch file per output and flush, its rows sorted by position in one record batch per bucket: the
        # mixed order scatters a flush over every bucket, and a file per bucket made N^2 / bucket_rows tiny files.
        for (out,), part in pl.concat(held).sort("_out", "_pos").partition_by("_out", as_dict=True, maintain_order=True).items():
            path = scratch / f"{out}-{u:05d}-{flushes:05d}.arrow"
            table = part.rechunk().to_arrow()
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                start = index = 0
                for bucket, n in part.group_by("_bucket", maintain_order=True).len().iter_rows():
                    batches = table.slice(start, n).to_batches()
                    for batch in batches:
                        writer.write_batch(batch)
                    filed.setdefault((int(out), int(bucket)), []).append((path, index, len(batches)))  # atomic under the GIL
                    start, index = start + n, index + len(batches)
            files[int(out)].append(path)

    def file_unit(u: int, unit: CurateUnit, lo: int, n: int) -> None:
        need = wanted.filter((pl.col("source") == unit.source) & pl.col("row").is_between(lo + 1, lo + n)).sort("row")
        if need.height == 0:
            return
        held: list[pl.DataFrame] = []
        flushes = 0
        groups = _row_groups(unit.folder / "rows.parquet", [*KEY, *content_cols], lo, need["row"].unique())
        for rows in itertools.chain(groups, [None]):  # not (*groups, None): that reads every row group first
            if rows is not None:
                # Joined with the rows this row group holds only: a join with the whole unit's wanted rows builds
                # its table over them at every row group, and units grow with the corpus.
                first, last = need["row"].search_sorted(rows["row"].min(), side="left"), need["row"].search_sorted(rows["row"].max(), side="right")
                held.append(need.slice(first, last - first).join(rows, on=KEY, how="inner"))
            # Filed a few row groups at a time: memory stays a few row groups, the scratch files stay few.
            if held and (rows is None or sum(p.height for p in held) >= 2 * bucket_rows):
                flush(held, u, flushes)
                held, flushes = [], flushes + 1

    spans = _unit_spans(plan)
    with ThreadPoolExecutor(max(1, min(workers, len(spans)))) as pool:
        for done in [pool.submit(file_unit, u, *span) for u, span in enumerate(spans)]:
            done.result()

    def bucket_table(i: int, bucket: int, columns: list[str], mark_cols: pl.DataFrame | None) -> Any:
        batches = []
        for path, first, count in sorted(filed.get((i, bucket), [])):
            with pa.OSFile(str(path)) as source:  # read, not mapped: mapped pages would count as this process's memory
                reader = pa.ipc.open_file(source)
                batches.extend(reader.get_batch(first + k) for k in range(count))
        frame = pl.from_arrow(pa.Table.from_batches(batches)).sort("_pos")
        assert isinstance(frame, pl.DataFrame)
        if mark_cols is not None:
            frame = frame.join(mark_cols, on="_pos", how="left", maintain_order="left")
        return frame.select(columns).to_arrow()

    with ThreadPoolExecutor(1) as ahead:
        for i, dest in enumerate(order):
            keys, columns = outputs[dest]
            mark_cols = keys.with_row_index("_pos").select("_pos", *marks[i]) if marks[i] else None
            buckets = (keys.height + bucket_rows - 1) // bucket_rows
            writer = None
            try:
                upcoming = ahead.submit(bucket_table, i, 0, columns, mark_cols) if buckets else None
                pending: list[Any] = []  # rows not yet in a row group: row groups of ROW_GROUP rows whatever the buckets
                for bucket in range(buckets):
                    assert upcoming is not None
                    pending.append(upcoming.result())
                    upcoming = ahead.submit(bucket_table, i, bucket + 1, columns, mark_cols) if bucket + 1 < buckets else None
                    table = pa.concat_tables(pending)
                    ready = table.num_rows if upcoming is None else table.num_rows // ROW_GROUP * ROW_GROUP
                    writer = writer or pq.ParquetWriter(dest, table.schema, compression="zstd")
                    if ready:
                        writer.write_table(table.slice(0, ready).combine_chunks(), row_group_size=ROW_GROUP)
                    pending = [table.slice(ready)]
                for f in files[i]:
                    f.unlink()
                if writer is None:  # no rows: an empty file with the columns' types
                    types = pl.scan_parquet(plan.units[0].folder / "rows.parquet").select([*KEY, *content_cols]).collect_schema()
                    keys.clear().join(pl.DataFrame(schema=dict(types)), on=KEY, how="left").select(columns).write_parquet(dest)
            finally:
                if writer is not None:
                    writer.close()
    scratch.rmdir()


# ---- the report -------------------------------------------------------------------------------------


def _rows_at(path: Path, positions: np.ndarray) -> pl.DataFrame:
    """The rows of a Parquet file at these 0-based positions (ascending), reading only the row groups that hold them,
    one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    ends = np.cumsum([meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)])
    groups = np.searchsorted(ends, positions, side="right")
    parts = []
    for g in np.unique(groups).tolist():
        local = positions[groups == g] - (ends[g - 1] if g else 0)
        parts.append(meta.read_row_group(g).take(pa.array(local)))
    table = pa.concat_tables(parts) if parts else meta.schema_arrow.empty_table()
    return pl.from_arrow(table)  # type: ignore[return-value]


def _drop_samples(rejected_file: Path, folder: Path, seed: int) -> dict[str, int]:
    """Up to ``DROP_SAMPLES`` rejected rows per reason (seeded), as ``<reason>.jsonl`` with the conversation as
    stored, plus ``index.html`` showing them: a curator audits a rule in the MLflow UI without writing code."""
    folder.mkdir()
    # The reasons alone first, then only the sampled rows, every reason's in one read: the rejected rows grow with the
    # corpus (142k rows and their conversations at 3M), the samples do not.
    reasons = pl.read_parquet(rejected_file, columns=["drop_reason"]).with_row_index("_i")
    totals: dict[str, int] = {}
    picks = []
    for reason in sorted(set(reasons["drop_reason"].to_list())):
        picked = reasons.filter(pl.col("drop_reason") == reason)["_i"]
        totals[reason] = picked.len()
        if picked.len() > DROP_SAMPLES:
            picked = picked.sample(DROP_SAMPLES, seed=seed)  # the rows DataFrame.sample would pick, by the same draw
        picks.append(picked)
    sampled = _rows_at(rejected_file, pl.concat(picks).sort().to_numpy() if picks else np.zeros(0, dtype=np.int64))
    written: dict[str, int] = {}
    sections = []
    doc = {r.name: r.doc for r in all_reasons()}
    for reason, total in totals.items():
        rows = sampled.filter(pl.col("drop_reason") == reason)
        if total > DROP_SAMPLES:
            rows = rows.sort(KEY)
        records = []
        for marks, content in zip(rows.drop("messages", "tools", "repairs").to_dicts(), row_dicts(rows), strict=True):
            records.append({**{k: v for k, v in marks.items() if v is not None}, **content})
        (folder / f"{reason}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        written[reason] = len(records)
        items = "".join(
            f"<tr><td>{html.escape(str(r['source']))}:{r['row']}</td><td>{html.escape(str(r.get('drop_detail') or r.get('dup_of') or r.get('decontam_match') or ''))}</td>"
            f"<td><pre>{html.escape(_preview(r))}</pre></td></tr>"
            for r in records
        )
        base = reason if reason in doc else "decontam_<set>" if reason.startswith("decontam_") else reason
        sections.append(
            f"<h2 id='{html.escape(reason)}'>{html.escape(reason)}: {len(records)} of {total:,} rows</h2>"
            f"<p>{html.escape(doc.get(base, ''))}</p><table><tr><th>row</th><th>detail</th><th>conversation</th></tr>{items}</table>"
        )
    page = (
        "<html><head><meta charset='utf-8'><style>body{font-family:sans-serif} td{vertical-align:top;border-bottom:1px solid #ddd}"
        "pre{white-space:pre-wrap;max-width:900px;margin:0}</style></head><body><h1>Rejected rows, sampled per drop reason</h1>"
        + "".join(sections) + "</body></html>"
    )
    (folder / "index.html").write_text(page, encoding="utf-8")
    return written


def _preview(r: dict[str, Any], limit: int = 600) -> str:
    if r.get("messages"):
        text = "\n".join(f"{m['role']}: {m.get('content', '')}" + (" [calls]" if m.get("tool_calls") else "") for m in r["messages"])
    else:
        text = r.get("raw") or ""
    return text if len(text) <= limit else text[:limit] + " ..."


def report_markdown(stats: dict[str, Any]) -> str:
    """The curation report: counts that balance, every drop reason with what it means, every repair."""
    doc = {r.name: r.doc for r in all_reasons()}
    lines = [
        "# Curation report", "",
        (
            f"rows in **{stats['rows_in']:,}** = kept **{stats['rows_kept']:,}** ({stats['rows_train']:,} train, "
            f"{stats['rows_heldout']:,} held out) + dropped **{stats['rows_dropped']:,}**; "
            f"{stats.get('rows_repaired', 0):,} kept rows were repaired; {stats['rows_train_mixed']:,} train rows after mixing."
        ),
        "",
        "| source | rows in | kept | dropped | repaired rows | train after mix |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats["per_source"].items():
        repaired = sum(s.get("repaired_by_kind", {}).values())
        lines.append(f"| {name} | {s['rows_in']:,} | {s['rows_kept']:,} | {s['rows_dropped']:,} | {repaired:,} | {s['mixed_train_rows']:,} |")
    lines += ["", "## Dropped, by reason", "", "| reason | rows | what it means |", "|---|---:|---|"]
    for reason, n in stats["dropped_by_reason"].items():
        base = "decontam_<set>" if reason.startswith("decontam_") else reason
        lines.append(f"| [`{reason}`](drop_samples/{reason}.jsonl) | {n:,} | {doc.get(base, '')} |")
    lines += ["", "## Repaired (kept rows), by kind", "", "| repair | rows |", "|---|---:|"]
    lines += [f"| `repaired_{kind}` | {n:,} |" for kind, n in stats.get("repaired_by_kind", {}).items()] or ["| (none) | 0 |"]
    lines += ["", "Up to 20 rejected rows per reason are in `drop_samples/<reason>.jsonl`, shown in `drop_samples/index.html`."]
    return "\n".join(lines) + "\n"


# ---- the global step ------------------------------------------------------------------------------


# Mark columns the dedup does not touch: read back unit by unit as the marks are written, not held through it.
_PASSED_THROUGH = ["decontam_match", "n_chars", "repairs"]


def _compact_columns(cfg: PipelineConfig) -> list[pl.Expr]:
    """The dedup's per-row columns in 28 bytes instead of 74: the source as an Enum (1 byte), the drop reason as a
    Categorical (4), the 16-byte exact-dedup hash as one UInt128 instead of a binary view and its buffer (32). That
    was 140 MB of the dedup's high-water mark at 3M rows. ``_dedup_marks`` writes them back as strings."""
    return [
        pl.col("source").cast(pl.Enum([s.name for s in cfg.curate.sources])),
        pl.col("drop_reason").cast(pl.Categorical),
        pl.col("_dedup_hash").bin.reinterpret(dtype=pl.UInt128),
    ]


def _dedup_frame(cfg: PipelineConfig, plan: CuratePlan, spans: list[tuple[CurateUnit, int, int]], scratch: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``dedup_and_split`` over the columns of every row it needs in memory (~28 B a row, ``_compact_columns``), the band keys read unit by
    unit and paired within ``curate.memory_budget`` (spilled under ``scratch`` beyond it), the text only of rows in
    a near-dup candidate pair. Returns the marks but those of ``_PASSED_THROUGH``, and the near-dedup report."""
    near = ["_has_shingles"] if cfg.curate.near_dedup.enabled else []
    slim = _unit_rows(plan, ["source", "row", "drop_reason", "_dedup_hash", "_split_bucket", *near], spans, _compact_columns(cfg)).collect()

    def texts_of(positions: np.ndarray) -> pl.Series:
        return _texts_by_key(plan, slim.select(KEY).gather(positions).with_columns(pl.col("source").cast(pl.String)), spans)

    def bands_of(positions: np.ndarray) -> Iterator[np.ndarray]:
        # Positions count rows across the units in plan order: each unit's band keys are read once, for its rows.
        start = 0
        for unit, _, n in spans:
            lo, hi = np.searchsorted(positions, [start, start + n])
            if hi > lo:
                column = pl.scan_parquet(unit.folder / "rows.parquet").select("_bands").collect().to_series()
                yield column.gather(positions[lo:hi] - start).to_numpy().reshape(hi - lo, cfg.curate.near_dedup.bands)
            start += n

    marks, near_info = dedup_and_split(slim, cfg.curate, cfg.seed, texts_of, bands_of, scratch)
    return marks.select([c for c in MARK_COLUMNS if c not in _PASSED_THROUGH]), near_info


def _dedup_marks(cfg: PipelineConfig, plan: CuratePlan, scratch: Path, dest: Path) -> dict[str, Any]:
    """Write to ``dest`` the marks of every row after exact and near dedup and the split (``_dedup_frame``), with the
    columns it leaves alone read back unit by unit; return the near-dedup report."""
    spans = _unit_spans(plan)
    marks, near_info = _dedup_frame(cfg, plan, spans, scratch)
    if scratch.exists():
        scratch.rmdir()
    starts = itertools.accumulate((n for _, _, n in spans), initial=0)
    _write_batches((
        pl.concat([marks.slice(start, n), pl.read_parquet(unit.folder / "rows.parquet", columns=_PASSED_THROUGH)], how="horizontal")
        .select(MARK_COLUMNS).with_columns(pl.col("source", "drop_reason").cast(pl.String))
        for (unit, _, n), start in zip(spans, starts, strict=False)  # starts ends with one more item: the total
    ), dest)
    return near_info


# runner.kind auto / processes computes the dedup marks and plans the outputs of this many rows or more in child processes.
DEDUP_CHILD_ROWS = 250_000


def _dedup_in_child(cfg: PipelineConfig, plan: CuratePlan) -> bool:
    """Whether the dedup marks are computed, and the outputs planned, in spawned children: for a large corpus on a
    local-process runner, so each step's high-water mark (Polars' allocator keeps what it freed: ~0.6 GiB after
    planning 3M rows, which it would carry into writing the outputs) is returned when the step ends."""
    if cfg.runner.kind not in ("auto", "processes"):
        return False
    return sum(n for _, _, n in _unit_spans(plan)) >= DEDUP_CHILD_ROWS


def publish_dedup(cfg: PipelineConfig, plan: CuratePlan) -> None:
    """Compute and publish ``plan.dedup`` (marks.parquet, near_dedup.json) atomically, unless another run did."""
    with atomic_dir(plan.dedup, cfg.verify_reuse) as tmp:
        if tmp is not None:  # else another run published the same marks first
            write_json_atomic(tmp / "near_dedup.json", _dedup_marks(cfg, plan, tmp / "_spill", tmp / "marks.parquet"))


# Where plan_into leaves the keys of each output, inside the output folder's temp, until the outputs are written.
PLAN_DIR = "_plan"


def plan_into(cfg: PipelineConfig, plan: CuratePlan, folder: Path) -> dict[str, Any]:
    """Plan the outputs from the published marks (``plan_outputs``): the keys of each output, in order, as
    ``<folder>/_plan/{train,heldout,rejected}.parquet``, and the length plot; returns the stats."""
    marks = pl.scan_parquet(plan.dedup / "marks.parquet")
    train, heldout, rejected, stats = plan_outputs(marks, read_json(plan.dedup / "near_dedup.json"), cfg.curate, cfg.seed)
    (folder / PLAN_DIR).mkdir()
    for name, frame in (("train", train), ("heldout", heldout), ("rejected", rejected)):
        frame.write_parquet(folder / PLAN_DIR / f"{name}.parquet", compression="lz4")
    plots.overlaid_histograms(
        {
            "read": marks.select(pl.col("n_chars").drop_nulls()).collect().to_series().to_numpy(),
            "kept": marks.filter(pl.col("drop_reason").is_null()).select(pl.col("n_chars").drop_nulls()).collect().to_series().to_numpy(),
        },
        folder / "lengths_before_after.png", "Conversation length before and after curation", "characters",
    )
    return stats


def run_curate_global(cfg: PipelineConfig, plan: CuratePlan, units: Sequence[StageOutput]) -> StageOutput:
    """Curation's global step over the finished unit folders: exact and near dedup across every source
    and shard plus the held-out split (``curate_dedup/``: one row of marks per input row), then mixing,
    the report and the output files (``curate/``).

    ``units`` are ``run_curate_unit``'s results for ``plan.units``, in plan order, from any runner: the
    output bytes are the same. Memory: the dedup reads only the marks and the dedup keys the units
    stored (hashes, band keys), plus the folded text of near-dup candidates; the outputs take the
    conversations unit by unit (``write_ordered``), so the corpus is never in memory at once.
    """
    if is_complete(plan.out, cfg.verify_reuse):
        return StageOutput(plan.out, reused=True)
    if not plan.units:
        raise ValueError(f"{plan.out} was complete when curation was planned and is gone now; plan again (plan_curate)")
    got = [u.path for u in units]
    if got != [u.folder for u in plan.units] or not all(is_complete(p) for p in got):
        raise ValueError(
            f"run_curate_global needs the finished folders of the plan's {len(plan.units)} units in plan order, got {len(got)} "
            "(run run_curate_unit on each of plan.units, and pass its results in the same order)"
        )
    cache: dict[str, Any] = {
        "sources_reused": [u.label for u, r in zip(plan.units, units, strict=True) if r.reused],
        "sources_computed": [u.label for u, r in zip(plan.units, units, strict=True) if not r.reused],
        "dedup_reused": is_complete(plan.dedup),
    }
    in_child = _dedup_in_child(cfg, plan)
    if not cache["dedup_reused"]:
        if in_child:
            with _spawned_pool(1) as pool:
                pool.submit(publish_dedup, cfg, plan).result()
        else:
            publish_dedup(cfg, plan)
    out = plan.out
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        write_inputs(tmp, cfg.work_dir, [plan.dedup, *(u.folder for u in plan.units)])
        if in_child:
            with _spawned_pool(1) as pool:
                stats = pool.submit(plan_into, cfg, plan, tmp).result()
        else:
            stats = plan_into(cfg, plan, tmp)
        stats["cache"] = cache
        keys = {name: pl.read_parquet(tmp / PLAN_DIR / f"{name}.parquet") for name in ("train", "heldout", "rejected")}
        write_ordered({
            tmp / "train.parquet": (keys["train"], CANONICAL_COLUMNS),
            tmp / "heldout.parquet": (keys["heldout"], CANONICAL_COLUMNS),
            tmp / "rejected.parquet": (keys["rejected"], REJECTED_COLUMNS),
        }, plan, tmp / "_buckets", workers=cfg.runner.workers)
        del keys
        shutil.rmtree(tmp / PLAN_DIR)
        stats["drop_samples"] = _drop_samples(tmp / "rejected.parquet", tmp / "drop_samples", cfg.seed)
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.curate))
        plots.bar_counts(stats["dropped_by_reason"], tmp / "drop_reasons.png", "Rows dropped by reason")
        plots.bar_counts(
            {name: st["mixed_train_rows"] for name, st in stats["per_source"].items()}, tmp / "source_share.png",
            "Train rows per source after mixing",
        )
        stats["digest"] = digest_files([tmp / "train.parquet", tmp / "heldout.parquet"])
        write_json_atomic(tmp / "stats.json", stats)
        (tmp / "report.md").write_text(report_markdown(stats), encoding="utf-8")
        if stats.get("near_dedup", {}).get("cluster_sizes"):
            plots.histogram(stats["near_dedup"]["cluster_sizes"], tmp / "near_dup_clusters.png", "Near-duplicate clusters", "rows per cluster")
    return StageOutput(out, reused=False)


def run_curate(cfg: PipelineConfig) -> StageOutput:
    """Curate the configured sources into train/heldout/rejected Parquet files, stats and a report.

    Here the units run one after another; the curate flow can map them over threads, Dask or Ray instead
    (same folders, same bytes).
    """
    plan = plan_curate(cfg)
    return run_curate_global(cfg, plan, run_curate_units(cfg, plan.units))


# runner.kind=auto starts a process pool only for this much input: a worker costs ~1.5 s to start.
AUTO_PARALLEL_BYTES = 32 << 20


def unit_pool_size(cfg: PipelineConfig, units: Sequence[CurateUnit]) -> int:
    """How many local processes ``run_curate_units`` runs these units on (1 = in this process): ``runner.workers``
    for runner.kind=processes, and for auto when two or more units are to be computed from enough bytes of files."""
    todo = [u for u in units if not is_complete(u.folder, cfg.verify_reuse)]
    if cfg.runner.kind not in ("auto", "processes") or len(todo) < 2 or cfg.runner.workers < 2:
        return 1
    if cfg.runner.kind == "auto":
        sources = {s.name: s for s in cfg.curate.sources}
        size = 0
        for u in todo:
            files = u.files if u.files is not None else [] if sources[u.source].path is None else source_files(sources[u.source])
            size += sum(Path(f).stat().st_size for f in files)
        if size < AUTO_PARALLEL_BYTES:
            return 1
    return min(cfg.runner.workers, len(todo))


@contextmanager
def _spawned_pool(workers: int) -> Iterator[Any]:
    """A pool of spawned processes; a worker that dies (most often: the calling script re-runs itself in every
    spawned worker) becomes an error that names the fix."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a curation worker process died. runner.kind=auto or processes spawns workers that import the script "
            "you ran: put its entry under `if __name__ == \"__main__\":`, or set runner.kind=sequential "
            "(also check the machine's memory: a worker killed for memory ends the same way)"
        ) from exc


def run_curate_units(cfg: PipelineConfig, units: Sequence[CurateUnit]) -> list[StageOutput]:
    """``run_curate_unit`` for each unit, in order: here, or on a pool of local processes (``unit_pool_size``).

    Workers are spawned, not forked (a fork copies Polars' thread pool in whatever state it is), and each writes
    its own unit folder, so the folders and the bytes are the same either way.
    """
    workers = unit_pool_size(cfg, units)
    if workers == 1:
        return [run_curate_unit(cfg, u) for u in units]
    with _spawned_pool(workers) as pool:
        futures = {u: pool.submit(run_curate_unit, cfg, u) for u in units}
        return [futures[u].result() for u in units]
