"""Widening by neurons (thesis 4.4): candidates with zero outgoing weights, criterion (4.20)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..compiler.network import Network, compile_graph
from ..errors import GraphgrowError
from ..runtime.splits import as_splits, loss_fn
from .sensitivity import full_data_gradients

# -- widening (4.4): neuron candidates with zero outgoing weights, criterion (4.20) --------------

def widening_positions(graph) -> list[str]:
    """Linear layers that can be widened without changing the function: ``L -> activation ->
    M`` with L's output read only by the activation and the activation's only by the linear M."""
    found = []
    for node in graph.nodes:
        if node.op != "linear" or node.name in graph.outputs:
            continue
        readers = graph.consumers(node.name)
        if len(readers) != 1 or not graph.node(readers[0]).opdef.elementwise or readers[0] in graph.outputs:
            continue
        after = graph.consumers(readers[0])
        if len(after) == 1 and graph.node(after[0]).op == "linear" and len(node.out_shape) == 1:
            found.append(node.name)
    return found


def _next_linear(graph, name: str) -> str:
    return graph.consumers(graph.consumers(name)[0])[0]


def widen_layers(network, new_rows: dict[str, torch.Tensor]):
    """The network with layer L widened by the rows ``new_rows[L]`` (k, fan_in) of incoming
    weights, zero biases and zero outgoing weights (4.19): the function is unchanged. Old
    parameters keep their names and sit in the leading rows/columns."""
    graph = network.graph.copy()
    for name, rows in new_rows.items():
        graph.node(name).args["out"] += rows.shape[0]
    graph.infer_shapes()
    module = compile_graph(graph, seed=0, dtype=network.dtype, device=network.device)
    state = {k: torch.zeros_like(v) for k, v in module.state_dict().items()}
    for key, old in network.state().items():
        state[key][tuple(slice(0, s) for s in old.shape)] = old
    for name, rows in new_rows.items():
        width = network.graph.node(name).out_shape[0]
        weight = state[f"{name}.weight"]
        # columns past the old fan-in belong to neurons added upstream; their weights stay zero
        weight[width:, :rows.shape[1]] = rows.to(weight)
    module.load_state_dict(state)
    return Network(graph, module)


@dataclass
class NeuronCandidate:
    layer: str
    index: int
    merit: float

    def to_json(self) -> dict:
        return asdict(self)


def neuron_sensitivities(network, data, *, per_layer: int = 8, loss: str = "cross_entropy",
                         batch: int | None = 256, seed: int = 0, data_parallel=None):
    """Widening candidates (4.19): ``per_layer`` new neurons per widenable layer with seeded
    incoming weights (normal, std 1/sqrt(fan_in)), zero bias and zero outgoing weights. Merit
    of a neuron: ||gradient of its outgoing weight column||^2; reference for (4.20): the mean of
    that quantity over the existing columns of the outgoing weight matrices. Returns
    (candidates, reference, rows) where rows[layer] are the candidate incoming weights.
    ``data_parallel``: each process takes its part of the samples; the gradients are summed over
    the processes before the merits are taken."""
    layers = widening_positions(network.graph)
    if not layers:
        raise GraphgrowError(f"network '{network.graph.name}' has no layer that can be widened",
                             hint="widening needs linear -> activation -> linear")
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for name in layers:
        fan_in = network.graph.node(name).in_shapes[0][-1]
        rows[name] = torch.randn(per_layer, fan_in, generator=generator) / math.sqrt(fan_in)
    wide = widen_layers(network, rows)
    split, _ = as_splits(data, network.dtype)
    outgoing = {name: f"{_next_linear(network.graph, name)}.weight" for name in layers}
    x, y, total = split.x, split.y, len(split)
    if data_parallel is not None:
        part = data_parallel.part(total)
        x, y = x[part], y[part]
    grads, _ = full_data_gradients(wide.module, x, y, loss_fn(loss), list(outgoing.values()), batch=batch, total=total)
    if data_parallel is not None:
        grads = dict(zip(grads, data_parallel.sum(list(grads.values()))))
    candidates, existing = [], []
    for name in layers:
        width = network.graph.node(name).out_shape[0]
        column_merits = grads[outgoing[name]].double().pow(2).sum(dim=0)
        existing.extend(column_merits[:width].tolist())
        candidates += [NeuronCandidate(name, k, float(column_merits[width + k])) for k in range(per_layer)]
    return candidates, sum(existing) / len(existing), rows


def widen_best(network, data, *, count: int = 1, tau: float | None = None, per_layer: int = 8,
               loss: str = "cross_entropy", batch: int | None = 256, seed: int = 0, data_parallel=None):
    """Add the ``count`` best neuron candidates (those passing 4.20 when ``tau`` is given);
    returns (network, chosen candidates, reference). ``data_parallel``: see neuron_sensitivities."""
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.20), got {tau}", option="tau")
    candidates, reference, rows = neuron_sensitivities(network, data, per_layer=per_layer, loss=loss,
                                                       batch=batch, seed=seed, data_parallel=data_parallel)
    ranked = sorted(candidates, key=lambda c: c.merit, reverse=True)
    if tau is not None:
        ranked = [c for c in ranked if c.merit >= tau * reference]
    chosen = ranked[:count]
    keep: dict[str, list[int]] = {}
    for candidate in chosen:
        keep.setdefault(candidate.layer, []).append(candidate.index)
    if not keep:
        return network, [], reference
    return widen_layers(network, {name: rows[name][sorted(idx)] for name, idx in keep.items()}), chosen, reference
