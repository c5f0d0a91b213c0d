"""Residual blocks as units: recognition in any layer graph (imported or written), and identity
insertion of a copy of a block with its last layer zero.

A block is an ``add`` of a branch and a shortcut that start from one node (the entry): the
branch is any subgraph computed from the entry alone (free parameters allowed), the shortcut is
the entry itself or a projection computed from it alone; nothing outside reads inside. The block
ends at the add, or at the idempotent activation (relu) right after it: the ResNet basic and
bottleneck blocks with batch norm and a projection, a transformer's attention and MLP sub-blocks
with their norms, ConvNeXt and inverted-residual blocks.

A copy of a block with an identity shortcut, inserted after a node whose values are fixed points
of the block's trailing activation, computes the identity when the last layer of its branch is
zero (the branch is zero, act(x + 0) = x), while that layer's gradient is not zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from graphgrow import GraphgrowError, LayerGraph, Network, Node
from graphgrow.compiler.network import build_modules, initialize
from graphgrow.ir import INPUT

from .record import Origin, Record, gc_paused, rebuild


@dataclass(frozen=True)
class Block:
    """One residual block: ``add`` joins the branch (``branch``, topological order, ending at
    the add's branch input) and the shortcut (``shortcut``: projection nodes, empty for the
    identity) from ``entry``; ``output`` is the add or the activation right after it."""
    add: str
    entry: str
    branch: tuple[str, ...]
    shortcut: tuple[str, ...]
    output: str

    @property
    def nodes(self) -> tuple[str, ...]:
        return (*self.branch, *self.shortcut, self.add) + ((self.output,) if self.output != self.add else ())


def _computed_from(graph: LayerGraph, end: str, entry: str) -> set[str] | None:
    """The nodes ``end`` is computed from, back to ``entry`` (excluded); None if any of them
    reads something other than ``entry``, those nodes, or nothing (free parameters)."""
    seen, stack = set(), [end]
    while stack:
        name = stack.pop()
        if name == entry or name in seen:
            continue
        if name == INPUT:
            return None
        seen.add(name)
        stack.extend(graph.node(name).inputs)
    return seen


def _recognise(graph: LayerGraph, add: Node, position: dict[str, int]) -> Block | None:
    if add.op != "add" or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
        return None
    first, second = add.inputs
    common = ((nx.ancestors(graph.dag, first) | {first}) & (nx.ancestors(graph.dag, second) | {second}))
    if not common:
        return None
    entry = max(common, key=lambda n: position.get(n, -1))
    paths = [_computed_from(graph, end, entry) for end in (first, second)]
    if None in paths or paths[0] & paths[1]:
        return None
    (branch_end, branch), (_, shortcut) = sorted(zip(add.inputs, paths), key=lambda item: -len(item[1]))
    if not branch:
        return None
    inside = branch | shortcut | {add.name}
    if any(n in graph.outputs or not set(graph.consumers(n)) <= inside for n in branch | shortcut):
        return None
    readers = graph.consumers(add.name)
    output = add.name
    if (len(readers) == 1 and add.name not in graph.outputs and graph.node(readers[0]).opdef.idempotent
            and len(graph.node(readers[0]).inputs) == 1):
        output = readers[0]
    order = lambda names: tuple(sorted(names, key=position.__getitem__))
    return Block(add.name, entry, order(branch), order(shortcut), output) if branch_end in branch else None


def find_blocks(graph: LayerGraph) -> list[Block]:
    """Every residual block of the graph, in topological order of their adds."""
    position = {name: k for k, name in enumerate(graph.names())}
    return [b for b in (_recognise(graph, node, position) for node in graph.nodes) if b is not None]


def block_boundaries(graph: LayerGraph) -> list[str]:
    """Where a copy of a block fits: every block's output (a copy of that block), and the entry
    of every block with an identity shortcut (a copy of that block goes in front of it);
    network outputs excluded. The entry of a block that changes the shape (a projection
    shortcut) is a boundary only where it is another block's output."""
    names = [name for block in find_blocks(graph)
             for name in ((block.entry,) if not block.shortcut else ()) + (block.output,)]
    return [n for n in dict.fromkeys(names) if n not in graph.outputs]


def _holds_fixed_points(graph: LayerGraph, name: str, activation: str) -> bool:
    """The values of ``name`` are fixed points of the idempotent ``activation``: its output, or
    pooling and shape ops of such values."""
    if name == INPUT:
        return False
    node = graph.node(name)
    if node.op == activation:
        return True
    return node.opdef.keeps_range and all(_holds_fixed_points(graph, i, activation) for i in node.inputs)


def last_layer(graph: LayerGraph, name: str, inside: set[str]) -> tuple[str, tuple[str, ...]] | None:
    """(node, roles) whose roles set to zero make the block node ``name`` zero: the last layer
    with parameters, reached back through ops that map zero to zero."""
    node = graph.node(name)
    roles = node.opdef.zero_output_roles(node.args, node.in_shapes) if node.param_shapes() else None
    if roles:
        return name, roles
    if not node.opdef.maps_zero_to_zero:
        return None
    return next(filter(None, (last_layer(graph, i, inside) for i in node.inputs if i in inside)), None)


def _block_named(graph: LayerGraph, name: str) -> Block:
    blocks = find_blocks(graph)
    for block in blocks:
        if name in (block.add, block.output):
            return block
    raise GraphgrowError(f"'{name}' is not the add or the output of a residual block", file=graph.source, node=name,
                         hint=f"blocks end at: {', '.join(b.output for b in blocks) or 'none (no add of a branch and its shortcut)'}")


@gc_paused()
def insert_block(network: Network, block: str, after: str | None = None, seed: int = 0) -> tuple[Network, Record]:
    """Insert after node ``after`` (default: the block's output) a copy of the residual block
    ending at ``block``, with an identity shortcut and the last layer of its branch zero: the
    function is unchanged, the zeroed layer's gradient is not. Weights are copied from the
    block where their shapes agree (strides become 1: the copy keeps the shape), else drawn
    from ``seed``."""
    graph = network.graph.copy()
    template = _block_named(graph, block)
    after = after or template.output
    shape = graph.shape_of(after) if after == INPUT else graph.node(after).out_shape
    fail = lambda why, hint=None: GraphgrowError(f"cannot insert a copy of block '{block}' after '{after}': {why}",
                                                 file=graph.source, node=after, hint=hint)
    activation = graph.node(template.output).op if template.output != template.add else None
    if activation is not None and not _holds_fixed_points(graph, after, activation):
        raise fail(f"the block ends in {activation}, and {activation}(x + 0) = x needs x to come out of "
                   f"{activation}", hint="insert after a block output or another node that ends in that activation")
    prefix = graph.unique_name(f"{template.output}_copy")
    renamed = {template.entry: after}
    copies = []
    for name in (*template.branch, template.add, *((template.output,) if activation else ())):
        original = graph.node(name)
        args = {**original.args, **({"stride": 1} if "stride" in original.args else {})}
        inputs = [renamed[i] for i in original.inputs] if name != template.add else \
            [renamed[next(i for i in original.inputs if i in template.branch)], after]
        copies.append(Node(f"{prefix}_{name}", original.op, args, inputs, original.init, original.frozen, original.loc))
        renamed[name] = copies[-1].name
    readers = graph.consumers(after)
    previous = after if after != INPUT else None
    for node in copies:
        graph.add(node, after=previous or INPUT)
        previous = node.name
    for reader in readers:
        graph.set_inputs(reader, [copies[-1].name if i == after else i for i in graph.node(reader).inputs])
    graph.outputs = [copies[-1].name if o == after else o for o in graph.outputs]
    try:
        graph.infer_shapes()
    except GraphgrowError as err:
        raise fail(f"the copy does not fit: {err.message}") from None
    if graph.node(copies[-1].name).out_shape != tuple(shape):
        raise fail(f"the copy gives shape {list(graph.node(copies[-1].name).out_shape)}, not {list(shape)}")
    branch_end = template.branch[-1]
    last = last_layer(graph, renamed[branch_end], {c.name for c in copies})
    if last is None:
        raise fail("its branch does not end in a layer whose parameters can make it zero")
    values, record = _copied_values(network, graph, template, copies, prefix, seed), Record("insert-block")
    zeroed_node, roles = last
    for name in list(values):
        node, _, role = name.partition(".")
        if node == zeroed_node and role in roles:
            values[name] = torch.zeros_like(values[name])
            record.origins[name] = Origin.new("zeros")
        else:
            source = f"{name[len(prefix) + 1:]}"
            record.origins[name] = Origin.carried(source) if source in network.state() and \
                network.state()[source].shape == values[name].shape else Origin.new("default")
    record.notes.append(f"inserted a copy of block '{template.output}' after '{after}' ({len(copies)} nodes), "
                        f"'{zeroed_node}' ({', '.join(roles)}) zero")
    return rebuild(network, graph, record, values), record


def _copied_values(network: Network, graph: LayerGraph, template: Block, copies: list[Node], prefix: str,
                   seed: int) -> dict[str, torch.Tensor]:
    """State entries of the copied nodes: the template's where shapes agree, else fresh."""
    old = network.module.state_dict()
    names = {c.name for c in copies}
    fresh = build_modules(graph, skip=[n for n in graph.names() if n not in names])
    initialize(graph, fresh, seed)
    values = {}
    for name, module in fresh.items():
        for key, tensor in module.state_dict().items():
            source = old.get(f"{name[len(prefix) + 1:]}.{key}")
            # fresh tensors are built on the CPU; rebuild places them on the network's device and dtype
            values[f"{name}.{key}"] = (source.detach().clone() if source is not None and source.shape == tensor.shape
                                       else tensor)
    return values
