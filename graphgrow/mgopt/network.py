"""MG/Opt levels for compiled networks and the hierarchies the thesis names (Section 3.4).

* ``depth`` / ``width``: built by ``passes.build_hierarchy`` (ResNet stages halved with h
  doubled; neuron groups), with that package's transfers R_p = R_g = 1/2 P^T.
* ``batch`` (Example 3.37): the same network on every level, level l draws mini-batches of
  ``batch / 2**l`` samples (cheaper, noisier gradients); identity transfers (Example 3.38).
* ``resolution`` (Example 3.39): the same parameters, level l sees the input max-pooled by
  ``2**l``; needs a network whose parameter shapes do not depend on the input size (e.g. a CNN
  with adaptive pooling before its head); identity transfers.

A :class:`NetworkProblem` evaluates a network's mini-batch loss at any parameter vector through
``torch.func.functional_call``, so levels never share or mutate module parameters. Parameters
are dicts with the single key ``FLAT`` (one vector per level, see ``flat.py``), and the depth
and width transfers are compiled to operations on those vectors.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.func import functional_call
from torch.nn import functional as F

import passes

from ..compiler.network import Network
from ..errors import GraphgrowError
from ..runtime.splits import Split, error_count, loss_fn
from .flat import FLAT, FlatLayout, FlatTransfer
from .hierarchy import Hierarchy, IdentityTransfer, ParamDict

HIERARCHIES = ("depth", "width", "batch", "resolution")


class NetworkProblem:
    """The mean mini-batch loss of ``network`` on ``split`` as a function of its trainable
    parameters (``{FLAT: vector}`` in the order of ``layout``). Batches are index tensors into
    the split, so a batch drawn by one level can be evaluated on another (the resolution
    hierarchy max-pools the inputs by ``pool``)."""

    def __init__(self, network: Network, split: Split, *, batch: int | None, loss: str = "cross_entropy",
                 pool: int = 1, cost: float = 1.0, data_parallel=None):
        self.network = network
        # runtime.distributed.DataParallel: each rank evaluates its part of every batch and the
        # sums (loss, gradients) are all-reduced, so every rank sees the single-process values
        self.data_parallel = data_parallel
        self.split = split
        self.batch = batch
        self.loss = loss_fn(loss)
        self.pool = pool
        self.cost = cost
        self.layout = FlatLayout(network.module)

    def parameters(self) -> ParamDict:
        """The network's current trainable parameters (a copy, as one vector)."""
        return {FLAT: self.layout.flatten(dict(self.network.module.named_parameters()))}

    def named(self, params: ParamDict) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` views of ``params``."""
        return self.layout.views(params[FLAT])

    def load(self, params: ParamDict) -> None:
        """Write ``params`` into the network's module."""
        with torch.no_grad():
            modules = dict(self.network.module.named_parameters())
            for name, value in self.named(params).items():
                modules[name].copy_(value)

    def draw_batch(self, generator: torch.Generator) -> torch.Tensor | slice:
        size = len(self.split)
        if self.batch is None or self.batch >= size:
            return slice(None)
        return torch.randperm(size, generator=generator)[:self.batch]

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.rows(batch, self.network.device)
        if self.pool > 1:
            x = F.max_pool2d(x, self.pool)
        return x, y

    def _loss(self, flat: torch.Tensor, batch) -> torch.Tensor:
        """The batch's mean loss; with data_parallel this rank's share of it (its part's loss
        weighted by the part's size), zero for an empty part."""
        if self.data_parallel is not None:
            index = torch.arange(len(self.split)) if isinstance(batch, slice) else batch
            batch = index[self.data_parallel.part(len(index))]
            if len(batch) == 0:
                return flat.sum() * 0.0
            share = len(batch) / len(index)
        x, y = self.inputs(batch)
        loss = self.loss(functional_call(self.network.module, self.layout.views(flat), (x,)), y)
        return loss if self.data_parallel is None else loss * share

    def value_and_grad(self, params: ParamDict, batch) -> tuple[float, ParamDict]:
        leaf = params[FLAT].detach().requires_grad_(True)
        loss = self._loss(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
        loss = loss.detach()
        if self.data_parallel is not None:  # autograd.grad is not hooked by DDP: reduce here
            loss, grad = self.data_parallel.sum([loss, grad])
        return float(loss), {FLAT: grad}

    @torch.no_grad()
    def value(self, params: ParamDict, batch) -> float:
        loss = self._loss(params[FLAT], batch)
        return float(loss if self.data_parallel is None else self.data_parallel.sum([loss])[0])

    @torch.no_grad()
    def evaluate(self, params: ParamDict, split: Split, chunk: int = 4096) -> dict:
        """Mean loss and error rate over a whole split (no pooling beyond this level's)."""
        total, wrong, counted = 0.0, 0.0, True
        named = self.named(params)
        size = len(split)
        if self.data_parallel is not None:
            part = self.data_parallel.part(size)
            split = Split(split.x[part], split.y[part])
        for start in range(0, len(split), chunk):
            x, y = split.rows(slice(start, start + chunk), self.network.device)
            if self.pool > 1:
                x = F.max_pool2d(x, self.pool)
            output = functional_call(self.network.module, named, (x,))
            total += float(self.loss(output, y)) * x.shape[0]
            errors = error_count(output, y)
            counted = counted and errors is not None
            wrong += errors or 0
        if self.data_parallel is not None:
            total, wrong = self.data_parallel.sum([torch.tensor([total, wrong], dtype=torch.float64)])[0].tolist()
        n = max(size, 1)
        return {"loss": total / n, "error": wrong / n if counted else None}


def _relative_costs(flops: list[int], batches: list[int]) -> list[float]:
    reference = flops[0] * batches[0]
    return [f * b / reference for f, b in zip(flops, batches)]


def resolution_network(network: Network, factor: int) -> Network:
    """The network on inputs max-pooled by ``factor`` with the same parameters."""
    graph = network.graph
    shape = tuple(graph.input_shape)
    if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
        raise GraphgrowError(f"resolution hierarchy: input shape {list(shape)} cannot be max-pooled by {factor}", option="levels",
                             file=graph.source, hint="it needs image inputs (C, H, W) with H and W divisible "
                                                      "by 2**(levels-1); use fewer levels")
    coarse = copy.deepcopy(graph)
    coarse.input_shape = (shape[0], shape[1] // factor, shape[2] // factor)
    try:
        coarse.infer_shapes()
    except GraphgrowError as err:
        raise GraphgrowError(f"resolution hierarchy: the network does not accept inputs of shape "
                             f"{list(coarse.input_shape)}: {err.message}", file=graph.source, node=err.node,
                             hint="layers after the convolutions must not depend on the image size "
                                  "(use adaptive_avgpool2d before flatten)") from None
    fine_shapes = {n.name: n.param_shapes() for n in graph.nodes}
    for node in coarse.nodes:
        if node.param_shapes() != fine_shapes[node.name]:
            raise GraphgrowError("resolution hierarchy: parameter shapes change with the input size",
                                 file=graph.source, node=node.name,
                                 hint="use adaptive_avgpool2d before flatten so the head sees a fixed size")
    return Network.build(coarse, network.state(), dtype=network.dtype, device=network.device)


def build_network_hierarchy(network: Network, split: Split, kind: str, levels: int, *, batch: int | None,
                            loss: str = "cross_entropy", data_parallel=None, **options) -> Hierarchy:
    """A :class:`Hierarchy` of ``levels`` levels of kind depth, width, batch or resolution;
    ``options`` go to ``passes.build_hierarchy`` (depth: interpolation, restriction; width:
    layers, groups, scaling). ``data_parallel``: every level's problem reduces over the ranks."""
    if kind not in HIERARCHIES:
        raise GraphgrowError(f"unknown hierarchy '{kind}'", option="hierarchy", hint=f"use one of {', '.join(HIERARCHIES)}")
    if not (isinstance(levels, int) and levels >= 1):
        raise GraphgrowError(f"levels must be a positive integer, got {levels!r}", option="levels")
    fine_batch = len(split) if batch is None else min(batch, len(split))
    if levels == 1:  # plain SGD on the network: nothing to build
        return Hierarchy([NetworkProblem(network, split, batch=batch, loss=loss, data_parallel=data_parallel)], [], [f"{kind}0"])
    if kind in ("depth", "width"):
        built = passes.build_hierarchy(network, kind=kind, levels=levels, **options)
        networks = [level.network for level in built]
        costs = _relative_costs([n.graph.flops() for n in networks], [fine_batch] * levels)
        problems = [NetworkProblem(n, split, batch=batch, loss=loss, cost=c, data_parallel=data_parallel)
                    for n, c in zip(networks, costs)]
        # one fine gradient evaluation: forward and backward, about 3 forward passes
        reference = 3.0 * networks[0].graph.flops() * fine_batch
        example = next(networks[0].module.parameters())
        transfers = [FlatTransfer(level.transfer, fine.layout, coarse.layout, reference_operations=reference,
                                  device=example.device, dtype=example.dtype)
                     for level, fine, coarse in zip(built[1:], problems, problems[1:])]
        names = [f"{kind}{l}:{n.graph.num_params()}p" for l, n in enumerate(networks)]
        return Hierarchy(problems, transfers, names)
    if options:
        raise GraphgrowError(f"hierarchy '{kind}' takes no options, got {', '.join(options)}")
    if kind == "batch":
        sizes = [max(fine_batch // 2 ** l, 1) for l in range(levels)]
        if levels > 1 and sizes[-1] == sizes[-2]:
            raise GraphgrowError(f"batch hierarchy: batch {fine_batch} cannot be halved {levels - 1} times", option="batch",
                                 hint="use a larger --batch or fewer --levels")
        costs = _relative_costs([1] * levels, sizes)
        problems = [NetworkProblem(network, split, batch=s, loss=loss, cost=c, data_parallel=data_parallel)
                    for s, c in zip(sizes, costs)]
        names = [f"batch{s}" for s in sizes]
    else:
        networks = [network] + [resolution_network(network, 2 ** l) for l in range(1, levels)]
        costs = _relative_costs([n.graph.flops() for n in networks], [fine_batch] * levels)
        problems = [NetworkProblem(n, split, batch=batch, loss=loss, pool=2 ** l, cost=c, data_parallel=data_parallel)
                    for l, (n, c) in enumerate(zip(networks, costs))]
        names = [f"{'x'.join(map(str, n.graph.input_shape[1:]))}" for n in networks]
    return Hierarchy(problems, [IdentityTransfer() for _ in range(levels - 1)], names)


def iterations_per_epoch(size: int, batch: int | None) -> int:
    return 1 if batch is None or batch >= size else math.ceil(size / batch)
