"""Exceptions and exit codes.

Every error a user can fix is a ``UsageError`` (exit 4) whose message says what was wrong and what
to do. Only ``robaudit.cli`` turns exceptions into exit codes.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes, the same as pytest's so CI systems read them the same way."""

    #: Every class passed the fairness gate.
    OK = 0
    #: One or more classes were flagged.
    FLAGGED = 1
    #: Interrupted (Ctrl-C / SIGTERM); partial results were written and marked partial.
    INTERRUPTED = 2
    #: A bug in robaudit.
    INTERNAL_ERROR = 3
    #: Bad option, unreadable or invalid model or data, mismatched shapes or classes.
    USAGE_ERROR = 4
    #: Nothing to audit (empty data set after filtering).
    NO_DATA = 5


class RobauditError(Exception):
    """Base of every error robaudit raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE_ERROR


class UsageError(RobauditError):
    """Something the user can fix: an option, a file, a shape."""


class ConfigError(UsageError):
    """A bad option or configuration file entry.

    ``key`` names the setting it is about (a :class:`robaudit.config.ScanConfig` field, or
    ``gate_eps``), or is None when no single setting is to blame: callers read it instead of the
    message.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class MissingSetting(ConfigError):
    """A setting the scan cannot do without (``key``) was given nowhere."""


class ModelLoadError(UsageError):
    """The model file cannot be read, converted or trusted."""


class ModelOutputError(UsageError):
    """The model runs but its outputs cannot be audited (wrong shape, NaN, wrong class count)."""


class DataError(UsageError):
    """The data set cannot be read or does not fit the model."""


class ResourceError(UsageError):
    """The machine has too little of something the run needs (memory): a smaller working
    batch, smaller inputs or a bigger machine is the fix."""


class NothingToAudit(RobauditError):
    """The data set is empty after filtering."""

    exit_code = ExitCode.NO_DATA


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none).

    For wrapping a library's exception into a one-line message that says what to do.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
