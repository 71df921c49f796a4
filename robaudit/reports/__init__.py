"""Reports: JSON (the source of truth), JUnit XML and the terminal table, all rendered from the
JSON document so that a saved report renders the same as a fresh one."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from robaudit.errors import UsageError

if TYPE_CHECKING:
    from robaudit.config import ScanConfig


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


#: (what the path is, the path): an output's name on the command line (``--json``) or an
#: input's noun (``model``, ``data``), with its path; None where not given.
Named = Sequence[tuple[str, "str | Path | None"]]


def check_outputs(outputs: Named, inputs: Named, reader: str) -> None:
    """UsageError, before any work, when an output would replace an input or another output.

    A path counts as the same file when it resolves to it (symbolic links and ``..`` followed)
    or, for files that exist, has the same device and inode (a hard link). An output inside an
    input folder (an image folder of data) is refused too. ``reader`` finishes the message:
    ``"this scan reads"``.
    """
    # Messages show each output as the user wrote it, an input only where it is spelt otherwise.
    given = [(f"{option} {value}", Path(value)) for option, value in outputs if value is not None]
    sources = _expanded(inputs) if given else []
    for i, (output, path) in enumerate(given):
        for noun, source in sources:
            clash = _overlap(path, source)
            if clash is not None:
                where = "" if source.absolute() == path.absolute() else f" {source}"
                raise UsageError(f"{output} is {clash.format(noun=noun, where=where)} {reader}; "
                                 "choose another path")
        for earlier, other in given[:i]:
            if _same_file(path, other):
                raise UsageError(f"{output} names the same file as {earlier}; choose another "
                                 "path for one of them")


def _expanded(inputs: Named) -> list[tuple[str, Path]]:
    """The inputs that exist, with an ONNX model's external data files after the model."""
    found = []
    for noun, value in inputs:
        if value is None or not Path(value).exists():
            continue  # a data set name, or a missing file its loader will report
        found.append((noun, Path(value)))
        if noun == "model" and Path(value).suffix.lower() == ".onnx":
            found += [(f"{noun}'s external data", p) for p in onnx_external_data(Path(value))]
    return found


def _overlap(output: Path, source: Path) -> str | None:
    """How ``output`` collides with the input ``source`` (a template), or None."""
    if source.is_dir():
        inside = output.resolve().is_relative_to(source.resolve())
        return "inside the {noun} folder{where}" if inside else None
    return "the {noun} file{where}" if _same_file(output, source) else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:  # one does not exist (yet): compare where the paths lead
        return a.resolve() == b.resolve()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def onnx_external_data(model: Path) -> list[Path]:
    """The external data files an ONNX model names, read without loading its weights; none
    when the file cannot be read (its loader says why, later)."""
    try:
        import onnx

        proto = onnx.load_model(str(model), load_external_data=False)
    except Exception:  # a damaged model: load_model reports it with a proper message
        return []
    tensors = list(proto.graph.initializer) + [
        a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    locations = {e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return [model.parent / location for location in sorted(locations)]


def scan_inputs(config: ScanConfig, config_file: str | Path | None = None) -> Named:
    """The files and folders a scan reads (with the config file it was resolved from), named
    for :func:`check_outputs`."""
    return [("model", config.model), ("data", config.data), ("class names", config.class_names),
            ("baseline report", config.baseline), ("config", config_file)]
