"""Today's vision model families and a token transformer (tests/zoo.py, written for this project) import, compute the
same function in float64 (train and eval mode), round-trip through YAML and export."""
from __future__ import annotations

import pytest
import torch

from graphgrow.compiler.export import export, load_exported
from graphgrow.compiler.importer import import_module
from graphgrow.compiler.io import reload_graph
from graphgrow.compiler.network import Network

from zoo import FAMILIES, TOKENS, family_input

BATCH = 3


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request):
    make, shape = FAMILIES[request.param]
    torch.manual_seed(0)
    model = make().double()
    network = import_module(model, shape, tokens=TOKENS.get(request.param))
    network.module.double()
    return request.param, model, network, family_input(request.param, BATCH)


def _run(module, x, mode: str, seed: int = 7) -> torch.Tensor:
    module.train(mode == "train")
    torch.manual_seed(seed)  # dropout and stochastic depth draw the same numbers in both
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_function(imported, mode):
    name, model, network, x = imported
    expected, got = _run(model, x, mode), _run(network.module, x, mode)
    assert got.dtype == torch.float64
    assert relative_error(got, expected) <= 1e-6, name
    if mode == "train":  # the batch-norm statistics moved alike
        assert relative_error(_run(network.module, x, "eval"), _run(model, x, "eval")) <= 1e-6


def test_yaml_round_trip_and_exports(imported, tmp_path):
    name, model, network, x = imported
    reloaded = Network.build(reload_graph(network.graph), network.state(), dtype=torch.float64)
    expected = _run(network.module, x, "eval")
    assert torch.equal(_run(reloaded.module, x, "eval"), expected)
    assert reloaded.graph.summary() == network.graph.summary()
    for fmt, suffix in (("export", "pt2"), ("torchscript", "pt")):
        path = export(network.module, network.graph, tmp_path / f"{name}.{suffix}", fmt)
        loaded = load_exported(path)
        with torch.no_grad():
            assert relative_error(loaded(x), expected) <= 1e-12, (name, fmt)
            if fmt == "export":  # the batch dimension stays dynamic
                assert relative_error(loaded(x[:1]), expected[:1]) <= 1e-12, name


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit", "token_transformer"])
def test_float32_import_keeps_the_dtype_and_the_function(name):
    make, shape = FAMILIES[name]
    torch.manual_seed(0)
    model = make()
    network = import_module(model, shape, tokens=TOKENS.get(name))
    x = family_input(name, BATCH, torch.float32)
    got, expected = _run(network.module, x, "eval"), _run(model, x, "eval")
    assert got.dtype == torch.float32 and all(p.dtype == torch.float32 for p in network.module.parameters())
    assert relative_error(got, expected) <= 1e-6
