"""The IR: a layer graph on networkx.DiGraph whose nodes carry op, arguments, inferred shapes
and source location. ``build_graph`` turns a read spec into one; passes edit it."""
from __future__ import annotations

import copy
import json
import keyword
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import networkx as nx
import torch
from torch import fx

from . import ops as _builtin_ops  # noqa: F401  (registers the built-in ops)
from .errors import GraphgrowError, did_you_mean
from .init import normalize_init
from .ops.base import OpDef, Shape, get_op
from .spec import IDENTIFIER_HINT, NODE_KEYS, LayerEntry, Loc, SpecDocument, is_identifier, read_spec, read_spec_file

INPUT = "input"
# Node names become attributes of the compiled GraphModule, so they must not shadow its class
# attributes or the ones every instance sets (training, _modules, meta, ...).
_RESERVED = ({INPUT} | set(dir(fx.GraphModule)) | set(vars(fx.GraphModule(torch.nn.Module(), fx.Graph())))
             | set(keyword.kwlist))


@dataclass
class Node:
    """One layer: op name, checked arguments, input names, initialisation, where it was written."""
    name: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=lambda: [INPUT])
    init: Any = None
    frozen: bool = False
    loc: Loc = field(default_factory=Loc)
    in_shapes: list[Shape] = field(default_factory=list)
    out_shape: Shape | None = None

    @property
    def opdef(self) -> OpDef:
        return get_op(self.op)

    def param_shapes(self) -> dict[str, Shape]:
        return self.opdef.param_shapes(self.args, self.in_shapes)

    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes().values())

    def flops(self) -> int:
        return self.opdef.flops(self.args, self.in_shapes, self.out_shape)

    def error(self, message: str, hint: str | None = None) -> GraphgrowError:
        return self.loc.error(message, node=self.name, hint=hint)


def check_name(name: Any, loc: Loc) -> str:
    if not is_identifier(name):
        raise loc.error(f"invalid node name {name!r}", hint=IDENTIFIER_HINT)
    if name in _RESERVED:
        raise loc.error(f"node name '{name}' is reserved", node=name, hint=f"rename it, e.g. '{name}_1'")
    return name


class LayerGraph:
    """A network's structure: nodes in a topological order plus a networkx DiGraph of data flow.

    The order is the spec order wherever data flow allows; ``nodes`` iterates in it. Shapes
    are filled in by ``infer_shapes`` (called by every builder and after every edit by passes).
    """

    def __init__(self, name: str, input_shape: Shape, source: str | None = None, input_tokens: int | None = None):
        self.name = name
        self.input_shape = tuple(input_shape)
        #: the input holds integer token ids below this number (a token model), or None
        self.input_tokens = input_tokens
        self.source = source
        self.outputs: list[str] = []
        self.dag = nx.DiGraph()
        self.dag.add_node(INPUT)
        self._order: list[str] = []

    # -- reading ------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name != INPUT and name in self.dag  # a dict lookup: passes ask this per node

    def __len__(self) -> int:
        return len(self._order)

    def node(self, name: str) -> Node:
        if name not in self.dag or name == INPUT:
            raise GraphgrowError(f"no node '{name}' in network '{self.name}'", file=self.source,
                                 hint=did_you_mean(name, self._order))
        return self.dag._node[name]["node"]  # the node-data dict behind dag.nodes, without its view

    @property
    def nodes(self) -> list[Node]:
        """All nodes in topological order."""
        data = self.dag._node
        return [data[n]["node"] for n in self._order]

    def names(self) -> list[str]:
        return list(self._order)

    def consumers(self, name: str) -> list[str]:
        """Nodes reading ``name``, in topological order."""
        readers = set(self.dag.successors(name))
        return [n for n in self._order if n in readers]

    def shape_of(self, name: str) -> Shape:
        return self.input_shape if name == INPUT else self.node(name).out_shape

    # -- editing (used by passes; call infer_shapes afterwards) ----------------------------
    def unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.dag or name in _RESERVED:
            name, k = f"{base}_{k}", k + 1
        return name

    def add(self, node: Node, after: str | None = None) -> Node:
        """Add a node; it goes right after ``after`` in the order (default: at the end)."""
        check_name(node.name, node.loc)
        if node.name in self.dag:
            raise node.error(f"duplicate node name '{node.name}'")
        # check everything before changing anything, so a failed add leaves the graph intact
        self._check_sources(node, node.inputs)
        position = len(self._order) if after in (None,) else (
            0 if after == INPUT else self._order.index(self.node(after).name) + 1)
        self.dag.add_node(node.name, node=node)
        self._order.insert(position, node.name)
        self._connect(node)
        return node

    def remove(self, name: str) -> Node:
        node = self.node(name)
        if self.consumers(name) or name in self.outputs:
            raise node.error(f"cannot remove node '{name}' while it is used",
                             hint="redirect its consumers first")
        self.dag.remove_node(name)
        self._order.remove(name)
        return node

    def set_inputs(self, name: str, inputs: list[str]) -> None:
        node = self.node(name)
        self._check_sources(node, inputs)
        for source in set(node.inputs):
            self.dag.remove_edge(source, name)
        node.inputs = list(inputs)
        self._connect(node)

    def redirect(self, old: str, new: str) -> None:
        """Make every reader of ``old`` (except ``new`` itself) and the outputs read ``new``."""
        for reader in self.consumers(old):
            if reader != new:
                self.set_inputs(reader, [new if i == old else i for i in self.node(reader).inputs])
        self.outputs = [new if o == old else o for o in self.outputs]

    def _check_sources(self, node: Node, inputs: list[str]) -> None:
        for source in inputs:
            if source not in self.dag and source != node.name:
                raise node.error(f"unknown input '{source}'",
                                 hint=did_you_mean(source, [INPUT, *self._order]))

    def _connect(self, node: Node) -> None:
        self._check_sources(node, node.inputs)
        for source in node.inputs:
            self.dag.add_edge(source, node.name)

    def copy(self) -> "LayerGraph":
        """An independent copy; node locations (immutable) are shared. Faster than deepcopy,
        which dominated passes on deep networks."""
        new = copy.copy(self)
        new.outputs = list(self.outputs)
        new._order = list(self._order)
        new.dag = dag = nx.DiGraph()
        # networkx's adjacency dicts filled directly (add_nodes_from and add_edges_from take three
        # times as long); an edge's data dict is shared by its successor and predecessor entries
        data = self.dag._node
        dag._node[INPUT] = {}
        dag._node.update((name, {"node": _copy_node(data[name]["node"])}) for name in self._order)
        successors, predecessors = dag._succ, dag._pred
        for name in dag._node:
            successors[name], predecessors[name] = {}, {}
        for source, readers in self.dag._succ.items():
            for reader in readers:
                successors[source][reader] = predecessors[reader][source] = {}
        return new

    # -- checking -----------------------------------------------------------------------
    def sort(self) -> None:
        """Restore a topological order, keeping the current order wherever possible."""
        position = {name: k for k, name in enumerate(self._order)}
        position[INPUT] = -1
        data = self.dag._node
        if all(position.get(source, len(position)) < k for k, name in enumerate(self._order)
               for source in data[name]["node"].inputs):
            return  # already topological (so acyclic): most edits insert after a node's inputs
        try:
            order = list(nx.lexicographical_topological_sort(self.dag, key=position.__getitem__))
        except nx.NetworkXUnfeasible:  # find_cycle only on failure: it is slow on deep graphs
            names = [edge[0] for edge in nx.find_cycle(self.dag)]
            first = self.node(names[0])
            raise first.error(f"cycle: {' -> '.join(names + [names[0]])}",
                              hint="a node cannot read its own output, directly or indirectly") from None
        self._order = [n for n in order if n != INPUT]

    def infer_shapes(self, changed: Iterable[str] | None = None) -> None:
        """Sort, check arities and fill in every node's input and output shapes. ``changed``:
        after an edit of a graph whose shapes were inferred, the nodes it added or whose op,
        arguments, inputs or initialisation it changed: infer again only them and the nodes
        whose input shapes changed (a pass's edit of a long network)."""
        self.sort()
        if not self.outputs:
            raise GraphgrowError(f"network '{self.name}' has no outputs", file=self.source)
        redo, reshaped = (None, None) if changed is None else (set(changed), set())
        for node in self.nodes:
            if redo is not None and node.name not in redo and not reshaped.intersection(node.inputs):
                continue
            before = node.out_shape
            self._infer_node(node)
            if reshaped is not None and node.out_shape != before:
                reshaped.add(node.name)
        for name in self.outputs:
            if name not in self:
                raise GraphgrowError(f"unknown output '{name}'", file=self.source,
                                     hint=did_you_mean(name, self._order))

    def _infer_node(self, node: Node) -> None:
        opdef = node.opdef
        count = len(node.inputs)
        if count < opdef.min_inputs or (opdef.max_inputs is not None and count > opdef.max_inputs):
            wanted = (f"{opdef.min_inputs}" if opdef.min_inputs == opdef.max_inputs else
                      f"at least {opdef.min_inputs}" if opdef.max_inputs is None else
                      f"{opdef.min_inputs} to {opdef.max_inputs}")
            raise node.error(f"op '{node.op}' takes {wanted} input(s), got {count}")
        node.in_shapes = [self.shape_of(i) for i in node.inputs]
        try:
            node.out_shape = tuple(opdef.output_shape(node.args, node.in_shapes))
            roles = list(node.param_shapes())
            _check_init_applies(normalize_init(node.init, roles), node.param_shapes())
        except GraphgrowError as err:
            if len(node.inputs) == 1:
                err.message += f" (input '{node.inputs[0]}' has shape {list(node.in_shapes[0])})"
            raise err.located(file=node.loc.file, line=node.loc.line,
                              column=node.loc.column, node=node.name)

    # -- reporting ------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(node.num_params() for node in self.nodes)

    def flops(self) -> int:
        """Forward FLOPs per sample."""
        return sum(node.flops() for node in self.nodes)

    def summary(self) -> dict:
        rows = [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "output_shape": list(n.out_shape),
                 "params": n.num_params(), "flops": n.flops()} for n in self.nodes]
        return {"name": self.name, "input_shape": list(self.input_shape), "outputs": list(self.outputs),
                "nodes": rows, "total_params": self.num_params(), "total_flops": self.flops()}

    def summary_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def summary_table(self) -> str:
        data = self.summary()
        header = ("name", "op", "output shape", "params", "FLOPs/sample")
        rows = [(r["name"], r["op"], str(tuple(r["output_shape"])), f"{r['params']:,}", f"{r['flops']:,}")
                for r in data["nodes"]]
        rows.append(("total", "", "", f"{data['total_params']:,}", f"{data['total_flops']:,}"))
        widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]
        line = lambda row: "  ".join(str(c).ljust(w) if k < 3 else str(c).rjust(w)
                                     for k, (c, w) in enumerate(zip(row, widths)))
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([f"network {data['name']}: input {tuple(data['input_shape'])}",
                          line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        return f"<LayerGraph {self.name}: {len(self)} nodes, {self.num_params()} parameters>"


_SCALARS = (int, float, str, bool, type(None))


def _copy_node(node: Node) -> Node:
    plain = all(isinstance(v, _SCALARS) for v in node.args.values())
    init = node.init if isinstance(node.init, _SCALARS) else copy.deepcopy(node.init)
    return Node(node.name, node.op, dict(node.args) if plain else copy.deepcopy(node.args), list(node.inputs),
                init, node.frozen, node.loc, list(node.in_shapes), node.out_shape)


def _check_init_applies(plan, shapes) -> None:
    if not plan:  # defaults only (most nodes, and every node passes re-infer)
        return
    from .init import apply_init  # applying to scratch tensors is the one check of applicability
    scratch = {role: torch.empty(shapes[role]) for role in plan if torch.Size(shapes[role]).numel() < 1 << 22}
    apply_init(scratch, {r: p for r, p in plan.items() if r in scratch}, torch.Generator())


def _node_from_entry(entry: LayerEntry, index: int, previous: str, taken: dict[str, Loc]) -> Node:
    fields = entry.fields
    value_loc = lambda key: fields.value_locs.get(key, entry.loc)
    if "op" not in fields:
        raise entry.loc.error("layer has no 'op'", node=fields.get("name") if isinstance(fields.get("name"), str) else None,
                              hint="e.g. {name: fc1, op: linear, out: 10}")
    try:
        opdef = get_op(fields["op"])
    except GraphgrowError as err:
        raise err.located(**vars(value_loc("op")), node=fields.get("name") if isinstance(fields.get("name"), str) else None)
    name = fields.get("name")
    if name is None:
        name = f"{opdef.name}_{index}"
        k = 1
        while name in taken:
            name, k = f"{opdef.name}_{index}_{k}", k + 1
    check_name(name, value_loc("name"))
    if name in taken:
        raise value_loc("name").error(f"duplicate node name '{name}'", node=name,
                                      hint=f"first defined at line {taken[name].line}")
    inputs = fields.get("inputs", [previous] if opdef.max_inputs != 0 else [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs) or (
            not inputs and opdef.max_inputs != 0):
        raise value_loc("inputs").error(f"inputs must be a node name or a list of names, got {inputs!r}", node=name)
    frozen = fields.get("frozen", False)
    if not isinstance(frozen, bool):
        raise value_loc("frozen").error(f"frozen must be true or false, got {frozen!r}", node=name)
    raw_args = {k: v for k, v in fields.items() if k not in NODE_KEYS}
    where = lambda key: {**vars(value_loc(key) if key else entry.loc), "node": name}
    args = opdef.check_args(raw_args, where)
    init = _plain(fields.get("init"))
    try:
        normalize_init(init, list(opdef.roles))
    except GraphgrowError as err:
        raise err.located(**vars(value_loc("init")), node=name)
    return Node(name, opdef.name, args, list(inputs), init, frozen, entry.loc)


def _plain(value: Any) -> Any:
    """LocMap/LocList trees to plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def build_graph(doc: SpecDocument) -> LayerGraph:
    """Check a read spec and build its LayerGraph with shapes inferred."""
    graph = LayerGraph(doc.name, doc.input_shape, doc.file, doc.input_tokens)
    taken: dict[str, Loc] = {}
    previous = INPUT
    nodes = []
    for index, entry in enumerate(doc.layers):
        node = _node_from_entry(entry, index, previous, taken)
        taken[node.name] = node.loc
        nodes.append(node)
        previous = node.name
    known = [INPUT, *taken]
    for node in nodes:  # forward references are allowed; unknown names are not
        for source in node.inputs:
            if source not in taken and source != INPUT:
                raise node.loc.error(f"unknown input '{source}'", node=node.name,
                                     hint=did_you_mean(source, known) or "inputs name earlier nodes or 'input'")
            if source == node.name:
                raise node.loc.error(f"node '{node.name}' reads its own output", node=node.name)
    for node in nodes:
        graph.dag.add_node(node.name, node=node)
        graph._order.append(node.name)
    for node in nodes:
        for source in node.inputs:
            graph.dag.add_edge(source, node.name)
    graph.outputs = doc.outputs or [nodes[-1].name]
    for name in graph.outputs:
        if name not in taken:
            raise doc.outputs_loc.error(f"unknown output '{name}'", hint=did_you_mean(name, taken))
    graph.infer_shapes()
    return graph


def load_graph(path) -> LayerGraph:
    """Read and check a spec file."""
    return build_graph(read_spec_file(path))


def graph_from_text(text: str, file: str | None = None) -> LayerGraph:
    return build_graph(read_spec(text, file))
