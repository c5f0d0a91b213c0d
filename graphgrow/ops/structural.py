"""Ops that route or reshape: flatten, add (any number of inputs), concat."""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..errors import GraphgrowError
from .base import Arg, OpDef, Shape, integer, numel, register_op, require


def sample_axis(dim: int, rank: int, op: str) -> int:
    """The per-sample axis of a torch dimension ``dim`` (counted with the batch dimension,
    negative from the end) on inputs of per-sample rank ``rank``."""
    axis = dim - 1 if dim > 0 else rank + dim
    if dim == 0 or not 0 <= axis < rank:
        raise GraphgrowError(f"{op} dim {dim} is out of range for inputs of rank {rank} (plus the batch "
                             "dimension, dim 0, which no op may touch)", hint="dim 1 is the first per-sample dimension")
    return axis


class FlattenOp(OpDef):
    name = "flatten"
    doc = ("Flattens dims start..end into one (torch dims, counted with the batch dimension); "
           "the default flattens all per-sample dimensions, (C, H, W) -> (C*H*W,).")
    args = (Arg("start", integer, 1), Arg("end", integer, -1))
    # channel c becomes the block of features c*H*W ... (c+1)*H*W - 1 (with the default dims)
    passes_units_through = True
    maps_zero_to_zero = keeps_range = True

    def _axes(self, args, shape):
        first, last = (sample_axis(args[k], len(shape), "flatten") for k in ("start", "end"))
        if first > last:
            raise GraphgrowError(f"flatten start {args['start']} comes after end {args['end']}")
        return first, last

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        first, last = self._axes(args, shape)
        return shape[:first] + (numel(shape[first:last + 1]),) + shape[last + 1:]

    imports_modules = (nn.Flatten,)
    imports_functions = (torch.flatten,)

    def args_from_module(self, module):
        return {"start": module.start_dim, "end": module.end_dim}

    def args_from_call(self, args, kwargs):
        given = {**dict(zip(("start_dim", "end_dim"), args)), **kwargs}
        require(given.get("start_dim", 0) != 0, "flatten of the batch dimension (use start_dim=1)")
        return {"start": given["start_dim"], "end": given.get("end_dim", -1)}

    def function(self, args):
        return torch.flatten, {"start_dim": args["start"], "end_dim": args["end"]}

    def torch_module(self, args):
        return nn.Flatten(args["start"], args["end"])


class AddOp(OpDef):
    name = "add"
    doc = "Sum of two or more inputs of equal shape."
    min_inputs, max_inputs = 2, None
    ties_units = True
    imports_functions = (operator.add, torch.add)

    def args_from_call(self, args, kwargs):
        require(not kwargs and not args, "add with alpha or of a non-tensor")
        return {}

    def output_shape(self, args, in_shapes):
        for shape in in_shapes[1:]:
            if shape != in_shapes[0]:
                raise GraphgrowError(f"add needs equal shapes, got {list(in_shapes[0])} and {list(shape)}",
                                     hint="insert a linear or conv2d to match widths")
        return in_shapes[0]

    def flops(self, args, in_shapes, out_shape):
        return (len(in_shapes) - 1) * numel(out_shape)

    def emit(self, graph, name, args, inputs, as_module):
        total = inputs[0]
        for position, term in enumerate(inputs[1:], start=1):
            last = position == len(inputs) - 1
            total = graph.create_node("call_function", operator.add, (total, term), {},
                                      name=name if last else f"{name}_partial{position}")
        return total


def broadcast_shape(shapes: list[Shape], op: str) -> Shape:
    """The per-sample shape of an elementwise op on inputs that broadcast (torch's rule: align
    the trailing dimensions; a dimension of 1 stretches)."""
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise GraphgrowError(f"{op} needs shapes that broadcast, got {' and '.join(str(list(s)) for s in shapes)}",
                             hint="a dimension must agree or be 1 (e.g. gates of shape (C, 1, 1) on (C, H, W))") from None


class MultiplyOp(OpDef):
    name = "multiply"
    doc = ("Elementwise product of two inputs whose shapes broadcast (squeeze-excitation gates, "
           "layer scale with a parameter node).")
    min_inputs = max_inputs = 2
    maps_zero_to_zero = True  # zero where either input is
    imports_functions = (operator.mul, torch.mul)

    def args_from_call(self, args, kwargs):
        require(not args and not kwargs, "multiplication of a tensor by a number is op 'scale'")
        return {}

    def output_shape(self, args, in_shapes):
        return broadcast_shape(in_shapes, "multiply")

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape)

    def function(self, args):
        return torch.mul, {}


class ConcatOp(OpDef):
    name = "concat"
    doc = "Concatenation of one or more inputs along dim (counted with the batch dimension: 1 = features/channels)."
    args = (Arg("dim", integer, 1),)
    min_inputs, max_inputs = 1, None

    imports_functions = (torch.cat,)

    def args_from_call(self, args, kwargs):
        return {"dim": kwargs.get("dim", args[0] if args else 0)}

    def output_shape(self, args, in_shapes):
        first = in_shapes[0]
        axis = sample_axis(args["dim"], len(first), "concat")
        for shape in in_shapes[1:]:
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != axis):
                raise GraphgrowError(f"concat along dim {args['dim']} needs matching other dimensions, "
                                     f"got {list(first)} and {list(shape)}")
        return first[:axis] + (sum(s[axis] for s in in_shapes),) + first[axis + 1:]

    def input_unit_offsets(self, args, in_shapes):
        if sample_axis(args["dim"], len(in_shapes[0]), "concat") != 0:
            return None
        starts = [0]
        for shape in in_shapes[:-1]:
            starts.append(starts[-1] + shape[0])
        return starts

    def emit(self, graph, name, args, inputs, as_module):
        return graph.create_node("call_function", torch.cat, (list(inputs),), {"dim": args["dim"]}, name=name)


for _op in (FlattenOp, AddOp, MultiplyOp, ConcatOp):
    register_op(_op)
