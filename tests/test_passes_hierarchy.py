"""Depth hierarchies (thesis Examples 3.34-3.36) and width hierarchies: coarse networks and the
transfer operators, checked against explicit matrices."""
from pathlib import Path

import pytest
import torch

import graphgrow
import passes
from graphgrow import GraphgrowError, Network

SPECS = Path(__file__).resolve().parent.parent / "specs"


def resnet(blocks=8, form="one_weight", seed=0) -> Network:
    spec = f"""
graphgrow: 1
name: resnet
input: {{shape: [2]}}
layers:
  - {{name: lift, op: linear, out: 3, bias: false}}
  - repeat: {blocks}
    layers:
      - {{name: "res${{i}}", op: residual, form: {form}, activation: tanh, h: 0.1}}
  - {{name: head, op: linear, out: 2, bias: false}}
"""
    return Network.build(graphgrow.graph_from_text(spec), seed=seed, dtype=torch.float64)


def params(network: Network) -> dict:
    return {k: v.detach().clone() for k, v in network.module.named_parameters()}


def random_like(template: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, dtype=v.dtype, generator=generator) for k, v in template.items()}


def close(a: dict, b: dict, tol=1e-12) -> bool:
    return sorted(a) == sorted(b) and all(float((a[k] - b[k]).abs().max()) <= tol for k in a)


def thesis_prolongation(coarse_blocks: int, interpolation: str) -> torch.Tensor:
    """The block pattern printed in Examples 3.35 / 3.36, written out row by row."""
    rows = []
    for j in range(coarse_blocks):
        rows.append([1.0 if i == j else 0.0 for i in range(coarse_blocks)])
        if interpolation == "constant":
            rows.append([1.0 if i == j else 0.0 for i in range(coarse_blocks)])
        elif j + 1 < coarse_blocks:
            rows.append([0.5 if i in (j, j + 1) else 0.0 for i in range(coarse_blocks)])
        else:  # the fine grid has one block more than the printed pattern: copy the last
            rows.append([1.0 if i == j else 0.0 for i in range(coarse_blocks)])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_depth_prolongation_matches_the_thesis_matrices(interpolation):
    assert torch.equal(passes.depth_prolongation(4, interpolation), thesis_prolongation(4, interpolation))


def test_depth_coarsening_halves_blocks_doubles_h_and_restricts_with_half_transpose():
    fine = resnet(8)
    transfer = passes.coarsen_depth(fine, "constant")
    coarse_graph = transfer.coarse.graph
    assert [n.name for n in coarse_graph.nodes if n.op == "residual"] == ["res0", "res2", "res4", "res6"]
    assert all(n.args["h"] == pytest.approx(0.2) for n in coarse_graph.nodes if n.op == "residual")
    theta = params(fine)
    restricted = transfer.restrict(theta)
    P = thesis_prolongation(4, "constant")
    R = 0.5 * P.T
    for role in ("inner.weight", "inner.bias"):
        stacked = torch.stack([theta[f"res{i}.{role}"] for i in range(8)])
        expected = torch.tensordot(R, stacked, dims=1)
        for j, name in enumerate(["res0", "res2", "res4", "res6"]):
            assert torch.allclose(restricted[f"{name}.{role}"], expected[j], atol=1e-14)
    assert torch.equal(restricted["lift.weight"], theta["lift.weight"])  # identity outside the stage
    assert close(params(transfer.coarse), restricted)


def test_coarse_resnet_is_the_explicit_euler_scheme_with_step_2h():
    fine = resnet(4)
    transfer = passes.coarsen_depth(fine)
    theta = params(transfer.coarse)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = x @ theta["lift.weight"].T
    for name in ("res0", "res2"):  # x_i = x_{i-1} + 2h tanh(W x_{i-1} + b), (3.13)
        state = state + 0.2 * torch.tanh(state @ theta[f"{name}.inner.weight"].T + theta[f"{name}.inner.bias"])
    with torch.no_grad():
        assert torch.allclose(transfer.coarse(x), state @ theta["head.weight"].T, atol=1e-13)


@pytest.mark.parametrize("interpolation, restriction", [("constant", "half-transpose"),
                                                          ("constant", "injection"), ("linear", "injection")])
def test_restriction_after_prolongation_is_the_identity(interpolation, restriction):
    fine = resnet(8, form="two_weight")
    transfer = passes.coarsen_depth(fine, interpolation, restriction)
    coarse = random_like(params(transfer.coarse), seed=5)
    assert close(transfer.restrict(transfer.prolong(coarse)), coarse)
    prolonged = transfer.prolong(coarse)  # coarsen then prolong what came from a prolongation
    assert close(transfer.prolong(transfer.restrict(prolonged)), prolonged)


def test_linear_interpolation_with_half_transpose_is_half_PtP():
    fine = resnet(4)
    transfer = passes.coarsen_depth(fine, "linear")
    coarse = random_like(params(transfer.coarse), seed=6)
    P = thesis_prolongation(2, "linear")
    expected = 0.5 * P.T @ P  # not the identity (thesis: the 1/2 keeps the scale)
    twice = transfer.restrict(transfer.prolong(coarse))
    for role in ("inner.weight", "inner.bias"):
        stacked = torch.stack([coarse[f"res{i}.{role}"] for i in (0, 2)])
        mixed = torch.tensordot(expected, stacked, dims=1)
        assert torch.allclose(twice[f"res0.{role}"], mixed[0]) and torch.allclose(twice[f"res2.{role}"], mixed[1])


def test_gradient_restriction_is_the_same_linear_map():
    transfer = passes.coarsen_depth(resnet(4))
    a, b = random_like(params(resnet(4)), 1), random_like(params(resnet(4)), 2)
    summed = transfer.restrict_gradient({k: a[k] + 3 * b[k] for k in a})
    ra, rb = transfer.restrict_gradient(a), transfer.restrict_gradient(b)
    assert close(summed, {k: ra[k] + 3 * rb[k] for k in ra})
    assert close(transfer.restrict_gradient(a), transfer.restrict(a))


def test_build_hierarchy_three_levels_and_refusals():
    levels = passes.build_hierarchy(resnet(8), "depth", 3, interpolation="linear", restriction="injection")
    blocks = [sum(n.op == "residual" for n in level.network.graph.nodes) for level in levels]
    assert blocks == [8, 4, 2] and levels[0].transfer is None
    assert levels[2].transfer.fine is levels[1].network
    with pytest.raises(GraphgrowError, match="3 blocks; halving needs an even number"):
        passes.coarsen_depth(resnet(3))
    with pytest.raises(GraphgrowError, match="no residual blocks"):
        passes.coarsen_depth(Network.build(graphgrow.load_graph(SPECS / "fnn_spiral.yaml")))
    with pytest.raises(GraphgrowError, match="unknown interpolation"):
        passes.coarsen_depth(resnet(2), "cubic")


def test_stages_split_at_a_change_of_arguments():
    graph = resnet(4).graph
    for name in ("res2", "res3"):
        graph.node(name).args = {**graph.node(name).args, "h": 0.3}
    assert passes.residual_stages(graph) == [["res0", "res1"], ["res2", "res3"]]


# -- width ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["average", "orthonormal"])
def test_unit_matrices_rows_and_R_P_identity(scaling):
    groups = [[0, 3], [1], [2, 4, 5]]
    P, R = passes.unit_matrices(6, groups, scaling)
    for j, group in enumerate(groups):
        value = 1 / len(group) if scaling == "average" else len(group) ** -0.5
        assert torch.allclose(R[j, group], torch.full((len(group),), value, dtype=torch.float64))
        assert R[j].count_nonzero() == len(group)
    scale = torch.tensor([float(len(g)) for g in groups], dtype=torch.float64)
    assert torch.allclose(P, R.T * (scale if scaling == "average" else 1.0))
    assert torch.allclose(R @ P, torch.eye(3, dtype=torch.float64))


def test_width_coarsening_of_a_cnn_restricts_rows_columns_and_flatten_blocks():
    fine = Network.build(graphgrow.load_graph(SPECS / "cnn_vgg.yaml"), dtype=torch.float64)
    transfer = passes.coarsen_width(fine, layers=["conv2"])
    theta = params(fine)
    coarse = transfer.restrict(theta)
    assert transfer.coarse.graph.node("conv2").args["out"] == 16
    assert torch.allclose(coarse["conv2.weight"], 0.5 * (theta["conv2.weight"][0::2] + theta["conv2.weight"][1::2]))
    fc1 = theta["fc1.weight"].reshape(128, 32, 49)  # flatten: each channel owns 7*7 columns
    expected = fc1[:, 0::2] + fc1[:, 1::2]  # columns of merged units add up
    assert torch.allclose(coarse["fc1.weight"], expected.reshape(128, 16 * 49))
    assert close(params(transfer.coarse), coarse)
    assert close(transfer.restrict(transfer.prolong(coarse)), coarse)


@pytest.mark.parametrize("scaling", ["average", "orthonormal"])
def test_width_hierarchy_with_batchnorm_and_given_groups(scaling):
    spec = """
graphgrow: 1
name: bn
input: {shape: [3]}
layers:
  - {name: fc1, op: linear, out: 5}
  - {name: bn1, op: batchnorm}
  - {name: act1, op: relu}
  - {name: head, op: linear, out: 2}
"""
    fine = Network.build(graphgrow.graph_from_text(spec), dtype=torch.float64)
    transfer = passes.coarsen_width(fine, layers=["fc1"], groups=[[0, 4], [1, 2, 3]], scaling=scaling)
    coarse = random_like(params(transfer.coarse), 3)
    assert close(transfer.restrict(transfer.prolong(coarse)), coarse)
    assert transfer.coarse.graph.node("fc1").args["out"] == 2
    assert tuple(transfer.coarse.state()["bn1.running_mean"].shape) == (2,)
    with pytest.raises(GraphgrowError, match="must partition"):
        passes.coarsen_width(fine, layers=["fc1"], groups=[[0, 1], [2, 3]])
    with pytest.raises(GraphgrowError, match="even number"):
        passes.coarsen_width(fine, layers=["fc1"])
    levels = passes.build_hierarchy(Network.build(graphgrow.load_graph(SPECS / "cnn_vgg.yaml")), "width", 3)
    assert [lvl.network.graph.node("fc1").args["out"] for lvl in levels] == [128, 64, 32]


def prolonged_network(transfer, coarse_state):
    """The fine network with the prolonged parameters of a coarse network (buffers prolonged too)."""
    fine_state = transfer.prolong(dict(coarse_state))
    return Network.build(transfer.fine.graph.copy(), fine_state, dtype=torch.float64)


BN_TANH = """
graphgrow: 1
name: bn_tanh
input: {shape: [3]}
layers:
  - {name: fc1, op: linear, out: 6}
  - {name: bn1, op: batchnorm}
  - {name: act1, op: tanh}
  - {name: fc2, op: linear, out: 4}
  - {name: act2, op: sigmoid}
  - {name: head, op: linear, out: 2}
"""


@pytest.mark.parametrize("source", ["fnn_spiral_deep.yaml", "cnn_vgg.yaml", "resnet_ode.yaml", "two_path.yaml", BN_TANH])
@pytest.mark.parametrize("train", [False, True])
def test_average_prolongation_computes_the_coarse_function(source, train):
    graph = graphgrow.load_graph(SPECS / source) if source.endswith(".yaml") else graphgrow.graph_from_text(source)
    fine = Network.build(graph, seed=1, dtype=torch.float64)
    transfer = passes.coarsen_width(fine, scaling="average")
    coarse = transfer.coarse
    state = coarse.state()
    state = {k: (v + 0.3 * torch.randn_like(v) if k.endswith(("weight", "bias")) else
                 v + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
    coarse = Network.build(coarse.graph.copy(), state, dtype=torch.float64)
    prolonged = prolonged_network(transfer, coarse.state())
    x = torch.randn(7, *graph.input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for network in (coarse, prolonged):
        network.module.train(train)
    with torch.no_grad():
        assert float((coarse(x) - prolonged(x)).abs().max()) <= 1e-10
    # and the restriction of the prolonged network is the coarse network again
    assert close(transfer.restrict(params(prolonged)), params(coarse))


def test_orthonormal_prolongation_is_exact_through_relu_only():
    fine = Network.build(graphgrow.load_graph(SPECS / "fnn_spiral_deep.yaml"), seed=1, dtype=torch.float64)
    transfer = passes.coarsen_width(fine, scaling="orthonormal")
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prolonged = prolonged_network(transfer, transfer.coarse.state())
    with torch.no_grad():
        assert float((transfer.coarse(x) - prolonged(x)).abs().max()) <= 1e-10
    tanh = Network.build(graphgrow.graph_from_text(BN_TANH.replace("bn1, op: batchnorm", "bn1, op: identity")),
                         seed=1, dtype=torch.float64)
    transfer = passes.coarsen_width(tanh, scaling="orthonormal")
    prolonged = prolonged_network(transfer, transfer.coarse.state())
    with torch.no_grad():
        assert float((transfer.coarse(x[:, :1].repeat(1, 3)) - prolonged(x[:, :1].repeat(1, 3))).abs().max()) > 1e-3
