"""What a torch.export archive (.pt2) may hold before torch reads any of it.

torch's loaders unpickle in several places: ``torch.export.load`` falls back to a legacy loader
(root-level ``serialized_*.pt`` entries) when the current one fails, both retry
``torch.load(weights_only=False)`` when a safe load fails, pickled weights and constants are read
with ``weights_only=False`` outright, and custom or opaque constants go through plain pickle.
So robaudit accepts exactly the layout ``torch.export.save`` writes, one archive folder holding
the entries of ``_ENTRIES``, proves every entry torch would unpickle loadable with
``weights_only=True`` first, and :func:`load_program` calls the current loader itself (no legacy
fallback) with every ``torch.load`` forced to ``weights_only=True``.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from robaudit.errors import ModelLoadError, first_line

# Entry names (inside the archive folder) that torch.export.save writes for its one program,
# "model"; extra/ holds the caller's extra_files, which torch reads back as text. Custom and
# opaque objects are accepted here only to be refused by name when a config lists them.
_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/(model_weights_config\.json|weight_\d+)"
    r"|data/constants/(model_constants_config\.json|(tensor|custom_obj|opaque_obj)_\d+)"
    r"|extra/[^/].*"
)
_REQUIRED = (
    "archive_format",
    "archive_version",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
# What a weights or constants config may name, per folder (custom_obj_ and opaque_obj_ constants
# are pickled Python objects and are never accepted).
_PAYLOADS = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}
# Operators a graph node may name: torch's operator library (aten's bitwise operators are named
# like Python's dunders; no other dunder, which would reach Python objects) and the operators of
# symbolic sizes.
_OPERATORS = re.compile(
    r"torch\.ops\.[A-Za-z]\w*\.(_?[A-Za-z]\w*|__i?(and|or|xor|lshift|rshift)__)(\.[A-Za-z]\w*)?"
    r"|torch\.sym_[a-z]+"
    r"|_operator\.(eq|ne|le|ge|lt|gt|neg|pos|mul|add|sub|floordiv|mod|pow|truediv|and_|or_"
    r"|not_|getitem)|math\.(trunc|floor|ceil|sqrt)"
)
_EXPRESSION_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.keyword, ast.Load,
    ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)
_FORCE_VARIABLES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
_REEXPORT = f"re-export it with torch.export.save under torch {torch.__version__}"


def check_archive(path: Path) -> None:
    """Refuse any archive torch could not load without unpickling Python objects."""
    _check_zip(path)
    from torch.export.pt2_archive import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(str(path))  # the reader torch loads with: same names, bytes
        names = list(reader.get_file_names())
    except Exception as exc:  # torch's reader raises RuntimeError or AssertionError
        raise ModelLoadError(
            f"{path} is not a torch.export archive torch can open ({first_line(exc)}); "
            f"{_REEXPORT}"
        ) from exc
    _check_names(path, names)
    _check_program(path, reader.read_string("models/model.json"))
    for kind, pattern in _PAYLOADS.items():
        for name in _payloads(path, reader, kind, pattern):
            _prove_weights_only(reader.read_bytes(name), path, name)
    _prove_weights_only(reader.read_bytes("data/sample_inputs/model.pt"), path, "sample inputs")


def load_program(path: Path) -> torch.export.ExportedProgram:
    """Load a checked archive with torch's current loader, every torch.load weights-only."""
    from torch.export.pt2_archive._package import load_pt2

    try:
        with _weights_only_loads(), path.open("rb") as f:
            # A file object: load_pt2 warns about paths that do not end in .pt2.
            contents = load_pt2(f)
        return contents.exported_programs["model"]
    except pickle.UnpicklingError as exc:
        raise _pickled_error(path, "an entry") from exc
    except Exception as exc:  # torch raises many types for incompatible or damaged archives
        raise ModelLoadError(
            f"cannot load torch.export archive {path} ({type(exc).__name__}: "
            f"{first_line(exc)}); {_REEXPORT}"
        ) from exc


def _check_zip(path: Path) -> None:
    """One archive folder, no entry twice, every entry's checksum right."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            damaged = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(
            f"{path} is a damaged zip archive ({first_line(exc)}); copy or export it again"
        ) from exc
    if damaged is not None:
        raise ModelLoadError(
            f"{path} is a damaged zip archive (entry {damaged} fails its CRC check); copy or "
            "export it again"
        )
    twice = [n for n, count in collections.Counter(names).items() if count > 1]
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    outside = [n for n in names if "/" not in n]
    if twice or outside or len(roots) > 1:
        odd = (twice or outside or names)[:3]
        raise ModelLoadError(
            f"{path} is not laid out as torch.export.save writes archives (one folder, each "
            f"entry once; found {', '.join(map(repr, odd))}); robaudit will not load it because "
            f"torch's fallback loader for such files unpickles Python objects; {_REEXPORT}"
        )


def _check_names(path: Path, names: list[str]) -> None:
    if any(n.startswith("data/aotinductor/") for n in names):
        raise ModelLoadError(
            f"{path} is an AOTInductor package holding compiled native code, which robaudit "
            "will not load; save the program with torch.export.save instead"
        )
    unknown = [n for n in names if not _ENTRIES.fullmatch(n)]
    if unknown:
        raise ModelLoadError(
            f"{path} holds entries torch.export.save does not write "
            f"({', '.join(map(repr, unknown[:3]))}); robaudit loads only that layout because "
            f"torch reads older ones by unpickling Python objects; {_REEXPORT}"
        )
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise ModelLoadError(
            f"{path} is an incomplete torch.export archive (no {missing[0]}); {_REEXPORT}"
        )


def _check_program(path: Path, text: str) -> None:
    """Refuse graph operators and size expressions that would run Python code.

    torch resolves a node's operator by attribute lookup from the torch, operator and math
    modules and calls it when the model runs, and evaluates size expressions with sympify (eval).
    """
    try:
        pending: list[Any] = [json.loads(text)]
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path} has an unreadable models/model.json; {_REEXPORT}") from exc
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending += item
        if not isinstance(item, dict):
            continue
        pending += item.values()
        target, expr = item.get("target"), item.get("expr_str")
        if "inputs" in item and isinstance(target, str) and not _OPERATORS.fullmatch(target):
            raise _code_error(path, "a graph node calls", target)
        if expr is not None and not (isinstance(expr, str) and _plain_expression(expr)):
            raise _code_error(path, "a size is the expression", expr)


def _code_error(path: Path, what: str, text: object) -> ModelLoadError:
    shown = repr(text) if len(repr(text)) <= 80 else repr(text)[:77] + "..."
    return ModelLoadError(
        f"{path}: {what} {shown}, which torch.export never writes and which would run Python "
        "code; robaudit will not load it, re-export the model with torch.export.save"
    )


def _plain_expression(text: str) -> bool:
    """Whether a size expression is sympy arithmetic on symbols: no names torch would call."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    names: set[int] = set()  # the one place a string may stand: a Symbol's name
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _sympy_classes()):
                return False
            if node.func.id == "Symbol" and node.args and isinstance(node.args[0], ast.Constant):
                names.add(id(node.args[0]))
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in names:
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif not isinstance(node, _EXPRESSION_NODES):
            return False
    return True


@functools.cache
def _sympy_classes() -> frozenset[str]:
    """Expression classes: building them computes, unlike sympy's functions that parse strings."""
    import sympy
    from torch.utils._sympy import functions

    return frozenset(
        name
        for module in (sympy, functions)
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, sympy.Basic)
    )


def _payloads(path: Path, reader: Any, kind: str, pattern: re.Pattern[str]) -> list[str]:
    """The entries of ``kind`` that torch would unpickle, refusing any that is not a tensor."""
    config_name = f"data/{kind}/model_{kind}_config.json"
    try:
        config = json.loads(reader.read_string(config_name))["config"]
        metas = list(config.values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ModelLoadError(f"{path} has an unreadable {config_name}; {_REEXPORT}") from exc
    pickled = []
    for meta in metas:
        name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise ModelLoadError(
                f"{path} lists {name!r} in {config_name}, which is not a plain tensor (custom "
                "and opaque objects are pickled Python objects that robaudit will not unpickle "
                "because that can run code); export a model whose constants are plain tensors"
            )
        if meta.get("use_pickle"):
            pickled.append(f"data/{kind}/{name}")
    return pickled


def _prove_weights_only(data: bytes, path: Path, what: str) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickled_error(path, what) from exc
    except Exception as exc:  # a damaged entry: zip, storage and EOF errors of many types
        raise ModelLoadError(
            f"{path} ({what}) cannot be read ({first_line(exc)}); {_REEXPORT}"
        ) from exc


def _pickled_error(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} ({what}) holds pickled Python objects that robaudit will not unpickle because "
        "that can run code; export a model whose weights and inputs are plain tensors"
    )


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside, even one asking for weights_only=False, loads weights only.

    torch reads these variables at each call; the other one would make torch refuse every load.
    """
    saved = {k: os.environ.get(k) for k in _FORCE_VARIABLES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

