"""Importing existing nn.Modules through fx tracing."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphgrow import GraphgrowError
from graphgrow.compiler.importer import import_module
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
