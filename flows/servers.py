"""``sft-pipeline servers up|down|status``: a local MLflow tracking server and Prefect server for a team box.

    <dir>/servers.json     what ``up`` started: host, ports, URLs, database
    <dir>/mlflow.pid       pid of each server (its own process group: ``down`` stops the whole group)
    <dir>/prefect.pid
    <dir>/mlflow.log       their stdout and stderr
    <dir>/prefect.log
    <dir>/mlflow.db        MLflow backend store (SQLite)
    <dir>/mlartifacts/     MLflow artifacts, uploaded and served through the server (--artifacts-destination)
    <dir>/prefect/         PREFECT_HOME of the Prefect server: its SQLite database unless --prefect-db is given

Both bind 127.0.0.1 unless ``--host`` says otherwise. Clients then need only two variables:

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export PREFECT_API_URL=http://127.0.0.1:4200/api

SQLite serializes writers: fine for a few concurrent pipeline runs. For many, back Prefect with PostgreSQL
(``--prefect-db postgresql+asyncpg://user:password@host:5432/prefect``; asyncpg ships with Prefect).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path("runs/servers")
NAMES = ("mlflow", "prefect")


@dataclass(frozen=True)
class Endpoint:
    """Where one server listens and how to ask it whether it is up."""

    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        # A wildcard bind is reached locally through loopback.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}/health" if self.name == "mlflow" else f"{self.url}/api/health"

    @property
    def client_env(self) -> tuple[str, str]:
        """The variable a client exports to use this server."""
        return ("MLFLOW_TRACKING_URI", self.url) if self.name == "mlflow" else ("PREFECT_API_URL", f"{self.url}/api")


def is_healthy(endpoint: Endpoint, timeout: float = 2.0) -> bool:
    """True when the server answers its health URL with HTTP 200."""
    try:
        with urllib.request.urlopen(endpoint.health_url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on (host, port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _command(endpoint: Endpoint, folder: Path) -> list[str]:
    if endpoint.name == "mlflow":
        return [
            sys.executable, "-m", "mlflow", "server", "--host", endpoint.host, "--port", str(endpoint.port),
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "mlartifacts"),
            "--workers", "1",
        ]
    return [sys.executable, "-m", "prefect", "server", "start", "--host", endpoint.host, "--port", str(endpoint.port)]


def _env(endpoint: Endpoint, folder: Path, prefect_db: str | None) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    if endpoint.name == "mlflow":
        # MLflow's background job runner (GenAI scoring jobs) starts 8 extra processes, about 2.2 GB RSS on
        # this box, and SFT tracking uses none of it. Export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep it.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if endpoint.name == "prefect":
        env.update(PREFECT_HOME=str(folder / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        # The server must not act as a client of another server the caller points at.
        env.pop("PREFECT_API_URL", None)
        # The UI asks the browser to call this API URL; left alone it assumes port 4200 whatever --port says.
        # On a wildcard bind, an exported PREFECT_UI_API_URL (the name browsers use) wins.
        if endpoint.host not in ("0.0.0.0", "::") or "PREFECT_UI_API_URL" not in env:
            env["PREFECT_UI_API_URL"] = f"{endpoint.url}/api"
        if prefect_db:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_db
    return env


def _pid_alive(pid: int, name: str) -> bool:
    """True when ``pid`` runs and is still our server (a recycled pid belongs to something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return f"-m {name} server" in cmdline


def _read_pid(folder: Path, name: str) -> int | None:
    try:
        return int((folder / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _endpoints(folder: Path) -> dict[str, Endpoint]:
    try:
        state = json.loads((folder / "servers.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: Endpoint(name, state["host"], state["ports"][name]) for name in NAMES if name in state.get("ports", {})}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def servers_up(
    folder: Path = DEFAULT_DIR,
    host: str = "127.0.0.1",
    mlflow_port: int = 5000,
    prefect_port: int = 4200,
    prefect_db: str | None = None,
    timeout: float = 180.0,
) -> dict[str, Endpoint]:
    """Start both servers in the background, wait until both answer their health URL, and return their endpoints.

    Raises:
        RuntimeError: a server of ``folder`` already runs, a port is taken, or a server did not come up within
            ``timeout`` seconds (both are then stopped again, and the log tail is in the message).
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    running = [n for n in NAMES if (pid := _read_pid(folder, n)) and _pid_alive(pid, n)]
    if running:
        raise RuntimeError(f"{' and '.join(running)} of {folder} already running: `sft-pipeline servers down --dir {folder}` first")
    wanted = {"mlflow": Endpoint("mlflow", host, mlflow_port), "prefect": Endpoint("prefect", host, prefect_port)}
    for ep in wanted.values():
        if not port_is_free(host, ep.port):
            raise RuntimeError(f"port {ep.port} on {host} is in use: pass --{ep.name}-port with a free port, or stop what uses it")
    (folder / "mlartifacts").mkdir(exist_ok=True)
    (folder / "servers.json").write_text(json.dumps({
        "host": host, "ports": {n: ep.port for n, ep in wanted.items()}, "urls": {n: ep.url for n, ep in wanted.items()},
        "prefect_db": "postgresql" if prefect_db else "sqlite",
    }, indent=2))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, ep in wanted.items():
        with open(folder / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen(
                _command(ep, folder), env=_env(ep, folder, prefect_db), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=folder,
            )
        (folder / f"{name}.pid").write_text(f"{procs[name].pid}\n")
    deadline = time.monotonic() + timeout
    pending = dict(wanted)
    while pending and time.monotonic() < deadline:
        for name, ep in list(pending.items()):
            if is_healthy(ep):
                del pending[name]
            # Our own child: its exit status, not /proc (a busy machine once made a live server look gone).
            elif (code := procs[name].poll()) is not None:
                servers_down(folder)
                raise RuntimeError(f"{name} server exited with status {code} during start-up; "
                                   f"{folder / f'{name}.log'} ends:\n{_log_tail(folder / f'{name}.log')}")
        time.sleep(0.5)
    if pending:
        servers_down(folder)
        name = next(iter(pending))
        raise RuntimeError(f"{name} server did not answer {pending[name].health_url} within {timeout:.0f} s; "
                           f"{folder / f'{name}.log'} ends:\n{_log_tail(folder / f'{name}.log')}")
    return wanted


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies do not count: they have exited)."""
    import psutil

    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader when ``up`` ran in this same process
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def _stop(pid: int, grace: float) -> None:
    """SIGTERM the server's process group, then SIGKILL it after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def servers_down(folder: Path = DEFAULT_DIR, grace: float = 30.0) -> list[str]:
    """Stop the servers ``up`` started in ``folder`` (whole process groups); return the names that were running."""
    folder = folder.resolve()
    stopped = []
    for name in NAMES:
        pid = _read_pid(folder, name)
        if pid is not None and _pid_alive(pid, name):
            _stop(pid, grace)
            stopped.append(name)
        (folder / f"{name}.pid").unlink(missing_ok=True)
    return stopped


def servers_status(folder: Path = DEFAULT_DIR) -> dict[str, dict[str, object]]:
    """Per server: pid (None when not running), whether it answers its health URL, and its URL."""
    folder = folder.resolve()
    out: dict[str, dict[str, object]] = {}
    for name, ep in _endpoints(folder).items():
        pid = _read_pid(folder, name)
        alive = pid is not None and _pid_alive(pid, name)
        out[name] = {"pid": pid if alive else None, "healthy": alive and is_healthy(ep), "url": ep.url, "log": str(folder / f"{name}.log")}
    return out


def exports(endpoints: dict[str, Endpoint]) -> str:
    """Shell lines that point clients (pipeline runs, workers) at the servers."""
    return "\n".join(f"export {k}={v}" for k, v in (ep.client_env for ep in endpoints.values()))
