"""SIGINT and SIGTERM while ``cli.main`` runs a command.

SIGTERM (CI cancelling a job) ends a command the way Ctrl-C does: a KeyboardInterrupt, partial
reports, exit 2. Once the outcome is decided (a command's reports are written, or main() is
done), both are ignored: a signal landing during the terminal output or the interpreter's
teardown (seconds, after torch) would otherwise turn a decided 0 or 1 into 2, or kill the
process (130, 143). Under the console script they stay ignored until the process ends (Python
keeps an ignored signal ignored through its teardown, but resets its own handlers before
tearing the modules down); a caller of main() gets back the handlers it had.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

WATCHED = (signal.SIGINT, signal.SIGTERM)


class _State:
    #: The process ends when main() returns (the console script).
    exiting = False
    #: The handlers main() found; None while main() does not manage them.
    previous: dict[int, Any] | None = None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def process_ends_after_main() -> None:
    """Keep signals ignored once main() returns, until the process ends."""
    _State.exiting = True


def take() -> None:
    """main() starts: SIGTERM interrupts as SIGINT does. Only the main thread may set handlers;
    from another thread main() runs without them rather than crash."""
    if threading.current_thread() is threading.main_thread():
        _State.previous = {s: signal.getsignal(s) for s in WATCHED}
        signal.signal(signal.SIGTERM, _interrupt)


def settle() -> None:
    """The exit code is decided: from now on SIGINT and SIGTERM cannot change it."""
    if _State.previous is not None:
        for signum in WATCHED:
            signal.signal(signum, signal.SIG_IGN)


def release() -> None:
    """main() returns: signals stay ignored if the process ends now, else the handlers main()
    found come back (one not set from Python reads None: the default is the best guess)."""
    if _State.previous is None:
        return
    if _State.exiting:
        settle()
    else:
        for signum, handler in _State.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    _State.previous = None
