"""Transformer ops: named free parameters (class token, position embedding, layer scale),
expand_batch, multi-head self-attention (nn.MultiheadAttention) and its functional form
(F.scaled_dot_product_attention).

A ``parameter`` node has no input; its value is a batch of one, (1, *shape), so ``add`` and
``multiply`` broadcast it over the batch; ``expand_batch`` repeats it (without a copy) to the
batch of another input, as ``concat`` needs for a class token.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import (Arg, OpDef, boolean, kaiming_uniform_init, number, numel, optional, positive_int, probability,
                   register_op, require)
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


def causal_mask(x: torch.Tensor) -> torch.Tensor:
    """The (N, N) bool mask of nn.MultiheadAttention (True: not attended) that lets token i of
    ``x`` (..., N, D) attend to tokens 0..i only."""
    tokens = x.shape[-2]
    return torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)


def is_causal_mask(mask: torch.Tensor, true_attends: bool) -> bool:
    """Whether a constant mask is the causal one: bool (True attends where ``true_attends``, as
    F.scaled_dot_product_attention, else True is masked, as nn.MultiheadAttention) or float
    (0 attends, -inf is masked), of shape (N, N) with leading ones."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2] or any(n != 1 for n in mask.shape[:-2]):
        return False
    mask = mask.reshape(mask.shape[-2:])
    if mask.dtype == torch.bool:
        blocked = ~mask if true_attends else mask
    elif mask.is_floating_point():
        blocked = mask == float("-inf")
        if not bool((mask[~blocked] == 0).all()):
            return False
    else:
        return False
    return torch.equal(blocked.cpu(), causal_mask(mask.cpu()))


def _refuse_constant_mask(mask: torch.Tensor | None, true_attends: bool) -> bool:
    """True for a causal constant mask; a GraphgrowError for any other."""
    require(mask is None or is_causal_mask(mask, true_attends),
            "a constant attention mask that is not the causal mask (give causal masks as is_causal or a "
            "buffer, other masks as a tensor computed from the input, e.g. a key padding mask from the tokens)")
    return mask is not None


class HeadAttention(nn.Module):
    """nn.MultiheadAttention's parameters and computation with heads x head_dim projected
    features that need not equal the token width D (attention grown by heads): q, k and v of
    (heads x head_dim) features each, softmax(q k^T / sqrt(head_dim)) v per head, and an output
    projection (heads x head_dim) -> D."""

    def __init__(self, width: int, heads: int, head_dim: int, bias: bool, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * heads * head_dim, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * heads * head_dim)) if bias else None
        self.out_proj = nn.Linear(heads * head_dim, width, bias=bias)

    def _heads(self, x: torch.Tensor, part: int) -> torch.Tensor:
        rows = self.heads * self.head_dim
        bias = self.in_proj_bias
        projected = F.linear(x, self.in_proj_weight[part * rows:(part + 1) * rows],
                             None if bias is None else bias[part * rows:(part + 1) * rows])
        return projected.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # the masks as nn.MultiheadAttention reads them (bool: True is not attended; float: added),
        # made one additive mask for F.scaled_dot_product_attention; is_causal is only the hint
        # that attn_mask is the causal mask, as there
        mask = None
        for part in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if part is not None:
                part = (torch.zeros(part.shape, dtype=query.dtype, device=query.device).masked_fill(part, float("-inf"))
                        if part.dtype == torch.bool else part.to(query.dtype))
                mask = part if mask is None else mask + part
        merged = F.scaled_dot_product_attention(self._heads(query, 0), self._heads(key, 1), self._heads(value, 2),
                                                attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(merged.transpose(1, 2).flatten(2)), None


class AttentionOp(OpDef):
    name = "attention"
    doc = ("Multi-head self-attention on tokens (N, D), as nn.MultiheadAttention(D, heads, "
           "batch_first=True) called with the same input as query, key and value; an optional "
           "second input (N,) is the key padding mask (True or non-zero: the key is ignored); with head_dim "
           "given, heads of that width whatever D (attention grown by heads).")
    args = (Arg("heads", positive_int, doc="number of heads; divides the token width unless head_dim is given"),
            Arg("bias", boolean, True), Arg("dropout", probability, 0.0, doc="on the attention weights"),
            Arg("causal", boolean, False, doc="token i attends to tokens 0..i only"),
            Arg("head_dim", optional(positive_int), None, doc="features per head; default D / heads"))
    max_inputs = 2
    roles = {"in_proj_weight": "query, key and value projections stacked, (3 heads head_dim, D)",
             "in_proj_bias": "(3 heads head_dim,)", "out_proj.weight": "(D, heads head_dim)", "out_proj.bias": "(D,)"}
    tuple_output = 0

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        if len(shape) != 2 or args["head_dim"] is None and shape[1] % args["heads"]:
            raise GraphgrowError(f"attention needs tokens (N, D) with D divisible by heads {args['heads']}, "
                                 f"got {list(shape)}", hint="reshape images to tokens, e.g. flatten(start: 2) "
                                                            "and transpose(dim0: 1, dim1: 2)")
        if len(in_shapes) > 1 and tuple(in_shapes[1]) != shape[:1]:
            raise GraphgrowError(f"the key padding mask of attention on tokens {list(shape)} has shape "
                                 f"{list(in_shapes[1])}, not [{shape[0]}]", hint="one entry per token")
        return shape

    @staticmethod
    def inner_width(args, in_shapes) -> int:
        """heads x head_dim: the features of each of q, k, v."""
        width = in_shapes[0][1]
        return width if args["head_dim"] is None else args["heads"] * args["head_dim"]

    def param_shapes(self, args, in_shapes):
        width, inner = in_shapes[0][1], self.inner_width(args, in_shapes)
        shapes = {"in_proj_weight": (3 * inner, width), "out_proj.weight": (width, inner)}
        if args["bias"]:
            shapes.update({"in_proj_bias": (3 * inner,), "out_proj.bias": (width,)})
        return shapes

    def flops(self, args, in_shapes, out_shape):
        """Projections (3 in, 1 out) and the two products with the N x N weights, as multiply-
        adds; the biases, the 1/sqrt(d) scaling and a softmax of 5 per weight (masks change no
        count: masked weights are computed too)."""
        tokens, width = in_shapes[0]
        inner = self.inner_width(args, in_shapes)
        matmuls = 2 * tokens * width * 4 * inner + 2 * 2 * tokens * tokens * inner
        bias = (3 * inner + width) * tokens if args["bias"] else 0
        return matmuls + bias + tokens * inner + 5 * args["heads"] * tokens * tokens

    def build_module(self, args, in_shapes):
        width = in_shapes[0][1]
        if self.inner_width(args, in_shapes) != width:
            return HeadAttention(width, args["heads"], args["head_dim"], args["bias"], args["dropout"])
        return nn.MultiheadAttention(width, args["heads"], dropout=args["dropout"], bias=args["bias"],
                                     batch_first=True)

    def default_init(self, module, args, generator):
        """nn.MultiheadAttention's initialisation drawn from the seed: Xavier-uniform q, k, v
        projections, the output projection as a linear layer, zero biases."""
        with torch.no_grad():
            nn.init.xavier_uniform_(module.in_proj_weight, generator=generator)
            kaiming_uniform_init(module.out_proj.weight, None, generator)
            for bias in (module.in_proj_bias, module.out_proj.bias):
                if bias is not None:
                    bias.zero_()

    def emit(self, graph, name, args, inputs, as_module):
        x = inputs[0]
        kwargs = {"need_weights": False}
        if len(inputs) > 1:
            kwargs["key_padding_mask"] = inputs[1]
        if args["causal"]:  # nn.MultiheadAttention takes is_causal only as a hint beside the mask
            mask = graph.create_node("call_function", causal_mask, (x,), {}, name=f"{name}_causal_mask")
            kwargs.update(attn_mask=mask, is_causal=True)
        both = graph.create_node("call_module", name, (x, x, x), kwargs, name=f"{name}_and_weights")
        return graph.create_node("call_function", operator.getitem, (both, 0), {}, name=name)

    #: the heads are inner units: each owns head_dim rows of q, k and v and head_dim columns of
    #: the output projection; the output (the tokens' width) does not show them
    head_arg = "heads"

    def head_roles(self, args, in_shapes) -> dict[str, tuple[int, int, str]]:
        """Per role holding the heads: (axis, copies of the heads on it, side: rows or columns)."""
        roles = {"in_proj_weight": (0, 3, "rows"), "out_proj.weight": (1, 1, "columns")}
        if args["bias"]:
            roles["in_proj_bias"] = (0, 3, "rows")
        return roles

    def head_dim(self, args, in_shapes) -> int:
        return self.inner_width(args, in_shapes) // args["heads"]

    def zero_output_roles(self, args, in_shapes):
        # the output projection only: the values stay non-zero, so its gradient does too
        return ("out_proj.weight", "out_proj.bias") if args["bias"] else ("out_proj.weight",)

    imports_modules = (nn.MultiheadAttention,)

    def args_from_module(self, module):
        require(module.batch_first, "nn.MultiheadAttention without batch_first=True")
        require(module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn,
                "attention with separate key/value widths, bias_k/bias_v or add_zero_attn")
        return {"heads": module.num_heads, "bias": module.in_proj_bias is not None, "dropout": module.dropout}

    def args_from_constants(self, args, constants):
        """A constant attn_mask (a buffer) must be the causal mask; it sets ``causal``."""
        causal = _refuse_constant_mask(constants.get("attn_mask"), true_attends=False)
        return {**args, "causal": causal}

    def inputs_from_call(self, inputs, kwargs):
        """Self-attention (one input as query, key and value) with an optional key padding mask
        computed from the input; a causal attn_mask comes as a constant (args_from_constants)."""
        require(len(inputs) == 3 and len(set(inputs)) == 1, "attention with different query, key and value, "
                                                            "or masks given by position (give them by keyword)")
        mask = kwargs.get("attn_mask")
        require(mask is None or mask.op == "get_attr", "an attn_mask computed in forward (give a key_padding_mask, "
                                                       "or a causal mask as a buffer)")
        require(not kwargs.get("is_causal") or mask is not None, "is_causal without attn_mask")
        padding = kwargs.get("key_padding_mask")
        require(padding is None or padding.op != "get_attr", "a constant key_padding_mask (it masks the same keys "
                                                             "of every sample: compute it from the input)")
        return inputs[:1] + ([padding] if padding is not None else [])


class ScaledDotProductAttentionOp(OpDef):
    name = "scaled_dot_product_attention"
    doc = ("softmax(q k^T * scale + mask) v on inputs q (..., N, d), k (..., M, d), v (..., M, dv), as "
           "F.scaled_dot_product_attention: the functional form of attention (heads as a leading "
           "dimension); scale defaults to 1/sqrt(d). An optional fourth input is the attention mask "
           "(bool: True attends; float: added), broadcast to (..., N, M).")
    args = (Arg("causal", boolean, False, doc="mask the keys after each query"),
            Arg("scale", optional(number), None))
    min_inputs, max_inputs = 3, 4
    imports_functions = (F.scaled_dot_product_attention,)

    def output_shape(self, args, in_shapes):
        q, k, v = in_shapes[:3]
        if (len(q) < 2 or not len(q) == len(k) == len(v) or q[:-2] != k[:-2] or k[:-2] != v[:-2]
                or q[-1] != k[-1] or k[-2] != v[-2]):
            raise GraphgrowError(f"attention needs q (..., N, d), k (..., M, d), v (..., M, dv), got "
                                 f"{', '.join(str(list(s)) for s in in_shapes)}")
        weights = q[:-1] + (k[-2],)
        if len(in_shapes) > 3 and (len(in_shapes[3]) != len(weights)
                                   or any(m not in (1, w) for m, w in zip(in_shapes[3], weights))):
            raise GraphgrowError(f"the attention mask of shape {list(in_shapes[3])} does not broadcast to the "
                                 f"weights {list(weights)}", hint="give the mask the rank of q, with 1 where it is shared")
        return q[:-1] + (v[-1],)

    def flops(self, args, in_shapes, out_shape):
        """The two products with the N x M weights as multiply-adds, the scaling and a softmax of
        5 per weight."""
        q, k, v = in_shapes[:3]
        weights = numel(q[:-1]) * k[-2]
        return 2 * weights * q[-1] + 2 * weights * v[-1] + weights + 5 * weights

    def inputs_from_call(self, inputs, kwargs):
        """q, k, v and a mask computed from the input; a constant mask must be causal
        (args_from_constants)."""
        mask = kwargs.get("attn_mask", inputs[3] if len(inputs) > 3 else None)
        return inputs[:3] + ([mask] if mask is not None and mask.op != "get_attr" else [])

    def args_from_call(self, args, kwargs):
        # a tensor mask given by position leaves the call's other positional arguments one place earlier
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        names = names[1:] if args and args[0] is not None else names
        given = {**dict(zip(names, args)), **kwargs}
        require(not given.get("dropout_p") and not given.get("enable_gqa"), "attention with dropout or grouped queries")
        return {"causal": bool(given.get("is_causal", False)), "scale": given.get("scale")}

    def args_from_constants(self, args, constants):
        causal = _refuse_constant_mask(constants.get("attn_mask", constants.get(3)), true_attends=True)
        return {**args, "causal": args["causal"] or causal}

    def function(self, args):
        return F.scaled_dot_product_attention, {"is_causal": args["causal"], "scale": args["scale"]}


for _op in (ParameterOp, ExpandBatchOp, AttentionOp, ScaledDotProductAttentionOp):
    register_op(_op)
