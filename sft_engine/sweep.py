"""Mix sweeps: expand a ``sweep:`` section into variant configs and compare the variants fairly.

Fairness rules the functions here enforce:

- every variant trains for the same number of optimizer steps, derived from one token budget;
- every variant is scored on the same held-out split and benchmark items (the held-out split of the
  config as written, with every source; see ``flows/sweep.py``), never on training loss;
- a lead is only called a lead when it exceeds the noise: the difference between the best and the
  runner-up must exceed ``NOISE_Z`` standard errors of that difference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from sft_engine.config import PipelineConfig, SweepConfig, apply_overrides, config_to_dict
from sft_engine.evaluation.suite import Metric

# Two standard errors of a difference: about a 95 % interval.
NOISE_Z = 2.0


@dataclass(frozen=True)
class Variant:
    """A named change to the pipeline config: overrides and sources left out."""

    name: str
    overrides: tuple[str, ...] = ()
    drop_sources: tuple[str, ...] = field(default_factory=tuple)


def expand_variants(base: dict[str, Any], sweep: SweepConfig) -> list[Variant]:
    """The variants a sweep section asks for, in a stable order: baseline, named, grid, leave-one-out.

    Raises:
        ValueError: two variants with the same name, or a sweep that asks for nothing.
    """
    out: list[Variant] = [Variant("baseline")] if sweep.baseline else []
    out += [Variant(v.name, tuple(v.overrides)) for v in sweep.variants]
    keys = list(sweep.grid)
    for values in itertools.product(*(sweep.grid[k] for k in keys)) if keys else ():
        overrides = tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        out.append(Variant(",".join(f"{_short(k, base)}={v}" for k, v in zip(keys, values, strict=True)), overrides))
    if sweep.leave_one_out:
        names = [s["name"] for s in base["curate"]["sources"]]
        if len(names) < 2:
            raise ValueError("sweep.leave_one_out needs at least two curate.sources")
        out += [Variant(f"without_{n}", drop_sources=(n,)) for n in names]
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise ValueError(f"sweep: two variants are named '{v.name}'; give each a unique name")
        seen.add(v.name)
    if not out:
        raise ValueError("sweep: no variants; set sweep.baseline, sweep.variants, sweep.grid or sweep.leave_one_out")
    return out


def _short(key: str, base: dict[str, Any]) -> str:
    """A readable name part for an override key: ``curate.sources.1.weight`` -> ``<source name>.weight``."""
    parts = key.split(".")
    if parts[:2] == ["curate", "sources"] and len(parts) == 4 and parts[2].isdigit():
        sources = base["curate"]["sources"]
        if int(parts[2]) < len(sources):
            return f"{sources[int(parts[2])]['name']}.{parts[3]}"
    return parts[-1]


def steps_for_budget(cfg: PipelineConfig, token_budget: int) -> int:
    """Optimizer steps that consume ``token_budget`` packed tokens (every packed row is max_seq_len long)."""
    per_step = cfg.prepare.max_seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.nproc
    return max(1, math.ceil(token_budget / per_step))


def variant_config(base: dict[str, Any], sweep: SweepConfig, variant: Variant) -> PipelineConfig:
    """The resolved pipeline config of one variant (the sweep section removed, the token budget applied)."""
    data = {k: v for k, v in base.items() if k != "sweep"}
    if variant.drop_sources:
        unknown = set(variant.drop_sources) - {s["name"] for s in data["curate"]["sources"]}
        if unknown:
            raise ValueError(f"sweep variant '{variant.name}' drops unknown sources {sorted(unknown)}")
        data = {**data, "curate": {**data["curate"], "sources": [s for s in data["curate"]["sources"] if s["name"] not in variant.drop_sources]}}
    data = apply_overrides(data, list(variant.overrides))
    cfg = PipelineConfig.model_validate(data)
    if sweep.token_budget is not None:
        cfg.train.max_steps = steps_for_budget(cfg, sweep.token_budget)
    return cfg


def comparison_rows(results: dict[str, dict[str, Any]], base_scores: dict[str, float], specs: dict[str, Metric]) -> list[dict[str, Any]]:
    """One row per variant plus a ``base`` reference row.

    ``results[name]`` holds ``shares`` (realized source proportions), ``tokens`` (trained) and ``scores``
    (flat eval metrics with ``<metric>_stderr`` beside them). Columns: variant, share.<source>, tokens,
    <metric>, <metric>_stderr, <metric>_delta_vs_base for every metric ``specs`` (``registry.metric_specs``) marks
    for comparison that the base model has.
    """
    sources = sorted({s for r in results.values() for s in r["shares"]})
    metrics = [m for m, spec in specs.items() if spec.compare and m in base_scores]
    rows = [{"variant": "base", **{f"share.{s}": None for s in sources}, "tokens": 0,
             **{c: v for m in metrics for c, v in ((m, base_scores.get(m)), (f"{m}_stderr", base_scores.get(f"{m}_stderr")),
                                                    (f"{m}_delta_vs_base", 0.0))}}]
    for name, r in results.items():
        row: dict[str, Any] = {"variant": name, **{f"share.{s}": r["shares"].get(s, 0.0) for s in sources}, "tokens": r["tokens"]}
        for m in metrics:
            v, b = r["scores"].get(m), base_scores.get(m)
            row[m] = v
            row[f"{m}_stderr"] = r["scores"].get(f"{m}_stderr")
            row[f"{m}_delta_vs_base"] = None if v is None or b is None else v - b
        rows.append(row)
    return rows


def metric_columns(row: dict[str, Any]) -> list[str]:
    """The metric columns of a comparison row (the columns ``comparison_rows`` put there besides the fixed ones)."""
    fixed = ("variant", "tokens", "same_as")
    return [m for m in row if m not in fixed and not m.startswith("share.") and not m.endswith(("_stderr", "_delta_vs_base"))]


def leaders(rows: list[dict[str, Any]], specs: dict[str, Metric]) -> list[dict[str, Any]]:
    """Per metric, the best variant (the base row excluded; the direction from ``specs``), its lead over the runner-up,
    and whether that lead exceeds ``NOISE_Z`` standard errors of the difference (False when within noise or without a
    standard error)."""
    variants = [r for r in rows if r["variant"] != "base"]
    out = []
    for m in metric_columns(rows[0]):
        scored = [r for r in variants if r.get(m) is not None and math.isfinite(r[m])]
        if not scored:
            continue
        sign = -1 if specs[m].lower_is_better else 1
        ranked = sorted(scored, key=lambda r: (-sign * r[m], r["variant"]))
        best = ranked[0]
        if len(ranked) == 1:
            out.append({"metric": m, "lower_is_better": specs[m].lower_is_better, "best": best["variant"], "lead": None, "lead_stderr": None, "significant": False})
            continue
        second = ranked[1]
        se = [best.get(f"{m}_stderr"), second.get(f"{m}_stderr")]
        lead = sign * (best[m] - second[m])
        lead_se = math.sqrt(sum(x * x for x in se)) if all(x is not None and math.isfinite(x) for x in se) else None
        out.append({
            "metric": m, "lower_is_better": specs[m].lower_is_better, "best": best["variant"], "runner_up": second["variant"], "lead": lead, "lead_stderr": lead_se,
            "significant": bool(lead_se is not None and lead_se > 0 and lead > NOISE_Z * lead_se),
        })
    return out


def markdown(rows: list[dict[str, Any]], lead: list[dict[str, Any]], specs: dict[str, Metric]) -> str:
    """The comparison as Markdown: one line per variant (value ± stderr; each metric's header says which way is
    better), then the best variant per metric."""
    metrics = metric_columns(rows[0])
    shares = [k for k in rows[0] if k.startswith("share.")]
    head = ["variant", *[s.removeprefix("share.") + " %" for s in shares], "tokens",
            *[f"{m} {'↓' if specs[m].lower_is_better else '↑'}" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], *["-" if r[s] is None else f"{100 * r[s]:.0f}" for s in shares], f"{r['tokens']:,}"]
        for m in metrics:
            v, se = r.get(m), r.get(f"{m}_stderr")
            cells.append("-" if v is None else f"{v:.3f}" + (f" ±{se:.3f}" if se is not None and math.isfinite(se) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for x in lead:
        if x["lead"] is None:
            lines.append(f"- {x['metric']}: {x['best']} (only variant scored)")
        elif x["lead"] == 0:
            tied = next(r[x["metric"]] for r in rows if r["variant"] == x["best"])
            lines.append(f"- {x['metric']}: {x['best']} and {x['runner_up']} tie at {tied:.3f}: not ranked")
        else:
            verdict = "a lead beyond noise" if x["significant"] else "within noise: not ranked"
            se = "n/a" if x["lead_stderr"] is None else f"{x['lead_stderr']:.3f}"
            lines.append(f"- {x['metric']}: {x['best']} leads {x['runner_up']} by {x['lead']:.3f} (stderr {se}), {verdict}")
    return "\n".join(lines)


def config_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What makes two variants the same run: the resolved config without naming/tracking fields."""
    data = config_to_dict(cfg)
    return {k: v for k, v in data.items() if k not in ("experiment", "tracking_uri", "sweep")}
