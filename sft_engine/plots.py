"""PNG plots for MLflow: length histograms, drop reasons, loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def histogram(values: list[int] | list[float], path: Path, title: str, xlabel: str, bins: int = 50) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color="#4c72b0")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlaid_histograms(series: dict[str, list[float]], path: Path, title: str, xlabel: str, bins: int = 50) -> Path:
    """Several distributions on shared log-spaced bins (e.g. lengths before and after filtering)."""
    import numpy as np

    values = [v for vs in series.values() for v in vs if v > 0]
    edges = np.logspace(np.log10(max(1, min(values, default=1))), np.log10(max(values, default=10) + 1), bins) if values else bins
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, vs in series.items():
        ax.hist([v for v in vs if v > 0], bins=edges, alpha=0.55, label=f"{name} ({len(vs)})")
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
