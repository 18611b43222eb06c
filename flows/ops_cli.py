"""The operating commands of ``sft-pipeline``: ``serve``, ``deploy`` (Prefect deployments), ``servers`` and ``gc``.

Kept apart from ``flows/cli.py`` so that building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept out of the parser's import: building it imports nothing heavy
    from sft_engine.config import PipelineConfig

COMMANDS = ("serve", "deploy", "servers", "gc")

DEPLOY_EPILOG = textwrap.dedent(
    """
    Parameters stored on the deployment are the resolved config (YAML + overrides, every default filled in)
    and --until: each flow run then records exactly what it ran, and "run again" reproduces it after the YAML
    changed. Serve or deploy again under the same --name to pick up an edited YAML.

    Needs a Prefect server (PREFECT_API_URL): `sft-pipeline servers up` starts one on 127.0.0.1.
    Relative paths in the config resolve against the directory you run this from.

      sft-pipeline serve  -c conf/demo.yaml --cron "0 3 * * *" train.max_steps=50
      sft-pipeline deploy -c conf/demo.yaml --pool training && prefect worker start --pool training --type process
      prefect deployment run sft_pipeline/sft-demo          # one run now
    """
)


def _not_empty_cron(value: str) -> str | None:
    return None if value.lower() in ("", "none", "off") else value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``deploy`` and ``servers`` to the ``sft-pipeline`` sub-command parser."""
    from flows import servers

    helps = {
        "serve": "Register the pipeline as a Prefect deployment with a cron schedule and run its flow runs here (blocks).",
        "deploy": "Register the pipeline as a deployment on a Prefect work pool; workers of the pool run it.",
    }
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=DEPLOY_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", default="conf/demo.yaml", help="pipeline YAML (default: %(default)s)")
        p.add_argument("--cron", default="0 3 * * *", type=_not_empty_cron,
                       help="schedule, cron syntax in UTC (default: '%(default)s'); 'none' for trigger-only")
        p.add_argument("--name", help="deployment name (default: the config's experiment); runs as sft_pipeline/<name>")
        p.add_argument("--until", default="evaluate", choices=("curate", "prepare", "train", "evaluate"),
                       help="last stage of each run (default: %(default)s)")
        if name == "serve":
            p.add_argument("--limit", type=int, default=1, help="flow runs at once in this process (default: %(default)s)")
        else:
            p.add_argument("--pool", required=True, help="work pool name (a 'process' pool is created if missing)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-5")

    p = sub.add_parser("gc", help=GC_HELP, description=GC_HELP, epilog=GC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default="conf/demo.yaml", help="pipeline YAML whose work_dir is collected (default: %(default)s)")
    p.add_argument("--keep-last", type=int, default=5, metavar="N", help="keep the folders of the N newest pipeline runs (default: %(default)s)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="remove only folders older than this")
    p.add_argument("--apply", action="store_true", help="remove (the default only lists)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. work_dir=/data/runs")

    help_text = "Start, stop or check a local MLflow tracking server and Prefect server (127.0.0.1 by default)."
    p = sub.add_parser("servers", help=help_text, description=help_text + "\n\n" + (servers.__doc__ or "").replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--dir", type=Path, default=servers.DEFAULT_DIR, help="pid files, logs, databases (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s; 0.0.0.0 exposes them)")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--prefect-db", help="Prefect database URL, e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect "
                   "(default: SQLite under --dir)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for both to answer (default: %(default)s)")


GC_HELP = "List the stage folders of the config's work_dir with size, age and what keeps them; remove the rest with --apply."
GC_EPILOG = textwrap.dedent(
    """
    A folder stays when something refers to it: a registered model version (its pipeline run's stage folders), one
    of the --keep-last newest pipeline runs in the MLflow store, a run still marked running, the config given (the
    folders a rerun of it would reuse), or a kept folder made from it (its inputs.json). A folder a running stage is
    building (its key lock is held) is never removed. Leftover temporary folders of killed runs and damaged folders
    that reuse moved aside (.damaged-*) go too. The registered models themselves live in the MLflow store.

      sft-pipeline gc -c conf/demo.yaml                          # dry run: what would go, and why the rest stays
      sft-pipeline gc -c conf/demo.yaml --keep-last 2 --apply
      sft-pipeline gc -c conf/demo.yaml --older-than 7 --apply   # only folders not touched for a week
    """
)


def _gc(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from sft_engine import gc
    from sft_engine.stages import config_folders
    from tasks.tracking import run_references

    if not cfg.work_dir.is_dir():
        print(f"sft-pipeline: work_dir '{cfg.work_dir}' does not exist; nothing to collect", file=sys.stderr)
        return 2
    refs = run_references(cfg, args.keep_last)
    refs["the config"] = [str(p) for p in config_folders(cfg)]
    entries = gc.plan(cfg.work_dir, refs, args.older_than)
    for e in sorted(entries, key=lambda e: (not e.remove, e.rel)):
        why = "remove" if e.remove else "keep: " + "; ".join(dict.fromkeys(e.kept_by))
        print(f"{e.bytes / 2**20:10,.1f} MiB {e.age_days:6.1f} d  {e.rel:62} {e.kind:11} {why}")
    going = [e for e in entries if e.remove]
    size = sum(e.bytes for e in going) / 2**20
    if not args.apply:
        print(f"{len(entries)} folders; {len(going)} would be removed ({size:,.1f} MiB): pass --apply to remove them")
        return 0
    freed = gc.remove(cfg.work_dir, going)
    print(f"removed {len(going)} of {len(entries)} folders ({freed / 2**20:,.1f} MiB)")
    return 0


def _servers(args: argparse.Namespace) -> int:
    from flows import servers

    if args.action == "down":
        stopped = servers.servers_down(args.dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"no servers of {args.dir} were running")
        return 0
    if args.action == "status":
        status = servers.servers_status(args.dir)
        if not status:
            print(f"no servers recorded in {args.dir}: `sft-pipeline servers up --dir {args.dir}`")
            return 1
        for name, s in status.items():
            state = "up" if s["healthy"] else ("running, not answering" if s["pid"] else "down")
            print(f"{name:8} {state:24} {s['url']}  pid {s['pid'] or '-'}  log {s['log']}")
        return 0 if all(s["healthy"] for s in status.values()) else 1
    start = time.monotonic()
    try:
        endpoints = servers.servers_up(args.dir, args.host, args.mlflow_port, args.prefect_port, args.prefect_db, args.timeout)
    except RuntimeError as exc:
        print(f"sft-pipeline: {exc}", file=sys.stderr)
        return 1
    print(f"up in {time.monotonic() - start:.1f} s (logs and pid files in {args.dir})")
    print(f"  MLflow UI + tracking  {endpoints['mlflow'].url}")
    print(f"  Prefect UI            {endpoints['prefect'].url}   (API {endpoints['prefect'].url}/api)")
    print("point pipeline runs and workers at them:")
    print(servers.exports(endpoints))
    print(f"stop: sft-pipeline servers down --dir {args.dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute one of ``COMMANDS``; returns the exit status."""
    if args.command == "servers":
        return _servers(args)
    from sft_engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"sft-pipeline: {exc}", file=sys.stderr)
        return 2
    if args.command == "gc":
        return _gc(args, cfg)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("sft-pipeline: a deployment needs a Prefect server; start one with `sft-pipeline servers up`, then "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    from flows import deploy

    name = args.name or cfg.experiment
    schedule = f"cron '{args.cron}' (UTC)" if args.cron else "no schedule"
    if args.command == "deploy":
        dep_id = deploy.deploy_to_pool(cfg, args.pool, name, args.cron, args.until, args.config, args.overrides)
        print(f"deployment sft_pipeline/{name} ({dep_id}) on pool '{args.pool}', {schedule}")
        print(f"run it: prefect worker start --pool {args.pool} --type process   (on each training machine)")
        print(f"one run now: prefect deployment run sft_pipeline/{name}")
        return 0
    deployment = deploy.build_deployment(cfg, name, args.cron, args.until, args.config, args.overrides)
    print(f"serving sft_pipeline/{name}, {schedule}; one run now: prefect deployment run sft_pipeline/{name}")
    deploy.serve_pipeline(deployment, limit=args.limit)
    return 0
