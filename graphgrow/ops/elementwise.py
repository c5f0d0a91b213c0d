"""Elementwise ops: activations, identity, scale. No parameters; shape preserved."""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from .base import Arg, OpDef, number, numel, register_op, require


class ElementwiseOp(OpDef):
    elementwise = True
    passes_units_through = passes_units_anywhere = True
    #: flops per entry
    cost = 1

    def flops(self, args, in_shapes, out_shape):
        return self.cost * numel(out_shape)


class Activation(ElementwiseOp):
    """An activation given by a torch function and its module twin."""

    def __init__(self, name, fn, module, cost=1, doc="", aliases=(), idempotent=False):
        self.name, self._fn, self._module, self.cost = name, fn, module, cost
        self.idempotent = idempotent
        self.maps_zero_to_zero = bool(fn(torch.zeros(1)) == 0)
        self.doc = doc or f"{name} activation, elementwise."
        self.imports_modules = (module,)
        self.imports_functions = (fn, *aliases)

    def function(self, args):
        return self._fn, {}

    def torch_module(self, args):
        return self._module()


for _activation in (
        Activation("relu", torch.relu, nn.ReLU, doc="max(0, x), elementwise.", aliases=(F.relu,),
                   idempotent=True),
        Activation("tanh", torch.tanh, nn.Tanh, cost=4, aliases=(F.tanh,)),
        Activation("sigmoid", torch.sigmoid, nn.Sigmoid, cost=4, doc="logistic 1/(1+exp(-x)).",
                   aliases=(F.sigmoid,)),
        Activation("gelu", F.gelu, nn.GELU, cost=8),
        Activation("softplus", F.softplus, nn.Softplus, cost=4),
        Activation("relu6", F.relu6, nn.ReLU6, cost=2, doc="min(max(0, x), 6), elementwise.", idempotent=True),
        Activation("silu", F.silu, nn.SiLU, cost=5, doc="x * sigmoid(x) (swish), elementwise."),
        Activation("hardswish", F.hardswish, nn.Hardswish, cost=4, doc="x * relu6(x + 3) / 6, elementwise."),
        Activation("hardsigmoid", F.hardsigmoid, nn.Hardsigmoid, cost=3, doc="relu6(x + 3) / 6, elementwise.",
                   idempotent=False),
        Activation("identity", torch.clone, nn.Identity, cost=0,
                   doc="returns its input (a copy, so graphs stay single-assignment).", idempotent=True),
):
    register_op(_activation)


class LeakyReluOp(ElementwiseOp):
    name = "leaky_relu"
    maps_zero_to_zero = True
    doc = "max(0, x) + slope * min(0, x)."
    args = (Arg("slope", number, 0.01),)

    imports_modules = (nn.LeakyReLU,)
    imports_functions = (F.leaky_relu,)

    def args_from_module(self, module):
        return {"slope": module.negative_slope}

    def args_from_call(self, args, kwargs):
        slope = kwargs.get("negative_slope", args[0] if args else 0.01)
        return {"slope": slope}

    def function(self, args):
        return F.leaky_relu, {"negative_slope": args["slope"]}

    def torch_module(self, args):
        return nn.LeakyReLU(args.get("slope", 0.01))


class ScaleOp(ElementwiseOp):
    name = "scale"
    maps_zero_to_zero = True
    doc = "x * factor."
    args = (Arg("factor", number),)

    imports_functions = (torch.mul, operator.mul)

    def args_from_call(self, args, kwargs):
        factor = kwargs.get("other", args[0] if args else None)
        require(isinstance(factor, (int, float)) and not isinstance(factor, bool),
                "multiplication by something other than a constant number")
        return {"factor": factor}

    def function(self, args):
        return torch.mul, {"other": args["factor"]}


register_op(LeakyReluOp)
register_op(ScaleOp)
