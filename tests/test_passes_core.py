"""insert_identity, extend_all / keep_candidates and the pass manager: function preservation in
float64, the thesis initialisations (4.11, 4.13, 4.15) and their gradients (4.14a), errors."""
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphgrow
import passes
from graphgrow import GraphgrowError, Network
from graphgrow.compiler.tracing import random_input

SPECS = sorted(Path(__file__).resolve().parent.parent.joinpath("specs").glob("*.yaml"))
TOL = 1e-10


def build(source, seed=0) -> Network:
    graph = graphgrow.load_graph(source) if isinstance(source, Path) else graphgrow.graph_from_text(source)
    return Network.build(graph, seed=seed, dtype=torch.float64)


def probe(network: Network, batch=6, seed=1) -> torch.Tensor:
    """Standard normal inputs, or token ids for a token model (gpt_tiny)."""
    graph = network.graph
    return random_input(graph.input_shape, batch, torch.float64, graph.input_tokens, seed)


def outputs(network: Network, x, train=False, seed=7):
    network.module.train(train)
    torch.manual_seed(seed)  # the same dropout masks for old and new network
    with torch.no_grad():
        out = network(x)
    return out if isinstance(out, tuple) else (out,)


def max_difference(old: Network, new: Network, train=False) -> float:
    x = probe(old)
    return max(float((a - b).abs().max()) for a, b in zip(outputs(old, x, train), outputs(new, x, train)))


def snapshot(network: Network) -> dict:
    return {k: v.clone() for k, v in network.state().items()}


def assert_unchanged(network: Network, before: dict) -> None:
    after = network.state()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


CNN_BN = """
graphgrow: 1
name: cnn_bn
input: {shape: [2, 8, 8]}
layers:
  - {name: conv1, op: conv2d, out: 4}
  - {name: bn1, op: batchnorm}
  - {name: act1, op: relu}
  - {name: drop1, op: dropout, p: 0.3}
  - {name: pool1, op: maxpool2d}
  - {name: conv2, op: conv2d, out: 5}
  - {name: act2, op: relu}
  - {name: flat, op: flatten}
  - {name: fc1, op: linear, out: 6}
  - {name: act3, op: relu}
  - {name: drop2, op: dropout, p: 0.2}
  - {name: head, op: linear, out: 3}
"""


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_insert_identity_preserves_function_at_every_legal_position(spec):
    network = build(spec)
    before = snapshot(network)
    positions = passes.legal_positions(network.graph)
    for after in positions:
        new, record = passes.insert_identity(network, after)
        assert max_difference(network, new) <= TOL
        assert len(new.graph) > len(network.graph)
        assert record.by_kind("new") and not record.by_kind("derived")
        assert all(torch.equal(new.state()[k], network.state()[k]) for k in record.by_kind("carried"))
    assert_unchanged(network, before)


def test_insert_identity_in_train_mode_with_dropout_and_batchnorm():
    network = build(CNN_BN)
    for after in ("act1", "act2", "act3"):
        new, _ = passes.insert_identity(network, after)
        assert max_difference(network, new, train=True) <= TOL
        assert new.module.training


def test_dense_and_conv_initialisations_are_identity_and_dirac():
    network = build(CNN_BN)
    dense, _ = passes.insert_identity(network, "act3")
    conv, _ = passes.insert_identity(network, "act1")
    assert torch.equal(dense.state()["act3_id.weight"], torch.eye(6, dtype=torch.float64))
    assert not dense.state()["act3_id.bias"].any()
    kernel = conv.state()["act1_id.weight"]
    expected = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    for c in range(4):
        expected[c, c, 1, 1] = 1.0  # the centred Dirac delta of (4.15)
    assert torch.equal(kernel, expected)
    assert conv.graph.node("act1_id_act").op == "relu"


@pytest.mark.parametrize("after, form, c, expected", [
    ("act3", "dense", 1.0, {"weight": "identity", "bias": "zeros"}),
    ("act1", "conv", 1.0, {"weight": "dirac", "bias": "zeros"}),
    ("act3", "residual", -0.5, {"inner.weight": "-0.5*identity", "inner.bias": "zeros", "outer.weight": "zeros"}),
    ("act1", "residual", 2.0, {"inner.weight": "2*dirac", "inner.bias": "zeros", "outer.weight": "zeros"}),
])
def test_the_record_names_each_identity_initialisation_as_its_values_are(after, form, c, expected):
    """The names come from the op's identity roles; each is checked against the tensor itself
    (zeros, or c times a unit matrix / centred Dirac kernel built here)."""
    network = build(CNN_BN)
    grown, record = passes.insert_identity(network, after, form=form, c=c)
    prefix = f"{after}_id."
    assert {name[len(prefix):]: record.origins[name].init for name in record.by_kind("new")} == expected
    for role, init in expected.items():
        tensor = grown.state()[prefix + role]
        if init == "zeros":
            assert not tensor.any()
            continue
        scale = float(init.split("*")[0]) if "*" in init else 1.0
        unit = torch.zeros_like(tensor)
        if tensor.dim() == 2:
            unit = torch.eye(tensor.shape[0], dtype=tensor.dtype)
        else:
            for channel in range(tensor.shape[0]):
                unit[channel, channel, tensor.shape[2] // 2, tensor.shape[3] // 2] = 1.0
        assert torch.equal(tensor, scale * unit)


def loss_gradients(network: Network, x, target_seed=3):
    network.module.train(False)
    network.module.zero_grad()
    out = network(x)
    target = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(target_seed))
    ((out - target) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in network.module.named_parameters()}


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_residual_block_W1_gets_exactly_zero_gradient_and_W2_does_not(c):
    network = build(SPECS[[p.stem for p in SPECS].index("resnet_spiral")])
    new, record = passes.insert_identity(network, "res0", c=c)
    state = new.state()
    assert torch.equal(state["res0_id.inner.weight"], c * torch.eye(3, dtype=torch.float64))
    assert not state["res0_id.outer.weight"].any()
    grads = loss_gradients(new, probe(network))
    assert not grads["res0_id.inner.weight"].any()  # (4.14a): W2 = 0 blocks the path to W1
    assert not grads["res0_id.inner.bias"].any()
    assert grads["res0_id.outer.weight"].abs().sum() > 0
    # independent gradient of W2 at W2 = 0 (4.14b): h * sum_i delta_i sigma(W1 x_i + b)^T
    x = probe(network)
    lifted = network.module.res0(network.module.lift(x))
    hidden = torch.tanh(c * lifted)
    out = new(x)
    target = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    delta = 2 * (out - target) @ state["head.weight"]
    assert torch.allclose(grads["res0_id.outer.weight"], delta.T @ hidden, atol=1e-12)


def test_dense_candidate_weight_gets_nonzero_gradient():
    network = build(SPECS[[p.stem for p in SPECS].index("fnn_spiral")])
    new, _ = passes.insert_identity(network, "act1")
    assert loss_gradients(new, probe(network))["act1_id.weight"].abs().sum() > 0


def test_residual_form_after_any_activation():
    network = build(SPECS[[p.stem for p in SPECS].index("two_path")])
    new, record = passes.insert_identity(network, "b1_act", form="residual", activation="sigmoid")
    assert new.graph.node("b1_act_id").args["activation"] == "sigmoid"
    assert max_difference(network, new) <= TOL


@pytest.mark.parametrize("after, form, message", [
    ("b1_act", "auto", "not an idempotent activation"),   # tanh: W = I then tanh changes f
    ("lift", "dense", "not an idempotent activation"),    # a linear output
    ("b1_act", "batchnorm", "batchnorm has no identity"),
    ("lift_akt", "auto", "no node 'lift_akt'"),
])
def test_impossible_insertions_are_refused_with_the_alternative(after, form, message):
    network = build(SPECS[[p.stem for p in SPECS].index("two_path")])
    with pytest.raises(GraphgrowError, match=message) as info:
        passes.insert_identity(network, after, form=form)
    assert info.value.hint and (form == "auto" and after == "lift_akt" or "residual" in info.value.hint
                                or "did you mean" in info.value.hint)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("kind", ["layers", "neurons"])
def test_extend_all_preserves_function_and_keep_none_restores_exactly(spec, kind):
    network = build(spec)
    extended, record = passes.extend_all(network, kind, neurons=2)
    assert max_difference(network, extended) <= TOL
    restored, _ = passes.keep_candidates(extended, record, [])
    assert_unchanged(restored, snapshot(network))
    assert restored.graph.names() == network.graph.names()
    for info in record.candidates.values():
        assert set(info.merit) <= set(info.params) <= set(extended.state())


def test_extend_all_marks_merit_parameters_with_the_thesis_gradients():
    network = build(SPECS[[p.stem for p in SPECS].index("resnet_ode")])
    extended, record = passes.extend_all(network)
    grads = loss_gradients(extended, probe(network))
    # before the first block, after every block (8 blocks: 9 positions), one-weight form: merit W
    assert len(record.candidates) == 9
    for info in record.candidates.values():
        assert info.kind == "residual" and list(info.merit) == [f"{info.nodes[0]}.inner.weight"]
    network = build(CNN_BN)
    extended, record = passes.extend_all(network, "neurons", neurons=2)
    grads = loss_gradients(extended, probe(network))
    info = record.candidates["neurons:fc1"]
    merit = passes.candidate_gradient(grads, info)
    assert [tuple(m.shape) for m in merit] == [(3, 2)]
    assert merit[0].abs().sum() > 0  # outgoing weights of new neurons: merit (4.20)
    assert not grads["fc1.weight"][6:].any()  # their incoming weights: zero gradient while outgoing = 0
    conv = record.candidates["neurons:conv2"]
    assert conv.merit == {"fc1.weight": [(1, 5 * 16, 7 * 16)]}  # columns after the flatten, 4x4 per channel


def test_keep_candidates_equals_inserting_the_kept_candidate_alone():
    network = build(CNN_BN)
    extended, record = passes.extend_all(network)
    assert set(record.candidates) == {"layer:act1", "layer:act2", "layer:act3"}
    kept, result = passes.keep_candidates(extended, record, ["layer:act2"])
    alone, _ = passes.insert_identity(network, "act2")
    assert kept.graph.names() == alone.graph.names()
    assert all(torch.equal(kept.state()[k], alone.state()[k]) for k in alone.state())
    assert list(result.candidates) == ["layer:act2"]
    neurons, record = passes.extend_all(network, "neurons", neurons=3, seed=4)
    kept, _ = passes.keep_candidates(neurons, record, ["neurons:fc1"])
    assert kept.graph.node("fc1").args["out"] == 9 and kept.graph.node("conv1").args["out"] == 4
    assert max_difference(network, kept) <= TOL
    with pytest.raises(GraphgrowError, match="unknown candidate"):
        passes.keep_candidates(extended, record, ["layer:nowhere"])


def test_pipeline_text_round_trips_and_runs_with_verification():
    text = "insert-identity{after=act1},widen{layer=fc1,by=3,method=split,units=[0;2;5],alpha=0.25}," \
           "extend-all{candidates=neurons}"
    pipeline = passes.Pipeline.parse(text)
    assert str(pipeline) == text and passes.Pipeline.parse(str(pipeline)) == pipeline
    assert pipeline.steps[1].options == (("layer", "fc1"), ("by", 3), ("method", "split"),
                                         ("units", [0, 2, 5]), ("alpha", 0.25))
    network = build(CNN_BN)
    new, records = pipeline.run(network, verify=True)
    assert [r.pass_name for r in records] == ["insert-identity", "widen", "extend-all"]
    assert max_difference(network, new) <= TOL


@pytest.mark.parametrize("text, message", [
    ("insert-identity{after=act1},widen{layer=head,by=2}", "pass widen.*failed.*output"),
    ("insert-identity{after=act1},insert-identity{after=conv1}", "insert-identity.*failed.*conv1"),
    ("widen{layer=fc1,by=2,colour=red}", "pass widen.*failed.*no option 'colour'"),
    ("widen{by=2}", "pass widen.*failed.*needs option.*layer"),
])
def test_pipeline_failure_names_the_pass_the_passes_before_and_the_node(text, message):
    with pytest.raises(GraphgrowError, match=message) as info:
        passes.Pipeline.parse(text).run(build(CNN_BN), verify=True)
    if text.count("}") > 1:
        assert "passes before it: insert-identity{after=act1}" in info.value.hint
    if "conv1" in text:
        assert info.value.node == "conv1"


@pytest.mark.parametrize("text, message", [
    ("widen{layer=fc1", "cannot read pipeline"), ("widden{layer=fc1}", "did you mean 'widen'"),
    ("widen{layer}", "not key=value"), ("widen{layer=fc1},", "ends with a comma"),
])
def test_pipeline_parse_errors(text, message):
    with pytest.raises(GraphgrowError, match=message):
        passes.Pipeline.parse(text)


NUMERIC_NAMES = """
graphgrow: 1
name: numeric_names
input: {shape: [3]}
layers:
  - {name: inf, op: linear, out: 4}
  - {name: nan, op: relu}
  - {name: head, op: linear, out: 2}
"""


def test_pipeline_option_values_keep_the_type_the_pass_declares():
    pipeline = passes.Pipeline.parse("insert-identity{after=nan,c=2}")
    assert pipeline.steps[0].options == (("after", "nan"), ("c", 2.0))
    assert passes.Pipeline.parse(str(pipeline)) == pipeline
    network = build(NUMERIC_NAMES)
    wider, records = passes.Pipeline.parse("widen{layer=inf,by=2,scale=1},insert-identity{after=nan}").run(
        network, verify=True)
    assert wider.graph.node("inf").args["out"] == 6 and records[1].pass_name == "insert-identity"
    with pytest.raises(GraphgrowError, match="'nan' is not int"):
        passes.Pipeline.parse("widen{layer=inf,by=nan}")
    with pytest.raises(GraphgrowError, match="not a finite number"):
        passes.Pipeline.parse("widen{layer=inf,by=2,scale=inf}")


def test_verification_catches_a_pass_that_changes_the_function():
    def breaking(network):
        state = {k: v.clone() for k, v in network.state().items()}
        state["fc1.bias"] += 1.0
        return Network.build(network.graph.copy(), state, dtype=torch.float64), passes.Record("break-it")
    passes.register_pass("break-it", breaking)
    try:
        with pytest.raises(GraphgrowError, match="function changed"):
            passes.Pipeline.parse("break-it").run(build(CNN_BN), verify=True)
    finally:
        del passes.PASSES["break-it"]


# -- random graphs ------------------------------------------------------------------------------

@st.composite
def random_chains(draw):
    """Vector chains of linear layers with activations, batchnorm and dropout in between."""
    layers, widths = [], []
    for k in range(draw(st.integers(1, 4))):
        width = draw(st.integers(1, 6))
        widths.append(width)
        layers.append(f"  - {{name: fc{k}, op: linear, out: {width}}}")
        if draw(st.booleans()):
            layers.append(f"  - {{name: bn{k}, op: batchnorm}}")
        layers.append(f"  - {{name: act{k}, op: {draw(st.sampled_from(['relu', 'relu', 'tanh']))}}}")
        if draw(st.booleans()):
            layers.append(f"  - {{name: drop{k}, op: dropout, p: 0.25}}")
    layers.append("  - {name: head, op: linear, out: 2}")
    text = "graphgrow: 1\nname: random\ninput: {shape: [3]}\nlayers:\n" + "\n".join(layers) + "\n"
    return text, draw(st.integers(0, 10 ** 6))


@settings(max_examples=25, deadline=None)
@given(random_chains(), st.data())
def test_random_graphs_keep_their_function_under_every_pass(chain, data):
    text, seed = chain
    network = build(text, seed=seed)
    train = data.draw(st.booleans())
    positions = passes.legal_positions(network.graph)
    for after in data.draw(st.lists(st.sampled_from(positions), max_size=2)) if positions else []:
        new, _ = passes.insert_identity(network, after)
        assert max_difference(network, new, train) <= TOL
    for after in data.draw(st.lists(st.sampled_from(network.graph.names()[:-1]), max_size=1)):
        new, _ = passes.insert_identity(network, after, form="residual")
        assert max_difference(network, new, train) <= TOL
    # widening through dropout draws masks for a wider tensor, so train-mode outputs differ
    # (equal in expectation); eval mode is exact
    train = train and "dropout" not in text
    layers = passes.widenable(network.graph)
    for layer in data.draw(st.lists(st.sampled_from(layers), max_size=2)) if layers else []:
        method = data.draw(st.sampled_from(["sensli", "split"]))
        by = data.draw(st.integers(1, network.graph.node(layer).args["out"]))
        new, _ = passes.widen(network, layer, by, method=method, seed=seed)
        assert max_difference(network, new, train) <= TOL
