"""``sft_sweep``: train and evaluate several data mixes in one flow run, and compare them fairly.

    sft_sweep ─┬─ curate + prepare the config as written (every source): the fixed held-out split
               ├─ sft_pipeline  variant 1 ─ curate ─ prepare ─ train ─ evaluate on the fixed held-out
               ├─ sft_pipeline  variant 2 ...          (child flow runs; child MLflow runs of the sweep run)
               └─ comparison    table (CSV/JSON/Markdown) + plots on the sweep's MLflow run

Every stage is content-addressed, so variants that share curation or preparation share the work,
two variants with the same resolved config train once, and a rerun with one variant added runs only it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import curate_flow, prepare_flow, sft_pipeline
from flows.runners import task_runner
from sft_engine import plots
from sft_engine.config import PipelineConfig, RunnerConfig, config_to_dict
from sft_engine.evaluation.registry import metric_specs
from sft_engine.io import atomic_dir, digest_json, is_complete, read_json, stage_dir, write_json_atomic
from sft_engine.sweep import Variant, comparison_rows, config_identity, expand_variants, leaders, markdown, variant_config
from tasks import tracking


@task(name="variant", cache_policy=NO_CACHE)
def variant_task(config: dict[str, Any], name: str, heldout: tuple[str, str], sweep_run_id: str) -> dict[str, Any]:
    """One variant as a child pipeline flow run (used when variants run concurrently)."""
    return sft_pipeline(config=config, variant=name, heldout=heldout, parent_run_id=sweep_run_id, raise_on_gate=False)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the comparison needs from a variant's pipeline result."""
    stats = read_json(Path(result["curated"]) / "stats.json")
    train_stats = read_json(Path(result["model"]).parent / "stats.json")
    return {
        "shares": stats["mix"]["realized_share"], "tokens": int(train_stats["tokens"]), "steps": int(train_stats["steps"]),
        "scores": result["metrics"]["tuned"], "base": result["metrics"].get("base", {}), "gate": result["gate"],
        "mlflow_run_id": result["mlflow_run_id"], "model": result["model"],
    }


@flow(name="sft_sweep", log_prints=True)
def sft_sweep(config: dict[str, Any]) -> dict[str, Any]:
    """Run every variant of ``config['sweep']`` on one token budget and the same evaluation items; compare them."""
    cfg = PipelineConfig.model_validate(config)
    if cfg.sweep is None:
        raise ValueError("this config has no 'sweep:' section; add one with variants, grid or leave_one_out (see conf/demo_sweep.yaml)")
    sweep = cfg.sweep
    log = get_run_logger()
    base = config_to_dict(cfg)
    variants = expand_variants(base, sweep)
    configs = {v.name: variant_config(base, sweep, v) for v in variants}
    client, run_id = tracking.start_run(cfg, "sft_sweep", tags={"sft.sweep_variants": ",".join(configs)})
    tracking.log_params(client, run_id, {"sweep": config_to_dict(sweep), "variants": ",".join(configs)})
    try:
        # The fixed held-out split: the config as written, every source; a variant's own split is a subset of
        # it (membership is by content hash), so no variant ever trains on an evaluated row.
        reference = config_to_dict(variant_config(base, sweep, Variant("baseline")))
        ref_curated = curate_flow(reference, run_id)
        heldout = (ref_curated, prepare_flow(reference, ref_curated, run_id))

        # Variants with the same resolved config run once.
        unique: dict[str, str] = {}
        same_as = {}
        for name, vcfg in configs.items():
            key = digest_json(config_identity(vcfg))
            same_as[name] = unique.setdefault(key, name)
        todo = [n for n in configs if same_as[n] == n]
        log.info("sweep: %d variants (%s), %d distinct runs", len(configs), ", ".join(configs), len(todo))
        results: dict[str, dict[str, Any]] = {}
        if sweep.max_concurrent == 1:
            for name in todo:
                results[name] = sft_pipeline(
                    config=config_to_dict(configs[name]), variant=name, heldout=heldout, parent_run_id=run_id, raise_on_gate=False
                )
        else:
            runner = task_runner(RunnerConfig(kind=sweep.runner, workers=sweep.max_concurrent))
            with runner:
                futures = {name: runner.submit(variant_task, {"config": config_to_dict(configs[name]), "name": name,
                                                              "heldout": heldout, "sweep_run_id": run_id}) for name in todo}
                results = {name: f.result() for name, f in futures.items()}
        summaries = {name: _summary(results[same_as[name]]) for name in configs}
        out = _write_comparison(cfg, summaries, same_as)
        tracking.log_files(client, run_id, out, (".json", ".png", ".csv", ".md"))
        for name, s in summaries.items():
            client.set_tag(run_id, f"sft.variant.{name}.run_id", s["mlflow_run_id"])
    except BaseException:
        tracking.end_run(client, run_id, failed=True)
        log.exception("sweep failed; its MLflow run %s is marked FAILED", run_id)
        raise
    tracking.end_run(client, run_id)
    rows, lead = read_json(out / "comparison.json"), read_json(out / "leaders.json")
    log.info("sweep comparison:\n%s", (out / "comparison.md").read_text())
    return {"mlflow_run_id": run_id, "rows": rows, "leaders": lead, "output_dir": str(out), "same_as": same_as,
            "variants": {n: {k: s[k] for k in ("mlflow_run_id", "model", "steps", "tokens", "gate")} for n, s in summaries.items()}}


def _write_comparison(cfg: PipelineConfig, summaries: dict[str, dict[str, Any]], same_as: dict[str, str]) -> Path:
    """comparison.{json,csv,md}, leaders.json and the plots, in a folder keyed by what they show."""
    import polars as pl

    first = next(iter(summaries.values()))
    specs = metric_specs(cfg.evaluate)
    rows = comparison_rows(summaries, first["base"], specs)
    for r in rows:
        r["same_as"] = same_as.get(r["variant"], r["variant"]) if r["variant"] != "base" else "base"
    lead = leaders(rows, specs)
    out = stage_dir(cfg.work_dir, "sweeps", digest_json({"rows": rows}))
    if is_complete(out, cfg.verify_reuse):
        return out
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return out
        write_json_atomic(tmp / "comparison.json", rows)
        write_json_atomic(tmp / "leaders.json", lead)
        pl.DataFrame(rows, infer_schema_length=None).write_csv(tmp / "comparison.csv")
        (tmp / "comparison.md").write_text(markdown(rows, lead, specs) + "\n")
        plots.sweep_metrics(rows, tmp / "sweep_metrics.png")
        plots.sweep_shares(rows, tmp / "sweep_shares.png")
        (tmp / "variants.json").write_text(json.dumps({n: {k: s[k] for k in ("mlflow_run_id", "steps", "tokens")} for n, s in summaries.items()}, indent=2))
    return out
