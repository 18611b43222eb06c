"""Prefect tasks: config in, engine call, MLflow logging, output folder path out.

Each task opens a nested MLflow run for its stage. A stage whose output folder is already complete
is not recomputed, but still gets its run (tagged ``cached=true``) with the stored stats, so every
pipeline run in MLflow shows all four stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sft_engine import stages
from sft_engine.config import PipelineConfig, config_to_dict
from sft_engine.io import read_json
from tasks import tracking


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, parent_run_id: str | None) -> Iterator[tuple[Any, str]]:
    """A nested MLflow run for one stage, marked FAILED if the stage raises."""
    client, run_id = tracking.start_run(cfg, stage, parent_run_id)
    tracking.log_params(client, run_id, {"model": cfg.model, "seed": cfg.seed, stage: config_to_dict(getattr(cfg, stage))})
    try:
        yield client, run_id
    except BaseException:
        tracking.end_run(client, run_id, failed=True)
        raise
    tracking.end_run(client, run_id)


def _cached_tag(client: Any, run_id: str, res: stages.StageOutput) -> None:
    client.set_tag(run_id, "cached", str(res.reused).lower())
    client.set_tag(run_id, "output_dir", str(res.path))


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(cfg: PipelineConfig, parent_run_id: str | None = None) -> Path:
    """Read, normalize, validate, dedup and split the sources."""
    log = get_run_logger()
    with stage_run(cfg, "curate", parent_run_id) as (client, run_id):
        res = stages.run_curate(cfg)
        out = res.path
        stats = read_json(out / "stats.json")
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        metrics.update({f"dropped.{r}": n for r, n in stats["dropped_by_reason"].items()})
        metrics.update({f"source.{k}.share": v for k, v in stats["mix"]["realized_share"].items()})
        decontam = stats.get("decontamination") or {}
        metrics.update({f"decontam.{k}": v for k, v in (decontam.get("matches_by_eval_set") or {}).items()})
        near = stats.get("near_dedup") or {}
        metrics.update({f"near_dedup.{k}": v for k, v in near.items() if isinstance(v, (int, float))})
        for src, s in stats["per_source"].items():
            metrics.update({f"source.{src}.{k}": v for k, v in s.items() if isinstance(v, (int, float))})
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_files(client, run_id, out)
        tracking.log_dataset(client, run_id, "curated", stats["digest"], out, {"rows_train": stats["rows_train_mixed"]})
        _cached_tag(client, run_id, res)
        log.info(
            "curate: %d rows in, %d kept (%d train, %d held out), %d dropped %s%s",
            stats["rows_in"], stats["rows_kept"], stats["rows_train"], stats["rows_heldout"], stats["rows_dropped"],
            json.dumps(stats["dropped_by_reason"]), " [reused]" if res.reused else "",
        )
    return out


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(cfg: PipelineConfig, curated: Path, parent_run_id: str | None = None) -> Path:
    """Render chat templates, mask labels, and pack with best-fit decreasing."""
    log = get_run_logger()
    with stage_run(cfg, "prepare", parent_run_id) as (client, run_id):
        from rich.progress import Progress

        total = sum(read_json(curated / "stats.json")[k] for k in ("rows_train_mixed", "rows_heldout"))
        with Progress(transient=True) as bar:
            job = bar.add_task("tokenize", total=total)
            res = stages.run_prepare(cfg, curated, progress=lambda n: bar.advance(job, n))
        out = res.path
        manifest = read_json(out / "manifest.json")
        metrics: dict[str, float] = {}
        for split, st in manifest["splits"].items():
            metrics.update({f"{split}.{k}": v for k, v in st.items() if isinstance(v, (int, float))})
            metrics.update({f"{split}.dropped.{r}": n for r, n in st["dropped_by_reason"].items()})
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_files(client, run_id, out)
        client.set_tag(run_id, "packed_digest", manifest["digest"])
        tracking.log_dataset(client, run_id, "packed", manifest["digest"], out, {"rows": manifest["splits"]["train"]["rows_packed"]})
        _cached_tag(client, run_id, res)
        train = manifest["splits"]["train"]
        log.info(
            "prepare: %d samples -> %d rows of %d tokens, fill %.2f%%, %d supervised tokens",
            train["samples_packed"], train["rows_packed"], manifest["max_seq_len"], 100 * train["fill"], train["supervised_tokens"],
        )
    return out


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, prepared: Path, parent_run_id: str | None = None) -> Path:
    """Fine-tune with DeepSpeed; returns the folder of the saved Hugging Face model."""
    log = get_run_logger()
    with stage_run(cfg, "train", parent_run_id) as (client, run_id):
        on_step: Callable[[int, dict[str, float]], None] = lambda step, m: tracking.log_metrics(client, run_id, m, step)
        with tracking.system_metrics(cfg, run_id):
            res = stages.run_train(cfg, prepared, on_step=on_step)
        out = res.path
        stats = read_json(out / "stats.json")
        if res.reused:
            # Replay the stored curve so a reused stage's run still shows it.
            for h in stats["history"]:
                tracking.log_metrics(client, run_id, {k: v for k, v in h.items() if k != "step"}, int(h["step"]))
        _cached_tag(client, run_id, res)
        tracking.log_metrics(client, run_id, {k: stats[k] for k in ("steps", "tokens", "supervised_tokens", "seconds", "tokens_per_s")})
        tracking.log_files(client, run_id, out)
        client.set_tag(run_id, "model_path", str(out / "model"))
        if cfg.train.log_model or cfg.train.register_model:
            client.log_artifacts(run_id, str(out / "model"), "model")
        if cfg.train.register_model:
            version = tracking.register(client, run_id, cfg.train.register_model, "model")
            log.info("train: registered model '%s' version %s", cfg.train.register_model, version)
        log.info("train: %d steps, loss %.4f -> %.4f, %.0f tokens/s", stats["steps"], stats["first_loss"], stats["final_loss"], stats["tokens_per_s"])
    return out / "model"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, curated: Path, prepared: Path, model_dir: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    """Held-out loss of base and tuned models on the same split, and a generation sample."""
    log = get_run_logger()
    with stage_run(cfg, "evaluate", parent_run_id) as (client, run_id):
        res = stages.run_evaluate(cfg, curated, prepared, model_dir)
        out = res.path
        _cached_tag(client, run_id, res)
        metrics = read_json(out / "metrics.json")
        flat = {}
        for name, value in metrics.items():
            if isinstance(value, dict):
                flat.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        tracking.log_metrics(client, run_id, flat)
        tracking.log_files(client, run_id, out)
        if "base" in metrics:
            log.info(
                "evaluate: held-out loss base %.4f -> tuned %.4f (delta %+.4f)",
                metrics["base"]["loss"], metrics["tuned"]["loss"], metrics["delta_loss"],
            )
        else:
            log.info("evaluate: held-out loss tuned %.4f", metrics["tuned"]["loss"])
    return metrics
