"""Pooling over (C, H, W): maxpool2d, avgpool2d, adaptive_avgpool2d. No parameters."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, numel, positive_int, register_op, require
from .conv import expect_image, spatial_out


def optional_positive_int(value):
    return None if value is None else positive_int(value)


class PoolOp(OpDef):
    args = (Arg("kernel", positive_int, 2), Arg("stride", optional_positive_int, None))
    torch_fn = None
    passes_units_through = True

    def stride(self, args):
        return args["stride"] or args["kernel"]

    def output_shape(self, args, in_shapes):
        expect_image(in_shapes[0], self.name)
        channels, height, width = in_shapes[0]
        k, s = args["kernel"], self.stride(args)
        if k > height or k > width:
            raise GraphgrowError(f"{self.name} kernel {k} is larger than its input {list(in_shapes[0])}")
        return (channels, spatial_out(height, k, s, 0), spatial_out(width, k, s, 0))

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape) * args["kernel"] ** 2

    def function(self, args):
        return type(self).torch_fn, {"kernel_size": args["kernel"], "stride": self.stride(args)}

    def torch_module(self, args):
        return self.imports_modules[0](args["kernel"], self.stride(args))

    def args_from_module(self, module):
        return self._pool_args(module.kernel_size, module.stride, module.padding,
                               getattr(module, "dilation", 1), module.ceil_mode)

    def args_from_call(self, args, kwargs):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        given = {**dict(zip(names, args)), **kwargs}
        return self._pool_args(given["kernel_size"], given.get("stride"), given.get("padding", 0),
                               given.get("dilation", 1), given.get("ceil_mode", False))

    @staticmethod
    def _pool_args(kernel, stride, padding, dilation, ceil_mode):
        square = lambda v: v if isinstance(v, int) or v is None else (v[0] if len(set(v)) == 1 else None)
        require(square(kernel) is not None and (not stride or square(stride) is not None),
                "non-square pooling window")
        kernel, stride = square(kernel), square(stride) if stride else None
        require(square(padding) == 0 and square(dilation) == 1 and not ceil_mode,
                "pooling padding, dilation or ceil_mode")
        return {"kernel": kernel, "stride": stride}


class MaxPool2dOp(PoolOp):
    name = "maxpool2d"
    doc = "Max over kernel x kernel windows (stride defaults to kernel)."
    torch_fn = F.max_pool2d
    imports_modules = (nn.MaxPool2d,)
    imports_functions = (F.max_pool2d,)


class AvgPool2dOp(PoolOp):
    name = "avgpool2d"
    doc = "Mean over kernel x kernel windows (stride defaults to kernel)."
    torch_fn = F.avg_pool2d
    imports_modules = (nn.AvgPool2d,)
    imports_functions = (F.avg_pool2d,)


class AdaptiveAvgPool2dOp(OpDef):
    name = "adaptive_avgpool2d"
    doc = "Mean pooling to a fixed out x out spatial size."
    args = (Arg("out", positive_int, 1),)
    passes_units_through = True

    def output_shape(self, args, in_shapes):
        expect_image(in_shapes[0], self.name)
        return (in_shapes[0][0], args["out"], args["out"])

    def flops(self, args, in_shapes, out_shape):
        return numel(in_shapes[0])

    imports_modules = (nn.AdaptiveAvgPool2d,)
    imports_functions = (F.adaptive_avg_pool2d,)

    def function(self, args):
        return F.adaptive_avg_pool2d, {"output_size": args["out"]}

    def args_from_module(self, module):
        return self.args_from_call((module.output_size,), {})

    def args_from_call(self, args, kwargs):
        size = kwargs.get("output_size", args[0] if args else None)
        if isinstance(size, (tuple, list)):
            require(len(set(size)) == 1, f"non-square output size {size}")
            size = size[0]
        return {"out": size}


for _op in (MaxPool2dOp, AvgPool2dOp, AdaptiveAvgPool2dOp):
    register_op(_op)
