"""The bad-input corpus (tests/data/bad/): every file gives a clear outcome, never a crash, and counts balance."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_engine.config import CurateConfig
from sft_engine.curation.curate import curate
from sft_engine.curation.read import SourceError

BAD = Path(__file__).parent.parent / "data" / "bad"

EXPECTED = {
    "truncated.jsonl": {"read_bad_json": 1},
    "non_utf8.jsonl": {"read_bad_utf8": 1},
    "wrong_types.jsonl": {"normalize_bad_type": 3, "normalize_not_an_object": 1},
    "missing_roles.jsonl": {"normalize_missing_field": 2, "validate_unknown_role": 1},
    "giant_row.jsonl": {"read_row_too_large": 1},
    "empty.jsonl": {},
    "mixed_schemas.jsonl": {"normalize_unknown_shape": 1},
}
KEPT = {"truncated.jsonl": 1, "non_utf8.jsonl": 1, "wrong_types.jsonl": 1, "missing_roles.jsonl": 0,
        "giant_row.jsonl": 1, "empty.jsonl": 0, "mixed_schemas.jsonl": 4}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_quarantined_with_reasons_and_balances(name: str) -> None:
    cfg = CurateConfig(sources=[{"name": "bad", "path": str(BAD / name)}], heldout_fraction=0.0, min_chars=None, near_dedup={"enabled": False})
    train, _, _, stats = curate(cfg)
    assert stats["dropped_by_reason"] == EXPECTED[name]
    assert stats["rows_kept"] == KEPT[name] == train.height
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values())
    assert stats["per_source"]["bad"]["rows_in"] == stats["rows_in"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated_gzip.jsonl.gz", "truncated_gzip.jsonl.gz' is truncated or corrupt"),
        ("not_an_array.json", "not_an_array.json' holds a JSON dict, expected an array of rows"),
    ],
)
def test_unreadable_file_is_an_error_naming_the_file(name: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        curate(CurateConfig(sources=[{"name": "bad", "path": str(BAD / name)}]))


def test_whole_corpus_in_one_run_balances() -> None:
    sources = [{"name": p.stem.replace(".", "_"), "path": str(p)} for p in sorted(BAD.glob("*.jsonl"))]
    _, _, _, stats = curate(CurateConfig(sources=sources, heldout_fraction=0.0, min_chars=None))
    assert stats["rows_in"] == sum(s["rows_in"] for s in stats["per_source"].values())
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values())
