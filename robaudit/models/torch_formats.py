"""Loaders for PyTorch model files: torch.export (.pt2), TorchScript, and state dicts + an arch.

Nothing here unpickles arbitrary Python objects. State dicts are read with
``torch.load(weights_only=True)``; torch.export archives are checked before ``torch.export.load``
so that its internal pickle fallbacks never see anything but plain tensors. TorchScript archives
run their own TorchScript code (not Python) and an ``arch`` given as ``package.module:factory``
imports and runs that Python code: both are as trusted as the user who names them.
"""

from __future__ import annotations

import difflib
import importlib
import io
import json
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robaudit.errors import DataError, ModelLoadError

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
# State dicts are often saved inside a training checkpoint under one of these keys.
_STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_STATE_DICT_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------
# Format detection


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


# ---------------------------------------------------------------------------------------------
# torch.export


class ExportedModule(nn.Module):
    """A torch.export program as an nn.Module that accepts any batch size.

    The program's train/eval behaviour was fixed when it was exported (its GraphModule refuses
    ``.eval()``), so ``train()`` only records the flag. When the program was exported with a
    static batch size B, a batch of another size is cut into chunks of B and the last chunk is
    zero-padded; the padded rows' outputs are dropped. That is exact for eval-mode models, whose
    outputs do not mix examples, and gradients flow through the chunking unchanged.
    """

    def __init__(self, program: nn.Module, input_shape: tuple[int | None, ...]) -> None:
        super().__init__()
        self.program = program
        # Static sizes per dimension, None where the program accepts any size.
        self.input_shape = input_shape

    @property
    def static_batch(self) -> int | None:
        """The batch size the program was exported with, None when it is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        batch = self.static_batch
        if batch is None or x.shape[0] == batch:
            return self.program(x)
        outputs = []
        for chunk in torch.split(x, batch):
            rows = chunk.shape[0]
            if rows < batch:
                padding = chunk.new_zeros((batch - rows, *chunk.shape[1:]))
                chunk = torch.cat([chunk, padding])
            outputs.append(self.program(chunk)[:rows])
        return torch.cat(outputs)

    def _check_shape(self, x: torch.Tensor) -> None:
        expected = self.input_shape
        fits = x.dim() == len(expected) and all(
            want is None or got == want for got, want in zip(x.shape[1:], expected[1:], strict=True)
        )
        if not fits:
            sizes = ["N", *("any" if s is None else str(s) for s in expected[1:])]
            got = ", ".join(str(s) for s in x.shape)
            raise DataError(
                f"the exported model takes inputs shaped ({', '.join(sizes)}) but got a batch "
                f"shaped ({got}); "
                "resize the data to match or re-export the model with dynamic shapes"
            )


def load_exported(path: Path) -> tuple[ExportedModule, str]:
    """Load a torch.export archive; returns the module and a description of its batch size."""
    _check_exported_archive(path)
    try:
        # A file object: torch.export.load warns about paths that do not end in .pt2.
        with path.open("rb") as f:
            program = torch.export.load(f)
    except Exception as exc:  # torch raises many types for incompatible or damaged archives
        raise ModelLoadError(
            f"cannot load torch.export archive {path} ({type(exc).__name__}: "
            f"{_first_line(exc)}); re-export it with torch {torch.__version__}"
        ) from exc
    _reject_training_mode(program, path)
    input_shape = _exported_input_shape(program, path)
    module = ExportedModule(program.module(), input_shape)
    batch = module.static_batch
    detail = "dynamic batch" if batch is None else f"static batch {batch}, chunked"
    return module, detail


def _check_exported_archive(path: Path) -> None:
    """Refuse archives whose loading would unpickle Python objects or load compiled code."""
    with zipfile.ZipFile(path) as zf:
        entries = {n.split("/", 1)[1]: n for n in zf.namelist() if "/" in n}

        def read(name: str) -> bytes:
            return zf.read(entries[name])

        if any(n.startswith("data/aotinductor/") for n in entries):
            raise ModelLoadError(
                f"{path} is an AOTInductor package holding compiled native code, which robaudit "
                "will not load; save the program with torch.export.save instead"
            )
        models = [
            n[len("models/") : -len(".json")]
            for n in entries
            if n.startswith("models/") and n.endswith(".json")
        ]
        pickled: list[str] = []
        for model in models:
            pickled += [
                n
                for n in (
                    f"data/sample_inputs/{model}.pt",
                    f"data/weights/{model}.pt",
                    f"data/constants/{model}.pt",
                )
                if n in entries
            ]
            for kind in ("weights", "constants"):
                config_name = f"data/{kind}/{model}_{kind}_config.json"
                if config_name not in entries:
                    continue
                try:
                    config = json.loads(read(config_name))["config"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ModelLoadError(
                        f"{path} has an unreadable {config_name}; re-export the model"
                    ) from exc
                for meta in config.values():
                    name = str(meta.get("path_name", ""))
                    if name.startswith(("custom_obj_", "opaque_obj_")):
                        raise ModelLoadError(
                            f"{path} holds pickled Python objects ({name}) that robaudit will not "
                            "unpickle because that can run code; export a model whose constants "
                            "are plain tensors"
                        )
                    if meta.get("use_pickle"):
                        pickled.append(f"data/{kind}/{name}")
        for name in pickled:
            if name in entries:
                _load_weights_only(read(name), f"{path} (entry {name})")


def _reject_training_mode(program: torch.export.ExportedProgram, path: Path) -> None:
    # An eval-mode export bakes in running statistics and no dropout; a training-mode export
    # would use batch statistics, update them in place and drop units at random.
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        if "batch_norm" not in schema.name and "dropout" not in schema.name:
            continue
        for index, argument in enumerate(schema.arguments):
            if argument.name not in ("training", "train"):
                continue
            flag = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            if flag is True:
                raise ModelLoadError(
                    f"{path} was exported in training mode ({schema.name} with "
                    f"{argument.name}=True); re-export it with torch.export.export(model.eval(), "
                    "(x,))"
                )


def _exported_input_shape(
    program: torch.export.ExportedProgram, path: Path
) -> tuple[int | None, ...]:
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelLoadError(
            f"{path} takes {len(user_inputs)} inputs but an image classifier takes one image "
            "batch; export a model whose forward takes a single tensor"
        )
    node = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]
    )
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(
            f"{path} does not take a tensor input; export it with an image batch (N, C, H, W)"
        )
    return tuple(s if isinstance(s, int) else None for s in value.shape)


# ---------------------------------------------------------------------------------------------
# TorchScript


def load_torchscript(path: Path) -> nn.Module:
    """Load a TorchScript archive onto the CPU."""
    try:
        with warnings.catch_warnings():
            # The deprecation notice is meant for authors, not for someone auditing a model.
            warnings.filterwarnings("ignore", r".*torch\.jit\.load.*deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and others for bad archives
        raise ModelLoadError(
            f"cannot load TorchScript archive {path} ({_first_line(exc)}); save it again with "
            "torch.jit.save or export with torch.export instead"
        ) from exc


# ---------------------------------------------------------------------------------------------
# State dicts


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
            f"cannot read {path} as a torch.save file ({_first_line(exc)}); save it again"
        ) from exc


def _load_weights_only(data: bytes, where: str) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{where} holds pickled Python objects that robaudit will not unpickle because that "
            "can run code; export a model whose weights and inputs are plain tensors"
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
        tensors: dict[str, torch.Tensor] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
            start, end = (8 + header_len + int(o) for o in meta["data_offsets"])
            shape = [int(s) for s in meta["shape"]]
            count = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end > len(data) or end - start != count * itemsize:
                raise ValueError(f"tensor {name!r} does not fit the file")
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=start)
            tensors[name] = flat.reshape(shape).clone()
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file ({exc}); save it again"
        ) from exc
    return tensors


# ---------------------------------------------------------------------------------------------
# Architectures


def build_arch(arch: str, num_classes: int | None) -> nn.Module:
    """Build an untrained model from "torchvision:NAME" or "package.module:factory".

    The second form imports and runs the named Python code, like ``python -m`` would.
    """
    source, sep, name = arch.partition(":")
    if not sep or not source or not name:
        hint = f"; did you mean torchvision:{arch}?" if _torchvision_has(arch) else ""
        raise ModelLoadError(
            f"arch {arch!r} should be 'torchvision:NAME' or 'package.module:factory'{hint}"
        )
    if source == "torchvision":
        return _torchvision_model(name, num_classes)
    return _factory_model(source, name, num_classes, arch)


def _torchvision_has(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see torchvision's list_models()"
        raise ModelLoadError(f"torchvision has no model named {name!r}; {hint}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        # weights=None: robaudit never downloads; the weights come from the user's file.
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:  # torchvision rejects some num_classes/arch combinations
        raise ModelLoadError(
            f"cannot build torchvision:{name} with num_classes={num_classes} ({_first_line(exc)})"
        ) from exc


def _factory_model(module_name: str, attr: str, num_classes: int | None, arch: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import {module_name!r} for arch {arch!r} ({exc}); install it or add its "
            "folder to PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name} has no callable {attr!r} for arch {arch!r}")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except Exception as exc:  # user code: report it, keep the traceback chained
        raise ModelLoadError(
            f"arch factory {arch} raised {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"arch factory {arch} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load ``state`` into ``model`` strictly, naming mismatched keys and shapes on failure."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
        raise ModelLoadError(
            f"the state dict does not fit arch {arch}: {' and '.join(parts)} keys; "
            "check that --arch names the architecture the weights were trained with"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ModelLoadError(
            f"the state dict does not fit arch {arch}: shapes differ (file vs arch) for "
            f"{_some(wrong)}; check --arch and --num-classes"
        )
    model.load_state_dict(state, strict=True)


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
