"""The curation stage on the public-shape fixtures: counts that balance, repairs counted, drop samples and report."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from sft_engine.config import load_config
from sft_engine.curation import stage as curation
from sft_engine.curation.schema import CANONICAL_COLUMNS, row_dicts

DATA = Path(__file__).parent.parent / "data" / "formats"


def test_stage_on_every_fixture_counts_repairs_and_samples_drops(tmp_path: Path) -> None:
    names = ["openai_tools.jsonl", "openai_parts.jsonl", "sharegpt_tools.json", "sharegpt_split.jsonl", "truncated_array.json"]
    sources = ", ".join(f"{{name: {n.split('.')[0]}, path: '{DATA / n}'}}" for n in names)
    cfg = load_config(None, [f"work_dir={tmp_path}", f"curate.sources=[{sources}]", "curate.heldout_fraction=0.0",
                             "curate.min_chars=null", "curate.decontaminate.include_evaluation_sets=false"])
    out = curation.run_curate(cfg).path
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == 3 + 3 + 3 + 4 + 4 == stats["rows_kept"] + sum(stats["dropped_by_reason"].values())
    assert stats["dropped_by_reason"] == {
        "normalize_bad_tool_arguments": 1, "normalize_bad_tool_call": 1, "normalize_non_text_content": 1, "read_truncated": 1,
        "validate_bad_turn_order": 1,  # the split chunk in which only the assistant speaks
    }
    assert stats["repaired_by_kind"] == {"leading_assistant_removed": 2, "merged_consecutive_user": 1, "trailing_user_removed": 1}
    assert stats["rows_repaired"] == 3
    assert stats["per_source"]["sharegpt_split"]["repaired_by_kind"] == stats["repaired_by_kind"]
    train = pl.read_parquet(out / "train.parquet")
    assert train.columns == CANONICAL_COLUMNS
    tool_rows = [r for r in row_dicts(train) if r.get("tools")]
    assert sorted((r["source"], r["row"]) for r in tool_rows) == [("openai_tools", 1), ("openai_tools", 2), ("sharegpt_tools", 1), ("sharegpt_tools", 2)]
    rejected = pl.read_parquet(out / "rejected.parquet")
    cut = rejected.filter(pl.col("drop_reason") == "read_truncated").row(0, named=True)
    assert cut["drop_detail"].startswith("truncated_array.json: the JSON array breaks at byte 201 of 224")
    # Up to 20 sampled rows per reason, each with its detail and conversation or raw preview, and a page showing them.
    samples = out / "drop_samples"
    assert sorted(p.name for p in samples.iterdir()) == sorted([f"{r}.jsonl" for r in stats["dropped_by_reason"]] + ["index.html"])
    (bad_call,) = [json.loads(line) for line in (samples / "normalize_bad_tool_call.jsonl").read_text().splitlines()]
    assert (bad_call["source"], bad_call["row"], bad_call["drop_detail"]) == (
        "sharegpt_tools", 3, "conversations[1]: the call is not JSON (unexpected character, expected a JSON value: line 1 column 1 (char 0))")
    assert bad_call["raw"].startswith('{"conversations":')
    assert "normalize_bad_tool_call: 1 of 1 rows" in (samples / "index.html").read_text()
    assert stats["drop_samples"] == dict.fromkeys(stats["dropped_by_reason"], 1)
    report = (out / "report.md").read_text()
    assert "| `repaired_leading_assistant_removed` | 2 |" in report
    assert "| [`read_truncated`](drop_samples/read_truncated.jsonl) | 1 | The broken tail of a JSON array" in report
