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
