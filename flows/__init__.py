"""Prefect flows and the ``sft-pipeline`` command line."""

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()
