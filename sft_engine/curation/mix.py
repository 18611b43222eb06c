"""Mixing and accounting: the train split resampled per source, the stats that always balance, and the output plan.

Everything here works on the marks (source, row, drop reason, split, repairs: a few columns a row), never on the
text: ``plan_outputs`` returns the keys of each output file in order, and ``attach`` joins the conversations to
them while the files are written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from sft_engine.curation.schema import CANONICAL_COLUMNS, KEY

if TYPE_CHECKING:
    from sft_engine.config import CurateConfig, SourceConfig

# What the global steps keep of each row besides its text.
MARK_COLUMNS = ["source", "row", "drop_reason", "dup_of", "split", "decontam_match", "n_chars", "repairs"]
REJECTED_COLUMNS = ["source", "row", "drop_reason", "drop_detail", "dup_of", "decontam_match", "repairs", "raw", "messages", "tools",
                    "chat_template_kwargs"]


def mix_train(kept: pl.DataFrame, sources: list[SourceConfig], seed: int) -> pl.DataFrame:
    """Resample the train split per source to its target (target_rows, else weight x rows; capped by
    max_rows): whole copies plus a seeded sample of the remainder, then one seeded shuffle."""
    parts = []
    for i, s in enumerate(sources):
        rows = kept.filter(pl.col("source") == s.name)
        if rows.height == 0:
            continue
        target = s.target_rows if s.target_rows is not None else round(rows.height * s.weight)
        if s.max_rows is not None:
            target = min(target, s.max_rows)
        whole, rest = divmod(target, rows.height)
        chunks = [rows] * whole
        if rest:
            chunks.append(rows.sample(n=rest, seed=seed + i, shuffle=False))
        if chunks:
            parts.append(pl.concat(chunks))
    if not parts:
        return kept.clear()
    return pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed)


def curation_stats(curated: pl.DataFrame | pl.LazyFrame, mixed: pl.DataFrame, source_names: list[str]) -> dict[str, Any]:
    """Counts per source (every configured one, even if empty), per drop reason and per repair; the balance
    rows_in = kept + dropped always holds, and repaired rows are kept rows.

    From a few lazy group-bys, so the marks of millions of rows are never copied per source or per reason."""
    lf = curated.lazy()
    cells = lf.group_by("source", "drop_reason", "split").len().collect().rows()  # a handful of rows
    kept_rows = lf.filter(pl.col("drop_reason").is_null())
    repairs: list[tuple[str, str, int]] = []
    repaired = 0
    if "repairs" in lf.collect_schema().names():
        # A kept row per kind of repair (a row repaired twice over counts once per kind).
        repairs = (kept_rows.select("source", "repairs").explode("repairs").drop_nulls("repairs")
                   .group_by("source", "repairs").len().collect().rows())
        repaired = kept_rows.filter(pl.col("repairs").list.len() > 0).select(pl.len()).collect().item()
    mixed_rows = dict(mixed.group_by("source").len().rows())

    def count(source: str | None = None, kept: bool | None = None, split: str | None = None) -> int:
        return sum(n for src, reason, sp, n in cells if (source is None or src == source) and (kept is None or (reason is None) == kept)
                   and (split is None or sp == split))

    def by_reason(source: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for src, reason, _, n in cells:
            if reason is not None and (source is None or src == source):
                out[reason] = out.get(reason, 0) + n
        return dict(sorted(out.items()))

    def by_repair(source: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for src, kind, n in repairs:
            if source is None or src == source:
                out[kind] = out.get(kind, 0) + n
        return dict(sorted(out.items()))

    per_source: dict[str, Any] = {}
    for name in source_names:
        per_source[str(name)] = {
            "rows_in": count(name),
            "rows_kept": count(name, kept=True),
            "rows_dropped": count(name, kept=False),
            "kept_train": count(name, kept=True, split="train"),
            "kept_heldout": count(name, kept=True, split="heldout"),
            "dropped_by_reason": by_reason(name),
            "repaired_by_kind": by_repair(name),
            "mixed_train_rows": mixed_rows.get(name, 0),
        }
    stats = {
        "rows_in": sum(n for *_, n in cells),
        "rows_kept": count(kept=True),
        "rows_dropped": count(kept=False),
        "dropped_by_reason": by_reason(),
        "repaired_by_kind": by_repair(),
        "rows_repaired": int(repaired),
        "rows_train": count(kept=True, split="train"),
        "rows_heldout": count(kept=True, split="heldout"),
        "rows_train_mixed": mixed.height,
        "per_source": per_source,
    }
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values()), "curation counts do not balance"
    return stats


def plan_outputs(
    marks: pl.DataFrame | pl.LazyFrame, near_info: dict[str, Any], cfg: CurateConfig, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """From the marks alone (no text): the keys of the mixed train rows in their order, of the held-out
    rows, of the rejected rows (with their reasons), and the stats. The text is attached afterwards
    (``attach``), so the global step never holds every conversation at once.

    ``marks`` may be a scan: each output and count then reads only its columns (the marks of 3M rows read whole
    and filtered took ~0.6 GiB more)."""
    lf = marks.lazy()
    kept = lf.filter(pl.col("drop_reason").is_null())
    train = mix_train(kept.filter(pl.col("split") == "train").select(KEY).collect(), cfg.sources, seed)
    heldout = kept.filter(pl.col("split") == "heldout").select(KEY).collect()
    rejected = lf.filter(pl.col("drop_reason").is_not_null()).select(KEY + ["drop_reason", "dup_of", "decontam_match"]).collect()
    stats = curation_stats(lf, train, [s.name for s in cfg.sources])
    stats["near_dedup"] = near_info
    total = max(1, train.height)
    stats["mix"] = {
        "recipe": {s.name: {"weight": s.weight, "target_rows": s.target_rows, "max_rows": s.max_rows} for s in cfg.sources},
        "realized_share": {name: st["mixed_train_rows"] / total for name, st in stats["per_source"].items()},
    }
    matched = lf.filter(pl.col("decontam_match").is_not_null()).select("source", "row", "decontam_match").collect()
    stats["decontamination"] = {
        "action": cfg.decontaminate.action,
        "ngram": cfg.decontaminate.ngram,
        "matches_by_eval_set": dict(
            matched.group_by(pl.col("decontam_match").str.split(":").list.first().alias("set")).len().sort("set").rows()
        ),
        # Which eval item each matched row overlapped (first 1000), for the report.
        "matches": matched.select("source", "row", "decontam_match").head(1000).rows(),
    }
    return train, heldout, rejected, stats


def attach(keys: pl.DataFrame | pl.LazyFrame, content: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    """``keys`` (in their order, repeats kept) with the content columns of the same (source, row)."""
    return keys.lazy().join(content, on=KEY, how="left", maintain_order="left").select(columns)


# What the unit files hold besides the marks, for attaching to the output keys.
CONTENT_COLUMNS = [*KEY, "messages", "tools", "chat_template_kwargs", "repairs", "drop_detail", "raw"]


def finalize(
    curated: pl.DataFrame, near_info: dict[str, Any], cfg: CurateConfig, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Mix the kept train rows by source weight; return (train, heldout, rejected, stats), in memory."""
    train, heldout, rejected, stats = plan_outputs(curated, near_info, cfg, seed)
    content = curated.lazy().select(CONTENT_COLUMNS)
    return (
        attach(train, content, CANONICAL_COLUMNS).collect(),
        attach(heldout, content, CANONICAL_COLUMNS).collect(),
        attach(rejected, content, REJECTED_COLUMNS).collect(),
        stats,
    )
