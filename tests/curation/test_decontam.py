from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from sft_engine.config import CurateConfig, DecontamConfig
from sft_engine.curation.curate import curate
from sft_engine.curation.decontam import eval_items, find_contamination

LONG_Q = "Which planet in our solar system has the longest day measured against its own orbit around the sun today?"


def _eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "evalset.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"question": "What is 2+2?", "answer": "4"}, {"question": LONG_Q}]) + "\n")
    return path


def test_long_items_match_by_13_gram_and_short_items_by_whole_text(tmp_path: Path) -> None:
    cfg = DecontamConfig(eval_sets=[{"name": "quiz", "path": str(_eval_file(tmp_path)), "fields": ["question"]}])
    words = LONG_Q.split()
    texts = pl.Series([
        "Tell me: " + " ".join(words[2:15]).upper() + " please",  # 13 consecutive words of item 1, other case
        "Tell me: " + " ".join(words[2:14]) + " please",  # only 12: no match
        "quick one, what is 2+2? thanks",  # the whole short item 0
        "what is 2-2?",  # differs by the operator: no match
    ])
    assert find_contamination(texts, cfg) == ["quiz:1", None, "quiz:0", None]


def test_builtin_task_eval_set_is_dropped_from_training_with_item_reported(tmp_path: Path) -> None:
    items = eval_items(DecontamConfig(eval_sets=[{"name": "tasks", "builtin": "verifiable_tasks_eval"}]).eval_sets[0])
    instr, inp = items[7].split("\n\n")
    rows = [
        {"instruction": instr, "input": inp, "output": "whatever"},  # an eval prompt leaked into training data
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = {"sources": [{"name": "s", "path": str(src)}], "heldout_fraction": 0.0}
    train, _, rejected, stats = curate(CurateConfig(**base, decontaminate={"eval_sets": [{"name": "tasks", "builtin": "verifiable_tasks_eval"}]}))
    assert rejected.select("row", "drop_reason", "decontam_match").rows() == [(1, "decontam_tasks", "tasks:7")]
    assert train["row"].to_list() == [2]
    assert stats["decontamination"]["matches_by_eval_set"] == {"tasks": 1}
    assert stats["decontamination"]["matches"] == [("s", 1, "tasks:7")]
    flagged = curate(CurateConfig(**base, decontaminate={"action": "flag", "eval_sets": [{"name": "tasks", "builtin": "verifiable_tasks_eval"}]}))
    assert flagged[0].height == 2 and flagged[3]["decontamination"]["matches"] == [("s", 1, "tasks:7")]
