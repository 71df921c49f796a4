"""torch.export archives (.pt2) as modules that accept any batch size.

Archives are checked and loaded by ``exported_archive``, which keeps torch's pickle fallbacks
from ever seeing anything but plain tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robaudit.errors import DataError, ModelLoadError
from robaudit.models.exported_archive import check_archive, load_program


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
    check_archive(path)
    program = load_program(path)
    _reject_training_mode(program, path)
    input_shape = _exported_input_shape(program, path)
    # check_guards=False: the guards are Python source stored in the archive, which module()
    # would exec; the input shape is checked by ExportedModule instead.
    module = ExportedModule(program.module(check_guards=False), input_shape)
    batch = module.static_batch
    detail = "dynamic batch" if batch is None else f"static batch {batch}, chunked"
    return module, detail


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
