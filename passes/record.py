"""What a pass did: for every state entry of the new network, where it came from, and the
candidates ``extend_all`` marked. Also the shared step that compiles a rewritten graph."""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from graphgrow import LayerGraph, Network, compile_graph

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
    """A candidate of the fully-extended network. ``merit`` maps a parameter name to
    ``(axis, start, stop)``, the slice of its gradient that scores the candidate, or None for
    the whole gradient."""
    id: str
    kind: str  # "dense", "conv", "residual" or "neurons"
    position: str  # the node the candidate follows (layers) or widens (neurons)
    nodes: list[str]
    params: list[str]
    merit: dict[str, tuple[int, int, int] | None]
    units: tuple[int, int] | None = None  # neurons: the new unit range [start, stop)


@dataclass
class Record:
    """Provenance of every state entry of a pass's result (see docs/passes.md)."""
    pass_name: str
    origins: dict[str, Origin] = field(default_factory=dict)
    candidates: dict[str, CandidateInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def derive_state(self, name: str, old_tensors: list[torch.Tensor]) -> torch.Tensor:
        """Optimizer state of new parameter ``name`` from the state tensors of its sources."""
        origin = self.origins[name]
        if origin.kind == "carried":
            return old_tensors[0].clone()
        if origin.kind == "new":
            raise ValueError(f"'{name}' is new; its state starts at zero")
        return (origin.state or origin.value)(*old_tensors)

    def by_kind(self, kind: str) -> list[str]:
        return [name for name, origin in self.origins.items() if origin.kind == kind]

    def summary(self) -> str:
        changed = [f"  {name}: {o.describe()}" for name, o in self.origins.items() if o.kind != "carried"]
        return "\n".join([f"{self.pass_name}: {len(self.by_kind('carried'))} carried, "
                          f"{len(self.by_kind('new'))} new, {len(self.by_kind('derived'))} derived",
                          *self.notes, *changed])


def clone_module(module: nn.Module) -> nn.Module:
    """An independent copy of a module with fresh parameter and buffer storage (several times
    cheaper than deepcopy, which dominates rebuilding deep networks)."""
    new = type(module).__new__(type(module))
    replaced = ("_parameters", "_buffers", "_modules")
    new.__dict__.update({key: value.copy() if isinstance(value, (dict, set, list)) else value
                         for key, value in module.__dict__.items() if key not in replaced})
    new._parameters = {key: None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad)
                       for key, p in module._parameters.items()}
    new._buffers = {key: None if b is None else b.clone() for key, b in module._buffers.items()}
    new._modules = {key: None if m is None else clone_module(m) for key, m in module._modules.items()}
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
    graph.infer_shapes()
    dtype, device = old.dtype, old.device
    changed = {name.split(".", 1)[0] for name in values}
    reused, state = {}, {}
    for node in graph.nodes:
        if node.name in changed or node.name not in old.graph:
            continue
        previous = old.graph.node(node.name)
        if previous.op == node.op and previous.args == node.args and previous.in_shapes == node.in_shapes:
            module = getattr(old.module, node.name, None)
            if module is not None:
                reused[node.name] = clone_module(module)
    for name, tensor in old.module.state_dict().items():
        node = name.split(".", 1)[0]
        if name not in values and node in graph:
            record.origins.setdefault(name, Origin.carried(name))
            if node not in reused:
                state[name] = tensor.detach().clone()
    for name, tensor in values.items():
        # new values take the device and dtype of the network they join (a pass may plan them on the CPU)
        state[name] = tensor.detach().to(device, dtype if tensor.is_floating_point() else None)
    # origins only for entries that exist (a pass may describe entries of removed nodes)
    kept = set(state) | {name for name in record.origins if name.split(".", 1)[0] in reused}
    record.origins = {name: origin for name, origin in record.origins.items() if name in kept}
    module = compile_graph(graph, state, dtype=dtype, device=device, modules=reused)
    module.train(old.module.training)
    return Network(graph, module)
