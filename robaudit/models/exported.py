"""torch.export archives (.pt2) as modules that accept any batch size.

Archives are checked before ``torch.export.load`` so that its internal pickle fallbacks never see
anything but plain tensors, and AOTInductor packages (compiled native code) are refused.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from robaudit.errors import DataError, ModelLoadError, first_line


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
            f"{first_line(exc)}); re-export it with torch {torch.__version__}"
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


def _load_weights_only(data: bytes, where: str) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{where} holds pickled Python objects that robaudit will not unpickle because that "
            "can run code; export a model whose weights and inputs are plain tensors"
        ) from exc


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
