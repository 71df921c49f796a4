"""Reports: JSON (the source of truth), JUnit XML and the terminal table, all rendered from the
JSON document so that a saved report renders the same as a fresh one."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from robaudit.errors import UsageError


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A process killed halfway leaves the old file (or none), never half of a new one. The file
    gets the mode a plain ``open(path, "w")`` would (0644 under the usual umask 022), not
    ``tempfile``'s 0600: reports and checkpoints land in CI artifact folders and shared
    directories that other users read.
    """
    path = Path(path)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {e.strerror}; choose a writable path") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """An empty new file beside ``path`` with the user's umask mode, for a writer that needs a
    file name (an exporter, say) before ``os.replace(tmp, path)``; the caller removes it if the
    write fails."""
    fd, tmp = _create_beside(Path(path), suffix)
    os.close(fd)
    return tmp


def _create_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    # os.open applies the umask to 0o666, as open() does; mkstemp would force 0o600.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
            try:
                return os.open(tmp, flags, 0o666), tmp
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary file name")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}; choose a writable path") from None


def check_writable(path: str | Path) -> None:
    """Fail before a long scan, not after it, when a report cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot write report {path}: it is a directory; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write report {path}: {parent} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write report {path}: the file is not writable")
