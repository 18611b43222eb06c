"""The four stages as plain functions: inputs and config in, a finished output folder out.

Each stage's folder is ``<work_dir>/<stage>/<key>`` where ``key`` digests everything the output
depends on (input contents, the stage config, the tokenizer or model). A stage whose folder is
complete is not run again; a stage killed midway leaves no complete-looking folder (see ``io``).
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sft_engine import __version__, plots
from sft_engine.config import PipelineConfig, SourceConfig, config_to_dict
from sft_engine.curate import check_rows, dedup_and_split, finalize, read_source, source_files
from sft_engine.data import prepare_split
from sft_engine.evaluate import generate_samples, heldout_loss
from sft_engine.io import (
    atomic_dir,
    digest_file,
    digest_files,
    digest_json,
    digest_path,
    is_complete,
    read_json,
    stage_dir,
    write_json_atomic,
)
from sft_engine.model import load_model, load_tokenizer, resolve_model, tokenizer_digest, weights_digest
from sft_engine.train import TrainResult, deepspeed_config, train

StepCallback = Callable[[int, dict[str, float]], None]
ROW_GROUP = 8192


@dataclass(frozen=True)
class StageOutput:
    """A finished stage folder, and whether it was reused from an earlier run rather than computed."""

    path: Path
    reused: bool


# ---- keys -------------------------------------------------------------------------------------


def _source_identity(s: SourceConfig) -> Any:
    """Content identity of a source: file digests, or the generator's package version."""
    if s.builtin == "chitchat":
        return [s.builtin, importlib.metadata.version("chitchat-dataset")]
    if s.builtin is not None:
        return [s.builtin, __version__]
    return [[str(p), digest_path(p)] for p in source_files(s)]


# Curation config that row-local checks depend on; dedup, split and mixing settings are not in it.
_ROW_KEYS = ("min_chars", "max_chars", "min_turns", "max_turns", "max_row_bytes", "quality", "decontaminate")


def _eval_sets_identity(cfg: PipelineConfig) -> list[Any]:
    """Contents of the eval sets decontamination checks against (a changed eval file invalidates the cache)."""
    out: list[Any] = []
    for es in cfg.curate.decontaminate.eval_sets:
        if es.builtin is not None:
            out.append([es.name, es.builtin, __version__])
        else:
            out.append([es.name, [[p, digest_path(Path(p))] for p in sorted(glob.glob(es.path or ""))]])
    return out


def source_key(cfg: PipelineConfig, s: SourceConfig) -> str:
    """Key of one source's row-local curation: its content, its reading options, the row checks. Not its weight."""
    row_cfg = {k: v for k, v in config_to_dict(cfg.curate).items() if k in _ROW_KEYS}
    row_cfg["eval_sets_identity"] = _eval_sets_identity(cfg)
    source = {k: v for k, v in config_to_dict(s).items() if k not in {"weight", "target_rows", "max_rows"}}
    return digest_json({"source": source, "identity": _source_identity(s), "checks": row_cfg, "seed": cfg.seed, "v": __version__})


def dedup_key(cfg: PipelineConfig) -> str:
    """Key of the global dedup + split: every source's key and the dedup/split settings. Not the weights."""
    c = config_to_dict(cfg.curate)
    return digest_json({
        "sources": [source_key(cfg, s) for s in cfg.curate.sources],
        "dedup": [c["dedup"], c["near_dedup"], c["heldout_fraction"]],
        "seed": cfg.seed,
    })


def curate_key(cfg: PipelineConfig) -> str:
    """Key of the final curated splits: the dedup key plus the mix weights."""
    mix = [[s.name, s.weight, s.target_rows, s.max_rows] for s in cfg.curate.sources]
    return digest_json({"dedup": dedup_key(cfg), "mix": mix, "seed": cfg.seed})


def prepare_key(cfg: PipelineConfig, curated: Path, model_dir: Path) -> str:
    return digest_json({
        "data": digest_files([curated / "train.parquet", curated / "heldout.parquet"]),
        "prepare": config_to_dict(cfg.prepare),
        "tokenizer": tokenizer_digest(model_dir),
    })


# Training settings that cannot change the trained weights (resume is exact; logging happens after).
_TRAIN_KEY_EXCLUDES = {"log_model", "register_model", "checkpoint_every", "keep_checkpoints", "resume", "threads"}


def train_key(cfg: PipelineConfig, prepared: Path, model_dir: Path) -> str:
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "train": {k: v for k, v in config_to_dict(cfg.train).items() if k not in _TRAIN_KEY_EXCLUDES},
        "seed": cfg.seed,
        "model": weights_digest(model_dir),
    })


def evaluate_key(cfg: PipelineConfig, prepared: Path, model_dir: Path, curated: Path) -> str:
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "heldout": digest_file(curated / "heldout.parquet"),
        "evaluate": config_to_dict(cfg.evaluate),
        "model": weights_digest(model_dir),
    })


# ---- stages -----------------------------------------------------------------------------------


def run_curate(cfg: PipelineConfig) -> StageOutput:
    """Curate the configured sources into train/heldout/rejected Parquet files plus stats.

    Three cached levels, so a curator changing one source or only the mix weights redoes only
    what changed: per-source row checks (``curate_sources/``), the global dedup + split
    (``curate_dedup/``), and the mixed splits (``curate/``).
    """
    out = stage_dir(cfg.work_dir, "curate", curate_key(cfg))
    if is_complete(out):
        return StageOutput(out, reused=True)
    cache: dict[str, Any] = {"sources_reused": [], "sources_computed": []}
    dedup_dir = stage_dir(cfg.work_dir, "curate_dedup", dedup_key(cfg))
    if is_complete(dedup_dir):
        cache["dedup_reused"] = True
    else:
        cache["dedup_reused"] = False
        parts = []
        for s in cfg.curate.sources:
            src_dir = stage_dir(cfg.work_dir, "curate_sources", f"{s.name}-{source_key(cfg, s)}")
            if is_complete(src_dir):
                cache["sources_reused"].append(s.name)
            else:
                checked = check_rows(read_source(s, cfg.seed, cfg.curate.max_row_bytes), cfg.curate)
                with atomic_dir(src_dir) as tmp:
                    checked.write_parquet(tmp / "rows.parquet")
                cache["sources_computed"].append(s.name)
            parts.append(pl.read_parquet(src_dir / "rows.parquet"))
        curated, near_info = dedup_and_split(pl.concat(parts), cfg.curate, cfg.seed)
        with atomic_dir(dedup_dir) as tmp:
            curated.write_parquet(tmp / "curated.parquet")
            write_json_atomic(tmp / "near_dedup.json", near_info)
    curated = pl.read_parquet(dedup_dir / "curated.parquet")
    train, heldout, rejected, stats = finalize(curated, read_json(dedup_dir / "near_dedup.json"), cfg.curate, cfg.seed)
    stats["cache"] = cache
    with atomic_dir(out) as tmp:
        # Small row groups let preparation stream the splits batch by batch.
        train.write_parquet(tmp / "train.parquet", row_group_size=ROW_GROUP)
        heldout.write_parquet(tmp / "heldout.parquet", row_group_size=ROW_GROUP)
        rejected.write_parquet(tmp / "rejected.parquet")
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.curate))
        plots.overlaid_histograms(
            {
                "read": curated["n_chars"].drop_nulls().to_list(),
                "kept": curated.filter(pl.col("drop_reason").is_null())["n_chars"].to_list(),
            },
            tmp / "lengths_before_after.png", "Conversation length before and after curation", "characters",
        )
        plots.bar_counts(stats["dropped_by_reason"], tmp / "drop_reasons.png", "Rows dropped by reason")
        plots.bar_counts(
            {name: st["mixed_train_rows"] for name, st in stats["per_source"].items()}, tmp / "source_share.png",
            "Train rows per source after mixing",
        )
        stats["digest"] = digest_files([tmp / "train.parquet", tmp / "heldout.parquet"])
        write_json_atomic(tmp / "stats.json", stats)
        if stats.get("near_dedup", {}).get("cluster_sizes"):
            plots.histogram(stats["near_dedup"]["cluster_sizes"], tmp / "near_dup_clusters.png", "Near-duplicate clusters", "rows per cluster")
    return StageOutput(out, reused=False)


def run_prepare(cfg: PipelineConfig, curated: Path, progress: Callable[[int], None] | None = None) -> StageOutput:
    """Tokenize with loss masks and pack train and held-out splits into Arrow files with a manifest."""
    model_dir = resolve_model(cfg.model)
    out = stage_dir(cfg.work_dir, "prepare", prepare_key(cfg, curated, model_dir))
    if is_complete(out):
        return StageOutput(out, reused=True)
    tokenizer = load_tokenizer(model_dir)
    manifest: dict[str, Any] = {"max_seq_len": cfg.prepare.max_seq_len, "splits": {}}
    with atomic_dir(out) as tmp:
        lengths: Any = []
        for split in ("train", "heldout"):
            st, lens = prepare_split(curated / f"{split}.parquet", tokenizer, cfg.prepare, tmp / f"{split}.arrow", progress)
            manifest["splits"][split] = st.as_dict()
            if split == "train":
                lengths = lens.tolist()
        manifest["digest"] = digest_json({
            "files": digest_files([tmp / "train.arrow", tmp / "heldout.arrow"]),
            "tokenizer": tokenizer_digest(model_dir),
            "prepare": config_to_dict(cfg.prepare),
        })
        write_json_atomic(tmp / "manifest.json", manifest)
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.prepare))
        plots.histogram(lengths, tmp / "train_tokens.png", "Train sample lengths", "tokens")
    return StageOutput(out, reused=False)


def train_job(cfg: PipelineConfig, prepared: Path, model_out: Path, scratch: Path, ckpt: Path | None = None) -> tuple[list[str], Path]:
    """Write the job file for a launched training run and return (exact launcher command, job file)."""
    from sft_engine.launch import launch_command, write_job

    job = write_job(
        scratch / "job.json", model_dir=resolve_model(cfg.model).resolve(), data=(prepared / "train.arrow").resolve(),
        output_dir=model_out.resolve(), train=config_to_dict(cfg.train), seed=cfg.seed,
        eval_data=(prepared / "heldout.arrow").resolve(),
        checkpoint_dir=ckpt.resolve() if ckpt else None, metrics_file=(scratch / "metrics.jsonl").resolve(),
        result_file=(scratch / "result.json").resolve(),
    )
    return launch_command(cfg.train, job), job


def _train_launched(cfg: PipelineConfig, prepared: Path, model_out: Path, ckpt: Path | None,
                    on_step: StepCallback | None, scratch: Path) -> TrainResult:
    from sft_engine.launch import run_launched

    cmd, _ = train_job(cfg, prepared, model_out, scratch, ckpt)
    (scratch / "metrics.jsonl").unlink(missing_ok=True)
    run_launched(cmd, scratch / "metrics.jsonl", on_step, scratch / "launcher.log")
    r = read_json(scratch / "result.json")
    return TrainResult(r["steps"], r["losses"], r["tokens"], r["supervised_tokens"], r["seconds"], model_out, r["history"], r["resumed_from"])


def run_train(cfg: PipelineConfig, prepared: Path, on_step: StepCallback | None = None) -> StageOutput:
    """Fine-tune with DeepSpeed (in-process, or under a launcher when ``train.nproc`` > 1 or a hostfile is set);
    the output folder holds ``model/`` (a Hugging Face folder) and stats."""
    model_dir = resolve_model(cfg.model)
    out = stage_dir(cfg.work_dir, "train", train_key(cfg, prepared, model_dir))
    if is_complete(out):
        return StageOutput(out, reused=True)
    # Checkpoints live beside the (atomic, temporary) output folder so they survive a crash.
    ckpt = cfg.work_dir / "checkpoints" / out.name
    ckpt_arg = ckpt if cfg.train.checkpoint_every else None
    world = cfg.train.nproc
    with atomic_dir(out) as tmp:
        if cfg.train.nproc > 1 or cfg.train.hostfile:
            result = _train_launched(cfg, prepared, tmp / "model", ckpt_arg, on_step, tmp)
            for name in ("job.json", "metrics.jsonl", "result.json"):
                (tmp / name).unlink(missing_ok=True)
        else:
            result = train(
                model_dir, prepared / "train.arrow", tmp / "model", cfg.train, cfg.seed, on_step=on_step,
                checkpoint_dir=ckpt_arg, eval_data=prepared / "heldout.arrow",
            )
        write_json_atomic(tmp / "stats.json", {
            "steps": result.steps,
            "final_loss": result.losses[-1],
            "first_loss": result.losses[0],
            "tokens": result.tokens,
            "supervised_tokens": result.supervised_tokens,
            "seconds": result.seconds,
            "tokens_per_s": result.tokens / result.seconds if result.seconds else 0.0,
            "history": result.history,
            "resumed_from_step": result.resumed_from,
        })
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.train))
        write_json_atomic(tmp / "deepspeed_config.json", deepspeed_config(cfg.train, world))
        xs = [h["step"] for h in result.history]
        series = {"train loss": (xs, result.losses)}
        evals = [(h["step"], h["eval/loss"]) for h in result.history if "eval/loss" in h]
        if evals:
            series["held-out loss"] = ([x for x, _ in evals], [y for _, y in evals])
        plots.curves(series, tmp / "loss.png", "Loss per supervised token", "loss")
    shutil.rmtree(ckpt, ignore_errors=True)
    return StageOutput(out, reused=False)


def run_evaluate(cfg: PipelineConfig, curated: Path, prepared: Path, tuned_dir: Path) -> StageOutput:
    """Held-out loss of the tuned model (and the base model, on the same split) plus generations."""
    base_dir = resolve_model(cfg.model)
    out = stage_dir(cfg.work_dir, "evaluate", evaluate_key(cfg, prepared, tuned_dir, curated))
    if is_complete(out):
        return StageOutput(out, reused=True)
    heldout = pl.read_parquet(curated / "heldout.parquet")
    # Prompts taken round-robin over sources, so every source shows up in the generation sample.
    n_sources = max(1, heldout["source"].n_unique())
    prompts = heldout.group_by("source", maintain_order=True).head(-(-cfg.evaluate.generate_samples // n_sources))
    metrics: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    models = {"tuned": tuned_dir, **({"base": base_dir} if cfg.evaluate.compare_base else {})}
    for name, folder in models.items():
        model = load_model(folder)
        tokenizer = load_tokenizer(folder)
        metrics[name] = heldout_loss(model, prepared / "heldout.arrow", cfg.evaluate.micro_batch_size, cfg.evaluate.max_heldout_rows)
        gens = generate_samples(model, tokenizer, prompts, cfg.evaluate.generate_samples, cfg.evaluate.max_new_tokens)
        samples[name] = gens
        scored = [g["exact_answer"] for g in gens if g["exact_answer"] is not None]
        if scored:
            metrics[name]["exact_answer"] = sum(scored) / len(scored)
        del model
    if "base" in metrics:
        metrics["delta_loss"] = metrics["tuned"]["loss"] - metrics["base"]["loss"]
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2))
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.evaluate))
    return StageOutput(out, reused=False)
