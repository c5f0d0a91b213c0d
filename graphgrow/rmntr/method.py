"""The recursive multilevel proximal trust-region method (RMNTR) for min f(x) + phi(x).

On level l at x (objective F_l = f_l + <v_l, .> + phi_l; on the finest level v = 0, phi =
beta ||.||_1) one iteration either

* recurses: with y0 = R x and the first-order coherent coarse model
  m_c(y) = f_{l+1}(y) + <R grad(f_l + <v_l,.>)(x) - grad f_{l+1}(y0), y> + phi_c(y),
  phi_c(y) = phi_l(x + R^T (y - y0)), the same method runs on level l+1 from y0 inside the ball
  ||y - y0|| <= radius (R^T is an isometry, so the fine step s = R^T (y - y0) has ||s|| <= radius);
  the predicted reduction is m_c(y0) - m_c(y), with the composite phi_c; or
* takes a Taylor step: Cauchy point and spectral prox-gradient iterations on
  <g, s> + 1/2 <s, H s> + phi_l(x + s) with exact HVPs.

The step is accepted when its predicted reduction is positive and rho = actual / predicted >=
eta1; the radius is divided by 4 on rejection and doubled after very good steps on the boundary.
It recurses when the coarse stationarity h_c = ||prox_{phi_c}(y0 - R g) - y0|| is at least
kappa_h h and above coarse_min_h, the radius is at least recursion_min_radius, and the previous
recursion on this level did not fail. Levels stop on h <= gtol, the radius floor, their
iteration limit, or (coarse levels) when the parent's ball is used up.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .levels import Level, Linearisation
from .prox import L1Term, snap_zeros, stationarity
from .subproblem import Step, cauchy_point, reduction_ratio, spectral_prox_gradient, update_radius


@dataclass
class RMNTRConfig:
    gtol: float = 1e-4
    max_iterations: int = 500
    max_work: float = float("inf")   # fine-gradient units over all levels; checked before each finest-level iteration
    radius: float = 1.0
    radius_max: float = 1e4
    radius_floor: float = 1e-12
    eta1: float = 0.05
    eta2: float = 0.9
    shrink: float = 0.25
    grow: float = 2.0
    # the subproblem solver
    spg_iterations: int = 25
    spg_rtol: float = 1e-2
    gcp_mu: float = 1e-4
    # recursion
    kappa_h: float = 0.5
    coarse_min_h: float = 5e-5
    coarse_iterations: int = 5
    coarse_rtol: float = 0.1
    recursion_min_radius: float = 1e-6
    parent_boundary: float = 1e-3   # a coarse level stops when less than this share of the parent ball is left

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LevelRun:
    """What one (possibly coarse) solve produced."""
    x: torch.Tensor
    value: float            # F at x (the level's model, with the composite phi)
    reduction: float        # sum of the accepted steps' reductions, F(start) - F(x) without cancellation
    h: float
    iterations: int
    accepted: int
    reason: str


@dataclass
class Result:
    x: torch.Tensor
    value: float
    h: float
    iterations: int
    reason: str
    records: list[dict] = field(default_factory=list)


class RMNTR:
    """The method on ``levels`` (level 0 finest) with l1 weights ``weight`` on the finest level."""

    def __init__(self, levels: list[Level], weight: torch.Tensor, config: RMNTRConfig | None = None,
                 callback: Callable[[dict], None] | None = None):
        self.levels = levels
        self.weight = weight
        self.config = config or RMNTRConfig()
        self.callback = callback
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self.coarse_tried = [0] * len(levels)
        self.coarse_accepted = [0] * len(levels)
        # why recursions did not give a step, per coarse level: h_c below the rule, nothing accepted
        # on the coarse level, rejected on the fine level (rho < eta1)
        self.coarse_declined = [0] * len(levels)
        self.coarse_empty = [0] * len(levels)

    def work(self) -> float:
        """Work in fine-gradient units over all levels."""
        return sum(level.cost * level.counts.work() for level in self.levels)

    def minimize(self, x0: torch.Tensor) -> Result:
        run = self._solve(0, x0, None, L1Term.fine(self.weight), self.config.radius, None,
                          self.config.max_iterations, self.config.gtol)
        return Result(run.x, run.value, run.h, run.iterations, run.reason, self.records)

    # -- one level ------------------------------------------------------------------------------

    def _reduction(self, level: int, x: torch.Tensor, lin: Linearisation, s: torch.Tensor, shift,
                   phi: L1Term) -> float:
        """F(x) - F(x + s), the shift and phi parts term by term."""
        shift_x, shift_s = (float(shift @ x), float(shift @ s)) if shift is not None else (0.0, 0.0)
        smooth = lin.value - (self.levels[level].objective.value(x + s) + shift_x)
        return smooth - shift_s - phi.change(x, s)

    def _linearize(self, level: int, x: torch.Tensor, shift) -> Linearisation:
        lin = self.levels[level].objective.linearize(x)
        if shift is not None:
            lin = Linearisation(lin.value + float(shift @ x), lin.gradient + shift, lin.hvp)
        return lin

    def _solve(self, level: int, x: torch.Tensor, shift, phi: L1Term, radius: float, parent, max_iterations: int,
               gtol: float, lin: Linearisation | None = None) -> LevelRun:
        cfg = self.config
        lin = lin if lin is not None else self._linearize(level, x, shift)
        value = lin.value + phi.value(x)
        h = stationarity(phi, x, lin.gradient)
        reduction, accepted, iteration, recursion_failed = 0.0, 0, 0, False
        while True:
            available = radius if parent is None else min(
                radius, parent[1] - float(torch.linalg.vector_norm(x - parent[0])))
            reason = ("stationary" if h <= gtol else "iterations" if iteration >= max_iterations
                      else "parent radius" if parent is not None and available <= cfg.parent_boundary * parent[1]
                      else "radius floor" if available <= cfg.radius_floor
                      else "work budget" if parent is None and self.work() >= cfg.max_work else None)
            if reason is not None:
                return LevelRun(x, value, reduction, h, iteration, accepted, reason)
            iteration += 1
            step, kind = None, "taylor"
            if level + 1 < len(self.levels) and not recursion_failed and available >= cfg.recursion_min_radius:
                step, coarse = self._recursive_step(level, x, lin, phi, h, available)
                if step is not None:
                    kind = "recursive"
                elif coarse is not None:
                    recursion_failed = True   # the coarse solve accepted nothing: a Taylor step now
            if step is None:
                gcp, t = cauchy_point(x, lin.gradient, lin.hvp, phi, available, mu=cfg.gcp_mu)
                step = spectral_prox_gradient(x, lin.gradient, lin.hvp, phi, available, gcp, t,
                                              max_iterations=cfg.spg_iterations, rtol=cfg.spg_rtol, h0=h)
            if kind == "recursive" and level == 0:
                step.s = snap_zeros(x, step.s, self.weight)
            trial = x + step.s
            actual = self._reduction(level, x, lin, step.s, shift, phi)
            trial_value = value - actual
            rho = reduction_ratio(actual, step.predicted, value, torch.finfo(x.dtype).eps)
            step_norm = float(torch.linalg.vector_norm(step.s))
            ok = rho >= cfg.eta1
            if kind == "recursive":
                self.coarse_tried[level + 1] += 1
                self.coarse_accepted[level + 1] += int(ok)
                recursion_failed = not ok
            elif ok:
                recursion_failed = False
            new_radius = update_radius(available, rho, step_norm, eta1=cfg.eta1, eta2=cfg.eta2, shrink=cfg.shrink,
                                       grow=cfg.grow, radius_max=cfg.radius_max)
            radius = max(radius, new_radius) if ok else new_radius
            self._record(level, iteration, kind, value, h, available, rho, step, step_norm, actual, ok, trial_value)
            if ok:
                accepted += 1
                reduction += actual
                x = trial
                lin = self._linearize(level, x, shift)
                value = lin.value + phi.value(x)
                h = stationarity(phi, x, lin.gradient)

    def coarse_model(self, level: int, x: torch.Tensor, gradient: torch.Tensor,
                     phi: L1Term) -> tuple[torch.Tensor, torch.Tensor, L1Term, float]:
        """(y0 = R x, grad m_c(y0) = R grad, phi_c, h_c) of the coarse model at x."""
        restriction = self.levels[level].restriction
        y0 = restriction.restrict(x)
        coarse_gradient = restriction.restrict(gradient)
        phi_c = phi.compose(restriction, x)
        return y0, coarse_gradient, phi_c, stationarity(phi_c, y0, coarse_gradient)

    def coarse_shift(self, level: int, y0: torch.Tensor,
                     coarse_gradient: torch.Tensor) -> tuple[torch.Tensor, Linearisation]:
        """The first-order coherence term v = R grad - grad f_c(y0) and the coarse model's
        linearisation at y0 (gradient R grad)."""
        lin = self.levels[level + 1].objective.linearize(y0)
        shift = coarse_gradient - lin.gradient
        return shift, Linearisation(lin.value + float(shift @ y0), lin.gradient + shift, lin.hvp)

    def _recursive_step(self, level: int, x: torch.Tensor, lin: Linearisation, phi: L1Term, h: float,
                        available: float) -> tuple[Step | None, LevelRun | None]:
        """Build the coarse model at x and solve it; (None, None) when the recursion rule says
        no, (None, run) when the coarse solve accepted nothing."""
        cfg = self.config
        y0, coarse_gradient, phi_c, h_c = self.coarse_model(level, x, lin.gradient, phi)
        if not (h_c >= cfg.kappa_h * h and h_c > cfg.coarse_min_h):
            self.coarse_declined[level + 1] += 1
            return None, None
        shift, coarse_lin = self.coarse_shift(level, y0, coarse_gradient)
        run = self._solve(level + 1, y0, shift, phi_c, available, (y0, available), cfg.coarse_iterations,
                          max(cfg.coarse_rtol * h_c, cfg.gtol * 1e-3), lin=coarse_lin)
        if run.accepted == 0:
            self.coarse_empty[level + 1] += 1
            return None, run
        s = self.levels[level].restriction.adjoint(run.x - y0)
        # the model's reduction m_c(y0) - m_c(y) with the composite phi_c (phi_c(y) = phi(x + s))
        return Step(s, torch.zeros_like(s), run.reduction, 0, run.iterations), run

    def _record(self, level, iteration, kind, value, h, radius, rho, step, step_norm, actual, ok, trial_value):
        record = {"event": "step", "level": level, "iteration": iteration, "kind": kind, "F": value, "h": h,
                  "radius": radius, "rho": rho if math.isfinite(rho) else None, "predicted": step.predicted,
                  "actual": actual, "step_norm": step_norm, "accepted": ok, "trial_F": trial_value,
                  "gradients": [lv.counts.gradients for lv in self.levels],
                  "hvps": [lv.counts.hvps for lv in self.levels],
                  "values": [lv.counts.values for lv in self.levels],
                  "work": self.work(), "elapsed": time.perf_counter() - self.start}
        self.records.append(record)
        if self.callback is not None:
            self.callback(record)
