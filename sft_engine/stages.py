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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sft_engine import __version__, plots
from sft_engine.config import PipelineConfig, SourceConfig, config_to_dict
from sft_engine.curate import (
    CANONICAL_COLUMNS,
    KEY,
    MARK_COLUMNS,
    REJECTED_COLUMNS,
    attach,
    check_rows,
    dedup_and_split,
    plan_outputs,
    read_source,
    source_files,
)
from sft_engine.data import prepare_split
from sft_engine.evalsets import ifbench_items, verifiable_items
from sft_engine.evaluate import generate, generate_samples, heldout_loss, results_table, score_tasks
from sft_engine.instruct import score_ifbench
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
from sft_engine.knowledge import run_knowledge
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


def _source_identity(s: SourceConfig, digests: dict[Path, str] | None = None) -> Any:
    """Content identity of a source: file digests (``digests`` when already computed), or the generator's package version."""
    if s.builtin == "chitchat":
        return [s.builtin, importlib.metadata.version("chitchat-dataset")]
    if s.builtin is not None:
        return [s.builtin, __version__]
    if digests is None:
        digests = {p: digest_path(p) for p in source_files(s)}
    return [[str(p), d] for p, d in digests.items()]


# Curation config that row-local checks depend on; dedup, split and mixing settings are not in it.
_ROW_KEYS = ("min_chars", "max_chars", "min_turns", "max_turns", "max_row_bytes", "quality", "decontaminate")
# Source settings that only change the mix, never a row's checks.
_MIX_KEYS = frozenset({"weight", "target_rows", "max_rows"})


def _eval_sets_identity(cfg: PipelineConfig) -> list[Any]:
    """Contents of the eval sets decontamination checks against (a changed eval file invalidates the cache)."""
    out: list[Any] = []
    for es in cfg.curate.decontaminate.eval_sets:
        if es.builtin is not None:
            out.append([es.name, es.builtin, __version__])
        else:
            out.append([es.name, [[p, digest_path(Path(p))] for p in sorted(glob.glob(es.path or ""))]])
    return out


def _row_checks(cfg: PipelineConfig) -> dict[str, Any]:
    """The row-local check settings, with the contents of the eval sets they check against."""
    checks = {k: v for k, v in config_to_dict(cfg.curate).items() if k in _ROW_KEYS}
    checks["eval_sets_identity"] = _eval_sets_identity(cfg)
    # Units also store the near-dedup band keys (and, from format 2 on, the dedup and split hashes).
    nd = cfg.curate.near_dedup
    checks["sketch"] = [nd.ngram, nd.num_perm, nd.bands] if nd.enabled else None
    checks["unit_format"] = 2
    return checks


def _source_key(cfg: PipelineConfig, s: SourceConfig, checks: dict[str, Any], digests: dict[Path, str] | None = None) -> str:
    source = {k: v for k, v in config_to_dict(s).items() if k not in _MIX_KEYS}
    return digest_json({"source": source, "identity": _source_identity(s, digests), "checks": checks, "seed": cfg.seed, "v": __version__})


def source_key(cfg: PipelineConfig, s: SourceConfig) -> str:
    """Key of one source's row-local curation: its content, its reading options, the row checks. Not its weight."""
    return _source_key(cfg, s, _row_checks(cfg))


def _shard_key(cfg: PipelineConfig, s: SourceConfig, checks: dict[str, Any], digests: dict[Path, str]) -> str:
    """Key of one shard's row-local curation: its own files (not the glob, not the other shards), the reading options, the checks."""
    source = {k: v for k, v in config_to_dict(s).items() if k not in _MIX_KEYS | {"path"}}
    shard = [[str(p), d] for p, d in digests.items()]
    return digest_json({"shard": shard, "source": source, "checks": checks, "seed": cfg.seed, "v": __version__})


def _dedup_key(cfg: PipelineConfig, source_keys: list[str]) -> str:
    c = config_to_dict(cfg.curate)
    return digest_json({
        "sources": source_keys,
        "dedup": [c["dedup"], c["near_dedup"], c["heldout_fraction"]],
        "seed": cfg.seed,
    })


def dedup_key(cfg: PipelineConfig) -> str:
    """Key of the global dedup + split: every source's key and the dedup/split settings. Not the weights."""
    checks = _row_checks(cfg)
    return _dedup_key(cfg, [_source_key(cfg, s, checks) for s in cfg.curate.sources])


def _curate_key(cfg: PipelineConfig, dedup: str) -> str:
    mix = [[s.name, s.weight, s.target_rows, s.max_rows] for s in cfg.curate.sources]
    return digest_json({"dedup": dedup, "mix": mix, "seed": cfg.seed})


def curate_key(cfg: PipelineConfig) -> str:
    """Key of the final curated splits: the dedup key plus the mix weights."""
    return _curate_key(cfg, dedup_key(cfg))


def prepare_key(cfg: PipelineConfig, curated: Path, model_dir: Path) -> str:
    return digest_json({
        "data": digest_files([curated / "train.parquet", curated / "heldout.parquet"]),
        "prepare": config_to_dict(cfg.prepare),
        "tokenizer": tokenizer_digest(model_dir),
    })


# Training settings that cannot change the trained weights (resume is exact; logging happens after).
_TRAIN_KEY_EXCLUDES = {"log_model", "checkpoint_every", "keep_checkpoints", "resume", "threads"}


def train_key(cfg: PipelineConfig, prepared: Path, model_dir: Path) -> str:
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "train": {k: v for k, v in config_to_dict(cfg.train).items() if k not in _TRAIN_KEY_EXCLUDES},
        "seed": cfg.seed,
        "model": weights_digest(model_dir),
    })


# Evaluation settings that decide what is scored; the gate and registry act on the scores afterwards.
_EVAL_KEY_EXCLUDES = {"gate", "register_model"}


def evaluate_key(cfg: PipelineConfig, prepared: Path, model_dir: Path, curated: Path) -> str:
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "heldout": digest_file(curated / "heldout.parquet"),
        "evaluate": {k: v for k, v in config_to_dict(cfg.evaluate).items() if k not in _EVAL_KEY_EXCLUDES},
        "model": weights_digest(model_dir),
        "base": weights_digest(resolve_model(cfg.model)) if cfg.evaluate.compare_base else None,
        "v": __version__,
    })


# ---- stages -----------------------------------------------------------------------------------


# ---- curation: row-local units, then one global step -------------------------------------------


@dataclass(frozen=True)
class CurateUnit:
    """Row-local curation work: a whole source, or one shard (a group of files) of a glob source."""

    source: str
    label: str  # the source's name for a whole source, ``name[i]`` for its i-th shard
    files: tuple[str, ...] | None  # the shard's files; None = the whole source
    folder: Path  # curate_sources/<name>-<key>


@dataclass(frozen=True)
class CuratePlan:
    """Curation's output folders, and the row-local units its global step still needs."""

    out: Path  # curate/<key>: the mixed splits
    dedup: Path  # curate_dedup/<key>: the marks of every row after global dedup + split (marks.parquet)
    units: tuple[CurateUnit, ...]  # empty when ``out`` is already complete


def plan_curate(cfg: PipelineConfig) -> CuratePlan:
    """Key every curation level and cut the sources into units of row-local work.

    A source is one unit, except a glob of several files without ``limit``: that is one unit per
    ``runner.files_per_shard`` files, keyed by those files alone, so adding a shard to the glob leaves
    the other shards' work cached. Each file is digested once, here.
    """
    checks = _row_checks(cfg)
    source_keys: list[str] = []
    units: list[CurateUnit] = []
    for s in cfg.curate.sources:
        files = source_files(s) if s.path is not None else []
        digests = {p: digest_path(p) for p in files}
        source_keys.append(_source_key(cfg, s, checks, digests))
        # `limit` counts rows across the whole source, so a limited source cannot be cut.
        step = cfg.runner.files_per_shard if s.limit is None else max(1, len(files))
        groups = [files[i:i + step] for i in range(0, len(files), step)]
        if len(groups) <= 1:
            units.append(CurateUnit(s.name, s.name, None, stage_dir(cfg.work_dir, "curate_sources", f"{s.name}-{source_keys[-1]}")))
            continue
        for i, group in enumerate(groups):
            key = _shard_key(cfg, s, checks, {p: digests[p] for p in group})
            folder = stage_dir(cfg.work_dir, "curate_sources", f"{s.name}-{key}")
            units.append(CurateUnit(s.name, f"{s.name}[{i}]", tuple(str(p) for p in group), folder))
    dedup = stage_dir(cfg.work_dir, "curate_dedup", _dedup_key(cfg, source_keys))
    out = stage_dir(cfg.work_dir, "curate", _curate_key(cfg, dedup.name))
    # The outputs take the conversations from the unit folders, so they are needed unless the outputs exist.
    return CuratePlan(out, dedup, () if is_complete(out) else tuple(units))


def run_curate_unit(cfg: PipelineConfig, unit: CurateUnit) -> StageOutput:
    """Row-local curation of one unit (read, normalize, validate, length and quality filters,
    decontamination) into ``<unit.folder>/rows.parquet``, written atomically; reused when complete.

    Units share nothing, so they may run in any order, at once, in other processes or on other machines
    (the folder must be on storage they all see).
    """
    if is_complete(unit.folder):
        return StageOutput(unit.folder, reused=True)
    source = {s.name: s for s in cfg.curate.sources}[unit.source]
    if unit.files is None:
        rows = read_source(source, cfg.seed, cfg.curate.max_row_bytes)
    else:
        # Each file through the same reader (as a literal path); rows are numbered within the shard here
        # and across the whole source by the global step.
        parts = [read_source(source.model_copy(update={"path": glob.escape(f)}), cfg.seed, cfg.curate.max_row_bytes) for f in unit.files]
        rows = pl.concat(parts).with_columns(row=pl.int_range(1, pl.len() + 1, dtype=pl.Int64))
    checked = check_rows(rows, cfg.curate, cfg.seed)
    with atomic_dir(unit.folder) as tmp:
        checked.write_parquet(tmp / "rows.parquet")
    return StageOutput(unit.folder, reused=False)


def _unit_rows(plan: CuratePlan, columns: list[str]) -> pl.LazyFrame:
    """Those columns of every unit's checked rows, in plan order, with each sharded source's rows
    numbered 1.. across its shards (a shard's rows are numbered within it; row counts come from the
    Parquet footers). Lazy, so each reader takes only the columns it needs."""
    offsets: dict[str, int] = {}
    parts = []
    for unit in plan.units:
        path = unit.folder / "rows.parquet"
        offset = offsets.get(unit.source, 0)
        parts.append(pl.scan_parquet(path).select(columns).with_columns(row=pl.col("row") + offset))
        offsets[unit.source] = offset + pl.scan_parquet(path).select(pl.len()).collect().item()
    return pl.concat(parts)


def run_curate_global(cfg: PipelineConfig, plan: CuratePlan, units: Sequence[StageOutput]) -> StageOutput:
    """Curation's global step over the finished unit folders: exact and near dedup across every source
    and shard plus the held-out split (``curate_dedup/``: one row of marks per input row), then mixing,
    the report and the output files (``curate/``).

    ``units`` are ``run_curate_unit``'s results for ``plan.units``, in plan order, from any runner: the
    output bytes are the same. Memory: the dedup reads only the marks and the dedup keys ``check_rows``
    stored (hashes, band keys), plus the folded text of near-dup candidates; the outputs attach the
    conversations to the kept keys afterwards, so the corpus is never in memory at once.
    """
    if is_complete(plan.out):
        return StageOutput(plan.out, reused=True)
    if not plan.units:
        raise ValueError(f"{plan.out} was complete when curation was planned and is gone now; plan again (plan_curate)")
    got = [u.path for u in units]
    if got != [u.folder for u in plan.units] or not all(is_complete(p) for p in got):
        raise ValueError(
            f"run_curate_global needs the finished folders of the plan's {len(plan.units)} units in plan order, got {len(got)} "
            "(run run_curate_unit on each of plan.units, and pass its results in the same order)"
        )
    cache: dict[str, Any] = {
        "sources_reused": [u.label for u, r in zip(plan.units, units, strict=True) if r.reused],
        "sources_computed": [u.label for u, r in zip(plan.units, units, strict=True) if not r.reused],
        "dedup_reused": is_complete(plan.dedup),
    }
    if not cache["dedup_reused"]:
        keys = ["_dedup_hash", "_split_bucket"] + (["_bands", "_has_shingles"] if cfg.curate.near_dedup.enabled else [])
        slim = _unit_rows(plan, ["source", "row", "drop_reason", "decontam_match", "n_chars", *keys]).collect()

        def texts_of(positions: np.ndarray) -> pl.Series:
            # Only rows in a near-dup candidate pair: their folded text, read back from the unit files.
            want = slim.select(KEY).gather(positions).with_row_index("_want")
            got = _unit_rows(plan, [*KEY, "norm_text"]).join(want.lazy(), on=KEY, how="inner").collect()
            return got.sort("_want")["norm_text"]

        marks, near_info = dedup_and_split(slim, cfg.curate, cfg.seed, texts_of)
        marks = marks.select(MARK_COLUMNS)
        del slim
        with atomic_dir(plan.dedup) as tmp:
            marks.write_parquet(tmp / "marks.parquet")
            write_json_atomic(tmp / "near_dedup.json", near_info)
        del marks
    out = plan.out
    marks = pl.read_parquet(plan.dedup / "marks.parquet")
    train, heldout, rejected, stats = plan_outputs(marks, read_json(plan.dedup / "near_dedup.json"), cfg.curate, cfg.seed)
    stats["cache"] = cache
    content = _unit_rows(plan, ["source", "row", "raw", "messages"])
    with atomic_dir(out) as tmp:
        # Small row groups let preparation stream the splits batch by batch.
        attach(train, content, CANONICAL_COLUMNS).sink_parquet(tmp / "train.parquet", row_group_size=ROW_GROUP)
        attach(heldout, content, CANONICAL_COLUMNS).sink_parquet(tmp / "heldout.parquet", row_group_size=ROW_GROUP)
        attach(rejected, content, REJECTED_COLUMNS).sink_parquet(tmp / "rejected.parquet")
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.curate))
        plots.overlaid_histograms(
            {
                "read": marks["n_chars"].drop_nulls().to_list(),
                "kept": marks.filter(pl.col("drop_reason").is_null())["n_chars"].to_list(),
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


def run_curate(cfg: PipelineConfig) -> StageOutput:
    """Curate the configured sources into train/heldout/rejected Parquet files plus stats.

    Three cached levels, so a curator changing one source or only the mix weights redoes only
    what changed: row-local checks per source or shard (``curate_sources/``, see ``plan_curate``),
    the global dedup + split (``curate_dedup/``), and the mixed splits (``curate/``). Here the units
    run one after another; the curate flow can map them over threads, Dask or Ray instead (same
    folders, same bytes).
    """
    plan = plan_curate(cfg)
    return run_curate_global(cfg, plan, [run_curate_unit(cfg, u) for u in plan.units])


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


def _heldout_data(cfg: PipelineConfig, curated: Path, prepared: Path, folder: Path) -> Path:
    """Packed held-out rows tokenized the way ``folder``'s model reads them (prepared again if its tokenizer differs)."""
    if tokenizer_digest(folder) == tokenizer_digest(resolve_model(cfg.model)):
        return prepared / "heldout.arrow"
    return run_prepare(cfg.model_copy(update={"model": str(folder)}), curated).path / "heldout.arrow"


# Evaluation settings that change one model's scores (compare_base, the gate and the registry do not).
_SCORE_KEY_EXCLUDES = {"compare_base", "gate", "register_model"}


def score_model(cfg: PipelineConfig, folder: Path, heldout_arrow: Path, prompts: pl.DataFrame) -> StageOutput:
    """Every suite for one model, cached by the model's weights and tokenizer, the held-out data and the
    suite settings: ``metrics.json`` (flat ``<suite>.<metric>``), ``items.jsonl``, ``samples.json``.

    The base model is scored once and reused by every fine-tune evaluated against it.
    """
    ev = cfg.evaluate
    key = digest_json({
        "weights": weights_digest(folder), "tokenizer": tokenizer_digest(folder), "heldout": digest_file(heldout_arrow),
        "prompts": digest_json(prompts.select("messages").to_dicts()),
        "evaluate": {k: v for k, v in config_to_dict(ev).items() if k not in _SCORE_KEY_EXCLUDES}, "v": __version__,
    })
    out = stage_dir(cfg.work_dir, "evaluate_models", key)
    if is_complete(out):
        return StageOutput(out, reused=True)
    with atomic_dir(out) as tmp:
        model, tokenizer = load_model(folder), load_tokenizer(folder)
        flat = {f"heldout.{k}": v for k, v in heldout_loss(model, heldout_arrow, ev.micro_batch_size, ev.max_heldout_rows).items()}
        items: list[dict[str, Any]] = []
        if ev.knowledge.tasks:
            scores, recs = run_knowledge(
                model, tokenizer, list(ev.knowledge.tasks), tmp / "lm_eval_tasks", ev.knowledge.limit, ev.knowledge.num_fewshot,
                ev.knowledge.batch_size,
            )
            shutil.rmtree(tmp / "lm_eval_tasks")
            flat.update({f"knowledge.{t}.{k}": v for t, sc in scores.items() for k, v in sc.items()})
            items += recs
        if ev.ifbench_limit:
            ifb = list(ifbench_items()[: ev.ifbench_limit])
            chats = [[{"role": "user", "content": it["prompt"]}] for it in ifb]
            scores_if, recs = score_ifbench(ifb, generate(model, tokenizer, chats, ev.ifbench_max_new_tokens, ev.gen_batch_size))
            flat.update({f"ifbench.{k}": v for k, v in scores_if.items()})
            items += recs
        if ev.tasks_limit:
            tasks = verifiable_items()[: ev.tasks_limit]
            chats = [[{"role": "user", "content": it["prompt"]}] for it in tasks]
            scores_t, recs = score_tasks(tasks, generate(model, tokenizer, chats, ev.max_new_tokens, ev.gen_batch_size))
            flat.update({f"tasks.{k}": v for k, v in scores_t.items()})
            items += recs
        samples = generate_samples(model, tokenizer, prompts, ev.generate_samples, ev.max_new_tokens)
        write_json_atomic(tmp / "metrics.json", flat)
        (tmp / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2))
    return StageOutput(out, reused=False)


def run_evaluate(cfg: PipelineConfig, curated: Path, prepared: Path, tuned_dir: Path) -> StageOutput:
    """Base vs tuned on the same items: held-out loss, knowledge (lm-eval), IFBench rules, the verifiable tasks.

    Writes ``metrics.json`` (flat metrics per model), ``table.json``/``table.csv`` (metric, base, tuned, delta,
    stderrs), ``items.jsonl`` (every scored item per model), ``samples.json`` and ``eval_table.png``.
    """

    base_dir = resolve_model(cfg.model)
    out = stage_dir(cfg.work_dir, "evaluate", evaluate_key(cfg, prepared, tuned_dir, curated))
    if is_complete(out):
        return StageOutput(out, reused=True)
    heldout = pl.read_parquet(curated / "heldout.parquet")
    # Prompts taken round-robin over sources, so every source shows up in the generation sample.
    n_sources = max(1, heldout["source"].n_unique())
    prompts = heldout.group_by("source", maintain_order=True).head(-(-cfg.evaluate.generate_samples // n_sources))
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, Any] = {}
    models = {"tuned": tuned_dir, **({"base": base_dir} if cfg.evaluate.compare_base else {})}
    with atomic_dir(out) as tmp:
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as items_file:
            for name, folder in models.items():
                scored = score_model(cfg, folder, _heldout_data(cfg, curated, prepared, folder), prompts).path
                metrics[name] = read_json(scored / "metrics.json")
                samples[name] = json.loads((scored / "samples.json").read_text())
                for line in (scored / "items.jsonl").read_text(encoding="utf-8").splitlines():
                    items_file.write(json.dumps({"model": name, **json.loads(line)}) + "\n")
        table = results_table(metrics)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "table.json", table)
        pl.DataFrame(table).write_csv(tmp / "table.csv")
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2))
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.evaluate))
        plots.eval_table(table, tmp / "eval_table.png")
    return StageOutput(out, reused=False)
