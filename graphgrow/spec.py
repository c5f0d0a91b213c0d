"""Spec format version 1: ${} variables, blocks and repeat blocks over safe YAML (graphgrow.specyaml).

``read_spec`` turns YAML text into a flat list of ``LayerEntry`` (one per node, templates
expanded) plus the header; ``graphgrow.ir.build_graph`` turns that into a LayerGraph.
Nothing in a spec can run code: YAML is loaded with a safe loader, every non-standard tag is
an error, and ``${}`` expressions are evaluated by a tiny arithmetic interpreter.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GraphgrowError, did_you_mean
from .specyaml import (MAX_VALUES, TEMPLATE, TEMPLATE_CLOSE, TEMPLATE_OPEN, Loc, LocList, LocMap, expanded_size,
                       parse_yaml)

FORMAT_VERSION = 1
MAX_REPEAT = 100_000
# nested repeats multiply; this bounds the whole expansion (each layer and each repeat step counts)
MAX_EXPANSION = 2 * MAX_REPEAT
HEADER_KEYS = ("graphgrow", "name", "input", "vars", "blocks", "layers", "outputs")
NODE_KEYS = ("name", "op", "inputs", "init", "frozen")


def is_identifier(text: Any) -> bool:
    """The one rule for names in a spec (nodes, the network, variables, repeat indices): ASCII
    identifiers. Python normalises non-ASCII identifiers (NFKC: fullwidth 'ＡＢ' is 'AB'), so two
    names that differ in a spec could become one attribute of the compiled module, and
    TorchScript rejects non-ASCII names."""
    return isinstance(text, str) and text.isascii() and text.isidentifier()


IDENTIFIER_HINT = "names are ASCII identifiers: letters a-z, A-Z, digits and _, not starting with a digit"


# -- ${} expressions --------------------------------------------------------------------------
# `/` is true division (always a float: `${1/256}` for a step size h), `//` floor division
# (an integer for integer operands: `${width // 2}` for a layer width)
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
_EXPRESSION_HINT = "expressions may use numbers, variables, + - * / // and parentheses"


def evaluate(expression: str, env: dict[str, Any], loc: Loc) -> int | float:
    """Evaluate a ${} expression with integers, floats, variables, + - * / // and parentheses
    (``/`` gives a float, ``//`` an integer when both operands are integers)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise loc.error(f"bad expression '${{{expression}}}'", hint=_EXPRESSION_HINT) from None

    def number(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise loc.error(f"arithmetic on {value!r}, which is not a number, in '${{{expression}}}'",
                            hint="only numeric variables can take part in + - * / //")
        return value

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise loc.error(f"unknown variable '{node.id}' in '${{{expression}}}'",
                                hint=did_you_mean(node.id, env) or
                                (f"defined: {', '.join(env)}" if env else "define it under vars:"))
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = number(walk(node.left)), number(walk(node.right))
            if isinstance(node.op, (ast.Div, ast.FloorDiv)) and right == 0:
                raise loc.error(f"division by zero in '${{{expression}}}'")
            if isinstance(node.op, ast.Mult) and max(abs(left), abs(right)) > 1e12:
                raise loc.error(f"number too large in '${{{expression}}}'")
            try:
                result = _BINARY[type(node.op)](left, right)
            except OverflowError:  # a huge integer literal meeting a float
                raise loc.error(f"number too large in '${{{expression}}}'") from None
            if isinstance(result, float) and not math.isfinite(result):  # 1e300 / 1e-300
                raise loc.error(f"number too large in '${{{expression}}}'")
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = number(walk(node.operand))
            return -value if isinstance(node.op, ast.USub) else value
        raise loc.error(f"bad expression '${{{expression}}}'", hint=_EXPRESSION_HINT)

    try:
        return walk(tree)
    except RecursionError:
        raise loc.error(f"expression nested too deeply: '${{{expression[:40]}...}}'") from None


def _source_form(text: str) -> str:
    return text.replace(TEMPLATE_OPEN, "{").replace(TEMPLATE_CLOSE, "}")


def substitute(value: Any, env: dict[str, Any], loc: Loc) -> Any:
    """Expand ${} templates in a value (recursively). A string that is exactly one template
    becomes the number it evaluates to; otherwise results are spliced into the string."""
    if isinstance(value, str):
        whole = TEMPLATE.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1), env, loc)
        if TEMPLATE_OPEN in value or "${" in value:
            result = TEMPLATE.sub(lambda m: str(evaluate(m.group(1), env, loc)), value)
            if TEMPLATE_OPEN in result or "${" in result:
                raise loc.error(f"unclosed or nested template in {_source_form(value)!r}", hint=_EXPRESSION_HINT)
            return result
        return value
    if isinstance(value, LocMap):
        out = LocMap((k, substitute(v, env, value.value_locs.get(k, loc))) for k, v in value.items())
        out.loc, out.value_locs = value.loc, value.value_locs
        return out
    if isinstance(value, LocList):
        out = LocList(substitute(v, env, l) for v, l in zip(value, value.item_locs))
        out.loc, out.item_locs = value.loc, value.item_locs
        return out
    return value


# -- the spec -------------------------------------------------------------------------------
@dataclass
class LayerEntry:
    """One node as written (templates expanded, arguments not yet checked)."""
    fields: LocMap
    loc: Loc


@dataclass
class SpecDocument:
    name: str
    input_shape: tuple[int, ...]
    layers: list[LayerEntry]
    outputs: list[str] | None
    file: str | None
    loc: Loc = field(default_factory=Loc)
    outputs_loc: Loc = field(default_factory=Loc)
    #: the input holds integer token ids in [0, input_tokens) (``input: {shape: [T], tokens: V}``)
    input_tokens: int | None = None


def _expect_map(value, loc: Loc, what: str) -> LocMap:
    if not isinstance(value, LocMap):
        kind = "a list" if isinstance(value, list) else type(value).__name__  # not the reader's LocList
        raise loc.error(f"{what} must be a mapping, got {kind}")
    return value


def _check_keys(mapping: LocMap, allowed, what: str, node: str | None = None) -> None:
    for key in mapping:
        if key not in allowed:
            raise mapping.value_locs[key].error(f"unknown key '{key}' in {what}", node=node,
                                                hint=did_you_mean(key, allowed) or
                                                f"allowed: {', '.join(allowed)}")


def _shape(value, loc: Loc) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise loc.error(f"input shape must be a list of positive integers, got {value!r}",
                        hint="e.g. input: {shape: [1, 28, 28]} (no batch dimension)")
    return tuple(value)


def _spend(budget: list[int], loc: Loc, values: int = 1) -> None:
    """``budget`` holds the layers and repeat steps left and the values left (MAX_VALUES)."""
    budget[0] -= 1
    budget[1] -= values
    if budget[0] < 0:
        raise loc.error(f"the spec expands to more than {MAX_EXPANSION} layers and repeat steps",
                        hint="nested repeat counts multiply; lower them")
    if budget[1] < 0:
        raise loc.error(f"the spec expands to more than {MAX_VALUES:,} values",
                        hint="repeat blocks copy their layers; lower the repeat counts or the layers' arguments")


def _expand_block(item: LocMap, env: dict, out: list[LayerEntry], depth: int, budget: list[int],
                  blocks: dict) -> None:
    """An instance of a named block: its layers with the block's variables (defaults, then the
    instance's), ``name`` (the instance name, which the block's output node takes) and ``input``
    (the instance's input: its ``inputs`` or the previous layer), which the block's first layer
    reads unless it says otherwise."""
    block_name = item["block"]
    if not isinstance(block_name, str) or block_name not in blocks:
        raise item.value_locs["block"].error(f"unknown block {block_name!r}",
                                             hint=did_you_mean(str(block_name), blocks) or
                                             f"blocks: {', '.join(blocks) or 'none (define them under blocks:)'}")
    definition = blocks[block_name]
    instance = substitute(item, env, item.loc)
    name = instance.get("name")
    if not is_identifier(name):
        raise item.value_locs.get("name", item.loc).error(f"a block instance needs a name, got {name!r}",
                                                          hint=f"its output node takes that name; {IDENTIFIER_HINT}")
    source = instance.get("inputs", out[-1].fields.get("name") if out else "input")
    if not isinstance(source, str):
        raise item.value_locs.get("inputs", item.loc).error(
            "a block instance reads one input: give 'inputs: <name>'", node=name,
            hint="the previous layer has no written name" if source is None else None)
    block_env = dict(env)
    defaults = definition.get("vars", LocMap())
    for key in defaults:
        block_env[key] = substitute(defaults[key], block_env, defaults.value_locs[key])
    unknown = [key for key in instance if key not in ("block", "name", "inputs") and key not in defaults]
    if unknown:
        raise item.value_locs[unknown[0]].error(f"block '{block_name}' has no variable '{unknown[0]}'", node=name,
                                                hint=f"its variables: {', '.join(defaults) or 'none'}")
    block_env.update({key: value for key, value in instance.items() if key in defaults})
    block_env.update({"name": name, "input": source})
    first = len(out)
    _expand(definition["layers"], block_env, definition.value_locs["layers"], out, depth + 1, budget, blocks)
    if len(out) == first:
        raise definition.loc.error(f"block '{block_name}' has no layers")
    if "inputs" not in out[first].fields:
        out[first].fields["inputs"] = source
        out[first].fields.value_locs["inputs"] = item.loc
    if not any(entry.fields.get("name") == name for entry in out[first:]):
        raise definition.loc.error(f"block '{block_name}' has no layer named '${{name}}' (its output)",
                                   node=name, hint="name the block's last layer \"${name}\"")


def _expand(items, env: dict, loc: Loc, out: list[LayerEntry], depth: int = 0,
            budget: list[int] | None = None, blocks: dict | None = None) -> None:
    budget = [MAX_EXPANSION, MAX_VALUES] if budget is None else budget  # shared by the nested calls
    blocks = blocks or {}
    if not isinstance(items, LocList):
        raise loc.error("layers must be a list")
    if depth > 20:
        raise loc.error("repeat blocks or block instances nested too deeply")
    for item, item_loc in zip(items, items.item_locs):
        item = _expect_map(item, item_loc, "a layer")
        if "block" in item:
            _spend(budget, item_loc)
            _expand_block(item, env, out, depth, budget, blocks)
        elif "repeat" in item:
            _check_keys(item, ("repeat", "layers", "index"), "a repeat block")
            count = substitute(item["repeat"], env, item.value_locs["repeat"])
            count_loc = item.value_locs["repeat"]
            if isinstance(count, bool) or not isinstance(count, int):
                raise count_loc.error(f"repeat count must be an integer, got {count!r}",
                                      hint="'/' in ${} gives a float; use // for integer division"
                                      if isinstance(count, float) else None)
            if count < 0:
                raise count_loc.error(f"repeat count must not be negative, got {count}")
            if count > MAX_REPEAT:
                raise count_loc.error(f"repeat count {count} exceeds {MAX_REPEAT}")
            index = item.get("index", "i")
            if not is_identifier(index):
                raise item.value_locs.get("index", item.loc).error(
                    f"repeat index must be an identifier, got {index!r}", hint=IDENTIFIER_HINT)
            if "layers" not in item:
                raise item.loc.error("repeat block needs 'layers'")
            for k in range(count):
                _spend(budget, count_loc)
                _expand(item["layers"], {**env, index: k}, item.value_locs["layers"], out, depth + 1, budget, blocks)
        else:
            _spend(budget, item_loc, expanded_size(item, {}))
            try:
                fields = substitute(item, env, item_loc)
            except GraphgrowError as err:  # name the layer when its name is written literally
                literal = item.get("name")
                raise err.located(node=literal if isinstance(literal, str) and "${" not in
                                  _source_form(literal) else None)
            out.append(LayerEntry(fields, item_loc))


def read_spec(text: str, file: str | None = None) -> SpecDocument:
    """Parse spec text (format version 1) into a SpecDocument; every mistake is a GraphgrowError."""
    doc = parse_yaml(text, file)
    top = Loc(file, 1, 1)
    doc = _expect_map(doc, top, "a spec")
    _check_keys(doc, HEADER_KEYS, "the spec header")
    if "graphgrow" not in doc:
        raise top.error("missing format version", hint=f"start the file with 'graphgrow: {FORMAT_VERSION}'")
    if doc["graphgrow"] != FORMAT_VERSION or isinstance(doc["graphgrow"], bool):
        raise doc.value_locs["graphgrow"].error(
            f"unknown format version {doc['graphgrow']!r}", hint=f"this graphgrow reads version {FORMAT_VERSION}")
    for key in ("name", "input", "layers"):
        if key not in doc:
            raise doc.loc.error(f"missing '{key}'")
    name = doc["name"]
    if not is_identifier(name):
        raise doc.value_locs["name"].error(f"spec name must be an identifier, got {name!r}", hint=IDENTIFIER_HINT)

    env: dict[str, Any] = {}
    if "vars" in doc:
        variables = _expect_map(doc["vars"], doc.value_locs["vars"], "vars")
        for key, value in variables.items():
            value_loc = variables.value_locs[key]
            if not is_identifier(key):
                raise value_loc.error(f"variable name must be an identifier, got {key!r}", hint=IDENTIFIER_HINT)
            value = substitute(value, env, value_loc)
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise value_loc.error(f"variable '{key}' must be a number or string, got {value!r}")
            env[key] = value

    input_spec = _expect_map(doc["input"], doc.value_locs["input"], "input")
    _check_keys(input_spec, ("shape", "tokens"), "input")
    if "shape" not in input_spec:
        raise input_spec.loc.error("input needs a shape", hint="e.g. input: {shape: [2]}")
    input_shape = _shape(substitute(input_spec["shape"], env, input_spec.value_locs["shape"]),
                         input_spec.value_locs["shape"])
    input_tokens = None
    if "tokens" in input_spec:
        where = input_spec.value_locs["tokens"]
        input_tokens = substitute(input_spec["tokens"], env, where)
        if isinstance(input_tokens, bool) or not isinstance(input_tokens, int) or input_tokens < 1:
            raise where.error(f"input tokens must be a positive integer (the vocabulary size), got {input_tokens!r}",
                              hint="e.g. input: {shape: [16], tokens: 100} for 16 token ids below 100")

    blocks = _expect_map(doc.get("blocks", LocMap()), doc.value_locs.get("blocks", doc.loc), "blocks")
    for block_name, definition in blocks.items():
        where = blocks.value_locs[block_name]
        if not is_identifier(block_name):
            raise where.error(f"block name must be an identifier, got {block_name!r}", hint=IDENTIFIER_HINT)
        _check_keys(_expect_map(definition, where, f"block '{block_name}'"), ("vars", "layers"), f"block '{block_name}'")
        if "layers" not in definition:
            raise where.error(f"block '{block_name}' needs 'layers'")
        block_vars = _expect_map(definition.get("vars", LocMap()), where, f"the vars of block '{block_name}'")
        for key in block_vars:
            if not is_identifier(key):
                raise block_vars.value_locs[key].error(f"variable name must be an identifier, got {key!r}",
                                                       hint=IDENTIFIER_HINT)
    layers: list[LayerEntry] = []
    _expand(doc["layers"], env, doc.value_locs["layers"], layers, blocks=blocks)
    if not layers:
        raise doc.value_locs["layers"].error("a spec needs at least one layer")

    outputs = None
    outputs_loc = doc.value_locs.get("outputs", doc.loc)
    if "outputs" in doc:
        outputs = substitute(doc["outputs"], env, outputs_loc)
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise outputs_loc.error("outputs must be a list of node names")
        outputs = list(outputs)
    return SpecDocument(name, input_shape, layers, outputs, file, doc.loc, outputs_loc, input_tokens)


def read_spec_file(path: str | Path) -> SpecDocument:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphgrowError("spec file not found", file=str(path), hint="check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GraphgrowError(f"cannot read spec: {err}", file=str(path)) from None
    return read_spec(text, str(path))
