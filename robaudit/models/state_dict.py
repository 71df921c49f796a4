"""State dicts from torch.save files and .safetensors, read without running code.

``torch.save`` files are read with ``torch.load(weights_only=True)``; when torch refuses a pickle,
the message names what it holds, found by parsing the pickle stream, never by unpickling it.
Checkpoints that wrap the state dict, and DataParallel or torch.compile prefixes, are unwrapped.
"""

from __future__ import annotations

import json
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from robaudit.errors import ModelLoadError, first_line
from robaudit.models.detect import SAFETENSORS

# State dicts are often saved inside a training checkpoint under one of these keys.
_STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_STATE_DICT_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict(path: Path, file_format: str) -> dict[str, torch.Tensor]:
    """Read a state dict without running code: unwraps checkpoints and DataParallel prefixes."""
    raw = _read_safetensors(path) if file_format == SAFETENSORS else _torch_load_weights(path)
    return _unwrap_state_dict(raw, path)


def _torch_load_weights(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse; it refuses them safely anyway.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unsafe_pickle_error(path, exc) from exc
    except Exception as exc:  # damaged archives surface as RuntimeError, EOFError, ...
        raise ModelLoadError(
            f"cannot read {path} as a torch.save file ({first_line(exc)}); save it again"
        ) from exc


def _unsafe_pickle_error(path: Path, exc: Exception) -> ModelLoadError:
    data = _pickle_bytes(path)
    found = re.findall(r"GLOBAL ([\w.]+)", str(exc)) or _pickle_globals(data)
    culprit = found[0] if found else "unknown"
    if b"_modules" in data and b"_parameters" in data:
        return ModelLoadError(
            f"{path} is a pickled torch.nn.Module ({culprit}), which robaudit will not unpickle "
            "because unpickling can run arbitrary code; export it with "
            "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2') or save "
            "model.state_dict() and pass --arch"
        )
    return ModelLoadError(
        f"{path} contains pickled Python objects ({culprit}) besides tensors, which robaudit will "
        "not unpickle because that can run arbitrary code; save only tensors, e.g. "
        "torch.save(model.state_dict(), 'model.pt'), and pass --arch"
    )


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a torch.save file, read without unpickling (for error messages)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
                return zf.read(name) if name else b""
        with path.open("rb") as f:
            return f.read(16 * 2**20)
    except (OSError, zipfile.BadZipFile):
        return b""


def _pickle_globals(data: bytes) -> list[str]:
    """Names of the globals a pickle references, found by parsing it (nothing is executed)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a truncated or odd stream only makes the message less specific
        pass
    harmless = ("collections.OrderedDict", "torch._utils.", "torch.FloatStorage")
    return [g for g in found if not g.startswith(harmless)] or found


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    obj = raw
    if isinstance(obj, Mapping) and not _all_tensors(obj.values()):
        inner = next(
            (obj[k] for k in _STATE_DICT_WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None
        )
        if inner is not None:
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj.values()):
        what = type(raw).__name__
        raise ModelLoadError(
            f"{path} holds a {what} but not a state dict (a mapping of names to tensors); save "
            "model.state_dict() or a dict with it under 'state_dict' or 'model'"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _STATE_DICT_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _all_tensors(values: Iterable[object]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in values)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Parse a .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        tensors: dict[str, torch.Tensor] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
            start, end = (8 + header_len + int(o) for o in meta["data_offsets"])
            shape = [int(s) for s in meta["shape"]]
            count = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or end > len(data) or end - start != count * itemsize:
                raise ValueError(f"tensor {name!r} does not fit the file")
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=start)
            tensors[name] = flat.reshape(shape).clone()
    except RecursionError as exc:  # json recurses once per level of nesting
        raise ModelLoadError(
            f"{path} is not a valid safetensors file (its header nests too deeply to be a tensor "
            "index); save it again with safetensors"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file ({first_line(exc)}); save it again"
        ) from exc
    return tensors
