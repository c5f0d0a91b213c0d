"""Transformer ops: named free parameters (class token, position embedding, layer scale),
expand_batch, multi-head self-attention (nn.MultiheadAttention) and its functional form
(F.scaled_dot_product_attention).

A ``parameter`` node has no input; its value is a batch of one, (1, *shape), so ``add`` and
``multiply`` broadcast it over the batch; ``expand_batch`` repeats it (without a copy) to the
batch of another input, as ``concat`` needs for a class token.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, boolean, number, numel, positive_int, probability, register_op, require
from .shape import int_list


class FreeParameter(nn.Module):
    """A trainable tensor used directly (class token, position embedding, layer scale);
    forward gives it as a batch of one."""

    def __init__(self, shape: list[int]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.weight.unsqueeze(0)


def _positive_shape(value):
    shape = int_list(value)
    if not all(n >= 1 for n in shape):
        raise GraphgrowError(f"expected a shape of positive sizes, got {shape}")
    return shape


class ParameterOp(OpDef):
    name = "parameter"
    doc = ("A named trainable tensor of the given per-sample shape, used directly (class token, "
           "position embedding, layer scale); zeros unless init says otherwise. No input.")
    args = (Arg("shape", _positive_shape, doc="per-sample shape, e.g. shape: [1, 64] for a class token"),)
    min_inputs = max_inputs = 0
    roles = {"weight": "the tensor, of the given shape"}

    def output_shape(self, args, in_shapes):
        return tuple(args["shape"])

    def param_shapes(self, args, in_shapes):
        return {"weight": tuple(args["shape"])}

    def build_module(self, args, in_shapes):
        return FreeParameter(args["shape"])


def expand_to_batch(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` (a batch of one) repeated to the batch size of ``like``, as a view."""
    return x.expand([like.shape[0]] + list(x.shape[1:]))


class ExpandBatchOp(OpDef):
    name = "expand_batch"
    maps_zero_to_zero = True
    doc = "Its first input (a batch of one, e.g. a parameter) repeated to the batch size of its second."
    min_inputs = max_inputs = 2

    def function(self, args):
        return expand_to_batch, {}


class AttentionOp(OpDef):
    name = "attention"
    doc = ("Multi-head self-attention on tokens (N, D), as nn.MultiheadAttention(D, heads, "
           "batch_first=True) called with the same input as query, key and value.")
    args = (Arg("heads", positive_int, doc="number of heads; divides the token width"),
            Arg("bias", boolean, True), Arg("dropout", probability, 0.0, doc="on the attention weights"))
    roles = {"in_proj_weight": "query, key and value projections stacked, (3D, D)",
             "in_proj_bias": "(3D,)", "out_proj.weight": "(D, D)", "out_proj.bias": "(D,)"}
    tuple_output = 0

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        if len(shape) != 2 or shape[1] % args["heads"]:
            raise GraphgrowError(f"attention needs tokens (N, D) with D divisible by heads {args['heads']}, "
                                 f"got {list(shape)}", hint="reshape images to tokens, e.g. flatten(start: 2) "
                                                            "and transpose(dim0: 1, dim1: 2)")
        return shape

    def param_shapes(self, args, in_shapes):
        width = in_shapes[0][1]
        shapes = {"in_proj_weight": (3 * width, width), "out_proj.weight": (width, width)}
        if args["bias"]:
            shapes.update({"in_proj_bias": (3 * width,), "out_proj.bias": (width,)})
        return shapes

    def flops(self, args, in_shapes, out_shape):
        """Projections (3 in, 1 out) and the two products with the N x N weights, as multiply-
        adds; the biases, the 1/sqrt(d) scaling and a softmax of 5 per weight."""
        tokens, width = in_shapes[0]
        matmuls = 2 * tokens * width * 4 * width + 2 * 2 * tokens * tokens * width
        bias = 4 * tokens * width if args["bias"] else 0
        return matmuls + bias + tokens * width + 5 * args["heads"] * tokens * tokens

    def build_module(self, args, in_shapes):
        return nn.MultiheadAttention(in_shapes[0][1], args["heads"], dropout=args["dropout"], bias=args["bias"],
                                     batch_first=True)

    def emit(self, graph, name, args, inputs, as_module):
        x = inputs[0]
        both = graph.create_node("call_module", name, (x, x, x), {"need_weights": False}, name=f"{name}_and_weights")
        return graph.create_node("call_function", operator.getitem, (both, 0), {}, name=name)

    def zero_output_roles(self, args, in_shapes):
        # the output projection only: the values stay non-zero, so its gradient does too
        return ("out_proj.weight", "out_proj.bias") if args["bias"] else ("out_proj.weight",)

    imports_modules = (nn.MultiheadAttention,)

    def args_from_module(self, module):
        require(module.batch_first, "nn.MultiheadAttention without batch_first=True")
        require(module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn,
                "attention with separate key/value widths, bias_k/bias_v or add_zero_attn")
        return {"heads": module.num_heads, "bias": module.in_proj_bias is not None, "dropout": module.dropout}

    def inputs_from_call(self, inputs, kwargs):
        """Self-attention only (one input as query, key and value), without masks."""
        require(len(inputs) == 3 and len(set(inputs)) == 1, "attention with different query, key and value")
        require(all(kwargs.get(k) is None for k in ("key_padding_mask", "attn_mask")) and not kwargs.get("is_causal"),
                "attention masks")
        return inputs[:1]


def _optional_number(value):
    return None if value is None else number(value)


class ScaledDotProductAttentionOp(OpDef):
    name = "scaled_dot_product_attention"
    doc = ("softmax(q k^T * scale) v on inputs q (..., N, d), k (..., M, d), v (..., M, dv), as "
           "F.scaled_dot_product_attention: the functional form of attention (heads as a leading "
           "dimension); scale defaults to 1/sqrt(d).")
    args = (Arg("causal", boolean, False, doc="mask the keys after each query"),
            Arg("scale", _optional_number, None))
    min_inputs = max_inputs = 3
    imports_functions = (F.scaled_dot_product_attention,)

    def output_shape(self, args, in_shapes):
        q, k, v = in_shapes
        if (len(q) < 2 or not len(q) == len(k) == len(v) or q[:-2] != k[:-2] or k[:-2] != v[:-2]
                or q[-1] != k[-1] or k[-2] != v[-2]):
            raise GraphgrowError(f"attention needs q (..., N, d), k (..., M, d), v (..., M, dv), got "
                                 f"{', '.join(str(list(s)) for s in in_shapes)}")
        return q[:-1] + (v[-1],)

    def flops(self, args, in_shapes, out_shape):
        """The two products with the N x M weights as multiply-adds, the scaling and a softmax of
        5 per weight."""
        q, k, v = in_shapes
        weights = numel(q[:-1]) * k[-2]
        return 2 * weights * q[-1] + 2 * weights * v[-1] + weights + 5 * weights

    def args_from_call(self, args, kwargs):
        given = {**dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args)), **kwargs}
        require(given.get("attn_mask") is None and not given.get("dropout_p") and not given.get("enable_gqa"),
                "attention with a mask, dropout or grouped queries")
        return {"causal": bool(given.get("is_causal", False)), "scale": given.get("scale")}

    def function(self, args):
        return F.scaled_dot_product_attention, {"is_causal": args["causal"], "scale": args["scale"]}


for _op in (ParameterOp, ExpandBatchOp, AttentionOp, ScaledDotProductAttentionOp):
    register_op(_op)
