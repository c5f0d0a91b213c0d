"""extend_all: the SensLI fully-extended network (identity candidates everywhere, thesis 4.16)
and keep_candidates, its inverse step that keeps a chosen subset."""
from __future__ import annotations

import torch

from graphgrow import GraphgrowError, LayerGraph, Network

from .insert import IdentityPlan, apply_plan, plan_identity
from .record import CandidateInfo, Record, gc_paused, rebuild
from .units import UnitMap, keep_units, set_units, trace_units
from .widen import apply_maps, plan_widen

KINDS = ("layers", "neurons")


def legal_positions(graph: LayerGraph) -> list[str]:
    """Nodes after which an identity layer can go: every idempotent activation on a vector or
    an image, and the input and output of every residual block; network outputs excluded."""
    positions: list[str] = []
    for node in graph.nodes:
        if node.opdef.idempotent and len(node.out_shape) in (1, 3):
            positions.append(node.name)
        if node.op == "residual":
            positions.extend(node.inputs[:1] + [node.name])
    seen: set[str] = set()
    return [p for p in positions if p not in graph.outputs and not (p in seen or seen.add(p))]


def plan_candidates(graph: LayerGraph, activation: str | None = None, c: float = 1.0) -> dict[str, IdentityPlan]:
    """The layer candidates of ``extend_all(network, "layers")`` by candidate id (``layer:<after>``):
    the same identity plans (nodes, names, initial values, merit parameter), planned on ``graph``
    without changing or copying it (SensLI computes their merits on the network as it is)."""
    return {f"layer:{after}": plan_identity(graph, after, "auto", activation, c) for after in legal_positions(graph)}


@gc_paused()
def extend_all(network: Network, candidates: str = "layers", neurons: int = 1, activation: str | None = None,
               c: float = 1.0, scale: float = 0.1, seed: int = 0) -> tuple[Network, Record]:
    """The fully-extended network: with ``candidates="layers"`` an identity layer at every legal
    position (4.11, 4.13, 4.15); with ``"neurons"``, ``neurons`` sensli units on every widenable
    layer (4.19). ``record.candidates`` marks each candidate's parameters and merit slices."""
    if candidates not in KINDS:
        raise GraphgrowError(f"unknown candidate kind {candidates!r}", hint=f"kinds: {', '.join(KINDS)}")
    graph = network.graph.copy()
    record = Record("extend-all")
    if candidates == "layers":
        values = {}
        for after in legal_positions(network.graph):
            plan = plan_identity(graph, after, "auto", activation, c)
            apply_plan(graph, plan)
            record.origins.update(plan.origins())
            values.update(plan.values)
            record.candidates[f"layer:{after}"] = CandidateInfo(
                f"layer:{after}", plan.kind, after, [n.name for n in plan.nodes], list(plan.values),
                {plan.merit_param: None})
        record.notes.append(f"{len(record.candidates)} layer candidates")
        return rebuild(network, graph, record, values), record
    generator = torch.Generator().manual_seed(seed)
    state_names = network.module.state_dict()
    maps: dict[str, list[UnitMap]] = {}
    layers = widenable(network.graph)
    widths = {}
    for layer in layers:  # each group traced on the graph the groups before it have widened
        coupling = trace_units(graph, layer, state_names)
        widths[layer] = coupling.units
        plan_widen(graph, coupling, neurons, "sensli", scale=scale, alpha=0.5, units=None,
                   generator=generator, maps=maps)
        graph.infer_shapes()
    for layer in layers:  # merit slices where the new units sit in the final network
        coupling, n = trace_units(graph, layer, state_names), widths[layer]
        merit = {axis.tensor: [(axis.axis, (others + k * (n + neurons) + n) * axis.block,
                                (others + (k + 1) * (n + neurons)) * axis.block)
                               for k, others in enumerate(axis.before)]
                 for axis in coupling.on("columns")}
        own = [axis.tensor for axis in coupling.on("rows")]
        record.candidates[f"neurons:{layer}"] = CandidateInfo(
            f"neurons:{layer}", "neurons", layer, [], own + list(merit), merit, (n, n + neurons))
    record.notes.append(f"{len(record.candidates)} neuron candidates of {neurons} unit(s) each")
    return rebuild(network, graph, record, apply_maps(network, maps, record)), record


def widenable(graph: LayerGraph) -> list[str]:
    """One layer per coupled group that ``widen`` accepts, the group's first producing layer
    (widening any layer of a group widens all of them: residual streams, inputs of an add)."""
    names, covered = [], set()
    for node in graph.nodes:
        if not node.opdef.widens(node.args) or node.name in covered:
            continue
        try:
            coupling = trace_units(graph, node.name, ())
        except GraphgrowError:
            continue
        covered.update(coupling.producers)
        names.append(node.name)
    return names


def head_layers(graph: LayerGraph) -> list[str]:
    """Layers with heads (attention), which ``widen`` grows by heads."""
    return [node.name for node in graph.nodes if node.opdef.head_arg is not None]


def candidate_gradient(grads: dict[str, torch.Tensor], info: CandidateInfo) -> list[torch.Tensor]:
    """The merit slices of a candidate cut out of a {parameter name: gradient} dict."""
    pieces = []
    for name, where in info.merit.items():
        grad = grads[name]
        pieces += [grad] if where is None else [grad.narrow(axis, start, stop - start) for axis, start, stop in where]
    return pieces


@gc_paused()
def keep_candidates(network: Network, record: Record, keep) -> tuple[Network, Record]:
    """The inverse of ``extend_all``: keep the candidate ids in ``keep``, drop the others and
    carry every other parameter exactly."""
    keep = set(keep)
    unknown = keep - set(record.candidates)
    if unknown:
        raise GraphgrowError(f"unknown candidate(s) {sorted(unknown)}",
                             hint=f"candidates: {', '.join(list(record.candidates)[:8])} ...")
    graph = network.graph.copy()
    state_names = network.module.state_dict()
    maps: dict[str, list[UnitMap]] = {}
    dropped = [info for cid, info in record.candidates.items() if cid not in keep]
    for info in dropped:
        if info.kind == "neurons":
            coupling = trace_units(graph, info.position, state_names)
            kept = list(range(info.units[0]))
            for axis in coupling.axes:
                maps.setdefault(axis.tensor, []).append(keep_units(axis, coupling.units, kept))
            set_units(graph, coupling, info.units[0])
            graph.infer_shapes()
            continue
        last = info.nodes[-1]
        for reader in graph.consumers(last):
            graph.set_inputs(reader, [info.position if i == last else i for i in graph.node(reader).inputs])
        graph.outputs = [info.position if o == last else o for o in graph.outputs]
        for name in reversed(info.nodes):
            graph.remove(name)
    result = Record("keep-candidates", {}, {cid: info for cid, info in record.candidates.items() if cid in keep},
                    [f"kept {sorted(keep) or 'no candidates'}, dropped {len(dropped)}"])
    return rebuild(network, graph, result, apply_maps(network, maps, result)), result
