"""The nonsmooth term phi = beta ||.||_1 on every level of a hierarchy, its proximal map, and
restrictions R with R R^T = I whose rows have disjoint supports.

On the finest level phi(z) = sum_i w_i |z_i|. The coarse model of a recursive step uses the
composite term phi_c(y) = phi(z + R^T (y - R z)) (z the fine point). Written out it is again a
sum over the fine coordinates i,

    phi_c(y) = sum_i w_i |offset_i + coef_i y[owner_i]|,

as long as every fine coordinate is touched by at most one coarse coordinate (pairing neurons,
injection of ResNet blocks). Then phi_c separates into one-dimensional convex piecewise-linear
functions of the coarse coordinates, and its prox is exact (:func:`prox_piecewise_linear`). The
same form holds on every coarser level (:meth:`L1Term.compose`), so recursion is closed.
A dense row-orthonormal R (phi_c the l1 norm on a subspace) has no closed-form prox; such a
restriction is refused by :meth:`Restriction.from_linear_map`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import GraphgrowError


def soft_threshold(v: torch.Tensor, threshold) -> torch.Tensor:
    """prox of threshold * ||.||_1 at v (threshold a number or a tensor like v)."""
    return torch.sign(v) * torch.clamp(v.abs() - threshold, min=0.0)


def prox_piecewise_linear(v: torch.Tensor, kinks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """argmin_y 1/2 (y - v_j)^2 + sum_k weights[j, k] |y - kinks[j, k]| for every row j.

    On the interval between the k-th and (k+1)-th sorted kink the objective is a smooth quadratic
    with minimiser v - (2 P_k - W) (P_k the weight of the first k kinks, W the total); clamped to
    its interval it is that interval's best point, and the best of the m+1 candidates is the exact
    minimiser (the objective is strictly convex). Zero-weight kinks are harmless padding."""
    order = torch.argsort(kinks, dim=1)
    c = torch.gather(kinks, 1, order)
    w = torch.gather(weights, 1, order)
    zeros = torch.zeros_like(v)[:, None]
    before = torch.cat([zeros, torch.cumsum(w, dim=1)], dim=1)            # P_0 .. P_m
    total = before[:, -1:]
    inf = torch.full_like(zeros, float("inf"))
    lower, upper = torch.cat([-inf, c], dim=1), torch.cat([c, inf], dim=1)
    candidates = torch.minimum(torch.maximum(v[:, None] - (2 * before - total), lower), upper)
    kink_terms = (w[:, None, :] * (candidates[:, :, None] - c[:, None, :]).abs()).sum(-1)
    objective = 0.5 * (candidates - v[:, None]) ** 2 + kink_terms
    best = torch.argmin(objective, dim=1, keepdim=True)
    return torch.gather(candidates, 1, best)[:, 0]


def _scatter(owner: torch.Tensor, coef: torch.Tensor, size: int, x: torch.Tensor) -> torch.Tensor:
    used = owner >= 0
    out = torch.zeros(size, dtype=x.dtype, device=x.device)
    return out.index_add_(0, owner[used], (coef * x)[used])


@dataclass
class Restriction:
    """A linear map R from a fine vector (length ``len(owner)``) to a coarse one (length
    ``size``) where fine coordinate i feeds only coarse coordinate ``owner[i]`` (-1: none) with
    coefficient ``coef[i]``: (R x)_j = sum_{owner[i] = j} coef[i] x_i, (R^T y)_i = coef[i] y[owner[i]].
    Every coarse row has unit norm, so R R^T = I and R^T is an isometry."""
    owner: torch.Tensor
    coef: torch.Tensor
    size: int

    def __post_init__(self):
        row_sq = torch.zeros(self.size, dtype=self.coef.dtype, device=self.coef.device)
        used = self.owner >= 0
        row_sq.index_add_(0, self.owner[used], self.coef[used] ** 2)
        if not torch.allclose(row_sq, torch.ones_like(row_sq), rtol=0, atol=100 * torch.finfo(self.coef.dtype).eps):
            raise GraphgrowError("the restriction's rows are not orthonormal (R R^T != I)",
                                 hint="use coarsen_width(..., scaling='orthonormal') for width hierarchies and "
                                      "coarsen_depth(..., restriction='injection') for depth hierarchies")

    def restrict(self, x: torch.Tensor) -> torch.Tensor:
        return _scatter(self.owner, self.coef, self.size, x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([y, y.new_zeros(1)])
        return self.coef.to(y.dtype) * padded[self.owner]   # owner -1 reads the appended zero; coef is 0 there

    def dense(self) -> torch.Tensor:
        """R as a matrix (tests, small problems)."""
        return torch.stack([self.adjoint(e) for e in torch.eye(self.size, dtype=self.coef.dtype)])

    @classmethod
    def from_linear_map(cls, restrict: Callable[[torch.Tensor], torch.Tensor], fine_size: int, coarse_size: int,
                        dtype=torch.float64, device=None, probes: int = 3, seed: int = 0) -> "Restriction":
        """Read owner and coefficient of every fine coordinate from a linear map by its adjoint
        (R^T 1 gives the coefficients, R^T [1, 2, ...] the owners), then check on random vectors
        that the map is exactly this structure. Maps whose rows share fine coordinates (no
        closed-form composite prox) or are not orthonormal raise a GraphgrowError."""
        x = torch.zeros(fine_size, dtype=dtype, device=device, requires_grad=True)
        image = restrict(x)

        def adjoint(y):
            return torch.autograd.grad(image, x, y, retain_graph=True)[0]
        coef = adjoint(torch.ones(coarse_size, dtype=dtype, device=device))
        labels = adjoint(torch.arange(1, coarse_size + 1, dtype=dtype, device=device))
        used = coef != 0
        owner = torch.where(used, torch.round(labels / torch.where(used, coef, 1.0)) - 1,
                            torch.full_like(coef, -1.0)).long()
        hint = ("use coarsen_width(..., scaling='orthonormal') for width hierarchies and "
                "coarsen_depth(..., restriction='injection') for depth hierarchies (R R^T = I, each "
                "parameter restricted to one coarse parameter)")
        if bool(((owner < -1) | (owner >= coarse_size)).any()):
            raise GraphgrowError("the restriction mixes one fine parameter into several coarse ones: "
                                 "the composite l1 term has no closed-form prox", hint=hint)
        coef = coef.detach()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(probes):
            probe = torch.randn(fine_size, generator=generator, dtype=dtype).to(device)
            exact = restrict(probe)
            tolerance = 1000 * torch.finfo(dtype).eps
            if not torch.allclose(_scatter(owner, coef, coarse_size, probe), exact, rtol=tolerance,
                                  atol=tolerance * float(exact.abs().max() + 1)):
                raise GraphgrowError("the restriction mixes one fine parameter into several coarse ones: "
                                     "the composite l1 term has no closed-form prox", hint=hint)
        return cls(owner, coef, coarse_size)


@dataclass
class L1Term:
    """phi(z) = sum_i weight[i] |offset[i] + coef[i] z[owner[i]]| for z of length ``size``
    (the sum runs over the finest level's coordinates i; owner -1: a constant term)."""
    weight: torch.Tensor
    offset: torch.Tensor
    coef: torch.Tensor
    owner: torch.Tensor
    size: int
    _kinks: tuple = field(default=None, repr=False, compare=False)

    @classmethod
    def fine(cls, weight: torch.Tensor) -> "L1Term":
        """beta ||.||_1 with per-coordinate weights beta_i >= 0 on the finest level."""
        n = weight.numel()
        return cls(weight, torch.zeros_like(weight), torch.ones_like(weight),
                   torch.arange(n, device=weight.device), n)

    def _inner(self, z: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([z, z.new_zeros(1)])
        return self.offset + self.coef * padded[self.owner]

    def value(self, z: torch.Tensor) -> float:
        return float((self.weight * self._inner(z).abs()).sum())

    def change(self, z: torch.Tensor, s: torch.Tensor) -> float:
        """phi(z + s) - phi(z), summed term by term (no cancellation between two large sums)."""
        return float((self.weight * (self._inner(z + s).abs() - self._inner(z).abs())).sum())

    def _kink_table(self):
        """(rows, kinks, weights): per coarse coordinate its kinks -offset/coef and weights
        weight*|coef|, padded with zero weights to the largest group."""
        if self._kinks is None:
            active = (self.owner >= 0) & (self.coef != 0) & (self.weight != 0)
            owner = self.owner[active]
            counts = torch.bincount(owner, minlength=self.size)
            width = max(int(counts.max()) if owner.numel() else 0, 1)
            order = torch.argsort(owner, stable=True)
            owner_sorted = owner[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(owner_sorted.numel(), device=owner.device) - starts[owner_sorted]
            kinks = torch.zeros(self.size, width, dtype=self.weight.dtype, device=self.weight.device)
            weights = torch.zeros_like(kinks)
            kinks[owner_sorted, slot] = (-self.offset[active] / self.coef[active])[order]
            weights[owner_sorted, slot] = (self.weight[active] * self.coef[active].abs())[order]
            self._kinks = (kinks, weights)
        return self._kinks

    def prox(self, v: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """argmin_y 1/2 ||y - v||^2 + t phi(y) (exact)."""
        kinks, weights = self._kink_table()
        return prox_piecewise_linear(v, kinks, t * weights)

    def compose(self, restriction: Restriction, z: torch.Tensor) -> "L1Term":
        """The coarse term y -> phi(z + R^T (y - R z)) on the coarse level."""
        u = z - restriction.adjoint(restriction.restrict(z))
        padded_u = torch.cat([u, u.new_zeros(1)])
        owner_coef = torch.cat([restriction.coef, restriction.coef.new_zeros(1)])[self.owner]
        owner_next = torch.cat([restriction.owner, restriction.owner.new_full((1,), -1)])[self.owner]
        offset = self.offset + self.coef * padded_u[self.owner]
        coef = torch.where(owner_next >= 0, self.coef * owner_coef, torch.zeros_like(self.coef))
        return L1Term(self.weight, offset, coef, owner_next, restriction.size)


def snap_zeros(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The step s with x + s set to exact zero where it is zero up to the rounding of the sum
    (penalised entries only). A coarse prox puts a fine entry on its kink exactly; x + R^T(y - y0)
    lands within a few ulps of 0, which would hide the sparsity the l1 term made."""
    z = x + s
    tiny = (weight > 0) & (z.abs() <= 8 * torch.finfo(z.dtype).eps * (x.abs() + s.abs()))
    return torch.where(tiny, -x, s)


def stationarity(phi: L1Term, x: torch.Tensor, gradient: torch.Tensor) -> float:
    """h(x) = ||prox_phi(x - grad f(x)) - x||."""
    return float(torch.linalg.vector_norm(phi.prox(x - gradient) - x))
