"""Export compiled networks to TorchScript (``torch.jit.script``) and ``torch.export`` (.pt2)."""
from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from pathlib import Path

import torch
from torch import fx

from ..errors import GraphgrowError
from .io import ensure_directory
from .tracing import random_input
from ..ir import LayerGraph

FORMATS = ("export", "torchscript")
SUFFIX = {"export": ".pt2", "torchscript": ".pt"}
# Nodes an exporter is asked to handle at most. Measured on a chain of relu nodes (2 loaded CPU
# cores, torch 2.13): torch.export takes ~40 s for 1,000 nodes and ~75 s for 3,000, and minutes
# beyond; torch.jit.script takes ~40 s for 10,000 nodes, ~230 s for 20,000, and at 50,000 ran
# past 400 s here and crashed the interpreter (SIGSEGV) in the report of issue 12. A deeper
# network is refused before the exporter starts; save() writes YAML + weights at any depth.
MAX_EXPORT_NODES = {"export": 10_000, "torchscript": 10_000}


def example_input(graph: LayerGraph, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    """A deterministic probe batch of the network's input shape (int64 token ids for a token
    model: its artifacts take token ids as int64)."""
    return random_input(graph.input_shape, batch, dtype, graph.input_tokens)


@contextlib.contextmanager
def _torchscript_deprecation_silenced():
    """torch.jit is deprecated in favour of torch.export (torch 2.13); its warnings say nothing
    about the module at hand, so they are silenced here, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Artifacts are for inference (dropout off, batchnorm statistics frozen); the caller's
    module keeps its own mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def to_torchscript(module: fx.GraphModule) -> torch.jit.ScriptModule:
    """Script a compiled module (in eval mode)."""
    with _torchscript_deprecation_silenced(), _eval_mode(module):
        return torch.jit.script(module).eval()


def to_exported_program(module: fx.GraphModule, graph: LayerGraph) -> torch.export.ExportedProgram:
    """``torch.export`` (eval mode) with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    probe = example_input(graph, dtype=next(module.parameters(), torch.empty(0)).dtype)
    with _eval_mode(module):
        return torch.export.export(module, (probe,), dynamic_shapes=({0: batch},))


def check_target(path: str | Path, fmt: str) -> Path:
    """The format is known, the file name ends in its suffix and its folder exists or can be
    made (a parent that is a file, or no permission, is an error before anything is written)."""
    if fmt not in FORMATS:
        raise GraphgrowError(f"unknown export format '{fmt}'", option="format", hint=f"use one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix != SUFFIX[fmt]:
        raise GraphgrowError(f"the {fmt} format writes {SUFFIX[fmt]} files, not '{path.suffix or path.name}'",
                             file=str(path), option="output",
                             hint=f"name it {path.with_suffix(SUFFIX[fmt]).name}, or choose the format that fits")
    if path.is_dir():
        raise GraphgrowError("the output path is a directory", file=str(path), option="output")
    ensure_directory(path.parent, option="output", what="output folder")
    return path


def check_exportable(graph: LayerGraph, fmt: str) -> None:
    """Refuse networks the exporter cannot handle in reasonable time and memory (see
    MAX_EXPORT_NODES), before it starts."""
    limit = MAX_EXPORT_NODES[fmt]
    if len(graph) > limit:
        raise GraphgrowError(f"{len(graph):,} nodes are more than {fmt} export handles ({limit:,})",
                             file=graph.source, option="format",
                             hint="export a shallower network; save(network, path) writes YAML + weights at any depth")


def on_cpu(module: fx.GraphModule, graph: LayerGraph) -> fx.GraphModule:
    """``module`` itself when it lives on the CPU, else a copy there (artifacts are CPU artifacts:
    they load anywhere; the caller's module stays on its device)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is None or tensor.device.type == "cpu":
        return module
    if tensor.device.type == "meta":
        raise GraphgrowError(f"network '{graph.name}' lives on the meta device: it has shapes but no values "
                             "to export", file=graph.source,
                             hint="load weights on a real device first (Network.build(graph, state, device=...))")
    return copy.deepcopy(module).cpu()


def export(module: fx.GraphModule, graph: LayerGraph, path: str | Path, fmt: str = "export") -> Path:
    """Write ``module`` to ``path`` in format ``export`` (.pt2) or ``torchscript`` (.pt). The
    artifact runs on the CPU whatever the module's device (a copy is exported from there)."""
    path = check_target(path, fmt)
    check_exportable(graph, fmt)
    module = on_cpu(module, graph)
    if fmt == "torchscript":
        to_torchscript(module).save(str(path))
    else:
        torch.export.save(to_exported_program(module, graph), str(path))
    return path


def load_exported(path: str | Path):
    """Load an exported artifact as a callable module (format from the file contents)."""
    path = Path(path)
    if not path.exists():
        raise GraphgrowError("exported model not found", file=str(path))
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    with _torchscript_deprecation_silenced():
        return torch.jit.load(str(path))
