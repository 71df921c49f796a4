"""Which format a model file is in, judged by its content first and its extension second.

Nothing here loads a model: detection reads the first bytes and, for zip archives, the entry
names, so a file is classified before any loader (and any unpickling) sees it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from robaudit.errors import ModelLoadError

ONNX = "onnx"
TORCH_EXPORT = "torch.export"
TORCHSCRIPT = "torchscript"
TORCH_SAVE = "torch.save"
SAFETENSORS = "safetensors"

_FORMATS_HELP = (
    "robaudit reads ONNX (.onnx), torch.export (.pt2), TorchScript, and state dicts "
    "(torch.save or .safetensors) given with --arch"
)
# ModelProto field tags that may follow ir_version (field 1): producer_name, producer_version,
# domain, model_version, doc_string, graph, opset_import, metadata_props, training_info, functions,
# configuration.
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A, 0x82, 0x8A})


def detect_format(path: Path) -> str:
    """The file's format, judged by its content first and its extension second.

    Returns one of ONNX, TORCH_EXPORT, TORCHSCRIPT, TORCH_SAVE, SAFETENSORS.
    """
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the model file itself")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        message = f"cannot read model file {path}: {exc.strerror}; check its permissions"
        raise ModelLoadError(message) from exc
    if size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes); export or copy it again")

    if zipfile.is_zipfile(path):
        return _detect_zip(path)
    if head[:4] == b"PK\x03\x04":
        # A zip's table of contents is at its end: without it the file was cut short or damaged.
        raise ModelLoadError(
            f"{path} is a truncated or damaged zip archive (the table of contents at its end is "
            "missing), so not a model file robaudit can read; download, copy or export it again"
        )
    if _looks_like_onnx(head):
        return ONNX
    if _looks_like_safetensors(head, size):
        return SAFETENSORS
    if head[:1] == b"\x80":
        # A pickle: torch.save's legacy (non-zip) format, or plain pickle.dump output.
        return TORCH_SAVE
    if path.suffix.lower() == ".onnx":
        # Let the ONNX loader say what is wrong with it.
        return ONNX
    raise ModelLoadError(f"{path} is not a model file robaudit can read; {_FORMATS_HELP}")


def _detect_zip(path: Path) -> str:
    names = _archive_names(path)
    if "archive_format" in names or any(n.startswith("models/") for n in names):
        return TORCH_EXPORT
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        return TORCHSCRIPT
    if "data.pkl" in names:
        return TORCH_SAVE
    if "serialized_exported_program.json" in names:
        raise ModelLoadError(
            f"{path} is a torch.export archive in the pre-2.8 layout; load and re-save it with "
            "torch.export.save under the installed torch"
        )
    raise ModelLoadError(f"{path} is a zip file but not a model archive; {_FORMATS_HELP}")


def _archive_names(path: Path) -> set[str]:
    """Entry names of a torch zip archive without its single top-level folder."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        message = f"{path} is a damaged zip archive ({exc}); copy or export it again"
        raise ModelLoadError(message) from exc
    return {n.split("/", 1)[1] for n in names if "/" in n}


def _looks_like_onnx(head: bytes) -> bool:
    # A serialized ModelProto starts with ir_version (tag 0x08, a small varint), then another
    # ModelProto field; random bytes rarely pass both checks.
    return (
        len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _ONNX_SECOND_TAGS
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"
