"""Named blocks in the spec language: a sub-graph defined once under `blocks:` and instantiated
(also inside repeats) with its own variables, name and input."""
from __future__ import annotations

import pytest

from graphgrow import GraphgrowError
from graphgrow.compiler.io import dump
from graphgrow.ir import graph_from_text

HEADER = "graphgrow: 1\nname: b\ninput: {shape: [3]}\n"
BLOCKS = """blocks:
  mlp:
    vars: {hidden: 4}
    layers:
      - {name: "${name}_fc1", op: linear, out: "${hidden}"}
      - {name: "${name}_act", op: relu}
      - {name: "${name}_fc2", op: linear, out: 3}
      - {name: "${name}", op: add, inputs: ["${name}_fc2", "${input}"]}
"""


def test_instances_expand_with_their_name_input_and_variables():
    graph = graph_from_text(HEADER + BLOCKS + """layers:
  - {name: lift, op: tanh}
  - {block: mlp, name: m1}
  - repeat: 2
    layers:
      - {block: mlp, name: "m${i + 2}", inputs: "m${i + 1}", hidden: "${5 + i}"}
""")
    assert graph.names()[:5] == ["lift", "m1_fc1", "m1_act", "m1_fc2", "m1"]
    assert graph.node("m1_fc1").inputs == ["lift"] and graph.node("m1").inputs == ["m1_fc2", "lift"]
    assert [graph.node(f"m{k}_fc1").args["out"] for k in (1, 2, 3)] == [4, 5, 6]
    assert graph.node("m3_fc1").inputs == ["m2"] and graph.outputs == ["m3"]
    assert graph_from_text(dump(graph)).summary() == graph.summary()  # the flat dump reloads


@pytest.mark.parametrize("layer,message", [
    ("{block: mpl, name: m}", "unknown block 'mpl'"),
    ("{block: mlp, name: m, width: 3}", "block 'mlp' has no variable 'width'"),
    ("{block: mlp}", "a block instance needs a name"),
    ("{block: mlp, name: m, inputs: [input, input]}", "a block instance reads one input"),
])
def test_instance_mistakes_are_located_errors(layer, message):
    with pytest.raises(GraphgrowError, match=message) as info:
        graph_from_text(HEADER + BLOCKS + f"layers:\n  - {layer}\n", "b.yaml")
    assert info.value.file == "b.yaml" and info.value.line == 13


def test_a_block_must_name_its_output_after_the_instance():
    text = HEADER + "blocks:\n  bad:\n    layers:\n      - {name: x, op: relu}\nlayers:\n  - {block: bad, name: m}\n"
    with pytest.raises(GraphgrowError, match="no layer named"):
        graph_from_text(text)


@pytest.mark.parametrize("blocks,layer,message", [
    ("  mlp\u00e9:\n    layers:\n      - {name: \"${name}\", op: relu}\n", "{block: mlp, name: m}",
     "block name must be an identifier"),
    ("  mlp:\n    vars: {h\u00e9: 1}\n    layers:\n      - {name: \"${name}\", op: relu}\n", "{block: mlp, name: m}",
     "variable name must be an identifier"),
    ("  mlp:\n    layers:\n      - {name: \"${name}\", op: relu}\n", "{block: mlp, name: \"m\u00e9\"}",
     "a block instance needs a name"),
])
def test_block_instance_and_variable_names_are_ascii_identifiers(blocks, layer, message):
    with pytest.raises(GraphgrowError, match=message) as info:
        graph_from_text(HEADER + "blocks:\n" + blocks + f"layers:\n  - {layer}\n", "b.yaml")
    assert "ASCII identifiers" in info.value.hint


def test_block_instances_count_the_values_they_copy(monkeypatch):
    """Instances copy the block's layers like repeats do: past MAX_VALUES is refused (lowered here
    to keep the test fast) although the layer count stays under MAX_EXPANSION."""
    from graphgrow import spec
    monkeypatch.setattr(spec, "MAX_VALUES", 20_000)
    count = spec.MAX_VALUES // 1000 + 1
    assert 2 * count < spec.MAX_EXPANSION
    text = (HEADER + "blocks:\n  wide:\n    layers:\n"
            f"      - {{name: \"${{name}}\", op: linear, out: 3, extra: [{', '.join(['1'] * 1000)}]}}\n"
            f"layers:\n  - repeat: {count}\n    layers:\n      - {{block: wide, name: \"w${{i}}\"}}\n")
    with pytest.raises(GraphgrowError, match="expands to more than"):
        graph_from_text(text, "b.yaml")
