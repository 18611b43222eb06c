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
    items = eval_items(DecontamConfig(eval_sets=[{"name": "tasks", "builtin": "verifiable"}]).eval_sets[0])
    instr, inp = items[7].split("\n\n")
    rows = [
        {"instruction": instr, "input": inp, "output": "whatever"},  # an eval prompt leaked into training data
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = {"sources": [{"name": "s", "path": str(src)}], "heldout_fraction": 0.0}
    train, _, rejected, stats = curate(CurateConfig(**base, decontaminate={"eval_sets": [{"name": "tasks", "builtin": "verifiable"}]}))
    assert rejected.select("row", "drop_reason", "decontam_match").rows() == [(1, "decontam_tasks", "tasks:7")]
    assert train["row"].to_list() == [2]
    assert stats["decontamination"]["matches_by_eval_set"] == {"tasks": 1}
    assert stats["decontamination"]["matches"] == [("s", 1, "tasks:7")]
    flagged = curate(CurateConfig(**base, decontaminate={"action": "flag", "eval_sets": [{"name": "tasks", "builtin": "verifiable"}]}))
    assert flagged[0].height == 2 and flagged[3]["decontamination"]["matches"] == [("s", 1, "tasks:7")]


def test_a_teams_own_evaluation_suite_is_decontaminated_against(tmp_path: Path) -> None:
    from sft_engine.config import load_config

    suite_file = Path(__file__).parents[2] / "conf" / "suites" / "word_problems.jsonl"
    leaked = json.loads(suite_file.read_text().splitlines()[3])["question"]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": f"Solve this: {leaked}", "output": "180 kilometers."},  # a suite item leaked into training data
        {"instruction": "Name a colour.", "output": "Blue."},
    ]) + "\n")
    suites = f"evaluate.suites=[{{name: word_problems, kind: generation, path: {suite_file}, prompt_field: question, metric: numeric}}]"
    cfg = load_config(None, [f"curate.sources=[{{name: s, path: {src}}}]", "curate.heldout_fraction=0.0", suites,
                             "evaluate.knowledge.sets=[]", "evaluate.ifbench.limit=0", "evaluate.verifiable.limit=0"])
    assert [(es.name, es.suite) for es in cfg.curate.decontaminate.eval_sets] == [("word_problems", {
        "name": "word_problems", "kind": "generation", "path": str(suite_file), "id_field": "id", "prompt_field": "question",
        "answer_field": "answer", "system_prompt": None,
    })]
    train, _, rejected, _ = curate(cfg.curate)
    assert rejected.select("row", "drop_reason", "decontam_match").rows() == [(1, "decontam_word_problems", "word_problems:3")]
    assert train["row"].to_list() == [2]
    # Off for one suite: nothing is checked for it.
    off = load_config(None, [f"curate.sources=[{{name: s, path: {src}}}]", suites.replace("metric: numeric", "metric: numeric, decontaminate: false"),
                             "evaluate.knowledge.sets=[]", "evaluate.ifbench.limit=0", "evaluate.verifiable.limit=0"])
    assert off.curate.decontaminate.eval_sets == []
