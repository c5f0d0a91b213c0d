"""The IR: nodes carry op, arguments, shapes and source location; topological order; editing;
summary as table and JSON; the shipped thesis specs and their parameter counts."""
from __future__ import annotations

import json

import networkx as nx
import pytest

from graphgrow.errors import GraphgrowError
from graphgrow.ir import INPUT, LayerGraph, Node, graph_from_text, load_graph


def dense_params(widths, bias=True):
    """Parameters of a chain of dense layers with the given widths."""
    return sum(a * b + (b if bias else 0) for a, b in zip(widths, widths[1:]))


# -- the shipped specs ------------------------------------------------------------------------
def test_fnn_spiral_is_2_5_2_relu_with_27_parameters(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    assert [n.op for n in graph.nodes] == ["linear", "relu", "linear"]
    assert graph.input_shape == (2,) and graph.node("fc1").out_shape == (5,) and graph.node("head").out_shape == (2,)
    assert graph.num_params() == 27 == dense_params([2, 5, 2])


def test_fnn_spiral_deep_is_2_4_4_2_relu(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral_deep.yaml")
    assert [n.op for n in graph.nodes] == ["linear", "relu", "linear", "relu", "linear"]
    assert [n.out_shape[0] for n in graph.nodes if n.op == "linear"] == [4, 4, 2]
    assert graph.num_params() == dense_params([2, 4, 4, 2]) == 42


def test_resnet_spiral_has_33_parameters(specs_dir):
    graph = load_graph(specs_dir / "resnet_spiral.yaml")
    assert [n.op for n in graph.nodes] == ["linear", "residual", "linear"]
    lift, block, head = graph.nodes
    assert lift.args["bias"] is False and head.args["bias"] is False
    assert block.args["form"] == "two_weight" and block.args["activation"] == "tanh"
    assert graph.num_params() == 33 == 2 * 3 + (3 * 3 + 3 + 3 * 3) + 3 * 2


def test_resnet_ode_has_8_one_weight_blocks_with_step_h(specs_dir):
    graph = load_graph(specs_dir / "resnet_ode.yaml")
    blocks = [n for n in graph.nodes if n.op == "residual"]
    assert len(blocks) == 8 and [b.name for b in blocks] == [f"res{i}" for i in range(8)]
    assert all(b.args["form"] == "one_weight" and b.args["h"] == 1 / 8 for b in blocks)
    width = graph.node("lift").out_shape[0]
    assert graph.num_params() == 2 * width + 8 * (width * width + width) + width * 2


def test_cnn_vgg_follows_eq_2_11_for_28x28(specs_dir):
    graph = load_graph(specs_dir / "cnn_vgg.yaml")
    assert graph.input_shape == (1, 28, 28)
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    pools = [n for n in graph.nodes if n.op == "maxpool2d"]
    assert len(convs) == len(pools) >= 2
    for conv in convs:  # 3x3 kernels, stride and padding 1: spatial size preserved (2.11a)
        assert conv.args["kernel"] == 3 and conv.args["stride"] == 1 and conv.out_shape[1:] == conv.in_shapes[0][1:]
        assert graph.consumers(conv.name) and graph.node(graph.consumers(conv.name)[0]).op == "relu"
    for pool in pools:  # 2x2 max pooling, stride 2 (2.11b)
        assert pool.out_shape[1:] == tuple(s // 2 for s in pool.in_shapes[0][1:])
    assert graph.node(graph.outputs[0]).out_shape == (10,)
    expected = sum(c.args["out"] * c.in_shapes[0][0] * 9 + c.args["out"] for c in convs)
    expected += sum(n.in_shapes[0][0] * n.args["out"] + (n.args["out"] if n.args["bias"] else 0)
                    for n in graph.nodes if n.op == "linear")
    assert graph.num_params() == expected


def test_mnist_fnn_is_784_100_100_100_10_relu(specs_dir):
    graph = load_graph(specs_dir / "mnist_fnn.yaml")
    assert [n.out_shape[0] for n in graph.nodes if n.op == "linear"] == [100, 100, 100, 10]
    assert {n.op for n in graph.nodes} == {"flatten", "linear", "relu"}
    assert graph.num_params() == dense_params([784, 100, 100, 100, 10]) == 99710


def test_mnist_autoencoder_shape_and_parameters(specs_dir):
    graph = load_graph(specs_dir / "mnist_autoencoder.yaml")
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert [n.out_shape[0] for n in graph.nodes if n.op == "linear"] == widths[1:]
    assert {n.op for n in graph.nodes} == {"flatten", "linear", "sigmoid"}
    assert graph.num_params() == dense_params(widths)


def test_mnist_shallow_is_784_100_10_sigmoid(specs_dir):
    graph = load_graph(specs_dir / "mnist_shallow.yaml")
    assert [n.op for n in graph.nodes] == ["flatten", "linear", "sigmoid", "linear"]
    assert graph.num_params() == dense_params([784, 100, 10]) == 79510


def test_branching_spec_merges_two_paths(specs_dir):
    graph = load_graph(specs_dir / "two_path.yaml")
    merges = [n for n in graph.nodes if n.op in ("add", "concat")]
    assert merges and all(len(n.inputs) >= 2 for n in merges)
    assert any(graph.dag.out_degree(n) >= 2 for n in graph.names())  # a fork


def test_every_shipped_spec_builds(specs_dir):
    specs = sorted(specs_dir.glob("*.yaml"))
    assert len(specs) >= 9
    for path in specs:
        graph = load_graph(path)
        assert graph.source == str(path) and graph.num_params() > 0


# -- nodes, order, dag --------------------------------------------------------------------------
def test_nodes_carry_op_args_shapes_and_location(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    fc1 = graph.node("fc1")
    assert isinstance(fc1, Node) and fc1.op == "linear" and fc1.args == {"out": 5, "bias": True}
    assert fc1.inputs == [INPUT] and fc1.in_shapes == [(2,)] and fc1.out_shape == (5,)
    text = (specs_dir / "fnn_spiral.yaml").read_text().splitlines()
    assert "name: fc1" in text[fc1.loc.line - 1] and fc1.loc.file == str(specs_dir / "fnn_spiral.yaml")
    assert text[fc1.loc.line - 1][fc1.loc.column - 1] == "{"
    assert isinstance(graph.dag, nx.DiGraph) and graph.dag.nodes["fc1"]["node"] is fc1
    assert set(graph.dag.edges) == {(INPUT, "fc1"), ("fc1", "act1"), ("act1", "head")}


def test_order_is_topological_and_keeps_spec_order_where_possible(make_spec):
    graph = graph_from_text(make_spec(["{name: c, op: add, inputs: [a, b]}", "{name: a, op: relu, inputs: input}",
                                       "{name: z, op: tanh, inputs: input}", "{name: b, op: tanh, inputs: input}"],
                                      extra="outputs: [c, z]\n"))
    order = graph.names()
    assert order == ["a", "z", "b", "c"]
    position = {n: k for k, n in enumerate(order)}
    assert all(position[u] < position[v] for u, v in graph.dag.edges if u != INPUT)
    assert graph.consumers("a") == ["c"] and graph.consumers(INPUT) == ["a", "z", "b"]


def test_unknown_node_lookup_has_a_hint(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    with pytest.raises(GraphgrowError) as info:
        graph.node("fc2")
    assert info.value.hint == "did you mean 'fc1'?" and info.value.file == str(specs_dir / "fnn_spiral.yaml")


# -- editing --------------------------------------------------------------------------------
def test_add_redirect_remove_and_reinfer(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    graph.add(Node("extra", "linear", {"out": 5, "bias": True}, ["fc1"]), after="fc1")
    graph.redirect("fc1", "extra")
    graph.infer_shapes()
    assert graph.names() == ["fc1", "extra", "act1", "head"]
    assert graph.node("act1").inputs == ["extra"] and graph.node("extra").in_shapes == [(5,)]
    assert graph.num_params() == 27 + 30
    with pytest.raises(GraphgrowError, match="while it is used"):
        graph.remove("extra")
    graph.set_inputs("act1", ["fc1"])
    graph.remove("extra")
    graph.infer_shapes()
    assert graph.names() == ["fc1", "act1", "head"] and graph.num_params() == 27


def test_edits_that_break_the_graph_raise(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    with pytest.raises(GraphgrowError, match="duplicate node name 'fc1'"):
        graph.add(Node("fc1", "relu", inputs=["head"]))
    with pytest.raises(GraphgrowError, match="unknown input 'nope'"):
        graph.add(Node("n2", "relu", inputs=["nope"]))
    with pytest.raises(GraphgrowError, match="reserved"):
        graph.add(Node("forward", "relu", inputs=["head"]))
    graph.set_inputs("fc1", ["head"])
    with pytest.raises(GraphgrowError) as info:
        graph.infer_shapes()
    assert info.value.message.startswith("cycle:") and info.value.node in {"fc1", "act1", "head"}


def test_unique_name_avoids_taken_and_reserved(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    assert graph.unique_name("fc1") == "fc1_1" and graph.unique_name("new") == "new"
    assert graph.unique_name("forward") == "forward_1"


def test_copy_is_independent(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    clone = graph.copy()
    clone.node("fc1").args["out"] = 7
    clone.infer_shapes()
    assert graph.node("fc1").out_shape == (5,) and clone.node("fc1").out_shape == (7,)


def test_graph_without_outputs_is_an_error():
    graph = LayerGraph("empty", (2,))
    graph.add(Node("a", "relu"))
    with pytest.raises(GraphgrowError, match="has no outputs"):
        graph.infer_shapes()


# -- summary ------------------------------------------------------------------------------------
def test_summary_json_lists_every_node_with_totals(specs_dir):
    graph = load_graph(specs_dir / "two_path.yaml")
    data = json.loads(graph.summary_json())
    assert [row["name"] for row in data["nodes"]] == graph.names()
    assert set(data["nodes"][0]) == {"name", "op", "inputs", "output_shape", "params", "flops"}
    assert data["total_params"] == sum(r["params"] for r in data["nodes"]) == graph.num_params()
    assert data["total_flops"] == sum(r["flops"] for r in data["nodes"]) == graph.flops()
    lift = data["nodes"][0]
    assert lift == {"name": "lift", "op": "linear", "inputs": ["input"], "output_shape": [8],
                    "params": 24, "flops": 8 * (2 * 2 + 1)}
    assert data["input_shape"] == [2] and data["outputs"] == graph.outputs


def test_summary_table_has_a_row_per_node_and_a_total(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    table = graph.summary_table()
    lines = table.splitlines()
    assert lines[0] == "network fnn_spiral: input (2,)"
    assert lines[1].split() == ["name", "op", "output", "shape", "params", "FLOPs/sample"]
    rows = [line.split() for line in lines[3:6]]
    assert rows == [["fc1", "linear", "(5,)", "15", str(5 * 5)], ["act1", "relu", "(5,)", "0", "5"],
                    ["head", "linear", "(2,)", "12", str(2 * 11)]]
    assert lines[-1].split() == ["total", "27", str(25 + 5 + 22)]


def test_mnist_fnn_flops_per_sample(specs_dir):
    graph = load_graph(specs_dir / "mnist_fnn.yaml")
    matmuls = 2 * (784 * 100 + 100 * 100 * 2 + 100 * 10)
    assert graph.flops() == matmuls + (3 * 100 + 10) + 3 * 100


def test_failed_edits_leave_the_graph_unchanged(specs_dir):
    graph = load_graph(specs_dir / "fnn_spiral.yaml")
    with pytest.raises(GraphgrowError, match="unknown input 'nope'"):
        graph.add(Node("n2", "relu", inputs=["act1", "nope"]), after="act1")
    with pytest.raises(GraphgrowError, match="unknown input 'nope'"):
        graph.set_inputs("head", ["nope"])
    assert "n2" not in graph.dag and graph.names() == ["fc1", "act1", "head"]
    assert graph.node("head").inputs == ["act1"] and set(graph.dag.predecessors("head")) == {"act1"}
    graph.infer_shapes()
    assert graph.num_params() == 27
