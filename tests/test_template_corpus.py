"""The mask self-check over every chat template llama.cpp ships (``tests/template_corpus.py``)."""

from __future__ import annotations

import pytest

from tests import template_corpus as corpus


@pytest.fixture(scope="module")
def reports():
    if not corpus.templates_dir().is_dir():
        pytest.fail(f"template corpus missing in {corpus.templates_dir()}: run `make assets`")
    return corpus.run_corpus()


@pytest.mark.slow
def test_at_least_95_percent_of_rendered_pairs_pass_and_none_crashes(reports) -> None:
    # run_corpus raising would fail the fixture: every (template, shape) pair ends as pass, fail or rejected.
    assert len(reports) >= 90  # 70 templates, 26 of them again with enable_thinking=true
    counts = corpus.summarize(reports)
    assert counts["pass"] / (counts["pass"] + counts["fail"]) >= 0.95
    assert all(s.result in ("pass", "fail", "rejected") for r in reports for s in r.results)
    # The models most often fine-tuned pass every shape they render.
    must_pass = ("Qwen-Qwen3-0.6B", "DeepSeek-R1-Distill-Qwen", "Phi-3.5", "Mistral-Nemo", "gpt-oss", "gemma-4-31B-it.jinja",
                 "Llama-3.1-8B", "Hermes-3")
    assert {(t, s) for t, s, _ in corpus.failures(reports)} <= set(corpus.EXPLAINED), "a new failure: explain it or fix it"
    for r in reports:
        if any(m in r.template for m in must_pass):
            assert r.ok, (r.template, [s.why for s in r.results if s.result == "fail"])


@pytest.mark.slow
def test_the_corpus_document_lists_exactly_the_current_results(reports) -> None:
    # docs/template_corpus.md is regenerated with `python -m tests.template_corpus --out docs/template_corpus.md`.
    assert corpus.DOC.read_text() == corpus.render_doc(reports)
