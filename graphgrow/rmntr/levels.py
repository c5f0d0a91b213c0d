"""The levels RMNTR works on: a smooth objective of one flat parameter vector per level (value,
gradient, exact Hessian-vector products, with counters), and the restrictions between levels
read from graphgrow's width and depth hierarchies (``passes.build_hierarchy``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch.func import functional_call

import passes
from passes.hierarchy import AxisMap

from ..compiler.network import Network
from ..errors import GraphgrowError
from .prox import Restriction

#: a network's loss as a function of its module and a {name: tensor} parameter dict
NetworkLoss = Callable[[torch.nn.Module, dict], torch.Tensor]

#: work of one evaluation in units of one gradient on the same level (the ledger's convention)
VALUE_COST, GRADIENT_COST, HVP_COST = 0.5, 1.0, 2.0


@dataclass
class Counts:
    values: int = 0
    gradients: int = 0
    hvps: int = 0

    def work(self) -> float:
        return VALUE_COST * self.values + GRADIENT_COST * self.gradients + HVP_COST * self.hvps


@dataclass
class Linearisation:
    """f, grad f and v -> (Hessian of f) v at one point."""
    value: float
    gradient: torch.Tensor
    hvp: Callable[[torch.Tensor], torch.Tensor]


class Objective(Protocol):
    """A smooth function of a flat vector, counting its evaluations."""
    counts: Counts

    def value(self, x: torch.Tensor) -> float: ...

    def linearize(self, x: torch.Tensor) -> Linearisation: ...


class AutogradObjective:
    """A smooth objective given by a scalar torch function of a flat vector; gradient by
    autograd, HVPs by differentiating the gradient graph again (kept while the linearisation
    lives, so each HVP is one backward pass)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function
        self.counts = Counts()

    def value(self, x: torch.Tensor) -> float:
        self.counts.values += 1
        with torch.enable_grad():   # losses may differentiate with respect to their inputs
            return float(self.function(x.detach()).detach())

    def linearize(self, x: torch.Tensor) -> Linearisation:
        self.counts.gradients += 1
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            loss = self.function(leaf)
            gradient, = torch.autograd.grad(loss, leaf, create_graph=True)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            self.counts.hvps += 1
            with torch.enable_grad():
                return torch.autograd.grad(gradient, leaf, v, retain_graph=True)[0].detach()
        return Linearisation(float(loss.detach()), gradient.detach(), hvp)


class GaussNewtonObjective(AutogradObjective):
    """f = 1/2 mean r^2 for a residual vector r(x); the "HVP" is the Gauss-Newton product
    J^T J v / m, matrix-free: J v by differentiating u -> J^T u (linear in u) once more, then
    J^T (J v) by one more backward pass. No Jacobian is formed."""

    def __init__(self, residual: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(lambda x: 0.5 * residual(x).pow(2).mean())
        self.residual = residual

    def linearize(self, x: torch.Tensor) -> Linearisation:
        self.counts.gradients += 1
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            r = self.residual(leaf)
            m = r.numel()
            loss = 0.5 * r.pow(2).mean()
            gradient, = torch.autograd.grad(loss, leaf, retain_graph=True)
            dual = torch.zeros_like(r, requires_grad=True)
            transposed, = torch.autograd.grad(r, leaf, dual, create_graph=True)   # J^T u, linear in u

        def product(v: torch.Tensor) -> torch.Tensor:
            self.counts.hvps += 1
            with torch.enable_grad():
                jv, = torch.autograd.grad(transposed, dual, v, retain_graph=True)
                return torch.autograd.grad(r, leaf, jv, retain_graph=True)[0].detach() / m
        return Linearisation(float(loss.detach()), gradient.detach(), product)


class ParameterVector:
    """The trainable parameters of a network as one flat vector and back."""

    def __init__(self, network: Network):
        named = [(n, p) for n, p in network.module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.size = sum(self.sizes)

    def flatten(self, params: dict) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, x: torch.Tensor) -> dict:
        return {n: piece.view(shape) for n, piece, shape in zip(self.names, torch.split(x, self.sizes), self.shapes)}

    def of(self, network: Network) -> torch.Tensor:
        params = dict(network.module.named_parameters())
        return self.flatten({n: params[n].detach() for n in self.names})

    def load(self, network: Network, x: torch.Tensor) -> None:
        with torch.no_grad():
            params = dict(network.module.named_parameters())
            for name, value in self.unflatten(x).items():
                params[name].copy_(value)


MODELS = ("hessian", "gauss-newton")


def network_objective(network: Network, loss: NetworkLoss, model: str = "hessian",
                      scale: torch.Tensor | None = None) -> tuple[AutogradObjective, ParameterVector]:
    """The loss of ``network`` as an objective of its flat trainable parameters (evaluated at
    ``scale * x`` when a scale is given); ``model`` gauss-newton needs a least-squares loss (an
    object with ``residual(module, params)`` whose loss is 1/2 mean residual^2, e.g. the PINN)."""
    vector = ParameterVector(network)
    module = network.module
    params = vector.unflatten if scale is None else (lambda x: vector.unflatten(scale * x))
    if model == "gauss-newton":
        if not callable(getattr(loss, "residual", None)):
            raise GraphgrowError("the gauss-newton model needs a least-squares loss",
                                 hint="use --data pinn, or --model hessian")
        return GaussNewtonObjective(lambda x: loss.residual(module, params(x))), vector
    if model != "hessian":
        raise GraphgrowError(f"unknown model {model!r}", hint=f"use {' or '.join(MODELS)}")
    return AutogradObjective(lambda x: loss(module, params(x))), vector


def supervised_loss(x: torch.Tensor, y: torch.Tensor, loss: Callable) -> NetworkLoss:
    """Full-batch ``loss(output, y)`` of a network on inputs ``x``."""
    return lambda module, params: loss(functional_call(module, params, (x,)), y)


@dataclass
class Level:
    """One level: its network, objective, flat parameter layout, cost of a gradient relative to
    the finest level, and the restriction to the next coarser level (None on the coarsest)."""
    network: Network
    objective: AutogradObjective
    vector: ParameterVector
    cost: float = 1.0
    restriction: Restriction | None = None
    name: str = ""
    counts: Counts = field(init=False)

    def __post_init__(self):
        self.counts = self.objective.counts


HIERARCHIES = ("width", "depth")
PAIRINGS = ("adjacent", "gradient")
COARSE_SCALINGS = ("orthonormal", "average")


def average_scales(network: Network, transfers: list) -> list[torch.Tensor]:
    """Per coarse level, the diagonal D with (average-scaled coarse weights) = D (orthonormal
    coarse coordinates): the same chain of width restrictions with each group's rows 1/g
    (averaged unit rows, summed consumer columns) instead of 1/sqrt(g), applied to all-ones
    parameters, divided entrywise by the orthonormal chain. Exact when the groups of a level have
    equal sizes (pairs)."""
    vector = ParameterVector(network)
    x = vector.of(network)
    orthonormal = average = vector.unflatten(torch.ones_like(x))
    scales = []
    for transfer in transfers:
        averaged_maps = []
        for linear_map in transfer.maps:
            if isinstance(linear_map, AxisMap):
                root = (linear_map.R != 0).sum(dim=1).to(linear_map.R.dtype).sqrt()
                linear_map = AxisMap(linear_map.axes, linear_map.P * root[None, :], linear_map.R / root[:, None])
            averaged_maps.append(linear_map)
        orthonormal = transfer.restrict(orthonormal)
        for linear_map in averaged_maps:
            average = linear_map.apply(average, "restrict")
        coarse = ParameterVector(transfer.coarse)
        scales.append(coarse.flatten(average) / coarse.flatten(orthonormal))
    return scales


def unit_strength(network: Network, loss, layer: str) -> torch.Tensor:
    """Connection strength of the units of ``layer`` from the data: with g_p the gradient of the
    residual r_p with respect to the layer's biases (one entry per unit), A = sum_p g_p g_p^T /
    ||g_p||_inf and strength_ij = |A_ij| / sqrt(A_ii A_jj). J (points x units) is formed column
    by column, J e_k = d/du <J^T u, e_k>, so no per-point backward pass is needed."""
    residual = getattr(loss, "residual", None)
    name = f"{layer}.bias"
    params = {n: p.detach() for n, p in network.module.named_parameters()}
    if not callable(residual) or name not in params:
        raise GraphgrowError(f"gradient pairing needs a least-squares loss and a bias on '{layer}'",
                             file=network.graph.source, node=layer, hint="use pairing='adjacent'")
    with torch.enable_grad():
        bias = params[name].clone().requires_grad_(True)
        r = residual(network.module, {**params, name: bias})
        dual = torch.zeros_like(r, requires_grad=True)
        transposed, = torch.autograd.grad(r, bias, dual, create_graph=True)
        J = torch.stack([torch.autograd.grad(transposed, dual, e, retain_graph=True)[0]
                         for e in torch.eye(bias.numel(), dtype=bias.dtype, device=bias.device)], dim=1)
    scaled = J / J.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(J.dtype).tiny)
    A = scaled.T @ J
    diagonal = A.diagonal().clamp_min(torch.finfo(J.dtype).tiny).sqrt()
    return (A / diagonal[:, None] / diagonal[None, :]).abs()


def _gradient_paired_networks(network: Network, loss, levels: int) -> tuple[list, list]:
    """Width levels whose pairs are the strongest units (passes.strongest_pairs) of the one
    widenable layer, recomputed on every level."""
    networks, transfers = [network], []
    for _ in range(levels - 1):
        current = networks[-1]
        layers = [n for n in passes.widenable(current.graph) if current.graph.node(n).out_shape[0] >= 2]
        if len(layers) != 1:
            raise GraphgrowError(f"gradient pairing coarsens exactly one hidden layer; '{current.graph.name}' has "
                                 f"{len(layers)}", file=current.graph.source, hint="use pairing='adjacent'")
        groups = passes.strongest_pairs(unit_strength(current, loss, layers[0]))
        transfer = passes.coarsen_width(current, layers, groups, scaling="orthonormal")
        networks.append(transfer.coarse)
        transfers.append(transfer)
    return networks, transfers


def build_levels(network: Network, loss: NetworkLoss, kind: str = "width", levels: int = 2,
                 model: str = "hessian", pairing: str = "adjacent", coarse_scaling: str = "orthonormal",
                 **options) -> list[Level]:
    """Levels 0 (``network``) .. levels-1 from ``passes.build_hierarchy``: width with
    ``scaling='orthonormal'`` (P = R^T), depth with ``restriction='injection'``. Every restriction
    is checked to be row-orthonormal with disjoint rows (a closed-form composite prox).
    ``model``: the curvature of the Taylor models, exact Hessian or Gauss-Newton. ``pairing``
    (width): adjacent units, or the most strongly connected ones by residual gradients
    (:func:`unit_strength`; least-squares losses, one hidden layer). ``coarse_scaling``
    (width): the coarse networks evaluate their orthonormal coordinates y as they are, or
    (``average``) the average-scaled weights D y (:func:`average_scales`), which keep the function
    of pairs of equal units (through tanh too); R stays orthonormal, so the composite prox is
    unchanged and the coarse model stays first-order coherent."""
    if coarse_scaling not in COARSE_SCALINGS:
        raise GraphgrowError(f"unknown coarse scaling {coarse_scaling!r}", option="coarse_scaling",
                             hint=f"use {' or '.join(COARSE_SCALINGS)}")
    if coarse_scaling == "average" and kind != "width":
        raise GraphgrowError("coarse_scaling='average' is for width hierarchies", option="coarse_scaling",
                             hint="use coarse_scaling='orthonormal'")
    if pairing not in PAIRINGS:
        raise GraphgrowError(f"unknown pairing {pairing!r}", hint=f"use {' or '.join(PAIRINGS)}")
    if pairing == "gradient" and kind != "width":
        raise GraphgrowError("gradient pairing is for width hierarchies", hint="use pairing='adjacent'")
    if kind not in HIERARCHIES:
        raise GraphgrowError(f"unknown hierarchy {kind!r} for rmntr", hint="use width or depth")
    if not (isinstance(levels, int) and levels >= 1):
        raise GraphgrowError(f"levels must be a positive integer, got {levels!r}")
    fixed = {"width": ("scaling", "orthonormal"), "depth": ("restriction", "injection")}[kind]
    if options.get(fixed[0], fixed[1]) != fixed[1]:
        raise GraphgrowError(f"rmntr needs {fixed[0]}={fixed[1]!r} on a {kind} hierarchy, got {options[fixed[0]]!r}",
                             hint="the composite l1 prox is closed-form only when R R^T = I with disjoint rows; "
                                  f"use {fixed[0]}={fixed[1]!r}")
    options[fixed[0]] = fixed[1]
    if pairing == "gradient":
        networks, transfers = _gradient_paired_networks(network, loss, levels)
    else:
        built = passes.build_hierarchy(network, kind=kind, levels=levels, **options)
        networks, transfers = [level.network for level in built], [level.transfer for level in built[1:]]
    fine_flops = max(network.graph.flops(), 1)
    scales = [None] + (average_scales(network, transfers) if coarse_scaling == "average" else [None] * len(transfers))
    result = []
    for index, net in enumerate(networks):
        objective, vector = network_objective(net, loss, model, scales[index])
        result.append(Level(net, objective, vector, cost=net.graph.flops() / fine_flops,
                            name=f"{kind}{index}:{vector.size}p"))
    for index in range(len(result) - 1):
        fine, coarse, transfer = result[index], result[index + 1], transfers[index]
        fine_x = fine.vector.of(fine.network)

        def restrict(x, fine=fine, coarse=coarse, transfer=transfer):
            return coarse.vector.flatten(transfer.restrict(fine.vector.unflatten(x)))
        fine.restriction = Restriction.from_linear_map(restrict, fine.vector.size, coarse.vector.size,
                                                       dtype=fine_x.dtype, device=fine_x.device)
    return result
