"""Tracing for the importer: an fx tracer that keeps op-claimed modules whole and records the
user's source line of every call, the ops that claim a traced call, and what every traced node
computes on a probe batch (tensor shapes; the values of shape arithmetic)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import GraphgrowError
from ..ops.base import OpDef, registered_ops

TORCH_DIR = str(Path(torch.__file__).parent)
#: the batch size of the probe batch: a leading dimension of this size is the batch
PROBE_BATCH = 2


class Tracer(fx.Tracer):
    """Keeps modules that an op imports whole (graphgrow's Residual, a user's registered
    module types) like torch.nn's modules, and records where each call was written (fx's own
    ``record_stack_traces`` would import torch's compiler stack, seconds per process)."""

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        node.meta["user_frame"] = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else (None, None)
        return node

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        claimed = any(type(module) in op.imports_modules for op in registered_ops().values())
        return claimed or super().is_leaf_module(module, qualified_name)


def claimants(fx_node: fx.Node, module: nn.Module | None) -> list[OpDef]:
    """The ops that claim a traced call, the latest registered first (a user's op wins)."""
    ops = list(registered_ops().values())[::-1]
    if module is not None:
        return [op for op in ops if type(module) in op.imports_modules]
    if fx_node.op == "call_method":
        return [op for op in ops if fx_node.target in op.imports_methods]
    return [op for op in ops if any(fx_node.target is fn for fn in op.imports_functions)]


def module_path(fx_node: fx.Node) -> str:
    """The dotted path of the module whose forward made this call ('' for the top module)."""
    if fx_node.op == "call_module":
        return str(fx_node.target)
    stack = fx_node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def random_input(input_shape, batch: int, dtype: torch.dtype, tokens: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """A deterministic batch: standard normal values of ``dtype``, or for a token model
    (``tokens``: the vocabulary size) integer token ids below ``tokens`` (int64)."""
    generator = torch.Generator().manual_seed(seed)
    if tokens is not None:
        return torch.randint(0, tokens, (batch, *input_shape), generator=generator)
    return torch.randn((batch, *input_shape), generator=generator, dtype=dtype)


def observe(traced: fx.GraphModule, module: nn.Module, input_shape, tokens: int | None = None) -> dict[fx.Node, Any]:
    """What every traced node computes on a probe batch (eval mode, no gradients): shapes for
    tensors (and tuples of them), the values of other things (shape arithmetic)."""
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    probe = random_input(input_shape, PROBE_BATCH, dtype, tokens)
    seen: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            seen[n] = shapes_of(value)
            return value

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            Recorder(traced).run(probe)
    except Exception as err:  # whatever the user's code raises on the probe batch
        raise GraphgrowError(f"the module fails on a probe batch of shape {list(probe.shape)}: "
                             f"{type(err).__name__}: {err}", hint="is input_shape the per-sample shape?") from None
    finally:
        module.train(was_training)
    return seen


class TracedShape(tuple):
    """The shape of a tensor a traced node computed (batch dimension first)."""


def shapes_of(value):
    if isinstance(value, torch.Tensor):
        return TracedShape(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(shapes_of(v) for v in value)
    return value



def evaluated(arg, seen):
    """A call argument with traced non-tensor values (x.size(0), h * w) replaced by their values."""
    return fx.node.map_arg(arg, lambda n: n if is_tensor_value(seen.get(n)) else seen.get(n))


def tensor_args(args) -> tuple[list[fx.Node], tuple]:
    """Tensor inputs (fx nodes, also inside a list as for torch.cat) and the other arguments."""
    tensors, others = [], []
    for arg in args:
        if isinstance(arg, fx.Node):
            tensors.append(arg)
        elif isinstance(arg, (list, tuple)) and arg and all(isinstance(a, fx.Node) for a in arg):
            tensors.extend(arg)
        else:
            others.append(arg)
    return tensors, tuple(others)


def is_tensor_value(value) -> bool:
    return isinstance(value, TracedShape) or (isinstance(value, tuple) and any(isinstance(v, TracedShape) for v in value))
