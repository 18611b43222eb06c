"""Prefect flows and the ``sft-pipeline`` command line."""

from flows import console

# Before any library is imported: tqdm reads TQDM_DISABLE once, when it is first imported.
console.quiet_libraries()

from sft_engine.runtime import apply_env_defaults

apply_env_defaults()
