"""Prefect tasks: config in, engine call, MLflow logging, output folder path out.

Each task opens a nested MLflow run for its stage. A stage whose output folder is already complete
is not recomputed, but still gets its run (tagged ``cached=true``) with the stored stats, so every
pipeline run in MLflow shows all four stages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sft_engine import stages
from sft_engine.config import PipelineConfig, config_to_dict
from sft_engine.curation import stage as curation
from sft_engine.errors import DataError
from sft_engine.evaluation.report import check_gate, format_table, table_metrics
from sft_engine.io import StageOutput, read_json
from tasks import tracking
from tasks.report import say

_started: dict[str, float] = {}


def _done(stage: str, message: str) -> None:
    """A stage's end line: its figures and how long it took."""
    say(f"{message} ({time.perf_counter() - _started.get(stage, time.perf_counter()):.1f} s)")


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, parent_run_id: str | None) -> Iterator[tuple[Any, str]]:
    """A nested MLflow run for one stage, marked FAILED if the stage raises."""
    client, run_id = tracking.start_run(cfg, stage, parent_run_id)
    tracking.log_params(client, run_id, {"model": cfg.model, "seed": cfg.seed, stage: config_to_dict(getattr(cfg, stage))})
    say(f"{stage} ...")
    _started[stage] = time.perf_counter()
    try:
        yield client, run_id
    except BaseException:
        tracking.end_run(client, run_id, failed=True)
        raise
    tracking.end_run(client, run_id)


def _cached_tag(client: Any, run_id: str, res: StageOutput) -> None:
    client.set_tag(run_id, "cached", str(res.reused).lower())
    client.set_tag(run_id, "output_dir", str(res.path))


@task(name="curate-plan", cache_policy=NO_CACHE)
def curate_plan_task(cfg: PipelineConfig) -> curation.CuratePlan:
    """Key curation's levels and cut the sources into per-source or per-shard units of row-local work."""
    plan = curation.plan_curate(cfg)
    if plan.units:
        get_run_logger().info("curate: %d row-local units to run or reuse: %s", len(plan.units), ", ".join(u.label for u in plan.units))
    else:
        get_run_logger().info("curate: dedup level already complete (%s), no row-local units needed", plan.dedup)
    return plan


@task(name="curate-unit", task_run_name="curate-unit {unit.label}", cache_policy=NO_CACHE)
def curate_unit_task(cfg: PipelineConfig, unit: curation.CurateUnit) -> StageOutput:
    """Row-local checks of one source or shard into its own cached folder."""
    res = curation.run_curate_unit(cfg, unit)
    get_run_logger().info("curate unit %s -> %s%s", unit.label, res.path, " [reused]" if res.reused else "")
    return res


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(
    cfg: PipelineConfig, parent_run_id: str | None = None, plan: curation.CuratePlan | None = None,
    units: list[StageOutput] | None = None,
) -> Path:
    """Dedup, split and mix the checked sources; given no ``plan``, runs every unit first, in this task."""
    with stage_run(cfg, "curate", parent_run_id) as (client, run_id):
        res = curation.run_curate(cfg) if plan is None else curation.run_curate_global(cfg, plan, units or [])
        out = res.path
        stats = read_json(out / "stats.json")
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        metrics.update({f"dropped.{r}": n for r, n in stats["dropped_by_reason"].items()})
        metrics.update({f"repaired_{k}": n for k, n in stats.get("repaired_by_kind", {}).items()})
        metrics.update({f"source.{k}.share": v for k, v in stats["mix"]["realized_share"].items()})
        decontam = stats.get("decontamination") or {}
        metrics.update({f"decontam.{k}": v for k, v in (decontam.get("matches_by_eval_set") or {}).items()})
        near = stats.get("near_dedup") or {}
        metrics.update({f"near_dedup.{k}": v for k, v in near.items() if isinstance(v, (int, float))})
        for src, s in stats["per_source"].items():
            metrics.update({f"source.{src}.{k}": v for k, v in s.items() if isinstance(v, (int, float))})
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_files(client, run_id, out, (".json", ".png", ".md"))
        # Sampled rejected rows per reason, and a page showing them: a rule is audited in the MLflow UI.
        client.log_artifacts(run_id, str(out / "drop_samples"), "drop_samples")
        tracking.log_dataset(client, run_id, "curated", stats["digest"], out, {"rows_train": stats["rows_train_mixed"]})
        _cached_tag(client, run_id, res)
        if not stats["rows_train_mixed"]:
            raise DataError(
                f"curation kept no training row: all {stats['rows_in']:,} rows were dropped "
                f"{json.dumps(stats['dropped_by_reason'])} or held out (the rows and reasons: {out / 'rejected.parquet'}, "
                f"{out / 'report.md'}); fix the sources or relax the rule that drops them (curate.*)"
            )
        _done(
            "curate",
            f"curate: {stats['rows_in']:,} rows in, {stats['rows_kept']:,} kept ({stats['rows_train']:,} train, "
            f"{stats['rows_heldout']:,} held out; {stats.get('rows_repaired', 0):,} repaired), {stats['rows_dropped']:,} dropped "
            f"{json.dumps(stats['dropped_by_reason'])}{' [reused]' if res.reused else ''}"
        )
    return out


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(cfg: PipelineConfig, curated: Path, parent_run_id: str | None = None) -> Path:
    """Render chat templates, mask labels, and pack with best-fit decreasing."""
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
        if not train["samples_packed"]:
            raise DataError(
                f"preparation left no training sample: the {train['rows_in']:,} curated conversations were all dropped "
                f"{json.dumps(train['dropped_by_reason'])}; check the template with `sft-pipeline check-template --model "
                f"{cfg.model}` and see the drop reasons in the README (prepare.max_seq_len for pack_too_long)"
            )
        _done(
            "prepare",
            f"prepare: {train['rows_in']:,} conversations -> {train['samples_packed']:,} samples -> {train['rows_packed']:,} rows "
            f"of {manifest['max_seq_len']:,} tokens, fill {100 * train['fill']:.2f} %, {train['supervised_tokens']:,} supervised "
            f"tokens, dropped {json.dumps(train['dropped_by_reason'])}{' [reused]' if res.reused else ''}"
        )
    return out


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, prepared: Path, parent_run_id: str | None = None) -> Path:
    """Fine-tune with DeepSpeed; returns the folder of the saved Hugging Face model."""
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
        if cfg.train.log_model:
            client.log_artifacts(run_id, str(out / "model"), "model")
        _done("train", f"train: {stats['steps']} steps, loss {stats['first_loss']:.4f} -> {stats['final_loss']:.4f}, "
            f"{stats['tokens_per_s']:.0f} tokens/s{' [reused]' if res.reused else ''}")
    return out / "model"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, curated: Path, prepared: Path, model_dir: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    """Base vs tuned on every suite; logs the table, plot and per-item outputs, and applies the gate."""
    log = get_run_logger()
    with stage_run(cfg, "evaluate", parent_run_id) as (client, run_id):
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            total = stages.scoring_steps(cfg) * (2 if cfg.evaluate.compare_base else 1)
            job = bar.add_task("scoring", total=total)
            res = stages.run_evaluate(cfg, curated, prepared, model_dir,
                                      progress=lambda step: bar.update(job, advance=1, description=f"scoring (done: {step})"))
        out = res.path
        _cached_tag(client, run_id, res)
        table = read_json(out / "table.json")
        passed, reasons = check_gate(table, cfg.evaluate.gate)
        metrics = table_metrics(table)
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_files(client, run_id, out, (".json", ".png", ".csv", ".jsonl"))
        _gate_tags(client, run_id, passed, reasons)
        log.info("evaluate:\n%s", format_table(table))  # the run's log; the terminal gets the table once, at the end
        _done("evaluate", f"evaluate: {len(table)} metrics, base vs tuned; gate {'passed' if passed else 'FAILED'}{' [reused]' if res.reused else ''}")
    return {"metrics": read_json(out / "metrics.json"), "table": table, "table_metrics": metrics, "gate": {"passed": passed, "reasons": reasons},
            "output_dir": str(out), "mlflow_run_id": run_id}


def _gate_tags(client: Any, run_id: str, passed: bool, reasons: list[str]) -> None:
    client.set_tag(run_id, "sft.gate", "passed" if passed else "failed")
    client.set_tag(run_id, "sft.gate_reasons", "; ".join(reasons)[:5000] or "-")


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg: PipelineConfig, model_dir: Path, curated: Path, prepared: Path, run_id: str) -> str:
    """Log the tuned model under the pipeline run and register it, tagged with what it was made from."""
    assert cfg.evaluate.register_model is not None
    client, _ = tracking.client_for(cfg)
    client.log_artifacts(run_id, str(model_dir), "model")
    version = str(tracking.register(client, run_id, cfg.evaluate.register_model, "model"))
    tags = client.get_run(run_id).data.tags
    lineage = {
        "curated_digest": read_json(curated / "stats.json")["digest"],
        "packed_digest": read_json(prepared / "manifest.json")["digest"],
        "git_commit": tags.get("git_commit", ""),
        "prefect_flow_run_id": tags.get("prefect.flow_run_id", ""),
        "mlflow_run_id": run_id,
        "gate": "passed",
    }
    for k, v in lineage.items():
        client.set_model_version_tag(cfg.evaluate.register_model, version, k, v)
    say(f"registered model '{cfg.evaluate.register_model}' version {version}")
    return version
