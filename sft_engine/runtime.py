"""Process environment defaults for running offline on a laptop or CI box.

Only ``setdefault``: anything the user exported wins. Set before the heavy libraries import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    # No hub at run time: every model and dataset comes from a local folder or an installed package.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    # Prefect's temporary local server: telemetry fails offline and spams "database is locked".
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    "TOKENIZERS_PARALLELISM": "true",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}


def apply_env_defaults() -> None:
    """Set offline defaults, and a persistent cache for DeepSpeed's compiled ops (20 s to build once)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    cache = Path(os.environ.get("SFT_CACHE_DIR", Path.home() / ".cache" / "sft-pipeline"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


def notice(message: str) -> None:
    """A one-line notice for the person running the pipeline (the CLI shows ``sft.console`` on the terminal):
    one-time costs such as converting a packaged model or building a DeepSpeed op."""
    logging.getLogger("sft.console").info(message)
    logging.getLogger("sft_engine").info(message)


# glibc's mallopt parameter for the size from which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3


def _libc() -> object | None:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries without glibc's malloc
        return None


def bound_heap() -> None:
    """Give every allocation of 1 MiB or more its own mapping, returned to the system when freed.

    glibc raises this threshold (up to 32 MiB) each time a mapped block is freed, so after the first model in a
    process most weight-, gradient- and optimizer-sized tensors land in the heap, whose freed pages stay with the
    process: a sweep's later variants then peak above the first (3.24 -> 3.52 GiB over three SmolLM2 trainings;
    1.6 % with this, and the first peak 6 % lower; docs/benchmarks.md). No effect outside glibc. Training sets it
    (``train.train``); the process does not start with it, because NumPy-heavy curation pays for fresh mappings:
    near-dedup's sketch ran 1.23-1.30 s with glibc's default and 1.45-1.49 s with this (50k documents).
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def release_memory() -> None:
    """Collect what a finished stage left unreachable and hand the heap's free pages back to the system, so the next
    stage or sweep variant in this process starts from the same footprint."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
