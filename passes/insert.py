"""insert_identity: a layer that computes the identity on the current network (thesis 4.3.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphgrow import GraphgrowError, LayerGraph, Network, Node, get_op
from graphgrow.ops.base import identity_init, identity_values

from .record import Origin, Record, gc_paused, rebuild

FORMS = ("auto", "dense", "conv", "residual")


@dataclass
class IdentityPlan:
    """The nodes of one identity layer after ``after``, their parameter values by full name,
    the candidate kind and the parameter whose gradient is the merit (4.16)."""
    after: str
    kind: str
    nodes: list[Node]
    values: dict[str, torch.Tensor]
    merit_param: str
    #: the record's name of each value's initialisation (by full name): zeros or a multiple of
    #: the identity, as the op's ``identity_roles`` give them
    inits: dict[str, str]

    def origins(self) -> dict[str, Origin]:
        """The record's origins of the plan's values: new, with their initialisation's name."""
        return {name: Origin.new(init) for name, init in self.inits.items()}

    @property
    def merit_role(self) -> str:
        return self.merit_param[len(self.nodes[0].name) + 1:]

    def _roles(self, node: Node) -> dict[str, torch.Tensor]:
        prefix = f"{node.name}."
        return {name[len(prefix):]: t for name, t in self.values.items() if name.startswith(prefix)}

    def trailing(self, value: torch.Tensor) -> torch.Tensor:
        """The plan's nodes after the first (the activation after a dense/conv layer) applied to
        ``value``, the first node's output. At the identity that output is the input ``a`` of
        the layer and the trailing nodes give back ``a`` (idempotent activation)."""
        for node in self.nodes[1:]:
            fn, kwargs = node.opdef.function(node.args)
            value = fn(value, **kwargs)
        return value

    def merit_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss with respect to ``merit_param`` (summed over the batch) with the
        plan inserted after a node whose output is ``x`` and every parameter at its initial
        value: the layer computes the identity, so its first node's input is ``x``, and
        ``grad`` is the loss gradient at that node's output (at the position ``g`` times the
        trailing activation's derivative; for a residual block ``g`` itself). The first node's
        op has the rule (OpDef.parameter_gradients)."""
        head = self.nodes[0]
        params = {role: t.to(x) for role, t in self._roles(head).items()}
        return head.opdef.parameter_gradients(head.args, params, x, grad, (self.merit_role,))[self.merit_role]

    def forward_flops(self, shape) -> int:
        """Forward FLOPs per sample of the plan's nodes on inputs of ``shape`` (the layer keeps it)."""
        return sum(node.opdef.flops(node.args, [tuple(shape)], tuple(shape)) for node in self.nodes)

    def merit_gradient_flops(self, shape) -> int:
        """FLOPs per sample of ``merit_gradient`` on inputs of ``shape``, with the trailing nodes
        run forward and backward to give its ``grad``."""
        shape = tuple(shape)
        trailing = sum(node.opdef.flops(node.args, [shape], shape)
                       + node.opdef.input_gradient_flops(node.args, [shape], shape) for node in self.nodes[1:])
        head = self.nodes[0]
        return trailing + head.opdef.parameter_gradient_flops(head.args, [shape], shape, (self.merit_role,))


def _identity_plan(after: str, kind: str, nodes: list[Node], opdef, args: dict, shape, roles: dict[str, float],
                   merit_role: str) -> IdentityPlan:
    """The plan whose first node (of ``opdef`` with ``args``, on inputs of ``shape``) holds the
    identity of ``roles`` (``OpDef.identity_roles``), named for the record from the roles rather
    than read back from the tensors."""
    base, shapes = nodes[0].name, opdef.param_shapes(args, [shape])
    values = {f"{base}.{role}": tensor for role, tensor in identity_values(shapes, roles).items()}
    inits = {f"{base}.{role}": identity_init(role_shape, roles.get(role, 0.0)) for role, role_shape in shapes.items()}
    return IdentityPlan(after, kind, nodes, values, f"{base}.{merit_role}", inits)


def _adjacent_residual(graph: LayerGraph, after: str) -> Node | None:
    if after in graph and graph.node(after).op == "residual":
        return graph.node(after)
    return next((graph.node(r) for r in graph.consumers(after) if graph.node(r).op == "residual"), None)


def _refuse(graph: LayerGraph, after: str, why: str) -> GraphgrowError:
    return GraphgrowError(f"no identity initialisation after '{after}': {why}", file=graph.source, node=after,
                          hint=f"insert a residual block instead (insert-identity{{after={after},form=residual}}): "
                               "with W2 = 0 it is the identity for any activation")


def plan_identity(graph: LayerGraph, after: str, form: str = "auto", activation: str | None = None,
                  c: float = 1.0, name: str | None = None) -> IdentityPlan:
    """Choose and initialise the identity layer for position ``after`` (a node or 'input')."""
    if form == "batchnorm":
        raise GraphgrowError("batchnorm has no identity initialisation in train mode (it normalises "
                             "with batch statistics)", file=graph.source, node=after,
                             hint="insert a residual block (form=residual) instead")
    if form not in FORMS:
        raise GraphgrowError(f"unknown form {form!r} for insert-identity", file=graph.source, node=after,
                             hint=f"forms: {', '.join(FORMS)}")
    shape = graph.shape_of(after) if after == "input" else graph.node(after).out_shape
    source_op = None if after == "input" else graph.node(after).opdef
    template = _adjacent_residual(graph, after)
    if form == "auto":  # next to a residual block: another block; else a layer + activation
        form = ("residual" if template is not None else
                "dense" if len(shape) == 1 else "conv" if len(shape) == 3 else "unsupported")
    base = name or graph.unique_name(f"{after}_id")
    if form == "residual":
        if len(shape) not in (1, 3):
            raise GraphgrowError(f"a residual block needs a vector or an image, '{after}' has shape {list(shape)}",
                                 file=graph.source, node=after)
        args = dict(template.args) if template is not None else {}
        args["branch"] = "conv2d" if len(shape) == 3 else "linear"
        if activation is not None:
            args["activation"] = activation
        opdef = get_op("residual")
        args = opdef.check_args(args)
        layer = Node(base, "residual", args, [after])
        roles = opdef.identity_roles(args, [shape], scale=c)
        if roles is None:
            raise GraphgrowError(f"a one-weight residual block with activation '{args['activation']}' "
                                 "is not the identity for any parameters (sigma(0) != 0)",
                                 file=graph.source, node=after, hint="use form: two_weight")
        merit = "outer.weight" if args["form"] == "two_weight" else "inner.weight"
        return _identity_plan(after, "residual", [layer], opdef, args, shape, roles, merit)
    if source_op is None or not source_op.idempotent:
        what = "the network input" if source_op is None else f"op '{source_op.name}'"
        raise _refuse(graph, after, f"{what} is not an idempotent activation such as relu, so a "
                                    f"layer W = I followed by an activation would change the function")
    if form == "dense" and len(shape) != 1 or form == "conv" and len(shape) != 3 or form == "unsupported":
        raise _refuse(graph, after, f"a {form} layer does not fit shape {list(shape)}")
    op = "linear" if form == "dense" else "conv2d"
    args = get_op(op).check_args({"out": shape[0]} if op == "linear" else {"out": shape[0], "kernel": 3})
    layer = Node(base, op, args, [after])
    act = Node(graph.unique_name(f"{base}_act"), source_op.name, dict(graph.node(after).args), [base])
    roles = get_op(op).identity_roles(args, [shape], scale=c)
    return _identity_plan(after, form, [layer, act], get_op(op), args, shape, roles, "weight")


def apply_plan(graph: LayerGraph, plan: IdentityPlan) -> None:
    """Wire the plan's nodes in after ``plan.after``: its readers and outputs read the last one."""
    readers = graph.consumers(plan.after)
    previous = plan.after
    for node in plan.nodes:
        graph.add(node, after=previous)
        previous = node.name
    for reader in readers:
        graph.set_inputs(reader, [previous if i == plan.after else i for i in graph.node(reader).inputs])
    graph.outputs = [previous if o == plan.after else o for o in graph.outputs]


@gc_paused()
def insert_identity(network: Network, after: str, form: str = "auto", activation: str | None = None,
                    c: float = 1.0) -> tuple[Network, Record]:
    """Insert a layer computing the identity right after node ``after`` (thesis 4.11, 4.13,
    4.15): linear/conv2d + the same activation after an idempotent activation (relu), or a
    residual block with W2 = 0, W1 = c I anywhere (``form="residual"``)."""
    graph = network.graph.copy()
    if after != "input":
        graph.node(after)  # unknown node: a GraphgrowError with a did-you-mean hint
    plan = plan_identity(graph, after, form, activation, c)
    apply_plan(graph, plan)
    record = Record("insert-identity", notes=[f"inserted {', '.join(n.name for n in plan.nodes)} after "
                                             f"{after} ({plan.kind})"])
    record.origins.update(plan.origins())
    return rebuild(network, graph, record, plan.values), record
