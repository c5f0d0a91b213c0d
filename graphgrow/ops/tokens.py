"""Token ops: ``embedding`` (nn.Embedding, F.embedding) looks token ids up in a table;
``positions`` gives the positions 0..T-1 of the tokens (the ids of a learned position
embedding, what ``torch.arange(T)`` gives in a module's forward); ``equal(value)`` marks the
entries equal to a value (a key padding mask from the token ids).

Token ids arrive as int64, or as floats holding integers (the training runtime casts data to
the network's dtype; a float represents every id below 2**24 exactly): the embedding rounds
them to int64 before the lookup, so a network's parameters keep one dtype.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, non_negative_int, number, optional, positive_int, register_op, require


class TokenEmbedding(nn.Embedding):
    """nn.Embedding that also takes token ids held in a float tensor."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens.long(), self.weight, self.padding_idx)


class EmbeddingOp(OpDef):
    name = "embedding"
    doc = ("Row t of a (tokens, dim) table for each token id t of the input, as nn.Embedding: "
           "(..., ) ids -> (..., dim).")
    args = (Arg("tokens", positive_int, doc="number of rows (the vocabulary size), e.g. tokens: 100"),
            Arg("dim", positive_int, doc="width of each row, e.g. dim: 32"),
            Arg("padding", optional(non_negative_int), None, doc="the id whose row stays zero and gets no gradient"))
    roles = {"weight": "the table, shape (tokens, dim)"}

    def output_shape(self, args, in_shapes):
        if args["padding"] is not None and args["padding"] >= args["tokens"]:
            raise GraphgrowError(f"embedding padding id {args['padding']} is not below tokens {args['tokens']}")
        return tuple(in_shapes[0]) + (args["dim"],)

    def param_shapes(self, args, in_shapes):
        return {"weight": (args["tokens"], args["dim"])}

    def build_module(self, args, in_shapes):
        return TokenEmbedding(args["tokens"], args["dim"], padding_idx=args["padding"])

    def default_init(self, module, args, generator):
        """nn.Embedding's: standard normal rows, the padding row zero."""
        with torch.no_grad():
            nn.init.normal_(module.weight, generator=generator)
            if args["padding"] is not None:
                module.weight[args["padding"]].zero_()

    imports_modules = (nn.Embedding, TokenEmbedding)
    imports_functions = (F.embedding,)
    adopted_roles = ("weight",)

    def args_from_module(self, module):
        require(module.max_norm is None and not module.scale_grad_by_freq and not module.sparse,
                "nn.Embedding with max_norm, scale_grad_by_freq or sparse gradients")
        return {"tokens": module.num_embeddings, "dim": module.embedding_dim, "padding": module.padding_idx}

    def args_from_parameters(self, params, args, kwargs):
        given = {**dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args)),
                 **kwargs}
        require(given.get("max_norm") is None and not given.get("scale_grad_by_freq") and not given.get("sparse"),
                "F.embedding with max_norm, scale_grad_by_freq or sparse gradients")
        tokens, dim = params["weight"].shape
        padding = given.get("padding_idx")
        return {"tokens": tokens, "dim": dim, "padding": None if padding is None else padding % tokens}

    # a table lookup: no input units flow through it, its output units are the table's columns
    widen_refusal = "its input holds token ids, not units"
    width_arg = "dim"

    def widen_roles(self, args):
        return {"weight": (1, None)}


def positions_of(tokens: torch.Tensor) -> torch.Tensor:
    """The positions 0..T-1 of the T tokens of a sample, as a batch of one: (1, T) int64 (an
    embedding of them broadcasts over the batch where it meets the token embedding)."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)


class PositionsOp(OpDef):
    name = "positions"
    doc = ("The positions 0, 1, ..., T-1 of its input's T tokens, as int64 ids, the same for every "
           "sample (a batch of one, broadcast where it meets batched tensors): an embedding after it is "
           "a learned position embedding, as nn.Embedding(T, dim)(torch.arange(T)). (T, ...) -> (T,).")
    widen_refusal = "its output holds positions, not units"

    def output_shape(self, args, in_shapes):
        if not in_shapes[0]:
            raise GraphgrowError("positions needs an input with a token axis, its input is one number per sample")
        return (in_shapes[0][0],)

    def function(self, args):
        return positions_of, {}


def equal_to(x: torch.Tensor, value: float) -> torch.Tensor:
    return x == value


class EqualOp(OpDef):
    name = "equal"
    doc = ("x == value, elementwise, as a bool tensor: e.g. the key padding mask of attention from "
           "the token ids (equal(value: 0) marks the padding tokens).")
    args = (Arg("value", number, doc="the value compared with, e.g. value: 0"),)
    imports_functions = (operator.eq, torch.eq)
    imports_methods = ("eq",)

    def inputs_from_call(self, inputs, kwargs):
        require(len(inputs) == 1, "a comparison of two tensors")
        return inputs

    def args_from_call(self, args, kwargs):
        require(len(args) == 1 and not kwargs, "a comparison with something other than one number")
        return {"value": args[0]}

    def function(self, args):
        return equal_to, {"value": args["value"]}


register_op(EmbeddingOp)
register_op(PositionsOp)
register_op(EqualOp)
