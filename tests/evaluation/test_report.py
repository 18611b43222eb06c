"""The results table reads each metric's direction from the suites; the gate names every failed rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_engine.config import EvalConfig, GateConfig
from sft_engine.evaluation.registry import metric_specs
from sft_engine.evaluation.report import check_gate, format_table, results_table, table_metrics

SUITES = Path(__file__).parents[1] / "data" / "suites"


def _specs() -> dict:
    return metric_specs(EvalConfig(knowledge={"sets": ["mmlu"]}, suites=[
        {"name": "support", "kind": "loss", "path": str(SUITES / "support_chats.jsonl")},
        {"name": "arith", "kind": "generation", "path": str(SUITES / "arithmetic.jsonl"), "metric": "numeric"},
    ]))


SCORES = {
    "base": {"heldout.loss": 2.0, "knowledge.mmlu.acc": 0.40, "knowledge.mmlu.acc_stderr": 0.05, "verifiable.exact_match": 0.0,
             "support.loss": 2.5, "arith.numeric": 0.25},
    "tuned": {"heldout.loss": 1.5, "knowledge.mmlu.acc": 0.35, "knowledge.mmlu.acc_stderr": 0.05, "verifiable.exact_match": 0.5,
              "knowledge.mmlu.n": 100.0, "support.loss": 2.0, "support.loss_stderr": 0.1, "support.supervised_tokens": 43.0,
              "arith.numeric": 0.5, "arith.n": 4.0},
}


def test_results_table_rows_are_the_declared_metrics_with_their_directions() -> None:
    table = results_table(SCORES, _specs())
    assert [(r["metric"], r["higher_is_better"], r["forgetting"]) for r in table] == [
        ("heldout.loss", False, False), ("knowledge.mmlu.acc", True, True), ("verifiable.exact_match", True, False),
        ("support.loss", False, False), ("arith.numeric", True, False),
    ]  # counts (n, supervised_tokens) are carried in metrics.json, not rows; perplexity is absent from these scores
    assert table[1]["delta"] == pytest.approx(-0.05) and table[1]["tuned_stderr"] == 0.05
    assert table_metrics(table)["eval/heldout.loss/delta"] == -0.5
    assert table_metrics(table)["eval/support.loss/tuned_stderr"] == 0.1
    md = format_table(table)
    assert "| knowledge.mmlu.acc | ↑ | 0.4000 ±0.050 | 0.3500 ±0.050 | -0.0500 |" in md
    assert "| support.loss | ↓ | 2.5000 | 2.0000 ±0.100 | -0.5000 |" in md


def test_gate_reasons_for_knowledge_minimums_and_maximums() -> None:
    table = results_table(SCORES, _specs())
    assert check_gate(table, GateConfig(max_knowledge_drop=6)) == (True, [])
    passed, reasons = check_gate(table, GateConfig(
        max_knowledge_drop=2, min_scores={"verifiable.exact_match": 0.6, "ifbench.x": 0.1, "support.loss": 1.0},
        max_scores={"support.loss": 1.9, "arith.numeric": 0.9},
    ))
    assert not passed
    assert reasons == [
        "knowledge.mmlu.acc dropped 5.0 points (base 40.0 -> tuned 35.0); the gate allows 2",
        "verifiable.exact_match = 0.5000 is below the minimum 0.6",
        ("min_scores names 'ifbench.x', which is not in the table (arith.numeric, heldout.loss, knowledge.mmlu.acc, support.loss, "
        "verifiable.exact_match)"),
        "min_scores names 'support.loss', where lower is better; put its bound under gate.max_scores",
        "support.loss = 2.0000 is above the maximum 1.9",
        "max_scores names 'arith.numeric', where higher is better; put its bound under gate.min_scores",
    ]
    assert check_gate(table, GateConfig(max_knowledge_drop=None, max_scores={"support.loss": 2.0}, min_scores={"arith.numeric": 0.5})) == (True, [])
    # 5 points down with a difference stderr of 7.1 points: within noise at z=2, beyond it at z=0.5.
    assert check_gate(table, GateConfig(max_knowledge_drop=2, knowledge_noise_z=2)) == (True, [])
    assert check_gate(table, GateConfig(max_knowledge_drop=2, knowledge_noise_z=0.5))[1] == [
        "knowledge.mmlu.acc dropped 5.0 points (base 40.0 -> tuned 35.0); the gate allows 2, beyond 0.5 standard errors (7.1 points)"
    ]
    no_base = results_table({"tuned": SCORES["tuned"]}, _specs())
    assert check_gate(no_base, GateConfig(max_knowledge_drop=None))[1] == [
        "heldout_loss_must_drop needs the base model's held-out loss (evaluate.compare_base: true)"
    ]


def test_a_paired_delta_stderr_shows_in_the_table() -> None:
    table = results_table({"base": {"heldout.loss": 2.0}, "tuned": {"heldout.loss": 1.5, "heldout.loss_delta_stderr": 0.05}}, _specs())
    assert table[0]["delta_stderr"] == 0.05
    assert "| heldout.loss | ↓ | 2.0000 | 1.5000 | -0.5000 ±0.050 |" in format_table(table)
