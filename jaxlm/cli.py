"""What the command-line entry points (train, generate, convert) share: a user's mistake ends in
one line that says what is wrong, not in a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

DEBUG_VARIABLE = "JAXLM_DEBUG"  # set to 1 to see the traceback of a reported error

T = TypeVar("T")

# Orbax's save threads and asyncio log each failed write with its traceback (thousands of lines
# for one full disk) before the error reaches the caller, which reports it once.
_BACKGROUND_LOGGERS = ("absl", "asyncio")


def _drop_tracebacks(record: logging.LogRecord) -> bool:
    return record.exc_info is None


def _dropping_closed_loop_callbacks(previous: Callable[[object], None]) -> Callable[[object], None]:
    """An unraisable hook that drops one kind: after a failed save, orbax closes its event loop
    while TensorStore's other writes are still in flight, and each of them, completing, fails to
    schedule its callback there ("Event loop is closed"), hundreds of tracebacks printed from
    TensorStore's threads, depending on timing. Everything else goes to ``previous``."""

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    return hook


def _drop_closed_loop_reports() -> None:
    """Installs that hook once per process (the CLIs' mains may run many times in one, as in the tests)."""
    if not getattr(sys.unraisablehook, "drops_closed_loop_reports", False):
        sys.unraisablehook = _dropping_closed_loop_callbacks(sys.unraisablehook)


def report_user_errors(body: Callable[[], T]) -> T:
    """Runs ``body``. A ValueError (a bad argument, file or folder) or an OSError (a path that
    cannot be read or written, a full disk) exits with status 1 and its message alone on stderr,
    unless JAXLM_DEBUG is set, when it propagates with its traceback (and background threads'
    logged and unraisable tracebacks are shown too)."""
    if not os.environ.get(DEBUG_VARIABLE):
        for name in _BACKGROUND_LOGGERS:
            logging.getLogger(name).addFilter(_drop_tracebacks)
        _drop_closed_loop_reports()
    try:
        return body()
    except (ValueError, OSError) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        sys.exit(f"error: {err}\n(set {DEBUG_VARIABLE}=1 for the traceback)")
