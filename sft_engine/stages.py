"""The four stages as plain functions: inputs and config in, a finished output folder out.

Each stage's folder is ``<work_dir>/<stage>/<key>`` where ``key`` digests everything the output
depends on (input contents, the stage config, the tokenizer or model). A stage whose folder is
complete is not run again; a stage killed midway leaves no complete-looking folder (see ``io``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from sft_engine import __version__, plots
from sft_engine.chat import TemplateError, generation_eos_ids
from sft_engine.config import PipelineConfig, config_to_dict
from sft_engine.data import prepare_split
from sft_engine.evaluation.generation import generate_samples
from sft_engine.evaluation.registry import configured_suites, metric_specs
from sft_engine.evaluation.report import results_table
from sft_engine.evaluation.suite import Scorer, Suite, inference_precision, paired_delta_stderr
from sft_engine.fields import cache_view
from sft_engine.io import (
    StageOutput,
    atomic_dir,
    digest_file,
    digest_files,
    digest_json,
    is_complete,
    read_json,
    stage_dir,
    write_inputs,
    write_json_atomic,
)
from sft_engine.model import load_model, load_tokenizer, resolve_model, tokenizer_digest, weights_digest
from sft_engine.runtime import release_memory
from sft_engine.template_check import CheckReport, check_template
from sft_engine.train import TrainResult, deepspeed_config, train

StepCallback = Callable[[int, dict[str, float]], None]


# Bumped when the masking or packing code changes what a prepared folder holds for the same inputs.
PREPARE_FORMAT = 2


def prepare_key(cfg: PipelineConfig, curated: Path, model_dir: Path) -> str:
    """The curated splits' bytes, the prepare fields (config.keyed("prepare")), the tokenizer, the model's
    generation-config stop tokens and the preparation format."""
    return digest_json({
        "data": digest_files([curated / "train.parquet", curated / "heldout.parquet"]),
        "prepare": cache_view(cfg, "prepare"),
        "tokenizer": tokenizer_digest(model_dir),
        "stops": generation_eos_ids(model_dir),
        "format": PREPARE_FORMAT,
    })


def _overrides_identity(cfg: PipelineConfig) -> str | None:
    """The DeepSpeed overrides file's contents: an edited file must retrain, whatever its path."""
    path = cfg.train.deepspeed_overrides
    return digest_file(path) if path and Path(path).is_file() else None


def train_key(cfg: PipelineConfig, prepared: Path, model_dir: Path) -> str:
    """The packed data's digest, the train fields (config.keyed("train"), the seed among them) and the base weights."""
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "train": cache_view(cfg, "train"),
        "deepspeed_overrides": _overrides_identity(cfg),
        "model": weights_digest(model_dir),
    })


# ---- stages -----------------------------------------------------------------------------------


def verify_template(tokenizer: Any, cfg: PipelineConfig, stop_ids: tuple[int, ...]) -> CheckReport:
    """The template self-check (``sft-pipeline check-template``) as preparation runs it first: a shape the template
    accepts but the masks get wrong stops the stage, unless ``prepare.allow_unverified_template``."""
    report = check_template(tokenizer, cfg.prepare.chat_template_kwargs, cfg.prepare.history, stop_ids, str(cfg.model))
    if not report.ok and not cfg.prepare.allow_unverified_template:
        failed = "; ".join(f"{r.shape}: {r.why[0]}" for r in report.results if r.result == "fail")
        raise TemplateError(
            f"the chat template of model '{cfg.model}' fails the mask self-check ({failed}); see "
            f"`sft-pipeline check-template --model {cfg.model}` for every shape, or set "
            "prepare.allow_unverified_template=true to prepare anyway"
        )
    return report


def run_prepare(cfg: PipelineConfig, curated: Path, progress: Callable[[int], None] | None = None) -> StageOutput:
    """Tokenize with loss masks and pack train and held-out splits into Arrow files with a manifest."""
    model_dir = resolve_model(cfg.model)
    out = stage_dir(cfg.work_dir, "prepare", prepare_key(cfg, curated, model_dir))
    if is_complete(out, cfg.verify_reuse):
        return StageOutput(out, reused=True)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = tuple(generation_eos_ids(model_dir))
    check = verify_template(tokenizer, cfg, stop_ids)
    manifest: dict[str, Any] = {
        "max_seq_len": cfg.prepare.max_seq_len, "history": cfg.prepare.history.value, "splits": {},
        "template_check": {"ok": check.ok, **check.counts},
    }
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        write_json_atomic(tmp / "template_check.json", check.as_dict())
        lengths: Any = []
        for split in ("train", "heldout"):
            st, lens = prepare_split(curated / f"{split}.parquet", tokenizer, cfg.prepare, tmp / f"{split}.arrow", progress, extra_stop_ids=stop_ids)
            manifest["splits"][split] = st.as_dict()
            if split == "train":
                lengths = lens.tolist()
        manifest["digest"] = digest_json({
            "files": digest_files([tmp / "train.arrow", tmp / "heldout.arrow"]),
            "tokenizer": tokenizer_digest(model_dir),
            "prepare": cache_view(cfg, "prepare"),
        })
        write_json_atomic(tmp / "manifest.json", manifest)
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.prepare))
        write_inputs(tmp, cfg.work_dir, [curated])
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
    if is_complete(out, cfg.verify_reuse):
        return StageOutput(out, reused=True)
    # Checkpoints live beside the (atomic, temporary) output folder so they survive a crash.
    ckpt = cfg.work_dir / "checkpoints" / out.name
    ckpt_arg = ckpt if cfg.train.checkpoint_every else None
    world = cfg.train.nproc
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        if cfg.train.nproc > 1 or cfg.train.hostfile:
            result = _train_launched(cfg, prepared, tmp / "model", ckpt_arg, on_step, tmp)
            for name in ("job.json", "metrics.jsonl", "result.json"):
                (tmp / name).unlink(missing_ok=True)
        else:
            try:
                result = train(
                    model_dir, prepared / "train.arrow", tmp / "model", cfg.train, cfg.seed, on_step=on_step,
                    checkpoint_dir=ckpt_arg, eval_data=prepared / "heldout.arrow",
                )
            finally:
                release_memory()  # the engine, model and optimizer, so that a sweep's next variant starts from the same footprint
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
        write_inputs(tmp, cfg.work_dir, [prepared])
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


# Bumped when a scored folder's files change (3: one folder per model and suite, with per-item values for pairing).
SCORE_FORMAT = 3


def evaluate_key(cfg: PipelineConfig, prepared: Path, model_dir: Path, curated: Path) -> str:
    """The data, the evaluate fields (config.keyed("evaluate")), the suites' inputs, the tuned and the base weights."""
    return digest_json({
        "data": read_json(prepared / "manifest.json")["digest"],
        "heldout": digest_file(curated / "heldout.parquet"),
        "evaluate": cache_view(cfg, "evaluate"),
        "suites": [s.identity(prepared / "heldout.arrow") for s in configured_suites(cfg.evaluate)],
        "model": weights_digest(model_dir),
        "base": weights_digest(resolve_model(cfg.model)) if cfg.evaluate.compare_base else None,
        "v": __version__, "format": SCORE_FORMAT,
    })


def suite_key(cfg: PipelineConfig, folder: Path, suite: Suite, heldout_arrow: Path) -> str:
    """One model's weights and tokenizer, one suite's settings (its config.keyed("evaluate.suite") fields) and inputs,
    and the settings every suite shares (config.keyed("evaluate.score")): changing one suite re-scores only it."""
    return digest_json({
        "weights": weights_digest(folder), "tokenizer": tokenizer_digest(folder),
        "shared": cache_view(cfg.evaluate, "evaluate.score"),
        "suite": [suite.kind, suite.name, cache_view(suite.settings, "evaluate.suite")], "inputs": suite.identity(heldout_arrow),
        "v": __version__, "format": SCORE_FORMAT,
    })


def samples_key(cfg: PipelineConfig, folder: Path, prompts: pl.DataFrame) -> str:
    """One model, the held-out prompts answered, and the evaluate.samples fields."""
    return digest_json({
        "weights": weights_digest(folder), "tokenizer": tokenizer_digest(folder),
        "prompts": digest_json(prompts.select("messages").to_dicts()), "shared": cache_view(cfg.evaluate, "evaluate.score"),
        "samples": cache_view(cfg.evaluate.samples, "evaluate.suite"), "v": __version__,
    })


def scoring_steps(cfg: PipelineConfig) -> int:
    """How many times ``score_model`` reports progress for one model: each configured suite, then the samples."""
    return len(configured_suites(cfg.evaluate)) + 1


class _LazyModel:
    """The model and tokenizer of a folder, loaded on first use: a model whose every suite is cached is never loaded."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._loaded = folder, None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = (load_model(self.folder), load_tokenizer(self.folder))
        return self._loaded


def score_suite(cfg: PipelineConfig, suite: Suite, folder: Path, heldout_arrow: Path, model: _LazyModel) -> StageOutput:
    """One suite on one model, cached by ``suite_key`` in ``evaluate_models/<key>``: ``metrics.json`` (``<suite>.<metric>``),
    ``items.jsonl`` (one record per item) and ``paired.json`` (per-item values for the paired comparison)."""
    out = stage_dir(cfg.work_dir, "evaluate_models", suite_key(cfg, folder, suite, heldout_arrow))
    if is_complete(out, cfg.verify_reuse):
        return StageOutput(out, reused=True)
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        m, tokenizer = model.get()
        scratch = tmp / "scratch"
        scratch.mkdir()
        ev = cfg.evaluate
        with inference_precision(ev.precision):
            result = suite.score(Scorer(m, tokenizer, ev.micro_batch_size, ev.gen_batch_size, heldout_arrow, scratch))
        shutil.rmtree(scratch)
        write_json_atomic(tmp / "metrics.json", {f"{suite.name}.{k}": v for k, v in result.metrics.items()})
        write_json_atomic(tmp / "paired.json", {f"{suite.name}.{k}": v for k, v in result.paired.items()})
        (tmp / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.records), encoding="utf-8")
        write_json_atomic(tmp / "suite.json", {"name": suite.name, "kind": suite.kind, "settings": config_to_dict(suite.settings),
                                               "model": str(folder)})
    return StageOutput(out, reused=False)


def score_samples(cfg: PipelineConfig, folder: Path, prompts: pl.DataFrame, model: _LazyModel) -> StageOutput:
    """Greedy answers to a few held-out prompts (shown, not scored), cached by ``samples_key``: ``samples.json``."""
    out = stage_dir(cfg.work_dir, "evaluate_models", samples_key(cfg, folder, prompts))
    if is_complete(out, cfg.verify_reuse):
        return StageOutput(out, reused=True)
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        m, tokenizer = model.get()
        with inference_precision(cfg.evaluate.precision):
            samples = generate_samples(m, tokenizer, prompts, cfg.evaluate.samples.n, cfg.evaluate.samples.max_new_tokens)
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2))
    return StageOutput(out, reused=False)


def score_model(cfg: PipelineConfig, folder: Path, heldout_arrow: Path, prompts: pl.DataFrame,
                progress: Callable[[str], None] | None = None) -> list[Path]:
    """Every configured suite for one model, each cached on its own (``score_suite``), then the samples; returns the
    scored folders, the samples' last. The base model is scored once and reused by every fine-tune evaluated against
    it. ``progress`` is called once as each of the ``scoring_steps`` finishes, with its name.
    """
    model, folders = _LazyModel(folder), []
    try:
        for suite in [*configured_suites(cfg.evaluate), None]:
            started = time.perf_counter()
            res = score_samples(cfg, folder, prompts, model) if suite is None else score_suite(cfg, suite, folder, heldout_arrow, model)
            name = "samples" if suite is None else suite.name
            logging.getLogger("sft_engine").info("scoring %s: %s %s in %.1f s", folder.name, name,
                                                 "reused" if res.reused else "scored", time.perf_counter() - started)
            if progress is not None:
                progress(name)
            folders.append(res.path)
    finally:
        model._loaded = None
        release_memory()
    return folders


def run_evaluate(cfg: PipelineConfig, curated: Path, prepared: Path, tuned_dir: Path,
                 progress: Callable[[str], None] | None = None) -> StageOutput:
    """Base vs tuned on the same items, every configured suite (``registry.configured_suites``).

    Writes ``metrics.json`` (flat metrics per model), ``table.json``/``table.csv`` (metric, direction, base, tuned,
    delta, stderrs), ``items.jsonl`` (every scored item per model), ``samples.json`` and ``eval_table.png``.
    ``progress``: called ``scoring_steps`` times per model, with "<model>: <step>".
    """
    base_dir = resolve_model(cfg.model)
    suites = configured_suites(cfg.evaluate)
    for suite in suites:
        suite.check()  # a team's own file that cannot be scored fails here, before any model is loaded
    out = stage_dir(cfg.work_dir, "evaluate", evaluate_key(cfg, prepared, tuned_dir, curated))
    if is_complete(out, cfg.verify_reuse):
        return StageOutput(out, reused=True)
    heldout = pl.read_parquet(curated / "heldout.parquet")
    # Prompts taken round-robin over sources, so every source shows up in the generation sample.
    n_sources = max(1, heldout["source"].n_unique())
    prompts = heldout.group_by("source", maintain_order=True).head(-(-cfg.evaluate.samples.n // n_sources))
    metrics: dict[str, dict[str, float]] = {}
    paired: dict[str, dict[str, Any]] = {}
    samples: dict[str, Any] = {}
    models = {"tuned": tuned_dir, **({"base": base_dir} if cfg.evaluate.compare_base else {})}
    used = [curated, prepared, tuned_dir]
    with atomic_dir(out, cfg.verify_reuse) as tmp:
        if tmp is None:
            return StageOutput(out, reused=True)
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as items_file:
            for name, folder in models.items():
                report = None if progress is None else (lambda step, name=name: progress(f"{name}: {step}"))
                heldout_arrow = _heldout_data(cfg, curated, prepared, folder)
                *scored, sampled = score_model(cfg, folder, heldout_arrow, prompts, report)
                used += [*scored, sampled, heldout_arrow.parent]
                metrics[name], paired[name] = {}, {}
                for s in scored:
                    metrics[name].update(read_json(s / "metrics.json"))
                    paired[name].update(read_json(s / "paired.json"))
                    for line in (s / "items.jsonl").read_text(encoding="utf-8").splitlines():
                        items_file.write(json.dumps({"model": name, **json.loads(line)}) + "\n")
                samples[name] = json.loads((sampled / "samples.json").read_text())
        if "base" in metrics:
            for metric, values in paired["tuned"].items():
                se = paired_delta_stderr(values, paired["base"].get(metric, ([], [])))
                if se is not None:
                    metrics["tuned"][f"{metric}_delta_stderr"] = se
        table = results_table(metrics, metric_specs(cfg.evaluate))
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "table.json", table)
        pl.DataFrame(table).write_csv(tmp / "table.csv")
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2))
        write_json_atomic(tmp / "config.json", config_to_dict(cfg.evaluate))
        write_inputs(tmp, cfg.work_dir, used)
        plots.eval_table(table, tmp / "eval_table.png")
    return StageOutput(out, reused=False)


def config_folders(cfg: PipelineConfig) -> list[Path]:
    """The stage folders a rerun of ``cfg`` would reuse, as far as they exist (``sft-pipeline gc`` keeps them):
    curation's units, dedup and outputs, then each later stage whose inputs are there. Nothing is computed, except
    that a packaged model is converted if it never was (its weights enter the keys)."""
    from sft_engine.curation.stage import plan_curate

    plan = plan_curate(cfg)
    found = [plan.out, plan.dedup, *(u.folder for u in plan.units)]
    if not is_complete(plan.out):
        return found
    model_dir = resolve_model(cfg.model)
    prepared = stage_dir(cfg.work_dir, "prepare", prepare_key(cfg, plan.out, model_dir))
    found.append(prepared)
    if not is_complete(prepared):
        return found
    trained = stage_dir(cfg.work_dir, "train", train_key(cfg, prepared, model_dir))
    found.append(trained)
    if is_complete(trained):
        found.append(stage_dir(cfg.work_dir, "evaluate", evaluate_key(cfg, prepared, trained / "model", plan.out)))
    return found
