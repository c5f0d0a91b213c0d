"""Pooling over (C, H, W): maxpool2d, avgpool2d, adaptive_avgpool2d. No parameters."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from ..errors import GraphgrowError
from .base import Arg, OpDef, boolean, non_negative_int, numel, optional, positive_int, register_op, require
from .conv import expect_image


def pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size; with ``ceil_mode`` a last window must start inside the
    input or its left padding."""
    span = size + 2 * padding - kernel
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


class PoolOp(OpDef):
    args = (Arg("kernel", positive_int, 2), Arg("stride", optional(positive_int), None),
            Arg("padding", non_negative_int, 0, doc="implicit padding on every side, at most kernel // 2"),
            Arg("ceil_mode", boolean, False, doc="round the output size up, as torch's ceil_mode"))
    torch_fn = None
    passes_units_through = True
    maps_zero_to_zero = keeps_range = True

    def stride(self, args):
        return args["stride"] or args["kernel"]

    def output_shape(self, args, in_shapes):
        expect_image(in_shapes[0], self.name)
        channels, height, width = in_shapes[0]
        k, s, p = args["kernel"], self.stride(args), args["padding"]
        if p > k // 2:
            raise GraphgrowError(f"{self.name} padding {p} is more than half its kernel {k}",
                                 hint=f"padding at most {k // 2}")
        if k > height + 2 * p or k > width + 2 * p:
            raise GraphgrowError(f"{self.name} kernel {k} is larger than its input {list(in_shapes[0])}")
        return (channels, pooled_size(height, k, s, p, args["ceil_mode"]),
                pooled_size(width, k, s, p, args["ceil_mode"]))

    def flops(self, args, in_shapes, out_shape):
        return numel(out_shape) * args["kernel"] ** 2

    def _torch_args(self, args):
        return {"kernel_size": args["kernel"], "stride": self.stride(args), "padding": args["padding"],
                "ceil_mode": args["ceil_mode"]}

    def function(self, args):
        return type(self).torch_fn, self._torch_args(args)

    def torch_module(self, args):
        return self.imports_modules[0](**self._torch_args(args))

    #: the torch argument names after kernel_size and stride, with their defaults
    call_names = ("padding", "ceil_mode", "count_include_pad", "divisor_override")

    def args_from_module(self, module):
        return self._pool_args({name: getattr(module, name) for name in
                                ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "count_include_pad", "divisor_override", "return_indices")
                                if hasattr(module, name)})

    def args_from_call(self, args, kwargs):
        return self._pool_args({**dict(zip(("kernel_size", "stride", *self.call_names), args)), **kwargs})

    @staticmethod
    def _pool_args(given):
        square = lambda v: v if isinstance(v, int) or v is None else (v[0] if len(set(v)) == 1 else None)
        kernel, stride = given["kernel_size"], given.get("stride")
        padding, dilation = given.get("padding", 0), given.get("dilation", 1)
        require(square(kernel) is not None and (not stride or square(stride) is not None)
                and square(padding) is not None, "non-square pooling window, stride or padding")
        require(square(dilation) == 1 and not given.get("return_indices", False), "pooling dilation or indices")
        require(given.get("count_include_pad", True) and given.get("divisor_override") is None,
                "average pooling that leaves padding out of the count")
        return {"kernel": square(kernel), "stride": square(stride) if stride else None,
                "padding": square(padding), "ceil_mode": bool(given.get("ceil_mode", False))}


class MaxPool2dOp(PoolOp):
    name = "maxpool2d"
    doc = "Max over kernel x kernel windows (stride defaults to kernel); padding counts as -inf."
    torch_fn = F.max_pool2d
    call_names = ("padding", "dilation", "ceil_mode", "return_indices")
    imports_modules = (nn.MaxPool2d,)
    imports_functions = (F.max_pool2d,)


class AvgPool2dOp(PoolOp):
    name = "avgpool2d"
    doc = "Mean over kernel x kernel windows (stride defaults to kernel); padding counts as zeros."
    torch_fn = F.avg_pool2d
    imports_modules = (nn.AvgPool2d,)
    imports_functions = (F.avg_pool2d,)


class AdaptiveAvgPool2dOp(OpDef):
    name = "adaptive_avgpool2d"
    doc = "Mean pooling to a fixed out x out spatial size."
    args = (Arg("out", positive_int, 1),)
    passes_units_through = True
    maps_zero_to_zero = keeps_range = True

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
