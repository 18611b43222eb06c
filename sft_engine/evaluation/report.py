"""The base-vs-tuned comparison: the results table, the gate, MLflow metric names, the Markdown view.

Which metrics are rows and which way each is better comes from the suites' declarations
(``registry.metric_specs``), never from a list here.
"""

from __future__ import annotations

import math
from typing import Any

from sft_engine.errors import UserError
from sft_engine.evaluation.suite import Metric


def results_table(scores: dict[str, dict[str, float]], specs: dict[str, Metric]) -> list[dict[str, Any]]:
    """One row per declared metric the tuned model has: ``{metric, base, tuned, delta, base_stderr, tuned_stderr,
    delta_stderr, higher_is_better, forgetting}``.

    ``scores`` maps a model name (``tuned``, optionally ``base``) to flat metrics such as ``knowledge.mmlu.acc`` with
    ``knowledge.mmlu.acc_stderr`` beside it; ``delta_stderr`` comes from a ``<metric>_delta_stderr`` in the tuned
    scores (a paired comparison on the same items), else None. ``specs``: ``registry.metric_specs`` of the config.
    """
    tuned = scores["tuned"]
    base = scores.get("base", {})
    rows = []
    for metric, spec in specs.items():
        if metric not in tuned:
            continue
        value, b = tuned[metric], base.get(metric)
        rows.append({
            "metric": metric,
            "base": b,
            "tuned": value,
            "delta": None if b is None else value - b,
            "base_stderr": base.get(f"{metric}_stderr"),
            "tuned_stderr": tuned.get(f"{metric}_stderr"),
            "delta_stderr": tuned.get(f"{metric}_delta_stderr"),
            "higher_is_better": not spec.lower_is_better,
            "forgetting": spec.forgetting,
        })
    return rows


def check_gate(table: list[dict[str, Any]], gate: Any) -> tuple[bool, list[str]]:
    """Apply an ``EvalConfig.gate`` to the results table; returns (passed, one reason per failed rule)."""
    by = {r["metric"]: r for r in table}
    reasons: list[str] = []
    if gate.heldout_loss_must_drop:
        row = by.get("heldout.loss")
        if row is None or row["delta"] is None:
            reasons.append("heldout_loss_must_drop needs the base model's held-out loss (evaluate.compare_base: true)")
        elif not row["delta"] < 0:
            reasons.append(f"held-out loss did not drop: base {row['base']:.4f} -> tuned {row['tuned']:.4f}")
    if gate.max_knowledge_drop is not None:
        for row in table:
            if not row["forgetting"]:
                continue
            if row["delta"] is None:
                reasons.append(f"max_knowledge_drop needs the base model's {row['metric']} (evaluate.compare_base: true)")
            elif (drop := 100 * (row["base"] - row["tuned"])) > gate.max_knowledge_drop:
                se = 100 * math.sqrt((row["base_stderr"] or 0) ** 2 + (row["tuned_stderr"] or 0) ** 2)
                if gate.knowledge_noise_z is not None and drop <= gate.knowledge_noise_z * se:
                    continue  # larger than allowed, but within sampling noise at this many items
                noise = f", beyond {gate.knowledge_noise_z:g} standard errors ({se:.1f} points)" if gate.knowledge_noise_z else ""
                reasons.append(
                    f"{row['metric']} dropped {drop:.1f} points (base {100 * row['base']:.1f} -> tuned "
                    f"{100 * row['tuned']:.1f}); the gate allows {gate.max_knowledge_drop:g}{noise}"
                )
    for key, bounds, higher in (("min_scores", gate.min_scores, True), ("max_scores", gate.max_scores, False)):
        for metric, bound in bounds.items():
            row = by.get(metric)
            if row is None:
                reasons.append(f"{key} names '{metric}', which is not in the table ({', '.join(sorted(by))})")
            elif row["higher_is_better"] != higher:
                other = "max_scores" if higher else "min_scores"
                better = "higher" if row["higher_is_better"] else "lower"
                reasons.append(f"{key} names '{metric}', where {better} is better; put its bound under gate.{other}")
            elif higher and not row["tuned"] >= bound:
                reasons.append(f"{metric} = {row['tuned']:.4f} is below the minimum {bound:g}")
            elif not higher and not row["tuned"] <= bound:
                reasons.append(f"{metric} = {row['tuned']:.4f} is above the maximum {bound:g}")
    return not reasons, reasons


def table_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metric names for the table, the same in every run so run-compare lines them up:
    ``eval/<metric>/{base,tuned,delta,tuned_stderr}``."""
    out: dict[str, float] = {}
    for row in table:
        for col in ("base", "tuned", "delta", "tuned_stderr"):
            if row[col] is not None and math.isfinite(row[col]):
                out[f"eval/{row['metric']}/{col}"] = float(row[col])
    return out


def _fmt(v: float | None, stderr: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" + (f" ±{stderr:.3f}" if stderr is not None and math.isfinite(stderr) else "")


def format_table(table: list[dict[str, Any]]) -> str:
    """The results table as Markdown (also what the terminal and the logs show)."""
    lines = ["| metric | better | base | tuned | delta |", "|---|:-:|---:|---:|---:|"]
    for r in table:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}" + (f" ±{r['delta_stderr']:.3f}" if r.get("delta_stderr") else "")
        better = "↑" if r["higher_is_better"] else "↓"
        lines.append(f"| {r['metric']} | {better} | {_fmt(r['base'], r['base_stderr'])} | {_fmt(r['tuned'], r['tuned_stderr'])} | {delta} |")
    return "\n".join(lines)


class GateFailed(UserError, RuntimeError):
    """The tuned model did not pass ``evaluate.gate``; the message lists every failed rule (exit 3)."""

    exit_code = 3

    def __init__(self, reasons: list[str], result: dict[str, Any] | None = None) -> None:
        super().__init__("evaluation gate failed: " + "; ".join(reasons)
                         + " (every result is in MLflow, tag sft.gate=failed; relax evaluate.gate or fix the run)")
        self.reasons = reasons
        self.result = result or {}
