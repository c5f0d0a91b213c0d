"""What a pass did: for every state entry of the new network, where it came from, and the
candidates ``extend_all`` marked. Also the shared step that compiles a rewritten graph."""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from graphgrow import LayerGraph, Network, Node, compile_graph

TensorMap = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Origin:
    """How one new state entry came about: ``carried`` (unchanged copy of ``sources[0]``),
    ``new`` (initialisation named ``init``) or ``derived`` (``value(*source tensors)``).
    ``state`` derives optimizer state tensors of the same shapes (default: ``value``)."""
    kind: str
    sources: tuple[str, ...] = ()
    init: str | None = None
    value: TensorMap | None = None
    state: TensorMap | None = None

    @classmethod
    def carried(cls, source: str) -> "Origin":
        return cls("carried", (source,))

    @classmethod
    def new(cls, init: str) -> "Origin":
        return cls("new", init=init)

    @classmethod
    def derived(cls, sources, value: TensorMap, state: TensorMap | None = None) -> "Origin":
        return cls("derived", tuple(sources), value=value, state=state)

    def describe(self) -> str:
        if self.kind == "new":
            return f"new ({self.init})"
        return f"{self.kind} from {', '.join(self.sources)}"


@dataclass
class CandidateInfo:
    """A candidate of the fully-extended network. ``merit`` maps a parameter name to a list of
    ``(axis, start, stop)``, the slices of its gradient that score the candidate (several where
    a concat holds the units twice), or None for the whole gradient."""
    id: str
    kind: str  # "dense", "conv", "residual" or "neurons"
    position: str  # the node the candidate follows (layers) or widens (neurons)
    nodes: list[str]
    params: list[str]
    merit: dict[str, list[tuple[int, int, int]] | None]
    units: tuple[int, int] | None = None  # neurons: the new unit range [start, stop)


@dataclass
class Record:
    """Provenance of every state entry of a pass's result (see docs/passes.md)."""
    pass_name: str
    origins: dict[str, Origin] = field(default_factory=dict)
    candidates: dict[str, CandidateInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: passes that may change the function (prune) measure it: max abs output difference on a
    #: float64 probe batch (passes.record.function_change); None where the pass is exact by design
    change: float | None = None

    def derive_state(self, name: str, old_tensors: list[torch.Tensor]) -> torch.Tensor:
        """Optimizer state of new parameter ``name`` from the state tensors of its sources."""
        origin = self.origins[name]
        if origin.kind == "carried":
            return old_tensors[0].clone()
        if origin.kind == "new":
            raise ValueError(f"'{name}' is new; its state starts at zero")
        return (origin.state or origin.value)(*old_tensors)

    def then(self, later: "Record") -> "Record":
        """The record of this pass followed by ``later`` (one record for a chain of passes, e.g.
        to carry optimizer state across both at once). Origins of ``later`` that read several
        sources are kept only where each source was carried."""
        chained = Record(f"{self.pass_name},{later.pass_name}", candidates=dict(later.candidates),
                         notes=self.notes + later.notes)
        for name, origin in later.origins.items():
            first = [self.origins.get(source) for source in origin.sources]
            if origin.kind == "new" or any(o is None or o.kind == "new" for o in first):
                chained.origins[name] = origin if origin.kind == "new" else Origin.new("through a new entry")
            elif all(o.kind == "carried" for o in first):
                chained.origins[name] = replace(origin, sources=tuple(o.sources[0] for o in first))
            elif origin.kind == "carried":
                chained.origins[name] = first[0]
            elif len(first) == 1:
                earlier = first[0]
                chained.origins[name] = Origin.derived(
                    earlier.sources, lambda *t, a=earlier.value, b=origin.value: b(a(*t)),
                    lambda *t, a=earlier.state or earlier.value, b=origin.state or origin.value: b(a(*t)))
            else:
                raise ValueError(f"'{name}' derives from several derived entries; chain the passes one by one")
        return chained

    def by_kind(self, kind: str) -> list[str]:
        return [name for name, origin in self.origins.items() if origin.kind == kind]

    def summary(self) -> str:
        changed = [f"  {name}: {o.describe()}" for name, o in self.origins.items() if o.kind != "carried"]
        return "\n".join([f"{self.pass_name}: {len(self.by_kind('carried'))} carried, "
                          f"{len(self.by_kind('new'))} new, {len(self.by_kind('derived'))} derived",
                          *self.notes, *changed])


def clone_module(module: nn.Module, values: dict[str, torch.Tensor] | None = None, prefix: str = "") -> nn.Module:
    """An independent copy of a module with fresh parameter and buffer storage (several times
    cheaper than deepcopy, which dominates rebuilding deep networks). ``values``: state entries
    (by role, e.g. ``inner.weight``) that the copy takes as they are instead of a copy of the
    module's own (new tensors of a pass, possibly of other shapes)."""
    values = values or {}
    take = lambda key, tensor: values[prefix + key] if prefix + key in values else tensor.detach().clone()
    new = type(module).__new__(type(module))
    replaced = ("_parameters", "_buffers", "_modules")
    # straight into __dict__: nn.Module.__setattr__ inspects every value (a quarter of a clone)
    new.__dict__.update({key: value.copy() if isinstance(value, (dict, set, list)) else value
                         for key, value in module.__dict__.items() if key not in replaced})
    new.__dict__["_parameters"] = {key: None if p is None else nn.Parameter(take(key, p), p.requires_grad)
                                   for key, p in module._parameters.items()}
    new.__dict__["_buffers"] = {key: None if b is None else take(key, b) for key, b in module._buffers.items()}
    new.__dict__["_modules"] = {key: None if m is None else clone_module(m, values, f"{prefix}{key}.")
                                for key, m in module._modules.items()}
    return new


def resized_module(module: nn.Module, node, values: dict[str, torch.Tensor]) -> nn.Module | None:
    """A copy of ``module`` (the old module of ``node``, same op, other sizes) that holds
    ``values`` (by role) and copies of its other entries, with the size attributes of
    ``node.opdef.module_sizes``: no construction, initialisation or loading. None where the op
    gives no sizes or an entry's shape does not fit the node (the caller builds afresh)."""
    sizes = node.opdef.module_sizes(node.args, node.in_shapes)
    if sizes is None:
        return None
    new = clone_module(module, values)
    shapes = node.param_shapes()
    if any(tuple(tensor.shape) != tuple(shapes.get(role, tensor.shape))
           for role, tensor in new.named_parameters()):
        return None
    for path, value in sizes.items():
        owner, _, attribute = path.rpartition(".")
        new.get_submodule(owner).__dict__[attribute] = value  # plain int attributes, as nn.Module keeps them
    return new


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector: rebuilding a deep network allocates many small
    objects, and the collections they trigger scan the whole heap (about 40 % of the time at
    1000 layers). Collection resumes afterwards, so nothing is leaked."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _same_code(old: LayerGraph, new: LayerGraph) -> bool:
    """The two graphs compile to the same forward: same nodes in the same order with the same
    ops, inputs and outputs (a width change, e.g. widen and prune)."""
    if old.names() != new.names() or old.outputs != new.outputs:
        return False
    return all(a.op == b.op and a.inputs == b.inputs and a.frozen == b.frozen and a.loc == b.loc
               for a, b in zip(old.nodes, new.nodes))


def rebuild(old: Network, graph: LayerGraph, record: Record,
            values: dict[str, torch.Tensor]) -> Network:
    """Compile ``graph`` with state entries ``values`` (described in ``record`` by the pass)
    and every other entry carried from ``old`` under the same name when its node survives.
    Nodes with unchanged op, arguments and input shapes and no new values get a copy of their
    old module instead of a fresh build and load (most of the cost on deep networks)."""
    with gc_paused():
        return _rebuild(old, graph, record, values)


def _rebuild(old: Network, graph: LayerGraph, record: Record,
             values: dict[str, torch.Tensor]) -> Network:
    same_code = _same_code(old.graph, graph)
    graph.infer_shapes(_edited(old.graph, graph))  # only where the pass edited and downstream
    dtype, device = old.dtype, old.device
    by_node: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in values.items():
        # new values take the device and dtype of the network they join (a pass may plan them on
        # the CPU), in storage of their own: the network trains them, the pass may keep its tensors
        node, _, role = name.partition(".")
        by_node.setdefault(node, {})[role] = tensor.detach().to(
            device, dtype if tensor.is_floating_point() else None, copy=True)
    reused, state = {}, {}
    # the graphs' node tables (name -> {"node": Node}), looked up per node and per state entry
    old_nodes, new_nodes = old.graph.dag._node, graph.dag._node
    for node in graph.nodes:
        if node.name not in old_nodes:
            template = _template(old, node, by_node.get(node.name, {}))
            if template is not None:
                reused[node.name] = template
            continue
        previous = old_nodes[node.name]["node"]
        module = old.module._modules.get(node.name)
        if module is None or previous.op != node.op:
            continue
        if node.name not in by_node and previous.args == node.args and previous.in_shapes == node.in_shapes:
            reused[node.name] = clone_module(module)
        elif _only_sizes_differ(previous, node):
            resized = resized_module(module, node, by_node.get(node.name, {}))
            if resized is not None:
                reused[node.name] = resized
    origins = record.origins
    for name, tensor in old.module.state_dict(keep_vars=True).items():
        node = name.partition(".")[0]
        if name not in values and node in new_nodes:
            if name not in origins:
                origins[name] = Origin.carried(name)
            if node not in reused:
                state[name] = tensor.detach().clone()
    for node, entries in by_node.items():
        if node not in reused:
            state.update({f"{node}.{role}": tensor for role, tensor in entries.items()})
    # origins only for entries that exist (a pass may describe entries of removed nodes)
    kept = set(state) | {name for name in record.origins if name.split(".", 1)[0] in reused}
    record.origins = {name: origin for name, origin in record.origins.items() if name in kept}
    module = compile_graph(graph, state, dtype=dtype, device=device, modules=reused,
                           code_from=old.module if same_code else None)
    # copies keep their old modules' modes; the modules of new nodes take the network's
    mode = old.module.training
    module.__dict__["training"] = mode  # a plain attribute: no nn.Module.__setattr__ checks
    for name, child in module._modules.items():
        if name not in reused or name not in old_nodes:
            child.train(mode)
    return Network(graph, module)


def _edited(old: LayerGraph, new: LayerGraph) -> list[str] | None:
    """The nodes of ``new`` that ``old`` lacks or holds with another op, arguments, inputs or
    initialisation, or that have no shapes yet (the others keep their shapes unless their
    inputs' shapes change); None (all) where the input shape changed."""
    if new.input_shape != old.input_shape or new.input_tokens != old.input_tokens:
        return None
    edited = []
    for node in new.nodes:
        before = old.dag._node.get(node.name)
        before = None if before is None else before["node"]
        if (before is None or node.out_shape is None or node.op != before.op or node.args != before.args
                or node.inputs != before.inputs or node.init != before.init):
            edited.append(node.name)
    return edited


def _template(old: Network, node: Node, values: dict[str, torch.Tensor]) -> nn.Module | None:
    """A module for the new node ``node`` made from a module of ``old`` with the same op and the
    same arguments but for the width (``resized_module``): where the pass gives every entry of
    it (``values``, by role) and that module has no hooks (which belong to its own node)."""
    for previous in old.graph.nodes:
        module = old.module._modules.get(previous.name)
        if (module is None or previous.op != node.op or not _only_sizes_differ(previous, node)
                or [len(s) for s in previous.in_shapes] != [len(s) for s in node.in_shapes]):
            continue  # (the rank may choose the module's class: BatchNorm1d or 2d)
        if set(module.state_dict()) != set(values) or any(
                m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                for m in module.modules()):
            return None
        new = resized_module(module, node, values)
        return None if new is None else new.requires_grad_(True)  # compile_graph freezes frozen nodes
    return None


def _only_sizes_differ(previous: Node, node: Node) -> bool:
    """Same op and module arguments but for the width argument: the modules differ in sizes only."""
    op = node.opdef
    width = op.width_arg
    return ({k: v for k, v in op.module_args(previous.args).items() if k != width}
            == {k: v for k, v in op.module_args(node.args).items() if k != width})


def function_change(old: Network, new: Network, probe_batch: int = 8, seed: int = 0) -> float:
    """Max abs difference of the two networks' outputs on a float64 normal probe batch drawn
    from ``seed``, both in eval mode (copies in float64; the networks are left as they are)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((probe_batch, *old.graph.input_shape), generator=generator, dtype=torch.float64)
    outputs = []
    for network in (old, new):
        module = Network.build(network.graph.copy(), {k: v.double() if v.is_floating_point() else v
                                                      for k, v in network.state().items()},
                               dtype=torch.float64).module.eval()
        with torch.no_grad():
            out = module(x)
        outputs.append(out if isinstance(out, tuple) else (out,))
    return max(float((a - b).abs().max()) for a, b in zip(*outputs))
