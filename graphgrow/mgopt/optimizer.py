"""Stochastic multilevel optimisation (MG/Opt, thesis Sections 2.4 and 3).

The algorithms work on an abstract hierarchy of problems. Level 0 is the finest. Each level is
a :class:`Problem` (objective and gradient on mini-batches; parameters are dicts of tensors), and
each pair of neighbouring levels is joined by a :class:`Transfer` (restriction of parameters R_p,
of gradients R_g and prolongation P, all linear maps on parameter dicts).

* Algorithm 5 (two levels): at fine iteration k draw a mini-batch, compute g = G_f(theta, xi_k).
  If ||R_g g||^2 > kappa ||g||^2 and iteration k-1 took no coarse correction, minimise
  approximately (K SGD steps, rate alpha_bar) the coarse-grid-correction objective

      h(tb) = f_H(tb) + <R_g g - G_H(R_p theta, xi_k), tb> + lam/2 ||tb - R_p theta||^2

  starting at R_p theta, and set theta <- theta + alpha_cgc P(tb_K - R_p theta); otherwise take
  the SGD step theta <- theta - alpha g. The correction term uses the same mini-batch xi_k as g.
* More than two levels: the cgc problem of level l is itself solved by a V-cycle: pre-smoothing
  SGD steps on h_l, a correction from level l+1 (built from h_l's gradient, so the
  linear terms nest as in FAS), post-smoothing steps. The coarsest level takes K SGD steps.
* Safeguards (Section 2.4.3, Theorem 2.39): a correction is accepted only if <g, e> < 0 (a
  descent direction for the mini-batch objective) and, optionally, alpha_cgc is halved until
  the Armijo condition holds on the same mini-batch; a rejected correction becomes an SGD step.
* Variants: ``no-correction`` (coarse training from R_p theta without the linear term, the
  variant reported to give speedups for ResNets) and ``nested`` (train the coarsest level,
  prolong, continue on the next finer one: nested iteration).

Work is counted in *work units*: one unit is one gradient evaluation on the finest level
(forward + backward); a level's ``cost`` is the size of its gradient evaluation relative to
that; an objective value alone counts a third (forward only).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import GraphgrowError
from .hierarchy import (Hierarchy, ParamDict, Shifted, correction_linear_term, pd_add, pd_clone, pd_dot,
                        pd_sq_norm, pd_sub)

VARIANTS = ("mgopt", "no-correction", "nested")
SCHEDULES = ("constant", "diminishing")
FORWARD_SHARE = 1.0 / 3.0  # a forward pass is about a third of forward + backward


# -- configuration ----------------------------------------------------------------------------

@dataclass
class MGOptConfig:
    """Settings of the multilevel methods (names follow the thesis).

    alpha: fine SGD rate; alpha_bar: SGD rate on coarse levels (None: alpha); alpha_cgc: step
    along the prolonged correction; kappa: correction when ||R_g g||^2 > kappa ||g||^2; K: SGD
    steps on the coarsest level per correction; lam: regularisation of h; pre_smooth /
    post_smooth: SGD steps on intermediate levels of a V-cycle before / after their own
    correction; min_gap: fine SGD steps required between corrections (1 = Algorithm 5's "no
    correction at k-1"); descent_check: reject corrections with <g, e> >= 0; backtracking:
    maximal halvings of alpha_cgc under the Armijo condition (0: no Armijo check); schedule: constant, or
    diminishing (alpha_k = alpha / (1 + k / decay), the same for alpha_cgc; Robbins-Monro);
    nested_iterations: SGD iterations on each coarse level before prolonging (variant nested).
    """
    alpha: float = 0.1
    alpha_bar: float | None = None
    alpha_cgc: float = 1.0
    kappa: float = 0.5
    K: int = 10
    lam: float = 0.0
    variant: str = "mgopt"
    pre_smooth: int = 1
    post_smooth: int = 1
    min_gap: int = 1
    descent_check: bool = True
    backtracking: int = 0
    armijo: float = 1e-4
    schedule: str = "constant"
    decay: float = 100.0
    nested_iterations: int | Sequence[int] = 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def bad(message, hint=None):
            raise GraphgrowError(f"mgopt setting: {message}", hint=hint)
        if self.variant not in VARIANTS:
            bad(f"unknown variant '{self.variant}'", f"use one of {', '.join(VARIANTS)}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown step-size schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        for name in ("alpha", "alpha_cgc", "decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                bad(f"{name} must be a positive number, got {value!r}")
        if self.alpha_bar is not None and not self.alpha_bar > 0:
            bad(f"alpha_bar must be positive, got {self.alpha_bar!r}")
        if not 0 <= self.kappa < 1:
            bad(f"kappa must lie in [0, 1), got {self.kappa!r}",
                "the rule ||R_g g||^2 > kappa ||g||^2 compares a restricted gradient with the full one")
        if not (isinstance(self.K, int) and self.K >= 1):
            bad(f"K must be a positive integer, got {self.K!r}")
        if self.lam < 0:
            bad(f"lam must not be negative, got {self.lam!r}")
        for name in ("pre_smooth", "post_smooth", "backtracking"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                bad(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not (isinstance(self.min_gap, int) and self.min_gap >= 1):
            bad(f"min_gap must be at least 1, got {self.min_gap!r}",
                "Algorithm 5 forbids corrections in consecutive iterations")

    @property
    def coarse_rate(self) -> float:
        return self.alpha if self.alpha_bar is None else self.alpha_bar

    def rate(self, base: float, iteration: int) -> float:
        return base if self.schedule == "constant" else base / (1.0 + iteration / self.decay)

    def to_dict(self) -> dict:
        values = asdict(self)
        if not isinstance(values["nested_iterations"], int):
            values["nested_iterations"] = list(values["nested_iterations"])
        return values


# -- the multilevel optimiser -----------------------------------------------------------------

@dataclass
class StepInfo:
    """What one fine iteration did. kind: sgd, cgc or rejected (a correction that failed a
    safeguard and was replaced by an SGD step)."""
    iteration: int
    kind: str
    loss: float
    grad_sq_norm: float
    restricted_sq_norm: float | None = None
    slope: float | None = None
    step: float | None = None
    work: float = 0.0
    reason: str | None = None


class MultilevelOptimizer:
    """Algorithm 5 with recursive V-cycle corrections on a :class:`Hierarchy`.

    ``step(theta)`` performs one fine iteration and returns the new parameters and a
    :class:`StepInfo`; ``work`` accumulates work units. Randomness (mini-batches) comes only
    from ``generator``."""

    def __init__(self, hierarchy: Hierarchy, config: MGOptConfig, generator: torch.Generator):
        self.hierarchy = hierarchy
        self.config = config
        self.generator = generator
        self.iteration = 0
        self.since_correction = config.min_gap  # a correction may come first
        self.work = 0.0
        self.corrections = 0
        self.rejections = 0
        self.phase = (0, 0)   # (level, iterations done on it) of ``optimize``: nested runs start coarse
        self.iterate: ParamDict | None = None  # the parameters after the last iteration, on that level

    def state_dict(self) -> dict:
        """Counters, the mini-batch generator, the phase and the iterate: what a resumed run needs."""
        return {"iteration": self.iteration, "since_correction": self.since_correction, "work": self.work,
                "corrections": self.corrections, "rejections": self.rejections,
                "generator": self.generator.get_state(), "phase": list(self.phase),
                "iterate": pd_clone(self.iterate) if self.iterate is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for name in ("iteration", "since_correction", "work", "corrections", "rejections"):
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
        self.phase, self.iterate = tuple(state["phase"]), state["iterate"]

    # the expensive calls, counted
    def _grad(self, level: int, objective, params: ParamDict, batch) -> tuple[float, ParamDict]:
        self.work += self.hierarchy.levels[level].cost
        return objective.value_and_grad(params, batch)

    def _value(self, level: int, objective, params: ParamDict, batch) -> float:
        self.work += FORWARD_SHARE * self.hierarchy.levels[level].cost
        return objective.value(params, batch)

    def _sgd(self, level: int, objective, params: ParamDict, steps: int, rate: float) -> ParamDict:
        problem = self.hierarchy.levels[level]
        for _ in range(steps):
            _, grad = self._grad(level, objective, params, problem.draw_batch(self.generator))
            params = pd_add(params, grad, -rate)
        return params

    def wants_correction(self, grad: ParamDict, restricted: ParamDict) -> bool:
        """The kappa rule of Algorithm 5 plus the gap rule."""
        return (self.since_correction >= self.config.min_gap and
                pd_sq_norm(restricted) > self.config.kappa * pd_sq_norm(grad))

    def step(self, theta: ParamDict) -> tuple[ParamDict, StepInfo]:
        cfg = self.config
        fine = self.hierarchy.levels[0]
        batch = fine.draw_batch(self.generator)
        objective = Shifted(fine)
        loss, grad = self._grad(0, objective, theta, batch)
        info = StepInfo(self.iteration, "sgd", loss, pd_sq_norm(grad))
        if len(self.hierarchy) > 1 and cfg.variant != "nested":
            restricted = self.hierarchy.transfers[0].restrict_gradient(grad)
            info.restricted_sq_norm = pd_sq_norm(restricted)
            if self.wants_correction(grad, restricted):
                corrected, reason, slope, step = self.correct(0, objective, theta, grad, loss, batch)
                info.slope, info.step = slope, step
                if corrected is not None:
                    self.corrections += 1
                    self.since_correction = 0
                    info.kind = "cgc"
                    return self._finish(corrected, info)
                self.rejections += 1
                info.kind, info.reason = "rejected", reason
        theta = pd_add(theta, grad, -cfg.rate(cfg.alpha, self.iteration))
        self.since_correction += 1
        return self._finish(theta, info)

    def _finish(self, theta: ParamDict, info: StepInfo) -> tuple[ParamDict, StepInfo]:
        self.iteration += 1
        info.work = self.work
        return theta, info

    def correct(self, level: int, objective: Shifted, theta: ParamDict, grad: ParamDict, value: float,
                batch) -> tuple[ParamDict | None, str | None, float, float | None]:
        """A coarse grid correction of ``objective`` (level ``level``) at ``theta``, whose
        mini-batch gradient on ``batch`` is ``grad`` with value ``value``. Returns the new
        parameters (None if a safeguard rejected it), the reason, <grad, e> and the step."""
        cfg = self.config
        transfer = self.hierarchy.transfers[level]
        coarse = self.hierarchy.levels[level + 1]
        start = transfer.restrict(theta)
        if cfg.variant == "mgopt":
            linear, _ = correction_linear_term(transfer, coarse, grad, start, batch)
            self.work += coarse.cost
        else:
            linear = None
        coarse_objective = Shifted(coarse, linear, cfg.lam, start)
        end = self.solve(level + 1, coarse_objective, start)
        direction = transfer.prolong(pd_sub(end, start))
        slope = pd_dot(grad, direction)
        if cfg.descent_check and not slope < 0:
            return None, "ascent", slope, None
        step = cfg.rate(cfg.alpha_cgc, self.iteration)
        if cfg.backtracking == 0:
            return pd_add(theta, direction, step), None, slope, step
        for _ in range(cfg.backtracking + 1):  # alpha_cgc, alpha_cgc / 2, ... (Armijo on the same batch)
            trial = pd_add(theta, direction, step)
            if self._value(level, objective, trial, batch) <= value + cfg.armijo * step * slope:
                return trial, None, slope, step
            step *= 0.5
        return None, "backtracking", slope, step

    def solve(self, level: int, objective: Shifted, start: ParamDict) -> ParamDict:
        """Approximate minimisation of ``objective`` on ``level``: K SGD steps on the coarsest
        level, otherwise a V-cycle (pre-smoothing, correction from below, post-smoothing)."""
        cfg = self.config
        rate = cfg.coarse_rate
        if level == len(self.hierarchy) - 1:
            return self._sgd(level, objective, start, cfg.K, rate)
        params = self._sgd(level, objective, start, cfg.pre_smooth, rate)
        problem = self.hierarchy.levels[level]
        batch = problem.draw_batch(self.generator)
        value, grad = self._grad(level, objective, params, batch)
        corrected, _, _, _ = self.correct(level, objective, params, grad, value, batch)
        if corrected is not None:
            params = corrected
        return self._sgd(level, objective, params, cfg.post_smooth, rate)


def restrict_to(hierarchy: Hierarchy, theta: ParamDict, level: int) -> ParamDict:
    """R_p applied ``level`` times."""
    for transfer in hierarchy.transfers[:level]:
        theta = transfer.restrict(theta)
    return theta


def prolong_from(hierarchy: Hierarchy, theta: ParamDict, level: int, to: int = 0) -> ParamDict:
    """P applied from ``level`` up to level ``to``."""
    for transfer in reversed(hierarchy.transfers[to:level]):
        theta = transfer.prolong(theta)
    return theta


def nested_schedule(config: MGOptConfig, levels: int) -> list[int]:
    """SGD iterations on levels 1..L-1 (index l-1) for nested iteration."""
    count = config.nested_iterations
    return [int(count)] * (levels - 1) if isinstance(count, int) else [int(c) for c in count]


def optimize(hierarchy: Hierarchy, theta: ParamDict, config: MGOptConfig, iterations: int, *,
             seed: int = 0, work_budget: float | None = None, callback: Callable[[ParamDict, StepInfo, "MultilevelOptimizer"], Any] | None = None,
             resume: dict | None = None) -> tuple[ParamDict, list[StepInfo], MultilevelOptimizer]:
    """Run ``iterations`` fine iterations of the configured variant from ``theta``.

    For ``nested`` the coarse levels are trained first (``nested_iterations`` SGD steps each,
    coarsest first, starting from the restriction of ``theta``), the result is prolonged level
    by level, then ``iterations`` plain SGD steps run on the finest level. ``callback`` sees
    every fine iteration (and, for nested, every coarse one, prolonged to the fine level).
    ``work_budget``: stop as soon as that many work units are spent (at most ``iterations``).
    ``resume``: a ``MultilevelOptimizer.state_dict()`` taken in a callback of an earlier call
    with the same arguments; the run continues from there (``theta`` is then ignored) and the
    history holds the iterations after it."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = MultilevelOptimizer(hierarchy, config, generator)
    history: list[StepInfo] = []
    nested = config.variant == "nested" and len(hierarchy) > 1
    level, done = (len(hierarchy) - 1 if nested else 0), 0
    theta = pd_clone(theta)
    if resume is not None:
        optimizer.load_state_dict(resume)
        (level, done), theta = optimizer.phase, pd_clone(optimizer.iterate)
    elif nested:
        theta = restrict_to(hierarchy, theta, level)
    if level > 0:
        schedule = nested_schedule(config, len(hierarchy))
        params = theta
        for level in range(level, 0, -1):
            problem = hierarchy.levels[level]
            objective = Shifted(problem)
            for _ in range(schedule[level - 1] - done):
                if work_budget is not None and optimizer.work >= work_budget:
                    break
                batch = problem.draw_batch(generator)
                loss, grad = optimizer._grad(level, objective, params, batch)
                info = StepInfo(optimizer.iteration, f"level{level}", loss, pd_sq_norm(grad))
                params = pd_add(params, grad, -config.coarse_rate)
                params, info = optimizer._finish(params, info)
                done += 1
                optimizer.phase, optimizer.iterate = (level, done), params
                history.append(info)
                if callback is not None:
                    callback(prolong_from(hierarchy, params, level), info, optimizer)
            params = hierarchy.transfers[level - 1].prolong(params)
            done = 0
        theta = params
    for _ in range(iterations - done):
        if work_budget is not None and optimizer.work >= work_budget:
            break
        theta, info = optimizer.step(theta)
        done += 1
        optimizer.phase, optimizer.iterate = (0, done), theta
        history.append(info)
        if callback is not None:
            callback(theta, info, optimizer)
    return theta, history, optimizer
