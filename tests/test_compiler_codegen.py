"""compile_graph's own way to a new module: the ops' nodes recorded (graphgrow.compiler.codegen's
Recording) rather than built into an fx graph, the forward written from the recording as fx's code
generator writes it from the replayed graph (text, globals, line map), the replayed graph the one
the ops build node by node, and the module made without fx.GraphModule's constructor, yet the
module that constructor makes (attributes, class, submodules, calls, errors, copies, pickling,
TorchScript, torch.export, recompiling after an edit)."""
from __future__ import annotations

import copy
import math
import operator
import pickle

import pytest
import torch
from hypothesis import given
from torch import fx
from torch.fx.experimental import _config as fx_config

from graphgrow import GraphgrowError, compile_graph, load_graph
from graphgrow.compiler import codegen
from graphgrow.compiler.codegen import Recorded, Recording
from graphgrow.compiler.export import example_input, to_exported_program, to_torchscript
from graphgrow.compiler import network
from graphgrow.compiler.network import CompiledModule, _compiled, _compiled_by_fx
from graphgrow.ir import LayerGraph, graph_from_text
from graphgrow.ops.base import _REGISTRY, OpDef

from conftest import ROOT, SPECS_DIR, make_spec_text
from test_core_fuzz import FUZZ, valid_specs

SPECS = sorted(SPECS_DIR.glob("*.yaml"))
PACKAGED_SPECS = sorted((ROOT / "graphgrow" / "specs").glob("*.yaml"))


def written(code) -> tuple:
    return code.src, code.globals, code._lineno_map, code._prologue_start


def fx_code(recording: Recording) -> tuple:
    return written(recording.replay().python_code(root_module="self"))


def own_code(recording: Recording) -> tuple:
    code = codegen.python_code(recording)
    assert code is not None, "the generator gave the recording to fx"
    return written(code)


def emitted_node_by_node(graph: LayerGraph, module: fx.GraphModule) -> fx.Graph:
    """The fx graph as compile_graph built it before recordings: the ops emit into an fx.Graph and
    every node they emit points at the spec line of its node."""
    fx_graph = fx.Graph()
    values = {"input": fx_graph.placeholder("x")}
    for node in graph.nodes:
        before = len(fx_graph.nodes)
        values[node.name] = node.opdef.emit(fx_graph, node.name, node.args, [values[i] for i in node.inputs],
                                            node.name in module._modules)
        file, line = node.loc.file, node.loc.line
        for fx_node in list(fx_graph.nodes)[before:]:
            fx_node.meta["graphgrow"] = {"node": node.name, "op": node.op, "file": file, "line": line}
            if line is not None:
                fx_node.meta["stack_trace"] = f'  File "{file or "<spec>"}", line {line}, in {node.name}\n' \
                                              f'    op: {node.op}\n'
    outputs = [values[name] for name in graph.outputs]
    fx_graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return fx_graph


def described(graph: fx.Graph) -> list:
    """Every node of ``graph`` as data (its input nodes by name, containers by type)."""
    by_name = lambda arg: fx.node.map_arg(arg, lambda node: node.name)  # noqa: E731
    return [(node.name, node.op, node.target, by_name(node.args), type(node.kwargs), by_name(node.kwargs),
             node.type, node.meta, [user.name for user in node.users]) for node in graph.nodes]


def assert_recorded_as_emitted(graph: LayerGraph, module: CompiledModule) -> None:
    recording = module.__dict__["_graph_source"]
    eager = emitted_node_by_node(graph, module)
    assert described(recording.replay()) == described(module.graph) == described(eager)
    by_fx = written(eager.python_code(root_module="self"))
    assert own_code(recording) == fx_code(recording) == by_fx
    assert module.code == by_fx[0]


@pytest.mark.parametrize("as_modules", [False, True])
@pytest.mark.parametrize("spec", SPECS + PACKAGED_SPECS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_recording_writes_and_replays_what_the_ops_emit_for_every_shipped_spec(spec, as_modules):
    graph = load_graph(spec)
    assert_recorded_as_emitted(graph, compile_graph(graph, stateless_as_modules=as_modules))


@FUZZ
@given(valid_specs())
def test_the_recording_writes_and_replays_what_the_ops_emit_for_random_specs(spec):
    text, _ = spec
    graph = graph_from_text(text)
    assert_recorded_as_emitted(graph, compile_graph(graph))


def outside(a, b):
    """A function outside torch: a global of the generated code (fx names it elsewhere_outside)."""
    return a * b


outside.__module__ = "elsewhere"


def tricky_recording() -> Recording:
    """Names fx renames in its code (globals, a builtin), a placeholder renamed in the graph,
    values nobody uses, constants of every kind the generator writes, and a tuple output."""
    recording = Recording()
    node = recording.create_node
    x = node("placeholder", "inf", (), {}, "inf")  # the graph names it inf_1: the code copies the argument
    y = node("placeholder", "y", (), {}, "y")
    torch_node = node("call_function", torch.relu, (x,), {}, "torch")
    taken = node("call_function", torch.neg, (torch_node,), {}, "elsewhere_outside")
    device = node("call_function", outside, (taken, y), {}, "device")
    node("call_function", torch.sigmoid, (device,), {}, "unused")
    sliced = node("call_function", operator.getitem, (device, (slice(None, 2, None), 1)), {}, "getitem")
    summed = node("call_function", torch.sum, (sliced,), {"dim": [0, -1], "keepdim": False}, "sum")
    scaled = node("call_function", operator.mul, (summed, math.inf), {}, "mul")
    named = node("call_function", torch.nn.functional.leaky_relu, (scaled,),
                 {"negative_slope": 0.25, "inplace": False}, "leaky_relu")
    # the name outside is free: the function's global is elsewhere_outside
    node("call_module", "fc", (named,), {}, "outside")
    node("call_function", torch.flatten, (named,), {"start_dim": 0, "end_dim": -1}, "len")
    node("output", "output", ((named, (y,), None, "text"),), {}, "output")
    return recording


def test_the_recording_names_nodes_as_fx_and_the_generator_writes_fx_code_where_fx_renames():
    recording = tricky_recording()
    assert [node.name for node in recording.nodes] == [node.name for node in recording.replay().nodes]
    assert [node.name for node in recording.nodes][:3] == ["inf_1", "y", "torch_1"]
    src, globals_, lines, start = own_code(recording)
    assert (src, globals_, lines, start) == fx_code(recording)
    for renamed in ("inf_1 = inf", "torch_1 = torch.relu(inf_1)", "elsewhere_outside = torch.neg(torch_1)",
                    "device_1 = elsewhere_outside_1(elsewhere_outside, y)", "len_1 = torch.flatten(",
                    "outside = self.fc(", "unused = torch.sigmoid(device_1);  unused = None"):
        assert renamed in src
    assert globals_["elsewhere_outside_1"] is outside


@pytest.mark.parametrize("edit", ["get_attr", "call_method", "ellipsis", "default", "self", "inplace", "getattr"])
def test_the_generator_gives_fx_what_it_does_not_write(edit):
    recording = tricky_recording()
    nodes = recording.nodes
    node = next(n for n in nodes if n.name == "outside")
    if edit == "get_attr":
        nodes.insert(nodes.index(node), Recorded("get_attr", "fc.weight", (), {}, "fc_weight", None))
    elif edit == "call_method":
        nodes.insert(nodes.index(node), Recorded("call_method", "relu", (node.args[0],), {}, "relu", None))
    elif edit == "ellipsis":
        node.args = (node.args[0], Ellipsis)
    elif edit == "default":
        nodes[0].args = (1.0,)
    elif edit == "self":
        nodes[0].target = "self"
    elif edit == "getattr":
        node.op, node.target, node.args = "call_function", getattr, (node.args[0], "shape")
    elif edit == "inplace":
        node.op, node.target, node.args = "call_function", operator.iadd, (node.args[0], 1.0)
    fx_code(recording)  # fx writes it
    assert codegen.python_code(recording) is None


def module_pair(spec, **options):
    """The module compile_graph makes and the one fx.GraphModule makes of the same graph."""
    module = compile_graph(load_graph(spec), **options)
    return module, fx.GraphModule(module, module.graph, class_name=type(module).__name__)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_a_compiled_module_is_the_module_fx_makes(spec):
    module, reference = module_pair(spec)
    assert type(module).__name__ == load_graph(spec).name == type(reference).__name__
    assert type(module).__qualname__ == type(reference).__qualname__
    assert type(module).__bases__ == (CompiledModule,)
    assert sorted(vars(type(module))) == sorted(vars(type(reference)))
    mine = {k: v for k, v in vars(module).items() if k not in ("_graph", "_graph_source", "_modules")}
    theirs = {k: v for k, v in vars(reference).items() if k not in ("_graph", "_modules")}
    assert mine == theirs
    assert list(module._modules.items()) == list(reference._modules.items())
    assert module.code == reference.code
    x = example_input(load_graph(spec), batch=2)
    module.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(module(x), reference(x))


def test_an_error_in_the_forward_names_the_generated_line(specs_dir, capsys):
    module, reference = module_pair(specs_dir / "mnist_fnn.yaml")
    messages = []
    for made in (module, reference):
        with pytest.raises(IndexError, match="out of range"):
            made(torch.randn(5))  # flatten from dimension 1 of a vector: fails in the generated line
        messages.append(capsys.readouterr().err)
    assert "line 5 of the traced Module's generated forward function" in messages[0]
    assert "flat = torch.flatten(x, start_dim = 1, end_dim = -1);  x = None" in messages[0]
    assert messages[0].split("Call using")[1] == messages[1].split("Call using")[1]


def test_copies_pickles_scripts_exports_and_recompiles(specs_dir):
    graph = load_graph(specs_dir / "cnn_vgg.yaml")
    module = compile_graph(graph, dtype=torch.float64).eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    expected = module(x)
    twin = copy.deepcopy(module)
    assert type(twin).__bases__ == (CompiledModule,) and torch.equal(twin(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(module))(x), expected)
    assert torch.equal(to_torchscript(module)(x), expected)
    assert torch.equal(to_exported_program(module, graph).module()(x), expected)
    # an edit of the graph reaches this module's forward alone
    node = next(n for n in module.graph.nodes if n.name == "act2")
    node.target = torch.sigmoid
    module.recompile()
    assert "torch.sigmoid(conv2)" in module.code and "sigmoid" not in twin.code
    assert not torch.allclose(module(x), expected) and torch.equal(twin(x), expected)


def test_recordings_the_fast_construction_does_not_cover_take_fx_way(specs_dir, monkeypatch):
    root = torch.nn.Module()
    root.fc = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)

    def recorded(*middle) -> Recording:
        """input -> fc -> the nodes ``middle`` makes of fc's node, the last one returned."""
        recording = Recording()
        value = recording.create_node("call_module", "fc", (recording.create_node("placeholder", "x", (), {}, "x"),),
                                      {}, "fc")
        for make in middle:
            value = make(recording, value)
        recording.create_node("output", "output", (value,), {}, "output")
        return recording
    # a node the generator leaves to fx: the module is still made directly, with fx's code
    recording = recorded(lambda r, fc: r.create_node("call_method", "relu", (fc,), {}, "relu"))
    made = _compiled(root, recording, "with_method")
    assert type(made).__bases__ == (CompiledModule,) and "relu = fc.relu()" in made.code
    assert made.code == fx_code(recording)[0] and torch.equal(made(x), root.fc(x).relu())
    assert made.__dict__["_graph_source"] is recording and "_graph" not in made.__dict__
    # a target that is not a submodule: fx's constructor
    recording = recorded(lambda r, fc: r.create_node("get_attr", "fc.bias", (), {}, "fc_bias"),
                         lambda r, bias: r.create_node("call_function", operator.sub, (r.nodes[1], bias), {}, "sub"))
    made = _compiled(root, recording, "with_get_attr")
    assert isinstance(made, CompiledModule) and "fc_bias = self.fc.bias" in made.code
    assert made.__dict__["_graph_source"] is recording and "_graph" not in made.__dict__
    assert torch.allclose(made(x), x @ root.fc.weight.T) and described(made.graph) == described(recording.replay())
    monkeypatch.setattr(fx_config, "enrich_profiler_metadata", True)
    module = compile_graph(load_graph(specs_dir / "mnist_fnn.yaml"))
    made = _compiled(module, module.__dict__["_graph_source"], "profiled")
    assert "_RecordFunctionFast" in made.code
    image = torch.randn(2, 1, 28, 28)
    assert torch.equal(made(image), module(image))


def test_without_fx_internals_fx_makes_every_module(specs_dir, monkeypatch):
    """Under a torch whose fx lacks the internals the generator uses (codegen.AVAILABLE false)."""
    module = compile_graph(load_graph(specs_dir / "cnn_vgg.yaml"))
    monkeypatch.setattr(codegen, "AVAILABLE", False)
    by_fx = []
    monkeypatch.setattr(network, "_compiled_by_fx", lambda *args: by_fx.append(args) or _compiled_by_fx(*args))
    assert codegen.python_code(module.__dict__["_graph_source"]) is None
    made = compile_graph(load_graph(specs_dir / "cnn_vgg.yaml"))
    assert len(by_fx) == 1 and isinstance(made, CompiledModule) and made.code == module.code
    assert described(made.graph) == described(module.graph)
    x = torch.randn(2, 28, 28).unsqueeze(1)
    assert torch.equal(made.eval()(x), module.eval()(x))


def test_a_recording_keeps_its_own_copy_of_container_arguments():
    """An in-place edit of a spec argument (permute's dims) after compiling changes neither the
    module's forward nor the fx graph made later from its recording."""
    graph = graph_from_text(make_spec_text(["{name: swap, op: permute, dims: [0, 2, 1]}", "{name: flat, op: flatten}",
                                            "{name: head, op: linear, out: 2}"], shape=(2, 3)))
    module = compile_graph(graph, seed=0)
    graph.node("swap").args["dims"].reverse()
    permute = next(node for node in module.graph.nodes if node.name == "swap")
    assert list(permute.kwargs["dims"]) == [0, 2, 1]
    assert "dims = [0, 2, 1]" in module.code


class _EmitsThroughCallFunction(OpDef):
    """A user's op whose own emit uses fx.Graph.call_function, which the recording lacks."""
    name = "emits_through_call_function"
    elementwise = True

    def function(self, args):
        return torch.tanh, {}

    def emit(self, graph, name, args, inputs, as_module):
        return graph.call_function(torch.tanh, tuple(inputs))


def test_an_op_emitting_through_another_fx_graph_method_gets_a_located_error(monkeypatch):
    monkeypatch.setitem(_REGISTRY, _EmitsThroughCallFunction.name, _EmitsThroughCallFunction())
    text = make_spec_text(["{name: squash, op: emits_through_call_function}", "{name: head, op: linear, out: 2}"])
    graph = graph_from_text(text, "net.yaml")
    with pytest.raises(GraphgrowError) as error:
        compile_graph(graph, seed=0)
    assert error.value.node == "squash" and error.value.file == "net.yaml" and error.value.line == 5
    assert "fx.Graph.call_function" in error.value.message and "create_node" in error.value.hint
    with pytest.raises(AttributeError):
        Recording().no_such_method  # noqa: B018  (anything that is no fx.Graph method stays an AttributeError)
