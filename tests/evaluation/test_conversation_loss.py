"""A team's own loss suite: conversations in curation's formats, each item's loss on its own, on real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sft_engine.evaluation.conversation_loss import LossSuite, LossSuiteSettings
from sft_engine.evaluation.suite import Scorer, SuiteError

CHATS = Path(__file__).parents[1] / "data" / "suites" / "support_chats.jsonl"


def _suite(path: Path = CHATS, **settings: object) -> LossSuite:
    st = LossSuiteSettings(name="support", kind="loss", path=str(path), **settings)
    return LossSuite(st.name, st)


def test_conversations_in_every_shape_become_canonical_rows() -> None:
    rows = _suite().conversations()
    # OpenAI messages, ShareGPT, and a multi-turn conversation with a system prompt.
    assert [[m["role"] for m in r["messages"]] for r in rows] == [
        ["user", "assistant"], ["user", "assistant"], ["system", "user", "assistant", "user", "assistant"],
    ]
    assert _suite().decontam_sets()["support"]()[1] == "When are you open? We are open from 9 to 5, Monday to Friday."


def test_a_row_that_is_not_a_conversation_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(SuiteError, match=r"evaluate.suites 'support' \(.*bad.jsonl, item 0\): the conversation has no assistant turn"):
        _suite(path).check()
    path.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(SuiteError, match=r"item 0\): not a conversation curation can read \(normalize_unknown_shape: no format recognizes"):
        _suite(path).check()


@pytest.mark.slow
def test_smollm2_loss_per_conversation_and_overall(smollm2, tmp_path: Path) -> None:
    model, tokenizer = smollm2
    result = _suite().score(Scorer(model, tokenizer, 2, 4, tmp_path, tmp_path))
    got = [(r["id"], r["tokens"]) for r in result.records]
    # Supervised tokens: each assistant reply and its <|im_end|>; the two replies of the last conversation together.
    assert got == [("reset", 12.0), ("hours", 15.0), ("refund", 16.0)]
    sums = [r["loss_sum"] for r in result.records]
    assert result.metrics["loss"] == pytest.approx(sum(sums) / 43) and result.metrics["supervised_tokens"] == 43.0
    assert result.metrics["perplexity"] == pytest.approx(math.exp(result.metrics["loss"]))
    assert [round(r["loss"], 2) for r in result.records] == [4.22, 2.13, 2.19]
    assert result.paired["loss"] == (sums, [12.0, 15.0, 16.0])


@pytest.mark.slow
def test_each_item_loss_equals_the_models_own_loss_on_its_labels(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from sft_engine.chat import Labeler, Planner
    from sft_engine.config import HistoryPolicy, MaskStrategy
    from sft_engine.model import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model), load_tokenizer(tiny_model)
    suite = _suite()
    result = suite.score(Scorer(model, tokenizer, 2, 4, tmp_path, tmp_path))
    tok = Labeler(tokenizer).label(Planner(tokenizer, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND).plan(suite.conversations()))
    for r, ids, labels in zip(result.records, tok.input_ids, tok.labels, strict=True):
        with torch.no_grad():
                out = model(input_ids=torch.as_tensor(ids).unsqueeze(0), labels=torch.as_tensor(labels).unsqueeze(0))
        assert r["loss"] == pytest.approx(float(out.loss), rel=1e-5)  # transformers' own mean over the same labels
