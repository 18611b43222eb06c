"""Two pipeline runs at once against one real Prefect server (loopback) and one MLflow SQLite store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server on loopback for this module's subprocess runs.

    Subprocesses point at it rather than each starting Prefect's temporary server: a temporary
    server outlives a SIGKILLed parent (it is a separate uvicorn process) and would be leaked.
    """
    port = _port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect_server_home")), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prefect server did not answer /api/health within 90 s")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_two_runs_at_once_share_prefect_server_and_mlflow_store(prefect_api: str, tiny_model: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(tmp_path / "client_home")}
    common = [
        f"model={tiny_model}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 100}]", "prepare.max_seq_len=256",
        "train.max_steps=2", "evaluate.generate_samples=1", "evaluate.max_new_tokens=4", "experiment=concurrent",
        # every suite on a couple of items; the gate off (two steps of a random tiny model prove nothing)
        "evaluate.knowledge.tasks=[boolq]", "evaluate.knowledge.limit=2", "evaluate.ifbench_limit=2",
        "evaluate.ifbench_max_new_tokens=4", "evaluate.tasks_limit=2", "evaluate.gate.heldout_loss_must_drop=false",
        "evaluate.gate.max_knowledge_drop=null",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "-c", str(ROOT / "conf" / "demo.yaml"), f"work_dir={tmp_path / f'w{i}'}",
             *common, f"train.lr={lr}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, lr in enumerate(("1e-4", "2e-4"))
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert not any("database is locked" in o for o in outputs)
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == 2 * 5


def test_pipeline_killed_mid_training_reruns_to_identical_model(prefect_api: str, tiny_model: Path, tmp_path: Path) -> None:
    from sft_engine.io import digest_file

    base = [
        sys.executable, "-m", "flows.cli", "train", "-c", str(ROOT / "conf" / "demo.yaml"), f"model={tiny_model}",
        "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 300}]", "prepare.max_seq_len=128",
        "train.max_steps=60", "train.grad_accum=1", "train.checkpoint_every=5", "train.lr=1e-3",
    ]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*base, f"work_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        done = [p for d in ckpts.glob("*") for p in d.glob("step-*/_COMPLETE")] if ckpts.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; raise train.max_steps"
    os.kill(proc.pid, 9)
    proc.wait()
    assert not list(killed.glob("train/*/_SUCCESS"))  # nothing published by the killed run

    rerun = subprocess.run([*base, f"work_dir={killed}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    clean = subprocess.run([*base, f"work_dir={tmp_path / 'clean'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert clean.returncode == 0, clean.stdout[-3000:]
    (a,) = (killed / "train").glob("*/model/model.safetensors")
    (b,) = (tmp_path / "clean" / "train").glob("*/model/model.safetensors")
    assert digest_file(a) == digest_file(b)
    stats = json.loads((a.parent.parent / "stats.json").read_text())
    assert stats["resumed_from_step"] >= 10 and stats["steps"] == 60
