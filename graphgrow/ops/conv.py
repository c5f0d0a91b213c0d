"""conv2d(out, kernel, stride, padding, groups, bias) on (C, H, W). Roles: weight (out, C/groups, k, k), bias.

``groups`` splits input and output channels into that many independent convolutions (grouped
convolution; ``groups`` equal to the input channels is a depthwise convolution)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from ..errors import GraphgrowError
from .base import (Arg, Geometry, OpDef, boolean, int_or, kaiming_uniform_init, numel, positive_int,
                   register_op, require)


def same_padding(kernel: int) -> int:
    if kernel % 2 == 0:
        raise GraphgrowError(f"padding 'same' needs an odd kernel, got kernel {kernel}",
                             hint="use an odd kernel or an integer padding")
    return kernel // 2


def spatial_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def expect_image(shape, op: str) -> None:
    if len(shape) != 3:
        raise GraphgrowError(f"{op} needs input of shape (channels, height, width), got {list(shape)}",
                             hint="reshape flat inputs with the input shape, e.g. input: {shape: [1, 28, 28]}")


class Conv2dOp(OpDef):
    name = "conv2d"
    doc = "2-d convolution over (channels, height, width)."
    args = (Arg("out", positive_int, doc="number of output channels, e.g. out: 16"),
            Arg("kernel", positive_int, 3), Arg("stride", positive_int, 1),
            Arg("padding", int_or("same"), "same"), Arg("bias", boolean, True),
            Arg("groups", positive_int, 1, doc="independent channel groups; in and out channels divisible by it"))
    roles = {"weight": "kernel K, shape (out, in/groups, k, k)", "bias": "b, shape (out,)"}

    @staticmethod
    def padding(args) -> int:
        return same_padding(args["kernel"]) if args["padding"] == "same" else args["padding"]

    def output_shape(self, args, in_shapes):
        expect_image(in_shapes[0], "conv2d")
        channels, height, width = in_shapes[0]
        if channels % args["groups"] or args["out"] % args["groups"]:
            raise GraphgrowError(f"conv2d with groups {args['groups']} needs input and output channels "
                                 f"divisible by it, got {channels} and {args['out']}",
                                 hint="depthwise: groups and out equal to the input channels")
        k, s, p = args["kernel"], args["stride"], self.padding(args)
        out = (args["out"], spatial_out(height, k, s, p), spatial_out(width, k, s, p))
        if out[1] < 1 or out[2] < 1:
            raise GraphgrowError(f"conv2d kernel {k} does not fit input {list(in_shapes[0])}")
        return out

    def param_shapes(self, args, in_shapes):
        k = args["kernel"]
        shapes = {"weight": (args["out"], in_shapes[0][0] // args["groups"], k, k)}
        if args["bias"]:
            shapes["bias"] = (args["out"],)
        return shapes

    def flops(self, args, in_shapes, out_shape):
        per_output = 2 * (in_shapes[0][0] // args["groups"]) * args["kernel"] ** 2 + (1 if args["bias"] else 0)
        return numel(out_shape) * per_output

    def build_module(self, args, in_shapes):
        return nn.Conv2d(in_shapes[0][0], args["out"], args["kernel"], stride=args["stride"],
                         padding=self.padding(args), bias=args["bias"], groups=args["groups"])

    def module_args(self, args):
        return {**args, "padding": self.padding(args)}

    def module_sizes(self, args, in_shapes):
        return {"in_channels": in_shapes[0][0], "out_channels": args["out"]}

    imports_modules = (nn.Conv2d,)

    def args_from_module(self, module):
        kernel, stride = module.kernel_size, module.stride
        require(kernel[0] == kernel[1] and stride[0] == stride[1], "non-square kernel or stride")
        require(module.dilation == (1, 1), "dilation")
        require(module.padding_mode == "zeros", f"padding_mode {module.padding_mode!r}")
        padding = module.padding
        if padding != "same":
            require(isinstance(padding, tuple) and padding[0] == padding[1], f"padding {padding}")
            padding = padding[0]
        return {"out": module.out_channels, "kernel": kernel[0], "stride": stride[0],
                "padding": padding, "bias": module.bias is not None, "groups": module.groups}

    def default_init(self, module, args, generator):
        kaiming_uniform_init(module.weight, module.bias, generator)

    width_arg = "out"

    def widens(self, args):
        return args["groups"] == 1  # a grouped convolution ties its units to groups of the input

    def widen_roles(self, args):
        return {"weight": (0, 1), "bias": (0, None)}

    def identity_roles(self, args, in_shapes, scale=1.0):
        k = args["kernel"]
        if (in_shapes[0][0] != args["out"] or args["stride"] != 1 or args["groups"] != 1 or k % 2 == 0
                or self.padding(args) != k // 2):
            return None
        return {"weight": 1.0}

    def weight_geometry(self, args, in_shapes, role):
        # a grouped kernel is not one dense map on all channels: the merit norms do not apply
        dense = role == "weight" and args["groups"] == 1
        return Geometry(tuple(in_shapes[0]), args["stride"], self.padding(args)) if dense else None

    def functional(self, args, params, x):
        return F.conv2d(x, params["weight"], params.get("bias"), stride=args["stride"], padding=self.padding(args),
                        groups=args["groups"])

    def parameter_gradients(self, args, params, x, grad_out, roles):
        """dL/dK: the correlation of the input with grad_out (``conv2d_weight``); dL/db: grad_out
        summed over samples and positions. Neither depends on the parameters."""
        grads = {}
        if "weight" in roles:
            shape = (args["out"], x.shape[1] // args["groups"], args["kernel"], args["kernel"])
            grads["weight"] = conv2d_weight(x, shape, grad_out, stride=args["stride"], padding=self.padding(args),
                                            groups=args["groups"])
        if "bias" in roles:
            grads["bias"] = grad_out.sum(dim=(0, 2, 3))
        return grads

    def parameter_gradient_flops(self, args, in_shapes, out_shape, roles):
        weight = 2 * numel(out_shape) * (in_shapes[0][0] // args["groups"]) * args["kernel"] ** 2 if "weight" in roles else 0
        return weight + (numel(out_shape) if "bias" in roles else 0)


register_op(Conv2dOp)
