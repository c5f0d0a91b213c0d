"""MG/Opt on compiled networks: network levels, the identity-operator hierarchies (batch size,
input resolution) and the engine function the CLI calls."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from graphgrow.compiler import Network
from graphgrow.runtime.data import Dataset
from graphgrow.errors import GraphgrowError
from graphgrow.ir import graph_from_text, load_graph
from graphgrow.mgopt import IdentityTransfer, MGOptConfig, correction_linear_term, optimize, pd_sq_norm, run
from graphgrow.mgopt.flat import FLAT
from graphgrow.mgopt.network import NetworkProblem, build_network_hierarchy
from graphgrow.runtime.splits import Split

SMALL_CNN = """
graphgrow: 1
name: small_cnn
input: {shape: [1, 8, 8]}
layers:
  - {name: conv1, op: conv2d, out: 3, kernel: 3, padding: 1}
  - {name: act1, op: relu}
  - {name: pool, op: adaptive_avgpool2d, out: 2}
  - {name: flat, op: flatten}
  - {name: head, op: linear, out: 3}
"""





FIXED_HEAD_CNN = SMALL_CNN.replace("{name: pool, op: adaptive_avgpool2d, out: 2}", "{name: pool, op: maxpool2d, kernel: 2}")


def images(n=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))


def test_network_problem_gradient_matches_module_autograd():
    network = Network.build(graph_from_text(SMALL_CNN), seed=0, dtype=torch.float64)
    split = images()
    problem = NetworkProblem(network, split, batch=8)
    params = problem.parameters()
    batch = problem.draw_batch(torch.Generator().manual_seed(1))
    value, grads = problem.value_and_grad(params, batch)
    network.module.zero_grad()
    reference = F.cross_entropy(network.module(split.x[batch]), split.y[batch])
    reference.backward()
    assert value == pytest.approx(float(reference.detach()), rel=1e-14)
    named = problem.named(grads)  # one flat gradient; views per parameter
    assert grads[FLAT].shape == (sum(p.numel() for p in network.module.parameters()),)
    for name, parameter in network.module.named_parameters():
        torch.testing.assert_close(named[name], parameter.grad, rtol=1e-12, atol=1e-14)


def test_batch_hierarchy_halves_batches_with_identity_transfers():
    network = Network.build(graph_from_text(SMALL_CNN), seed=0, dtype=torch.float64)
    hierarchy = build_network_hierarchy(network, images(), "batch", 3, batch=16)
    assert [p.batch for p in hierarchy.levels] == [16, 8, 4]
    assert [p.cost for p in hierarchy.levels] == [1.0, 0.5, 0.25]
    assert all(isinstance(t, IdentityTransfer) for t in hierarchy.transfers)
    fine, coarse = hierarchy.levels[:2]
    batch = fine.draw_batch(torch.Generator().manual_seed(0))
    params = fine.parameters()
    _, grad = fine.value_and_grad(params, batch)
    linear, _ = correction_linear_term(hierarchy.transfers[0], coarse, grad, params, batch)
    assert pd_sq_norm(linear) == 0.0  # same parameters, same mini-batch: no correction needed
    assert len(coarse.draw_batch(torch.Generator())) == 8


def test_resolution_hierarchy_max_pools_inputs_and_keeps_parameters():
    network = Network.build(graph_from_text(SMALL_CNN), seed=0, dtype=torch.float64)
    split = images()
    hierarchy = build_network_hierarchy(network, split, "resolution", 2, batch=8)
    fine, coarse = hierarchy.levels
    assert coarse.network.graph.input_shape == (1, 4, 4)
    assert coarse.cost < 0.5  # a quarter of the pixels in the convolution
    params = fine.parameters()
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in coarse.parameters().items()}
    batch = torch.arange(8)
    value, _ = coarse.value_and_grad(params, batch)
    expected = F.cross_entropy(network.module(F.max_pool2d(split.x[:8], 2)), split.y[:8])
    assert value == pytest.approx(float(expected.detach()), rel=1e-13)


def test_resolution_hierarchy_refuses_networks_whose_head_depends_on_image_size():
    network = Network.build(graph_from_text(FIXED_HEAD_CNN), seed=0)
    with pytest.raises(GraphgrowError, match="adaptive_avgpool2d"):
        build_network_hierarchy(network, images(dtype=torch.float32), "resolution", 2, batch=8)


def test_unknown_hierarchy_and_too_many_batch_levels_raise():
    network = Network.build(graph_from_text(SMALL_CNN), seed=0)
    with pytest.raises(GraphgrowError, match="unknown hierarchy"):
        build_network_hierarchy(network, images(), "deepth", 2, batch=8)
    with pytest.raises(GraphgrowError, match="halved"):
        build_network_hierarchy(network, images(), "batch", 3, batch=2)


def test_mgopt_on_resolution_hierarchy_reduces_training_loss():
    network = Network.build(graph_from_text(SMALL_CNN), seed=0, dtype=torch.float64)
    split = images(n=24)
    hierarchy = build_network_hierarchy(network, split, "resolution", 2, batch=None)
    fine = hierarchy.levels[0]
    start = fine.parameters()
    config = MGOptConfig(alpha=0.2, alpha_bar=0.2, K=3, kappa=0.0, lam=0.1)
    end, history, optimizer = optimize(hierarchy, start, config, 6, seed=0)
    assert optimizer.corrections >= 2
    assert fine.value(end, slice(None)) < fine.value(start, slice(None))


def spiral_like(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return Dataset(x[:48], y[:48], x[48:], y[48:], (2,), 2, "quadrants")


def test_run_writes_a_run_directory_and_is_deterministic(tmp_path):
    spec = load_graph("specs/fnn_spiral.yaml")
    kwargs = dict(hierarchy="batch", levels=2, K=2, kappa=0.0, alpha=0.1, epochs=2, batch=16, seed=3)
    first = run(spec, spiral_like(), out=tmp_path / "run", export=False, **kwargs)
    second = run(spec, spiral_like(), **kwargs)
    assert (tmp_path / "run" / "log.jsonl").exists() and (tmp_path / "run" / "curves.png").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["iterations"] == 2 * 3 and summary["final"]["corrections"] >= 1
    steps = [r for r in first.records if r["event"] == "step"]
    assert [r["kind"] for r in steps] == [r["kind"] for r in second.records if r["event"] == "step"]
    assert [r["loss"] for r in steps] == [r["loss"] for r in second.records if r["event"] == "step"]
    evals = [r for r in first.records if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and evals[-1]["work"] > 0
    for a, b in zip(first.network.state().values(), second.network.state().values()):
        assert torch.equal(a, b)


def resnet(blocks=8, dtype=torch.float64):
    text = open("specs/resnet_ode.yaml").read().replace("blocks: 8", f"blocks: {blocks}")
    return Network.build(graph_from_text(text), seed=1, dtype=dtype)


def test_depth_hierarchy_first_order_coherence_on_a_resnet():
    """Lemma 2.34 on the ResNet depth hierarchy (constant P, R_g = 1/2 P^T), written out by
    hand: block 2j and 2j+1 both move by -alpha_bar (g_2j + g_2j+1) / 2; lift and head by
    -alpha_bar g."""
    network = resnet(8)
    data = spiral_like()
    split = Split(data.x_train.double(), data.y_train)
    hierarchy = build_network_hierarchy(network, split, "depth", 3, batch=None)
    assert [len([n for n in p.network.graph.nodes if n.op == "residual"]) for p in hierarchy.levels] == [8, 4, 2]
    assert hierarchy.levels[1].cost < 1.0 and hierarchy.levels[2].cost < hierarchy.levels[1].cost
    two = type(hierarchy)(hierarchy.levels[:2], hierarchy.transfers[:1])
    fine = two.levels[0]
    theta = fine.parameters()
    _, grad = fine.value_and_grad(theta, slice(None))
    config = MGOptConfig(alpha_bar=0.5, K=1, lam=0.0, kappa=0.0, descent_check=False)
    new, history, _ = optimize(two, theta, config, 1, seed=0)
    assert history[0].kind == "cgc"
    theta, new, grad = fine.named(theta), fine.named(new), fine.named(grad)
    for name, value in theta.items():
        node, role = name.split(".", 1)
        if node.startswith("res"):
            index = int(node[3:])
            pair = index - index % 2
            expected = -0.5 * 0.5 * (grad[f"res{pair}.{role}"] + grad[f"res{pair + 1}.{role}"])
        else:
            expected = -0.5 * grad[name]
        torch.testing.assert_close(new[name] - value, expected, rtol=1e-10, atol=1e-13)


def test_run_on_depth_hierarchy_with_v_cycle_and_variants():
    spec = load_graph("specs/resnet_ode.yaml")
    finals = {}
    for variant in ("mgopt", "no-correction", "nested"):
        result = run(spec, spiral_like(), hierarchy="depth", levels=3, variant=variant, K=2, kappa=0.1, lam=0.1,
                     alpha=0.2, epochs=1, batch=16, seed=0, nested_epochs=1, log_steps=True)
        kinds = [r["kind"] for r in result.records if r["event"] == "step"]
        finals[variant] = result.summary["final"]
        assert result.summary["levels"][0].startswith("depth0")
        if variant == "nested":
            assert kinds == ["level2"] * 3 + ["level1"] * 3 + ["sgd"] * 3
        else:
            assert "cgc" in kinds and set(kinds) <= {"cgc", "sgd", "rejected"}
    assert all(f["train"]["loss"] == f["train"]["loss"] for f in finals.values())  # finite, not NaN


WIDE_FNN = """
graphgrow: 1
name: wide_fnn
input: {shape: [2]}
layers:
  - {name: fc1, op: linear, out: 8}
  - {name: act1, op: tanh}
  - {name: head, op: linear, out: 2}
"""


def test_width_hierarchy_correction_is_first_order_coherent_and_trains():
    network = Network.build(graph_from_text(WIDE_FNN), seed=0, dtype=torch.float64)
    data = spiral_like()
    split = Split(data.x_train.double(), data.y_train)
    hierarchy = build_network_hierarchy(network, split, "width", 2, batch=None)
    fine, coarse = hierarchy.levels
    assert coarse.network.graph.node("fc1").out_shape == (4,) and coarse.cost < 1.0
    transfer = hierarchy.transfers[0]
    theta = fine.parameters()
    _, grad = fine.value_and_grad(theta, slice(None))
    start = transfer.restrict(theta)
    linear, _ = correction_linear_term(transfer, coarse, grad, start, slice(None))
    _, h_grad = coarse.value_and_grad(start, slice(None))
    restricted = transfer.restrict_gradient(grad)
    # grad h(R_p theta) = grad f_H + v = R_g grad f
    torch.testing.assert_close(h_grad[FLAT] + linear[FLAT], restricted[FLAT], rtol=1e-12, atol=1e-14)
    # fc1's rows: R_g averages unit pairs (rows 2j, 2j+1), written out by hand
    fine_grad = fine.named(grad)["fc1.weight"]
    torch.testing.assert_close(coarse.named(restricted)["fc1.weight"], 0.5 * (fine_grad[0::2] + fine_grad[1::2]))
    config = MGOptConfig(alpha=0.5, K=3, kappa=0.0, lam=0.1, backtracking=4)
    end, history, optimizer = optimize(hierarchy, theta, config, 20, seed=0)
    assert optimizer.corrections >= 5
    assert fine.value(end, slice(None)) < fine.value(theta, slice(None))


def test_injection_restriction_takes_every_second_block():
    network = resnet(8)
    data = spiral_like()
    split = Split(data.x_train.double(), data.y_train)
    hierarchy = build_network_hierarchy(network, split, "depth", 2, batch=None, restriction="injection")
    transfer = hierarchy.transfers[0]
    fine = hierarchy.levels[0]
    theta = fine.named(fine.parameters())
    coarse = hierarchy.levels[1].named(transfer.restrict(fine.parameters()))
    assert sorted(coarse) == sorted(dict(hierarchy.levels[1].network.module.named_parameters()))
    # the coarse level keeps the names of the blocks it keeps: res0, res2, ... (coarse block j = fine 2j)
    assert {name.split(".")[0] for name in coarse if name.startswith("res")} == {"res0", "res2", "res4", "res6"}
    for name, value in coarse.items():
        assert torch.equal(value, theta[name].detach()), name
    # h doubles on the coarse level and R P = I: prolonging the restriction of a coarse point returns it
    start = transfer.restrict(fine.parameters())
    assert torch.equal(transfer.restrict(transfer.prolong(start))[FLAT], start[FLAT])


def test_run_nested_epochs_per_level_and_transfer_options_checked():
    spec = load_graph("specs/resnet_ode.yaml")
    result = run(spec, spiral_like(), hierarchy="depth", levels=3, variant="nested", nested_epochs=[2, 1],
                 alpha=0.1, epochs=1, batch=16, seed=0)
    kinds = [r["kind"] for r in result.records if r["event"] == "step"]
    assert kinds == ["level2"] * 6 + ["level1"] * 3 + ["sgd"] * 3  # coarsest first: 2 epochs, then 1
    with pytest.raises(GraphgrowError, match="interpolation and restriction choose the depth transfers"):
        run(spec, spiral_like(), hierarchy="batch", restriction="injection", epochs=1, batch=16)
    with pytest.raises(GraphgrowError, match="same_batch contradicts the batch hierarchy"):
        run(spec, spiral_like(), hierarchy="batch", same_batch=True, epochs=1, batch=16)
