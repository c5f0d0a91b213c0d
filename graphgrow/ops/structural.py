"""Ops that route or reshape: flatten, add (any number of inputs), concat."""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..errors import GraphgrowError
from .base import Arg, OpDef, integer, numel, register_op, require


class FlattenOp(OpDef):
    name = "flatten"
    doc = "Flattens all per-sample dimensions into one (C, H, W) -> (C*H*W,)."
    passes_units_through = True  # channel c becomes the block of features c*H*W ... (c+1)*H*W - 1

    def output_shape(self, args, in_shapes):
        return (numel(in_shapes[0]),)

    imports_modules = (nn.Flatten,)
    imports_functions = (torch.flatten,)

    def args_from_module(self, module):
        require(module.start_dim == 1 and module.end_dim == -1, "flatten of other than all per-sample dims")
        return {}

    def args_from_call(self, args, kwargs):
        given = {**dict(zip(("start_dim", "end_dim"), args)), **kwargs}
        require(given.get("start_dim", 0) == 1 and given.get("end_dim", -1) == -1,
                "flatten of other than all per-sample dims (use start_dim=1)")
        return {}

    def function(self, args):
        return torch.flatten, {"start_dim": 1}

    def torch_module(self, args):
        return nn.Flatten()


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


class ConcatOp(OpDef):
    name = "concat"
    doc = "Concatenation of two or more inputs along dim (counted with the batch dimension: 1 = features/channels)."
    args = (Arg("dim", integer, 1),)
    min_inputs, max_inputs = 2, None

    imports_functions = (torch.cat,)

    def args_from_call(self, args, kwargs):
        return {"dim": kwargs.get("dim", args[0] if args else 0)}

    @staticmethod
    def sample_axis(dim: int, rank: int) -> int:
        axis = dim - 1 if dim > 0 else rank + dim
        if not 0 <= axis < rank:
            raise GraphgrowError(f"concat dim {dim} is out of range for inputs of rank {rank} "
                                 "(plus the batch dimension)", hint="dim: 1 concatenates features/channels")
        return axis

    def output_shape(self, args, in_shapes):
        first = in_shapes[0]
        axis = self.sample_axis(args["dim"], len(first))
        for shape in in_shapes[1:]:
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != axis):
                raise GraphgrowError(f"concat along dim {args['dim']} needs matching other dimensions, "
                                     f"got {list(first)} and {list(shape)}")
        return first[:axis] + (sum(s[axis] for s in in_shapes),) + first[axis + 1:]

    def input_unit_offsets(self, args, in_shapes):
        if self.sample_axis(args["dim"], len(in_shapes[0])) != 0:
            return None
        starts = [0]
        for shape in in_shapes[:-1]:
            starts.append(starts[-1] + shape[0])
        return starts

    def emit(self, graph, name, args, inputs, as_module):
        return graph.create_node("call_function", torch.cat, (list(inputs),), {"dim": args["dim"]}, name=name)


for _op in (FlattenOp, AddOp, ConcatOp):
    register_op(_op)
