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

``globalisation="levenberg-marquardt"`` is the smooth member (beta = 0, Gauss-Newton levels):
Taylor steps solve (H + lam I) s = -g by conjugate gradients, the coarse model gets the
regularisation lam/2 ||y - y0||^2 instead of a ball, the acceptance test is the same and lam is
updated like 1 / radius (``subproblem.update_lambda``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..errors import GraphgrowError
from .levels import Level, Linearisation
from .prox import L1Term, snap_zeros, stationarity
from .subproblem import (Step, cauchy_point, reduction_ratio, regularised_gauss_newton_step, rescaled_step,
                         spectral_prox_gradient, update_lambda, update_radius)

GLOBALISATIONS = ("trust-region", "levenberg-marquardt")


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
    # trust-region radius or Levenberg-Marquardt lambda (beta = 0; spg_* then bound its CG solves)
    globalisation: str = "trust-region"
    lm_lambda: float = 1.0
    lm_lambda_min: float = 1e-12
    lm_lambda_max: float = 1e12
    # a recursive step's length and predicted reduction from the fine Taylor model along it (one HVP)
    rescale_coarse_steps: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Correction:
    """What a coarse model adds to the coarse f: <shift, y> (first-order coherence) and, for
    Levenberg-Marquardt, weight/2 ||y - centre||^2 (zero value, gradient and coherence at the centre)."""
    shift: torch.Tensor
    weight: float = 0.0
    centre: torch.Tensor | None = None

    def value(self, y: torch.Tensor) -> float:
        value = float(self.shift @ y)
        return value + 0.5 * self.weight * float((y - self.centre) @ (y - self.centre)) if self.weight else value

    def change(self, y: torch.Tensor, s: torch.Tensor) -> float:
        """value(y + s) - value(y), without cancellation."""
        change = float(self.shift @ s)
        return change + self.weight * float((y - self.centre) @ s + 0.5 * (s @ s)) if self.weight else change

    def linearize(self, lin: Linearisation, y: torch.Tensor) -> Linearisation:
        """The linearisation of f + this term from that of f at y."""
        if not self.weight:
            return Linearisation(lin.value + self.value(y), lin.gradient + self.shift, lin.hvp)
        weight, hvp = self.weight, lin.hvp
        return Linearisation(lin.value + self.value(y), lin.gradient + self.shift + weight * (y - self.centre),
                             lambda v: hvp(v) + weight * v)


class TrustRegion:
    """Steps inside ||s|| <= radius (the control), the radius rules, coarse solves in the ball."""
    control_name = "radius"

    def __init__(self, config: "RMNTRConfig"):
        self.config = config

    def initial(self) -> float:
        return self.config.radius

    def available(self, radius: float, x: torch.Tensor, parent) -> float:
        return radius if parent is None else min(radius, parent[1] - float(torch.linalg.vector_norm(x - parent[0])))

    def stop_reason(self, available: float, parent) -> str | None:
        if parent is not None and available <= self.config.parent_boundary * parent[1]:
            return "parent radius"
        return "radius floor" if available <= self.config.radius_floor else None

    def may_recurse(self, available: float) -> bool:
        return available >= self.config.recursion_min_radius

    def taylor_step(self, x, lin: Linearisation, phi: L1Term, available: float, h: float) -> Step:
        cfg = self.config
        gcp, t = cauchy_point(x, lin.gradient, lin.hvp, phi, available, mu=cfg.gcp_mu)
        return spectral_prox_gradient(x, lin.gradient, lin.hvp, phi, available, gcp, t,
                                      max_iterations=cfg.spg_iterations, rtol=cfg.spg_rtol, h0=h)

    def model_hvp(self, lin: Linearisation, radius: float):
        return lin.hvp

    def update(self, radius: float, available: float, rho: float, step_norm: float) -> float:
        cfg = self.config
        new_radius = update_radius(available, rho, step_norm, eta1=cfg.eta1, eta2=cfg.eta2, shrink=cfg.shrink,
                                   grow=cfg.grow, radius_max=cfg.radius_max)
        return max(radius, new_radius) if rho >= cfg.eta1 else new_radius

    def coarse(self, available: float, y0: torch.Tensor, shift: torch.Tensor):
        """(control, parent, correction) of a coarse solve from y0."""
        return available, (y0, available), Correction(shift)


class LevenbergMarquardt(TrustRegion):
    """Regularised Gauss-Newton steps with lambda (the control) and no ball; the coarse model
    carries lambda/2 ||y - y0||^2 and starts its own lambda there."""
    control_name = "lambda"

    def initial(self) -> float:
        return self.config.lm_lambda

    def available(self, lam: float, x: torch.Tensor, parent) -> float:
        return lam

    def stop_reason(self, lam: float, parent) -> str | None:
        return "lambda ceiling" if lam >= self.config.lm_lambda_max else None

    def may_recurse(self, lam: float) -> bool:
        return True

    def taylor_step(self, x, lin: Linearisation, phi: L1Term, lam: float, h: float) -> Step:
        return regularised_gauss_newton_step(lin.gradient, lin.hvp, lam, max_iterations=self.config.spg_iterations,
                                             rtol=self.config.spg_rtol)

    def model_hvp(self, lin: Linearisation, lam: float):
        return lambda v: lin.hvp(v) + lam * v

    def update(self, lam: float, available: float, rho: float, step_norm: float) -> float:
        cfg = self.config
        return update_lambda(lam, rho, eta1=cfg.eta1, eta2=cfg.eta2, shrink=cfg.shrink, grow=cfg.grow,
                             lam_min=cfg.lm_lambda_min)

    def coarse(self, lam: float, y0: torch.Tensor, shift: torch.Tensor):
        return lam, None, Correction(shift, lam, y0)


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
    """The method on ``levels`` (level 0 finest) with l1 weights ``weight`` on the finest level.
    ``on_iteration(state)`` is called after every finest-level iteration with what
    ``minimize(x0, resume=state)`` needs to continue from there (checkpoints)."""

    def __init__(self, levels: list[Level], weight: torch.Tensor, config: RMNTRConfig | None = None,
                 callback: Callable[[dict], None] | None = None,
                 on_iteration: Callable[[dict], None] | None = None):
        self.levels = levels
        self.weight = weight
        self.config = config or RMNTRConfig()
        self.callback = callback
        self.on_iteration = on_iteration
        rules = {"trust-region": TrustRegion, "levenberg-marquardt": LevenbergMarquardt}
        if self.config.globalisation not in rules:
            raise GraphgrowError(f"unknown globalisation {self.config.globalisation!r}",
                                 hint=f"use {' or '.join(GLOBALISATIONS)}")
        if self.config.globalisation == "levenberg-marquardt" and bool((weight != 0).any()):
            raise GraphgrowError("the Levenberg-Marquardt member is the smooth method: it needs beta = 0",
                                 option="beta", hint="use --beta 0, or --model hessian|gauss-newton for the l1 term")
        self.rule = rules[self.config.globalisation](self.config)
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

    def minimize(self, x0: torch.Tensor, resume: dict | None = None) -> Result:
        """From x0, or from a state ``on_iteration`` was given (then x0 is ignored): the
        counters, the control and the finest level's loop continue as if never stopped."""
        phi, cfg, lin, loop = L1Term.fine(self.weight), self.config, None, None
        if resume is not None:
            x0 = resume["x"].to(device=self.weight.device, dtype=self.weight.dtype)
            lin = self._linearize(0, x0, None)   # the same numbers as before the stop; not counted again
            self._load_counters(resume)
            loop = resume["loop"]
        run = self._solve(0, x0, None, phi, self.rule.initial(), None, cfg.max_iterations, cfg.gtol, lin, loop)
        return Result(run.x, run.value, run.h, run.iterations, run.reason, self.records)

    def _counters(self) -> dict:
        return {"counts": [[lv.counts.values, lv.counts.gradients, lv.counts.hvps] for lv in self.levels],
                "coarse": [list(self.coarse_tried), list(self.coarse_accepted), list(self.coarse_declined),
                           list(self.coarse_empty)],
                "elapsed": time.perf_counter() - self.start}

    def _load_counters(self, state: dict) -> None:
        for level, (values, gradients, hvps) in zip(self.levels, state["counts"]):
            level.counts.values, level.counts.gradients, level.counts.hvps = values, gradients, hvps
        self.coarse_tried, self.coarse_accepted, self.coarse_declined, self.coarse_empty = (
            list(c) for c in state["coarse"])
        self.start = time.perf_counter() - state["elapsed"]

    # -- one level ------------------------------------------------------------------------------

    def _reduction(self, level: int, x: torch.Tensor, lin: Linearisation, s: torch.Tensor,
                   correction: Correction | None, phi: L1Term) -> float:
        """F(x) - F(x + s), the correction and phi parts term by term."""
        at_x, change = (correction.value(x), correction.change(x, s)) if correction is not None else (0.0, 0.0)
        smooth = lin.value - (self.levels[level].objective.value(x + s) + at_x)
        return smooth - change - phi.change(x, s)

    def _linearize(self, level: int, x: torch.Tensor, correction: Correction | None) -> Linearisation:
        lin = self.levels[level].objective.linearize(x)
        return correction.linearize(lin, x) if correction is not None else lin

    def _solve(self, level: int, x: torch.Tensor, correction: Correction | None, phi: L1Term, control: float,
               parent, max_iterations: int, gtol: float, lin: Linearisation | None = None,
               loop: dict | None = None) -> LevelRun:
        """``control``: the radius (trust region) or lambda (Levenberg-Marquardt); ``parent``:
        (centre, radius) of the ball a coarse trust-region solve stays in; ``loop``: the finest
        level's loop state to continue from (resume)."""
        cfg, rule = self.config, self.rule
        lin = lin if lin is not None else self._linearize(level, x, correction)
        value = lin.value + phi.value(x)
        h = stationarity(phi, x, lin.gradient)
        reduction, accepted, iteration, recursion_failed = 0.0, 0, 0, False
        if loop is not None:
            control, reduction, accepted = loop["control"], loop["reduction"], loop["accepted"]
            iteration, recursion_failed = loop["iteration"], loop["recursion_failed"]
        while True:
            available = rule.available(control, x, parent)
            reason = ("stationary" if h <= gtol else "iterations" if iteration >= max_iterations
                      else rule.stop_reason(available, parent)
                      or ("work budget" if parent is None and level == 0 and self.work() >= cfg.max_work else None))
            if reason is not None:
                return LevelRun(x, value, reduction, h, iteration, accepted, reason)
            iteration += 1
            step, kind = None, "taylor"
            if level + 1 < len(self.levels) and not recursion_failed and rule.may_recurse(available):
                step, coarse = self._recursive_step(level, x, lin, phi, h, available)
                if step is not None:
                    kind = "recursive"
                    if cfg.rescale_coarse_steps:
                        step = rescaled_step(x, lin.gradient, rule.model_hvp(lin, available), phi, step.s)
                elif coarse is not None:
                    recursion_failed = True   # the coarse solve accepted nothing: a Taylor step now
            if step is None:
                step = rule.taylor_step(x, lin, phi, available, h)
            if kind == "recursive" and level == 0:
                step.s = snap_zeros(x, step.s, self.weight)
            trial = x + step.s
            actual = self._reduction(level, x, lin, step.s, correction, phi)
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
            control = rule.update(control, available, rho, step_norm)
            self._record(level, iteration, kind, value, h, available, rho, step, step_norm, actual, ok, trial_value)
            if ok:
                accepted += 1
                reduction += actual
                x = trial
                lin = self._linearize(level, x, correction)
                value = lin.value + phi.value(x)
                h = stationarity(phi, x, lin.gradient)
            if level == 0 and self.on_iteration is not None:
                self.on_iteration({"x": x, "loop": {"control": control, "reduction": reduction, "accepted": accepted,
                                                    "iteration": iteration, "recursion_failed": recursion_failed},
                                   **self._counters()})

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
        """The first-order coherence term v = R grad - grad f_c(y0) and the linearisation of f_c
        at y0 (with a Correction built on v, that of the coarse model: gradient R grad)."""
        lin = self.levels[level + 1].objective.linearize(y0)
        return coarse_gradient - lin.gradient, lin

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
        control, parent, correction = self.rule.coarse(available, y0, shift)
        run = self._solve(level + 1, y0, correction, phi_c, control, parent, cfg.coarse_iterations,
                          max(cfg.coarse_rtol * h_c, cfg.gtol * 1e-3), lin=correction.linearize(coarse_lin, y0))
        if run.accepted == 0:
            self.coarse_empty[level + 1] += 1
            return None, run
        s = self.levels[level].restriction.adjoint(run.x - y0)
        # the model's reduction m_c(y0) - m_c(y) with the composite phi_c (phi_c(y) = phi(x + s))
        return Step(s, torch.zeros_like(s), run.reduction, 0, run.iterations), run

    def _record(self, level, iteration, kind, value, h, control, rho, step, step_norm, actual, ok, trial_value):
        record = {"event": "step", "level": level, "iteration": iteration, "kind": kind, "F": value, "h": h,
                  "radius": control if self.rule.control_name == "radius" else None,
                  "rho": rho if math.isfinite(rho) else None, "predicted": step.predicted,
                  "actual": actual, "step_norm": step_norm, "accepted": ok, "trial_F": trial_value,
                  "gradients": [lv.counts.gradients for lv in self.levels],
                  "hvps": [lv.counts.hvps for lv in self.levels],
                  "values": [lv.counts.values for lv in self.levels],
                  "work": self.work(), "elapsed": time.perf_counter() - self.start}
        if self.rule.control_name == "lambda":
            record["lambda"] = control
        self.records.append(record)
        if self.callback is not None:
            self.callback(record)
