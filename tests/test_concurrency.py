"""Two pipeline runs at once against one real Prefect server (loopback) and one MLflow SQLite store."""

from __future__ import annotations

import json
import os
import signal
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


def _outputs(work_dir: Path) -> dict[str, list[str]]:
    """Digest of every output a rerun must reproduce: curated splits, packed rows, the model, the evaluation table."""
    from sft_engine.io import digest_file

    files = {
        "curated": "curate/*/train.parquet", "heldout": "curate/*/heldout.parquet", "packed": "prepare/*/train.arrow",
        "model": "train/*/model/model.safetensors", "table": "evaluate/*/table.json",
    }
    return {name: sorted(digest_file(p) for p in work_dir.glob(pattern)) for name, pattern in files.items()}


# Where to kill a run, as the file or folder whose appearance says it is there: inside the MLflow store's creation,
# then inside curation, preparation, training (after two complete checkpoints) and the scoring of a model.
KILL_POINTS = {
    "store creation": "mlflow.db.tmp-*",
    "curation": "curate*/.tmp-*",
    "preparation": "prepare/.tmp-*",
    "training": "checkpoints/*/step-00000006/_COMPLETE",
    "scoring": "evaluate_models/.tmp-*",
}


def test_a_run_killed_at_any_point_reruns_to_the_same_outputs(prefect_api: str, tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL at five points of one first run, each rerun killed at the next; the last rerun completes, and every
    output equals an uninterrupted run's, the model resumed from its last complete checkpoint."""
    base = [
        sys.executable, "-m", "flows.cli", "run", "-c", str(ROOT / "conf" / "demo.yaml"), f"model={tiny_model}",
        "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 200}]", "prepare.max_seq_len=128",
        "train.max_steps=40", "train.grad_accum=1", "train.checkpoint_every=3", "train.lr=1e-3", "experiment=killed",
        "evaluate.knowledge.sets=[boolq]", "evaluate.knowledge.limit=2", "evaluate.ifbench.limit=2",
        "evaluate.ifbench.max_new_tokens=4", "evaluate.verifiable.limit=2", "evaluate.samples.n=1", "evaluate.samples.max_new_tokens=4", "evaluate.verifiable.max_new_tokens=4",
        "evaluate.gate.heldout_loss_must_drop=false", "evaluate.gate.max_knowledge_drop=null",
    ]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    # The uninterrupted reference runs beside the killed chain (its own work_dir and experiment), on the other core.
    clean = subprocess.Popen([*base, f"work_dir={tmp_path / 'clean'}", "experiment=clean"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = tmp_path / "killed"
    for point, pattern in KILL_POINTS.items():
        proc = subprocess.Popen([*base, f"work_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(killed.glob(pattern)):
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before reaching {point} (exit {proc.returncode})"
        os.kill(proc.pid, 9)
        proc.wait()
    assert not list(killed.glob("evaluate/*/_SUCCESS"))  # no killed run got as far as publishing the evaluation
    rerun = subprocess.run([*base, f"work_dir={killed}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    clean_out = clean.communicate(timeout=600)[0]
    assert clean.returncode == 0, clean_out[-3000:]
    assert _outputs(killed) == _outputs(tmp_path / "clean")
    (stats,) = killed.glob("train/*/stats.json")
    train = json.loads(stats.read_text())
    assert train["resumed_from_step"] >= 6 and train["steps"] == 40
    assert not list(killed.rglob(".tmp-*")) and not list(killed.glob("mlflow.db.tmp-*"))


def _markers(work_dir: Path) -> dict[str, dict[str, list]]:
    """Every complete stage folder of ``work_dir`` with the files its marker lists (size and digest)."""
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())["files"] for p in work_dir.glob("*/*/_SUCCESS")}


def test_three_runs_at_once_on_one_work_dir_all_complete_and_compute_shared_stages_once(prefect_api: str, tiny_model: Path,
                                                                                        tmp_path: Path) -> None:
    """Two identical configs and one that differs in preparation (and runs on through training and evaluation), at
    once on one work_dir, one MLflow store and one Prefect server."""
    from sft_engine import stages
    from sft_engine.config import load_config
    from sft_engine.curation.stage import run_curate

    shared = tmp_path / "shared"
    common = [f"model={tiny_model}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 1500}, {name: c, builtin: chitchat, limit: 200}]",
              "experiment=shared"]
    evaluate = [
        "train.max_steps=2", "evaluate.samples.n=1", "evaluate.samples.max_new_tokens=4", "evaluate.verifiable.max_new_tokens=4",
        # every suite on a couple of items; the gate off (two steps of a random tiny model prove nothing)
        "evaluate.knowledge.sets=[boolq]", "evaluate.knowledge.limit=2", "evaluate.ifbench.limit=2",
        "evaluate.ifbench.max_new_tokens=4", "evaluate.verifiable.limit=2", "evaluate.gate.heldout_loss_must_drop=false",
        "evaluate.gate.max_knowledge_drop=null",
    ]
    common += evaluate  # the evaluation sets feed decontamination, so all three share them to share curation
    configs = [["prepare", "prepare.max_seq_len=256"], ["prepare", "prepare.max_seq_len=256"], ["run", "prepare.max_seq_len=512"]]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "flows.cli", command, "-c", str(ROOT / "conf" / "demo.yaml"), f"work_dir={shared}", *common, *extra],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command, *extra in configs
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n---\n".join(o[-2000:] for o in outputs)
    assert not any("database is locked" in o for o in outputs)

    # Serially, in another work_dir, the stage functions themselves: the same folders with the same bytes.
    serial = tmp_path / "serial"
    for _, *extra in configs[1:]:
        cfg = load_config(ROOT / "conf" / "demo.yaml", [f"work_dir={serial}", *common, *extra])
        stages.run_prepare(cfg, run_curate(cfg).path)
    got, want = _markers(shared), _markers(serial)
    # prepare x3: 256, 512, and the held-out rows under the tuned model's saved tokenizer (evaluate's _heldout_data);
    # evaluate_models: base and tuned, each on the five suites (the demo's word_problems among them) and the samples.
    assert sorted(k.split("/")[0] for k in got) == ["curate", "curate_dedup", "curate_sources", "curate_sources", "evaluate",
                                                    *["evaluate_models"] * 12, "prepare", "prepare", "prepare", "train"]
    for folder, files in want.items():
        if folder.startswith("curate/"):
            # stats.json's "cache" says which units this folder's run found finished: history, not data.
            stats = [{k: v for k, v in json.loads((root / folder / "stats.json").read_text()).items() if k != "cache"}
                     for root in (shared, serial)]
            assert stats[0] == stats[1]
            files, got[folder] = ({k: v for k, v in f.items() if k != "stats.json"} for f in (files, got[folder]))
        assert got[folder] == files, folder
    assert not list(shared.glob("*/.tmp-*"))

    # Each key computed once: one stage run of each key says it computed, the others that they reused.
    client = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 3 and all(r.info.status == "FINISHED" for r in runs)
    computed: dict[str, list[str]] = {}
    for r in runs:
        if r.data.tags.get("output_dir"):
            computed.setdefault(r.data.tags["output_dir"], []).append(r.data.tags["cached"])
    # curate: one key for all three; prepare: one for the two identical configs, one for the third; its train and
    # evaluate once each.
    assert sorted(sorted(v) for v in computed.values()) == [["false"], ["false"], ["false"], ["false", "true"], ["false", "true", "true"]]


def test_a_run_killed_holding_a_stage_lock_hands_it_to_the_run_waiting_for_it(prefect_api: str, tiny_model: Path,
                                                                             tmp_path: Path) -> None:
    work = tmp_path / "w"
    argv = [sys.executable, "-m", "flows.cli", "train", "-c", str(ROOT / "conf" / "demo.yaml"), f"work_dir={work}", f"model={tiny_model}",
            "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 200}]", "prepare.max_seq_len=128", "train.max_steps=30",
            "train.grad_accum=1", "train.precision=fp32", "experiment=handover"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs) and not list(work.glob("train/.tmp-*")):
        time.sleep(0.05)
    (lock,) = work.glob("train/.lock-*")
    holder_pid = int(lock.read_text())
    (holder,), (waiter,) = ([p for p in procs if (p.pid == holder_pid) == want] for want in (True, False))
    assert holder.poll() is None, "the run holding the training lock ended before it could be stopped"
    os.kill(holder.pid, signal.SIGSTOP)  # frozen inside training, the lock held: the other run must wait, however slow
    lines = []
    for line in waiter.stdout:
        lines.append(line)
        if line.startswith("waiting for train/"):
            break
    assert lines[-1].strip() == f"waiting for train/{lock.name.removeprefix('.lock-')}, computed by pid {holder.pid}", "".join(lines)
    holder.kill()
    holder.wait()
    rest = waiter.communicate(timeout=600)[0]
    assert waiter.returncode == 0, rest[-3000:]
    assert "train: 30 steps" in rest
    assert len(list(work.glob("train/*/_SUCCESS"))) == 1 and not list(work.glob("*/.tmp-*"))
