"""The spec reader: every user mistake is one GraphgrowError with file, line, column, node and
hint; ${} expressions, repeat blocks and safe YAML behave as documented."""
from __future__ import annotations

import pytest

from graphgrow.errors import GraphgrowError
from graphgrow.ir import graph_from_text
from graphgrow.spec import MAX_REPEAT, read_spec, read_spec_file

FILE = "net.yaml"


def spec_error(text: str) -> GraphgrowError:
    with pytest.raises(GraphgrowError) as info:
        graph_from_text(text, FILE)
    err = info.value
    assert type(err) is GraphgrowError
    assert err.file == FILE
    assert str(err).startswith(f"{FILE}:")
    return err


def position(text: str, line: int, token: str, occurrence: int = 0) -> tuple[int, int]:
    """(line, column), 1-based, of ``token`` on ``line`` of ``text``."""
    row = text.splitlines()[line - 1]
    column = -1
    for _ in range(occurrence + 1):
        column = row.index(token, column + 1)
    return line, column + 1


def after(text: str, line: int, prefix: str) -> tuple[int, int]:
    """(line, column) of the character right after ``prefix`` on ``line``."""
    found = position(text, line, prefix)
    return found[0], found[1] + len(prefix)


def assert_at(err: GraphgrowError, where: tuple[int, int]) -> None:
    assert (err.line, err.column) == where, str(err)


# -- YAML level -----------------------------------------------------------------------------
def test_yaml_syntax_error_points_at_the_problem(make_spec):
    text = make_spec("{name: fc1, op: linear, out: 3")
    err = spec_error(text)
    assert "YAML syntax" in err.message and err.line == 6 and err.column == 1
    assert str(err).startswith(f"{FILE}:6:1: error: YAML syntax")


def test_tab_indentation_is_a_yaml_syntax_error():
    err = spec_error("graphgrow: 1\nname: n\ninput: {shape: [2]}\nlayers:\n\t- {op: relu}\n")
    assert "YAML syntax" in err.message and (err.line, err.column) == (5, 1)


def test_duplicate_key_is_reported_at_the_second_key(make_spec):
    text = make_spec("{name: a, op: relu, name: b}")
    err = spec_error(text)
    assert err.message == "duplicate key 'name'"
    assert_at(err, position(text, 5, "name", occurrence=1))


def test_non_string_key_is_an_error(make_spec):
    text = make_spec("{name: a, op: relu, 3: x}")
    err = spec_error(text)
    assert "keys must be strings" in err.message
    assert_at(err, position(text, 5, "3:"))


def test_special_character_is_a_located_yaml_error(make_spec):
    text = make_spec("{name: a\x00, op: relu}")
    err = spec_error(text)
    assert "U+0000" in err.message and err.line == 5


def test_integer_with_too_many_digits_is_a_located_error(make_spec):
    text = make_spec("{name: a, op: linear, out: 1" + "0" * 5000 + "}")
    err = spec_error(text)
    assert "bad integer" in err.message
    assert_at(err, position(text, 5, "10"))


def test_recursive_anchor_is_an_error():
    err = spec_error("graphgrow: 1\nname: n\ninput: &x {shape: *x}\nlayers: [{op: relu}]\n")
    assert "recursive" in err.message and err.line == 3


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system",
    "!!python/object/new:os.system",
    "!!python/name:os.system",
    "!!python/module:os",
])
def test_python_tags_raise_and_are_never_executed(tmp_path, tag):
    marker = tmp_path / "pwned"
    text = ("graphgrow: 1\nname: n\ninput: {shape: [2]}\n"
            f"layers: {tag} [\"touch {marker}\"]\n")
    err = spec_error(text)
    assert "is not allowed" in err.message and "python" in err.message
    assert err.hint == "specs are data only; remove the tag"
    assert_at(err, position(text, 4, "!!"))
    assert not marker.exists()


def test_unsafe_tag_inside_a_layer_argument(make_spec, tmp_path):
    marker = tmp_path / "pwned"
    text = make_spec(f"{{name: a, op: linear, out: !!python/object/apply:os.system [\"touch {marker}\"]}}")
    err = spec_error(text)
    assert "not allowed" in err.message
    assert_at(err, position(text, 5, "!!"))
    assert not marker.exists()


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "!!set {a}", "!!timestamp 2001-12-14", "!custom 3",
                                   "!!omap [{a: 1}]"])
def test_non_standard_tags_are_refused(make_spec, value):
    text = make_spec(f"{{name: a, op: linear, out: {value}}}")
    err = spec_error(text)
    assert "is not allowed" in err.message
    assert_at(err, position(text, 5, "!"))


def test_merge_keys_still_reject_duplicates(make_spec):
    text = make_spec(["&base {op: linear, out: 3, name: q}", "{<<: *base, name: a}"])
    err = spec_error(text)
    assert err.message == "duplicate key 'name'" and err.line == 6


# -- header -----------------------------------------------------------------------------------
def test_missing_version():
    err = spec_error("name: n\ninput: {shape: [2]}\nlayers: [{op: relu}]\n")
    assert err.message == "missing format version"
    assert (err.line, err.column) == (1, 1) and err.hint == "start the file with 'graphgrow: 1'"


@pytest.mark.parametrize("version", ["2", "0", "'1'", "true", "v1"])
def test_unknown_version(version):
    text = f"graphgrow: {version}\nname: n\ninput: {{shape: [2]}}\nlayers: [{{op: relu}}]\n"
    err = spec_error(text)
    assert err.message.startswith("unknown format version")
    assert_at(err, (1, 12))
    assert err.hint == "this graphgrow reads version 1"


def test_unknown_header_key_has_a_hint():
    text = "graphgrow: 1\nname: n\ninput: {shape: [2]}\nlayer: [{op: relu}]\n"
    err = spec_error(text)
    assert err.message == "unknown key 'layer' in the spec header"
    assert err.hint == "did you mean 'layers'?"
    assert_at(err, (4, 8))


@pytest.mark.parametrize("missing", ["name", "input", "layers"])
def test_missing_header_entries(missing):
    header = {"name": "name: n\n", "input": "input: {shape: [2]}\n", "layers": "layers: [{op: relu}]\n"}
    text = "graphgrow: 1\n" + "".join(v for k, v in header.items() if k != missing)
    err = spec_error(text)
    assert err.message == f"missing '{missing}'"


def test_spec_name_must_be_an_identifier():
    err = spec_error("graphgrow: 1\nname: my net\ninput: {shape: [2]}\nlayers: [{op: relu}]\n")
    assert "spec name must be an identifier" in err.message and (err.line, err.column) == (2, 7)


@pytest.mark.parametrize("shape", ["[0]", "[]", "abc", "[2, -1]", "[true]", "[1.5]"])
def test_input_shape_must_be_positive_integers(shape):
    text = f"graphgrow: 1\nname: n\ninput: {{shape: {shape}}}\nlayers: [{{op: relu}}]\n"
    err = spec_error(text)
    assert "input shape must be a list of positive integers" in err.message
    assert_at(err, after(text, 3, "shape: "))
    assert "no batch dimension" in err.hint


def test_layers_must_be_a_nonempty_list():
    err = spec_error("graphgrow: 1\nname: n\ninput: {shape: [2]}\nlayers: {a: 1}\n")
    assert err.message == "layers must be a list" and (err.line, err.column) == (4, 9)
    err = spec_error("graphgrow: 1\nname: n\ninput: {shape: [2]}\nlayers: []\n")
    assert err.message == "a spec needs at least one layer"


def test_unknown_output_has_a_hint(make_spec):
    text = make_spec(["{name: act1, op: relu}"], extra="outputs: [actl]\n")
    err = spec_error(text)
    assert err.message == "unknown output 'actl'" and err.hint == "did you mean 'act1'?"
    assert_at(err, position(text, 4, "["))


# -- layers -------------------------------------------------------------------------------------
def test_unknown_op_with_hint(make_spec):
    text = make_spec(["{name: fc1, op: linaer, out: 3}"])
    err = spec_error(text)
    assert err.message == "unknown op 'linaer'"
    assert err.node == "fc1" and err.hint == "did you mean 'linear'?"
    assert_at(err, position(text, 5, "linaer"))
    assert str(err) == f"{FILE}:5:21: error: unknown op 'linaer' [node 'fc1'] (hint: did you mean 'linear'?)"


def test_layer_without_op(make_spec):
    err = spec_error(make_spec(["{name: fc1, out: 3}"]))
    assert err.message == "layer has no 'op'" and err.node == "fc1" and (err.line, err.column) == (5, 5)


def test_unknown_argument_with_hint(make_spec):
    text = make_spec(["{name: fc1, op: linear, outt: 3}"])
    err = spec_error(text)
    assert err.message == "op 'linear' has no argument 'outt'"
    assert err.node == "fc1" and err.hint == "did you mean 'out'?"
    assert_at(err, position(text, 5, "3}"))


def test_argument_to_an_op_without_arguments(make_spec):
    err = spec_error(make_spec(["{name: r, op: relu, slope: 2}"]))
    assert err.message == "op 'relu' has no argument 'slope'" and err.hint == "'relu' takes no arguments"


@pytest.mark.parametrize("value", ["ten", "3.5", "0", "-2", "true", "[3]", "null"])
def test_wrong_argument_type_names_the_argument(make_spec, value):
    text = make_spec([f"{{name: fc1, op: linear, out: {value}}}"])
    err = spec_error(text)
    assert err.message.startswith("argument 'out' of op 'linear': expected a positive integer")
    assert err.node == "fc1"
    assert_at(err, after(text, 5, "out: "))


def test_missing_required_argument(make_spec):
    err = spec_error(make_spec(["{name: fc1, op: linear}"]))
    assert err.message == "op 'linear' needs argument 'out'"
    assert err.node == "fc1" and (err.line, err.column) == (5, 5)
    assert err.hint == "number of output features, e.g. out: 10"


def test_duplicate_name_points_at_the_second_and_names_the_first_line(make_spec):
    text = make_spec(["{name: fc1, op: linear, out: 3}", "{name: fc1, op: relu}"])
    err = spec_error(text)
    assert err.message == "duplicate node name 'fc1'" and err.node == "fc1"
    assert err.hint == "first defined at line 5"
    assert_at(err, position(text, 6, "fc1"))


@pytest.mark.parametrize("name", ["1fc", "my-layer", "'a b'", "3", "[a]"])
def test_invalid_node_names(make_spec, name):
    text = make_spec([f"{{name: {name}, op: relu}}"])
    err = spec_error(text)
    assert err.message.startswith("invalid node name")
    assert "identifiers" in err.hint
    assert_at(err, after(text, 5, "name: "))


@pytest.mark.parametrize("name", ["input", "forward", "class", "state_dict"])
def test_reserved_node_names(make_spec, name):
    text = make_spec([f"{{name: {name}, op: relu}}"])
    err = spec_error(text)
    assert err.message == f"node name '{name}' is reserved" and err.node == name
    assert err.hint == f"rename it, e.g. '{name}_1'"


def test_unknown_input_with_hint(make_spec):
    text = make_spec(["{name: act1, op: relu}", "{name: fc, op: linear, out: 2, inputs: [actl]}"])
    err = spec_error(text)
    assert err.message == "unknown input 'actl'" and err.node == "fc"
    assert err.hint == "did you mean 'act1'?" and (err.line, err.column) == (6, 5)


@pytest.mark.parametrize("inputs", ["3", "[]", "[[a]]", "{a: 1}"])
def test_inputs_must_be_names(make_spec, inputs):
    text = make_spec([f"{{name: r, op: relu, inputs: {inputs}}}"])
    err = spec_error(text)
    assert err.message.startswith("inputs must be a node name or a list of names") and err.node == "r"
    assert_at(err, after(text, 5, "inputs: "))


def test_frozen_must_be_boolean(make_spec):
    text = make_spec(["{name: fc, op: linear, out: 2, frozen: 1}"])
    err = spec_error(text)
    assert err.message == "frozen must be true or false, got 1" and err.node == "fc"
    assert_at(err, position(text, 5, "1}"))


def test_cycle_is_reported_with_its_path(make_spec):
    text = make_spec(["{name: a, op: relu, inputs: [b]}", "{name: b, op: relu, inputs: [a]}"])
    err = spec_error(text)
    assert err.message == "cycle: a -> b -> a" and err.node == "a"
    assert (err.line, err.column) == (5, 5) and "own output" in err.hint


def test_node_reading_itself(make_spec):
    err = spec_error(make_spec(["{name: a, op: relu, inputs: [a]}"]))
    assert err.message == "node 'a' reads its own output" and err.node == "a" and err.line == 5


def test_shape_mismatch_says_both_shapes(make_spec):
    text = make_spec(["{name: a, op: linear, out: 3}", "{name: s, op: add, inputs: [a, input]}"])
    err = spec_error(text)
    assert err.message == "add needs equal shapes, got [3] and [2]"
    assert err.node == "s" and (err.line, err.column) == (6, 5)
    assert err.hint == "insert a linear or conv2d to match widths"


def test_shape_rule_error_mentions_the_input_shape(make_spec):
    err = spec_error(make_spec(["{name: c, op: conv2d, out: 4}"]))
    assert "conv2d needs input of shape (channels, height, width), got [2]" in err.message
    assert "(input 'input' has shape [2])" in err.message and err.node == "c" and err.line == 5


def test_wrong_arity(make_spec):
    err = spec_error(make_spec(["{name: s, op: add, inputs: [input]}"]))
    assert err.message == "op 'add' takes at least 2 input(s), got 1" and err.node == "s"
    err = spec_error(make_spec(["{name: a, op: relu}", "{name: r, op: relu, inputs: [a, input]}"]))
    assert err.message == "op 'relu' takes 1 input(s), got 2" and err.node == "r" and err.line == 6


@pytest.mark.parametrize("init,message", [
    ("identiy", "unknown init 'identiy'"),
    ("{weight: {normal: {std: -1}}}", "normal std must not be negative"),
    ("{weight: {normal: {std: .nan}}}", "normal std and mean must be finite"),
    ("{weight: {normal: {mean: .inf}}}", "normal std and mean must be finite"),
    ("{weight: {normal: [1]}}", "normal takes {std: number, mean: number}"),
    ("{wieght: zeros}", "init names role 'wieght' which this node does not have"),
    ("{zeros: 1}", "init 'zeros' takes no options"),
    ("[1, 2]", "bad init [1, 2]"),
])
def test_bad_init_values(make_spec, init, message):
    text = make_spec([f"{{name: fc, op: linear, out: 2, init: {init}}}"])
    err = spec_error(text)
    assert err.message.startswith(message) and err.node == "fc"
    assert_at(err, after(text, 5, "init: "))


def test_init_role_the_node_lacks_is_named(make_spec):
    err = spec_error(make_spec(["{name: fc, op: linear, out: 2, bias: false, init: {bias: zeros}}"]))
    assert err.message.startswith("init names role 'bias' which this node does not have")
    assert err.hint == "roles: weight" and err.node == "fc" and err.line == 5


def test_init_that_does_not_fit_the_parameter(make_spec):
    err = spec_error(make_spec(["{name: fc, op: linear, out: 2, init: {weight: dirac}}"]))
    assert "'dirac' needs a square conv kernel" in err.message and err.node == "fc" and err.line == 5


def test_misspelt_initializer_as_role_key_gets_a_hint(make_spec):
    err = spec_error(make_spec(["{name: fc, op: linear, out: 2, init: {nromal: {std: 1}}}"]))
    assert err.hint == "did you mean 'normal'?"


# -- ${} expressions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("expression,message", [
    ("w +", "bad expression '${w +}'"),
    ("__import__('os').system('true')", "bad expression"),
    ("w ** 2", "bad expression '${w ** 2}'"),
    ("w / 2", "argument 'out' of op 'linear': expected a positive integer, got 2.0"),
    ("w // 0", "division by zero in '${w // 0}'"),
    ("w / 0", "division by zero in '${w / 0}'"),
    ("1e300 / 1e-300", "number too large"),
    ("widht", "unknown variable 'widht' in '${widht}'"),
    ("label * 2", "arithmetic on 'abc', which is not a number"),
    ("-label", "arithmetic on 'abc', which is not a number"),
    ("10000000 * 10000000 * 10000000", "number too large"),
    ("1" + "0" * 400 + " + 0.5", "number too large"),
    ("+".join(["1"] * 3000), "bad expression"),
    ("-" * 3000 + "1", "bad expression"),
    ("(" * 300 + "1" + ")" * 300, "bad expression"),
    ("w.real", "bad expression"),
    ("[w]", "bad expression"),
    ("'a'", "bad expression"),
])
def test_bad_expressions(make_spec, expression, message):
    text = make_spec([f"{{name: fc, op: linear, out: \"${{{expression}}}\"}}"],
                     extra="vars: {w: 4, label: abc}\n")
    err = spec_error(text)
    assert err.message.startswith(message), err.message
    assert err.node == "fc"
    assert_at(err, position(text, 6, '"'))


def test_unknown_variable_hint_lists_or_suggests(make_spec):
    err = spec_error(make_spec(["{name: fc, op: linear, out: ${width}}"], extra="vars: {widht: 3}\n"))
    assert err.hint == "did you mean 'widht'?"
    err = spec_error(make_spec(["{name: fc, op: linear, out: ${width}}"]))
    assert err.hint == "define it under vars:"


def test_expression_error_in_templated_name_has_no_wrong_node(make_spec):
    err = spec_error(make_spec(["{name: 'fc${k}', op: linear, out: 2}"]))
    assert err.message.startswith("unknown variable 'k'") and err.node is None


def test_expressions_evaluate_arithmetic(make_spec):
    text = make_spec(["{name: a, op: linear, out: ${w * 2 + 1}}",
                      "{name: b, op: linear, out: ${(w + 2) * 3 // 4}}",
                      "{name: c, op: linear, out: ${-w + 10 - -1}}",
                      "{name: d, op: scale, factor: ${h * 2}}"],
                     extra="vars: {w: 4, h: 0.25, w2: '${w * w}'}\n")
    graph = graph_from_text(text)
    assert [graph.node(n).args.get("out") for n in "abc"] == [9, 4, 7]
    assert graph.node("d").args["factor"] == 0.5
    assert graph.node("a").out_shape == (9,)


def test_true_division_gives_floats_floor_division_integers(make_spec):
    # the published deep ResNet benchmark writes h = 1/256; `/` must not silently become `//`
    text = make_spec(["{name: lift, op: linear, out: 4}",
                      "repeat: ${blocks}\n    layers: [{name: 'res${i}', op: residual, form: one_weight, h: ${1/blocks}}]",
                      "{name: a, op: linear, out: ${blocks // 3}}",
                      "{name: b, op: scale, factor: ${(w + 1) / 2}}",
                      "{name: c, op: scale, factor: ${7.5 // 2}}",
                      "{name: d, op: scale, factor: ${h}}"],
                     extra="vars: {blocks: 8, w: 4, h: '${1 / blocks}'}\n")
    graph = graph_from_text(text)
    assert [graph.node(f"res{i}").args["h"] for i in range(8)] == [0.125] * 8
    assert graph.node("a").args["out"] == 2 and graph.node("a").out_shape == (2,)
    assert graph.node("b").args["factor"] == 2.5
    assert graph.node("c").args["factor"] == 3.0
    assert graph.node("d").args["factor"] == 0.125


def test_float_where_an_integer_is_needed_hints_at_floor_division(make_spec):
    text = make_spec(["{name: fc, op: linear, out: \"${w / 2}\"}"], extra="vars: {w: 4}\n")
    err = spec_error(text)
    assert err.message == "argument 'out' of op 'linear': expected a positive integer, got 2.0 (float)"
    assert "//" in err.hint and err.node == "fc"
    err = spec_error(make_spec(["repeat: ${w / 2}", "  layers: [{op: relu}]"], extra="vars: {w: 4}\n"))
    assert err.message == "repeat count must be an integer, got 2.0" and "//" in err.hint


def test_vars_may_use_earlier_vars(make_spec):
    graph = graph_from_text(make_spec(["{name: a, op: linear, out: ${w2}}"], extra="vars: {w: 3, w2: '${w * w}'}\n"))
    assert graph.node("a").args["out"] == 9


def test_template_spliced_into_a_string(make_spec):
    graph = graph_from_text(make_spec(["{name: 'block${w}_x', op: relu}"], extra="vars: {w: 3}\n"))
    assert graph.names() == ["block3_x"]


def test_unquoted_template_in_flow_mapping_keeps_columns(make_spec):
    text = make_spec(["{name: a, op: linear, out: ${w}, zzz: 1}"], extra="vars: {w: 3}\n")
    err = spec_error(text)
    assert err.message == "op 'linear' has no argument 'zzz'"
    assert_at(err, position(text, 6, "1}"))


def test_bad_variable_name_and_value():
    base = "graphgrow: 1\nname: n\ninput: {shape: [2]}\nlayers: [{op: relu}]\n"
    err = spec_error(base + "vars: {w: [1, 2]}\n")
    assert err.message == "variable 'w' must be a number or string, got [1, 2]" and (err.line, err.column) == (5, 11)
    err = spec_error(base + "vars: {'a b': 1}\n")
    assert "variable name must be an identifier" in err.message


# -- repeat -----------------------------------------------------------------------------------------
def test_repeat_expands_with_index_and_nesting(make_spec):
    text = make_spec(["repeat: ${n}\n    index: i\n    layers:\n"
                      "      - repeat: 2\n        index: j\n        layers:\n"
                      "          - {name: 'b${i}_${j}', op: linear, out: ${i + j + 1}}"],
                     extra="vars: {n: 2}\n")
    graph = graph_from_text(text)
    assert graph.names() == ["b0_0", "b0_1", "b1_0", "b1_1"]
    assert [n.args["out"] for n in graph.nodes] == [1, 2, 2, 3]
    assert all(n.loc.line == 12 for n in graph.nodes)


def test_repeat_zero_adds_nothing(make_spec):
    graph = graph_from_text(make_spec(["{name: a, op: relu}", "repeat: 0\n    layers: [{op: tanh}]"]))
    assert graph.names() == ["a"]


@pytest.mark.parametrize("count,message", [
    ("-1", "repeat count must not be negative, got -1"),
    ("${0 - 3}", "repeat count must not be negative, got -3"),
    ("abc", "repeat count must be an integer, got 'abc'"),
    ("2.5", "repeat count must be an integer, got 2.5"),
    (str(MAX_REPEAT + 1), f"repeat count {MAX_REPEAT + 1} exceeds {MAX_REPEAT}"),
])
def test_bad_repeat_counts(make_spec, count, message):
    text = make_spec([f"repeat: {count}\n    layers: [{{op: relu}}]"])
    err = spec_error(text)
    assert err.message == message
    assert_at(err, after(text, 5, "repeat: "))


def test_repeat_block_errors(make_spec):
    err = spec_error(make_spec(["repeat: 2"]))
    assert err.message == "repeat block needs 'layers'"
    err = spec_error(make_spec(["repeat: 2\n    index: 3\n    layers: [{op: relu}]"]))
    assert err.message == "repeat index must be an identifier, got 3" and err.line == 6
    err = spec_error(make_spec(["repeat: 2\n    name: x\n    layers: [{op: relu}]"]))
    assert err.message == "unknown key 'name' in a repeat block"


def test_repeated_fixed_name_is_a_duplicate(make_spec):
    err = spec_error(make_spec(["repeat: 2\n    layers: [{name: r, op: relu}]"]))
    assert err.message == "duplicate node name 'r'" and err.hint == "first defined at line 6"


# -- positive behaviour -----------------------------------------------------------------------------
def test_read_spec_records_layer_locations(make_spec):
    doc = read_spec(make_spec(["{name: a, op: relu}", "{name: b, op: tanh}"]), FILE)
    assert [(e.loc.file, e.loc.line, e.loc.column) for e in doc.layers] == [(FILE, 5, 5), (FILE, 6, 5)]
    assert doc.input_shape == (2,) and doc.name == "net" and doc.outputs is None


def test_default_names_and_forward_references(make_spec):
    graph = graph_from_text(make_spec(["{op: linear, out: 3, inputs: [later]}", "{name: later, op: relu, inputs: input}"],
                                      extra="outputs: linear_0\n"))
    assert graph.names() == ["later", "linear_0"] and graph.outputs == ["linear_0"]


def test_missing_spec_file(tmp_path):
    with pytest.raises(GraphgrowError) as info:
        read_spec_file(tmp_path / "nope.yaml")
    assert info.value.file == str(tmp_path / "nope.yaml") and info.value.message == "spec file not found"


def test_error_located_fills_only_unknown_fields():
    err = GraphgrowError("m", file="a.yaml", line=3)
    err.located(file="b.yaml", line=9, column=4, node="n")
    assert (err.file, err.line, err.column, err.node) == ("a.yaml", 3, 4, "n")
    assert str(err) == "a.yaml:3:4: error: m [node 'n']"


# -- regressions found by fuzzing and probing ----------------------------------------------------
def test_nested_repeats_are_bounded_in_total(make_spec, monkeypatch):
    monkeypatch.setattr("graphgrow.spec.MAX_EXPANSION", 1000)  # the real bound works the same, slower
    text = make_spec("repeat: 100\n    layers:\n      - repeat: 100\n        layers:\n          - {op: relu}")
    err = spec_error(text)
    assert "expands to more than 1000" in err.message and "multiply" in err.hint and 5 <= err.line <= 9
    # zero-layer inner blocks cost repeat steps too, so they cannot spin forever either
    err = spec_error(make_spec(["repeat: 100\n    layers:\n      - repeat: 100\n        layers: []",
                                "{op: relu}"]))
    assert "expands to more than 1000" in err.message
    assert len(graph_from_text(make_spec("repeat: 20\n    layers:\n      - repeat: 20\n        layers:\n"
                                         "          - {op: relu}"))) == 400  # 20 + 400 steps, 400 layers


@pytest.mark.parametrize("tagged,kind", [("!!float abc", "float"), ("!!int ''", "int"), ("!!bool maybe", "bool"),
                                         ("!!map abc", "map"), ("!!seq {a: 1}", "seq")])
def test_explicit_standard_tag_on_a_wrong_value(make_spec, tagged, kind):
    text = make_spec(f"{{name: a, op: batchnorm, eps: {tagged}}}", shape=(3,))
    err = spec_error(text)
    assert err.message.startswith(f"cannot read this value as {kind}")
    assert (err.line, err.column) == position(text, 5, tagged.split()[0]) and "explicit tag" in err.hint


@pytest.mark.parametrize("written,value", [("1e-5", 1e-5), ("2E3", 2000.0), ("-1e-2", -0.01), ("1.5e-3", 1.5e-3)])
def test_exponent_floats_without_a_dot(make_spec, written, value):
    graph = graph_from_text(make_spec(f"{{name: a, op: batchnorm, eps: {written}}}", shape=(3,)))
    assert graph.node("a").args["eps"] == value


@pytest.mark.parametrize("name", ["training", "meta", "_modules", "_parameters", "shape_env", "_graph"])
def test_names_of_graph_module_instance_attributes_are_reserved(make_spec, name):
    text = make_spec(f"{{name: {name}, op: linear, out: 2}}")
    err = spec_error(text)
    assert "reserved" in err.message and err.node == name and (err.line, err.column) == position(text, 5, name)


def test_a_block_reference_that_is_not_a_name_is_one_located_error():
    """Found by the fuzz test: a list where a block's name belongs made the lookup raise a raw
    TypeError (a list is unhashable)."""
    text = ("graphgrow: 1\nname: t\ninput: [2]\nblocks:\n  b:\n    layers:\n      - {name: fc, op: linear, out: 2}\n"
            "layers:\n  - {block: [b], name: x}\n")
    with pytest.raises(GraphgrowError, match="input must be a mapping, got a list"):
        read_spec(text, "t.yaml")
    with pytest.raises(GraphgrowError, match=r"unknown block \['b'\]") as err:
        read_spec(text.replace("input: [2]", "input: {shape: [2]}"), "t.yaml")
    assert err.value.line == 9
