"""Ops that rearrange or reduce per-sample dimensions: reshape, permute, transpose, select,
narrow, mean. No parameters.

Dimensions are counted as torch counts them, with the batch dimension as dim 0 (negative dims
from the end); no op may touch the batch dimension. ``reshape`` takes the per-sample target shape
(one entry may be -1, inferred from the input). The importer derives every argument from the
shapes it observes, so a spec never holds Python (``x.shape``, ``view(b, -1)``).
"""
from __future__ import annotations

import operator
from typing import Any, List

import torch

from ..errors import GraphgrowError
from .base import Arg, OpDef, boolean, integer, non_negative_int, numel, positive_int, register_op, require
from .structural import sample_axis


def int_list(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise GraphgrowError(f"expected a list of integers, got {value!r}")
    return list(value)


def reshape_samples(x: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """``x`` reshaped to (batch, *shape): the batch dimension stays as it is."""
    return x.reshape([x.shape[0]] + shape)


def _torch_dims(args: tuple, kwargs: dict, name: str) -> list[int]:
    """The dims of a traced call given as varargs (x.permute(0, 2, 1)) or one sequence."""
    dims = kwargs.get(name, args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args)
    return [dims] if isinstance(dims, int) else list(dims)


class ShapeOp(OpDef):
    maps_zero_to_zero = keeps_range = True
    widen_refusal = "it moves entries between dimensions, so units do not stay on one axis"


class ReshapeOp(ShapeOp):
    name = "reshape"
    doc = "Reshape to (batch, *shape); shape is per-sample, one entry may be -1 (inferred)."
    args = (Arg("shape", int_list, doc="per-sample target shape, e.g. shape: [16, -1]"),)
    imports_functions = (torch.reshape, torch.unsqueeze)
    imports_methods = ("reshape", "view", "unsqueeze")

    def output_shape(self, args, in_shapes):
        shape, total = args["shape"], numel(in_shapes[0])
        unknown = [i for i, n in enumerate(shape) if n == -1]
        known = numel([n for n in shape if n != -1])
        if len(unknown) > 1 or any(n < 1 and n != -1 for n in shape) or (
                total % known if unknown else total != known):
            raise GraphgrowError(f"cannot reshape {list(in_shapes[0])} ({total} entries) to {shape}",
                                 hint="the entries must multiply to the input's; at most one -1")
        return tuple(total // known if n == -1 else n for n in shape)

    def args_from_traced(self, args, kwargs, in_shapes, out_shape):
        return {"shape": list(out_shape)}

    def function(self, args):
        return reshape_samples, {"shape": args["shape"]}


class PermuteOp(ShapeOp):
    name = "permute"
    doc = "Reorders dimensions (torch dims with the batch dimension first: dims[0] must be 0)."
    args = (Arg("dims", int_list, doc="a permutation of all dims, batch first, e.g. dims: [0, 2, 3, 1]"),)
    imports_functions = (torch.permute,)
    imports_methods = ("permute",)

    def output_shape(self, args, in_shapes):
        rank = len(in_shapes[0]) + 1
        dims = [d % rank for d in args["dims"]]
        if sorted(dims) != list(range(rank)) or dims[0] != 0:
            raise GraphgrowError(f"permute dims {args['dims']} are not a permutation of the {rank} dims "
                                 "that keeps the batch dimension first", hint="dims start with 0")
        return tuple(in_shapes[0][d - 1] for d in dims[1:])

    def args_from_call(self, args, kwargs):
        return {"dims": _torch_dims(args, kwargs, "dims")}

    def function(self, args):
        return torch.permute, {"dims": args["dims"]}


class TransposeOp(ShapeOp):
    name = "transpose"
    doc = "Swaps two dimensions (torch dims; neither may be the batch dimension 0)."
    args = (Arg("dim0", integer), Arg("dim1", integer))
    imports_functions = (torch.transpose,)
    imports_methods = ("transpose",)

    def output_shape(self, args, in_shapes):
        shape = list(in_shapes[0])
        a, b = (sample_axis(args[k], len(shape), "transpose") for k in ("dim0", "dim1"))
        shape[a], shape[b] = shape[b], shape[a]
        return tuple(shape)

    def args_from_call(self, args, kwargs):
        given = {**dict(zip(("dim0", "dim1"), args)), **kwargs}
        return {"dim0": given["dim0"], "dim1": given["dim1"]}

    def function(self, args):
        return torch.transpose, {"dim0": args["dim0"], "dim1": args["dim1"]}


def _slices(index) -> tuple[int, Any] | None:
    """(dim, item) of an index ``x[:, ..., item]`` that only restricts one dimension."""
    index = index if isinstance(index, tuple) else (index,)
    full = lambda s: isinstance(s, slice) and s == slice(None)
    restricted = [(dim, item) for dim, item in enumerate(index) if not full(item)]
    require(len(restricted) == 1 and restricted[0][0] > 0 and Ellipsis not in index,
            "indexing other than x[:, ..., item] on one per-sample dimension")
    return restricted[0]


class SelectOp(ShapeOp):
    name = "select"
    doc = "x[:, ..., index]: one entry of a dimension, which goes away (e.g. the class token)."
    args = (Arg("dim", integer), Arg("index", integer))
    imports_functions = (operator.getitem, torch.select)
    imports_methods = ("select",)

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        axis = sample_axis(args["dim"], len(shape), "select")
        if not -shape[axis] <= args["index"] < shape[axis]:
            raise GraphgrowError(f"select index {args['index']} is out of range for size {shape[axis]}")
        return shape[:axis] + shape[axis + 1:]

    def args_from_call(self, args, kwargs):
        if len(args) == 1:  # x[index]
            dim, index = _slices(args[0])
        else:
            dim, index = {**dict(zip(("dim", "index"), args)), **kwargs}.values()
        require(isinstance(index, int) and not isinstance(index, bool), "indexing with other than one integer")
        return {"dim": dim, "index": index}

    def function(self, args):
        return torch.select, {"dim": args["dim"], "index": args["index"]}


class NarrowOp(ShapeOp):
    name = "narrow"
    doc = "Entries start .. start + length - 1 of one dimension (chunk and split pieces, x[:, a:b])."
    args = (Arg("dim", integer), Arg("start", non_negative_int), Arg("length", positive_int))
    imports_functions = (operator.getitem, torch.narrow)
    imports_methods = ("narrow",)

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        axis = sample_axis(args["dim"], len(shape), "narrow")
        if args["start"] + args["length"] > shape[axis]:
            raise GraphgrowError(f"narrow {args['start']}..{args['start'] + args['length'] - 1} is out of "
                                 f"range for size {shape[axis]}")
        return shape[:axis] + (args["length"],) + shape[axis + 1:]

    def args_from_traced(self, args, kwargs, in_shapes, out_shape):
        if len(args) == 1:  # x[:, a:b]
            dim, item = _slices(args[0])
            require(isinstance(item, slice) and item.step in (None, 1), "a slice with a step")
            size = in_shapes[0][dim - 1]
            start = range(size)[item][0] if out_shape[dim - 1] else 0
            return {"dim": dim, "start": start, "length": out_shape[dim - 1]}
        given = {**dict(zip(("dim", "start", "length"), args)), **kwargs}
        return {"dim": given["dim"], "start": given["start"], "length": given["length"]}

    def function(self, args):
        return torch.narrow, {"dim": args["dim"], "start": args["start"], "length": args["length"]}


class MeanOp(ShapeOp):
    name = "mean"
    doc = "Mean over dims (torch dims, not the batch dimension), optionally keeping them as size 1."
    args = (Arg("dims", int_list, doc="e.g. dims: [2, 3] averages an image over its positions"),
            Arg("keepdim", boolean, False))
    imports_functions = (torch.mean,)
    imports_methods = ("mean",)

    def _axes(self, args, shape):
        axes = sorted({sample_axis(d, len(shape), "mean") for d in args["dims"]})
        if not axes:
            raise GraphgrowError("mean needs at least one dim")
        return axes

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        axes = self._axes(args, shape)
        if args["keepdim"]:
            return tuple(1 if i in axes else n for i, n in enumerate(shape))
        return tuple(n for i, n in enumerate(shape) if i not in axes)

    def flops(self, args, in_shapes, out_shape):
        return numel(in_shapes[0])

    def args_from_call(self, args, kwargs):
        given = {**dict(zip(("dim", "keepdim"), args)), **kwargs}
        require("dim" in given and given["dim"] is not None and "dtype" not in given, "a mean over all dims or with a dtype")
        return {"dims": _torch_dims((given["dim"],), {}, "dim"), "keepdim": bool(given.get("keepdim", False))}

    def function(self, args):
        return torch.mean, {"dim": args["dims"], "keepdim": args["keepdim"]}


for _op in (ReshapeOp, PermuteOp, TransposeOp, SelectOp, NarrowOp, MeanOp):
    register_op(_op)
