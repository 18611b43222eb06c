"""Config building blocks shared by the stage configs and the evaluation suites' settings: the strict base model
and the cache-key declarations every field carries."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# ---- cache keys, declared at the fields ---------------------------------------------------------
# Every field of every config says which stage cache keys hash it (``keyed``), or why it cannot change any
# output (``unkeyed``); a field holding sub-configs whose own fields say so is ``PER_FIELD``. The key functions
# read these markers (``cache_view``), and tests/test_cache_keys.py fails on any field that says neither, so a
# new field can never be missing from a key and silently reuse stale outputs.
CACHE_LEVELS = (
    "curate.rows",  # a source's (or shard's) row-local checks: curation's unit folders
    "curate.dedup",  # the global dedup and split across sources: curate_dedup/
    "curate.mix",  # the mixed splits and the report: curate/
    "prepare",  # tokenized, masked, packed rows: prepare/
    "train",  # the trained model: train/
    "evaluate.score",  # settings every suite's scores depend on (precision, batch sizes): evaluate_models/
    "evaluate.suite",  # one suite's own settings: its scores per model in evaluate_models/
    "evaluate",  # the base-vs-tuned comparison: evaluate/
)


def keyed(*levels: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that the cache keys of ``levels`` hash."""
    assert levels and set(levels) <= set(CACHE_LEVELS), levels
    return {"cache": list(levels)}


def unkeyed(why: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that changes no stage output, and why."""
    return {"cache": [], "not_keyed_because": why}


PER_FIELD: dict[str, Any] = {"cache": "per_field"}


def cache_marker(field: Any) -> Any:
    """A field's marker: a list of levels ([] with a reason: none), 'per_field', or None when it has none."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("cache")


def cache_view(cfg: BaseModel, level: str) -> dict[str, Any]:
    """The fields of ``cfg`` that the ``level`` key hashes, as JSON values, through PER_FIELD sub-configs."""
    assert level in CACHE_LEVELS, level
    out: dict[str, Any] = {}
    for name, field in type(cfg).model_fields.items():
        marker, value = cache_marker(field), getattr(cfg, name)
        if marker == "per_field":
            if isinstance(value, list):
                out[name] = [cache_view(v, level) for v in value]
            else:
                out[name] = None if value is None else cache_view(value, level)
        elif marker is not None and level in marker:
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [v.model_dump(mode="json") if isinstance(v, BaseModel) else _jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    return value


class Strict(BaseModel):
    """A config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
