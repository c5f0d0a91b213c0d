"""A transformer grows: in width by MLP hidden units (token features) and by attention heads
(new rows of the query, key and value projections, zero columns of the output projection),
function preserved in float64 in train and eval mode with the optimizer's next step unchanged;
and in depth by blocks (insert-block on pre-norm attention and MLP sub-blocks, depth
hierarchies on transformer blocks)."""
from __future__ import annotations

import math

import pytest
import torch

import passes
from graphgrow import GraphgrowError, Network, graph_from_text
from graphgrow.ops.attention import HeadAttention

from conftest import SPECS_DIR, assert_next_step_unchanged

TOLERANCE = 1e-10
SHIPPED_VARS = "vars: {patch: 4, dim: 64, heads: 4, mlp: 128, depth: 4, classes: 10}"
# the shipped vision transformer, made small: 8x8 patches (17 tokens), width 16, 2 heads, MLP 24
SMALL_VARS = "vars: {patch: 8, dim: 16, heads: 2, mlp: 24, depth: 4, classes: 3}"


def small_vit(depth: int = 4, seed: int = 0) -> Network:
    text = (SPECS_DIR / "vit_small.yaml").read_text()
    assert SHIPPED_VARS in text
    graph = graph_from_text(text.replace(SHIPPED_VARS, SMALL_VARS.replace("depth: 4", f"depth: {depth}")))
    network = Network.build(graph, seed=seed, dtype=torch.float64)
    with torch.no_grad():  # layer norms and biases off their initial values
        for name, tensor in network.module.state_dict().items():
            if "norm" in name or name.endswith("bias"):
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name)),
                                              dtype=tensor.dtype))
    return network


def probe(network: Network, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *network.graph.input_shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def difference(old: Network, new: Network, train: bool) -> float:
    x = probe(old)
    old.module.train(train), new.module.train(train)
    with torch.no_grad():
        return float((old(x) - new(x)).abs().max())


# -- width: MLP hidden units and heads ------------------------------------------------------------

@pytest.mark.parametrize("layer", ["t2_fc1", "t3_attention"])
@pytest.mark.parametrize("method", ["sensli", "split"])
def test_a_transformer_widens_by_mlp_units_and_heads_exactly(layer, method):
    network = small_vit()
    wider, record = passes.widen(network, layer, by=2, method=method, seed=4)
    for train in (False, True):
        assert difference(network, wider, train) <= TOLERANCE
    node, old = wider.graph.node(layer), network.graph.node(layer)
    if layer.endswith("attention"):
        assert (node.args["heads"], node.args["head_dim"]) == (4, 8) and old.args["heads"] == 2
        assert node.out_shape == old.out_shape  # the tokens keep their width
        assert isinstance(wider.module.get_submodule(layer), HeadAttention)
        assert "by 2 heads" in record.notes[0]
    else:
        assert node.out_shape == (17, 26) and wider.graph.node("t2_fc2").param_shapes()["weight"] == (16, 26)
    if method == "sensli":  # the new units' outgoing weights are zero, their incoming ones are not
        outgoing = "t3_attention.out_proj.weight" if layer.endswith("attention") else "t2_fc2.weight"
        incoming = "t3_attention.in_proj_weight" if layer.endswith("attention") else "t2_fc1.weight"
        new_columns = wider.state()[outgoing][:, -2 * (8 if layer.endswith("attention") else 1):]
        assert not new_columns.any() and wider.state()[incoming][-2:].abs().sum() > 0


def test_new_heads_sit_where_the_attention_op_keeps_its_heads():
    """The new head's rows follow the old heads in each of q, k and v, and its output columns
    follow theirs: an independent computation of each head from the projections agrees."""
    network = small_vit(depth=1)
    wider, _ = passes.widen(network, "t1_attention", by=1, seed=5)
    module = wider.module.get_submodule("t1_attention")
    x = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weight, bias = module.in_proj_weight.detach(), module.in_proj_bias.detach()
    heads, d = 3, 8
    outputs = []
    for h in range(heads):
        q, k, v = (x @ weight[part * heads * d + h * d:part * heads * d + (h + 1) * d].T
                   + bias[part * heads * d + h * d:part * heads * d + (h + 1) * d] for part in range(3))
        outputs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1) @ v)
    expected = torch.cat(outputs, -1) @ module.out_proj.weight.detach().T + module.out_proj.bias.detach()
    torch.testing.assert_close(module(x, x, x)[0], expected, rtol=0, atol=1e-12)
    old = network.module.get_submodule("t1_attention")
    torch.testing.assert_close(weight[:16], old.in_proj_weight.detach()[:16], rtol=0, atol=0)  # old q rows
    torch.testing.assert_close(weight[24:40], old.in_proj_weight.detach()[16:32], rtol=0, atol=0)  # old k rows


def test_widened_heads_prune_back_to_the_original_network():
    network = small_vit(depth=1)
    wider, _ = passes.widen(network, "t1_attention", by=2, seed=5)
    back, record = passes.prune(wider, "t1_attention", units=[2, 3])
    assert record.change <= TOLERANCE and back.graph.node("t1_attention").args["heads"] == 2
    assert isinstance(back.module.get_submodule("t1_attention"), torch.nn.MultiheadAttention)
    assert all(torch.equal(back.state()[k], v) for k, v in network.state().items())


def test_heads_widen_in_a_pipeline_and_round_trip_through_yaml(tmp_path):
    from graphgrow import load_graph, save
    from graphgrow.compiler.io import load_weights
    network = small_vit(depth=1)
    wider, _ = passes.Pipeline.parse("widen{layer=t1_attention,by=1},widen{layer=t1_fc1,by=3}").run(network)
    save(wider, tmp_path / "grown.yaml")
    again = Network.build(load_graph(tmp_path / "grown.yaml"), load_weights(tmp_path / "grown.pt"), dtype=torch.float64)
    assert again.graph.node("t1_attention").args == {"heads": 3, "bias": True, "dropout": 0.0, "causal": False, "head_dim": 8}
    assert difference(wider, again, False) == 0.0


@pytest.mark.parametrize("optimizer_class, hyper", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                                    (torch.optim.Adam, dict(lr=0.01))])
def test_next_optimizer_step_after_adding_heads_and_units_is_the_unpassed_networks(optimizer_class, hyper):
    network = small_vit(depth=1)
    network.module.train()
    x, y = probe(network, batch=4), torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def grow(network):
        wider, first = passes.widen(network, "t1_attention", by=2, seed=3)
        wider, second = passes.widen(wider, "t1_fc1", by=3, seed=4)
        return wider, first.then(second)

    # the grown attention runs per-head kernels instead of MultiheadAttention's fused one: its
    # gradients agree to rounding, which Adam's division by sqrt(v) scales up where v is small
    assert_next_step_unchanged(network, grow, optimizer_class, hyper, x, y, rtol=1e-9)


def test_widening_is_refused_where_it_cannot_be_exact():
    network = small_vit(depth=1)
    with pytest.raises(GraphgrowError, match="layer norm normalises over all per-sample entries") as error:
        passes.widen(network, "t1_fc2", by=1)  # the residual stream reaches the next layer norm
    assert error.value.node == "norm"
    with pytest.raises(GraphgrowError, match="has no output units to widen"):
        passes.widen(network, "t1_norm1", by=1)


def test_widening_in_float32_keeps_the_function():
    network = small_vit(depth=1)
    network.to(dtype=torch.float32)
    wider, _ = passes.widen(network, "t1_attention", by=1, seed=2)
    x = probe(network).float()
    network.module.eval(), wider.module.eval()
    assert wider.state()["t1_attention.in_proj_weight"].dtype == torch.float32
    torch.testing.assert_close(wider(x), network(x), rtol=1e-5, atol=1e-6)


# -- depth: block copies and depth hierarchies ----------------------------------------------------

def test_a_copy_of_each_pre_norm_sub_block_at_every_boundary_keeps_the_function():
    network = small_vit(depth=2)
    blocks = passes.find_blocks(network.graph)
    assert [(b.output, b.branch) for b in blocks[:2]] == [
        ("t1_mid", ("t1_norm1", "t1_attention")), ("t1", ("t1_norm2", "t1_fc1", "t1_gelu", "t1_fc2"))]
    assert passes.block_boundaries(network.graph) == ["t0", "t1_mid", "t1", "t2_mid", "t2"]
    x = probe(network, batch=4)
    for template in blocks:
        for after in passes.block_boundaries(network.graph):
            grown, record = passes.insert_block(network, template.output, after=after)
            for train in (False, True):
                assert difference(network, grown, train) <= TOLERANCE
            zeroed = [n for n, o in record.origins.items() if o.init == "zeros"]
            expected = (["out_proj.weight", "out_proj.bias"] if "attention" in template.branch[-1]
                        else ["weight", "bias"])
            assert sorted(n.split(".", 1)[1] for n in zeroed) == sorted(expected)
            grown.module.train()
            grown.module(x).square().sum().backward()
            parameters = dict(grown.module.named_parameters())
            assert all(not grown.state()[n].any() and parameters[n].grad.abs().sum() > 0
                       for n in zeroed if n.endswith("weight")), (template.output, after)


def test_transformer_blocks_form_one_stage_of_attention_and_mlp_pairs():
    from passes.hierarchy import block_stages
    network = small_vit()
    stages = block_stages(network.graph)
    assert [[tuple(b.output for b in group) for group in stage] for stage in stages] == [
        [(f"t{k}_mid", f"t{k}") for k in range(1, 5)]]


@pytest.mark.parametrize("interpolation", ["constant", "linear", "identity"])
@pytest.mark.parametrize("restriction", ["half-transpose", "injection"])
def test_depth_hierarchy_on_transformer_blocks(interpolation, restriction):
    network = small_vit()
    transfer = passes.coarsen_depth(network, interpolation, restriction)
    coarse = transfer.coarse
    assert [b.output for b in passes.find_blocks(coarse.graph)] == ["t1_mid", "t1", "t3_mid", "t3"]
    state, fine_state = coarse.state(), network.state()
    # the kept attention's output projection (a last layer) restricts by 2 R = P^T (half-transpose)
    # or twice the injection; with identity interpolation by the sum resp. the injection
    fine = [fine_state[f"t{k}_attention.out_proj.weight"] for k in range(1, 5)]
    half = restriction == "half-transpose"
    if interpolation == "linear":  # P^T row 0: fine 1 and half of fine 2
        expected = fine[0] + 0.5 * fine[1] if half else 2 * fine[0]
    else:
        expected = fine[0] + fine[1] if half else (fine[0] if interpolation == "identity" else 2 * fine[0])
    torch.testing.assert_close(state["t1_attention.out_proj.weight"], expected, rtol=0, atol=1e-15)
    if interpolation != "linear":  # R P = I (linear P with half-transpose R is not a right inverse)
        again = transfer.restrict(transfer.prolong(dict(state)))
        assert all(torch.allclose(again[k], state[k], rtol=0, atol=1e-15) for k in state)


@pytest.mark.parametrize("source", ["vit", "resnet_small.yaml"])
def test_identity_prolongation_computes_the_coarse_function(source):
    """Fine group 2j is coarse group j and fine group 2j+1 its copy with the last layers zero:
    the prolonged network is the coarse network, in float64, in train and eval mode."""
    from graphgrow import load_graph
    network = small_vit() if source == "vit" else Network.build(load_graph(SPECS_DIR / source), seed=0,
                                                                 dtype=torch.float64)
    transfer = passes.coarsen_depth(network, "identity")
    prolonged = Network.build(network.graph, transfer.prolong(dict(transfer.coarse.state())), dtype=torch.float64)
    x = probe(network, batch=4)
    for train in (False, True):
        transfer.coarse.module.train(train), prolonged.module.train(train)
        with torch.no_grad():
            expected, got = transfer.coarse(x), prolonged(x)
        assert float((got - expected).abs().max()) <= TOLERANCE * max(1.0, float(expected.abs().max()))
    with torch.no_grad():  # constant interpolation halves each copy's branch instead: not the same function
        constant = passes.coarsen_depth(network, "constant")
        halves = Network.build(network.graph, constant.prolong(dict(constant.coarse.state())), dtype=torch.float64)
        constant.coarse.module.eval(), halves.module.eval()
        assert float((halves(x) - constant.coarse(x)).abs().max()) > 1e-6


def test_identity_interpolation_is_refused_on_residual_nodes():
    from graphgrow import load_graph
    network = Network.build(load_graph(SPECS_DIR / "resnet_ode.yaml"), seed=0, dtype=torch.float64)
    with pytest.raises(GraphgrowError, match="identity interpolation needs residual blocks as subgraphs"):
        passes.coarsen_depth(network, "identity")


@pytest.mark.parametrize("head_dim", ["", ", head_dim: 3"])
def test_attention_initialises_from_the_seed_alone(head_dim):
    graph = graph_from_text("graphgrow: 1\nname: a\ninput: {shape: [5, 4]}\nlayers:\n"
                            f"  - {{name: t, op: attention, heads: 2{head_dim}}}\n")
    first = Network.build(graph, seed=3).state()
    torch.rand(7)  # the global random stream moves on; the seed alone decides
    second = Network.build(graph, seed=3).state()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["t.in_proj_weight"], Network.build(graph, seed=4).state()["t.in_proj_weight"])


def test_identity_prolongation_on_flat_vectors_and_in_an_mgopt_run():
    """MG/Opt's compiled transfers (index operations on flat parameter vectors) apply the
    identity prolongation's zero rows as the dict form does, and a run on the ViT corrects."""
    from types import SimpleNamespace

    from graphgrow.mgopt import run
    from graphgrow.mgopt.flat import FLAT, FlatLayout, FlatTransfer
    network = small_vit()
    transfer = passes.coarsen_depth(network, "identity")
    fine, coarse = FlatLayout(network.module), FlatLayout(transfer.coarse.module)
    flat = FlatTransfer(transfer, fine, coarse, reference_operations=1.0)
    assert flat.compiled
    coarse_params = dict(transfer.coarse.module.named_parameters())
    fine_params = dict(network.module.named_parameters())
    assert torch.equal(flat.prolong({FLAT: coarse.flatten(coarse_params)})[FLAT],
                       fine.flatten(transfer.prolong(coarse_params)))
    assert torch.equal(flat.restrict({FLAT: fine.flatten(fine_params)})[FLAT],
                       coarse.flatten(transfer.restrict(fine_params)))
    x = probe(network, batch=24, seed=3)
    data = SimpleNamespace(x_train=x, y_train=torch.arange(24) % 3, x_test=x[:6], y_test=torch.arange(6) % 3)
    result = run(network, data, hierarchy="depth", interpolation="identity", epochs=1, batch=8, export=False,
                 log_steps=False)
    assert result.summary["final"]["corrections"] > 0 and math.isfinite(result.summary["final"]["train"]["loss"])
