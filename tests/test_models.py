"""Tests for robaudit.models: each format loads to the original logits; unsafe files are refused."""

from __future__ import annotations

import argparse
import builtins
import importlib.util
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from robaudit.errors import ConfigError, DataError, ModelLoadError
from robaudit.models import LoadedModel, Normalize, load_model, verify_runtime
from robaudit.models.detect import detect_format
from robaudit.models.exported import ExportedModule

# torch.jit is deprecated in favour of torch.export but TorchScript files still need support.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

MEAN = (0.5, 0.25, 0.125)
STD = (0.5, 0.25, 2.0)


def tiny_net(num_classes: int = 5) -> nn.Module:
    """A small CNN whose BatchNorm and Dropout make train and eval mode differ."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, num_classes),
    )
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def pixels(n: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


class WritesMarker:
    """Unpickling this creates the marker file: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (str(self.marker), "w"))


def assert_all_eval(module: nn.Module) -> None:
    assert not [name for name, m in module.named_modules() if m.training]


# ---------------------------------------------------------------------------------------------
# Normalize


def test_normalize_gives_exact_values() -> None:
    x = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = Normalize(MEAN, STD)(x)
    expected = torch.tensor([1.0, 1.0, 0.0625]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert torch.equal(out, expected)
    assert Normalize(MEAN, STD).mean.shape == (1, 3, 1, 1)


def test_normalize_single_value_broadcasts_over_channels() -> None:
    out = Normalize([0.5], [0.25])(torch.ones(1, 3, 2, 2))
    assert torch.equal(out, torch.full((1, 3, 2, 2), 2.0))


@pytest.mark.parametrize(
    ("mean", "std", "words"),
    [
        ((0.5, 0.5), (0.5,), "mean has 2 values and std has 1"),
        ((0.5,), (0.0,), "must be > 0"),
        ((0.5,), (-1.0,), "must be > 0"),
        ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4), "divide both mean and std by 255"),
        ((), (), "mean has 0 values"),
        ((float("nan"),), (1.0,), "finite"),
    ],
)
def test_normalize_rejects_bad_statistics(
    mean: tuple[float, ...], std: tuple[float, ...], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        Normalize(mean, std)


def test_normalize_channel_mismatch_is_a_data_error() -> None:
    with pytest.raises(DataError, match="3 channels"):
        Normalize(MEAN, STD)(torch.rand(1, 1, 4, 4))


def test_mean_without_std_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(tiny_net()), path)
    with pytest.raises(ConfigError, match="std is missing"):
        load_model(path, mean=MEAN)


# ---------------------------------------------------------------------------------------------
# torch.export


def export(net: nn.Module, path: Path, *, dynamic_batch: bool, batch: int = 2) -> Path:
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.export.save(torch.export.export(net, (pixels(batch),), dynamic_shapes=dynamic), path)
    return path


def test_exported_program_gives_the_original_logits(tmp_path: Path) -> None:
    net = tiny_net()
    loaded = load_model(export(net, tmp_path / "model.pt2", dynamic_batch=True))
    assert loaded.format == "torch.export"
    assert loaded.runtime is None
    assert loaded.description == "model.pt2 (torch.export, dynamic batch)"
    assert not loaded.module.training
    x = pixels(5)
    torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)
    assert verify_runtime(loaded, x) is None


def test_exported_program_with_static_batch_takes_any_batch_size(tmp_path: Path) -> None:
    net = tiny_net()
    loaded = load_model(export(net, tmp_path / "model.pt2", dynamic_batch=False, batch=2))
    assert isinstance(loaded.module, ExportedModule)
    assert loaded.module.static_batch == 2
    assert "static batch 2" in loaded.description
    x = pixels(5).requires_grad_()
    out = loaded.module(x)
    assert out.shape == (5, 5)
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)
    # Attacks need input gradients through the chunking and padding.
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    (expected,) = torch.autograd.grad(net(x)[:, 0].sum(), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_exported_program_with_normalisation(tmp_path: Path) -> None:
    net = tiny_net()
    loaded = load_model(export(net, tmp_path / "m.pt2", dynamic_batch=True), mean=MEAN, std=STD)
    assert isinstance(loaded.module, nn.Sequential)
    assert isinstance(loaded.module[0], Normalize)
    x = pixels()
    expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=1e-6)
    assert not loaded.module.training


def test_exported_program_rejects_other_image_sizes(tmp_path: Path) -> None:
    loaded = load_model(export(tiny_net(), tmp_path / "model.pt2", dynamic_batch=True))
    with pytest.raises(DataError, match=r"inputs shaped \(N, 3, 8, 8\)"):
        loaded.module(torch.rand(2, 3, 16, 16))


def test_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    path = export(tiny_net().train(), tmp_path / "model.pt2", dynamic_batch=False)
    with pytest.raises(ModelLoadError, match=r"exported in training mode.*model\.eval\(\)"):
        load_model(path)


def test_exported_archive_with_pickled_code_does_not_run(tmp_path: Path) -> None:
    # torch.export.load falls back to weights_only=False for sample inputs; robaudit must not.
    good = export(tiny_net(), tmp_path / "good.pt2", dynamic_batch=False)
    bad, marker = tmp_path / "bad.pt2", tmp_path / "marker"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save(((WritesMarker(marker),), {}), buffer)
                data = buffer.getvalue()
            dst.writestr(info, data)
    with pytest.raises(ModelLoadError, match="will not unpickle"):
        load_model(bad)
    assert not marker.exists()


def test_aotinductor_package_is_refused(tmp_path: Path) -> None:
    path = export(tiny_net(), tmp_path / "model.pt2", dynamic_batch=True)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="AOTInductor package holding compiled native code"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# TorchScript


def test_torchscript_gives_the_original_logits(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(net.train()), path)  # saved in train mode on purpose
    net.eval()
    loaded = load_model(path)
    assert loaded.format == "torchscript"
    assert loaded.description == "model.ts (TorchScript)"
    assert_all_eval(loaded.module)
    x = pixels()
    torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)


def test_torchscript_given_an_arch_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(tiny_net()), path)
    with pytest.raises(ModelLoadError, match=r"is a TorchScript archive.*drop --arch"):
        load_model(path, arch="torchvision:resnet18")


def test_num_classes_without_arch_is_refused(tmp_path: Path) -> None:
    path = export(tiny_net(), tmp_path / "model.pt2", dynamic_batch=True)
    with pytest.raises(ModelLoadError, match=r"torch\.export archive.*drop --num-classes"):
        load_model(path, num_classes=5)


# ---------------------------------------------------------------------------------------------
# State dicts


def resnet18_cifar() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    return net.eval()


def test_state_dict_with_torchvision_arch(tmp_path: Path) -> None:
    net = resnet18_cifar()
    path = tmp_path / "resnet.pth"
    torch.save(net.state_dict(), path)
    loaded = load_model(path, arch="torchvision:resnet18", num_classes=10, mean=MEAN, std=STD)
    assert loaded.format == "state_dict"
    assert loaded.description == "resnet.pth (state dict on torchvision:resnet18)"
    assert_all_eval(loaded.module)
    x = pixels(2, 32)
    expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    out = loaded.module(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_state_dict_inside_a_checkpoint_with_dataparallel_prefix(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "ckpt.pt"
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 7}, path)
    (tmp_path / "nets.py").write_text(FACTORY_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        loaded = load_model(path, arch="nets:make")
    x = pixels()
    torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)


FACTORY_SOURCE = """
from torch import nn

def make(num_classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, num_classes),
    )
"""


def test_state_dict_with_factory_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net(num_classes=7)
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    (tmp_path / "my_nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(path, arch="my_nets:make", num_classes=7)
    assert_all_eval(loaded.module)
    x = pixels()
    out = loaded.module(x)
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, tensor in state.items():
        data = tensor.contiguous().numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_safetensors_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net()
    path = tmp_path / "model.safetensors"
    write_safetensors(net.state_dict(), path)
    (tmp_path / "st_nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(path, arch="st_nets:make")
    assert loaded.description == "model.safetensors (safetensors on st_nets:make)"
    x = pixels()
    torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)


def test_state_dict_without_arch_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(
        ModelLoadError, match=r"is a state dict \(9 tensors, e\.g\. '0\.weight'\).*pass --arch"
    ):
        load_model(path)


def test_arch_mismatch_names_keys_and_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, arch="torchvision:resnet18", num_classes=5)
    message = str(info.value)
    assert "torchvision:resnet18" in message
    assert "missing (conv1.weight, bn1.weight, bn1.bias, ... " in message
    assert "9 unexpected (0.weight, 0.bias, 1.weight, ... 6 more)" in message
    assert "\n" not in message


def test_num_classes_mismatch_names_the_head(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet18_cifar().state_dict(), path)
    with pytest.raises(
        ModelLoadError, match=r"fc\.weight \(10, 512\) vs \(5, 512\).*--num-classes"
    ):
        load_model(path, arch="torchvision:resnet18", num_classes=5)


def test_unknown_torchvision_model_suggests_names(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(ModelLoadError, match="no model named 'resnet19'; did you mean resnet18"):
        load_model(path, arch="torchvision:resnet19")
    with pytest.raises(ModelLoadError, match="did you mean torchvision:resnet18"):
        load_model(path, arch="resnet18")


def test_missing_factory_module(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"cannot import 'no_such_pkg_xyz\.nets'.*PYTHONPATH"):
        load_model(path, arch="no_such_pkg_xyz.nets:make")


# ---------------------------------------------------------------------------------------------
# Files robaudit will not unpickle


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_net(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, arch="torchvision:resnet18")
    message = str(info.value)
    assert "is a pickled torch.nn.Module (torch.nn.modules.container.Sequential)" in message
    assert "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2')" in message
    assert "model.state_dict()" in message


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_does_not_run(tmp_path: Path, writer: str) -> None:
    marker, path = tmp_path / "marker", tmp_path / "model.pt"
    payload = {"weight": torch.zeros(2), "evil": WritesMarker(marker)}
    with path.open("wb") as f:
        if writer == "torch.save":
            torch.save(payload, f)
        else:
            pickle.dump(payload, f)
    with pytest.raises(ModelLoadError, match="will not unpickle"):
        load_model(path, arch="torchvision:resnet18")
    with pytest.raises(ModelLoadError, match="will not unpickle"):
        load_model(path)
    assert not marker.exists()


def test_checkpoint_with_python_objects_names_them(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": tiny_net().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ModelLoadError, match=r"pickled Python objects \(argparse.Namespace\)"):
        load_model(path, arch="torchvision:resnet18")


@pytest.mark.parametrize("device", ["no-such-device", "cuda:99"])
def test_unavailable_device_is_a_config_error(tmp_path: Path, device: str) -> None:
    path = export(tiny_net(), tmp_path / "model.pt2", dynamic_batch=True)
    with pytest.raises(ConfigError, match=f"cannot put the model on device '{device}'"):
        load_model(path, device=device)


# ---------------------------------------------------------------------------------------------
# Files that are not models


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist; check the path"):
        load_model(tmp_path / "nope.onnx")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.touch()
    with pytest.raises(ModelLoadError, match=r"is empty \(0 bytes\)"):
        load_model(path)


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(ModelLoadError, match="not a model file robaudit can read"):
        load_model(path)


def test_zip_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="zip file but not a model archive"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# ONNX (the converter itself is tested in tests/test_onnx.py)

HAS_ONNX_LOADER = importlib.util.find_spec("robaudit.models.onnx") is not None


@pytest.mark.skipif(not HAS_ONNX_LOADER, reason="robaudit.models.onnx is not written yet")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the quick TorchScript-based exporter
def test_onnx_loads_with_runtime_and_normalisation(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        net,
        (pixels(2),),
        str(path),
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
    loaded: LoadedModel = load_model(path, mean=MEAN, std=STD)
    assert loaded.format == "onnx"
    assert loaded.description.startswith("model.onnx (ONNX opset ")
    assert "onnxruntime" in loaded.description
    assert not loaded.module.training
    x = pixels(3)
    expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(loaded.module(x), expected, rtol=1e-4, atol=1e-5)
    assert loaded.runtime is not None
    torch.testing.assert_close(loaded.runtime(x), expected, rtol=1e-4, atol=1e-5)
    diff = verify_runtime(loaded, x)
    assert diff is not None and 0 <= diff < 1e-4
    # A converted module that drifted from the file must be caught.
    with torch.no_grad():
        next(loaded.module.parameters()).add_(1.0)
    with pytest.raises(ModelLoadError, match="differs from onnxruntime"):
        verify_runtime(loaded, x)
    # Detection reads the content, so a renamed file is still ONNX.
    renamed = path.rename(tmp_path / "model.bin")
    assert detect_format(renamed) == "onnx"
