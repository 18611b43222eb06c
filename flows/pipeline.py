"""Prefect flows: one per stage, and ``sft_pipeline`` chaining them under one MLflow parent run.

    sft_pipeline ─┬─ curate    raw sources  -> curate/<key>/{train,heldout,rejected}.parquet
                  ├─ prepare   curated      -> prepare/<key>/{train,heldout}.arrow + manifest.json
                  ├─ train     packed rows  -> train/<key>/model/  (Hugging Face folder)
                  ├─ evaluate  base vs tuned -> evaluate/<key>/{table.csv,items.jsonl,eval_table.png}
                  └─ register  only if the evaluation gate passes (MLflow Model Registry)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.runners import task_runner
from sft_engine.config import PipelineConfig, config_to_dict
from sft_engine.curation.stage import CurateUnit
from sft_engine.evaluation.report import GateFailed
from sft_engine.io import StageOutput
from tasks import tracking
from tasks.stages import curate_plan_task, curate_task, curate_unit_task, evaluate_task, prepare_task, register_task, train_task

STAGES = ("curate", "prepare", "train", "evaluate")


@flow(name="curate-units", log_prints=True)
def curate_units_flow(config: dict[str, Any], units: list[CurateUnit]) -> list[StageOutput]:
    """Row-local checks of every source or shard, one task each, mapped over the flow's task runner."""
    return curate_unit_task.map(unmapped(PipelineConfig.model_validate(config)), units).result()


@flow(name="curate", log_prints=True)
def curate_flow(config: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Curate raw sources into train / held-out / rejected splits.

    With ``runner.kind`` threads, dask or ray the row-local work runs as one mapped task per source or
    shard on that task runner, then one global task dedups (exact and near) across all of it, splits
    and mixes; sequential, processes and auto run it all inside the curate task (processes on a local
    process pool). Same folders, same bytes either way.
    """
    cfg = PipelineConfig.model_validate(config)
    if cfg.runner.kind in ("auto", "sequential", "processes"):  # no mapped tasks: the curate task runs the units
        return str(curate_task(cfg, parent_run_id))
    plan = curate_plan_task(cfg)
    units: list[StageOutput] = []
    if plan.units:
        mapped = curate_units_flow.with_options(task_runner=task_runner(cfg.runner))
        units = mapped(config_to_dict(cfg), list(plan.units))
    return str(curate_task(cfg, parent_run_id, plan, units))


@flow(name="prepare", log_prints=True)
def prepare_flow(config: dict[str, Any], curated: str, parent_run_id: str | None = None) -> str:
    """Tokenize with assistant-only labels and pack."""
    return str(prepare_task(PipelineConfig.model_validate(config), Path(curated), parent_run_id))


@flow(name="train", log_prints=True)
def train_flow(config: dict[str, Any], prepared: str, parent_run_id: str | None = None) -> str:
    """Fine-tune with DeepSpeed and save a Hugging Face folder."""
    return str(train_task(PipelineConfig.model_validate(config), Path(prepared), parent_run_id))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: dict[str, Any], curated: str, prepared: str, model: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Base vs tuned: held-out loss, knowledge retention (lm-eval), IFBench rules, the verifiable tasks."""
    cfg = PipelineConfig.model_validate(config)
    return evaluate_task(cfg, Path(curated), Path(prepared), Path(model), parent_run_id)


@flow(name="sft_pipeline", log_prints=True)
def sft_pipeline(
    config: dict[str, Any], until: str = "evaluate", model: str | None = None, parent_run_id: str | None = None,
    variant: str | None = None, heldout: tuple[str, str] | None = None, raise_on_gate: bool = True,
) -> dict[str, Any]:
    """Run curate -> prepare -> train -> evaluate (stopping after ``until``), tracked under one MLflow parent run.

    With ``model`` (a local Hugging Face folder) training is skipped and that model is evaluated against
    the configured base model. When the evaluation gate fails, the flow ends Failed with the gate's reasons
    (the MLflow run still holds every result, tagged ``sft.gate=failed``) and nothing is registered.

    A sweep passes ``parent_run_id`` (its MLflow run), ``variant`` (tagged ``sft.sweep_variant``), ``heldout``
    (the curated and prepared folders every variant is evaluated on) and ``raise_on_gate=False``.
    """
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}, got '{until}'")
    cfg = PipelineConfig.model_validate(config)
    config = config_to_dict(cfg)
    log = get_run_logger()
    tags = {"sft.stage": "sft_pipeline", "sft.until": until, **({"sft.evaluated_model": model} if model else {}), **({"sft.sweep_variant": variant} if variant else {})}
    client, parent = tracking.start_run(cfg, variant or "sft_pipeline", parent_run_id, tags=tags)
    tracking.log_config(client, parent, cfg)
    result: dict[str, Any] = {"mlflow_run_id": parent, "tracking_uri": cfg.resolved_tracking_uri(),
                              "flow_run_id": str(client.get_run(parent).data.tags.get("prefect.flow_run_id", ""))}
    try:
        result["curated"] = curate_flow(config, parent)
        if until != "curate":
            result["prepared"] = prepare_flow(config, result["curated"], parent)
        if until in ("train", "evaluate"):
            result["model"] = model or train_flow(config, result["prepared"], parent)
            client.set_tag(parent, "model_path", result["model"])
        if until == "evaluate":
            eval_curated, eval_prepared = heldout or (result["curated"], result["prepared"])
            ev = evaluate_flow(config, eval_curated, eval_prepared, result["model"], parent)
            result.update(metrics=ev["metrics"], table=ev["table"], gate=ev["gate"])
            tracking.log_metrics(client, parent, ev["table_metrics"])
            client.set_tag(parent, "sft.gate", "passed" if ev["gate"]["passed"] else "failed")
            client.set_tag(parent, "sft.gate_reasons", "; ".join(ev["gate"]["reasons"])[:5000] or "-")
            if ev["gate"]["passed"] and cfg.evaluate.register_model:
                result["registered_version"] = register_task(cfg, Path(result["model"]), Path(result["curated"]), Path(result["prepared"]), parent)
    except BaseException:
        tracking.end_run(client, parent, failed=True)
        log.exception("pipeline failed; the parent MLflow run %s is marked FAILED", parent)
        raise
    tracking.end_run(client, parent)
    log.info("MLflow run %s; browse with: %s", parent, tracking.ui_hint(cfg))
    if raise_on_gate and "gate" in result and not result["gate"]["passed"]:
        raise GateFailed(result["gate"]["reasons"], result)
    return result
