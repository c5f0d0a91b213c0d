"""SensLI: merit norms (4.17, B.1a-e), full-data sensitivities (4.16), identity candidates
(4.11, 4.13, 4.15), selection and threshold (4.18), insertion with carried optimizer state."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from graphgrow import GraphgrowError, Network, graph_from_text, load_graph
from graphgrow.runtime.data import spiral
import passes
from graphgrow.ops.base import get_op
from graphgrow.sensli import (MERIT_NORMS, Candidate, Geometry, Sensitivities, conv_operator_norm, existing_weights,
                              full_data_gradients, gradient_norm, grow, insert_candidates, select, sensitivities)
from graphgrow.runtime.train import TrainConfig, Trainer

SMALL_CNN = """
graphgrow: 1
name: small_cnn
input: {shape: [2, 6, 6]}
layers:
  - {name: conv1, op: conv2d, out: 3, kernel: 3, padding: 1}
  - {name: act1, op: relu}
  - {name: pool1, op: maxpool2d, kernel: 2}
  - {name: flat, op: flatten}
  - {name: head, op: linear, out: 2}
"""


def dense_conv_matrix(kernel, input_shape, stride, padding):
    """The convolution as an explicit matrix: its columns are the images of the unit vectors."""
    size = math.prod(input_shape)
    units = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    return F.conv2d(units, kernel.double(), stride=stride, padding=padding).reshape(size, -1).T


@pytest.mark.parametrize("out_ch,in_ch,k,h,w,stride,padding", [
    (3, 2, 3, 5, 5, 1, 1), (4, 3, 3, 6, 7, 2, 1), (2, 3, 5, 6, 6, 1, 0), (2, 2, 3, 4, 4, 1, 2)])
def test_conv_operator_norm_is_largest_singular_value_of_dense_convolution(out_ch, in_ch, k, h, w, stride, padding):
    kernel = torch.randn(out_ch, in_ch, k, k, generator=torch.Generator().manual_seed(out_ch * 10 + k))
    expected = torch.linalg.matrix_norm(dense_conv_matrix(kernel, (in_ch, h, w), stride, padding), ord=2).item()
    got = conv_operator_norm(kernel, (in_ch, h, w), stride, padding)
    assert abs(got - expected) <= 1e-3 * expected
    # the norm depends on the input size (zero padding at the border), not on the kernel alone
    small = (in_ch, k, k + 1)
    other = torch.linalg.matrix_norm(dense_conv_matrix(kernel, small, stride, padding), ord=2).item()
    assert abs(other - expected) > 1e-2 * expected
    assert abs(conv_operator_norm(kernel, small, stride, padding) - other) <= 1e-3 * other


def test_kernel_norms_b1_against_direct_definitions():
    kernel = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    geometry = Geometry((2, 5, 5), 1, 1)
    assert math.isclose(gradient_norm(kernel, geometry, "fro"), float((kernel.double() ** 2).sum()), rel_tol=1e-12)
    assert math.isclose(gradient_norm(kernel, geometry, "fro_entries"), float((kernel.double() ** 2).mean()),
                        rel_tol=1e-12)
    dense = dense_conv_matrix(kernel, (2, 5, 5), 1, 1)
    assert math.isclose(gradient_norm(kernel, geometry, "op"), torch.linalg.matrix_norm(dense, ord=2).item() ** 2,
                        rel_tol=2e-3)
    per_output = [torch.linalg.matrix_norm(dense_conv_matrix(kernel[l].sum(0)[None, None], (1, 5, 5), 1, 1),
                                           ord=2).item() for l in range(3)]
    assert math.isclose(gradient_norm(kernel, geometry, "op_out2"), sum(v ** 2 for v in per_output), rel_tol=2e-3)
    assert math.isclose(gradient_norm(kernel, geometry, "op_out1"), sum(per_output) ** 2, rel_tol=2e-3)


def test_linear_weight_norms_are_spectral_and_scaled_frobenius():
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    geometry = Geometry((6, 1, 1))
    assert math.isclose(gradient_norm(weight, geometry, "op"), torch.linalg.matrix_norm(weight.double(), ord=2) ** 2,
                        rel_tol=1e-10)
    assert math.isclose(gradient_norm(weight, geometry, "fro_width"), float((weight.double() ** 2).sum()) / 16)
    assert math.isclose(gradient_norm(weight, geometry, "op_out1"), float(weight.double().sum(1).abs().sum()) ** 2)


def test_full_data_gradient_over_unequal_batches_equals_one_batch_gradient_and_changes_nothing():
    network = Network.build(load_graph("specs/fnn_spiral_deep.yaml"), seed=3)
    data = spiral(0)
    before = {k: v.clone() for k, v in network.state().items()}
    names = ["fc1.weight", "fc2.weight", "head.bias"]
    whole, whole_loss = full_data_gradients(network.module, data.x_train, data.y_train, F.cross_entropy, names)
    chunked, chunked_loss = full_data_gradients(network.module, data.x_train, data.y_train, F.cross_entropy, names,
                                                batch=97)
    params = dict(network.module.named_parameters())
    reference = torch.autograd.grad(F.cross_entropy(network(data.x_train), data.y_train), [params[n] for n in names])
    for name, expected in zip(names, reference):
        assert torch.allclose(whole[name], expected, atol=1e-7)
        assert torch.allclose(chunked[name], expected, atol=1e-6)
    full_loss = F.cross_entropy(network(data.x_train), data.y_train).item()
    assert whole_loss == pytest.approx(full_loss, rel=1e-6) and chunked_loss == pytest.approx(full_loss, rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in network.state().items())
    assert all(p.grad is None for p in network.module.parameters())


@pytest.mark.parametrize("spec,kinds", [("specs/fnn_spiral_deep.yaml", {"dense"}),
                                        ("specs/resnet_spiral.yaml", {"residual"}),
                                        ("specs/two_path.yaml", {"dense"}), (SMALL_CNN, {"conv"})])
def test_candidates_of_every_architecture_and_their_merit_weights(spec, kinds):
    graph = graph_from_text(spec) if spec.startswith("\n") else load_graph(spec)
    network = Network.build(graph, seed=4)
    data = SimpleNamespace(x_train=torch.randn(30, *graph.input_shape, generator=torch.Generator().manual_seed(0)),
                           y_train=torch.arange(30) % 2)
    report = sensitivities(network, data, norm="op", all_norms=True)
    assert {c.kind for c in report.candidates} == kinds
    for candidate in report.candidates:
        assert candidate.param.endswith("outer.weight" if candidate.kind == "residual" else ".weight")
        assert candidate.merit > 0 and set(candidate.norms) == {"fro", "fro_width", "fro_entries", "op",
                                                               "op_out2", "op_out1"}
    grown, _ = insert_candidates(network, [c.position for c in report.candidates])
    x = data.x_train[:9]
    assert torch.allclose(grown(x), network(x), atol=1e-6)  # the candidates keep the function
    assert grown.graph.num_params() == network.graph.num_params() + sum(c.new_params for c in report.candidates)


def test_fnn_candidate_merit_matches_hand_built_identity_layer():
    """(4.11)/(4.17): the merit of a layer W = id after ReLU equals ||dL/dW||_F^2 for the
    network relu(W relu(fc1 x)) built by hand."""
    network = Network.build(load_graph("specs/fnn_spiral.yaml"), seed=5)
    data = spiral(1)
    report = sensitivities(network, data, batch=None)
    (candidate,) = report.candidates
    p = dict(network.module.named_parameters())
    new_weight = torch.eye(5, requires_grad=True)
    hidden = torch.relu(data.x_train @ p["fc1.weight"].T + p["fc1.bias"])
    output = torch.relu(hidden @ new_weight.T) @ p["head.weight"].T + p["head.bias"]
    (grad,) = torch.autograd.grad(F.cross_entropy(output, data.y_train), [new_weight])
    assert math.isclose(candidate.merit, float((grad.double() ** 2).sum()), rel_tol=1e-5)
    assert candidate.new_params == 30  # 27 -> 57 parameters, thesis Table 4.3


def test_resnet_candidate_merit_is_outer_weight_gradient_4_14c():
    """(4.13)/(4.14c): with W2 = 0 and W1 = id, dL/dW2 = sum_j dL/dx_j tanh(x_j)^T."""
    network = Network.build(load_graph("specs/resnet_spiral.yaml"), seed=6)
    data = spiral(2)
    report = sensitivities(network, data, batch=None)
    p = dict(network.module.named_parameters())
    lifted = (data.x_train @ p["lift.weight"].T).detach().requires_grad_(True)
    block = network.module.get_submodule("res0")
    loss = F.cross_entropy(block(lifted) @ p["head.weight"].T, data.y_train)
    (upstream,) = torch.autograd.grad(loss, [lifted])  # dL/dx at the block input: the candidate after 'lift'
    expected = upstream.T @ torch.tanh(lifted.detach())
    merit = {c.after: c.merit for c in report.candidates}
    assert math.isclose(merit["lift"], float((expected.double() ** 2).sum()), rel_tol=1e-5)


def fake_report(merits, existing):
    candidates = [Candidate(f"p{k}", f"a{k}", "dense", f"n{k}", f"n{k}.weight", [2, 2], m, 6, 12)
                  for k, m in enumerate(merits)]
    return Sensitivities(candidates, {f"w{k}": v for k, v in enumerate(existing)}, "fro", 10, 100)


def test_threshold_4_18_accepts_and_rejects():
    report = fake_report([0.5, 3.0, 1.0], [1.0, 2.0, 3.0])  # mean existing merit 2.0
    assert report.reference == 2.0
    assert [c.position for c in select(report, "sensli", tau=1.5)] == ["p1"]    # 3.0 >= 1.5 * 2
    assert select(report, "sensli", tau=1.6) == []                              # 3.0 < 1.6 * 2
    assert [c.position for c in select(report, "sensli", tau=1.0, count=3)] == ["p1"]
    many = fake_report([5.0, 4.0, 1.0], [1.0, 1.0])
    assert [c.position for c in select(many, "sensli", tau=2.0, count=3)] == ["p0", "p1"]
    with pytest.raises(GraphgrowError, match="tau must be >= 1"):
        select(report, "sensli", tau=0.5)


def test_selection_strategies():
    report = fake_report([0.5, 3.0, 1.0], [1.0])
    assert [c.position for c in select(report, "sensli")] == ["p1"]
    assert [c.position for c in select(report, "min")] == ["p0"]
    assert select(report, "none") == []
    draws = [select(report, "random", generator=torch.Generator().manual_seed(s))[0].position for s in range(12)]
    assert draws == [select(report, "random", generator=torch.Generator().manual_seed(s))[0].position
                     for s in range(12)]
    assert len(set(draws)) > 1


def test_threshold_on_a_real_network_accepts_and_rejects():
    network = Network.build(load_graph("specs/fnn_spiral_deep.yaml"), seed=7)
    report = sensitivities(network, spiral(0))
    best = max(report.candidates, key=lambda c: c.merit)
    ratio = report.ratio(best)
    assert ratio == best.merit / (sum(report.existing.values()) / 3)
    assert set(report.existing) == {"fc1.weight", "fc2.weight", "head.weight"}
    if ratio >= 1:
        assert select(report, "sensli", tau=ratio * 0.999) == [best]
    assert select(report, "sensli", tau=max(ratio, 1.0) * 1.001) == []


def test_insertion_keeps_function_and_momentum_and_is_reproducible():
    data = spiral(0)
    config = dict(insert_at=[3], max_insertions=1, epochs=6, lr=0.1, momentum=0.9, batch=150, seed=2,
                  log_steps=False)
    first = grow("specs/fnn_spiral_deep.yaml", data, **config)
    (event,) = first.insertions
    assert event["loss_before"] == pytest.approx(event["loss_after"], abs=1e-6)
    assert event["params_after"] == event["params_before"] + 20
    second = grow("specs/fnn_spiral_deep.yaml", data, **config)
    for key, value in first.network.state().items():
        assert torch.equal(value, second.network.state()[key])
    assert first.summary["flops_per_sample"]["run"]["sensitivity"] > 0


def test_momentum_buffers_survive_insertion():
    data = spiral(0)
    network = Network.build(load_graph("specs/fnn_spiral.yaml"), seed=0)
    trainer = Trainer(network, data, TrainConfig(epochs=2, lr=0.1, momentum=0.9, log_steps=False))
    trainer.fit()
    buffers = {n: trainer.optimizer.state[p]["momentum_buffer"].clone()
               for n, p in trainer.network.module.named_parameters()}
    grown, record = passes.keep_candidates(*passes.extend_all(trainer.network), ["layer:act1"])
    trainer.replace_network(grown, record=record)
    params = dict(trainer.network.module.named_parameters())
    for name, buffer in buffers.items():
        assert torch.equal(trainer.optimizer.state[params[name]]["momentum_buffer"], buffer)


def test_grow_writes_run_directory_with_costs(tmp_path):
    result = grow("specs/fnn_spiral.yaml", "spiral", insert_at=[2], epochs=4, lr=0.2, out=tmp_path / "run",
                  export=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["params"] == {"start": 27, "final": 57}
    run = summary["flops_per_sample"]["run"]
    assert run["training"] == 2 * 3 * 52 + 2 * 3 * 112  # 2 epochs per architecture, 3 x forward FLOPs
    # one evaluation on all samples: forward + backward of the 2-5-2 network (3 x 52 FLOPs) plus the
    # candidate's weight gradient (5 x 5 multiply-adds) and its ReLU recomputed and differentiated (5 + 5)
    assert run["sensitivity"] == 3 * 52 + 2 * 5 * 5 + 5 + 5
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "final.yaml").exists()
    assert result.summary["insertions"][0]["positions"] == ["layer:act1"]


def test_user_errors():
    network = Network.build(graph_from_text("""
graphgrow: 1
name: no_slot
input: {shape: [2]}
layers:
  - {name: head, op: linear, out: 2}
"""))
    with pytest.raises(GraphgrowError, match="no position"):
        sensitivities(network, spiral(0))
    with pytest.raises(GraphgrowError, match="unknown strategy"):
        grow("specs/fnn_spiral.yaml", "spiral", strategy="best", epochs=1)
    with pytest.raises(GraphgrowError, match="unknown data source"):
        grow("specs/fnn_spiral.yaml", "cifar", epochs=1)


def test_widening_keeps_function_and_merit_is_outgoing_column_gradient():
    from graphgrow.sensli import neuron_sensitivities, widen_best
    network = Network.build(load_graph("specs/fnn_spiral_deep.yaml"), seed=8)
    data = spiral(0)
    candidates, reference, extended, _ = neuron_sensitivities(network, data, per_layer=4, batch=None)
    assert {c.layer for c in candidates} == {"fc1", "fc2"}
    rows = extended.state()["fc1.weight"][4:]  # the candidates' incoming weights (fc1 has 4 units)
    # independent computation for fc1's candidates (4.19): W2_new = 0, so
    # dL/dW2_new[:, k] = sum_j dL/d(fc2 pre-activation)_j * relu(w1_k . x_j)
    p = dict(network.module.named_parameters())
    hidden_in = data.x_train
    pre = (torch.relu(hidden_in @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T + p["fc2.bias"]).detach()
    pre.requires_grad_(True)
    loss = F.cross_entropy(torch.relu(pre) @ p["head.weight"].T + p["head.bias"], data.y_train)
    (delta,) = torch.autograd.grad(loss, [pre])
    expected = (delta.T @ torch.relu(hidden_in @ rows.T)).double().pow(2).sum(0)
    got = torch.tensor([c.merit for c in candidates if c.layer == "fc1"], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-12)
    wider, chosen, _, record = widen_best(network, data, count=3, per_layer=4, batch=None)
    assert [c.merit for c in chosen] == sorted((c.merit for c in candidates), reverse=True)[:3]
    assert torch.allclose(wider(data.x_test), network(data.x_test), atol=1e-6)
    assert wider.graph.num_params() > network.graph.num_params()
    # threshold (4.20): a tau above every ratio rejects, a tau at the best ratio accepts
    best = max(c.merit for c in candidates)
    _, rejected, _, _ = widen_best(network, data, count=3, per_layer=4, batch=None, tau=best / reference * 1.001 + 1)
    assert rejected == []
    if best / reference >= 1:
        _, accepted, _, _ = widen_best(network, data, count=3, per_layer=4, batch=None, tau=best / reference * 0.999)
        assert len(accepted) == 1
    # widened parameters keep their momentum in the old entries (the record of widen + prune)
    trainer = Trainer(network, data, TrainConfig(epochs=1, lr=0.1, momentum=0.9, log_steps=False))
    trainer.fit()
    old = trainer.optimizer.state[dict(trainer.network.module.named_parameters())["fc2.weight"]]["momentum_buffer"].clone()
    wider, chosen, _, record = widen_best(trainer.network, data, count=None, per_layer=2, batch=None)
    trainer.replace_network(wider, record=record)
    new = trainer.optimizer.state[dict(trainer.network.module.named_parameters())["fc2.weight"]]["momentum_buffer"]
    added = sum(c.layer == "fc1" for c in chosen)
    assert new.shape[1] == 4 + added and torch.equal(new[:4, :4], old) and not new[:, 4:].any()


def test_grow_with_widening():
    result = grow("specs/fnn_spiral_deep.yaml", "spiral", widen=2, insert_at=[2], epochs=4, lr=0.1, log_steps=False)
    (event,) = result.insertions
    assert event["params_after"] > event["params_before"]
    assert event["loss_before"] == pytest.approx(event["loss_after"], abs=1e-6)


RESIDUAL_ON_INPUT = """
graphgrow: 1
name: residual_on_input
input: {shape: [3]}
layers:
  - {name: res, op: residual, activation: relu, h: 0.5}
  - {name: head, op: linear, out: 2}
"""
RESIDUAL_AFTER_ADD = """
graphgrow: 1
name: residual_after_add
input: {shape: [3]}
layers:
  - {name: fc1, op: linear, out: 3}
  - {name: fc2, op: linear, out: 3, inputs: [input]}
  - {name: total, op: add, inputs: [fc1, fc2, input]}
  - {name: res, op: residual}
  - {name: head, op: linear, out: 2}
"""  # a three-input add compiles to two fx nodes; the position is the last
DANGLING_BRANCH = """
graphgrow: 1
name: dangling_branch
input: {shape: [3]}
layers:
  - {name: fc, op: linear, out: 4}
  - {name: act, op: relu}
  - {name: side, op: linear, out: 4, inputs: [act]}
  - {name: side_act, op: relu}
  - {name: head, op: linear, out: 2, inputs: [act]}
"""  # side_act does not reach the output: its candidate's gradient is zero
SMALL_VGG = (Path(__file__).parent.parent / "specs" / "cnn_vgg.yaml").read_text().replace(
    "shape: [1, 28, 28]", "shape: [1, 8, 8]")  # the VGG-like CNN (2.11) on 8x8 images


def float64_problem(spec, samples=37, seed=3):
    """A float64 network of ``spec`` and data whose inputs are float32 numbers (the data splits
    are read as float32, so the comparison starts from the same inputs)."""
    graph = load_graph(spec) if spec.endswith(".yaml") else graph_from_text(spec)
    network = Network.build(graph, seed=seed)
    network.module.double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *graph.input_shape, generator=generator).double()
    return network, SimpleNamespace(x_train=x, y_train=torch.arange(samples) % 2)


def extended_merits(network, x, y, batch):
    """Reference: the fully-extended network built by passes.extend_all, its gradients by autograd."""
    extended, record = passes.extend_all(network, "layers")
    geometry = existing_weights(extended.graph)
    merit_params = {cid: next(iter(info.merit)) for cid, info in record.candidates.items()}
    names = list(existing_weights(network.graph)) + list(merit_params.values())
    grads, _ = full_data_gradients(extended.module, x, y, F.cross_entropy, names, batch=batch)
    norms = {name: {norm: gradient_norm(grads[name], geometry[name], norm) for norm in MERIT_NORMS} for name in names}
    return extended, record, merit_params, norms


@pytest.mark.parametrize("spec", ["specs/fnn_spiral.yaml", "specs/fnn_spiral_deep.yaml", "specs/resnet_spiral.yaml",
                                  "specs/resnet_ode.yaml", "specs/two_path.yaml", "specs/mnist_fnn.yaml", SMALL_VGG,
                                  RESIDUAL_ON_INPUT, RESIDUAL_AFTER_ADD, DANGLING_BRANCH],
                         ids=lambda spec: spec.split("\nname: ")[-1].split("\n")[0])
def test_merits_from_one_base_pass_equal_those_of_the_built_extended_network(spec):
    """(4.16): the merit-weight gradients read from the activations and their loss gradients in
    the current network equal the gradients of the fully-extended network as built and compiled,
    in float64 to 1e-10, for every norm, over unequal batches; nothing of the network changes."""
    network, data = float64_problem(spec)
    network.module.train()
    before = {k: v.clone() for k, v in network.state().items()}
    flags = {k: p.requires_grad for k, p in network.module.named_parameters()}
    report = sensitivities(network, data, batch=10, all_norms=True)
    extended, record, merit_params, expected = extended_merits(network, data.x_train, data.y_train, batch=10)
    assert [c.position for c in report.candidates] == list(record.candidates)
    ext_shapes = {k: v.shape for k, v in extended.module.named_parameters()}
    for candidate in report.candidates:
        info = record.candidates[candidate.position]
        assert (candidate.kind, candidate.after, candidate.node, candidate.param) == (
            info.kind, info.position, info.nodes[0], merit_params[candidate.position])
        assert candidate.new_params == sum(math.prod(ext_shapes[p]) for p in info.params)
        assert candidate.flops == sum(extended.graph.node(n).flops() for n in info.nodes)
        for norm in MERIT_NORMS:
            assert candidate.norms[norm] == pytest.approx(expected[candidate.param][norm], rel=1e-10, abs=1e-300)
        assert (candidate.merit == 0) == (candidate.after == "side_act")
    assert report.existing == pytest.approx({k: expected[k]["fro"] for k in report.existing}, rel=1e-10)
    assert report.extended_flops == extended.graph.flops()
    assert network.module.training and all(p.grad is None for p in network.module.parameters())
    assert {k: p.requires_grad for k, p in network.module.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in network.state().items())


def test_sampled_sensitivities_are_those_of_the_sampled_rows():
    network, data = float64_problem("specs/fnn_spiral_deep.yaml", samples=50)
    report = sensitivities(network, data, sample=0.4, seed=5, batch=7)
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:20].sort().values
    _, _, merit_params, expected = extended_merits(network, data.x_train[rows], data.y_train[rows], batch=None)
    assert report.samples == 20
    for candidate in report.candidates:
        assert candidate.merit == pytest.approx(expected[candidate.param]["fro"], rel=1e-10)
    assert report.existing == pytest.approx({k: expected[k]["fro"] for k in report.existing}, rel=1e-10)


def test_sensitivity_flops_count_the_base_pass_and_the_candidate_gradient_products():
    """FLOPs per sample by hand: 3 x the forward FLOPs of the network (forward + backward) plus,
    per candidate, the products of its merit-weight gradient."""
    network = Network.build(load_graph("specs/resnet_spiral.yaml"), seed=0)
    report = sensitivities(network, spiral(0))
    lift, head = 3 * 2 * 2, 2 * 2 * 3                 # no biases
    block = 3 * (2 * (2 * 3) + 1 + 4 + 2)              # two 3x3 products, bias, tanh (4), h and the sum
    assert network.graph.flops() == lift + block + head
    # per candidate block (width 3): W1 a + b (3 x (2 x 3 + 1)), tanh (3 x 4), h g (3), dL/dW2 (2 x 3 x 3)
    candidate = 3 * (2 * 3 + 1) + 3 * 4 + 3 + 2 * 3 * 3
    assert report.flops_per_sample == 3 * (lift + block + head) + 2 * candidate
    assert report.to_json()["flops_per_sample"] == report.flops_per_sample
    ledger_run = grow("specs/resnet_spiral.yaml", spiral(0), insert_at=[1], epochs=2, lr=0.1, sample=0.5,
                      log_steps=False).summary["flops_per_sample"]["run"]
    assert ledger_run["sensitivity"] == round(report.flops_per_sample * 0.5)


def residual_args(**changes):
    return get_op("residual").check_args({"activation": "tanh", "h": 0.5, **changes})


@pytest.mark.parametrize("op,args,in_shape", [
    ("linear", {"out": 3}, (4,)), ("conv2d", {"out": 3, "kernel": 3, "stride": 2, "padding": 1}, (2, 6, 5)),
    ("residual", residual_args(), (3,)), ("residual", residual_args(form="one_weight"), (3,)),
    ("residual", residual_args(branch="conv2d", activation="relu"), (2, 4, 4))])
def test_parameter_gradient_rules_equal_autograd_through_the_built_module(op, args, in_shape):
    """OpDef.parameter_gradients, the per-op rule the merits use, against autograd through the
    op's module with random parameters (every role, not only the identity point)."""
    opdef = get_op(op)
    args = opdef.check_args(args)
    module = opdef.build_module(args, [in_shape]).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(5, *in_shape, generator=generator, dtype=torch.float64)
    params = dict(module.named_parameters())
    out = module(x)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(out, list(params.values()), grad_out)
    got = opdef.parameter_gradients(args, {k: v.detach() for k, v in params.items()}, x, grad_out, list(params))
    assert set(got) == set(params)
    for role, grad in zip(params, expected):
        assert torch.allclose(got[role], grad, rtol=1e-10, atol=1e-12), role


def test_weight_geometry_of_each_op():
    """The linear map each weight role is, for the norms B.1a-e: input shape, stride, padding."""
    conv = get_op("conv2d")
    assert conv.weight_geometry(conv.check_args({"out": 4, "kernel": 5, "stride": 2}), [(3, 9, 7)], "weight") == \
        Geometry((3, 9, 7), 2, 2)
    assert conv.weight_geometry(conv.check_args({"out": 4, "padding": 0}), [(3, 9, 7)], "weight") == \
        Geometry((3, 9, 7), 1, 0)
    assert conv.weight_geometry(conv.check_args({"out": 4}), [(3, 9, 7)], "bias") is None
    linear = get_op("linear")
    assert linear.weight_geometry(linear.check_args({"out": 2}), [(6,)], "weight") == Geometry((6, 1, 1))
    residual = get_op("residual")
    conv_block = residual.check_args({"branch": "conv2d", "kernel": 5})
    for role in ("inner.weight", "outer.weight"):
        assert residual.weight_geometry(conv_block, [(3, 8, 8)], role) == Geometry((3, 8, 8), 1, 2)
        assert residual.weight_geometry(residual.check_args({}), [(4,)], role) == Geometry((4, 1, 1))
    assert residual.weight_geometry(conv_block, [(3, 8, 8)], "inner.bias") is None
    assert get_op("relu").weight_geometry({}, [(4,)], "weight") is None


def test_sensitivity_pass_gives_the_loss_and_insertion_reports_it_on_the_same_samples():
    from graphgrow.runtime.splits import as_splits, evaluate
    network = Network.build(load_graph("specs/fnn_spiral.yaml"), seed=1)
    data = spiral(0)
    report = sensitivities(network, data, batch=100)
    assert report.loss == pytest.approx(evaluate(network, as_splits(data)[0])["loss"], rel=1e-6)
    assert report.rows is None and report.to_json()["loss"] == report.loss
    grown = grow("specs/fnn_spiral.yaml", data, insert_at=[2], epochs=3, lr=0.1, sample=120, log_steps=False)
    (event,) = grown.insertions
    assert event["loss_samples"] == 120
    assert event["loss_before"] == pytest.approx(event["loss_after"], abs=1e-6)


def test_sensitivity_pass_shows_progress_over_several_batches(capsys):
    network = Network.build(load_graph("specs/fnn_spiral.yaml"), seed=1)
    data = spiral(0)
    quiet = sensitivities(network, data, batch=100)
    assert "sensitivities" not in capsys.readouterr().err
    shown = sensitivities(network, data, batch=100, progress=True)
    assert "sensitivities" in capsys.readouterr().err
    assert [c.merit for c in shown.candidates] == [c.merit for c in quiet.candidates]
