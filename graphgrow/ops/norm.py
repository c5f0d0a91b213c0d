"""Normalisation and dropout: batchnorm, layernorm, dropout, stochastic_depth (modules,
train/eval aware)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, int_or, number, numel, probability, register_op, require


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

    def module_sizes(self, args, in_shapes):
        return {"num_features": in_shapes[0][0]}


class LayerNormOp(OpDef):
    name = "layernorm"
    doc = ("Layer normalisation over the last ``dims`` per-sample dimensions (all by default; "
           "dims: 1 normalises each token of (N, D)), with elementwise affine.")
    args = (Arg("eps", number, 1e-5),
            Arg("dims", int_or("all"), "all", doc="number of trailing dims normalised, or all"))
    roles = {"weight": "gamma, the normalised (trailing) shape", "bias": "beta, same shape"}

    def _normalized(self, args, shape):
        if args["dims"] == "all":
            return shape
        if not 1 <= args["dims"] <= len(shape):
            raise GraphgrowError(f"layernorm over {args['dims']} dims of an input of shape {list(shape)}",
                                 hint=f"dims from 1 to {len(shape)}, or all")
        return shape[len(shape) - args["dims"]:]

    def output_shape(self, args, in_shapes):
        self._normalized(args, in_shapes[0])
        return in_shapes[0]

    def param_shapes(self, args, in_shapes):
        shape = self._normalized(args, in_shapes[0])
        return {"weight": shape, "bias": shape}

    widen_refusal = ("layer norm normalises over all per-sample entries: new units would change the "
                     "mean and variance the existing units are normalised with")

    def flops(self, args, in_shapes, out_shape):
        return 5 * numel(out_shape)

    imports_modules = (nn.LayerNorm,)
    imports_functions = (F.layer_norm,)
    adopted_roles = ("weight", "bias")

    def args_from_module(self, module):
        require(module.elementwise_affine and module.bias is not None, "layernorm without affine parameters")
        return {"eps": module.eps, "dims": len(module.normalized_shape)}

    def args_from_call(self, args, kwargs):
        require(False, "F.layer_norm without weight and bias tensors of the module")

    def args_from_parameters(self, params, args, kwargs):
        require(set(params) == {"weight", "bias"}, "layer norm without weight and bias")
        eps = kwargs.get("eps", args[-1] if len(args) > 1 else 1e-5)
        return {"eps": eps, "dims": params["weight"].dim()}

    def build_module(self, args, in_shapes):
        return nn.LayerNorm(list(self._normalized(args, in_shapes[0])), eps=args["eps"])


class DropoutOp(OpDef):
    name = "dropout"
    doc = "Zeroes entries with probability p in train mode (scaled by 1/(1-p)); identity in eval."
    args = (Arg("p", probability, 0.5),)
    passes_units_through = passes_units_anywhere = True
    maps_zero_to_zero = True
    train_only_args = ("p",)

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape)

    imports_modules = (nn.Dropout,)

    def args_from_module(self, module):
        return {"p": module.p}

    def build_module(self, args, in_shapes):
        return nn.Dropout(args["p"])


class StochasticDepth(nn.Module):
    """Drops the whole input of a sample with probability p in train mode and scales the kept
    ones by 1/(1-p) (stochastic depth on a residual branch); the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StochasticDepthOp(OpDef):
    name = "stochastic_depth"
    doc = ("Drops a sample's input with probability p in train mode (kept ones scaled by 1/(1-p)), "
           "identity in eval; on a residual branch it drops the block for that sample.")
    args = (Arg("p", probability, 0.1),)
    passes_units_through = passes_units_anywhere = True
    maps_zero_to_zero = True
    train_only_args = ("p",)

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape)

    imports_modules = (StochasticDepth,)

    def args_from_module(self, module):
        return {"p": module.p}

    def build_module(self, args, in_shapes):
        return StochasticDepth(args["p"])


for _op in (BatchNormOp, LayerNormOp, DropoutOp, StochasticDepthOp):
    register_op(_op)
