"""compile_graph's way from the nodes ops emit to a forward: the nodes kept in a ``Recording``
(plain records, named as ``fx.Graph`` names them), the Python code of the forward written from it
as fx's code generator writes it, in 0.3-0.4 of its time (benchmarks/reports/passes.md, "Compiling
a new forward"), and the fx graph replayed from it only where one is needed (``graph``, copies,
pickles, fx's own code generator).

Building an ``fx.Graph`` node by node and ``fx.Graph.python_code`` were most of compiling a new
network (fx swaps every node's repr in and out, inspects two signatures and searches every line
with a regular expression), and a pass that inserts or removes a layer needs a new forward.
``python_code`` here writes the same text, globals and line map for the node kinds the ops emit
(placeholders, call_module, call_function with constants, containers and nodes as arguments) and
returns None for anything else, which then takes fx's way. Names come from fx's own namespace,
asked in fx's order, so that a node named like a global (``torch``, ``inf``) is renamed as fx
renames it; a value is freed (``x = None``) after its last use, as fx frees it.
tests/test_compiler_codegen.py compares the two generators on every shipped spec and on
generated graphs, and the replayed graph with one built node by node.
"""
from __future__ import annotations

import functools
import os
import types

import torch
from torch import fx
from torch.fx.graph import PythonCode
from torch.fx.node import map_aggregate

from ..errors import GraphgrowError

try:  # fx internals of the pinned torch (2.13); under a torch without them fx makes every module
    from torch.fx.graph import _custom_builtins, _format_target, _is_from_torch, _Namespace, magic_methods
    from torch.fx.graph_module import _forward_from_src, _WrappedCall  # noqa: F401  (network.py calls them)
    from torch.fx.node import _get_qualified_name
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True

_PLAIN_CONSTANTS = (int, float, bool, str, types.NoneType)


class Recorded:
    """One node an op emitted: what ``fx.Graph.create_node`` is given, under the name the graph
    gives it, and where it comes from (the spec node's name, op and location; None for the input
    and the output)."""

    __slots__ = ("op", "target", "args", "kwargs", "name", "origin")

    def __init__(self, op: str, target, args: tuple, kwargs: dict, name: str, origin: tuple | None):
        self.op, self.target, self.args, self.kwargs, self.name, self.origin = op, target, args, kwargs, name, origin


class Recording:
    """The nodes of a forward as the ops emit them (``OpDef.emit`` calls ``create_node`` as on an
    fx.Graph), kept as records, far cheaper to make than fx nodes. A recording is not edited once
    compiled, so that modules with the same code share it; ``replay`` makes its fx graph."""

    def __init__(self):
        self.nodes: list[Recorded] = []
        self.origin: tuple | None = None  # (name, op, loc) of the spec node whose nodes are recorded
        # fx's naming of graph nodes (where fx's internals are missing, fx names them on replay)
        self._names = _Namespace() if AVAILABLE else None

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or not hasattr(fx.Graph, attribute):
            raise AttributeError(attribute)
        # an op's own emit reached for another method of fx.Graph: say so where its node is written
        name, op, loc = self.origin or (None, None, None)
        raise GraphgrowError(f"op '{op}' emits through fx.Graph.{attribute}, which compiling does not record",
                             file=loc and loc.file, line=loc and loc.line, node=name,
                             hint="an op's emit adds nodes with graph.create_node(op, target, args, kwargs, name=...)")

    def create_node(self, op: str, target, args: tuple, kwargs: dict, name: str) -> Recorded:
        """``fx.Graph.create_node``, as the ops call it (with a name)."""
        if self._names is not None:
            name = self._names.create_name(name, None)
        kwargs = kwargs or {}
        if any(isinstance(value, (list, dict)) for value in (*args, *kwargs.values())):
            # fx keeps containers as copies (immutable); a spec argument (permute's dims) must not
            # reach the recording as the node's own list, which an edit of the graph could change
            args, kwargs = map_aggregate(args, _same), map_aggregate(kwargs, _same)
        node = Recorded(op, target, args, kwargs, name, self.origin)
        self.nodes.append(node)
        return node

    def replay(self, owning_module: torch.nn.Module | None = None) -> fx.Graph:
        """The fx graph the same calls of ``create_node`` make, each node's meta pointing at its
        spec line (``"graphgrow"``: node, op, file, line; ``"stack_trace"`` where the line is known)."""
        graph = fx.Graph(owning_module=owning_module)
        made: dict[Recorded, fx.Node] = {}
        in_graph = lambda value: made[value] if type(value) is Recorded else value  # noqa: E731
        for record in self.nodes:
            node = made[record] = graph.create_node(record.op, record.target, map_aggregate(record.args, in_graph),
                                                    map_aggregate(record.kwargs, in_graph), name=record.name)
            if record.origin is not None:
                name, op, loc = record.origin
                node.meta["graphgrow"] = {"node": name, "op": op, "file": loc.file, "line": loc.line}
                if loc.line is not None:
                    node.meta["stack_trace"] = (f'  File "{loc.file or "<spec>"}", line {loc.line}, in {name}\n'
                                                f'    op: {op}\n')
        return graph


def _same(value):
    return value


class _Unsupported(Exception):
    """A node or argument this generator does not write: fx's generator writes the graph."""


def python_code(recording: Recording) -> PythonCode | None:
    """fx's ``recording.replay().python_code(root_module="self")``, or None where the recording
    needs more than this generator writes."""
    if not AVAILABLE or os.environ.get("FX_GRAPH_SHOW_META", "0") == "1":
        return None
    try:
        return _Writer().write(recording.nodes)
    except _Unsupported:
        return None


class _Writer:
    """One generation: fx's namespace and globals, filled in the order fx fills them."""

    def __init__(self):
        # fx starts each generation with its builtins (torch, inf, ...): the same every time
        self.namespace = object.__new__(_Namespace)
        self.namespace.__dict__ = {key: value.copy() for key, value in _BUILTINS.namespace.__dict__.items()}
        self.globals = dict(_BUILTINS.globals)
        self.functions: dict[object, tuple[str | None, str | None]] = {}
        self.node_names: dict[Recorded, str] = {}

    @classmethod
    def builtins(cls) -> "_Writer":
        """The state after fx's builtins, made as fx makes it."""
        writer = object.__new__(cls)
        writer.namespace, writer.globals = _Namespace(), {}
        for name, (_, obj) in _custom_builtins.items():
            writer.add_global(name, obj)
        return writer

    def add_global(self, name_hint: str, obj: object) -> str:
        if _is_from_torch(obj) and obj != torch.device:
            return _get_qualified_name(obj)  # fx writes torch's functions by their qualified name
        return self._new_global(name_hint, obj)

    def _new_global(self, name_hint: str, obj: object) -> str:
        name = self.namespace.create_name(name_hint, obj)
        if self.globals.setdefault(name, obj) is not obj:
            raise _Unsupported  # fx refuses two objects under one name too
        return name

    def name(self, node: Recorded) -> str:
        name = self.node_names.get(node)  # the namespace knows it too, at the cost of a call
        if name is None:
            name = self.node_names[node] = self.namespace.create_name(node.name, node)
        return name

    def value(self, arg) -> str:
        """An argument as fx writes it."""
        if type(arg) is Recorded:
            return self.name(arg)
        kind = type(arg)
        if kind in _PLAIN_CONSTANTS:
            return repr(arg)
        if isinstance(arg, tuple) and not hasattr(arg, "_fields"):  # a named tuple is a global in fx's code
            return f"({self.value(arg[0])},)" if len(arg) == 1 else f"({', '.join(map(self.value, arg))})"
        if isinstance(arg, list):  # fx's node arguments hold lists as its immutable_list
            return f"[{', '.join(map(self.value, arg))}]"
        if kind is slice:
            return f"slice({self.value(arg.start)}, {self.value(arg.stop)}, {self.value(arg.step)})"
        raise _Unsupported

    def arguments(self, node: Recorded) -> str:
        written = [self.value(arg) for arg in node.args]
        if node.kwargs:
            written += [f"{key} = {self.value(value)}" for key, value in node.kwargs.items()]
        return ", ".join(written)

    def function(self, target) -> tuple[str | None, str | None]:
        """fx's template for an operator it writes as one (``{} + {}``), else the function's global
        name; per target, in the order fx names globals (before the node that calls it)."""
        known = self.functions.get(target)
        if known is None:
            template, qualified, from_torch = _target(target)
            # torch's functions are written by their qualified name; others become globals
            known = (template, qualified if template is not None or from_torch else self._new_global(qualified, target))
            self.functions[target] = known
        return known

    def statement(self, node: Recorded) -> str | None:
        """The line that computes ``node``, without the values it frees (None: no line)."""
        op = node.op
        if op == "call_module":
            return f"{self.name(node)} = {_format_target('self', node.target)}({self.arguments(node)})"
        if op == "call_function":
            template, function = self.function(node.target)
            if template is not None:
                if node.kwargs:
                    raise _Unsupported
                name = self.name(node)
                return f"{name} = {template.format(*map(self.value, node.args))}"
            return f"{self.name(node)} = {function}({self.arguments(node)})"
        if op == "placeholder":
            target = node.target
            if node.args or not isinstance(target, str) or not target.isidentifier() or target == "self":
                raise _Unsupported  # a default value, *args, or a first argument fx takes for self
            name = self.name(node)
            return None if name == target else f"{name} = {target}"
        if op == "output":
            return f"return {self.value(node.args[0])}"
        raise _Unsupported  # get_attr, call_method

    def write(self, nodes: list[Recorded]) -> PythonCode:
        if not nodes or nodes[-1].op != "output":
            raise _Unsupported
        # each value is freed after the node that uses it last (the first user seen backwards)
        last_use: dict[Recorded, Recorded] = {}
        freed_after: dict[Recorded, list[Recorded]] = {}
        for node in reversed(nodes):
            for used in _inputs(node):
                if used not in last_use:
                    last_use[used] = node
                    freed_after.setdefault(node, []).append(used)
        free_vars = ["self"]
        lines: list[str] = []
        line_nodes: list[int] = []  # the index of the node each line belongs to
        for index, node in enumerate(nodes):
            if node.op == "placeholder":
                free_vars.append(node.target)
            statement = self.statement(node)
            if statement is None:
                continue
            if node.op not in ("placeholder", "output"):
                freed = freed_after.get(node, [])
                if node not in last_use:  # a value nobody uses is freed at once, as fx does
                    freed = [*freed, node]
                if freed:
                    statement += f";  {' = '.join(self.name(n) for n in freed)} = None"
            lines.append(statement)
            line_nodes.append(index)
        line_nodes.append(len(nodes) - 1)  # the empty line after the return statement
        prologue = f"def forward({', '.join(free_vars)}):"
        body = "\n".join("    " + line for line in [*lines, ""])
        return PythonCode(f"\n\n\n{prologue}\n{body}", self.globals,
                          _lineno_map={line: index for line, index in enumerate(line_nodes, start=1)},
                          _prologue_start=4)


@functools.cache
def _target(target) -> tuple[str | None, str | None, bool]:
    """What fx's code generator needs to know of a call_function target, the same in every
    generation: the template of an operator it writes as one (``{} + {}``), else the function's
    qualified name and whether it comes from torch (written by that name, not as a global)."""
    operator = getattr(target, "__module__", "") == "_operator"
    if operator and target.__name__ in magic_methods:
        return magic_methods[target.__name__], None, False
    if operator or target is getattr:
        raise _Unsupported  # in-place operators, attribute access
    return None, _get_qualified_name(target), _is_from_torch(target) and target != torch.device


def _inputs(node: Recorded) -> list[Recorded]:
    """The nodes among a node's arguments, in fx's order (``fx.Node.all_input_nodes``: what
    ``map_aggregate`` visits)."""
    found: list[Recorded] = []
    _collect(node.args, found)
    if node.kwargs:
        _collect(node.kwargs.values(), found)
    return found


def _collect(values, found: list[Recorded]) -> None:
    for value in values:
        if type(value) is Recorded:
            found.append(value)
        elif isinstance(value, (tuple, list)):
            _collect(value, found)
        elif isinstance(value, dict):
            _collect(value.values(), found)
        elif type(value) is slice:
            _collect((value.start, value.stop, value.step), found)


_BUILTINS = _Writer.builtins() if AVAILABLE else None
