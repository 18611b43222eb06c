"""The pipeline as a Prefect deployment on a real loopback Prefect server: ``sft-pipeline serve`` with a cron
schedule, ``sft-pipeline deploy`` and ``prefect deploy`` (prefect.yaml) onto a process work pool run by
``prefect worker start --run-once``, and the Prefect <-> MLflow links of the runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sft_engine.config import PipelineConfig, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["experiment=deploy-test", "curate.sources=[{name: tasks, builtin: verifiable_tasks, limit: 30}]", "curate.heldout_fraction=0.1"]


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each config's own SQLite store under its work_dir
    return env


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(0.5)
    pytest.fail(f"deployment {name} not registered within {timeout} s:\n{log.read_text()[-3000:]}")


def _assert_linked(flow_run: Any, tracking_uri: str) -> str:
    """Both directions: Prefect flow run -> MLflow run (tag + artifact) and MLflow run -> Prefect flow run (tags)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (tag,) = [t for t in flow_run.tags if t.startswith("mlflow_run_id:")]
    run_id = tag.split(":", 1)[1]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    (markdown,) = [a for a in artifacts if a.key == "mlflow-run"]
    assert f"`{run_id}`" in markdown.data and tracking_uri in markdown.data

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sft.stage"] == "sft_pipeline"
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert run.data.tags["prefect.flow_run_url"] == f"{_api_url()[: -len('/api')]}/runs/flow-run/{flow_run.id}"
    return run_id


def test_prefect_yaml_deployments_are_valid() -> None:
    """Every deployment in prefect.yaml names our flow, has a schedule, and carries a valid config."""
    from flows.pipeline import STAGES

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["build"] is None and spec["push"] is None
    for dep in spec["deployments"]:
        assert dep["entrypoint"] == "flows/pipeline.py:sft_pipeline"
        assert [s["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"]["until"] in STAGES
        cfg = PipelineConfig.model_validate(dep["parameters"]["config"])
        assert cfg.experiment == "sft-demo" and [s.name for s in cfg.curate.sources] == ["chitchat", "tasks"]


def test_deploy_commands_need_a_prefect_server(capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "-c", str(ROOT / "conf" / "demo.yaml")]) == 2
    assert "sft-pipeline servers up" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_registers_cron_deployment_and_triggered_run_completes(prefect_server, tmp_path: Path) -> None:
    """`sft-pipeline serve` in a subprocess: the deployment stores the cron schedule and the resolved config,
    a triggered run completes and links to its MLflow run, and stopping serve pauses the deployment."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    overrides = [f"work_dir={tmp_path / 'work'}", *TINY]
    cfg = load_config(ROOT / "conf" / "demo.yaml", overrides)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "-c", str(ROOT / "conf" / "demo.yaml"), "--cron", "0 3 * * *",
             "--name", "nightly-test", "--until", "curate", *overrides],
            cwd=ROOT, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deployment = _wait_for_deployment("sft_pipeline/nightly-test", serve, log)
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.active
        assert deployment.parameters == {"config": config_to_dict(cfg), "until": "curate"}
        assert "conf/demo.yaml" in deployment.description

        flow_run = run_deployment("sft_pipeline/nightly-test", timeout=240, poll_interval=1)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
        run_id = _assert_linked(flow_run, cfg.resolved_tracking_uri())
        assert len(list((tmp_path / "work" / "curate").glob("*/_SUCCESS"))) == 1
        # The stage's own subflow run and nested MLflow run link to each other too.
        mlflow = MlflowClient(tracking_uri=cfg.resolved_tracking_uri())
        (stage,) = mlflow.search_runs([mlflow.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        with get_client(sync_client=True) as client:
            subflow = client.read_flow_run(stage.data.tags["prefect.flow_run_id"])
        assert subflow.name == stage.data.tags["prefect.flow_run_name"] and subflow.parent_task_run_id is not None
        assert f"mlflow_run_id:{stage.info.run_id}" in subflow.tags
    finally:
        os.killpg(serve.pid, signal.SIGTERM)  # serve pauses the deployment on SIGTERM
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("sft_pipeline/nightly-test")
    assert deployment.paused and [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]


@pytest.mark.slow
def test_process_work_pool_worker_runs_both_deployments(prefect_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sft-pipeline deploy` and `prefect deploy` (prefect.yaml) register on a process pool; one
    `prefect worker start --type process --run-once` runs a triggered run of each to COMPLETED."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.cli import main

    pool = "training-test"
    env = _env(tmp_path)
    ours = [f"work_dir={tmp_path / 'ours'}", *TINY]
    assert main(["deploy", "-c", str(ROOT / "conf" / "demo.yaml"), "--pool", pool, "--name", "pool-test", "--cron", "none",
                 "--until", "curate", *ours]) == 0
    assert "prefect worker start --pool training-test" in capsys.readouterr().out

    # prefect.yaml through Prefect's own CLI, its config swapped for a tiny one at deploy time.
    theirs = config_to_dict(load_config(None, [f"work_dir={tmp_path / 'theirs'}", *TINY]))
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "sft-demo-nightly", "--pool", pool,
         "--params", json.dumps({"config": theirs, "until": "curate"})],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sft_pipeline/pool-test")
        assert dep.work_pool_name == pool and dep.schedules == [] and dep.entrypoint == "flows.pipeline.sft_pipeline"
        assert dep.job_variables == {"working_dir": str(Path.cwd().resolve())}
        assert dep.parameters["until"] == "curate"
        yaml_dep = client.read_deployment_by_name("sft_pipeline/sft-demo-nightly")
        assert yaml_dep.work_pool_name == pool and yaml_dep.entrypoint == "flows/pipeline.py:sft_pipeline"
        assert [s.schedule.cron for s in yaml_dep.schedules] == ["0 3 * * *"]
        assert yaml_dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    runs = [run_deployment(name, timeout=0) for name in ("sft_pipeline/pool-test", "sft_pipeline/sft-demo-nightly")]
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--run-once"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False,
    )
    with get_client(sync_client=True) as client:
        finished = [client.read_flow_run(r.id) for r in runs]
    assert [r.state.type.value for r in finished] == ["COMPLETED", "COMPLETED"], worker.stdout[-4000:] + worker.stderr[-4000:]
    for run, work in zip(finished, ("ours", "theirs")):
        _assert_linked(run, f"sqlite:///{tmp_path / work / 'mlflow.db'}")
        assert len(list((tmp_path / work / "curate").glob("*/_SUCCESS"))) == 1
