"""Curation end to end in memory: the same steps the stage runs per unit and globally, for tests and notebooks.

    read_source   files -> records -> canonical rows (formats) -> repairs        (sources, read, formats, repair)
    check_rows    row-local rules: validation, length, quality, decontamination   (rules, decontam)
                  + the row-local halves of dedup and the split                  (dedup, near_dedup)
    dedup_and_split  exact and near dedup across every source, held-out split    (dedup)
    finalize      mix, stats, the output frames                                  (mix)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from sft_engine.curation.dedup import dedup_and_split, with_dedup_keys
from sft_engine.curation.mix import finalize
from sft_engine.curation.rules import apply_rules
from sft_engine.curation.sources import read_source

if TYPE_CHECKING:
    from sft_engine.config import CurateConfig


def check_rows(df: pl.DataFrame, cfg: CurateConfig, seed: int = 0) -> pl.DataFrame:
    """Row-local steps on one source or shard (cacheable per unit): every rule of ``rules.ROW_RULES``, then the
    row-local halves of the global steps (``dedup.with_dedup_keys``), so those read a few bytes a row, not the text."""
    return with_dedup_keys(apply_rules(df, cfg), cfg, seed)


def curate(cfg: CurateConfig, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Run curation end to end in memory. Returns (train, heldout, rejected, stats)."""
    checked = pl.concat([check_rows(read_source(s, cfg, seed), cfg, seed) for s in cfg.sources])
    curated, near_info = dedup_and_split(checked, cfg, seed)
    return finalize(curated, near_info, cfg, seed)
