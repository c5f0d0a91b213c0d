"""Pooling over (C, H, W): maxpool2d, avgpool2d, adaptive_avgpool2d. No parameters."""
from __future__ import annotations

from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, numel, positive_int, register_op
from .conv import expect_image, spatial_out


def optional_positive_int(value):
    return None if value is None else positive_int(value)


class PoolOp(OpDef):
    args = (Arg("kernel", positive_int, 2), Arg("stride", optional_positive_int, None))
    torch_fn = None

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


class MaxPool2dOp(PoolOp):
    name = "maxpool2d"
    doc = "Max over kernel x kernel windows (stride defaults to kernel)."
    torch_fn = F.max_pool2d


class AvgPool2dOp(PoolOp):
    name = "avgpool2d"
    doc = "Mean over kernel x kernel windows (stride defaults to kernel)."
    torch_fn = F.avg_pool2d


class AdaptiveAvgPool2dOp(OpDef):
    name = "adaptive_avgpool2d"
    doc = "Mean pooling to a fixed out x out spatial size."
    args = (Arg("out", positive_int, 1),)

    def output_shape(self, args, in_shapes):
        expect_image(in_shapes[0], self.name)
        return (in_shapes[0][0], args["out"], args["out"])

    def flops(self, args, in_shapes, out_shape):
        return numel(in_shapes[0])

    def function(self, args):
        return F.adaptive_avg_pool2d, {"output_size": args["out"]}


for _op in (MaxPool2dOp, AvgPool2dOp, AdaptiveAvgPool2dOp):
    register_op(_op)
