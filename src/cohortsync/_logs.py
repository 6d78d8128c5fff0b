"""
Logging an exception that came from outside cohortsync (a host's adapter,
source, resolver, listener or store, or a database driver).

Its text and traceback may quote member keys (``ValueError(f"bad {ids}")``),
and member keys never go to INFO or above: the ERROR line names the
exception's class, and a DEBUG line right after it carries the text and the
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

__all__ = ["FOREIGN_TEXT", "log_failure"]

FOREIGN_TEXT = "its text and traceback are at DEBUG"
"""What an ERROR line about a foreign exception says of the rest."""


def log_failure(
    logger: logging.Logger,
    message: str,
    *args: object,
    error: BaseException,
    extra: Mapping[str, object] | None = None,
) -> None:
    """
    ERROR: *message* % *args* and the class of *error*; DEBUG: the same with
    the error's text and traceback.
    """
    fields = {**(extra or {}), "error_type": type(error).__name__}
    short, full = f"{message} (%s; {FOREIGN_TEXT})", f"{message} (%s: %s)"
    if logger.isEnabledFor(logging.ERROR):
        logger.error(
            short,
            *args,
            type(error).__name__,
            extra=fields,
            stacklevel=2,
        )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            full,
            *args,
            type(error).__name__,
            error,
            exc_info=error,
            extra=fields,
            stacklevel=2,
        )
