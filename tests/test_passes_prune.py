"""prune: removing dead units (zero outgoing weights) and identity layers is exact, through the
same coupled groups as widening; scores against independent formulas; the measured change of a
lossy removal; optimizer state and the pipeline syntax."""
from __future__ import annotations

import pytest
import torch

import passes
from graphgrow import GraphgrowError, Network, graph_from_text, load_graph

from conftest import SPECS_DIR


def build(source, seed=0) -> Network:
    graph = load_graph(SPECS_DIR / source) if source.endswith(".yaml") else graph_from_text(source)
    return Network.build(graph, seed=seed, dtype=torch.float64)


def assert_same_state(a: Network, b: Network):
    sa, sb = a.state(), b.state()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("source, layer", [("fnn_spiral_deep.yaml", "fc1"), ("cnn_vgg.yaml", "conv2"),
                                           ("resnet_ode.yaml", "lift"), ("two_path.yaml", "a1"),
                                           ("two_path.yaml", "b1")])
def test_pruning_dead_units_is_exact(source, layer):
    network = build(source)
    wider, _ = passes.widen(network, layer, by=3, method="sensli", seed=1)  # zero outgoing weights
    pruned, record = passes.prune(wider, layer, count=3)
    assert record.change <= 1e-15  # the rounding of sums of a different length, no more
    assert_same_state(pruned, network)  # the new units were the ones removed, the rest bit for bit


def test_pruning_dead_units_in_float32_keeps_dtype_and_bits():
    network = Network.build(load_graph(SPECS_DIR / "resnet_spiral.yaml"), seed=0, dtype=torch.float32)
    wider, _ = passes.widen(network, "res0", by=2, method="sensli", seed=1)
    pruned, record = passes.prune(wider, "lift", count=2)
    assert all(t.dtype == torch.float32 for t in pruned.state().values())
    assert_same_state(pruned, network)
    assert record.change <= 1e-6


def test_magnitude_scores_are_the_outgoing_weight_norms_after_a_flatten():
    network = build("cnn_vgg.yaml")
    coupling = passes.trace_units(network.graph, "conv2", network.state())
    scores = passes.unit_scores(network, coupling)
    columns = network.state()["fc1.weight"].reshape(128, 32, 49)
    torch.testing.assert_close(scores, columns.pow(2).sum((0, 2)).sqrt(), rtol=1e-12, atol=0)


def test_sensitivity_scores_are_first_order_loss_changes():
    network = build("fnn_spiral_deep.yaml")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(network(x), y)
    gradients = dict(zip([n for n, _ in network.module.named_parameters()],
                         torch.autograd.grad(loss, list(network.module.parameters()))))
    coupling = passes.trace_units(network.graph, "fc2", network.state())
    scores = passes.unit_scores(network, coupling, "sensitivity", gradients)
    weight = network.state()["head.weight"]
    torch.testing.assert_close(scores, (gradients["head.weight"] * weight).sum(0).abs(), rtol=1e-12, atol=0)
    # first order: zeroing unit u's outgoing weights changes the loss by about -<g, w>
    eps = 1e-4
    for unit in range(4):
        state = {k: v.clone() for k, v in network.state().items()}
        state["head.weight"][:, unit] *= 1 - eps
        changed = Network.build(network.graph.copy(), state, dtype=torch.float64)
        delta = float(torch.nn.functional.cross_entropy(changed(x), y).detach() - loss.detach())
        assert abs(abs(delta) / eps - float(scores[unit])) <= 1e-3 * max(float(scores[unit]), 1e-3)
    pruned, record = passes.prune(network, "fc2", count=1, criterion="sensitivity", gradients=gradients)
    assert pruned.graph.node("fc2").args["out"] == 3 and record.change > 0  # live unit: a measured change


@pytest.mark.parametrize("source, after, form", [("fnn_spiral_deep.yaml", "act1", "auto"),
                                                 ("cnn_vgg.yaml", "act2", "auto"),
                                                 ("resnet_ode.yaml", "res3", "residual")])
def test_pruning_an_inserted_identity_layer_is_exact(source, after, form):
    network = build(source)
    deeper, _ = passes.insert_identity(network, after, form=form)
    distances = passes.identity_distances(deeper.graph, deeper.state())
    inserted = next(n for n in deeper.graph.names() if n not in network.graph)
    assert distances[inserted][0] == 0.0
    pruned, record = passes.prune(deeper, layers=True, tolerance=0.0)
    assert record.change == 0.0 and pruned.graph.names() == network.graph.names()
    assert_same_state(pruned, network)


def test_a_residual_block_near_the_identity_is_removed_with_its_measured_change():
    network = build("resnet_spiral.yaml")
    state = {k: v.clone() for k, v in network.state().items()}
    state["res0.outer.weight"] *= 1e-4
    network = Network.build(network.graph.copy(), state, dtype=torch.float64)
    distance = passes.identity_distances(network.graph, network.state())["res0"][0]
    assert distance == pytest.approx(float(state["res0.outer.weight"].norm()))
    pruned, record = passes.prune(network, layers=True, count=1)
    assert "res0" not in pruned.graph and 0 < record.change <= 1e-3
    assert record.change == passes.record.function_change(network, pruned)


def test_pruned_units_keep_their_optimizer_state():
    network = build("fnn_spiral_deep.yaml")
    optimizer = torch.optim.SGD(network.module.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    optimizer.zero_grad()
    network(x).pow(2).sum().backward()
    optimizer.step()
    buffers = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in network.module.named_parameters()}
    pruned, record = passes.prune(network, "fc1", units=[0, 2])
    passes.transfer_optimizer(optimizer, network.module, pruned.module, record)
    new = dict(pruned.module.named_parameters())
    assert torch.equal(optimizer.state[new["fc1.weight"]]["momentum_buffer"], buffers["fc1.weight"][[1, 3]])
    assert torch.equal(optimizer.state[new["fc2.weight"]]["momentum_buffer"], buffers["fc2.weight"][:, [1, 3]])
    assert torch.equal(optimizer.state[new["head.weight"]]["momentum_buffer"], buffers["head.weight"])


def test_prune_in_the_pipeline_undoes_a_sensli_widening():
    text = "widen{layer=lift,by=2},prune{layer=res1,count=2},insert-identity{after=res0,form=residual}," \
           "prune{layers=true,tolerance=0.0}"
    pipeline = passes.Pipeline.parse(text)
    assert str(pipeline) == text and passes.Pipeline.parse(str(pipeline)) == pipeline
    network = build("resnet_ode.yaml")
    result, records = pipeline.run(network, verify=True)
    assert all(r.change <= 1e-15 for r in records if r.pass_name == "prune")
    assert_same_state(result, network)


@pytest.mark.parametrize("options, message", [
    ({"layer": "fc1", "count": 4}, "without units"), ({"layer": "fc1", "units": [7]}, r"indices in \[0, 4\)"),
    ({}, "name the layer"), ({"layer": "fc1", "criterion": "sensitivity"}, "needs the loss gradients"),
    ({"layer": "fc1", "criterion": "size"}, "unknown pruning criterion"),
    ({"layer": "fc1", "layers": True}, "not an identity-like layer"),
])
def test_impossible_pruning_is_refused(options, message):
    with pytest.raises(GraphgrowError, match=message):
        passes.prune(build("fnn_spiral_deep.yaml"), **options)
