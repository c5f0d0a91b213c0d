"""The shipped ResNet, MobileNetV2-style and vision-transformer specs: they compile, their
parameter counts are the README's, they export in both formats (eval mode) with the same
function, and they train (a gradient reaches every parameter)."""
from __future__ import annotations

import re

import pytest
import torch

from graphgrow import Network, load_graph
from graphgrow.compiler.export import export, load_exported

from conftest import ROOT, SPECS_DIR

MODELS = ["resnet_small", "mobilenet_v2_small", "vit_small"]


@pytest.fixture(scope="module", params=MODELS)
def network(request):
    graph = load_graph(SPECS_DIR / f"{request.param}.yaml")
    return Network.build(graph, seed=0, dtype=torch.float64)


def test_parameter_count_is_the_readme_figure(network):
    readme = (ROOT / "README.md").read_text()
    row = re.search(rf"^\| `{network.graph.name}\.yaml` \|.*\| ([\d,]+) \|$", readme, re.MULTILINE)
    assert row is not None, f"README has no row for {network.graph.name}"
    assert int(row.group(1).replace(",", "")) == network.graph.num_params() == \
        sum(p.numel() for p in network.module.parameters())


def test_exports_compute_the_same_function(network, tmp_path):
    x = torch.randn(2, *network.graph.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    network.module.eval()
    with torch.no_grad():
        expected = network.module(x)
        for fmt, suffix in (("export", "pt2"), ("torchscript", "pt")):
            loaded = load_exported(export(network.module, network.graph, tmp_path / f"m.{suffix}", fmt))
            torch.testing.assert_close(loaded(x), expected, rtol=1e-12, atol=1e-12)


def test_every_parameter_gets_a_gradient(network):
    x = torch.randn(4, *network.graph.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    network.module.train()
    network.module(x).square().sum().backward()
    silent = [name for name, p in network.module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
