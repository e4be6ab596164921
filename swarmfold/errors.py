"""Errors a user can fix, the process exit codes, and the one logging setup.

Kept free of heavy imports so that every command can use them cheaply.
"""

from __future__ import annotations

import enum
import logging
import sys
from typing import TextIO


class UserError(ValueError):
    """Bad input. The message says what is wrong and how to fix it."""


class ExitCode(enum.IntEnum):
    """How a swarmfold process ends (the CLI, a detached daemon, a test peer)."""

    OK = 0
    FAILURE = 1  # a runtime failure (e.g. could not join the swarm)
    BAD_INPUT = 2  # bad spec, data, checkpoint or usage; a peer of another spec
    LOCKED = 3  # another instance holds the workdir
    INTERRUPTED = 130  # Ctrl-C


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("hivemind", "transformers", "urllib3", "filelock")


def setup_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """The one logging setup of every swarmfold process: LOG_FORMAT on stderr (or `stream`), and the
    chatty libraries at WARNING or above. `level` is a name (DEBUG, INFO, ...) or a logging level."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=stream or sys.stderr)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
