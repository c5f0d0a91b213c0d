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
  Without pre-smoothing the gradient of h_l at its start is known (R_g of the finer gradient,
  first-order coherence), so no gradient is evaluated for it: ``pre_smooth = post_smooth = 0``
  goes straight to the coarsest level, paying only the coarse gradients of the linear terms.
* Safeguards (Section 2.4.3, Theorem 2.39): a correction is accepted only if <g, e> < 0 (a
  descent direction for the mini-batch objective) and, optionally, alpha_cgc is halved until
  the Armijo condition holds on the same mini-batch; a rejected correction becomes an SGD step.
* ``min_gap = 0`` ("a V-cycle every iteration"): every fine iteration takes its SGD step (the
  fine pre-smoothing) and then, if the kappa rule holds, a correction built from the gradient
  at the smoothed point. Without that fine step the blocks a restriction drops would never see
  their own gradient.
* ``same_batch``: every level of a correction (smoothing steps, coarse SGD steps) uses the fine
  mini-batch xi_k instead of drawing its own.
* ``momentum`` mu: heavy-ball SGD (m <- mu m + g, step -alpha m, as ``torch.optim.SGD``) on every
  level. The fine buffer lives across iterations (a correction leaves it alone); each coarse
  solve starts its own from zero; nested iteration prolongs it with P from level to level.
* Variants: ``no-correction`` (coarse training from R_p theta without the linear term, the
  variant reported to give speedups for ResNets) and ``nested`` (train the coarsest level,
  prolong, continue on the next finer one: nested iteration).

Work is counted in *work units*: one unit is one gradient evaluation on the finest level
(forward + backward); a level's ``cost`` is the size of its gradient evaluation relative to
that; an objective value alone counts a third (forward only); a transfer with a ``cost``
attribute adds that many units each time R_p, R_g or P is applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import MGOptConfig
from .hierarchy import (Hierarchy, ParamDict, Shifted, correction_linear_term, pd_add, pd_clone, pd_dot,
                        pd_sq_norm, pd_sub)

FORWARD_SHARE = 1.0 / 3.0  # a forward pass is about a third of forward + backward


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
        self.transfers = 0  # applications of R_p, R_g or P
        self.transfer_work = 0.0  # their cost, also included in ``work``
        self.velocity: ParamDict | None = None  # the momentum buffer of the level ``optimize`` trains
        self.batch = None  # the current fine mini-batch xi_k (reused by every level with same_batch)
        self.phase = (0, 0)   # (level, iterations done on it) of ``optimize``: nested runs start coarse
        self.iterate: ParamDict | None = None  # the parameters after the last iteration, on that level

    _COUNTERS = ("iteration", "since_correction", "work", "corrections", "rejections", "transfers", "transfer_work")

    def state_dict(self) -> dict:
        """Counters, the mini-batch generator, the phase, the iterate and the momentum buffer:
        what a resumed run needs (``batch`` is drawn anew at every fine step)."""
        return {**{name: getattr(self, name) for name in self._COUNTERS},
                "generator": self.generator.get_state(), "phase": list(self.phase),
                "iterate": pd_clone(self.iterate) if self.iterate is not None else None,
                "velocity": pd_clone(self.velocity) if self.velocity is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for name in self._COUNTERS:
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
        self.phase, self.iterate, self.velocity = tuple(state["phase"]), state["iterate"], state["velocity"]

    # the expensive calls, counted
    def _grad(self, level: int, objective, params: ParamDict, batch) -> tuple[float, ParamDict]:
        self.work += self.hierarchy.levels[level].cost
        return objective.value_and_grad(params, batch)

    def _value(self, level: int, objective, params: ParamDict, batch) -> float:
        self.work += FORWARD_SHARE * self.hierarchy.levels[level].cost
        return objective.value(params, batch)

    def draw(self, level: int):
        """The mini-batch of one step on ``level``: xi_k with ``same_batch``, else a fresh draw."""
        if self.config.same_batch and self.batch is not None:
            return self.batch
        return self.hierarchy.levels[level].draw_batch(self.generator)

    def descend(self, params: ParamDict, grad: ParamDict, rate: float,
                velocity: ParamDict | None) -> tuple[ParamDict, ParamDict | None]:
        """One (heavy-ball) SGD step; returns the new parameters and momentum buffer."""
        if not self.config.momentum:
            return pd_add(params, grad, -rate), None
        velocity = grad if velocity is None else pd_add(grad, velocity, self.config.momentum)
        return pd_add(params, velocity, -rate), velocity

    def _sgd(self, level: int, objective, params: ParamDict, steps: int, rate: float) -> ParamDict:
        velocity = None  # each coarse solve has its own momentum
        for _ in range(steps):
            _, grad = self._grad(level, objective, params, self.draw(level))
            params, velocity = self.descend(params, grad, rate, velocity)
        return params

    def wants_correction(self, grad: ParamDict, restricted: ParamDict) -> bool:
        """The kappa rule of Algorithm 5 plus the gap rule."""
        return (self.since_correction >= self.config.min_gap and
                pd_sq_norm(restricted) > self.config.kappa * pd_sq_norm(grad))

    def step(self, theta: ParamDict) -> tuple[ParamDict, StepInfo]:
        cfg = self.config
        fine = self.hierarchy.levels[0]
        self.batch = None
        batch = self.batch = self.draw(0)
        objective = Shifted(fine)
        loss, grad = self._grad(0, objective, theta, batch)
        info = StepInfo(self.iteration, "sgd", loss, pd_sq_norm(grad))
        wanted = False
        if len(self.hierarchy) > 1 and cfg.variant != "nested":
            restricted = self.transfer(0, "restrict_gradient", grad)
            info.restricted_sq_norm = pd_sq_norm(restricted)
            wanted = self.wants_correction(grad, restricted)
        if wanted and cfg.min_gap == 0:  # V-cycle: the SGD step smooths, then the correction
            theta = self._fine_sgd(theta, grad)
            batch = self.draw(0)
            loss, grad = self._grad(0, objective, theta, batch)
        if wanted:
            corrected, reason, slope, step = self.correct(0, objective, theta, grad, loss, batch)
            info.slope, info.step = slope, step
            if corrected is not None:
                self.corrections += 1
                self.since_correction = 0
                info.kind = "cgc"
                return self._finish(corrected, info)
            self.rejections += 1
            info.kind, info.reason = "rejected", reason
            if cfg.min_gap == 0:  # the smoothing step is already taken
                return self._finish(theta, info)
        theta = self._fine_sgd(theta, grad)
        self.since_correction += 1
        return self._finish(theta, info)

    def _fine_sgd(self, theta: ParamDict, grad: ParamDict) -> ParamDict:
        rate = self.config.rate(self.config.alpha, self.iteration)
        theta, self.velocity = self.descend(theta, grad, rate, self.velocity)
        return theta

    def transfer(self, level: int, direction: str, params: ParamDict) -> ParamDict:
        """R_p (restrict), R_g (restrict_gradient) or P (prolong) between ``level`` and
        ``level + 1``, its cost (the transfer's ``cost`` in work units, if it has one) counted."""
        transfer = self.hierarchy.transfers[level]
        self._count_transfer(transfer)
        return getattr(transfer, direction)(params)

    def _count_transfer(self, transfer) -> None:
        cost = getattr(transfer, "cost", 0.0)
        self.work += cost
        self.transfer_work += cost
        self.transfers += 1

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
        start = self.transfer(level, "restrict", theta)
        known = None
        if cfg.variant == "mgopt":
            linear, coarse_grad = correction_linear_term(transfer, coarse, grad, start, batch)
            self.work += coarse.cost  # the coarse gradient in v; R_g is counted next
            self._count_transfer(transfer)
            # first-order coherence: grad h(R_p theta) = G_H + v = R_g g on this batch
            known = (batch, pd_add(coarse_grad, linear))
        else:
            linear = None
        coarse_objective = Shifted(coarse, linear, cfg.lam, start)
        end = self.solve(level + 1, coarse_objective, start, known)
        direction = self.transfer(level, "prolong", pd_sub(end, start))
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

    def solve(self, level: int, objective: Shifted, start: ParamDict, known=None) -> ParamDict:
        """Approximate minimisation of ``objective`` on ``level``: K SGD steps on the coarsest
        level, otherwise a V-cycle (pre-smoothing, correction from below, post-smoothing).
        ``known``: (batch, gradient of ``objective`` at ``start`` on it); without pre-smoothing
        the next correction is built from it instead of a new gradient evaluation."""
        cfg = self.config
        rate = cfg.coarse_rate
        if level == len(self.hierarchy) - 1:
            return self._sgd(level, objective, start, cfg.K, rate)
        params = self._sgd(level, objective, start, cfg.pre_smooth, rate)
        if cfg.pre_smooth == 0 and known is not None:
            batch, grad = known
            value = self._value(level, objective, params, batch) if cfg.backtracking else math.nan
        else:
            batch = self.draw(level)
            value, grad = self._grad(level, objective, params, batch)
        corrected, _, _, _ = self.correct(level, objective, params, grad, value, batch)
        if corrected is not None:
            params = corrected
        return self._sgd(level, objective, params, cfg.post_smooth, rate)


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
        for finer in range(level):
            theta = optimizer.transfer(finer, "restrict", theta)
    if level > 0:
        schedule = nested_schedule(config, len(hierarchy))
        params = theta
        for level in range(level, 0, -1):
            problem = hierarchy.levels[level]
            objective = Shifted(problem)
            for _ in range(schedule[level - 1] - done):
                if work_budget is not None and optimizer.work >= work_budget:
                    break
                loss, grad = optimizer._grad(level, objective, params, problem.draw_batch(generator))
                info = StepInfo(optimizer.iteration, f"level{level}", loss, pd_sq_norm(grad))
                params, optimizer.velocity = optimizer.descend(params, grad, config.coarse_rate, optimizer.velocity)
                params, info = optimizer._finish(params, info)
                done += 1
                optimizer.phase, optimizer.iterate = (level, done), params
                history.append(info)
                if callback is not None:  # evaluation only: this prolongation is not training work
                    callback(prolong_from(hierarchy, params, level), info, optimizer)
            params = optimizer.transfer(level - 1, "prolong", params)
            if optimizer.velocity is not None:  # the momentum buffer is a step direction: prolong it as well
                optimizer.velocity = optimizer.transfer(level - 1, "prolong", optimizer.velocity)
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
