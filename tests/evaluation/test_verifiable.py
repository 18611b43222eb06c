"""The verifiable suite: exact match of the line after the last 'Answer:'."""

from __future__ import annotations

import pytest

from sft_engine.evaluation.verifiable import score_answers


def test_verifiable_tasks_score_the_answer_line_exactly() -> None:
    items = [{"id": "a", "prompt": "2+2", "answer": "4"}, {"id": "b", "prompt": "3+3", "answer": "6"}]
    scores, records = score_answers(items, ["2 + 2 = 4\nAnswer: 4", "Answer: 66"])
    assert [r["correct"] for r in records] == [True, False]
    assert [r["suite"] for r in records] == ["verifiable", "verifiable"]
    assert scores == {"exact_match": 0.5, "exact_match_stderr": pytest.approx(0.5), "n": 2.0}
