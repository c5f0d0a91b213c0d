"""residual: x + h * W2 sigma(W1 x + b) (two_weight, thesis 2.10) or x + h * sigma(W x + b)
(one_weight, thesis 2.7). Width preserving. Roles: inner.weight, inner.bias, outer.weight."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import GraphgrowError
from .base import (Arg, OpDef, boolean, choice, get_op, kaiming_uniform_init, number, numel,
                   positive_int, register_op, registered_ops, require)
from .conv import expect_image, same_padding


def activation_name(value):
    op = get_op(value)
    if not op.elementwise or op.name == "scale":
        raise GraphgrowError(f"'{value}' is not an activation", hint="use relu, tanh, sigmoid, ...")
    return value


def _activations():
    return [op for op in registered_ops().values() if op.elementwise and op.imports_modules]


class Residual(nn.Module):
    """x + h * outer(act(inner(x))); without ``outer`` (one_weight form) x + h * act(inner(x))."""

    def __init__(self, inner: nn.Module, outer: nn.Module | None, act: nn.Module, h: float):
        super().__init__()
        self.inner = inner
        self.act = act
        self.h = h
        self.outer = outer if outer is not None else nn.Identity()

    def forward(self, x):
        return x + self.h * self.outer(self.act(self.inner(x)))

    def extra_repr(self) -> str:
        return f"h={self.h}"


class ResidualOp(OpDef):
    name = "residual"
    doc = "Residual block x + h W2 act(W1 x + b) (two_weight) or x + h act(W x + b) (one_weight)."
    args = (Arg("branch", choice("linear", "conv2d"), "linear"),
            Arg("form", choice("two_weight", "one_weight"), "two_weight"),
            Arg("activation", activation_name, "relu"),
            Arg("h", number, 1.0), Arg("bias", boolean, True),
            Arg("kernel", positive_int, 3, doc="conv2d branch only"))
    roles = {"inner.weight": "W1 (width, width) or conv kernel (C, C, k, k)",
             "inner.bias": "b (width,) (when bias: true)",
             "outer.weight": "W2, same shape as W1 (two_weight form only)"}

    def output_shape(self, args, in_shapes):
        if args["branch"] == "conv2d":
            expect_image(in_shapes[0], "residual with branch conv2d")
            same_padding(args["kernel"])
        elif len(in_shapes[0]) == 0:
            raise GraphgrowError("residual needs at least one input dimension")
        return in_shapes[0]

    def _width(self, in_shapes):
        return in_shapes[0][0] if len(in_shapes[0]) == 3 else in_shapes[0][-1]

    def param_shapes(self, args, in_shapes):
        width = self._width(in_shapes)
        weight = (width, width, args["kernel"], args["kernel"]) if args["branch"] == "conv2d" else (width, width)
        shapes = {"inner.weight": weight}
        if args["bias"]:
            shapes["inner.bias"] = (width,)
        if args["form"] == "two_weight":
            shapes["outer.weight"] = weight
        return shapes

    def flops(self, args, in_shapes, out_shape):
        width = self._width(in_shapes)
        per_entry = 2 * width * (args["kernel"] ** 2 if args["branch"] == "conv2d" else 1)
        matmuls = 2 if args["form"] == "two_weight" else 1
        act = get_op(args["activation"])
        return numel(out_shape) * (matmuls * per_entry + (1 if args["bias"] else 0) + act.cost + 2)

    def _layer(self, args, width, bias):
        if args["branch"] == "conv2d":
            return nn.Conv2d(width, width, args["kernel"], padding=args["kernel"] // 2, bias=bias)
        return nn.Linear(width, width, bias=bias)

    def build_module(self, args, in_shapes):
        width = self._width(in_shapes)
        inner = self._layer(args, width, args["bias"])
        outer = self._layer(args, width, False) if args["form"] == "two_weight" else None
        act = get_op(args["activation"]).torch_module({})
        return Residual(inner, outer, act, args["h"])

    imports_modules = (Residual,)

    def args_from_module(self, module):
        conv = isinstance(module.inner, nn.Conv2d)
        activation = next((op.name for op in _activations() if isinstance(module.act, op.imports_modules)), None)
        require(activation is not None, f"residual activation {type(module.act).__name__}")
        return {"branch": "conv2d" if conv else "linear",
                "form": "one_weight" if isinstance(module.outer, nn.Identity) else "two_weight",
                "activation": activation, "h": module.h, "bias": module.inner.bias is not None,
                **({"kernel": module.inner.kernel_size[0]} if conv else {})}

    def default_init(self, module, args, generator):
        kaiming_uniform_init(module.inner.weight, module.inner.bias, generator)
        if args["form"] == "two_weight":
            kaiming_uniform_init(module.outer.weight, None, generator)

    widen_refusal = ("x + h F(x) ties every tensor of the residual stream to one width; widening "
                     "would have to widen the whole stream, which is not supported")

    def identity_params(self, args, in_shapes, scale=1.0):
        """Two-weight form: W1 = c I (Dirac kernel), b = 0, W2 = 0 for any activation (4.13).
        One-weight form: W = 0, b = 0, the identity where the activation maps 0 to 0."""
        width = self._width(in_shapes)
        shape = self.param_shapes(args, in_shapes)["inner.weight"]
        if args["form"] == "one_weight":
            act = get_op(args["activation"]).torch_module({})
            if act(torch.zeros(1)).item() != 0.0:
                return None
            inner = torch.zeros(shape)
        else:
            inner = torch.zeros(shape)
            nn.init.eye_(inner) if len(shape) == 2 else nn.init.dirac_(inner)
            inner = scale * inner
        params = {"inner.weight": inner}
        if args["bias"]:
            params["inner.bias"] = torch.zeros(width)
        if args["form"] == "two_weight":
            params["outer.weight"] = torch.zeros(shape)
        return params


register_op(ResidualOp)
