"""compile_graph's own way to a new module: graphgrow.compiler.codegen writes the forward fx's code
generator writes (text, globals, line map), and the module is made without fx.GraphModule's
constructor, yet is the module that constructor makes (attributes, class, submodules, calls,
errors, copies, pickling, TorchScript, torch.export, recompiling after an edit)."""
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

from graphgrow import compile_graph, load_graph
from graphgrow.compiler import codegen
from graphgrow.compiler.export import example_input, to_exported_program, to_torchscript
from graphgrow.compiler import network
from graphgrow.compiler.network import CompiledModule, _compiled, _compiled_by_fx, _graph_copy
from graphgrow.ir import graph_from_text

from conftest import SPECS_DIR
from test_core_fuzz import FUZZ, valid_specs

SPECS = sorted(SPECS_DIR.glob("*.yaml"))


def fx_code(graph: fx.Graph):
    code = graph.python_code(root_module="self")
    return code.src, code.globals, code._lineno_map, code._prologue_start


def own_code(graph: fx.Graph):
    code = codegen.python_code(graph)
    assert code is not None, "the generator gave the graph to fx"
    return code.src, code.globals, code._lineno_map, code._prologue_start


@pytest.mark.parametrize("as_modules", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_the_generator_writes_fx_code_for_every_shipped_spec(spec, as_modules):
    module = compile_graph(load_graph(spec), stateless_as_modules=as_modules)
    assert own_code(module.graph) == fx_code(module.graph)
    assert module.code == fx_code(module.graph)[0]


@FUZZ
@given(valid_specs())
def test_the_generator_writes_fx_code_for_random_specs(spec):
    text, _ = spec
    module = compile_graph(graph_from_text(text))
    assert own_code(module.graph) == fx_code(module.graph)


def outside(a, b):
    """A function outside torch: a global of the generated code (fx names it elsewhere_outside)."""
    return a * b


outside.__module__ = "elsewhere"


def tricky_graph() -> fx.Graph:
    """Names fx renames in its code (globals, a builtin), a placeholder renamed in the graph,
    values nobody uses, constants of every kind the generator writes, and a tuple output."""
    graph = fx.Graph()
    x = graph.placeholder("inf")  # the graph names it inf_1: the code copies the argument
    y = graph.placeholder("y")
    torch_node = graph.create_node("call_function", torch.relu, (x,), name="torch")
    taken = graph.create_node("call_function", torch.neg, (torch_node,), name="elsewhere_outside")
    device = graph.create_node("call_function", outside, (taken, y), name="device")
    graph.create_node("call_function", torch.sigmoid, (device,), name="unused")
    sliced = graph.call_function(operator.getitem, (device, (slice(None, 2, None), 1)))
    summed = graph.call_function(torch.sum, (sliced,), {"dim": [0, -1], "keepdim": False})
    scaled = graph.call_function(operator.mul, (summed, math.inf))
    named = graph.call_function(torch.nn.functional.leaky_relu, (scaled,),
                                {"negative_slope": 0.25, "inplace": False})
    # the name outside is free: the function's global is elsewhere_outside
    graph.create_node("call_module", "fc", (named,), name="outside")
    graph.create_node("call_function", torch.flatten, (named,), {"start_dim": 0, "end_dim": -1}, name="len")
    graph.output((named, (y,), None, "text"))
    return graph


def test_the_generator_writes_fx_code_where_fx_renames():
    graph = tricky_graph()
    src, globals_, lines, start = own_code(graph)
    assert (src, globals_, lines, start) == fx_code(graph)
    for renamed in ("inf_1 = inf", "torch_1 = torch.relu(inf_1)", "elsewhere_outside = torch.neg(torch_1)",
                    "device_1 = elsewhere_outside_1(elsewhere_outside, y)", "len_1 = torch.flatten(",
                    "outside = self.fc(", "unused = torch.sigmoid(device_1);  unused = None"):
        assert renamed in src
    assert globals_["elsewhere_outside_1"] is outside


@pytest.mark.parametrize("edit", ["get_attr", "call_method", "type", "ellipsis", "default", "self", "wrapped",
                                  "inplace", "getattr", "codegen"])
def test_the_generator_gives_fx_what_it_does_not_write(edit):
    graph = tricky_graph()
    node = next(n for n in graph.nodes if n.name == "outside")
    if edit == "get_attr":
        with graph.inserting_before(node):
            graph.get_attr("fc.weight")
    elif edit == "call_method":
        with graph.inserting_before(node):
            graph.call_method("relu", (node.args[0],))
    elif edit == "type":
        node.type = torch.Tensor
    elif edit == "ellipsis":
        node.args = (node.args[0], Ellipsis)
    elif edit == "default":
        next(iter(graph.nodes)).args = (1.0,)
    elif edit == "self":
        next(iter(graph.nodes)).target = "self"
    elif edit == "wrapped":
        node.op, node.target = "call_function", outside
        node.meta["is_wrapped"] = True
    elif edit == "getattr":
        node.op, node.target, node.args = "call_function", getattr, (node.args[0], "shape")
    elif edit == "inplace":
        node.op, node.target, node.args = "call_function", operator.iadd, (node.args[0], 1.0)
    elif edit == "codegen":
        graph.set_codegen(type("Other", (fx.graph.CodeGen,), {})())
    fx_code(graph)  # fx writes it
    assert codegen.python_code(graph) is None


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


def test_graphs_the_fast_construction_does_not_cover_take_fx_way(specs_dir, monkeypatch):
    module = compile_graph(load_graph(specs_dir / "mnist_fnn.yaml"))
    root = torch.nn.Module()
    root._modules.update(module._modules)
    x = torch.randn(2, 1, 28, 28)
    # a node the generator leaves to fx: the module is still made directly, with fx's code
    graph = _graph_copy(module.graph)
    act = next(n for n in graph.nodes if n.name == "act3")
    with graph.inserting_after(act):
        method = graph.call_method("relu", (act,))
    act.replace_all_uses_with(method, delete_user_cb=lambda user: user is not method)
    made = _compiled(root, graph, "with_method")
    assert type(made).__bases__ == (CompiledModule,) and "relu = act3.relu()" in made.code
    assert made.code == fx_code(graph)[0] and torch.equal(made(x), module(x))
    # a target that is not a submodule
    graph = _graph_copy(module.graph)
    with graph.inserting_before(next(n for n in graph.nodes if n.name == "head")):
        graph.get_attr("head.weight")
    made = _compiled(root, graph, "with_get_attr")
    assert isinstance(made, CompiledModule) and "head_weight = self.head.weight" in made.code
    monkeypatch.setattr(fx_config, "enrich_profiler_metadata", True)
    made = _compiled(root, _graph_copy(module.graph), "profiled")
    assert "_RecordFunctionFast" in made.code
    assert torch.equal(made(x), module(x))


def test_without_fx_internals_fx_makes_every_module(specs_dir, monkeypatch):
    """Under a torch whose fx lacks the internals the generator uses (codegen.AVAILABLE false)."""
    module = compile_graph(load_graph(specs_dir / "cnn_vgg.yaml"))
    monkeypatch.setattr(codegen, "AVAILABLE", False)
    by_fx = []
    monkeypatch.setattr(network, "_compiled_by_fx", lambda *args: by_fx.append(args) or _compiled_by_fx(*args))
    assert codegen.python_code(module.graph) is None
    made = compile_graph(load_graph(specs_dir / "cnn_vgg.yaml"))
    assert len(by_fx) == 1 and isinstance(made, CompiledModule) and made.code == module.code
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(made.eval()(x), module.eval()(x))
