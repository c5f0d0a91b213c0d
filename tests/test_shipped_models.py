"""The shipped ResNet, MobileNetV2-style and vision-transformer specs: they compile, their
parameter counts are the README's and they train (a gradient reaches every parameter). Their
exports in both formats are checked with every shipped spec in tests/test_export.py."""
from __future__ import annotations

import re

import pytest
import torch

from graphgrow import Network, load_graph
from graphgrow.compiler.export import example_input

from conftest import ROOT, SPECS_DIR

MODELS = ["resnet_small", "mobilenet_v2_small", "vit_small", "gpt_tiny"]


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


def test_every_parameter_gets_a_gradient(network):
    x = example_input(network.graph, 4, torch.float64)  # token ids for the language model
    network.module.train()
    network.module(x).square().sum().backward()
    silent = [name for name, p in network.module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
