"""Hostile model and data files: each is built here, run through the real CLI, and must give exit
4 and one line on stderr, run no pickled code and print no traceback.

A pickled payload creates ``tmp_path/PWNED`` when it is unpickled; the control tests show that
it does so under torch's own loaders, so its absence after robaudit means something.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DIGITS
from PIL import Image

from robaudit.cli import main
from robaudit.data.folder import load_folder
from robaudit.errors import ExitCode, ModelLoadError
from robaudit.models.exported_archive import load_program

MODEL = DIGITS / "model.pt2"
DATA = DIGITS / "test.npz"
FAST = ("--per-class", "4", "--steps", "2", "--device", "cpu")


class RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a pickle that runs any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def payload(tmp: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": RunsCode(tmp / "PWNED")}, buffer)
    return buffer.getvalue()


def example_entries() -> dict[str, bytes]:
    """The bundled archive's entries (under its folder "model/"), in order."""
    with zipfile.ZipFile(MODEL) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def archive(tmp: Path, entries: dict[str, bytes], name: str = "evil.pt2") -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)
    return path


def legacy_root(tmp: Path, carrier: str) -> Path:
    """The bundled archive plus the pre-2.8 root-level entries, ``carrier`` holding the payload.

    torch.export.load's current loader fails on it and its legacy loader unpickles ``carrier``.
    """
    entries = example_entries()
    harmless = io.BytesIO()
    torch.save({}, harmless)
    legacy = {"version": b"8.16",
              "serialized_exported_program.json": entries["model/models/model.json"]}
    for name in ("serialized_state_dict.pt", "serialized_constants.pt",
                 "serialized_example_inputs.pt"):
        legacy[name] = payload(tmp) if name == carrier else harmless.getvalue()
    return archive(tmp, {**entries, **legacy})


def with_entries(extra: Callable[[Path], dict[str, bytes]]) -> Callable[[Path], Path]:
    return lambda tmp: archive(tmp, {**example_entries(), **extra(tmp)})


def config_naming(kind: str, path_name: str, use_pickle: bool) -> Callable[[Path], Path]:
    """The bundled archive whose first weight or constant is ``path_name``, holding the payload."""

    def make(tmp: Path) -> Path:
        entries = example_entries()
        config_name = f"model/data/{kind}/model_{kind}_config.json"
        config = json.loads(entries[config_name])
        meta = {"path_name": path_name, "is_param": False, "use_pickle": use_pickle,
                "tensor_meta": None}
        if config["config"]:
            first = next(iter(config["config"]))
            meta = {**config["config"][first], "path_name": path_name, "use_pickle": use_pickle}
            config["config"][first] = meta
        else:
            config["config"]["evil"] = meta
        entries[config_name] = json.dumps(config).encode()
        entries[f"model/data/{kind}/{path_name}"] = payload(tmp)
        return archive(tmp, entries)

    return make


def run(capfd: pytest.CaptureFixture[str], tmp: Path, *args: str) -> str:
    """Run the CLI; assert exit 4, one stderr line and no payload run; return that line."""
    code = main(list(args))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert code == ExitCode.USAGE_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp / "PWNED").exists(), "unpickling ran code"
    return lines[0]


def scan_model(capfd: pytest.CaptureFixture[str], tmp: Path, model: Path) -> str:
    return run(capfd, tmp, "scan", str(model), "--data", str(DATA), *FAST)


# ---------------------------------------------------------------------------------------------
# torch.export archives that would unpickle code


LEGACY_CARRIERS = ["serialized_state_dict.pt", "serialized_constants.pt",
                   "serialized_example_inputs.pt"]


@pytest.mark.parametrize("carrier", LEGACY_CARRIERS)
def test_legacy_root_entries_are_refused_before_torch(
    carrier: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    line = scan_model(capfd, tmp_path, legacy_root(tmp_path, carrier))
    assert "not laid out as torch.export.save writes archives" in line
    assert "'version', 'serialized_exported_program.json'" in line
    assert "unpickles Python objects" in line


def test_control_torch_export_load_runs_the_legacy_payload(tmp_path: Path) -> None:
    # What the refusal above prevents: torch's own loader runs the payload (then fails).
    path = legacy_root(tmp_path, "serialized_state_dict.pt")
    with contextlib.suppress(Exception):  # it fails after the payload ran, in ways that vary
        torch.export.load(path)
    assert (tmp_path / "PWNED").exists()


def unwritten(entry: str) -> tuple[Any, tuple[str, ...]]:
    """A case: a payload in ``entry``, a name torch.export.save never writes (torch's legacy
    loader would read it)."""
    return (with_entries(lambda t: {entry: payload(t)}),
            ("entries torch.export.save does not write", f"'{entry.removeprefix('model/')}'"))


FOLDER_CASES = {
    # Legacy names inside the archive folder, which torch.export.load would also read.
    "folder-state-dict": unwritten("model/serialized_state_dict.pt"),
    "folder-constants": unwritten("model/serialized_constants.pt"),
    "folder-example-inputs": unwritten("model/serialized_example_inputs.pt"),
    "legacy-weights-file": unwritten("model/data/weights/model.pt"),
    "legacy-constants-file": unwritten("model/data/constants/model.pt"),
    "sample-inputs": (with_entries(lambda t: {"model/data/sample_inputs/model.pt": payload(t)}),
                      ("(sample inputs) holds pickled Python objects", "will not unpickle")),
    "pickled-weight": (config_naming("weights", "weight_0", use_pickle=True),
                       ("(data/weights/weight_0) holds pickled Python objects",)),
    "pickled-constant": (config_naming("constants", "tensor_0", use_pickle=True),
                         ("(data/constants/tensor_0) holds pickled Python objects",)),
    "opaque-constant": (config_naming("constants", "opaque_obj_0", use_pickle=True),
                        ("lists 'opaque_obj_0'", "not a plain tensor", "will not unpickle")),
    "custom-constant": (config_naming("constants", "custom_obj_0", use_pickle=True),
                        ("lists 'custom_obj_0'", "not a plain tensor")),
    "second-folder": (with_entries(lambda t: {"other/data/weights/model.pt": payload(t)}),
                      ("not laid out as torch.export.save writes", "one folder")),
}


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_payloads_inside_the_archive_folder_never_run(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    make, words = FOLDER_CASES[name]
    line = scan_model(capfd, tmp_path, make(tmp_path))
    missing = [w for w in words if w not in line]
    assert not missing, line


def test_a_duplicated_entry_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # zipfile reads the last copy of a name, torch's reader may read the first: check neither.
    entries = example_entries()
    path = archive(tmp_path, entries)
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("model/data/sample_inputs/model.pt", payload(tmp_path))
    line = scan_model(capfd, tmp_path, path)
    assert "each entry once; found 'model/data/sample_inputs/model.pt'" in line


@pytest.mark.parametrize("entry", ["model/data/weights/model.pt", "model/data/constants/model.pt",
                                   "model/data/sample_inputs/model.pt"])
def test_the_loader_alone_never_unpickles(entry: str, tmp_path: Path) -> None:
    # Without the layout check, torch would read these with weights_only=False (legacy files)
    # or retry that way (sample inputs); load_program forces every torch.load weights-only.
    path = archive(tmp_path, {**example_entries(), entry: payload(tmp_path)})
    with pytest.raises(ModelLoadError, match="will not unpickle"):
        load_program(path)
    assert not (tmp_path / "PWNED").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------------------------
# Damaged model files: usage errors, not crashes


def test_a_bad_crc_is_a_damaged_archive(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = bytearray(MODEL.read_bytes())
    with zipfile.ZipFile(MODEL) as zf:
        info = zf.getinfo("model/models/model.json")
    # The entry is stored uncompressed after its 30-byte local header, name and extra field.
    offset = info.header_offset
    lengths = (int.from_bytes(data[offset + at : offset + at + 2], "little") for at in (26, 28))
    start = offset + 30 + sum(lengths)
    with zipfile.ZipFile(MODEL) as zf, zf.open(info) as f:
        assert f.read(1) == bytes(data[start : start + 1])
    data[start + 100] ^= 0xFF
    path = tmp_path / "crc.pt2"
    path.write_bytes(bytes(data))
    line = scan_model(capfd, tmp_path, path)
    assert "damaged zip archive (entry model/models/model.json fails its CRC check)" in line


def test_a_missing_weight_gives_one_line_without_torch_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    entries = example_entries()
    del entries["model/data/weights/weight_7"]
    line = scan_model(capfd, tmp_path, archive(tmp_path, entries))
    assert line.startswith(f"error: cannot load torch.export archive {tmp_path / 'evil.pt2'}")
    assert "weight_7" in line and "re-export it with torch.export.save" in line


def test_an_incomplete_archive_names_what_is_missing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    entries = example_entries()
    del entries["model/archive_version"]
    line = scan_model(capfd, tmp_path, archive(tmp_path, entries))
    assert "incomplete torch.export archive (no archive_version)" in line


def test_a_truncated_archive_says_so(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.pt2"
    path.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    line = scan_model(capfd, tmp_path, path)
    assert "is a truncated or damaged zip archive" in line
    assert "download, copy or export it again" in line


def test_a_deeply_nested_safetensors_header(tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    header = b'{"a":' * 100_000 + b"0" + b"}" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    line = run(capfd, tmp_path, "scan", str(path), "--data", str(DATA), "--arch",
               "torchvision:resnet18", *FAST)
    assert "not a valid safetensors file (its header nests too deeply" in line


# ---------------------------------------------------------------------------------------------
# Data files


def test_a_pickled_data_file_is_refused_without_torch_advice(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(payload(tmp_path))
    line = run(capfd, tmp_path, "scan", str(MODEL), "--data", str(path), *FAST)
    assert "holds pickled Python objects (io.open) besides tensors" in line
    assert "robaudit will not unpickle" in line
    assert "torch.save({'x': images, 'y': labels}, path)" in line and "np.savez" in line
    assert "weights_only=False" not in line


def image_folder(tmp: Path) -> Path:
    root = tmp / "images"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / label / "a.png")
    return root


def test_a_symlink_loop_in_an_image_folder_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path)
    (root / "1" / "again").symlink_to(root / "1", target_is_directory=True)
    line = run(capfd, tmp_path, "scan", str(MODEL), "--data", str(root), *FAST)
    assert f"image folder {root} has a symbolic-link loop: {root / '1' / 'again'}" in line
    assert "remove the link" in line


def test_linked_class_folders_are_still_followed(tmp_path: Path) -> None:
    # Not a loop: classes may link to folders elsewhere, two of them even to the same one.
    store = image_folder(tmp_path / "store")
    root = tmp_path / "linked"
    (root / "bird").mkdir(parents=True)
    (root / "bird" / "more").symlink_to(store / "1", target_is_directory=True)
    (root / "cat").symlink_to(store / "0", target_is_directory=True)
    (root / "dog").symlink_to(store / "0", target_is_directory=True)
    dataset, targets, names = load_folder(root, None)
    assert names == ["bird", "cat", "dog"]
    assert targets.tolist() == [0, 1, 2]
    assert dataset.samples[0][0] == str(root / "bird" / "more" / "a.png")


# ---------------------------------------------------------------------------------------------
# Python code in the serialized program itself (no pickle involved)

OPENS_MARKER = "__import__('builtins').open({marker!r}, 'w')"


def program_edited(tmp: Path, edit: Callable[[str], str]) -> Path:
    entries = example_entries()
    text = entries["model/models/model.json"].decode()
    edited = edit(text)
    assert edited != text
    entries["model/models/model.json"] = edited.encode()
    return archive(tmp, entries)


def test_a_size_expression_that_runs_code_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # torch parses size expressions with sympify, which evaluates them as Python.
    symbol = "Symbol('s77', positive=True, integer=True)"
    code = OPENS_MARKER.format(marker=str(tmp_path / "PWNED"))
    path = program_edited(tmp_path, lambda t: t.replace(
        json.dumps(symbol), json.dumps(f"{symbol} + 0*len(str({code}))"), 1))
    line = scan_model(capfd, tmp_path, path)
    assert "a size is the expression" in line and "would run Python code" in line


def test_a_graph_node_calling_python_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # torch resolves targets by attribute lookup from the torch module: torch.os is os.
    path = program_edited(tmp_path, lambda t: t.replace(
        '"target": "torch.ops.aten.linear.default"', '"target": "torch.os.system"', 1))
    line = scan_model(capfd, tmp_path, path)
    assert "a graph node calls 'torch.os.system'" in line


def test_guard_code_in_the_archive_is_never_executed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # ExportedProgram.module() execs the stored guards; robaudit builds the module without them.
    code = OPENS_MARKER.format(marker=str(tmp_path / "PWNED"))
    path = program_edited(tmp_path, lambda t: t.replace(
        '"guards_code": []', json.dumps({"guards_code": [f"{code} is not None"]})[1:-1], 1))
    assert main(["scan", str(path), "--data", str(DATA), *FAST]) in (0, 1)
    assert not (tmp_path / "PWNED").exists()
    torch.export.load(path).module()(torch.zeros(1, 1, 8, 8))  # the control: torch runs it
    assert (tmp_path / "PWNED").exists()
