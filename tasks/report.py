"""One line for the terminal: the stage starts and ends the CLI shows (``sft.console``), also in the run's log."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def say(message: str) -> None:
    """Show ``message`` on the terminal (when the CLI set one up) and log it to the Prefect run and the log file."""
    logging.getLogger("sft.console").info(message)
    try:
        get_run_logger().info(message)
    except MissingContextError:
        logging.getLogger("sft").info(message)
