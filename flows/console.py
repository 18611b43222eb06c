"""What the terminal shows, and the log file that holds everything else.

The terminal gets one line per stage start and end with its figures (the ``sft.console`` logger), our own rich
progress bars, and the summary. Prefect's run logs, library warnings and library progress bars go to the log file
only (``<work_dir>/logs/<time>-<command>-<pid>.log``), whose path is printed first; Prefect's UI still gets its run
logs through its API handler. ``--debug`` keeps library output on the terminal too and prints tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from sft_engine.errors import DiskFullError, UserError

CONSOLE = "sft.console"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_libraries() -> None:
    """Library progress bars off, before the libraries import (tqdm reads TQDM_DISABLE, Hugging Face its own)."""
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # else MLflow prints its own INFO lines on import


def log_path(work_dir: Path, command: str) -> Path:
    folder = work_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"


def setup(log_file: Path, debug: bool = False) -> None:
    """Route every logger to ``log_file``; the terminal keeps ``sft.console`` (and everything, with ``debug``)."""
    import prefect  # noqa: F401 - Prefect configures its loggers on import; ours must come after

    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.INFO)
    file_handler.sft_log = True  # type: ignore[attr-defined]  # ours: replaced by the next setup in this process
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "sft_log", False) or (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                                            and not debug):
            root.removeHandler(h)
            if getattr(h, "sft_log", False):
                h.close()
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in list(logging.root.manager.loggerDict) + ["prefect"]:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            # Prefect's console handlers: its run logs still reach the UI through the API handler, and the file.
            if type(h).__name__ == "PrefectConsoleHandler" and not debug:
                logger.removeHandler(h)
        if name.split(".")[0] == "prefect" and not logger.propagate:
            logger.handlers = [h for h in logger.handlers if not getattr(h, "sft_log", False)] + [file_handler]
    console = logging.getLogger(CONSOLE)
    console.setLevel(logging.INFO)
    console.propagate = False  # the same line reaches the file through the run's logger (tasks.report.say)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    console.handlers = [out]
    if not debug:
        for noisy in ("transformers", "datasets", "lm-eval", "lm_eval", "deepspeed", "DeepSpeed", "torch", "mlflow", "alembic", "httpx"):
            lg = logging.getLogger(noisy)
            lg.handlers = [file_handler]
            lg.propagate = False


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError.exit_code
    return 1


def disk_full(exc: BaseException, need: str = "") -> DiskFullError:
    """One disk-full error for every way a run can fill the disk: ``atomic_dir``'s (which names the stage and its
    folder) or a bare ENOSPC from anywhere else (the file is named); ``need`` adds the space the run needs."""
    what = str(exc) if isinstance(exc, DiskFullError) else f"out of disk space writing '{getattr(exc, 'filename', None) or '?'}'"
    error = DiskFullError(f"{what}{need}; free space there or pass work_dir=<a larger disk>")
    error.__cause__ = exc
    return error


def report(exc: BaseException, log_file: Path | None, debug: bool) -> int:
    """Print the one-line message for ``exc`` (the traceback goes to the log file) and return the exit code."""
    code = exit_code_for(exc)
    text = traceback.format_exception(exc)
    if log_file is not None:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write("".join(text))
    where = f"; the full log is {log_file}" if log_file is not None else ""
    if code == 130:
        message = "interrupted; a rerun continues from the finished stages"
    elif isinstance(exc, UserError):
        message = str(exc)
    elif code == DiskFullError.exit_code:
        message = str(disk_full(exc))
    else:
        message = f"unexpected error {type(exc).__name__}: {exc}{where} (please report it with the log)"
        where = ""
    if debug:
        print("".join(text), file=sys.stderr)
    lines = message.splitlines() or [message]
    lines[-1] += where if code != 2 else ""
    for line in lines:
        print(f"sft-pipeline: {line}", file=sys.stderr)
    return code
