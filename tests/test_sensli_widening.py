"""Data-driven neurons (GradMax directions ranked by (4.20)): the cross term against an
independent computation, the direction maximises the criterion (brute force over the circle of
incoming weights on small linear and conv layers), the widened network keeps its function, and
the CLI/API options."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import passes
from graphgrow import GraphgrowError, Network, graph_from_text
from graphgrow.runtime.data import Dataset
from graphgrow.sensli import cross_term, gradmax_rows, neuron_sensitivities, widen_best

from conftest import make_spec_text

LINEAR = make_spec_text(["{name: fc1, op: linear, out: 3}", "{name: act1, op: identity}",
                         "{name: fc2, op: linear, out: 4}", "{name: act2, op: tanh}",
                         "{name: head, op: linear, out: 3}"], shape=(2,))


def conv_spec(channels: int, kernel: int) -> str:
    return make_spec_text([f"{{name: conv1, op: conv2d, out: 2, kernel: {kernel}, padding: {kernel // 2}}}",
                           "{name: act1, op: identity}", "{name: pool, op: avgpool2d, kernel: 2}",
                           "{name: flat, op: flatten}", "{name: head, op: linear, out: 3}"], shape=(channels, 4, 4))


def dataset(x, y, classes=3):
    return Dataset(x, y, x[:4], y[:4], tuple(x.shape[1:]), classes)


def data_for(network, samples=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # float32 values: the data pipeline reads data in float32 (as_splits)
    x = torch.randn(samples, *network.graph.input_shape, generator=generator).double()
    y = torch.randint(0, 3, (samples,), generator=generator)
    return dataset(x, y)


def output_gradient(network, data, consumer):
    """dL/d(consumer output) per sample, from plain autograd on the unwidened network."""
    captured = {}
    hook = network.module.get_submodule(consumer).register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    loss = F.cross_entropy(network(data.x_train), data.y_train)
    hook.remove()
    (delta,) = torch.autograd.grad(loss, [captured["out"]])
    return delta.detach()


def linear_merit(network, data, w):
    """(4.20)'s numerator for a new fc1 unit with incoming weights w (identity activation):
    ||sum_i delta_i (w . x_i)||^2, delta at fc2's output."""
    delta = output_gradient(network, data, "fc2")
    return float((delta.T @ (data.x_train @ w)).pow(2).sum())


def conv_merit(network, data, kernel):
    """The same for a new conv1 channel: its activation is conv(x, kernel), avg-pooled and
    flattened into head's columns."""
    delta = output_gradient(network, data, "head")
    args = network.graph.node("conv1").args
    new = F.conv2d(data.x_train, kernel[None], padding=args["padding"])
    pooled = F.avg_pool2d(new, 2).flatten(1)
    return float((delta.T @ pooled).pow(2).sum())


def test_gradmax_direction_maximises_the_criterion_over_the_circle_linear():
    network = Network.build(graph_from_text(LINEAR), seed=1, dtype=torch.float64)
    data = data_for(network)
    rows, singular = gradmax_rows(network, "fc1", data, 2, batch=16)
    best = linear_merit(network, data, rows[0])
    assert best == pytest.approx(float(singular[0]) ** 2, rel=1e-10)
    assert linear_merit(network, data, rows[1]) == pytest.approx(best, rel=1e-10)  # -v: same through identity
    angles = torch.linspace(0, 2 * math.pi, 3601, dtype=torch.float64)
    grid = [linear_merit(network, data, torch.stack([torch.cos(a), torch.sin(a)])) for a in angles]
    assert max(grid) <= best * (1 + 1e-12) and max(grid) >= best * (1 - 1e-5)
    # and the whole pipeline scores the candidates with that merit
    candidates, _, extended, _ = neuron_sensitivities(network, data, per_layer=2, init="gradmax", batch=None)
    merits = [c.merit for c in candidates if c.layer == "fc1"]
    assert merits == pytest.approx([best, best], rel=1e-8)
    assert all(c.init == "gradmax" for c in candidates)
    x = data.x_test
    assert float((extended(x) - network(x)).detach().abs().max()) <= 1e-12


@pytest.mark.parametrize("channels, kernel", [(2, 1), (1, 3)])
def test_gradmax_direction_maximises_the_criterion_conv(channels, kernel):
    network = Network.build(graph_from_text(conv_spec(channels, kernel)), seed=2, dtype=torch.float64)
    data = data_for(network)
    A = cross_term(network, "conv1", data, batch=None)
    shape = (channels, kernel, kernel)
    fan_in = channels * kernel * kernel
    # independent: the merit's quadratic form from the merit of unit and paired kernels
    basis = torch.eye(fan_in, dtype=torch.float64)
    Q = torch.zeros(fan_in, fan_in, dtype=torch.float64)
    for j in range(fan_in):
        for l in range(fan_in):
            both = conv_merit(network, data, (basis[j] + basis[l]).reshape(shape))
            Q[j, l] = (both - conv_merit(network, data, basis[j].reshape(shape))
                       - conv_merit(network, data, basis[l].reshape(shape))) / 2
    torch.testing.assert_close(A.T @ A, Q, rtol=1e-9, atol=1e-14)
    rows, singular = gradmax_rows(network, "conv1", data, 1, batch=None)
    best = conv_merit(network, data, rows[0])
    assert best == pytest.approx(float(torch.linalg.eigvalsh(Q).max()), rel=1e-9)
    if fan_in == 2:  # brute force over the circle of unit kernels
        for angle in torch.linspace(0, math.pi, 1801, dtype=torch.float64):
            w = torch.stack([torch.cos(angle), torch.sin(angle)]).reshape(shape)
            assert conv_merit(network, data, w) <= best * (1 + 1e-12)
    else:  # no random unit kernel beats it
        generator = torch.Generator().manual_seed(3)
        for _ in range(200):
            w = torch.randn(fan_in, generator=generator, dtype=torch.float64)
            assert conv_merit(network, data, (w / w.norm()).reshape(shape)) <= best * (1 + 1e-12)


def test_gradmax_widening_of_the_cnn_keeps_the_function_and_beats_random_on_the_criterion():
    from graphgrow import load_graph
    network = Network.build(load_graph("specs/cnn_vgg.yaml"), seed=0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 28, 28, generator=generator).double()
    y = torch.randint(0, 10, (24,), generator=generator)
    data = dataset(x, y, 10)
    gradmax, reference, _, _ = neuron_sensitivities(network, data, per_layer=2, init="gradmax", batch=None)
    random, _, _, _ = neuron_sensitivities(network, data, per_layer=2, init="random", batch=None)
    assert {c.layer for c in gradmax} == {"conv1", "conv2", "fc1", "fc2"}  # conv layers too
    best = lambda cands, layer: max(c.merit for c in cands if c.layer == layer)
    for layer in ("fc1", "fc2"):  # relu linearised: the data-driven unit still scores higher
        assert best(gradmax, layer) > best(random, layer)
    wider, chosen, _, record = widen_best(network, data, count=None, tau=1.0, per_layer=2, init="gradmax", batch=None)
    assert all(c.merit >= reference for c in chosen)
    assert float((wider(x[:4]) - network(x[:4])).detach().abs().max()) <= 1e-10
    assert len({(c.layer, c.direction) for c in chosen}) == len(chosen)  # one sign per direction


def test_unsupported_groups_fall_back_to_random_and_bad_options_are_refused():
    from graphgrow import load_graph
    network = Network.build(load_graph("specs/resnet_spiral.yaml"), seed=0, dtype=torch.float64)
    data = data_for(network)
    data = dataset(data.x_train, data.y_train % 2, 2)
    candidates, _, extended, _ = neuron_sensitivities(network, data, per_layer=2, init="gradmax", batch=None)
    assert {c.init for c in candidates} == {"random"}  # the residual stream: random candidates
    assert float((extended(data.x_test) - network(data.x_test)).detach().abs().max()) <= 1e-12
    with pytest.raises(GraphgrowError, match="no data-driven neurons"):
        cross_term(network, "lift", data)
    with pytest.raises(GraphgrowError, match="unknown neuron initialisation"):
        neuron_sensitivities(network, data, init="smart")
    with pytest.raises(GraphgrowError, match="incoming weights of shape"):
        passes.widen(network, "lift", by=2, incoming=torch.zeros(3, 2))
