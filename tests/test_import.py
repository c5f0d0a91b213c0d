"""Importing existing nn.Modules through fx tracing."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphgrow import GraphgrowError
from graphgrow.compiler.importer import import_module
from graphgrow.ops.base import _REGISTRY, Arg, OpDef, positive_int, require
from graphgrow.ops.residual import Residual


class TwoWeightBlock(nn.Module):
    def __init__(self, width, h=1.0):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width, bias=False)
        self.h = h

    def forward(self, x):
        return x + self.h * self.outer(torch.tanh(self.inner(x)))


class OneWeightBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return x + F.relu(self.lin(x))


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


def _assert_same(module, network, shape):
    torch.manual_seed(1)
    probe = torch.randn(4, *shape)
    module.eval(), network.module.eval()
    with torch.no_grad():
        assert torch.allclose(module(probe), network.module(probe), atol=1e-6)


def test_sequential_mlp_imports_with_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 2))
    network = import_module(model, (2,))
    assert [n.op for n in network.graph.nodes] == ["linear", "relu", "linear"]
    assert network.graph.num_params() == 27
    _assert_same(model, network, (2,))


def test_residual_modules_fold_into_residual_nodes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3, bias=False), TwoWeightBlock(3, h=0.5), OneWeightBlock(3),
                          nn.Linear(3, 2, bias=False))
    network = import_module(model, (2,))
    blocks = [n for n in network.graph.nodes if n.op == "residual"]
    assert [(b.args["form"], b.args["activation"], b.args["h"]) for b in blocks] == [
        ("two_weight", "tanh", 0.5), ("one_weight", "relu", 1.0)]
    assert torch.equal(network.state()[f"{blocks[0].name}.outer.weight"], model[1].outer.weight)
    _assert_same(model, network, (2,))


def test_conv_residual_and_cnn_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), ConvBlock(4),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 4 * 4, 3))
    network = import_module(model, (1, 8, 8))
    ops = [n.op for n in network.graph.nodes]
    assert ops == ["conv2d", "batchnorm", "relu", "residual", "maxpool2d", "flatten", "dropout", "linear"]
    _assert_same(model, network, (1, 8, 8))


def test_graphgrow_residual_module_is_kept_whole():
    block = Residual(nn.Linear(3, 3), None, nn.Tanh(), 0.25)
    network = import_module(nn.Sequential(block, nn.Linear(3, 1)), (3,))
    assert network.graph.nodes[0].op == "residual" and network.graph.nodes[0].args["h"] == 0.25


def test_functional_calls_and_branches():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(8, 1)

        def forward(self, x):
            left = F.relu(self.a(x))
            right = torch.sigmoid(self.b(x)) * 2.0
            return self.head(torch.cat([left, right], dim=1))

    model = Branchy()
    network = import_module(model, (2,))
    assert {n.op for n in network.graph.nodes} >= {"concat", "scale", "relu", "sigmoid"}
    _assert_same(model, network, (2,))


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Linear(2, 3), nn.ELU())
    with pytest.raises(GraphgrowError) as err:
        import_module(model, (2,))
    assert "ELU" in str(err.value) and err.value.node == "1"


def test_unsupported_setting_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2))
    with pytest.raises(GraphgrowError, match="dilation"):
        import_module(model, (1, 9, 9))


def test_untraceable_module():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(GraphgrowError, match="cannot trace"):
        import_module(Dynamic(), (2,))


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 3), nn.ELU())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        x = torch.cumsum(self.body(x), dim=1)  # line A: a function no op imports
        return self.head(x).exp()  # line B: a method no op imports


def test_every_unsupported_call_is_reported_with_module_path_and_line():
    with pytest.raises(GraphgrowError) as info:
        import_module(ManyUnsupported(), (2,))
    problems = info.value.problems
    source = open(__file__).read().splitlines()
    line_a = next(i for i, text in enumerate(source, 1) if "# line A" in text)
    line_b = next(i for i, text in enumerate(source, 1) if "# line B" in text)
    assert [(p.node, p.line) for p in problems] == [("body.1", line_a), ("ManyUnsupported", line_a),
                                                         ("ManyUnsupported", line_b)]
    assert all(p.file == __file__ for p in problems)
    assert "ELU" in problems[0].message and "imports_modules" in problems[0].hint
    assert "3 unsupported call(s)" in str(info.value) and "cumsum" in str(info.value) and ".exp()" in str(info.value)


class DilatedConv2d(OpDef):
    """A user's op for dilated nn.Conv2d, which the shipped conv2d refuses."""
    name = "dilated_conv2d"
    args = (Arg("out", positive_int), Arg("kernel", positive_int), Arg("dilation", positive_int))
    imports_modules = (nn.Conv2d,)

    def args_from_module(self, module):
        require(module.dilation[0] > 1 and module.padding == (0, 0) and module.bias is None, "a plain convolution")
        return {"out": module.out_channels, "kernel": module.kernel_size[0], "dilation": module.dilation[0]}

    def output_shape(self, args, in_shapes):
        reach = args["dilation"] * (args["kernel"] - 1)
        return (args["out"], in_shapes[0][1] - reach, in_shapes[0][2] - reach)

    def build_module(self, args, in_shapes):
        return nn.Conv2d(in_shapes[0][0], args["out"], args["kernel"], dilation=args["dilation"], bias=False)


def test_import_chooses_among_ops_claiming_a_module_by_their_argument_checks(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "dilated_conv2d", DilatedConv2d())
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, dilation=2, bias=False))
    network = import_module(model, (1, 9, 9))
    assert [n.op for n in network.graph.nodes] == ["conv2d", "dilated_conv2d"]
    _assert_same(model, network, (1, 9, 9))


def test_shapes_from_size_arithmetic_become_plain_arguments():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(2, 4, 2, 2)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            b, c, h, w = x.size()
            x = self.proj(x).view(b, 4, (h // 2) * (w // 2)).transpose(1, 2)
            first, second = self.norm(x).chunk(2, dim=-1)
            return (first * second).mean(1)

    model = Tokens()
    network = import_module(model, (2, 6, 6))
    by_op = {n.op: n for n in network.graph.nodes}
    assert by_op["reshape"].args == {"shape": [4, 9]} and by_op["layernorm"].args["dims"] == 1
    assert sorted((n.args["start"], n.args["length"]) for n in network.graph.nodes if n.op == "narrow") == [(0, 2), (2, 2)]
    _assert_same(model, network, (2, 6, 6))


def test_a_tensor_that_moves_the_batch_dimension_is_refused():
    class Swap(nn.Module):
        def forward(self, x):
            return x.transpose(0, 1)

    with pytest.raises(GraphgrowError, match="not the batch"):
        import_module(Swap(), (3,))


PLUGIN = '''
from torch import nn
from graphgrow.ops.base import Arg, positive_int
from graphgrow.ops.conv import Conv2dOp


class DilatedConv2dOp(Conv2dOp):
    """The shipped conv2d replaced by one with a dilation argument."""
    args = (*Conv2dOp.args, Arg("dilation", positive_int, 1))

    def output_shape(self, args, in_shapes):
        reach = args["dilation"] * (args["kernel"] - 1) + 1
        return super().output_shape({**args, "kernel": reach, "padding": 0}, in_shapes)
'''


def test_a_replaced_shipped_op_from_an_entry_point_is_used_by_the_cli(tmp_path):
    (tmp_path / "userops.py").write_text(PLUGIN)
    dist = tmp_path / "userops-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userops\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graphgrow.ops]\nconv2d = userops:DilatedConv2dOp\n")
    spec = tmp_path / "dilated.yaml"
    spec.write_text("graphgrow: 1\nname: d\ninput: {shape: [1, 9, 9]}\nlayers:\n"
                    "  - {name: c, op: conv2d, out: 2, padding: 0, dilation: 2}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "graphgrow", "check", str(spec), "--json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"][0]["output_shape"] == [2, 5, 5]


class HandWrittenAttention(nn.Module):
    """Self-attention written with F.scaled_dot_product_attention (the functional form)."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda t: t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


def test_functional_attention_imports():
    torch.manual_seed(0)
    model = HandWrittenAttention()
    network = import_module(model, (5, 8))
    assert "scaled_dot_product_attention" in [n.op for n in network.graph.nodes]
    _assert_same(model, network, (5, 8))


def test_functional_calls_with_the_module_s_own_parameters_adopt_them():
    class OwnWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
            self.gain, self.shift = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

        def forward(self, x):
            x = F.linear(x, self.weight, self.bias)
            return F.layer_norm(x, (4,), self.gain, self.shift, 1e-3)

    model = OwnWeights()
    network = import_module(model, (3,))
    linear, norm = network.graph.nodes
    assert (linear.op, linear.args) == ("linear", {"out": 4, "bias": True})
    assert (norm.op, norm.args) == ("layernorm", {"eps": 1e-3, "dims": 1})
    assert torch.equal(network.state()[f"{norm.name}.weight"], model.gain.detach())
    _assert_same(model, network, (3,))


def test_a_functional_layer_norm_without_weights_is_refused():
    class Bare(nn.Module):
        def forward(self, x):
            return F.layer_norm(x, (3,))

    with pytest.raises(GraphgrowError, match="without weight and bias"):
        import_module(Bare(), (3,))
