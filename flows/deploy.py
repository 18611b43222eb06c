"""The pipeline as a Prefect deployment: scheduled and triggered runs instead of one-off CLI calls.

Two ways to run a deployment's flow runs:

    sft-pipeline serve  --config X.yaml --cron "0 3 * * *"     this process polls the server and runs them
    sft-pipeline deploy --config X.yaml --pool training        workers of a work pool run them:
    prefect worker start --pool training --type process         (one per GPU machine)

Parameters are the *resolved* config (YAML + overrides, validated, every default filled in) and ``until``,
not a path and overrides: the parameters Prefect stores on the deployment and on each flow run are then
exactly what ran, so "run again" in the UI reproduces a run even after the YAML changed on disk or on a
worker whose checkout differs. To pick up an edited YAML, serve or deploy again (same name = update). The
YAML path and overrides are recorded in the deployment's description for provenance.

Relative paths in the config (``work_dir``, source files) resolve against the working directory of the
flow run: the directory ``serve`` runs in, or the one ``deploy`` was called from (the process work pool's
``working_dir`` job variable).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.pipeline import STAGES, sft_pipeline
from sft_engine.config import PipelineConfig, config_to_dict

DEFAULT_CRON = "0 3 * * *"
DEFAULT_NAME = "scheduled"


def deployment_parameters(cfg: PipelineConfig, until: str = "evaluate") -> dict[str, Any]:
    """The flow parameters of a deployment: the resolved config and the last stage to run."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}, got '{until}'")
    return {"config": config_to_dict(cfg), "until": until}


def _description(config_path: str | None, overrides: list[str]) -> str:
    cmd = " ".join(["sft-pipeline", "show-config", "-c", shlex.quote(str(config_path or "<none>")), *map(shlex.quote, overrides)])
    return f"Resolved from {config_path or 'defaults'} with overrides {overrides or 'none'}. Reproduce the config: {cmd}"


def build_deployment(
    cfg: PipelineConfig,
    name: str = DEFAULT_NAME,
    cron: str | None = DEFAULT_CRON,
    until: str = "evaluate",
    config_path: str | None = None,
    overrides: list[str] | None = None,
    **kwargs: Any,
) -> RunnerDeployment:
    """A deployment of ``sft_pipeline`` with the resolved config as parameters and an optional cron schedule."""
    return sft_pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters=deployment_parameters(cfg, until),
        description=_description(config_path, overrides or []),
        tags=["sft-pipeline", f"experiment:{cfg.experiment}", f"until:{until}"],
        **kwargs,
    )


def serve_pipeline(deployment: RunnerDeployment, limit: int | None = 1) -> None:
    """Register ``deployment`` and run its flow runs in this process until interrupted (blocks).

    ``limit`` caps concurrent runs (default 1: a second scheduled run waits rather than competing for the
    same GPU). On Ctrl-C / SIGTERM the deployment is paused, so no runs pile up while nothing serves them.
    """
    from prefect import serve

    serve(deployment, limit=limit)


def deploy_to_pool(
    cfg: PipelineConfig,
    pool: str,
    name: str = DEFAULT_NAME,
    cron: str | None = DEFAULT_CRON,
    until: str = "evaluate",
    config_path: str | None = None,
    overrides: list[str] | None = None,
    working_dir: Path | None = None,
    concurrency_limit: int | None = 1,
) -> UUID:
    """Register the pipeline on work pool ``pool`` (created as a ``process`` pool if missing); returns the deployment id.

    The entrypoint is the module path ``flows.pipeline.sft_pipeline``, so a worker needs this package
    installed (``pip install -e .``) and no code upload: a process worker runs it with its own Python in
    ``working_dir`` (default: the current directory). ``concurrency_limit`` runs of the deployment at once
    (default 1: a second scheduled run waits instead of competing for the same GPU).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            except ObjectAlreadyExists:  # created concurrently
                pass
    deployment = build_deployment(
        cfg, name, cron, until, config_path, overrides,
        work_pool_name=pool,
        job_variables={"working_dir": str((working_dir or Path.cwd()).resolve())},
        entrypoint_type=EntrypointType.MODULE_PATH,
        concurrency_limit=concurrency_limit,
    )
    from prefect.deployments.runner import deploy

    (deployment_id,) = deploy(deployment, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                              ignore_warnings=True)
    return deployment_id
