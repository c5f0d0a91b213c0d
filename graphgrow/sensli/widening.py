"""Widening by neurons (thesis 4.4): candidates with zero outgoing weights (4.19), ranked by
criterion (4.20). Incoming weights random or data-driven (GradMax: the top right singular vectors
of the gradient-activation cross term). One candidate group per coupled group of units
(passes.widenable), so residual streams and concat branches take part too."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

import passes
from passes.units import StateView, trace_units, unit_entries

from ..compiler.network import Network
from ..errors import GraphgrowError
from ..runtime.splits import as_splits, loss_fn
from .sensitivity import full_data_gradients

NEURON_INITS = ("random", "gradmax")


@dataclass
class NeuronCandidate:
    """New unit ``index`` (0-based among the candidates) of ``layer``'s group; ``init`` says
    where its incoming weights came from; ``direction`` is the singular vector (gradmax, with
    its sign in the index: candidates 2j and 2j + 1 are +v_j and -v_j) or None (random)."""
    layer: str
    index: int
    merit: float
    init: str = "random"
    direction: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def neuron_positions(graph) -> list[str]:
    """One layer per coupled group of units that can be widened (passes.widenable), then every
    attention layer (its heads are the units: passes.head_layers)."""
    return passes.widenable(graph) + passes.head_layers(graph)


def _incoming_shape(node) -> tuple[int, ...]:
    """The shape of one new unit's incoming weights: a row of the layer's weight (for a head,
    head_dim rows of each of its query, key and value projections: their fan-in)."""
    return tuple(node.param_shapes()["in_proj_weight" if node.opdef.head_arg else "weight"][1:])


def _path_ops(graph, layer: str, consumer: str) -> list:
    """The pass-through nodes from ``layer`` to ``consumer`` (in order), or None where the units
    do not reach it along one chain."""
    path, name = [], graph.node(consumer).inputs[0]
    while name != layer:
        node = graph.node(name)
        if not node.opdef.passes_units_through or len(node.inputs) != 1:
            return None
        path.append(node)
        name = node.inputs[0]
    return path[::-1]


def gradmax_supported(graph, coupling) -> bool:
    """Data-driven candidates need one producing layer of a vector or an image (not tokens, not
    attention heads) whose units reach each consumer along a
    chain of elementwise ops, pooling, flatten and dropout (no per-unit state such as batchnorm,
    no add, residual stream or concat)."""
    return (coupling.producers == [coupling.layer] and not coupling.on("state")
            and len(graph.node(coupling.layer).out_shape) in (1, 3)  # not tokens, not heads
            and all(a.before == (0,) for a in coupling.axes)
            and all(_path_ops(graph, coupling.layer, c) is not None for c in coupling.consumers))


def _basis_activations(node, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for every unit vector e_j of incoming weights (no bias): (N, D, ...)
    with D the fan-in; for a linear layer x itself, for a convolution its unfolded patches."""
    if node.op == "linear":
        return x
    fan_in = x.shape[1] * node.args["kernel"] ** 2
    kernels = torch.eye(fan_in, dtype=x.dtype, device=x.device).reshape(fan_in, x.shape[1], *[node.args["kernel"]] * 2)
    return node.opdef.functional(node.args, {"weight": kernels}, x)


def cross_term(network: Network, layer: str, data, *, loss: str = "cross_entropy",
               batch: int | None = 256, data_parallel=None) -> torch.Tensor:
    """The matrix A (outgoing entries x fan-in) with A w = the loss gradient with respect to the
    outgoing weights of a new unit of ``layer`` with incoming weights w, zero bias and zero
    outgoing weights, for the activation linearised at 0 with slope 1 (sigma(z) ~ z). Then
    ||A w||^2 is criterion (4.20)'s numerator, and it is largest over ||w|| = 1 at the top right
    singular vector of A (GradMax). Rows: every consumer's weight entries of the unit (blocks
    after a flatten, kernel taps of a convolution); the gradient of the mean loss over ``data``.
    ``data_parallel``: each process takes its part of the samples; A is summed over the
    processes (before any SVD), so every process gets the single-process matrix."""
    graph = network.graph
    coupling = trace_units(graph, layer, StateView(network.module))
    if not gradmax_supported(graph, coupling):
        raise GraphgrowError(f"no data-driven neurons for '{layer}': its units pass through batchnorm, "
                             "an add, a residual stream or a concat", file=graph.source, node=layer,
                             hint="use random neurons for this layer")
    split, _ = as_splits(data, network.dtype)
    total = len(split)
    x_all, y_all = split.x, split.y
    if data_parallel is not None:
        part = data_parallel.part(total)
        x_all, y_all = x_all[part], y_all[part]
    weight = 1.0 / total
    if len(x_all) == 0:  # a process without samples still joins the sum: one sample weighted 0 gives the shapes
        x_all, y_all, weight = split.x[:1], split.y[:1], 0.0
    module, node = network.module, graph.node(layer)
    # pooling and flatten act on the basis as they do on the units; activations are linearised
    # (elementwise) and dropout is the identity in eval mode (a module): both are left out
    paths = {c: [op_node.opdef.function(op_node.args) for op_node in _path_ops(graph, layer, c)
                 if not op_node.opdef.elementwise and op_node.opdef.build_module(op_node.args, op_node.in_shapes) is None]
             for c in coupling.consumers}
    captured: dict[str, torch.Tensor] = {}
    hooks = [module.get_submodule(layer).register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("x", args[0].detach()))]
    hooks += [module.get_submodule(c).register_forward_hook(
        lambda _m, _a, out, c=c: captured.__setitem__(c, out)) for c in coupling.consumers]
    was_training = module.training
    module.eval()
    step = len(x_all) if batch is None else batch
    blocks = []
    try:
        sums = {c: None for c in coupling.consumers}
        for start in range(0, len(x_all), step):
            x = x_all[start:start + step].to(network.device)
            y = y_all[start:start + step].to(network.device)
            value = loss_fn(loss)(module(x), y) * (x.shape[0] * weight)
            deltas = torch.autograd.grad(value, [captured[c] for c in coupling.consumers])
            basis = _basis_activations(node, captured["x"])
            for consumer, delta in zip(coupling.consumers, deltas):
                through = basis
                for fn, kwargs in paths[consumer]:
                    through = fn(through, **kwargs)
                reader = graph.node(consumer)
                grad = reader.opdef.parameter_gradients(reader.args, {}, through, delta.detach(), ("weight",))["weight"]
                sums[consumer] = grad if sums[consumer] is None else sums[consumer] + grad
        fan_in = basis.shape[1]
        for consumer in coupling.consumers:
            grad = sums[consumer]
            blocks.append(grad.reshape(grad.shape[0], fan_in, -1).movedim(1, -1).reshape(-1, fan_in))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    cross = torch.cat(blocks)
    if data_parallel is not None:
        cross = data_parallel.sum([cross])[0]
    return cross.double()


def gradmax_rows(network: Network, layer: str, data, count: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` incoming weight rows for new units of ``layer`` (shape (rows, *fan-in)):
    +v_1, -v_1, +v_2, ... for the right singular vectors v_j of ``cross_term`` (unit norm, the
    expected norm of the random candidates; at most two per input dimension), and the singular
    values."""
    # planned on the CPU like every pass: the same singular vectors on any device and every rank
    A = cross_term(network, layer, data, **options).cpu()
    _, singular, vh = torch.linalg.svd(A, full_matrices=False)
    directions = vh[: (count + 1) // 2]
    rows = torch.stack([sign * v for v in directions for sign in (1.0, -1.0)])[:count]
    fan_in = network.graph.node(layer).param_shapes()["weight"][1:]
    return rows.reshape(len(rows), *fan_in), singular


def neuron_sensitivities(network, data, *, per_layer: int = 8, init: str = "random", loss: str = "cross_entropy",
                         batch: int | None = 256, seed: int = 0, data_parallel=None):
    """Widening candidates (4.19): ``per_layer`` new units per coupled group, zero bias and zero
    outgoing weights; incoming weights ``random`` (normal, std 1/sqrt(fan-in), seeded) or
    ``gradmax`` (``gradmax_rows``, where ``gradmax_supported``; random elsewhere). Merit of a
    unit: ||gradient of its outgoing weights||^2 (every consumer column of it); reference for
    (4.20): the mean of that quantity over the existing units. Returns (candidates, reference,
    extended network, record of the widening). ``data_parallel``: each process takes its part of
    the samples; gradients (and the GradMax cross terms) are summed over the processes before
    merits and singular vectors are taken."""
    if init not in NEURON_INITS:
        raise GraphgrowError(f"unknown neuron initialisation {init!r}", option="neurons",
                             hint=f"one of {', '.join(NEURON_INITS)}")
    layers = neuron_positions(network.graph)
    if not layers:
        raise GraphgrowError(f"network '{network.graph.name}' has no layer that can be widened",
                             hint="widening needs a linear or conv2d layer whose units reach only linear or conv2d layers")
    split, _ = as_splits(data, network.dtype)
    extended, record, inits, widths = network, None, {}, {}
    # last layer first: a layer widened later adds zero columns for its new units to the new rows
    # of the layers after it, so every candidate's incoming weights see the current network only
    for k, layer in reversed(list(enumerate(layers))):
        coupling = trace_units(network.graph, layer, StateView(network.module))
        widths[layer] = coupling.units
        shape = _incoming_shape(network.graph.node(layer))
        random = torch.randn(per_layer, *shape, generator=torch.Generator().manual_seed(seed + k),
                             dtype=torch.float64) / math.sqrt(math.prod(shape))
        data_driven = torch.zeros(0, *shape, dtype=torch.float64)
        if init == "gradmax" and gradmax_supported(network.graph, coupling):
            data_driven, _ = gradmax_rows(network, layer, data, per_layer, loss=loss, batch=batch,
                                          data_parallel=data_parallel)
        # random rows where there are fewer singular directions than candidates
        inits[layer] = ["gradmax"] * len(data_driven) + ["random"] * (per_layer - len(data_driven))
        incoming = torch.cat([data_driven, random[len(data_driven):]])
        given = coupling.producers == [layer] and network.graph.node(layer).opdef.head_arg is None
        extended, step = passes.widen(extended, layer, per_layer, "sensli", seed=seed + k,
                                      incoming=incoming if given else None, scale=1 / math.sqrt(math.prod(shape)))
        record = step if record is None else record.then(step)
    state = StateView(extended.module)
    couplings = {layer: trace_units(extended.graph, layer, state) for layer in layers}
    names = sorted({a.tensor for c in couplings.values() for a in c.on("columns")})
    x, y, total = split.x, split.y, len(split)
    if data_parallel is not None:
        part = data_parallel.part(total)
        x, y = x[part], y[part]
    grads, _ = full_data_gradients(extended.module, x, y, loss_fn(loss), names, batch=batch, total=total)
    if data_parallel is not None:
        grads = dict(zip(grads, data_parallel.sum(list(grads.values()))))
    candidates, existing = [], []
    for layer, coupling in couplings.items():
        n = widths[layer]
        merit = sum(unit_entries(grads[a.tensor].double(), a, n + per_layer).pow(2).sum(1)
                    for a in coupling.on("columns"))
        existing += merit[:n].tolist()
        candidates += [NeuronCandidate(layer, k, float(merit[n + k]), inits[layer][k],
                                       k // 2 if inits[layer][k] == "gradmax" else None) for k in range(per_layer)]
    return candidates, sum(existing) / len(existing), extended, record


def widen_best(network, data, *, count: int | None = 1, tau: float | None = None, per_layer: int = 8,
               init: str = "random", loss: str = "cross_entropy", batch: int | None = 256, seed: int = 0,
               data_parallel=None):
    """Add the best neuron candidates: those passing (4.20) ``merit >= tau * reference`` when
    ``tau`` is given (the data decide how many), at most ``count`` (None: no cap), one per
    singular direction for gradmax. Returns (network, chosen, reference, record); the record
    (widening then pruning the candidates not chosen, both exact) carries optimizer state.
    ``data_parallel``: see neuron_sensitivities."""
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.20), got {tau}", option="tau")
    candidates, reference, extended, record = neuron_sensitivities(
        network, data, per_layer=per_layer, init=init, loss=loss, batch=batch, seed=seed,
        data_parallel=data_parallel)
    ranked = sorted(candidates, key=lambda c: c.merit, reverse=True)
    if tau is not None:
        ranked = [c for c in ranked if c.merit >= tau * reference]
    chosen, directions = [], set()
    for candidate in ranked:
        key = (candidate.layer, candidate.direction)
        if candidate.direction is not None and key in directions:
            continue  # -v gives the same unit up to sign through an odd activation
        directions.add(key)
        chosen.append(candidate)
    chosen = chosen[:count] if count is not None else chosen
    keep = {(c.layer, c.index) for c in chosen}
    for layer in neuron_positions(network.graph):
        n = trace_units(network.graph, layer, StateView(network.module)).units
        unchosen = [n + k for k in range(per_layer) if (layer, k) not in keep]
        if unchosen:
            extended, step = passes.prune(extended, layer, units=unchosen)
            record = record.then(step)
    return extended, chosen, reference, record
