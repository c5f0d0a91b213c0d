"""linear(out, bias): y = W x + b on the last dimension. Roles: weight (out, in), bias (out)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, Geometry, OpDef, boolean, kaiming_uniform_init, numel, positive_int, register_op


class LinearOp(OpDef):
    name = "linear"
    doc = "Affine map on the last dimension, y = W x + b."
    args = (Arg("out", positive_int, doc="number of output features, e.g. out: 10"),
            Arg("bias", boolean, True))
    roles = {"weight": "W, shape (out, in)", "bias": "b, shape (out,) (when bias: true)"}

    def output_shape(self, args, in_shapes):
        shape = in_shapes[0]
        if len(shape) == 0:
            raise GraphgrowError("linear needs at least one input dimension")
        return shape[:-1] + (args["out"],)

    def param_shapes(self, args, in_shapes):
        shapes = {"weight": (args["out"], in_shapes[0][-1])}
        if args["bias"]:
            shapes["bias"] = (args["out"],)
        return shapes

    def flops(self, args, in_shapes, out_shape):
        rows = numel(in_shapes[0][:-1])
        return rows * args["out"] * (2 * in_shapes[0][-1] + (1 if args["bias"] else 0))

    def build_module(self, args, in_shapes):
        return nn.Linear(in_shapes[0][-1], args["out"], bias=args["bias"])

    def module_sizes(self, args, in_shapes):
        return {"in_features": in_shapes[0][-1], "out_features": args["out"]}

    imports_modules = (nn.Linear,)
    imports_functions = (F.linear,)
    adopted_roles = ("weight", "bias")

    def args_from_module(self, module):
        return {"out": module.out_features, "bias": module.bias is not None}

    def args_from_parameters(self, params, args, kwargs):
        return {"out": params["weight"].shape[0], "bias": "bias" in params}

    def default_init(self, module, args, generator):
        kaiming_uniform_init(module.weight, module.bias, generator)

    width_arg = "out"
    input_units_dim = -1  # y = W x + b acts on the last dimension

    def widen_roles(self, args):
        return {"weight": (0, 1), "bias": (0, None)}

    def identity_roles(self, args, in_shapes, scale=1.0):
        return None if in_shapes[0][-1] != args["out"] else {"weight": 1.0}

    def weight_geometry(self, args, in_shapes, role):
        return Geometry((in_shapes[0][-1], 1, 1)) if role == "weight" else None

    def functional(self, args, params, x):
        return F.linear(x, params["weight"], params.get("bias"))

    def parameter_gradients(self, args, params, x, grad_out, roles):
        """dL/dW = sum over samples (and leading dimensions) of grad_out^T x; dL/db = sum of
        grad_out. Neither depends on the parameters."""
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grads = {}
        if "weight" in roles:
            grads["weight"] = rows.T @ x.reshape(-1, x.shape[-1])
        if "bias" in roles:
            grads["bias"] = rows.sum(0)
        return grads

    def parameter_gradient_flops(self, args, in_shapes, out_shape, roles):
        rows = numel(in_shapes[0][:-1])
        weight = 2 * rows * args["out"] * in_shapes[0][-1] if "weight" in roles else 0
        return weight + (numel(out_shape) if "bias" in roles else 0)


register_op(LinearOp)
