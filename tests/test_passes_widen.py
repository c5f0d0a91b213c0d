"""widen (thesis 4.19, Net2WiderNet): the function is preserved in float64 on every shipped spec
and on random chains, the new weights get the gradients the thesis predicts, coupled tensors
(flatten columns, batchnorm state) follow, and impossible requests raise GraphgrowError."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import passes
from graphgrow import GraphgrowError, Network, graph_from_text, load_graph
from graphgrow.compiler.tracing import random_input
from passes.units import layers_with_units, map_units, trace_units

from conftest import SPECS_DIR, make_spec_text

TOLERANCE = 1e-10
SMALL = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def shipped(spec):
    """A shipped spec's float64 network, built once (passes leave their input unchanged)."""
    return build(load_graph(SPECS_DIR / spec))


def build(text_or_graph, seed=0):
    graph = graph_from_text(text_or_graph) if isinstance(text_or_graph, str) else text_or_graph
    return Network.build(graph, seed=seed, dtype=torch.float64)


def probe(graph, batch=5, seed=1):
    """Standard normal inputs, or token ids for a token model (gpt_tiny)."""
    return random_input(graph.input_shape, batch, torch.float64, graph.input_tokens, seed)


def max_difference(old, new, x, train=False):
    old.module.train(train)
    new.module.train(train)
    with torch.no_grad():
        return (old(x) - new(x)).abs().max().item()


# -- function preservation -----------------------------------------------------------------------

def shipped_positions():
    for path in sorted(SPECS_DIR.glob("*.yaml")):
        for layer in passes.widenable(load_graph(path)):
            yield pytest.param(path.name, layer, id=f"{path.stem}-{layer}")


@pytest.mark.parametrize("spec,layer", list(shipped_positions()))
@pytest.mark.parametrize("method", ["sensli", "split"])
def test_widen_preserves_function_on_shipped_specs(spec, layer, method):
    network = shipped(spec)
    wider, record = passes.widen(network, layer, by=2, method=method, seed=3)
    # the shipped specs have no batchnorm or dropout: train mode computes the same function
    assert max_difference(network, wider, probe(network.graph, batch=3)) <= TOLERANCE
    node = wider.graph.node(layer)
    assert node.args["out"] == network.graph.node(layer).args["out"] + 2
    assert record.origins[f"{layer}.weight"].kind == "derived"


@st.composite
def widenable_chains(draw):
    """Spec text of a random chain: conv blocks (activation, optional batchnorm and pooling),
    flatten, dense blocks (activation, optional batchnorm, dropout), a linear head."""
    image = draw(st.booleans())
    lines = []
    if image:
        channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 7))
        shape = (channels, size, size)
        for k in range(draw(st.integers(1, 2))):
            kernel = draw(st.sampled_from([1, 3]))
            lines.append(f"{{name: conv{k}, op: conv2d, out: {draw(st.integers(2, 4))}, kernel: {kernel}, "
                         f"padding: {kernel // 2}}}")
            lines.append(f"{{op: {draw(st.sampled_from(['relu', 'tanh', 'sigmoid']))}}}")
            if draw(st.booleans()):
                lines.append("{op: batchnorm}")
            if size >= 4 and draw(st.booleans()):
                lines.append(f"{{op: {draw(st.sampled_from(['maxpool2d', 'avgpool2d']))}, kernel: 2}}")
                size //= 2
        if draw(st.booleans()):
            lines.append("{op: adaptive_avgpool2d, out: 1}")
        lines.append("{op: flatten}")
    else:
        shape = (draw(st.integers(1, 4)),)
    for k in range(draw(st.integers(1, 3))):
        lines.append(f"{{name: fc{k}, op: linear, out: {draw(st.integers(2, 5))}, "
                     f"bias: {str(draw(st.booleans())).lower()}}}")
        lines.append(f"{{op: {draw(st.sampled_from(['relu', 'tanh', 'sigmoid', 'gelu']))}}}")
        if draw(st.booleans()):
            lines.append("{op: batchnorm}")
        if draw(st.booleans()):
            lines.append("{op: dropout, p: 0.3}")
    lines.append("{name: head, op: linear, out: 2}")
    return make_spec_text(lines, shape=shape)


@SMALL
@given(text=widenable_chains(), by=st.integers(1, 3), method=st.sampled_from(["sensli", "split"]),
       seed=st.integers(0, 100))
def test_widen_preserves_function_on_random_chains(text, by, method, seed):
    network = build(text, seed=seed)
    x = probe(network.graph)
    has_dropout = any(node.op == "dropout" for node in network.graph.nodes)
    layers = passes.widenable(network.graph)
    assert layers == [name for name in layers_with_units(network.graph) if name != "head"]
    for layer in layers:
        units = network.graph.node(layer).args["out"]
        wider, _ = passes.widen(network, layer, by=min(by, units), method=method, seed=seed)
        assert max_difference(network, wider, x) <= TOLERANCE, layer
        # a widened dropout draws a mask of another shape; batchnorm uses batch statistics
        if not has_dropout:
            assert max_difference(network, wider, x, train=True) <= TOLERANCE, layer


def test_widen_follows_flatten_and_batchnorm():
    text = make_spec_text(["{name: conv, op: conv2d, out: 3, kernel: 3, padding: 1}",
                           "{name: bn, op: batchnorm}", "{name: act, op: relu}",
                           "{name: pool, op: maxpool2d, kernel: 2}", "{name: flat, op: flatten}",
                           "{name: fc, op: linear, out: 4}"], shape=(2, 4, 4))
    network = build(text)
    network.module.train()
    network(probe(network.graph, batch=8))  # non-trivial running statistics
    wider, record = passes.widen(network, "conv", by=2, method="split", units=[2, 0], alpha=0.8)
    old, new = network.module.state_dict(), wider.module.state_dict()
    assert new["fc.weight"].shape == (4, 5 * 2 * 2)
    # channel c of the flattened image is the block of columns [4c, 4c + 4)
    torch.testing.assert_close(new["fc.weight"][:, 8:12], 0.8 * old["fc.weight"][:, 8:12], rtol=0, atol=0)
    torch.testing.assert_close(new["fc.weight"][:, 12:16], 0.2 * old["fc.weight"][:, 8:12], rtol=0, atol=1e-15)
    torch.testing.assert_close(new["fc.weight"][:, 16:20], 0.2 * old["fc.weight"][:, 0:4], rtol=0, atol=1e-15)
    for buffer in ("running_mean", "running_var", "weight", "bias"):
        torch.testing.assert_close(new[f"bn.{buffer}"], old[f"bn.{buffer}"][[0, 1, 2, 2, 0]], rtol=0, atol=0)
    assert torch.equal(new["bn.num_batches_tracked"], old["bn.num_batches_tracked"])
    assert record.origins["bn.num_batches_tracked"].kind == "carried"
    x = probe(network.graph)
    assert max_difference(network, wider, x) <= TOLERANCE

    fresh, _ = passes.widen(network, "conv", by=2, method="sensli")
    state = fresh.module.state_dict()
    assert torch.equal(state["bn.running_mean"][3:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(state["bn.running_var"][3:], torch.ones(2, dtype=torch.float64))
    assert torch.equal(state["bn.weight"][3:], torch.ones(2, dtype=torch.float64))
    assert max_difference(network, fresh, x) <= TOLERANCE
    assert max_difference(network, fresh, x, train=True) <= TOLERANCE


def test_widen_reaches_every_consumer_of_a_fan_out():
    text = make_spec_text(["{name: fc1, op: linear, out: 3}", "{name: act, op: relu}",
                           "{name: left, op: linear, out: 4, inputs: act}",
                           "{name: right, op: linear, out: 4, inputs: act}",
                           "{name: sum, op: add, inputs: [left, right]}", "{name: head, op: linear, out: 2}"])
    network = build(text)
    wider, record = passes.widen(network, "fc1", by=2, method="split", seed=1)
    assert wider.module.state_dict()["left.weight"].shape == (4, 5)
    assert wider.module.state_dict()["right.weight"].shape == (4, 5)
    assert max_difference(network, wider, probe(network.graph)) <= TOLERANCE
    assert "consumers: left, right" in record.notes[0]


def test_widen_leaves_the_input_network_unchanged():
    network = shipped("cnn_vgg.yaml")
    before = {k: v.clone() for k, v in network.module.state_dict().items()}
    passes.widen(network, "conv1", by=3, method="split")
    after = network.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert network.graph.node("conv1").args["out"] == 16


# -- gradients of the new weights (4.19, 4.20) and symmetry breaking (split) -------------------

def gradients(network, x):
    network.module.zero_grad()
    network(x).square().sum().backward()
    return {name: p.grad for name, p in network.module.named_parameters()}


def test_sensli_units_outgoing_gradient_nonzero_incoming_zero():
    network = shipped("fnn_spiral_deep.yaml")
    wider, _ = passes.widen(network, "fc1", by=3, method="sensli", scale=0.5, seed=2)
    state = wider.module.state_dict()
    assert torch.equal(state["fc2.weight"][:, 4:], torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(state["fc1.bias"][4:], torch.zeros(3, dtype=torch.float64))
    assert state["fc1.weight"][4:].abs().min() > 0
    grads = gradients(wider, probe(network.graph, batch=16))
    # outgoing weights of a new unit: delta times its (non-zero) activation (4.20)
    assert grads["fc2.weight"][:, 4:].abs().sum() > 0
    # incoming weights: the back-propagated signal goes through zero outgoing weights
    assert torch.equal(grads["fc1.weight"][4:], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(grads["fc1.bias"][4:], torch.zeros(3, dtype=torch.float64))


def test_sensli_scale_and_seed_set_the_incoming_weights():
    network = shipped("fnn_spiral.yaml")
    a, _ = passes.widen(network, "fc1", by=400, scale=0.25, seed=7)
    b, _ = passes.widen(network, "fc1", by=400, scale=0.25, seed=7)
    rows = a.module.state_dict()["fc1.weight"][5:]
    assert torch.equal(rows, b.module.state_dict()["fc1.weight"][5:])
    assert abs(rows.std().item() - 0.25) < 0.02


def test_split_duplicates_break_symmetry():
    network = shipped("fnn_spiral_deep.yaml")
    alpha = 0.7
    wider, _ = passes.widen(network, "fc1", by=1, method="split", units=[2], alpha=alpha)
    state = wider.module.state_dict()
    assert torch.equal(state["fc1.weight"][4], state["fc1.weight"][2])
    grads = gradients(wider, probe(network.graph, batch=16))
    # the incoming gradients of the two copies are scaled by alpha and 1 - alpha: not equal
    torch.testing.assert_close(grads["fc1.weight"][2] * (1 - alpha), grads["fc1.weight"][4] * alpha)
    assert not torch.allclose(grads["fc1.weight"][2], grads["fc1.weight"][4])


def test_split_state_is_derived_like_the_values():
    network = build(load_graph(SPECS_DIR / "fnn_spiral_deep.yaml"))
    optimizer = torch.optim.SGD(network.module.parameters(), lr=0.1, momentum=0.9)
    gradients(network, probe(network.graph))
    optimizer.step()
    old_params = dict(network.module.named_parameters())
    old_momentum = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in old_params.items()}
    wider, record = passes.widen(network, "fc1", by=2, method="split", units=[1, 3], alpha=0.6)
    passes.transfer_optimizer(optimizer, network.module, wider.module, record)
    momentum = {n: optimizer.state[p]["momentum_buffer"] for n, p in wider.module.named_parameters()}
    torch.testing.assert_close(momentum["fc1.weight"], old_momentum["fc1.weight"][[0, 1, 2, 3, 1, 3]],
                               rtol=0, atol=0)
    expected_columns = old_momentum["fc2.weight"][:, [0, 1, 2, 3, 1, 3]] * torch.tensor(
        [1, 0.6, 1, 0.6, 0.4, 0.4], dtype=torch.float64)
    torch.testing.assert_close(momentum["fc2.weight"], expected_columns, rtol=0, atol=1e-15)
    assert torch.equal(momentum["head.weight"], old_momentum["head.weight"])


def test_sensli_state_of_new_units_is_zero():
    network = build(load_graph(SPECS_DIR / "fnn_spiral.yaml"))
    optimizer = torch.optim.Adam(network.module.parameters(), lr=0.01)
    gradients(network, probe(network.graph))
    optimizer.step()
    old = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in network.module.named_parameters()}
    wider, record = passes.widen(network, "fc1", by=2)
    passes.transfer_optimizer(optimizer, network.module, wider.module, record)
    state = {n: optimizer.state[p] for n, p in wider.module.named_parameters()}
    assert torch.equal(state["fc1.weight"]["exp_avg"][:5], old["fc1.weight"]["exp_avg"])
    assert torch.equal(state["fc1.weight"]["exp_avg"][5:], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(state["head.weight"]["exp_avg_sq"][:, 5:], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(state["head.bias"]["exp_avg_sq"], old["head.bias"]["exp_avg_sq"])
    assert torch.equal(state["fc1.weight"]["step"], old["fc1.weight"]["step"])


# -- unit maps -------------------------------------------------------------------------------------

def test_map_units_acts_blockwise_on_one_axis():
    tensor = torch.arange(24.0).reshape(2, 12)  # 3 units of 4 columns each
    swap = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    mapped = map_units(tensor, 1, 4, swap)
    assert torch.equal(mapped, torch.cat([tensor[:, 8:12], tensor[:, 0:4]], 1))


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,layer,options,message", [
    ("fnn_spiral.yaml", "nope", {}, "no node 'nope'"),
    ("fnn_spiral.yaml", "act1", {}, "has no output units to widen"),
    ("fnn_spiral.yaml", "head", {}, "reach the network output"),
    ("fnn_spiral.yaml", "fc1", {"by": 0}, "positive number of units"),
    ("fnn_spiral.yaml", "fc1", {"method": "grow"}, "unknown widening method"),
    ("fnn_spiral.yaml", "fc1", {"scale": 0.0}, "positive standard deviation"),
    ("fnn_spiral.yaml", "fc1", {"method": "split", "by": 6}, "cannot split 6 of 5"),
    ("fnn_spiral.yaml", "fc1", {"method": "split", "alpha": 0.5}, "alpha"),
    ("fnn_spiral.yaml", "fc1", {"method": "split", "by": 2, "units": [1, 1]}, "distinct unit indices"),
])
def test_impossible_widening_raises_graphgrow_error(spec, layer, options, message):
    network = shipped(spec)
    with pytest.raises(GraphgrowError, match=message) as error:
        passes.widen(network, layer, **{"by": 1, **options})
    assert error.value.node is not None
    assert error.value.file is not None


def test_trace_units_finds_rows_state_and_blocked_columns():
    graph = load_graph(SPECS_DIR / "cnn_vgg.yaml")
    coupling = trace_units(graph, "conv2", shipped("cnn_vgg.yaml").module.state_dict())
    assert coupling.units == 32 and coupling.consumers == ["fc1"]
    found = {(a.tensor, a.axis, a.block, a.side) for a in coupling.axes}
    # pool2 leaves 7 x 7 per channel: flatten puts channel c at columns [49c, 49c + 49) of fc1
    assert found == {("conv2.weight", 0, 1, "rows"), ("conv2.bias", 0, 1, "rows"),
                     ("fc1.weight", 1, 49, "columns")}


def test_record_value_functions_are_pure():
    network = shipped("fnn_spiral_deep.yaml")
    wider, record = passes.widen(network, "fc1", by=2, seed=4)
    old = network.module.state_dict()
    for name in ("fc1.weight", "fc2.weight"):
        origin = record.origins[name]
        assert origin.kind == "derived" and origin.sources == (name,)
        assert torch.equal(origin.value(old[name]), wider.module.state_dict()[name])
        assert torch.equal(origin.value(old[name]), origin.value(old[name]))


def test_a_width_change_reuses_the_generated_forward_in_an_independent_module():
    network = build(load_graph(SPECS_DIR / "cnn_vgg.yaml"))
    wider, _ = passes.widen(network, "conv2", by=2)
    old, new = network.module, wider.module
    assert new.code == old.code and new.graph is not old.graph and type(new) is not type(old)
    assert [n.meta.get("graphgrow") for n in new.graph.nodes] == [n.meta.get("graphgrow") for n in old.graph.nodes]
    new.recompile()  # the recompiled class is the new module's own: the old one keeps working
    x = probe(network.graph, batch=2)
    assert max_difference(network, wider, x) <= TOLERANCE
    deeper, _ = passes.insert_identity(wider, "act1")  # a new node: code generated afresh
    assert "act1_id" in deeper.module.code and max_difference(network, deeper, x) <= TOLERANCE
