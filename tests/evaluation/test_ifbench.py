"""IFBench rules on real checkers, with the NLTK fallbacks offline."""

from __future__ import annotations

import pytest

from sft_engine.evaluation.ifbench import check_response, score_ifbench
from sft_engine.evaluation.items import ifbench_items


def _item(rule: str, **kwargs: object) -> dict:
    return {"id": "t", "prompt": "p", "instruction_id_list": [rule], "kwargs": [kwargs]}


def test_ifbench_rules_that_need_nltk_data_work_offline() -> None:
    verb = _item("words:start_verb")
    assert check_response(verb, "Write the answer down.") == [{"instruction_id": "words:start_verb", "strict": True, "loose": True}]
    assert check_response(verb, "The answer is down.")[0]["strict"] is False
    stop = _item("ratio:stop_words", percentage=27.0)
    assert check_response(stop, "Quick brown foxes jump over lazy dogs")[0]["strict"] is True  # 1 of 7 words
    assert check_response(stop, "the cat and the dog")[0]["strict"] is False  # 3 of 5
    # Every packaged prompt is scorable: no instruction id without a checker, no missing-data crash.
    items = list(ifbench_items())
    scores, records = score_ifbench(items, ["Write a list. It has two lines."] * len(items))
    assert scores["n"] == 294 and len(records) == 294
    assert 0 <= scores["instruction_strict"] <= scores["instruction_loose"] <= 1
    with pytest.raises(KeyError, match="no checker for"):
        check_response(_item("words:no_such_rule"), "x")


def test_ifbench_scores_prompt_and_instruction_level_strict_and_loose() -> None:
    items = [_item("words:start_verb"), {**_item("words:start_verb"), "id": "u"}]
    # Strict fails on the markdown-bolded opener; loose strips the asterisks and passes it.
    scores, records = score_ifbench(items, ["**Write** it.", "The end."])
    assert [r["prompt_strict"] for r in records] == [False, False]
    assert [r["prompt_loose"] for r in records] == [True, False]
    assert scores["prompt_strict"] == 0.0 and scores["prompt_loose"] == 0.5 and scores["instruction_loose"] == 0.5
    assert scores["prompt_loose_stderr"] == pytest.approx(0.5)
