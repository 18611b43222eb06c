"""Prefect tasks: thin wrappers that call sft_engine and log to MLflow."""

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()
