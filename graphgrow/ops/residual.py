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

    def module_sizes(self, args, in_shapes):
        width = self._width(in_shapes)
        names = ("in_channels", "out_channels") if args["branch"] == "conv2d" else ("in_features", "out_features")
        layers = ("inner", "outer") if args["form"] == "two_weight" else ("inner",)
        return {f"{layer}.{name}": width for layer in layers for name in names}

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

    # x + h F(x): the stream and the branch's hidden units have one width, so widening the
    # stream adds rows (W1, b, rows of W2) and columns (W1, W2) here (passes/units.py)
    ties_units = True

    def widen_roles(self, args):
        roles = {"inner.weight": (0, 1), "inner.bias": (0, None), "outer.weight": (0, 1)}
        return {role: axes for role, axes in roles.items()
                if (role != "inner.bias" or args["bias"]) and (role != "outer.weight" or args["form"] == "two_weight")}

    def zero_output_roles(self, args, in_shapes):
        return None  # x + h F(x) is x, not zero, whatever F's parameters

    def identity_roles(self, args, in_shapes, scale=1.0):
        """Two-weight form: W1 = c I (Dirac kernel), b = 0, W2 = 0 for any activation (4.13).
        One-weight form: W = 0, b = 0, the identity where the activation maps 0 to 0."""
        if args["form"] == "two_weight":
            return {"inner.weight": scale}
        act = get_op(args["activation"]).torch_module({})
        return None if act(torch.zeros(1)).item() != 0.0 else {}

    # -- the branch layers as linear / conv2d ops: one weight rule for both -----------------
    def _branch(self, args, in_shape) -> tuple[OpDef, dict]:
        """The op and arguments of W1 (and, without bias, of W2) on inputs of ``in_shape``."""
        width = self._width([in_shape])
        if args["branch"] == "conv2d":
            conv = get_op("conv2d")
            return conv, conv.check_args({"out": width, "kernel": args["kernel"], "bias": args["bias"]})
        return get_op("linear"), {"out": width, "bias": args["bias"]}

    def weight_geometry(self, args, in_shapes, role):
        if role not in ("inner.weight", "outer.weight"):
            return None
        branch, branch_args = self._branch(args, in_shapes[0])
        return branch.weight_geometry(branch_args, in_shapes, "weight")

    def parameter_gradients(self, args, params, x, grad_out, roles):
        """With s = act(W1 x + b) and output x + h W2 s (4.14c): dL/dW2 is the branch's weight
        rule for input s and output gradient h grad_out; the inner roles go back through W2
        (two_weight) and the activation's derivative (autograd on the activation)."""
        branch, branch_args = self._branch(args, tuple(x.shape[1:]))
        act_op = get_op(args["activation"])
        act, act_kwargs = act_op.function(act_op.check_args({}))  # the activation's defaults, as built
        pre = branch.functional(branch_args, {"weight": params["inner.weight"], "bias": params.get("inner.bias")}, x)
        scaled = args["h"] * grad_out
        grads = {}
        if "outer.weight" in roles:
            grads["outer.weight"] = branch.parameter_gradients(branch_args, {}, act(pre, **act_kwargs), scaled,
                                                               ("weight",))["weight"]
        inner = [role.split(".", 1)[1] for role in roles if role.startswith("inner.")]
        if inner:
            with torch.enable_grad():  # also when called from a backward hook
                pre = pre.detach().requires_grad_()
                out = act(pre, **act_kwargs)
                if args["form"] == "two_weight":
                    out = branch.functional(branch_args, {"weight": params["outer.weight"]}, out)
                (delta,) = torch.autograd.grad(out, pre, scaled)
            grads.update({f"inner.{role}": grad for role, grad in
                          branch.parameter_gradients(branch_args, {}, x, delta, inner).items()})
        return grads

    def parameter_gradient_flops(self, args, in_shapes, out_shape, roles):
        branch, branch_args = self._branch(args, in_shapes[0])
        act = get_op(args["activation"])
        activation = act.flops({}, [out_shape], out_shape)
        # W1 x + b, the activation and the factor h on the output gradient
        flops = branch.flops(branch_args, in_shapes, out_shape) + activation + numel(out_shape)
        if "outer.weight" in roles:
            flops += branch.parameter_gradient_flops(branch_args, in_shapes, out_shape, ("weight",))
        inner = [role.split(".", 1)[1] for role in roles if role.startswith("inner.")]
        if inner:
            flops += activation + act.input_gradient_flops({}, [out_shape], out_shape)
            if args["form"] == "two_weight":
                outer_args = {**branch_args, "bias": False}
                flops += (branch.flops(outer_args, in_shapes, out_shape)
                          + branch.input_gradient_flops(outer_args, in_shapes, out_shape))
            flops += branch.parameter_gradient_flops(branch_args, in_shapes, out_shape, inner)
        return flops


register_op(ResidualOp)
