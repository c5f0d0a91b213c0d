"""The compiler: fx structure (call_module per parametric node, call_function otherwise),
metadata pointing at spec lines, readable code, deterministic init, loading weights."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from graphgrow.compiler import Network, compile_graph
from graphgrow.errors import GraphgrowError
from graphgrow.ir import graph_from_text, load_graph

SMALL_SPECS = ["fnn_spiral", "fnn_spiral_deep", "resnet_spiral", "resnet_ode", "two_path", "cnn_vgg"]


def spec_nodes(module: fx.GraphModule) -> list[fx.Node]:
    return [n for n in module.graph.nodes if n.op not in ("placeholder", "output")]


def test_one_call_module_per_parametric_node(specs_dir):
    graph = load_graph(specs_dir / "cnn_vgg.yaml")
    module = compile_graph(graph)
    modules = [n for n in module.graph.nodes if n.op == "call_module"]
    parametric = [n.name for n in graph.nodes if n.num_params() > 0]
    assert [n.target for n in modules] == parametric == ["conv1", "conv2", "fc1", "fc2", "head"]
    functions = {n.name: n.target for n in module.graph.nodes if n.op == "call_function"}
    assert functions == {"act1": torch.relu, "pool1": nn.functional.max_pool2d, "act2": torch.relu,
                         "pool2": nn.functional.max_pool2d, "flat": torch.flatten, "act3": torch.relu,
                         "act4": torch.relu}
    assert isinstance(module.get_submodule("conv1"), nn.Conv2d)


def test_fx_names_are_spec_names_and_meta_points_at_the_spec_line(specs_dir):
    path = specs_dir / "two_path.yaml"
    graph = load_graph(path)
    module = compile_graph(graph)
    lines = path.read_text().splitlines()
    for fx_node in spec_nodes(module):
        meta = fx_node.meta["graphgrow"]
        node = graph.node(meta["node"])
        assert meta == {"node": node.name, "op": node.op, "file": str(path), "line": node.loc.line}
        assert f"name: {node.name}," in lines[meta["line"] - 1]
        assert f'line {node.loc.line}' in fx_node.meta["stack_trace"]
        if not fx_node.name.endswith("_partial1"):
            assert fx_node.name == node.name
    partial = [n for n in module.graph.nodes if n.name == "merged_partial1"]
    assert partial and partial[0].meta["graphgrow"]["node"] == "merged" and partial[0].target is operator.add


def test_generated_code_is_readable(specs_dir):
    path = specs_dir / "fnn_spiral.yaml"
    module = compile_graph(load_graph(path))
    assert [line.strip() for line in module.code.strip().splitlines()] == [
        "def forward(self, x):",
        "fc1 = self.fc1(x);  x = None",
        "act1 = torch.relu(fc1);  fc1 = None",
        "head = self.head(act1);  act1 = None",
        "return head"]
    readable = module.print_readable(print_output=False)
    assert f"# File: {path}:6 in fc1, code: op: linear" in readable
    assert type(module).__name__ == "fnn_spiral"


@pytest.mark.parametrize("spec", SMALL_SPECS)
def test_same_seed_gives_bitwise_identical_parameters(specs_dir, spec):
    graph = load_graph(specs_dir / f"{spec}.yaml")
    first = compile_graph(graph, seed=7).state_dict()
    second = compile_graph(load_graph(specs_dir / f"{spec}.yaml"), seed=7).state_dict()
    other = compile_graph(graph, seed=8).state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_init_does_not_depend_on_global_rng(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    torch.manual_seed(1)
    first = compile_graph(graph, seed=3).state_dict()
    torch.manual_seed(2)
    torch.rand(10)
    second = compile_graph(graph, seed=3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_compiling_leaves_the_global_rng_alone(specs_dir):
    graph = load_graph(specs_dir / "cnn_vgg.yaml")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    compile_graph(graph, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_default_init_follows_pytorch_bounds(specs_dir):
    module = compile_graph(load_graph(specs_dir / "mnist_fnn.yaml"), seed=0)
    bound = 1 / 784 ** 0.5
    weight, bias = module.fc1.weight, module.fc1.bias
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert bias.abs().max() <= bound and weight.std() > bound / 3


def test_spec_initialisers_are_applied(make_spec):
    graph = graph_from_text(make_spec([
        "{name: eye, op: linear, out: 3, init: {weight: identity, bias: zeros}}",
        "{name: zero, op: linear, out: 3, init: zeros}",
        "{name: wide, op: linear, out: 3, init: {weight: {normal: {std: 0.001, mean: 5}}}}",
    ], shape=(3,)))
    module = compile_graph(graph, seed=0)
    assert torch.equal(module.eye.weight, torch.eye(3)) and torch.equal(module.eye.bias, torch.zeros(3))
    assert torch.equal(module.zero.weight, torch.zeros(3, 3)) and torch.equal(module.zero.bias, torch.zeros(3))
    assert (module.wide.weight - 5).abs().max() < 0.01
    x = torch.randn(4, 3)
    torch.testing.assert_close(module.eye(x), x)


def test_dirac_init_makes_a_conv_the_identity(make_spec):
    graph = graph_from_text(make_spec(["{name: c, op: conv2d, out: 2, init: {weight: dirac, bias: zeros}}"],
                                      shape=(2, 5, 5)))
    module = compile_graph(graph)
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(module(x), x)


def test_frozen_nodes_do_not_require_grad(make_spec):
    graph = graph_from_text(make_spec(["{name: a, op: linear, out: 3, frozen: true}", "{name: b, op: linear, out: 2}"]))
    module = compile_graph(graph)
    assert not any(p.requires_grad for p in module.a.parameters())
    assert all(p.requires_grad for p in module.b.parameters())


def test_state_is_loaded_exactly(specs_dir):
    graph = load_graph(specs_dir / "resnet_spiral.yaml")
    source = compile_graph(graph, seed=1)
    loaded = compile_graph(graph, source.state_dict(), seed=99)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(5, 2)
    assert torch.equal(source(x), loaded(x))


def test_state_that_does_not_fit_raises(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    state = compile_graph(graph).state_dict()
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(GraphgrowError) as info:
        compile_graph(graph, missing)
    assert "1 missing" in info.value.message and info.value.node == "head"
    assert info.value.file == str(specs_dir / "fnn_spiral.yaml")
    wrong = dict(state, **{"fc1.weight": torch.zeros(4, 2)})
    with pytest.raises(GraphgrowError) as info:
        compile_graph(graph, wrong)
    assert info.value.message == "weight 'fc1.weight' has shape [4, 2], the network needs [5, 2]"
    assert info.value.node == "fc1"
    extra = dict(state, **{"ghost.weight": torch.zeros(1)})
    with pytest.raises(GraphgrowError, match="1 unexpected"):
        compile_graph(graph, extra)


def test_dtype_float64(specs_dir):
    module = compile_graph(load_graph(specs_dir / "cnn_vgg.yaml"), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert module(torch.randn(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_several_outputs_are_returned_as_a_tuple(make_spec):
    module = compile_graph(graph_from_text(make_spec(["{name: a, op: linear, out: 3}", "{name: b, op: relu}"],
                                                     extra="outputs: [b, a]\n")))
    x = torch.randn(4, 2)
    b, a = module(x)
    assert torch.equal(b, torch.relu(a)) and torch.equal(a, module.a(x))


def test_compiled_fnn_equals_hand_written_module(specs_dir):
    network = Network.build(load_graph(specs_dir / "fnn_spiral_deep.yaml"), seed=4, dtype=torch.float64)
    reference = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    renamed = {"fc1": "0", "fc2": "2", "head": "4"}
    reference.load_state_dict({f"{renamed[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in network.state().items()})
    x = torch.randn(16, 2, dtype=torch.float64)
    assert torch.equal(network(x), reference(x))


def test_compiled_resnet_equals_explicit_euler_steps(specs_dir):
    network = Network.build(load_graph(specs_dir / "resnet_ode.yaml"), seed=2, dtype=torch.float64)
    m = network.module
    x = torch.randn(6, 2, dtype=torch.float64)
    state = m.lift.weight @ x.T
    for i in range(8):
        block = m.get_submodule(f"res{i}").inner
        state = state + 0.125 * torch.tanh(block.weight @ state + block.bias[:, None])
    torch.testing.assert_close(network(x), (m.head.weight @ state).T, rtol=1e-12, atol=1e-12)


def test_gradients_flow_to_every_parameter(specs_dir):
    module = compile_graph(load_graph(specs_dir / "two_path.yaml"))
    module(torch.randn(8, 2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_train_eval_reaches_batchnorm_and_dropout(make_spec):
    module = compile_graph(graph_from_text(make_spec(["{name: bn, op: batchnorm}", "{name: d, op: dropout, p: 0.5}"],
                                                     shape=(4,))))
    x = torch.randn(32, 4) * 3 + 1
    module.eval()
    assert torch.allclose(module(x), x, atol=1e-4)
    module.train()
    torch.manual_seed(0)
    y = module(x)
    assert (y == 0).any() and abs(y[y != 0].mean().item()) < 1.0


def test_a_networks_first_tensor_is_the_first_of_parameters_then_floating_buffers(specs_dir):
    """Network.dtype and .device read the first tensor by a walk that stops there; it is the one
    ``parameters()`` (else the floating-point ``buffers()``) yields first, nested modules included."""
    from graphgrow.compiler.network import _first_entry
    for spec in SMALL_SPECS:
        network = Network.build(load_graph(specs_dir / f"{spec}.yaml"), seed=0)
        assert network._first_tensor() is next(network.module.parameters())
    holder = nn.Module()
    holder.register_buffer("count", torch.zeros((), dtype=torch.long))
    holder.norm = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3, affine=False).double())
    assert _first_entry(holder, "_parameters") is None
    assert _first_entry(holder, "_buffers", floating=True) is holder.norm[1].running_mean
    assert _first_entry(holder, "_buffers") is holder.count is next(holder.buffers())
