"""Cerebral microbleed detection and BOMBS localisation (library of the Snakemake workflow).

Importing the package installs one process-wide hook: an uncaught exception is
also written to the root logger's log *files* (a workflow script sends logging
to ``snakemake.log[0]``), so a failed job's ``log:`` names the subject and the
file of the error, not only Snakemake's console. Without a file handler nothing
changes.
"""
from __future__ import annotations

import logging
import sys

_previous_hook = sys.excepthook


def _log_uncaught(exc_type, exc, tb) -> None:
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) for h in root.handlers) and not issubclass(exc_type, KeyboardInterrupt):
        root.error("failed: %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))
    _previous_hook(exc_type, exc, tb)


sys.excepthook = _log_uncaught
