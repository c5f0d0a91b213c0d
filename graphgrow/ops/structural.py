"""Ops that route or reshape: flatten, add (any number of inputs), concat."""
from __future__ import annotations

import operator

import torch

from ..errors import GraphgrowError
from .base import Arg, OpDef, integer, numel, register_op


class FlattenOp(OpDef):
    name = "flatten"
    doc = "Flattens all per-sample dimensions into one (C, H, W) -> (C*H*W,)."

    def output_shape(self, args, in_shapes):
        return (numel(in_shapes[0]),)

    def function(self, args):
        return torch.flatten, {"start_dim": 1}


class AddOp(OpDef):
    name = "add"
    doc = "Sum of two or more inputs of equal shape."
    min_inputs, max_inputs = 2, None

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

    def emit(self, graph, name, args, inputs, as_module):
        return graph.create_node("call_function", torch.cat, (list(inputs),), {"dim": args["dim"]}, name=name)


for _op in (FlattenOp, AddOp, ConcatOp):
    register_op(_op)
