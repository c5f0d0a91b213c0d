"""Property tests. Random valid specs (chains and small DAGs of the ops) compile, every inferred
shape equals the real one, parameter counts agree, and dump round-trips. Random edits of valid
specs either build or raise GraphgrowError, never anything else."""
from __future__ import annotations

import math
import os

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

from graphgrow.compiler import compile_graph
from graphgrow.errors import GraphgrowError
from graphgrow.compiler.io import dump
from graphgrow.ir import graph_from_text

from conftest import SPECS_DIR

# GRAPHGROW_FUZZ_EXAMPLES=2000 runs a deeper search than the default, quick one
FUZZ = settings(max_examples=int(os.environ.get("GRAPHGROW_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "softplus", "identity"]


# -- random valid specs --------------------------------------------------------------------------
@st.composite
def valid_specs(draw):
    """(spec text, number of nodes): a random DAG whose every op is legal for its input shape."""
    image = draw(st.booleans())
    shape = ((draw(st.integers(1, 3)), draw(st.integers(3, 8)), draw(st.integers(3, 8))) if image
             else (draw(st.integers(1, 6)),))
    shapes = {"input": shape}
    lines, last = [], "input"
    for k in range(draw(st.integers(1, 8))):
        name = f"n{k}"
        source = draw(st.sampled_from(sorted(shapes))) if draw(st.booleans()) else last
        s = shapes[source]
        options = ["act", "leaky_relu", "scale", "dropout", "layernorm", "identity"]
        options += ["add"] * any(v == s and n != source for n, v in shapes.items())
        options += ["concat"] * any(len(v) == len(s) and v[1:] == s[1:] and n != source for n, v in shapes.items())
        if len(s) == 1:
            options += ["linear", "linear", "residual", "batchnorm"]
        else:
            options += ["conv2d", "conv2d", "flatten", "adaptive_avgpool2d", "batchnorm", "residual_conv"]
            options += ["pool"] * (min(s[1:]) >= 2)
        op = draw(st.sampled_from(options))
        inputs = [source]
        if op == "act":
            fields, out = f"op: {draw(st.sampled_from(ACTIVATIONS))}", s
        elif op == "leaky_relu":
            fields, out = f"op: leaky_relu, slope: {draw(st.sampled_from([0.01, 0.2, 0.5]))}", s
        elif op == "scale":
            fields, out = f"op: scale, factor: {draw(st.sampled_from([-1.5, 0.5, 2]))}", s
        elif op in ("dropout", "layernorm", "identity", "batchnorm"):
            fields, out = f"op: {op}", s
        elif op == "add":
            partners = [n for n, v in shapes.items() if v == s and n != source]
            inputs += draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))
            fields, out = "op: add", s
        elif op == "concat":
            partners = [n for n, v in shapes.items() if len(v) == len(s) and v[1:] == s[1:] and n != source]
            inputs.append(draw(st.sampled_from(partners)))
            fields, out = "op: concat, dim: 1", (sum(shapes[i][0] for i in inputs), *s[1:])
        elif op == "linear":
            width, bias = draw(st.integers(1, 6)), draw(st.booleans())
            fields, out = f"op: linear, out: {width}, bias: {str(bias).lower()}", (width,)
        elif op == "residual":
            fields = (f"op: residual, form: {draw(st.sampled_from(['one_weight', 'two_weight']))}, "
                      f"activation: {draw(st.sampled_from(['relu', 'tanh']))}, h: {draw(st.sampled_from([0.5, 1.0]))}")
            out = s
        elif op == "residual_conv":
            fields, out = "op: residual, branch: conv2d, form: one_weight, kernel: 3", s
        elif op == "conv2d":
            kernel = draw(st.sampled_from([k for k in (1, 3, 5) if k <= min(s[1:])]))
            stride = draw(st.integers(1, 2))
            padding = draw(st.sampled_from(["same", 0, 1]))
            p = kernel // 2 if padding == "same" else padding
            channels = draw(st.integers(1, 4))
            fields = f"op: conv2d, out: {channels}, kernel: {kernel}, stride: {stride}, padding: {padding}"
            out = (channels, *((d + 2 * p - kernel) // stride + 1 for d in s[1:]))
        elif op == "flatten":
            fields, out = "op: flatten", (math.prod(s),)
        elif op == "adaptive_avgpool2d":
            size = draw(st.integers(1, 2))
            fields, out = f"op: adaptive_avgpool2d, out: {size}", (s[0], size, size)
        else:  # pool
            kind, kernel = draw(st.sampled_from(["maxpool2d", "avgpool2d"])), 2
            fields, out = f"op: {kind}, kernel: {kernel}", (s[0], *((d - kernel) // kernel + 1 for d in s[1:]))
        lines.append(f"  - {{name: {name}, {fields}, inputs: [{', '.join(inputs)}]}}")
        shapes[name], last = out, name
    outputs = [last] + ([draw(st.sampled_from(sorted(set(shapes) - {"input", last})))]
                        if len(shapes) > 2 and draw(st.booleans()) else [])
    text = (f"graphgrow: 1\nname: random_net\ninput: {{shape: {list(shape)}}}\nlayers:\n" + "\n".join(lines)
            + f"\noutputs: [{', '.join(outputs)}]\n")
    return text, {k: v for k, v in shapes.items() if k != "input"}


def real_shapes(module: fx.GraphModule, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op not in ("placeholder", "output"):
                shapes[n.name] = tuple(value.shape)
            return value

    Recorder(module).run(x)
    return shapes


@FUZZ
@given(valid_specs(), st.integers(0, 2**31 - 1))
def test_random_valid_specs_infer_the_real_shapes(spec, seed):
    text, expected_shapes = spec
    graph = graph_from_text(text)
    assert {n.name: n.out_shape for n in graph.nodes} == expected_shapes
    module = compile_graph(graph, seed=seed, dtype=torch.float64).eval()
    x = torch.randn(2, *graph.input_shape, dtype=torch.float64)
    real = real_shapes(module, x)
    for node in graph.nodes:
        assert real[node.name] == (2, *node.out_shape), node.name
    assert graph.num_params() == sum(p.numel() for p in module.parameters())
    assert {n.name: n.param_shapes() for n in graph.nodes if n.param_shapes()} == {
        name: {k: tuple(v.shape) for k, v in sub.named_parameters()} for name, sub in module.named_children()
        if any(True for _ in sub.parameters())}
    # round trip: the dumped spec is the same graph and, with the same weights, the same function
    again = graph_from_text(dump(graph))
    assert [(n.name, n.op, n.args, n.inputs, n.out_shape) for n in again.nodes] == \
        [(n.name, n.op, n.args, n.inputs, n.out_shape) for n in graph.nodes]
    twin = compile_graph(again, module.state_dict(), dtype=torch.float64).eval()
    first, second = module(x), twin(x)
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@FUZZ
@given(valid_specs(), st.integers(0, 1000))
def test_same_seed_same_parameters_on_random_specs(spec, seed):
    graph = graph_from_text(spec[0])
    a, b = compile_graph(graph, seed=seed).state_dict(), compile_graph(graph, seed=seed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- random invalid specs -----------------------------------------------------------------------------
SHIPPED = [p.read_text() for p in sorted(SPECS_DIR.glob("*.yaml"))]
SNIPPETS = ["{", "}", "[", "]", ":", ",", "-", "'", '"', "\t", "\n", " ", "${", "}", "${w}", "${1//0}",
            "&a ", "*a", "!!python/object/apply:os.system ['true']", "!!binary ", "!x ", "<<: ", "?",
            "#", "|", ">", "%", "@", "`", "null", "~", "-1", "0", "1e999", ".nan", "yes", "op: ", "name: ",
            "inputs: [", "repeat: ", "layers:", "\x00", "\ufeff", "\ue000", "\ud7ff", "é"]
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["${x}", "${w * 2}", "relu", "linear", "same", "input", "fc1", "${i}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(
        ["name", "op", "out", "inputs", "init", "weight", "normal", "std", "repeat", "layers"]), inner, max_size=3),
    max_leaves=8)


def builds_or_raises_graphgrow_error(text: str) -> None:
    try:
        graph = graph_from_text(text, "fuzz.yaml")
    except GraphgrowError as err:
        assert err.file == "fuzz.yaml"
        assert str(err).startswith("fuzz.yaml")
        return
    if graph.num_params() < 200_000 and all(math.prod(n.out_shape) < 100_000 for n in graph.nodes):
        module = compile_graph(graph).eval()
        module(torch.zeros(1, *graph.input_shape))
        graph_from_text(dump(graph))


@FUZZ
@given(st.sampled_from(SHIPPED), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 6),
                                                    st.sampled_from(SNIPPETS) | st.text(max_size=3)),
                                          min_size=1, max_size=4))
def test_random_text_edits_only_raise_graphgrow_error(text, edits):
    for position, deleted, inserted in edits:
        position %= len(text) + 1
        text = text[:position] + inserted + text[position + deleted:]
    builds_or_raises_graphgrow_error(text)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, prefix + (index,))


@FUZZ
@given(st.sampled_from(SHIPPED), st.data())
def test_random_field_values_only_raise_graphgrow_error(text, data):
    tree = yaml.safe_load(text)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(tree) if p]
        path = data.draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or (action == "delete" and not isinstance(parent, (dict, list))):
            parent[path[-1]] = data.draw(yaml_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6) | st.sampled_from(["out", "bias", "inputs", "kernel", "h"]))] = \
                data.draw(yaml_values)
        else:
            parent.insert(path[-1], data.draw(yaml_values))
    builds_or_raises_graphgrow_error(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))


@FUZZ
@given(valid_specs(), st.integers(0, 10), st.sampled_from(SNIPPETS))
def test_edits_of_random_valid_specs_only_raise_graphgrow_error(spec, line, snippet):
    lines = spec[0].splitlines()
    index = line % len(lines)
    cut = len(lines[index]) // 2
    lines[index] = lines[index][:cut] + snippet + lines[index][cut:]
    builds_or_raises_graphgrow_error("\n".join(lines) + "\n")
