"""Normalisation and dropout: batchnorm, layernorm, dropout (modules, train/eval aware)."""
from __future__ import annotations

from torch import nn

from ..errors import GraphgrowError
from .base import Arg, OpDef, number, numel, probability, register_op, require


class BatchNormOp(OpDef):
    name = "batchnorm"
    doc = ("Batch normalisation over channels: BatchNorm1d for (C,) or (C, L) inputs, "
           "BatchNorm2d for (C, H, W).")
    args = (Arg("eps", number, 1e-5), Arg("momentum", number, 0.1))
    roles = {"weight": "gamma, shape (C,)", "bias": "beta, shape (C,)",
             "running_mean": "buffer", "running_var": "buffer", "num_batches_tracked": "buffer"}

    def output_shape(self, args, in_shapes):
        if len(in_shapes[0]) not in (1, 2, 3):
            raise GraphgrowError(f"batchnorm needs (C,), (C, L) or (C, H, W) input, got {list(in_shapes[0])}")
        return in_shapes[0]

    def param_shapes(self, args, in_shapes):
        return {"weight": (in_shapes[0][0],), "bias": (in_shapes[0][0],)}

    passes_units_through = True

    def unit_roles(self, args):
        # a fresh channel normalises with mean 0, variance 1 and the identity affine map
        return {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}

    def flops(self, args, in_shapes, out_shape):
        return 4 * numel(out_shape)

    imports_modules = (nn.BatchNorm1d, nn.BatchNorm2d)

    def args_from_module(self, module):
        require(module.affine and module.track_running_stats and module.momentum is not None,
                "batchnorm without affine parameters or running statistics")
        return {"eps": module.eps, "momentum": module.momentum}

    def build_module(self, args, in_shapes):
        cls = nn.BatchNorm2d if len(in_shapes[0]) == 3 else nn.BatchNorm1d
        return cls(in_shapes[0][0], eps=args["eps"], momentum=args["momentum"])


class LayerNormOp(OpDef):
    name = "layernorm"
    doc = "Layer normalisation over all per-sample dimensions, with elementwise affine."
    args = (Arg("eps", number, 1e-5),)
    roles = {"weight": "gamma, the input's per-sample shape", "bias": "beta, same shape"}

    def param_shapes(self, args, in_shapes):
        return {"weight": in_shapes[0], "bias": in_shapes[0]}

    widen_refusal = ("layer norm normalises over all per-sample entries: new units would change the "
                     "mean and variance the existing units are normalised with")

    def flops(self, args, in_shapes, out_shape):
        return 5 * numel(out_shape)

    imports_modules = (nn.LayerNorm,)

    def args_from_module(self, module):
        require(module.elementwise_affine and module.bias is not None, "layernorm without affine parameters")
        return {"eps": module.eps}

    def build_module(self, args, in_shapes):
        return nn.LayerNorm(list(in_shapes[0]), eps=args["eps"])


class DropoutOp(OpDef):
    name = "dropout"
    doc = "Zeroes entries with probability p in train mode (scaled by 1/(1-p)); identity in eval."
    args = (Arg("p", probability, 0.5),)
    passes_units_through = True

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape)

    imports_modules = (nn.Dropout,)

    def args_from_module(self, module):
        return {"p": module.p}

    def build_module(self, args, in_shapes):
        return nn.Dropout(args["p"])


for _op in (BatchNormOp, LayerNormOp, DropoutOp):
    register_op(_op)
