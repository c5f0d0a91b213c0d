"""SensLI ranks blocks: the sensitivity pass scores a copy of a residual block with its last
layer zero at every block boundary by the gradient of that zero layer, and ``grow`` inserts the
best-ranked copy, on the shipped ResNet and a (small) shipped vision transformer. The merit is
checked against the network with the copy inserted explicitly."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import passes
from graphgrow import GraphgrowError, Network, graph_from_text, load_graph
from graphgrow.sensli import grow, sensitivities

from conftest import SPECS_DIR
from test_passes_transformer import small_vit
from test_train import TINY_LM, next_tokens


def images(count: int, classes: int, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (count,), generator=generator)
    return SimpleNamespace(x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])


def resnet() -> Network:
    network = Network.build(load_graph(SPECS_DIR / "resnet_small.yaml"), seed=0, dtype=torch.float64)
    with torch.no_grad():  # non-trivial batch-norm statistics (the pass runs in eval mode)
        for name, tensor in network.state().items():
            if not name.endswith(("running_mean", "running_var")):
                continue
            noise = torch.rand(tensor.shape, generator=torch.Generator().manual_seed(len(name)), dtype=tensor.dtype)
            if name.endswith("running_mean"):
                tensor.add_(0.2 * (noise - 0.5))
            elif name.endswith("running_var"):
                tensor.mul_(0.5 + noise)
    return network


def explicit_merit(network: Network, candidate, data) -> float:
    """||dL/dW||^2 of the zero layer with the copy inserted by insert_block, from one plain
    backward pass of the grown network over all the data (mean loss, eval mode)."""
    template = passes.block_at(network.graph, candidate.after)
    grown, record = passes.insert_block(network, template.output, candidate.after)
    assert not grown.state()[candidate.param].any()
    grown.module.eval()
    weight = grown.module.get_parameter(candidate.param)
    out = grown.module(data.x_train)  # classes on the last axis, one per sample or per position
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), data.y_train.reshape(-1))
    (grad,) = torch.autograd.grad(loss, weight)
    return float(grad.pow(2).sum())


def source_network(source: str):
    if source == "vit":
        return small_vit(depth=2), images(6, 3)
    if source == "resnet":
        return resnet(), images(6, 10)
    # a language model: its embedding block (token table + position table) is a block whose
    # branch (positions -> table) gives every sample the same values, a batch of one
    return Network.build(graph_from_text(TINY_LM), seed=0, dtype=torch.float64), next_tokens(6, 2)


@pytest.mark.parametrize("source", ["vit", "resnet", "language_model"])
def test_block_merits_are_the_zero_layers_gradient_in_the_grown_network(source):
    network, data = source_network(source)
    report = sensitivities(network, data, batch=4)
    blocks = [c for c in report.candidates if c.kind == "block"]
    assert [c.after for c in blocks] == passes.block_boundaries(network.graph)
    for candidate in blocks:
        expected = explicit_merit(network, candidate, data)
        assert expected > 0
        assert candidate.merit == pytest.approx(expected, rel=1e-9), candidate.position
    if source == "resnet":  # layer and block candidates share the relu outputs: each keeps its own merit
        layers = sensitivities(network, data, batch=4, candidates="layers")
        shared = {c.position: c.merit for c in report.candidates if c.kind != "block"}
        assert shared and all(shared[c.position] == pytest.approx(c.merit, rel=1e-12) for c in layers.candidates)
        assert {c.kind for c in sensitivities(network, data, batch=4, candidates="blocks").candidates} == {"block"}


def test_block_merits_in_float32_agree_with_float64():
    network, data = small_vit(depth=1), images(4, 3)
    double = sensitivities(network, data)
    data32 = SimpleNamespace(x_train=data.x_train.float(), y_train=data.y_train)
    single = sensitivities(network.to(dtype=torch.float32), data32)
    for a, b in zip(double.candidates, single.candidates):
        assert a.position == b.position and b.merit == pytest.approx(a.merit, rel=1e-3)


@pytest.mark.parametrize("source", ["vit", "resnet"])
def test_grow_inserts_the_best_ranked_block(source):
    network, data = (small_vit(depth=2), images(8, 3)) if source == "vit" else (resnet(), images(8, 10))
    network.to(dtype=torch.float32)
    result = grow(network, data, candidates="blocks", epochs=2, insert_at=[1], lr=0.01, batch=8, export=False)
    (event,) = result.insertions
    ranked = max(zip(event["merits"], event["positions"]))  # the one chosen is the best of the report
    assert event["best_ratio"] == event["ratios"][0] and event["positions"] == [ranked[1]]
    template = passes.block_at(network.graph, ranked[1][len("block:"):])
    grown_nodes = len(result.network.graph)
    assert grown_nodes == len(network.graph) + len(template.nodes) - len(template.shortcut)
    assert event["loss_after"] == pytest.approx(event["loss_before"], rel=1e-5)  # the copy keeps the function


def test_unknown_candidate_kinds_are_refused():
    with pytest.raises(GraphgrowError, match="unknown candidate kind") as error:
        sensitivities(small_vit(depth=1), images(2, 3), candidates="heads")
    assert error.value.option == "candidates"
    with pytest.raises(GraphgrowError, match="unknown candidate kind"):
        grow(small_vit(depth=1), images(2, 3), candidates="heads", epochs=2)


def test_the_cli_scores_and_inserts_block_candidates(tmp_path, capsys):
    import json

    import numpy as np

    from graphgrow.cli import main
    data = images(6, 10)
    np.savez(tmp_path / "images.npz", x_train=data.x_train.float().numpy(), y_train=data.y_train.numpy(),
             x_test=data.x_train[:2].float().numpy(), y_test=data.y_train[:2].numpy())
    spec, source = str(SPECS_DIR / "vit_small.yaml"), f"npz:{tmp_path / 'images.npz'}"
    assert main(["sensitivities", spec, "--random-weights", "--data", source, "--candidates", "blocks", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {c["kind"] for c in report["candidates"]} == {"block"} and len(report["candidates"]) == 9
    best = max(report["candidates"], key=lambda c: c["merit"])["position"]
    out = tmp_path / "run"
    assert main(["grow", spec, "--data", source, "--candidates", "blocks", "--epochs", "2", "--insert-at", "1",
                 "--lr", "1e-9", "--batch", "6", "--no-export", "--out", str(out), "--quiet"]) == 0
    (insertion,) = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                    if e["event"] == "insertion"]
    assert insertion["positions"] == [best]  # lr 1e-9: the network at the insertion is the one scored above
