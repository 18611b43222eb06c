"""The ``sft-pipeline`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from flows import console, ops_cli
from sft_engine.config import ConfigError, PipelineConfig, config_to_dict, load_config
from sft_engine.errors import EXIT_CODES, DiskFullError

EPILOG = textwrap.dedent(
    """
    configs and overrides:
      Every command reads one pipeline YAML (--config) with a section per stage:
      curate, prepare, train, evaluate. Override any key after the options:

        sft-pipeline run --config conf/demo.yaml train.lr=3e-5 train.max_steps=20
        sft-pipeline run --config conf/demo.yaml model=/path/to/hf_model_folder
        sft-pipeline train --config conf/demo.yaml train.zero_stage=3

      A bad key or value stops before any work, naming the key and what it accepts.
      'sft-pipeline show-config --config conf/demo.yaml' prints the resolved config.

    outputs:
      <work_dir>/<stage>/<hash>/   one folder per stage, named by the hash of its inputs and
                                   config, with a _SUCCESS marker; a rerun with the same config
                                   reuses finished stages.
      <work_dir>/mlflow.db         MLflow store (unless MLFLOW_TRACKING_URI or tracking_uri is set):
                                   a parent run per pipeline run, a nested run per stage.
                                   Browse: mlflow ui --backend-store-uri sqlite:///<work_dir>/mlflow.db

    Each stage command runs the stages before it first (reusing finished ones), then stops.

    Before any work, every check that needs no data or model is made (sources, model folder and chat
    template, evaluation data packages, work_dir space, hostfile, DeepSpeed config); each problem is one
    line naming the key or file and the fix. The terminal shows one line per stage and the summary; the
    full log (Prefect, libraries, tracebacks) is <work_dir>/logs/, its path printed first (--debug: all
    of it on the terminal too).
    """
) + "\nexit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()) + "\n"

STAGE_HELP = {
    "run": "Run the whole pipeline: curate -> prepare -> train -> evaluate.",
    "curate": "Read, normalize, validate, dedup and split the sources (Polars).",
    "prepare": "Curate if needed, then render chat templates, mask labels and pack.",
    "train": "Curate and prepare if needed, then fine-tune with DeepSpeed.",
    "evaluate": "Everything before it if needed, then base vs tuned: held-out loss, knowledge retention (lm-eval: "
    "MMLU, OpenBookQA, PIQA...), IFBench instruction following, the verifiable task set, and the team's own suites "
    "from files (evaluate.suites: generation, multiple_choice, loss); applies evaluate.gate. "
    "With --model PATH, evaluates any local Hugging Face model folder instead of training one.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-pipeline",
        description="Supervised fine-tuning pipeline: Polars curation, assistant-only loss masks, "
        "best-fit-decreasing packing, DeepSpeed training and evaluation, as Prefect flows tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    extra = {
        "sweep": "Mix sweep: train and evaluate every variant of the config's 'sweep:' section (named overrides, a grid "
        "over weights, leave-one-out) on one token budget and the same held-out items; print and log the comparison "
        "(see conf/demo_sweep.yaml). Finished variants are reused, so adding one runs only that one.",
        "show-config": "Print the resolved config (YAML + overrides) and exit.",
        "preview-mask": "Dry run: curate if needed, then print one curated conversation as the model sees it, every "
        "sample it gives (a turn the template rewrites in history is trained in a sample of its own), with the supervised "
        "tokens highlighted: reasoning, tool calls and stop tokens included.",
        "check-template": "Self-check the model's chat template (or --template FILE on the model's tokenizer): sentinel "
        "conversations of many shapes (multi-turn, system prompt, tool calls with tools, reasoning, padded text) are masked "
        "as preparation masks them, and every trained turn must label exactly its inference-form tokens and end on a "
        "stop token. Prints a table per shape; exits 4 when a shape the template accepts fails.",
    }
    for name, help_text in {**STAGE_HELP, **extra}.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", default="conf/demo.yaml", help="pipeline YAML (default: %(default)s)")
        if name == "train":
            p.add_argument(
                "--dry-run", action="store_true",
                help="curate and prepare if needed, then print the exact launcher command for training (train.nproc, "
                "train.hostfile) instead of running it",
            )
        if name == "evaluate":
            p.add_argument(
                "--model", dest="eval_model", default=None, metavar="PATH",
                help="a local Hugging Face model folder to evaluate against the config's base model (skips training)",
            )
        if name == "preview-mask":
            p.add_argument("--row", type=int, default=0, help="row of the curated train split to show (default: %(default)s)")
        if name == "check-template":
            p.add_argument("--model", dest="check_model", default=None, metavar="PATH",
                           help="a local Hugging Face model folder or packaged name (default: the config's model)")
            p.add_argument("--template", default=None, metavar="FILE", help="a .jinja chat template to check on that tokenizer")
            p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the report as JSON")
        p.add_argument("--debug", action="store_true", help="library logs and tracebacks on the terminal too")
        p.add_argument("--verify", action="store_true", help="re-hash every file of a stage folder before reusing it "
                       "(sizes are always checked); a damaged folder is moved aside and recomputed (verify_reuse=true)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-5 model=/path")
    ops_cli.add_commands(sub)  # serve, deploy, servers
    return parser


def preview_mask(cfg: PipelineConfig, row: int) -> None:
    """Print one curated conversation as the model sees it, every sample it gives, supervised tokens highlighted."""
    import polars as pl
    from rich.console import Console
    from rich.text import Text

    from sft_engine.chat import generation_eos_ids, mask_preview
    from sft_engine.curation.schema import row_dicts
    from sft_engine.curation.stage import run_curate
    from sft_engine.model import load_tokenizer, resolve_model

    curated = pl.read_parquet(run_curate(cfg).path / "train.parquet")
    if not 0 <= row < curated.height:
        raise SystemExit(f"sft-pipeline: --row {row} is out of range; the curated train split has {curated.height} rows")
    (conversation,) = row_dicts(curated.slice(row, 1))
    model_dir = resolve_model(cfg.model)
    p = cfg.prepare
    samples = mask_preview(load_tokenizer(model_dir), conversation, p.mask, p.history, p.chat_template_kwargs, generation_eos_ids(model_dir))
    console = Console()
    console.rule(f"row {row} of {curated.height} (source: {conversation['source']}), mask={p.mask.value}, history={p.history.value}: "
                 f"{len(samples)} sample(s)")
    for i, pieces in enumerate(samples):
        text = Text()
        for piece, supervised in pieces:
            text.append(piece, style="bold black on green" if supervised else "dim")
        if len(samples) > 1:
            console.rule(f"sample {i + 1} of {len(samples)}" + (" (a turn in its inference form)" if i else ""), style="dim")
        console.print(text)
        n_sup = sum(s for _, s in pieces)
        console.rule(f"{n_sup} of {len(pieces)} tokens supervised (green); dim = label -100", style="dim")


def check_template_command(cfg: PipelineConfig, model: str | None, template: str | None, json_out: str | None) -> int:
    """Run the template self-check on a model's tokenizer (optionally with another template); 0 if no shape fails."""
    from sft_engine.chat import generation_eos_ids
    from sft_engine.model import load_tokenizer, resolve_model
    from sft_engine.template_check import check_template, format_report

    model_dir = resolve_model(model or cfg.model)
    tokenizer = load_tokenizer(model_dir)
    name = str(model or cfg.model)
    if template is not None:
        path = Path(template)
        if not path.is_file():
            print(f"sft-pipeline: --template {template} does not exist; pass a .jinja file", file=sys.stderr)
            return 2
        tokenizer.chat_template = path.read_text()
        name = f"{path.name} on {name}"
    report = check_template(tokenizer, cfg.prepare.chat_template_kwargs, cfg.prepare.history, tuple(generation_eos_ids(model_dir)), name)
    print(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report.as_dict(), indent=2))
        print(f"report: {json_out}")
    return 0 if report.ok else 4


def _print_summary(result: dict[str, Any], cfg: PipelineConfig) -> None:
    """The end of a run: outputs, the evaluation table once, the gate and its reasons, the registered version, and
    how to look at it all in MLflow and Prefect."""
    from rich.console import Console

    out = Console(soft_wrap=True, highlight=False)
    for key in ("curated", "prepared", "model"):
        if key in result:
            out.print(f"{key + ':':10s}{result[key]}", markup=False)
    if result.get("table"):
        from sft_engine.evaluation.report import format_table

        out.print("\nevaluation, base vs tuned (± one standard error; loss: lower is better)")
        out.print(format_table(result["table"]), markup=False)
        gate = result["gate"]
        out.print(f"gate: {'passed' if gate['passed'] else 'FAILED'}" + "".join(f"\n  - {r}" for r in gate["reasons"]), markup=False)
        if result.get("registered_version"):
            out.print(f"registered: {cfg.evaluate.register_model} version {result['registered_version']}", markup=False)
    from tasks.tracking import ui_hint

    hint = ui_hint(cfg)
    out.print(f"\nMLflow run {result['mlflow_run_id']}: {hint}" + ("" if hint.startswith("open ") else "  (then http://127.0.0.1:5000)"),
              markup=False)
    if result.get("flow_run_id"):
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        where = (f"{api.rsplit('/api', 1)[0]}/runs/flow-run/{result['flow_run_id']}" if api
                 else f"prefect server start --host 127.0.0.1  (then http://127.0.0.1:4200/runs/flow-run/{result['flow_run_id']})")
        out.print(f"Prefect flow run {result['flow_run_id']}: {where}", markup=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ops_cli.COMMANDS:
        return ops_cli.run(args)
    if getattr(args, "verify", False):
        args.overrides.append("verify_reuse=true")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"sft-pipeline: {exc}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from sft_engine.preflight import PreflightError, require

    until = {"run": "evaluate", "sweep": "evaluate", "preview-mask": "curate", "check-template": "curate"}.get(args.command, args.command)
    eval_model = getattr(args, "eval_model", None)
    debug = getattr(args, "debug", False)
    log_file: Path | None = None
    try:
        require(cfg, until, eval_model)
        if args.command == "check-template":
            from sft_engine.preflight import check_model

            problems = check_model(args.check_model or cfg.model, "--model", need_template=args.template is None)[0]
            if problems:
                raise PreflightError(problems)
        log_file = console.log_path(cfg.work_dir, args.command)
        console.setup(log_file, debug)
        print(f"log: {log_file}")
        return _dispatch(args, cfg, eval_model)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure ends as one line and an exit code
        if console.exit_code_for(exc) == DiskFullError.exit_code:
            exc = _disk_full(exc, cfg, until, eval_model)
        return console.report(exc, log_file, debug)


def _disk_full(exc: BaseException, cfg: PipelineConfig, until: str, eval_model: str | None) -> DiskFullError:
    """The disk-full message with the space the run needs (the preflight's estimate)."""
    from sft_engine.preflight import space_needed

    try:
        need = f"; this run needs about {space_needed(cfg, until, eval_model) / 2**30:.2f} GiB free in work_dir (the preflight's estimate)"
    except Exception:  # noqa: BLE001 - the estimate is a hint; the message stands without it
        need = ""
    return console.disk_full(exc, need)


def _dispatch(args: argparse.Namespace, cfg: PipelineConfig, eval_model: str | None) -> int:
    if args.command == "train" and args.dry_run:
        from sft_engine.curation.stage import run_curate
        from sft_engine.stages import run_prepare, train_job

        prepared = run_prepare(cfg, run_curate(cfg).path).path
        scratch = cfg.work_dir / "launch"
        cmd, job = train_job(cfg, prepared, scratch / "model", scratch)
        print(f"# job file: {job}\n# run on the first host (a hostfile lists 'hostname slots=N' per node):")
        print(" ".join(cmd))
        return 0
    if args.command == "preview-mask":
        preview_mask(cfg, args.row)
        return 0
    if args.command == "check-template":
        return check_template_command(cfg, args.check_model, args.template, args.json_out)
    if args.command == "sweep":
        from flows.sweep import sft_sweep

        result = sft_sweep(config=config_to_dict(cfg))
        print((Path(result["output_dir"]) / "comparison.md").read_text())
        print(f"MLflow sweep run: {result['mlflow_run_id']}  artifacts: {result['output_dir']}")
        return 0
    from flows.pipeline import sft_pipeline

    until = "evaluate" if args.command == "run" else args.command
    result = sft_pipeline(config=config_to_dict(cfg), until=until, model=str(Path(eval_model).resolve()) if eval_model else None)
    _print_summary(result, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
