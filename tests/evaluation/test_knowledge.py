"""The knowledge suite through lm-eval on a real (tiny) model, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_knowledge_runs_lm_eval_on_a_real_model(tiny_model: Path, tmp_path: Path) -> None:
    from sft_engine.evaluation.items import multiple_choice_items
    from sft_engine.evaluation.knowledge import run_multiple_choice
    from sft_engine.model import load_model, load_tokenizer

    sets = {name: list(multiple_choice_items(name)[:3]) for name in ("boolq", "piqa")}
    scores, items, paired = run_multiple_choice(load_model(tiny_model), load_tokenizer(tiny_model), sets, tmp_path, "knowledge", batch_size=4)
    assert sorted(scores) == ["boolq", "piqa"] and all(s["n"] == 3 for s in scores.values())
    assert [it["id"] for it in items] == ["boolq-0", "boolq-1", "boolq-2", "piqa-0", "piqa-1", "piqa-2"]
    for it in items:
        assert it["chosen"] == max(range(len(it["loglikelihoods"])), key=it["loglikelihoods"].__getitem__)
        assert it["correct"] == (it["chosen"] == it["gold"])
    assert scores["piqa"]["acc"] == pytest.approx(sum(it["correct"] for it in items[3:]) / 3)
    assert paired["piqa.acc"] == ([float(it["correct"]) for it in items[3:]], [1.0] * 3)
    assert paired["boolq.acc_norm"][0] == [float(it["correct_norm"]) for it in items[:3]]
    assert 0 <= scores["boolq"]["acc_norm"] <= 1 and scores["boolq"]["acc_stderr"] >= 0
