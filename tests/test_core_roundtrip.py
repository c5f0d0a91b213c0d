"""Round trip: dump -> load gives the same graph; save -> load gives the same function;
weights load safely (weights_only)."""
from __future__ import annotations

import pytest
import torch

from graphgrow.compiler import Network, compile_graph
from graphgrow.errors import GraphgrowError
from graphgrow.compiler.io import dump, load, load_weights, reload_graph, save, weights_path
from graphgrow.ir import graph_from_text, load_graph

ALL_SPECS = ["fnn_spiral", "fnn_spiral_deep", "resnet_spiral", "resnet_ode", "cnn_vgg", "mnist_fnn",
             "mnist_autoencoder", "mnist_shallow", "two_path"]


def graph_facts(graph):
    """Everything that defines a graph, without source locations."""
    return (graph.name, graph.input_shape, tuple(graph.outputs),
            [(n.name, n.op, n.args, n.inputs, n.init, n.frozen, n.in_shapes, n.out_shape) for n in graph.nodes])


def example_input(graph, batch=4, dtype=torch.float32):
    return torch.randn(batch, *graph.input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_dump_loads_to_the_same_graph_and_is_stable(specs_dir, spec):
    graph = load_graph(specs_dir / f"{spec}.yaml")
    text = dump(graph)
    again = graph_from_text(text)
    assert graph_facts(again) == graph_facts(graph)
    assert dump(again) == text


@pytest.mark.parametrize("spec", ["fnn_spiral", "resnet_ode", "cnn_vgg", "two_path"])
def test_dumped_spec_with_same_weights_computes_the_same_function(specs_dir, spec):
    graph = load_graph(specs_dir / f"{spec}.yaml")
    module = compile_graph(graph, seed=5)
    reloaded = compile_graph(reload_graph(graph), module.state_dict())
    x = example_input(graph)
    assert torch.equal(module(x), reloaded(x))


def test_dump_keeps_everything_a_spec_can_say(make_spec):
    text = make_spec([
        "{name: 'null', op: linear, out: 4, init: {weight: {normal: {std: 0.5}}, bias: zeros}}",
        "{name: 'on', op: scale, factor: 1.0e+20}",
        "{name: c, op: concat, inputs: ['null', 'on'], dim: -1}",
        "{name: r, op: residual, h: 0.1, activation: leaky_relu, form: one_weight}",
        "{name: l, op: leaky_relu, slope: 0.3, frozen: true}",
        "{name: f, op: linear, out: 2, frozen: true, bias: false}",
    ], shape=(3,), name="'yes'", extra="outputs: [f, c]\n")
    graph = graph_from_text(text)
    again = graph_from_text(dump(graph))
    assert graph_facts(again) == graph_facts(graph)
    assert again.name == "yes" and again.node("r").args["h"] == 0.1 and again.node("f").frozen
    assert "repeat" not in dump(graph) and "${" not in dump(graph)


def test_dump_leaves_out_defaults(specs_dir):
    text = dump(load_graph(specs_dir / "fnn_spiral.yaml"))
    assert "- {name: fc1, op: linear, out: 5}" in text and "bias" not in text
    assert text.startswith("graphgrow: 1\nname: fnn_spiral\ninput: {shape: [2]}\nlayers:\n")
    assert text.endswith("outputs: [head]\n")


@pytest.mark.parametrize("spec", ["fnn_spiral", "resnet_spiral", "cnn_vgg", "two_path"])
def test_save_and_load_give_the_same_function(tmp_path, specs_dir, spec):
    network = Network.build(load_graph(specs_dir / f"{spec}.yaml"), seed=9)
    spec_file, weights_file = save(network, tmp_path / "saved" / f"{spec}.yaml")
    assert spec_file.exists() and weights_file == weights_path(spec_file) and weights_file.suffix == ".pt"
    loaded = load(spec_file)
    assert graph_facts(loaded.graph)[1:] == graph_facts(network.graph)[1:]
    assert all(torch.equal(a, b) for a, b in zip(network.state().values(), loaded.state().values()))
    assert list(network.state()) == list(loaded.state())
    x = example_input(network.graph)
    assert torch.equal(network(x), loaded(x))


def test_saving_after_training_keeps_the_trained_weights(tmp_path, specs_dir):
    network = Network.build(load_graph(specs_dir / "fnn_spiral.yaml"), seed=0)
    with torch.no_grad():
        network.module.fc1.weight.add_(1.0)
    save(network, tmp_path / "net.yaml")
    assert torch.equal(load(tmp_path / "net.yaml").module.fc1.weight, network.module.fc1.weight)


def test_load_without_weights_initialises_from_seed(tmp_path, specs_dir):
    spec_file = tmp_path / "net.yaml"
    spec_file.write_text((specs_dir / "fnn_spiral.yaml").read_text())
    a, b = load(spec_file, seed=3), load(spec_file, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state().values(), b.state().values()))
    fresh = compile_graph(load_graph(spec_file), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state().values(), fresh.state_dict().values()))


def test_missing_and_corrupt_weights_are_graphgrow_errors(tmp_path, specs_dir):
    with pytest.raises(GraphgrowError) as info:
        load_weights(tmp_path / "none.pt")
    assert info.value.message == "weights file not found" and info.value.file == str(tmp_path / "none.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(GraphgrowError, match="cannot read weights"):
        load_weights(corrupt)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(GraphgrowError, match="does not hold a dict of tensors"):
        load_weights(not_dict)
    with pytest.raises(GraphgrowError, match="weights do not fit"):
        load(specs_dir / "fnn_spiral.yaml", weights=_save_state({"x": torch.zeros(1)}, tmp_path / "w.pt"))


class _Payload:
    """Pickles to a call of os.system; weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _save_state(state, path):
    torch.save(state, path)
    return path


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = _save_state({"fc1.weight": _Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(GraphgrowError, match="cannot read weights"):
        load_weights(path)
    assert not marker.exists()


def test_save_refuses_a_spec_path_the_weights_would_overwrite(tmp_path, specs_dir):
    network = Network.build(load_graph(specs_dir / "fnn_spiral.yaml"))
    with pytest.raises(GraphgrowError, match="must not end in .pt") as info:
        save(network, tmp_path / "model.pt")
    assert "model.yaml" in info.value.hint and not (tmp_path / "model.pt").exists()
