"""Mistakes a user can fix, each with the exit code the CLI ends with.

Every error the pipeline raises on purpose derives from ``UserError``: its message names what is wrong, where
(the config key or the file) and how to fix it, in one line, and ``exit_code`` says which kind of mistake it is.
Anything else that escapes a run is a bug (exit 1), reported with the path of the log that holds its traceback.
"""

from __future__ import annotations

# One table, read by the CLI's --help and by the tests that check it.
EXIT_CODES = {
    0: "done",
    1: "an unexpected error (a bug): one line here, the traceback in the log file (--debug prints it)",
    2: "bad config, bad arguments, or a preflight check failed: nothing ran",
    3: "the evaluation gate (evaluate.gate) failed; every result is still logged to MLflow with the reasons",
    4: "the chat template self-check failed (check-template, or preparation without prepare.allow_unverified_template=true)",
    5: "a data error found while working: an unreadable file in a glob, a split left with no rows, a template that "
    "rejects every row",
    6: "out of disk space: the stage, its folder and the space it needs are named; nothing was published",
    130: "interrupted (Ctrl-C); a rerun continues from the finished stages",
}


class UserError(Exception):
    """A mistake the user can fix; the message says what, where and how."""

    exit_code = 1


class DataError(UserError, RuntimeError):
    """Data that cannot be used, found while working (exit 5)."""

    exit_code = 5


class DiskFullError(UserError, OSError):
    """A stage ran out of disk space; the message names the stage, its folder and the space it needs (exit 6)."""

    exit_code = 6
