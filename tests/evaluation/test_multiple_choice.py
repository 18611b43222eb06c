"""A team's own multiple-choice suite: field mapping, index checks, lm-eval on SmolLM2 and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_engine.evaluation.multiple_choice import MultipleChoiceSuite, MultipleChoiceSuiteSettings
from sft_engine.evaluation.suite import Scorer, SuiteError

CAPITALS = Path(__file__).parents[1] / "data" / "suites" / "capitals.jsonl"
MAPPED = {"question_field": "q", "choices_field": "options", "gold_field": "label"}


def _suite(path: Path = CAPITALS, **settings: object) -> MultipleChoiceSuite:
    st = MultipleChoiceSuiteSettings(name="caps", kind="multiple_choice", path=str(path), **{**MAPPED, **settings})
    return MultipleChoiceSuite(st.name, st)


def test_items_are_mapped_from_the_file_fields() -> None:
    assert _suite().items()[1] == {"id": "jp", "question": "What is the capital of Japan?", "choices": ["Tokyo", "Seoul", "Beijing"], "gold": 0}
    assert _suite().decontam_sets()["caps"]() == [
        "What is the capital of France? Paris", "What is the capital of Japan? Tokyo", "What is the capital of Italy? Rome",
    ]
    assert _suite(decontaminate=False).decontam_sets() == {}


def test_a_gold_index_out_of_range_or_missing_choices_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"q": "a?", "options": ["x", "y"], "label": 1}) + "\n" + json.dumps({"q": "b?", "options": ["x", "y"], "label": 2}) + "\n")
    with pytest.raises(SuiteError, match=r"evaluate.suites 'caps' \(.*mc.jsonl, item 1\): 'label' = 2 is not an index into its 2 choices \(0-1\)"):
        _suite(path).check()
    path.write_text(json.dumps({"q": "a?", "options": "x", "label": 0}) + "\n")
    with pytest.raises(SuiteError, match=r"item 0\): 'options' must be a list of at least two strings"):
        _suite(path).check()
    with pytest.raises(SuiteError, match=r"item 0\): no field 'question'"):
        _suite(question_field="question").check()


@pytest.mark.slow
def test_smollm2_knows_the_capitals(smollm2, tmp_path: Path) -> None:
    result = _suite().score(Scorer(*smollm2, micro_batch_size=2, gen_batch_size=4, heldout=tmp_path, scratch=tmp_path))
    assert [(r["id"], r["gold"], r["chosen"], r["correct"]) for r in result.records] == [
        ("fr", 1, 1, True), ("jp", 0, 0, True), ("it", 2, 2, True),
    ]
    assert {k: result.metrics[k] for k in ("acc", "acc_stderr", "acc_norm", "n")} == {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": 1.0, "n": 3.0}
    assert result.paired["acc"] == ([1.0, 1.0, 1.0], [1.0] * 3)


@pytest.mark.slow
def test_the_tiny_model_chooses_by_log_likelihood_with_a_few_shot_prompt(tiny_model: Path, tmp_path: Path) -> None:
    from sft_engine.model import load_model, load_tokenizer

    result = _suite(num_fewshot=1).score(Scorer(load_model(tiny_model), load_tokenizer(tiny_model), 2, 4, tmp_path, tmp_path))
    for r in result.records:
        assert r["chosen"] == max(range(3), key=r["loglikelihoods"].__getitem__) and r["correct"] == (r["chosen"] == r["gold"])
    assert result.metrics["acc"] == pytest.approx(sum(r["correct"] for r in result.records) / 3)
