"""The fast paths of rebuilding a network after a pass: modules resized instead of built
(``OpDef.module_sizes``), new modules made from an old one of the same op, shapes inferred again
only downstream of changed arguments, and compiled modules that share a private source of
their fx graph. Each must give what the slow path gives."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import passes
from graphgrow import Network, Node, get_op, graph_from_text, load_graph
from graphgrow.compiler.codegen import Recording
from passes.insert import apply_plan, plan_identity
from passes.record import Record, _only_sizes_differ, rebuild, resized_module

from conftest import SPECS_DIR

SIZED_OPS = [  # op, arguments, input shape before and after a width change
    ("linear", {"out": 3}, (4,), {"out": 5}, (6,)),
    ("linear", {"out": 3, "bias": False}, (4,), {"out": 5, "bias": False}, (6,)),
    ("conv2d", {"out": 3, "kernel": 3}, (2, 8, 8), {"out": 5, "kernel": 3}, (4, 8, 8)),
    ("conv2d", {"out": 3, "kernel": 3, "padding": 1}, (2, 8, 8), {"out": 5, "kernel": 3}, (4, 8, 8)),  # 'same'
    ("conv2d", {"out": 3, "kernel": 1, "stride": 2, "bias": False}, (2, 6, 6),
     {"out": 4, "kernel": 1, "stride": 2, "bias": False}, (5, 6, 6)),
    ("batchnorm", {}, (3, 4, 4), {}, (5, 4, 4)),
    ("batchnorm", {}, (3,), {}, (6,)),
    ("residual", {"branch": "linear"}, (3,), {"branch": "linear"}, (5,)),
    ("residual", {"branch": "conv2d", "form": "one_weight"}, (3, 4, 4),
     {"branch": "conv2d", "form": "one_weight"}, (5, 4, 4)),
]


def node(op, args, shape, name="n"):
    result = Node(name, op, get_op(op).check_args(args), ["input"])
    result.in_shapes = [shape]
    result.out_shape = tuple(get_op(op).output_shape(result.args, [shape]))
    return result


def attributes(module: nn.Module) -> dict:
    """Every non-tensor attribute of the module tree, and the shapes of its tensors."""
    found = {}
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers", "_modules") or "hook" in key:
                continue
            found[f"{prefix}:{key}"] = value
        for key, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            found[f"{prefix}:{key}"] = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
    return found


@pytest.mark.parametrize("op, small_args, small_shape, wide_args, wide_shape", SIZED_OPS)
def test_a_resized_module_is_the_module_a_fresh_build_gives(op, small_args, small_shape, wide_args, wide_shape):
    small, wide = node(op, small_args, small_shape), node(op, wide_args, wide_shape)
    fresh = wide.opdef.build_module(wide.args, wide.in_shapes)
    values = {name: torch.randn(t.shape) if t.is_floating_point() else t.clone()
              for name, t in fresh.state_dict().items()}
    resized = resized_module(small.opdef.build_module(small.args, small.in_shapes), wide, values)
    assert resized is not None
    assert attributes(resized) == attributes(fresh)
    for name, tensor in resized.state_dict().items():
        assert torch.equal(tensor, values[name])
    assert repr(resized) == repr(fresh)


@pytest.mark.parametrize("op, small_args, small_shape, wide_args, wide_shape", SIZED_OPS)
def test_nodes_of_a_width_change_count_as_differing_in_sizes_only(op, small_args, small_shape, wide_args,
                                                                 wide_shape):
    assert _only_sizes_differ(node(op, small_args, small_shape), node(op, wide_args, wide_shape))


@pytest.mark.parametrize("first, second", [({"out": 3, "kernel": 3, "padding": 0}, {"out": 5, "kernel": 3}),
                                           ({"out": 3, "kernel": 3}, {"out": 5, "kernel": 5}),
                                           ({"out": 3, "kernel": 3}, {"out": 3, "kernel": 3, "bias": False})])
def test_nodes_whose_modules_differ_in_more_than_sizes_are_told_apart(first, second):
    assert not _only_sizes_differ(node("conv2d", first, (3, 8, 8)), node("conv2d", second, (3, 8, 8)))


def test_a_module_whose_entries_do_not_fit_is_not_resized():
    small, wide = node("linear", {"out": 3}, (4,)), node("linear", {"out": 5}, (6,))
    module = small.opdef.build_module(small.args, small.in_shapes)
    assert resized_module(module, wide, {"weight": torch.zeros(5, 6)}) is None  # the bias keeps 3 rows


def test_incremental_shape_inference_equals_a_full_one():
    graph = load_graph(SPECS_DIR / "cnn_vgg.yaml")
    graph.node("conv1").args = {**graph.node("conv1").args, "out": 20}
    full = graph.copy()
    graph.infer_shapes(["conv1"])
    full.infer_shapes()
    assert [(n.in_shapes, n.out_shape) for n in graph.nodes] == [(n.in_shapes, n.out_shape) for n in full.nodes]
    assert graph.node("conv2").in_shapes == [(20, 14, 14)]


def shapes(graph):
    return [(n.name, n.in_shapes, n.out_shape) for n in graph.nodes]


def inferred_afresh(graph):
    fresh = graph.copy()
    for n in fresh.nodes:
        n.in_shapes, n.out_shape = [], None
    fresh.infer_shapes()
    return shapes(fresh)


def test_a_rebuild_after_a_structural_edit_infers_the_shapes_a_full_inference_gives():
    old = Network.build(load_graph(SPECS_DIR / "mnist_fnn.yaml"), seed=0, dtype=torch.float64)
    graph = old.graph.copy()
    graph.add(Node("extra", "linear", get_op("linear").check_args({"out": 7}), ["fc2"]), after="fc2")
    graph.set_inputs("act2", ["extra"])  # act2 and fc3's input now have 7 units
    values = {"extra.weight": torch.randn(7, 100), "extra.bias": torch.zeros(7), "fc3.weight": torch.randn(100, 7)}
    new = rebuild(old, graph, Record("edit"), values)
    assert shapes(new.graph) == inferred_afresh(new.graph)
    assert new.graph.node("fc3").in_shapes == [(7,)]
    assert new.module(torch.randn(2, 1, 28, 28, dtype=torch.float64)).shape == (2, 10)


@pytest.mark.parametrize("spec", ["mnist_fnn", "cnn_vgg", "resnet_small", "two_path", "mobilenet_v2_small"])
def test_every_pass_leaves_the_shapes_a_full_inference_gives(spec):
    network = Network.build(load_graph(SPECS_DIR / f"{spec}.yaml"), seed=0)
    graph = network.graph
    results = [passes.widen(network, passes.widenable(graph)[0], by=2)[0],
               passes.prune(network, passes.widenable(graph)[0], units=[0], measure=False)[0]]
    after = next(n.name for n in graph.nodes if n.opdef.idempotent)
    results.append(passes.insert_identity(network, after)[0])
    results.append(passes.insert_identity(network, after, form="residual")[0])
    for result in results:
        assert shapes(result.graph) == inferred_afresh(result.graph)


def mlp(dtype=torch.float64):
    return Network.build(load_graph(SPECS_DIR / "mnist_fnn.yaml"), seed=0, dtype=dtype)


def test_widened_module_has_a_graph_of_its_own_and_its_own_forward():
    old = mlp()
    new, _ = passes.widen(old, "fc2", by=2)
    # no fx graph yet: both run code written from one recording, which neither edits
    source = old.module.__dict__["_graph_source"]
    assert isinstance(source, Recording) and new.module.__dict__["_graph_source"] is source
    assert "_graph" not in vars(old.module) and "_graph" not in vars(new.module)
    assert new.module.graph is not old.module.graph
    assert new.module.code == old.module.code
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    before = old.module(x)
    # edit the new module's graph: relu -> sigmoid after fc2; the old module stays as it was
    target = next(n for n in new.module.graph.nodes if n.name == "act2")
    target.target = torch.sigmoid
    new.module.recompile()
    assert "sigmoid" in new.module.code and "sigmoid" not in old.module.code
    assert torch.equal(old.module(x), before)
    assert not torch.allclose(new.module(x), before)
    # a module widened from the edited one runs the edited code
    newer, _ = passes.widen(new, "fc3", by=1)
    assert "sigmoid" in newer.module.code
    assert torch.allclose(newer.module(x), new.module(x), atol=1e-12)


def test_compiled_modules_copy_and_pickle_with_their_graph():
    old = mlp()
    new, _ = passes.widen(old, "fc2", by=2)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    for module in (old.module, new.module):
        twin = copy.deepcopy(module)
        assert torch.equal(twin(x), module(x))
        assert [n.name for n in twin.graph.nodes] == [n.name for n in module.graph.nodes]
        # fx pickles the code and traces it again on loading (its own node names)
        loaded = pickle.loads(pickle.dumps(module))
        assert torch.equal(loaded(x), module(x))
        assert len(loaded.graph.nodes) == len(module.graph.nodes)


def test_an_inserted_layer_made_from_an_old_module_is_independent_and_trainable():
    text = (SPECS_DIR / "mnist_fnn.yaml").read_text().replace("name: fc2, op: linear",
                                                            "name: fc2, op: linear, frozen: true")
    network = Network.build(graph_from_text(text), seed=0, dtype=torch.float64)
    assert not network.module.fc2.weight.requires_grad
    seen = []
    network.module.fc2.register_forward_hook(lambda *args: seen.append(1))
    grown, record = passes.insert_identity(network, "act2")
    layer = grown.module.act2_id
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (100, 100)
    assert layer.weight.requires_grad and layer.bias.requires_grad
    assert not layer._forward_hooks
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(grown.module.eval()(x), network.module.eval()(x), atol=1e-12)
    assert record.origins["act2_id.weight"].kind == "new"


def test_rebuilt_modules_do_not_share_storage_with_the_values_a_pass_hands_in():
    network = mlp()
    graph = network.graph.copy()
    plan = plan_identity(graph, "act2")
    apply_plan(graph, plan)
    grown = rebuild(network, graph, Record("insert-identity"), plan.values)
    widened, _ = passes.widen(grown, "act2_id", by=1)  # a resized copy, the other path
    with torch.no_grad():
        grown.module.act2_id.weight.add_(1.0)
    assert torch.equal(plan.values["act2_id.weight"], torch.eye(100, dtype=torch.float64))
    assert torch.equal(widened.module.act2_id.weight[:100], torch.eye(100, dtype=torch.float64))


def test_a_new_node_is_not_made_from_a_module_of_another_rank():
    graph = load_graph(SPECS_DIR / "cnn_vgg.yaml")
    graph.add(Node("conv1_bn", "batchnorm", get_op("batchnorm").check_args({}), ["conv1"]), after="conv1")
    graph.redirect("conv1", "conv1_bn")
    graph.infer_shapes()
    network = Network.build(graph, seed=0, dtype=torch.float64)
    assert isinstance(network.module.conv1_bn, nn.BatchNorm2d)
    grown_graph = network.graph.copy()
    grown_graph.add(Node("fc1_bn", "batchnorm", get_op("batchnorm").check_args({}), ["fc1"]), after="fc1")
    grown_graph.redirect("fc1", "fc1_bn")
    fresh = nn.BatchNorm1d(128).double()
    values = {f"fc1_bn.{k}": v for k, v in fresh.state_dict().items()}
    grown = rebuild(network, grown_graph, Record("test"), values)
    assert isinstance(grown.module.fc1_bn, nn.BatchNorm1d)
    assert grown.module(torch.randn(4, 1, 28, 28, dtype=torch.float64)).shape == (4, 10)


def test_a_rebuild_carries_each_module_mode_and_builds_new_modules_in_the_network_mode():
    network = Network.build(load_graph(SPECS_DIR / "cnn_vgg.yaml"), seed=0)
    network.module.eval()
    network.module.fc1.train()  # a user's choice for one layer: it is carried with the layer
    for new in (passes.widen(network, "conv2", by=2)[0], passes.insert_identity(network, "act2")[0],
                passes.insert_identity(network, "act3")[0],  # a linear layer made from a copy of fc1
                passes.insert_identity(network, "act3", form="residual")[0]):
        modes = {name: child.training for name, child in new.module.named_children()}
        assert not new.module.training
        assert modes.pop("fc1") is True
        assert not any(modes.values()), modes  # carried ones and the new layers alike
