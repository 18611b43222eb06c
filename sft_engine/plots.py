"""PNG plots for MLflow: length histograms, drop reasons, loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def histogram(values: list[int] | list[float], path: Path, title: str, xlabel: str, bins: int = 50) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color="#4c72b0")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlaid_histograms(series: dict[str, Any], path: Path, title: str, xlabel: str, bins: int = 50) -> Path:
    """Several distributions (lists or arrays) on shared log-spaced bins (e.g. lengths before and after filtering)."""
    import numpy as np

    arrays = {name: np.asarray(vs, dtype=np.float64) for name, vs in series.items()}
    positive = {name: a[a > 0] for name, a in arrays.items()}  # vectorized: millions of lengths at curation scale
    lows = [a.min() for a in positive.values() if len(a)]
    highs = [a.max() for a in positive.values() if len(a)]
    edges = np.logspace(np.log10(max(1, min(lows))), np.log10(max(highs) + 1), bins) if lows else bins
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, a in positive.items():
        ax.hist(a, bins=edges, alpha=0.55, label=f"{name} ({len(arrays[name])})")
    ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_counts(counts: dict[str, int], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(counts)) + 1))
    names = list(counts) or ["(none)"]
    ax.barh(names, [counts.get(n, 0) for n in names], color="#dd8452")
    ax.set(title=title, xlabel="rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_table(table: list[dict], path: Path) -> Path:
    """Base vs tuned bars with standard-error whiskers for every higher-is-better score (0-1 scale)."""
    import numpy as np

    rows = [r for r in table if r["higher_is_better"]]
    names = [r["metric"] for r in rows] or ["(no scores)"]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(names)) + 1.2))
    for offset, model, color in ((0.2, "base", "#8c8c8c"), (-0.2, "tuned", "#4c72b0")):
        vals = [r[model] if r[model] is not None else np.nan for r in rows]
        errs = [r[f"{model}_stderr"] or 0 for r in rows]
        if rows and not all(np.isnan(vals)):
            ax.barh(y + offset, vals, height=0.4, xerr=errs, color=color, label=model, capsize=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(title="Evaluation: base vs tuned (whiskers: 1 standard error)", xlabel="score", xlim=(0, 1))
    if rows:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_metrics(rows: list[dict], path: Path) -> Path:
    """One panel per metric: each variant's value with a 1-standard-error bar; the base model as a dashed line."""
    from sft_engine.sweep import metric_columns

    metrics = metric_columns(rows[0])
    variants = [r for r in rows if r["variant"] != "base"]
    n = max(1, len(metrics))
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.2 + 0.35 * len(variants) * n + 0.6 * n), squeeze=False)
    for ax, m in zip(axes[:, 0], metrics, strict=False):
        ys = list(range(len(variants)))
        vals = [r[m] if r[m] is not None else float("nan") for r in variants]
        errs = [r.get(f"{m}_stderr") or 0 for r in variants]
        ax.errorbar(vals, ys, xerr=errs, fmt="o", color="#4c72b0", capsize=3)
        if rows[0][m] is not None:
            ax.axvline(rows[0][m], color="#8c8c8c", linestyle="--", label="base")
            ax.legend(loc="best", fontsize=7)
        ax.set_yticks(ys, [r["variant"] for r in variants])
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_shares(rows: list[dict], path: Path) -> Path:
    """Realized source proportions of each variant's training mix, as stacked bars."""
    shares = [k for k in rows[0] if k.startswith("share.")]
    variants = [r for r in rows if r["variant"] != "base"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(variants)) + 1))
    left = [0.0] * len(variants)
    for s in shares:
        vals = [r[s] or 0.0 for r in variants]
        ax.barh([r["variant"] for r in variants], vals, left=left, label=s.removeprefix("share."))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set(title="Realized training mix per variant", xlabel="share of training rows", xlim=(0, 1))
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
