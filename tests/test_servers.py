"""``sft-pipeline servers up|status|down``: a real MLflow tracking server and Prefect server on loopback,
and a Prefect server backed by a real local PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows import servers
from flows.cli import main

pytestmark = pytest.mark.slow


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_servers_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "servers"
    mlflow_port, prefect_port = _ports(2)
    args = ["servers", "up", "--dir", str(folder), "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in out
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in out
        mlflow_ep, prefect_ep = servers.Endpoint("mlflow", "127.0.0.1", mlflow_port), servers.Endpoint("prefect", "127.0.0.1", prefect_port)
        assert servers.is_healthy(mlflow_ep) and servers.is_healthy(prefect_ep)
        # The Prefect UI is told to call this server's API, not the default port 4200.
        with urllib.request.urlopen(f"{prefect_ep.url}/ui-settings", timeout=10) as resp:
            assert json.load(resp)["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        # Listening on loopback only.
        listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN
                     and c.laddr.port in (mlflow_port, prefect_port)}
        assert listening == {"127.0.0.1"}
        # MLflow's job runner is off: the server is its CLI process and one uvicorn worker, no huey consumers.
        group = [p.name() for p in psutil.process_iter() if _pgid(p.pid) == int((folder / "mlflow.pid").read_text())]
        assert len(group) == 2, group

        # A second `up` on the same folder refuses instead of starting a second pair.
        assert main(args) == 1
        assert "already running" in capsys.readouterr().err

        # The MLflow server stores runs in its SQLite file and uploaded artifacts in its artifacts folder.
        client = MlflowClient(tracking_uri=mlflow_ep.url)
        run = client.create_run(client.create_experiment("servers-test"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert [p.read_text() for p in (folder / "mlartifacts").rglob("note.txt")] == ["hello"]
        assert (folder / "mlflow.db").stat().st_size > 0
        assert (folder / "prefect").is_dir()  # the Prefect server's own PREFECT_HOME and SQLite database

        assert main(["servers", "status", "--dir", str(folder)]) == 0
        status = capsys.readouterr().out
        assert "mlflow   up" in status and "prefect  up" in status
    finally:
        main(["servers", "down", "--dir", str(folder)])
    assert capsys.readouterr().out.strip() == "stopped: mlflow, prefect"
    assert servers.port_is_free("127.0.0.1", mlflow_port) and servers.port_is_free("127.0.0.1", prefect_port)
    assert not (folder / "mlflow.pid").exists() and not (folder / "prefect.pid").exists()
    assert main(["servers", "status", "--dir", str(folder)]) == 1
    assert "mlflow   down" in capsys.readouterr().out


def test_servers_up_refuses_a_taken_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (free,) = _ports(1)
        rc = main(["servers", "up", "--dir", str(tmp_path), "--mlflow-port", str(port), "--prefect-port", str(free)])
    assert rc == 1
    assert f"port {port} on 127.0.0.1 is in use: pass --mlflow-port" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.pid").exists()


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on loopback with an empty database ``prefect``; yields its port."""
    initdb, pg_ctl = shutil.which("initdb") or "/usr/local/bin/initdb", shutil.which("pg_ctl") or "/usr/local/bin/pg_ctl"
    if not (Path(initdb).is_file() and Path(pg_ctl).is_file()):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed")
    # Not under tmp_path: pytest's base folder is private to root, and the cluster runs as 'nobody' under root.
    folder = Path(tempfile.mkdtemp(prefix="sft-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
    (port,) = _ports(1)
    subprocess.run(_as_postgres_user([initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True, cwd=folder)
    subprocess.run(_as_postgres_user([pg_ctl, "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "start",
                                      "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"]),
                   check=True, capture_output=True, cwd=folder)
    try:
        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            await conn.execute("CREATE DATABASE prefect")
            await conn.close()

        asyncio.run(create())
        yield port
    finally:
        subprocess.run(_as_postgres_user([pg_ctl, "-D", str(folder / "data"), "-m", "fast", "-w", "stop"]),
                       capture_output=True, cwd=folder, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_prefect_server_on_postgresql(postgres: int, tmp_path: Path) -> None:
    """`--prefect-db` puts the Prefect server on PostgreSQL: a flow run made through its API lands in Postgres."""
    import asyncpg
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path / "servers"
    mlflow_port, prefect_port = _ports(2)
    start = time.monotonic()
    endpoints = servers.servers_up(folder, mlflow_port=mlflow_port, prefect_port=prefect_port,
                                   prefect_db=f"postgresql+asyncpg://postgres@127.0.0.1:{postgres}/prefect")
    try:
        print(f"servers up on PostgreSQL in {time.monotonic() - start:.1f} s")

        @flow(name="pg-probe")
        def probe() -> int:
            return 7

        with temporary_settings({PREFECT_API_URL: f"{endpoints['prefect'].url}/api"}):
            state = probe(return_state=True)
        assert state.is_completed()

        async def stored() -> list[tuple[str, str]]:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{postgres}/prefect")
            rows = await conn.fetch("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
            await conn.close()
            return [(r["name"], str(r["state_type"])) for r in rows]

        assert asyncio.run(stored()) == [("pg-probe", "COMPLETED")]
        assert not (folder / "prefect" / "prefect.db").exists()  # no SQLite fallback
    finally:
        servers.servers_down(folder)
    assert servers.port_is_free("127.0.0.1", prefect_port)
