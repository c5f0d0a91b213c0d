"""prune: remove units of a coupled group (the same groups ``widen`` grows) or whole layers that
are close to the identity (an inserted layer that stayed near W = I, a residual block whose
branch is near zero). Exact where what is removed has no effect; otherwise the record carries
the measured change."""
from __future__ import annotations

import torch

from graphgrow import GraphgrowError, LayerGraph, Network, get_op

from .record import Record, function_change, gc_paused, rebuild
from .units import StateView, UnitCoupling, UnitMap, keep_units, set_units, trace_units, unit_entries
from .widen import apply_maps

CRITERIA = ("magnitude", "sensitivity")


def unit_scores(network: Network, coupling: UnitCoupling, criterion: str = "magnitude",
                gradients: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per unit of the group, how much it matters: ``magnitude``, the norm of its outgoing
    weights (every consumer column of it, every copy); ``sensitivity``, the first-order change
    of the loss when they are set to zero, |sum of gradient * weight| over the same entries
    (``gradients``: {parameter name: loss gradient}). A unit with zero outgoing weights scores 0
    under both, and removing it is exact."""
    if criterion not in CRITERIA:
        raise GraphgrowError(f"unknown pruning criterion {criterion!r}", hint=f"one of {', '.join(CRITERIA)}")
    if criterion == "sensitivity" and gradients is None:
        raise GraphgrowError("pruning by sensitivity needs the loss gradients",
                             hint="pass gradients={name: grad} (e.g. from one backward pass) or use magnitude")
    state = StateView(network.module)
    score = torch.zeros(coupling.units, dtype=torch.float64, device=network.device)
    for axis in coupling.on("columns"):
        weight = unit_entries(state[axis.tensor].detach().double(), axis, coupling.units)
        if criterion == "magnitude":
            score += weight.pow(2).sum(1)
        else:
            grad = unit_entries(gradients[axis.tensor].detach().double(), axis, coupling.units)
            score += (grad * weight).sum(1)
    # planning data live on the CPU (a pass's maps are planned there)
    return (score.sqrt() if criterion == "magnitude" else score.abs()).cpu()


def _choose(scores: torch.Tensor, count: int, tolerance: float | None, fail) -> list[int]:
    if tolerance is not None:
        chosen = [int(i) for i in torch.nonzero(scores <= tolerance).flatten()]
    else:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise fail(f"prune count {count!r}: expected a positive number")
        chosen = [int(i) for i in scores.argsort(stable=True)[:count]]
    return sorted(chosen)


# -- identity-like layers --------------------------------------------------------------------------

def identity_distances(graph: LayerGraph, state) -> dict[str, tuple[float, list[str], str]]:
    """Layers whose removal leaves the function (nearly) unchanged, by first node: (distance to
    the identity, the nodes to remove, the node whose readers then read their input).
    Residual blocks: |h| ||W2|| (two_weight) or |h| (||W|| + ||sigma(b)||) (one_weight); a
    linear/conv2d of unchanged shape followed by the idempotent activation that also precedes
    it (what insert-identity inserts): ||W - I|| + ||b|| (Dirac kernel for convolutions)."""
    found = {}
    for node in graph.nodes:
        param = lambda role: state[f"{node.name}.{role}"].detach().double()
        if node.op == "residual":
            h = abs(node.args["h"])
            if node.args["form"] == "two_weight":
                distance = h * float(param("outer.weight").norm())
            else:
                act_op = get_op(node.args["activation"])
                act, kwargs = act_op.function(act_op.check_args({}))  # as the block builds it
                bias = act(param("inner.bias"), **kwargs) if node.args["bias"] else torch.zeros(1)
                distance = h * (float(param("inner.weight").norm()) + float(bias.norm()))
            found[node.name] = (distance, [node.name], node.inputs[0])
            continue
        readers = graph.consumers(node.name)
        source = node.inputs[0]
        if (node.opdef.width_arg is None or source == "input" or len(readers) != 1 or node.name in graph.outputs
                or node.in_shapes[0] != node.out_shape):
            continue
        act, before = graph.node(readers[0]), graph.node(source)
        if not (act.opdef.idempotent and act.op == before.op and act.args == before.args):
            continue
        identity = node.opdef.identity_params(node.args, node.in_shapes)
        if identity is None:
            continue
        distance = sum(float((param(role) - value.double()).norm()) for role, value in identity.items())
        found[node.name] = (distance, [node.name, act.name], source)
    return found


def _remove_layer(graph: LayerGraph, nodes: list[str], source: str) -> None:
    last = nodes[-1]
    for reader in graph.consumers(last):
        graph.set_inputs(reader, [source if i == last else i for i in graph.node(reader).inputs])
    graph.outputs = [source if o == last else o for o in graph.outputs]
    for name in reversed(nodes):
        graph.remove(name)


# -- the pass ------------------------------------------------------------------------------------------

@gc_paused()
def prune(network: Network, layer: str | None = None, count: int = 1, units: list[int] | None = None,
          tolerance: float | None = None, criterion: str = "magnitude", layers: bool = False,
          gradients: dict | None = None, probe_seed: int = 0, measure: bool = True) -> tuple[Network, Record]:
    """Remove units or identity-like layers; ``record.change`` is the measured change of the
    function (float64 probe batch, eval mode), 0 where what was removed had no effect
    (``measure=False`` skips the measurement, which costs two float64 forward passes and builds).

    Units (``layers=False``): of the coupled group of ``layer``, the given ``units``, or those
    scoring at most ``tolerance``, or the ``count`` lowest by ``criterion`` (``unit_scores``).
    Layers (``layers=True``): those of ``identity_distances`` at most ``tolerance`` from the
    identity, or the ``count`` closest (only ``layer`` where given)."""
    graph = network.graph.copy()
    fail = lambda message, hint=None: GraphgrowError(message, file=graph.source, node=layer, hint=hint)
    record = Record("prune")
    if layers:
        distances = identity_distances(graph, StateView(network.module))
        if layer is not None:
            if layer not in distances:
                raise fail(f"'{layer}' is not an identity-like layer that can be removed",
                           hint=f"candidates: {', '.join(distances) or 'none'}")
            distances = {layer: distances[layer]}
        names = list(distances)
        chosen = _choose(torch.tensor([d for d, _, _ in distances.values()], dtype=torch.float64),
                         count, tolerance, fail)
        for index in chosen:
            _, nodes, source = distances[names[index]]
            _remove_layer(graph, nodes, source)
        record.notes.append(f"removed {', '.join(names[i] for i in chosen) or 'no layer'}")
        new = rebuild(network, graph, record, {})
    else:
        if layer is None:
            raise fail("prune units: name the layer (any layer of the coupled group)")
        coupling = trace_units(graph, layer, StateView(network.module))
        n = coupling.units
        if units is None:
            units = _choose(unit_scores(network, coupling, criterion, gradients), count, tolerance, fail)
        units = sorted(set(units))
        if not all(isinstance(u, int) and 0 <= u < n for u in units):
            raise fail(f"prune units {units}: expected unit indices in [0, {n})")
        if len(units) >= n:
            raise fail(f"pruning {len(units)} of {n} units would leave '{layer}' without units",
                       hint="keep at least one unit; remove the layer instead")
        kept = [u for u in range(n) if u not in units]
        maps = {}
        for axis in coupling.axes:
            maps.setdefault(axis.tensor, []).append(keep_units(axis, n, kept))
        set_units(graph, coupling, n - len(units))
        record.notes.append(f"removed units {units} of {', '.join(coupling.producers)}")
        new = rebuild(network, graph, record, apply_maps(network, maps, record))
    if measure:
        record.change = function_change(network, new, seed=probe_seed)
        record.notes.append(f"max output change on a float64 probe batch: {record.change:.3g}")
    return new, record
