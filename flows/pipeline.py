"""Prefect flows: one per stage, and ``sft_pipeline`` chaining them under one MLflow parent run.

    sft_pipeline ─┬─ curate    raw sources  -> curate/<key>/{train,heldout,rejected}.parquet
                  ├─ prepare   curated      -> prepare/<key>/{train,heldout}.arrow + manifest.json
                  ├─ train     packed rows  -> train/<key>/model/  (Hugging Face folder)
                  └─ evaluate  base vs tuned -> evaluate/<key>/metrics.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from sft_engine.config import PipelineConfig, config_to_dict
from tasks import tracking
from tasks.stages import curate_task, evaluate_task, prepare_task, train_task

STAGES = ("curate", "prepare", "train", "evaluate")


@flow(name="curate", log_prints=True)
def curate_flow(config: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Curate raw sources into train / held-out / rejected splits."""
    return str(curate_task(PipelineConfig.model_validate(config), parent_run_id))


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
    """Held-out loss of base vs tuned, and a generation sample."""
    cfg = PipelineConfig.model_validate(config)
    return evaluate_task(cfg, Path(curated), Path(prepared), Path(model), parent_run_id)


@flow(name="sft_pipeline", log_prints=True)
def sft_pipeline(config: dict[str, Any], until: str = "evaluate") -> dict[str, Any]:
    """Run curate -> prepare -> train -> evaluate (stopping after ``until``), tracked under one MLflow parent run."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}, got '{until}'")
    cfg = PipelineConfig.model_validate(config)
    config = config_to_dict(cfg)
    log = get_run_logger()
    client, parent = tracking.start_run(cfg, "sft_pipeline", tags={"sft.until": until})
    tracking.log_config(client, parent, cfg)
    result: dict[str, Any] = {"mlflow_run_id": parent, "tracking_uri": cfg.resolved_tracking_uri()}
    try:
        result["curated"] = curate_flow(config, parent)
        if until != "curate":
            result["prepared"] = prepare_flow(config, result["curated"], parent)
        if until in ("train", "evaluate"):
            result["model"] = train_flow(config, result["prepared"], parent)
            client.set_tag(parent, "model_path", result["model"])
        if until == "evaluate":
            result["metrics"] = evaluate_flow(config, result["curated"], result["prepared"], result["model"], parent)
            if "delta_loss" in result["metrics"]:
                tracking.log_metrics(client, parent, {"delta_heldout_loss": result["metrics"]["delta_loss"]})
    except BaseException:
        tracking.end_run(client, parent, failed=True)
        log.exception("pipeline failed; the parent MLflow run %s is marked FAILED", parent)
        raise
    tracking.end_run(client, parent)
    log.info("MLflow run %s; browse with: %s", parent, tracking.ui_hint(cfg))
    return result
