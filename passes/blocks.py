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


@dataclass
class BlockPlan:
    """A copy of the block ``template`` to go after node ``after``: its nodes in order (the
    branch, the add, which reads ``after`` as its shortcut, and the trailing activation, if
    any), their state entries by full name (the zeroed last layer's roles zero) and the graph
    with the copy wired in. ``merit_param``: the zeroed layer's first role, whose gradient is
    the candidate's merit."""
    template: Block
    after: str
    nodes: list[Node]
    values: dict[str, torch.Tensor]
    zeroed: tuple[str, tuple[str, ...]]
    graph: LayerGraph

    @property
    def merit_param(self) -> str:
        return f"{self.zeroed[0]}.{self.zeroed[1][0]}"

    @property
    def trailing_ops(self) -> tuple[str, ...]:
        """The copy's activation after the add (relu for a ResNet block), or nothing."""
        return (self.nodes[-1].op,) if self.template.output != self.template.add else ()

    def trailing(self, value: torch.Tensor) -> torch.Tensor:
        """The copy's trailing activation applied to ``value`` (at the identity, the values of
        ``after``, which it gives back)."""
        node = self.nodes[-1]
        fn, kwargs = node.opdef.function(node.args)
        return fn(value, **kwargs)

    def branch_network(self, dtype: torch.dtype, device) -> Network:
        """The copy's branch alone, reading ``after``'s values as its input (eval mode)."""
        branch = LayerGraph(f"{self.template.output}_branch", self.graph.shape_of(self.after))
        end = self.nodes[len(self.template.branch) - 1].name
        for node in self.nodes[:len(self.template.branch)]:
            branch.add(Node(node.name, node.op, dict(node.args), [INPUT if i == self.after else i for i in node.inputs],
                            node.init, node.frozen, node.loc))
        branch.outputs = [end]
        branch.infer_shapes()
        inside = {n.name for n in branch.nodes}
        state = {k: v for k, v in self.values.items() if k.split(".", 1)[0] in inside}
        network = Network.build(branch, state, dtype=dtype, device=device)
        network.module.eval()  # as the sensitivity pass runs the network: batch norm with its running statistics
        return network

    def merit_gradient(self, branch: Network, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss with respect to ``merit_param`` (summed over the batch) with the
        copy inserted after a node whose output is ``x``: the copy computes the identity, so
        ``grad``, the loss gradient at its add, is the gradient at its branch's output."""
        weight = branch.module.get_parameter(self.merit_param)
        with torch.enable_grad():  # called from a backward hook, where autograd records nothing
            out = branch.module(x)
            # a branch that gives every sample the same values (a batch of one: a position
            # embedding) is broadcast over the batch where it is added: its gradient is the sum
            return torch.autograd.grad(out, weight, grad.sum_to_size(out.shape))[0]

    def forward_flops(self) -> int:
        return sum(self.graph.node(n.name).flops() for n in self.nodes)

    def merit_gradient_flops(self) -> int:
        """The branch forward, and backward to its last layer (input gradients of every node,
        an upper bound), per sample."""
        return sum(node.flops() + node.opdef.input_gradient_flops(node.args, node.in_shapes, node.out_shape)
                   for node in (self.graph.node(n.name) for n in self.nodes[:len(self.template.branch)]))


def plan_block(network: Network, block: str, after: str | None = None, seed: int = 0) -> BlockPlan:
    """Plan a copy of the residual block ending at ``block`` after node ``after`` (default:
    the block's output): see ``insert_block``."""
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
    last = last_layer(graph, renamed[template.branch[-1]], {c.name for c in copies})
    if last is None:
        raise fail("its branch does not end in a layer whose parameters can make it zero")
    values = _copied_values(network, graph, template, copies, prefix, seed)
    zeroed_node, roles = last
    for name in values:
        node, _, role = name.partition(".")
        if node == zeroed_node and role in roles:
            values[name] = torch.zeros_like(values[name])
    return BlockPlan(template, after, copies, values, last, graph)


def block_at(graph: LayerGraph, boundary: str) -> Block:
    """The block whose copy goes at a block boundary: the block that ends there, else the
    identity-shortcut block that starts there."""
    blocks = find_blocks(graph)
    return next(b for b in blocks if b.output == boundary or (b.entry == boundary and not b.shortcut))


def block_candidates(network: Network) -> dict[str, BlockPlan]:
    """SensLI's block candidates by id (``block:<after>``): at every block boundary a copy of
    ``block_at`` that boundary with its last layer zero."""
    return {f"block:{after}": plan_block(network, block_at(network.graph, after).output, after)
            for after in block_boundaries(network.graph)}


@gc_paused()
def insert_block(network: Network, block: str, after: str | None = None, seed: int = 0) -> tuple[Network, Record]:
    """Insert after node ``after`` (default: the block's output) a copy of the residual block
    ending at ``block``, with an identity shortcut and the last layer of its branch zero: the
    function is unchanged, the zeroed layer's gradient is not. Weights are copied from the
    block where their shapes agree (strides become 1: the copy keeps the shape), else drawn
    from ``seed``."""
    plan = plan_block(network, block, after, seed)
    record = Record("insert-block")
    zeroed_node, roles = plan.zeroed
    prefix_length = len(plan.nodes[0].name) - len(plan.template.branch[0])
    old = network.state()
    for name, value in plan.values.items():
        node, _, role = name.partition(".")
        source = name[prefix_length:]
        if node == zeroed_node and role in roles:
            record.origins[name] = Origin.new("zeros")
        else:
            record.origins[name] = Origin.carried(source) if source in old and \
                old[source].shape == value.shape else Origin.new("default")
    record.notes.append(f"inserted a copy of block '{plan.template.output}' after '{plan.after}' ({len(plan.nodes)} "
                        f"nodes), '{zeroed_node}' ({', '.join(roles)}) zero")
    return rebuild(network, plan.graph, record, dict(plan.values)), record


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
