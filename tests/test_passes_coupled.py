"""Coupled widening (passes/units.py groups): residual streams, inputs tied by an add, branches
feeding a concat. The function is kept in float64 in eval and train mode with both
initialisations, the optimizer's next step is the unpassed network's, and groups that cannot be
widened exactly are refused with the reason."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import passes
from graphgrow import GraphgrowError, Network, graph_from_text, load_graph
from passes.units import UnitMap, embed_units, trace_units

from conftest import SPECS_DIR, assert_next_step_unchanged, make_spec_text

TOLERANCE = 1e-10
SMALL = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONV_STREAM = make_spec_text([
    "{name: lift, op: conv2d, out: 3, kernel: 3}", "{name: bn0, op: batchnorm}",
    "{name: res0, op: residual, branch: conv2d, activation: relu, kernel: 3}",
    "{name: bn1, op: batchnorm}",
    "{name: res1, op: residual, branch: conv2d, activation: tanh, kernel: 1, form: one_weight}",
    "{name: pool, op: avgpool2d, kernel: 2}", "{name: flat, op: flatten}",
    "{name: head, op: linear, out: 2}"], shape=(2, 4, 4))

CONCAT = make_spec_text([
    "{name: fc1, op: linear, out: 3}", "{name: fc2, op: linear, out: 4, inputs: input}",
    "{name: act2, op: tanh}", "{name: cat, op: concat, inputs: [fc1, act2, act2]}",
    "{name: bn, op: batchnorm}", "{name: head, op: linear, out: 2}"], shape=(3,))


def build(source, seed=0) -> Network:
    graph = load_graph(SPECS_DIR / source) if source.endswith(".yaml") else graph_from_text(source)
    network = Network.build(graph, seed=seed, dtype=torch.float64)
    with torch.no_grad():  # non-trivial batchnorm statistics and weights everywhere
        for name, tensor in network.module.state_dict().items():
            if name.endswith(("running_mean", "running_var", "bn0.weight", "bn1.weight", "bn.weight")):
                tensor.add_(torch.rand(tensor.shape, generator=torch.Generator().manual_seed(5),
                                       dtype=tensor.dtype))
            elif name.endswith("outer.weight"):
                tensor.normal_(generator=torch.Generator().manual_seed(6))
    return network


def difference(old, new, train, seed=1, batch=6) -> float:
    x = torch.randn(batch, *old.graph.input_shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    old.module.train(train)
    new.module.train(train)
    with torch.no_grad():
        return float((old(x) - new(x)).abs().max())


@pytest.mark.parametrize("source, layer", [("resnet_spiral.yaml", "lift"), ("resnet_ode.yaml", "res3"),
                                           ("two_path.yaml", "a1"), ("two_path.yaml", "b1"),
                                           (CONV_STREAM, "res1"), (CONCAT, "fc2"), (CONCAT, "fc1")])
@pytest.mark.parametrize("method", ["sensli", "split"])
@pytest.mark.parametrize("train", [False, True])
def test_coupled_widening_preserves_the_function(source, layer, method, train):
    network = build(source)
    wider, record = passes.widen(network, layer, by=2, method=method, seed=2)
    assert difference(network, wider, train) <= TOLERANCE
    coupling = trace_units(network.graph, layer, network.module.state_dict())
    for producer in coupling.producers:
        assert wider.graph.node(producer).out_shape[0] == network.graph.node(producer).out_shape[0] + 2


def test_residual_stream_widens_every_tied_tensor():
    network = build("resnet_ode.yaml")
    coupling = trace_units(network.graph, "lift", network.module.state_dict())
    assert coupling.producers == ["lift"] and coupling.consumers == ["head"]
    found = {(a.tensor, a.axis, a.side) for a in coupling.axes}
    for k in range(8):  # W rows and columns, b rows of every block
        assert {(f"res{k}.inner.weight", 0, "rows"), (f"res{k}.inner.weight", 1, "columns"),
                (f"res{k}.inner.bias", 0, "rows")} <= found
    wider, _ = passes.widen(network, "res5", by=3)
    state = wider.state()
    assert tuple(state["res0.inner.weight"].shape) == (7, 7) and tuple(state["head.weight"].shape) == (2, 7)
    old = network.state()
    for k in range(8):  # old block in the leading corner, new columns zero, new rows random
        weight = state[f"res{k}.inner.weight"]
        assert torch.equal(weight[:4, :4], old[f"res{k}.inner.weight"])
        assert not weight[:, 4:].any() and weight[4:, :4].abs().min() > 0
    assert not state["head.weight"][:, 4:].any() and state["lift.weight"][4:].abs().min() > 0


def test_add_ties_its_inputs_and_concat_places_columns_at_the_offset():
    network = build("two_path.yaml")
    coupling = trace_units(network.graph, "b2", network.module.state_dict())
    # merged = a1_act + b2 + lift_act: the three layers hold one set of units
    assert sorted(coupling.producers) == ["a1", "b2", "lift"]
    head = [a for a in coupling.axes if a.tensor == "head.weight"]
    assert [a.before for a in head] == [(0, 0)]  # both = concat(merged, a1_act): the units twice, adjacent
    network = build(CONCAT)
    wider, _ = passes.widen(network, "fc2", by=2, method="sensli", seed=1)
    old, new = network.state()["head.weight"], wider.state()["head.weight"]
    # cat = [fc1 (3), act2 (4), act2 (4)]: each copy of act2 gets its 2 new units right after it
    assert new.shape == (2, 15)
    assert torch.equal(new[:, :7], old[:, :7]) and not new[:, 7:9].any()
    assert torch.equal(new[:, 9:13], old[:, 7:11]) and not new[:, 13:].any()
    mean = wider.state()["bn.running_mean"]
    assert torch.equal(mean[[7, 8, 13, 14]], torch.zeros(4, dtype=torch.float64))


def test_embed_units_keeps_other_units_and_follows_each_group_copy():
    grow = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    full = embed_units(grow, 6, (1, 2))  # copies at units 1-2 and 4-5: one other unit before, two
    expected = torch.zeros(8, 6, dtype=torch.float64)
    expected[0, 0] = 1
    expected[1:4, 1:3] = grow
    expected[4, 3] = 1
    expected[5:8, 4:6] = grow
    assert torch.equal(full, expected)


@pytest.mark.parametrize("axis, block, before, after", [(0, 1, (0,), 0), (1, 1, (0,), 0), (1, 3, (0,), 0),
                                                        (0, 1, (0,), 1), (1, 1, (1, 2), 1)])
def test_an_appending_map_is_its_selection_matrix(axis, block, before, after):
    """An appending map (applied by concatenation where it covers the axis) equals the matrix it
    stands for (old units kept, new units zero), on every copy of the units, with other units on
    the axis (``before``, ``after``) and after a flatten (blocks)."""
    units, new = 3, 2
    total = units * len(before) + before[-1] + after
    shape = [4, 4]
    shape[axis] = total * block
    tensor = torch.randn(shape, dtype=torch.float64)
    appending = UnitMap.appending(axis, block, units, new, before=before)
    expected = torch.zeros(units + new, units, dtype=torch.float64)
    expected[:units] = torch.eye(units, dtype=torch.float64)
    assert torch.equal(appending.matrix, expected)
    full = embed_units(expected, total, before)
    split = tensor.reshape(*shape[:axis], total, block, *shape[axis + 1:])
    reference = torch.tensordot(full, split, dims=([1], [axis])).movedim(0, axis)
    assert torch.equal(appending.state(tensor), reference.reshape(appending.state(tensor).shape))
    filled = UnitMap.appending(axis, block, units, new, fill=lambda part: torch.full(part, 7.0), before=before)
    value = filled.value(tensor)
    assert int((value == 7.0).sum()) == new * block * len(before) * 4


@pytest.mark.parametrize("text, node, message", [
    (make_spec_text(["{name: lift, op: linear, out: 3}", "{name: norm, op: layernorm}",
                     "{name: head, op: linear, out: 2}"]), "norm", "mean and variance"),
    (make_spec_text(["{name: lift, op: linear, out: 2}", "{name: skip, op: add, inputs: [lift, input]}",
                     "{name: head, op: linear, out: 2}"]), "skip", "network input"),
    (make_spec_text(["{name: lift, op: linear, out: 2}", "{name: cat, op: concat, inputs: [lift, input]}",
                     "{name: skip, op: add, inputs: [cat, cat]}", "{name: head, op: linear, out: 2}"]),
     "skip", "flow into 'skip'"),
])
def test_groups_that_cannot_be_widened_exactly_are_refused(text, node, message):
    network = build(text)
    with pytest.raises(GraphgrowError, match=message) as error:
        passes.widen(network, "lift", by=1)
    assert error.value.node == node
    assert "lift" not in passes.widenable(network.graph)


@pytest.mark.parametrize("source, layer", [("resnet_ode.yaml", "lift"), ("two_path.yaml", "lift")])
@pytest.mark.parametrize("optimizer_class, hyper", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                                    (torch.optim.Adam, dict(lr=0.01))])
def test_next_optimizer_step_equals_the_unpassed_networks(source, layer, optimizer_class, hyper):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_next_step_unchanged(build(source), lambda n: passes.widen(n, layer, by=2, method="sensli", seed=3),
                               optimizer_class, hyper, x, y)


# -- generated graphs ----------------------------------------------------------------------------

@st.composite
def stream_graphs(draw):
    """A random network with a residual stream (blocks, batchnorm, activations, add skips of a
    linear branch) and a side branch joined by a concat before the head."""
    width = draw(st.integers(2, 4))
    lines = [f"{{name: lift, op: linear, out: {width}}}"]
    previous = "lift"
    for k in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["residual", "batchnorm", "act", "skip"]))
        if kind == "residual":
            form = draw(st.sampled_from(["one_weight", "two_weight"]))
            lines.append(f"{{name: s{k}, op: residual, form: {form}, "
                         f"activation: {draw(st.sampled_from(['tanh', 'relu']))}, h: 0.5}}")
        elif kind == "batchnorm":
            lines.append(f"{{name: s{k}, op: batchnorm}}")
        elif kind == "act":
            lines.append(f"{{name: s{k}, op: {draw(st.sampled_from(['relu', 'sigmoid']))}}}")
        else:
            lines.append(f"{{name: b{k}, op: linear, out: {width}, inputs: {previous}}}")
            lines.append(f"{{name: s{k}, op: add, inputs: [{previous}, b{k}]}}")
        previous = f"s{k}"
    if draw(st.booleans()):
        lines.append(f"{{name: side, op: linear, out: {draw(st.integers(1, 3))}, inputs: input}}")
        order = "[side, %s]" % previous if draw(st.booleans()) else "[%s, side]" % previous
        lines.append(f"{{name: cat, op: concat, inputs: {order}}}")
    lines.append("{name: head, op: linear, out: 2}")
    return make_spec_text(lines, shape=(3,))


@SMALL
@given(text=stream_graphs(), by=st.integers(1, 3), method=st.sampled_from(["sensli", "split"]),
       train=st.booleans(), seed=st.integers(0, 5))
def test_generated_stream_graphs_keep_their_function(text, by, method, train, seed):
    network = build(text, seed=seed)
    for layer in passes.widenable(network.graph):
        units = trace_units(network.graph, layer, network.state()).units
        # split duplicates distinct units: at most as many as the group has (a 1-unit side branch)
        count = min(by, units) if method == "split" else by
        wider, _ = passes.widen(network, layer, by=count, method=method, seed=seed)
        assert difference(network, wider, train) <= TOLERANCE
        if method == "sensli":  # the new units are dead (zero outgoing): pruning them is exact
            pruned, _ = passes.prune(wider, layer, units=list(range(units, units + count)), measure=False)
            old, new = network.state(), pruned.state()
            assert sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)


def test_neuron_candidates_of_groups_sharing_a_concat_mark_the_final_columns():
    network = build(CONCAT)
    extended, record = passes.extend_all(network, "neurons", neurons=2, seed=1)
    assert difference(network, extended, train=True) <= TOLERANCE
    # cat = [fc1 3+2 | act2 4+2 | act2 4+2]
    assert record.candidates["neurons:fc1"].merit == {"head.weight": [(1, 3, 5)]}
    assert record.candidates["neurons:fc2"].merit == {"head.weight": [(1, 9, 11), (1, 15, 17)]}
    head = extended.state()["head.weight"]
    assert not head[:, [3, 4, 9, 10, 15, 16]].any() and head[:, [0, 5, 8, 11, 14]].abs().min() > 0
    kept, _ = passes.keep_candidates(extended, record, ["neurons:fc2"])
    assert kept.graph.node("fc1").args["out"] == 3 and kept.graph.node("fc2").args["out"] == 6
    assert difference(network, kept, train=False) <= TOLERANCE


def test_grouped_convolutions_take_no_part_in_a_coupled_group():
    """A depthwise convolution (OpDef.widens is false) neither widens nor takes more input units:
    the layer feeding it is refused, naming it, and it is no widenable layer itself."""
    graph = load_graph(SPECS_DIR / "mobilenet_v2_small.yaml")
    assert graph.node("b0_dw").args["groups"] > 1 and "b0_dw" not in passes.widenable(graph)
    with pytest.raises(GraphgrowError, match="flow into 'b0_dw'"):
        trace_units(graph, "stem", ())
    with pytest.raises(GraphgrowError, match="'b0_dw' \\(conv2d\\) has no output units"):
        trace_units(graph, "b0_dw", ())
