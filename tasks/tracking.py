"""MLflow helpers for tasks: one parent run per pipeline run, one nested run per stage.

Runs are driven through ``MlflowClient`` with explicit run ids rather than MLflow's thread-local
"active run", because Prefect may execute tasks on worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from sft_engine.config import PipelineConfig, config_to_dict, flatten

# MLflow rejects param values longer than this.
_MAX_PARAM = 6000


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize first use of a local SQLite store: two runs starting at once on a fresh file would both
    run MLflow's schema creation and one fails ('table ... already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///") :] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client_for(cfg: PipelineConfig) -> tuple[MlflowClient, str]:
    """A client on the configured store and the experiment id (created with a local artifact folder)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.resolved_tracking_uri()
    with _store_lock(uri):
        if uri.startswith("sqlite:///"):
            ensure_sqlite_store(Path(uri[len("sqlite:///") :]))
        return _experiment(MlflowClient(tracking_uri=uri), cfg, uri)


def _schema_state(path: Path) -> tuple[str | None, bool, int]:
    """(schema version, half-migrated, runs) of an SQLite MLflow store, read with sqlite3 alone."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = con.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        return (version[0] if version else None), any(t.startswith("_alembic_tmp") for t in tables), runs
    finally:
        con.close()


def ensure_sqlite_store(path: Path) -> None:
    """Make the SQLite store appear only complete. Called under the store's lock.

    MLflow creates its tables and runs a chain of migrations on first use; a process killed in the middle (an OOM
    kill, a closed laptop lid) leaves a half-migrated file that every later run fails on ("duplicate column name",
    "table _alembic_tmp_experiments already exists"). So a new store is built in a temporary file and renamed into
    place; temporary files left by a killed creator are removed (creation only happens under the lock, so none is
    live); and a store left half-migrated by an earlier version, with no run in it, is moved aside and rebuilt.
    """
    from mlflow.store.db.utils import _get_latest_schema_revision

    for stale in path.parent.glob(path.name + ".tmp-*"):
        stale.unlink(missing_ok=True)
    if path.is_file():
        version, half, runs = _schema_state(path)
        if version == _get_latest_schema_revision() and not half:
            return
        if runs:
            return  # a store with runs in it is MLflow's to upgrade ('mlflow db upgrade'), not ours to move
        aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").resolve().as_uri())
    store.engine.dispose()
    os.replace(tmp, path)


def _experiment(client: MlflowClient, cfg: PipelineConfig, uri: str) -> tuple[MlflowClient, str]:
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return client, exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (cfg.work_dir / "mlartifacts").resolve().as_uri()
    try:
        return client, client.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:
        # Another run created it between our lookup and create.
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def git_commit() -> str:
    """The code's git commit, or 'unknown' outside a checkout."""
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    cfg: PipelineConfig, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> tuple[MlflowClient, str]:
    """Create a run (nested under ``parent_run_id`` when given) and return (client, run_id)."""
    client, exp_id = client_for(cfg)
    all_tags = {"mlflow.runName": name, "sft.stage": name, "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    flow_run_id = _prefect_flow_run_id()
    if flow_run_id:
        from prefect.runtime import flow_run

        all_tags["prefect.flow_run_id"] = flow_run_id
        all_tags["prefect.flow_run_name"] = str(flow_run.name)
        ui_url = prefect_flow_run_url(flow_run_id)
        if ui_url:
            all_tags["prefect.flow_run_url"] = ui_url
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    if flow_run_id:
        link_flow_run(client, run.info.run_id, flow_run_id, cfg.resolved_tracking_uri(), run.info.experiment_id)
    return client, run.info.run_id


def _prefect_flow_run_id() -> str | None:
    """The current Prefect flow run's id; None outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def prefect_flow_run_url(flow_run_id: str) -> str | None:
    """The Prefect UI page of a flow run, when a UI is known (PREFECT_UI_URL, or derived from PREFECT_API_URL)."""
    from prefect.settings import PREFECT_UI_URL
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id) if PREFECT_UI_URL.value() else None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run when the store is a tracking server (http/https), else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def link_flow_run(client: MlflowClient, run_id: str, flow_run_id: str, tracking_uri: str, experiment_id: str) -> None:
    """Back-link a Prefect flow run to its MLflow run: a flow-run tag ``mlflow_run_id:<id>`` (searchable in the
    Prefect UI), a markdown artifact with the run id, store and how to open it, and a link artifact when the
    store is an MLflow server. A failure here is logged, never raised: a missing link must not fail a training run."""
    import logging

    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.client.orchestration import get_client

    url = mlflow_run_url(tracking_uri, experiment_id, run_id)
    if url:
        how = f"[open the MLflow run]({url})"
    else:
        local = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
        how = f"`mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1`, then {local}"
    name = client.get_run(run_id).data.tags.get("mlflow.runName", run_id)
    markdown = (
        f"### MLflow run `{name}`\n\n| | |\n|---|---|\n| run id | `{run_id}` |\n| experiment id | `{experiment_id}` |\n"
        f"| tracking store | `{tracking_uri}` |\n\nOpen: {how}\n"
    )
    try:
        create_markdown_artifact(markdown, key="mlflow-run", description=f"MLflow run {run_id}")
        if url:
            create_link_artifact(url, link_text=f"MLflow run {name} ({run_id})", key="mlflow-run-link")
        with get_client(sync_client=True) as prefect:
            tags = prefect.read_flow_run(flow_run_id).tags
            prefect.update_flow_run(flow_run_id, tags=sorted({*tags, f"mlflow_run_id:{run_id}"}))
    except Exception as exc:  # noqa: BLE001 - any API failure: warn and go on
        logging.getLogger(__name__).warning("could not link Prefect flow run %s to MLflow run %s: %s", flow_run_id, run_id, exc)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_config(client: MlflowClient, run_id: str, cfg: PipelineConfig) -> None:
    log_params(client, run_id, config_to_dict(cfg))
    client.log_dict(run_id, config_to_dict(cfg), "resolved_config.json")


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def log_files(client: MlflowClient, run_id: str, folder: Path, suffixes: tuple[str, ...] = (".json", ".png")) -> None:
    """Log the small report files of a stage folder (not its data shards or weights)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in suffixes:
            client.log_artifact(run_id, str(path))


@contextlib.contextmanager
def system_metrics(cfg: PipelineConfig, run_id: str, interval: float = 5.0) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, GPU when present) sampled into ``run_id`` while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=cfg.resolved_tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def register(client: MlflowClient, run_id: str, name: str, artifact_path: str) -> str:
    """Register a run's logged model folder in the Model Registry; returns the new version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # already registered: add a version
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return client.create_model_version(name, source, run_id=run_id).version


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, folder: Path, profile: dict[str, Any]) -> None:
    """Record a stage output as an MLflow dataset input, identified by our own content digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=str(folder.resolve()), profile=json.dumps(profile))
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
    # MLflow looks the dataset up, then inserts it: two runs logging the same dataset at once (runs sharing a
    # work_dir reuse the same folders) both insert, and one fails on the store's unique key. Serialized on a local
    # store; on a server, the loser's retry finds the row.
    for attempt in range(3):
        try:
            with _store_lock(client.tracking_uri):
                client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as exc:  # MlflowException wrapping the database's IntegrityError
            if ("UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc)) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def end_run(client: MlflowClient, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def ui_hint(cfg: PipelineConfig) -> str:
    """Where to browse this store: the server's URL, or the command that opens the MLflow UI on a local store."""
    uri = cfg.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"


def run_references(cfg: PipelineConfig, keep_last: int) -> dict[str, list[str]]:
    """The stage folders MLflow names, by who names them (for ``sft-pipeline gc``): every registered model version
    (through its pipeline run), the ``keep_last`` newest pipeline runs, and any run still marked running. A run's
    folders are its stage runs' ``output_dir`` / ``model_path`` tags, nested runs included (sweep variants)."""
    client, _ = client_for(cfg)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, max_results=1000, page_token=token, order_by=["attributes.start_time DESC"])
        runs += list(page)
        token = page.token
        if not token:
            break
    children: dict[str, list[Any]] = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId", ""), []).append(r)

    def folders(run: Any) -> list[str]:
        found = [run.data.tags[k] for k in ("output_dir", "model_path") if k in run.data.tags]
        for child in children.get(run.info.run_id, []):
            found += folders(child)
        return found

    by_id = {r.info.run_id: r for r in runs}
    refs: dict[str, list[str]] = {}
    for mv in client.search_model_versions(max_results=10000):
        run = by_id.get(mv.tags.get("mlflow_run_id") or mv.run_id or "")
        if run is not None:
            refs[f"registered {mv.name} v{mv.version}"] = folders(run)
    top = children.get("", [])  # newest first
    for r in top[:keep_last]:
        refs.setdefault(f"run {r.info.run_id[:8]} ({r.info.run_name})", []).extend(folders(r))
    for r in top:
        if r.info.status == "RUNNING":
            refs.setdefault(f"run {r.info.run_id[:8]} is running", []).extend(folders(r))
    return refs
