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
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import GraphgrowError

ParamDict = dict[str, torch.Tensor]

VARIANTS = ("mgopt", "no-correction", "nested")
SCHEDULES = ("constant", "diminishing")
FORWARD_SHARE = 1.0 / 3.0  # a forward pass is about a third of forward + backward


# -- arithmetic on parameter dicts ------------------------------------------------------------

def pd_add(x: ParamDict, y: ParamDict, scale: float = 1.0) -> ParamDict:
    """x + scale * y."""
    return {k: x[k] + scale * y[k] for k in x}


def pd_sub(x: ParamDict, y: ParamDict) -> ParamDict:
    return {k: x[k] - y[k] for k in x}


def pd_scale(x: ParamDict, scale: float) -> ParamDict:
    return {k: scale * v for k, v in x.items()}


def pd_dot(x: ParamDict, y: ParamDict) -> float:
    return float(sum((x[k] * y[k]).sum() for k in x))


def pd_sq_norm(x: ParamDict) -> float:
    return pd_dot(x, x)


def pd_clone(x: ParamDict) -> ParamDict:
    return {k: v.detach().clone() for k, v in x.items()}


# -- the problem interface --------------------------------------------------------------------

class Problem(Protocol):
    """One level: a stochastic objective on parameter dicts.

    ``draw_batch(generator)`` returns this level's own mini-batch; ``value_and_grad`` and
    ``value`` accept a batch drawn by this level *or by the next finer level* (the correction
    term evaluates the coarse gradient on the fine mini-batch). ``cost``: work units of one
    gradient evaluation on a batch of this level."""
    cost: float

    def draw_batch(self, generator: torch.Generator) -> Any: ...

    def value_and_grad(self, params: ParamDict, batch: Any) -> tuple[float, ParamDict]: ...

    def value(self, params: ParamDict, batch: Any) -> float: ...


class Transfer(Protocol):
    """Linear maps between a fine level and the next coarser one."""

    def restrict(self, fine: ParamDict) -> ParamDict: ...            # R_p

    def restrict_gradient(self, fine: ParamDict) -> ParamDict: ...   # R_g

    def prolong(self, coarse: ParamDict) -> ParamDict: ...           # P_p


class IdentityTransfer:
    """R_p = R_g = P = identity (Example 3.38: batch-size and resolution hierarchies)."""

    def restrict(self, fine: ParamDict) -> ParamDict:
        return dict(fine)

    restrict_gradient = restrict

    def prolong(self, coarse: ParamDict) -> ParamDict:
        return dict(coarse)


class MatrixTransfer:
    """Transfers of one flat parameter vector (key ``key``) by explicit matrices."""

    def __init__(self, restriction: torch.Tensor, prolongation: torch.Tensor,
                 gradient_restriction: torch.Tensor | None = None, key: str = "theta"):
        self.R_p = restriction
        self.P = prolongation
        self.R_g = restriction if gradient_restriction is None else gradient_restriction
        self.key = key

    def restrict(self, fine: ParamDict) -> ParamDict:
        return {self.key: self.R_p @ fine[self.key]}

    def restrict_gradient(self, fine: ParamDict) -> ParamDict:
        return {self.key: self.R_g @ fine[self.key]}

    def prolong(self, coarse: ParamDict) -> ParamDict:
        return {self.key: self.P @ coarse[self.key]}


@dataclass
class Hierarchy:
    """Levels (0 finest) and the transfers between level l and l+1."""
    levels: list
    transfers: list
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.levels) < 1 or len(self.transfers) != len(self.levels) - 1:
            raise ValueError(f"{len(self.levels)} levels need {len(self.levels) - 1} transfers, "
                             f"got {len(self.transfers)}")
        if not self.names:
            self.names = [f"level{l}" for l in range(len(self.levels))]

    def __len__(self) -> int:
        return len(self.levels)


# -- the correction objective h ---------------------------------------------------------------

@dataclass
class Shifted:
    """h(t) = f(t) + <v, t> + lam/2 ||t - anchor||^2 on one level (v, anchor None: h = f)."""
    problem: Any
    linear: ParamDict | None = None
    lam: float = 0.0
    anchor: ParamDict | None = None

    def _extra(self, params: ParamDict) -> float:
        value = 0.0
        if self.linear is not None:
            value += pd_dot(self.linear, params)
        if self.lam and self.anchor is not None:
            value += 0.5 * self.lam * pd_sq_norm(pd_sub(params, self.anchor))
        return value

    def value_and_grad(self, params: ParamDict, batch) -> tuple[float, ParamDict]:
        value, grad = self.problem.value_and_grad(params, batch)
        if self.linear is not None:
            grad = pd_add(grad, self.linear)
        if self.lam and self.anchor is not None:
            grad = pd_add(grad, pd_sub(params, self.anchor), self.lam)
        return value + self._extra(params), grad

    def value(self, params: ParamDict, batch) -> float:
        return self.problem.value(params, batch) + self._extra(params)


def correction_linear_term(transfer, coarse_problem, fine_grad: ParamDict, coarse_start: ParamDict,
                           batch) -> tuple[ParamDict, ParamDict]:
    """v = R_g g - grad f_H(R_p theta) on the fine mini-batch; returns (v, grad f_H(R_p theta))."""
    _, coarse_grad = coarse_problem.value_and_grad(coarse_start, batch)
    return pd_sub(transfer.restrict_gradient(fine_grad), coarse_grad), coarse_grad


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
             seed: int = 0, work_budget: float | None = None, callback: Callable[[ParamDict, StepInfo, "MultilevelOptimizer"], Any] | None = None
             ) -> tuple[ParamDict, list[StepInfo], MultilevelOptimizer]:
    """Run ``iterations`` fine iterations of the configured variant from ``theta``.

    For ``nested`` the coarse levels are trained first (``nested_iterations`` SGD steps each,
    coarsest first, starting from the restriction of ``theta``), the result is prolonged level
    by level, then ``iterations`` plain SGD steps run on the finest level. ``callback`` sees
    every fine iteration (and, for nested, every coarse one, prolonged to the fine level).
    ``work_budget``: stop as soon as that many work units are spent (at most ``iterations``)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = MultilevelOptimizer(hierarchy, config, generator)
    history: list[StepInfo] = []
    theta = pd_clone(theta)
    if config.variant == "nested" and len(hierarchy) > 1:
        schedule = nested_schedule(config, len(hierarchy))
        coarsest = len(hierarchy) - 1
        params = restrict_to(hierarchy, theta, coarsest)
        for level in range(coarsest, 0, -1):
            problem = hierarchy.levels[level]
            objective = Shifted(problem)
            for _ in range(schedule[level - 1]):
                if work_budget is not None and optimizer.work >= work_budget:
                    break
                batch = problem.draw_batch(generator)
                loss, grad = optimizer._grad(level, objective, params, batch)
                info = StepInfo(optimizer.iteration, f"level{level}", loss, pd_sq_norm(grad))
                params = pd_add(params, grad, -config.coarse_rate)
                params, info = optimizer._finish(params, info)
                history.append(info)
                if callback is not None:
                    callback(prolong_from(hierarchy, params, level), info, optimizer)
            params = hierarchy.transfers[level - 1].prolong(params)
        theta = params
    for _ in range(iterations):
        if work_budget is not None and optimizer.work >= work_budget:
            break
        theta, info = optimizer.step(theta)
        history.append(info)
        if callback is not None:
            callback(theta, info, optimizer)
    return theta, history, optimizer


# -- the engine function the CLI calls ----------------------------------------------------------

@dataclass
class MGOptResult:
    network: Any
    records: list[dict]
    summary: dict
    out: Any = None


def run(spec, data="spiral", *, hierarchy: str = "depth", levels: int = 2, kappa: float = 0.5, K: int = 10,
        lam: float = 0.0, alpha: float = 0.1, alpha_bar: float | None = None, alpha_cgc: float = 1.0,
        variant: str = "mgopt", epochs: int = 10, batch: int | None = 100, loss: str = "cross_entropy",
        pre_smooth: int = 1, post_smooth: int = 1, min_gap: int = 1, descent_check: bool = True,
        backtracking: int = 0, schedule: str = "constant", decay: float = 100.0, nested_epochs: int = 1,
        interpolation: str = "constant", out=None, seed: int = 0, progress: bool = False, eval_every: int = 1,
        evals_per_epoch: int = 1, work_budget: float | None = None, log_steps: bool = True,
        export: bool = True) -> MGOptResult:
    """Train ``spec`` on ``data`` with multilevel optimisation on a hierarchy built from it.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. ``hierarchy``: depth | width | batch | resolution with ``levels`` levels (1 level:
    plain SGD). ``variant``: mgopt (Algorithm 5, V-cycle for levels > 2), no-correction, or
    nested (``nested_epochs`` epochs of SGD on each coarse level, coarsest first, then
    ``epochs`` on the finest). ``interpolation`` (constant | linear) is the depth prolongation.
    One epoch is ceil(train size / batch) fine iterations with mini-batches drawn by ``seed``.
    With ``out`` the run directory gets log.jsonl (step and eval records with wall time and
    work units), summary.json, final.yaml + .pt, model.pt2 and curves.png. The full training and
    test sets are evaluated every ``eval_every`` epochs, or ``evals_per_epoch`` times per epoch.
    ``work_budget`` (work units, one = a fine gradient evaluation) ends training when spent,
    whichever of it and ``epochs`` comes first (to compare contenders at equal work)."""
    from .mgopt_network import build_network_hierarchy, iterations_per_epoch, load_params
    from .plots import plot_run
    from .runlog import RunLog
    from .sensli import load_data, load_network
    from .train import as_splits, check_data_fits

    config = MGOptConfig(alpha=alpha, alpha_bar=alpha_bar, alpha_cgc=alpha_cgc, kappa=kappa, K=K, lam=lam,
                         variant=variant, pre_smooth=pre_smooth, post_smooth=post_smooth, min_gap=min_gap,
                         descent_check=descent_check, backtracking=backtracking, schedule=schedule, decay=decay)
    if not (isinstance(epochs, int) and epochs >= 0):
        raise GraphgrowError(f"epochs must be a non-negative integer, got {epochs!r}")
    dataset = load_data(data, seed)
    network = load_network(spec, seed)
    train_split, test_split = as_splits(dataset)
    check_data_fits(network, train_split)
    options = {"interpolation": interpolation} if hierarchy == "depth" else {}
    levels_built = build_network_hierarchy(network, train_split, hierarchy, levels, batch=batch, loss=loss, **options)
    per_epoch = iterations_per_epoch(len(train_split), batch)
    if not (isinstance(evals_per_epoch, int) and evals_per_epoch >= 1 and isinstance(eval_every, int) and eval_every >= 1):
        raise GraphgrowError("eval_every and evals_per_epoch must be positive integers")
    eval_interval = max(per_epoch // evals_per_epoch, 1) if evals_per_epoch > 1 else per_epoch * eval_every
    config.nested_iterations = nested_epochs * per_epoch
    iterations = epochs * per_epoch
    fine = levels_built.levels[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = iterations + (config.nested_iterations * (len(levels_built) - 1) if variant == "nested" else 0)
        bar = tqdm(total=total, desc=f"mgopt {variant}", unit="it", leave=False, dynamic_ncols=True)

    with RunLog(out) as log:
        log.log("start", config=config.to_dict(), hierarchy=hierarchy, levels=levels_built.names,
                network=network.graph.name, params=network.graph.num_params(), flops=network.graph.flops(),
                costs=[p.cost for p in levels_built.levels], epochs=epochs, batch=batch, seed=seed,
                train_size=len(train_split), test_size=len(test_split) if test_split else 0)
        origin = time.perf_counter()
        excluded = 0.0  # evaluation time is not training time

        def evaluate_and_log(params, iteration, epoch, work, phase="fine"):
            nonlocal excluded
            began = time.perf_counter()
            train = fine.evaluate(params, train_split)
            test = fine.evaluate(params, test_split) if test_split is not None else None
            record = log.log("eval", epoch=epoch, iteration=iteration, work=work, phase=phase,
                             train_time=began - origin - excluded, train_loss=train["loss"],
                             train_error=train["error"], test_loss=test and test["loss"],
                             test_error=test and test["error"])
            excluded += time.perf_counter() - began
            return record

        evaluate_and_log(fine.parameters(), 0, 0, 0.0)
        seen = {"fine": 0}

        def on_iteration(params, info, optimizer):
            if log_steps:
                log.log("step", iteration=info.iteration, kind=info.kind, loss=info.loss, work=info.work,
                        grad_sq_norm=info.grad_sq_norm, restricted_sq_norm=info.restricted_sq_norm,
                        slope=info.slope, step=info.step, reason=info.reason)
            if bar is not None:
                bar.update(1)
            if not math.isfinite(info.loss):
                raise _Diverged(info.iteration)
            if info.kind.startswith("level"):
                done = info.iteration + 1
                if done % eval_interval == 0:
                    evaluate_and_log(params, done, 0, info.work, phase=info.kind)
                return
            seen["fine"] += 1
            last = seen["fine"] == iterations or (work_budget is not None and optimizer.work >= work_budget)
            if seen["fine"] % eval_interval == 0 or last:
                epoch = seen["fine"] / per_epoch
                evaluate_and_log(params, info.iteration + 1, int(epoch) if epoch.is_integer() else epoch, info.work)

        try:
            theta, history, optimizer = optimize(levels_built, fine.parameters(), config, iterations, seed=seed,
                                                 work_budget=work_budget, callback=on_iteration)
            diverged = None
        except _Diverged as stop:
            log.log("diverged", iteration=stop.iteration)
            theta, history, optimizer, diverged = None, [], None, stop.iteration
        finally:
            if bar is not None:
                bar.close()
        if theta is not None:
            load_params(network, theta)
        final = {"train": fine.evaluate(fine.parameters(), train_split),
                 "test": fine.evaluate(fine.parameters(), test_split) if test_split is not None else None,
                 "train_time": time.perf_counter() - origin - excluded,
                 "work": optimizer.work if optimizer else None,
                 "iterations": len(history), "corrections": optimizer.corrections if optimizer else 0,
                 "rejected": optimizer.rejections if optimizer else 0, "diverged": diverged}
        log.log("end", **final)
        summary = {"spec": str(getattr(network.graph, "source", None) or network.graph.name),
                   "hierarchy": hierarchy, "levels": levels_built.names,
                   "costs": [p.cost for p in levels_built.levels], "variant": variant, "seed": seed,
                   "epochs": epochs, "batch": batch, "config": config.to_dict(), "final": final}
        if out is not None:
            log.save_network(network)
            if export:
                log.export(network)
            plot_run(log.records, log.path("curves.png"),
                     title=f"{network.graph.name}: MG/Opt {variant}, {hierarchy} x{len(levels_built)}")
            log.write_json("summary.json", summary)
    return MGOptResult(network, log.records, summary, out)


class _Diverged(Exception):
    def __init__(self, iteration: int):
        super().__init__(f"loss is not finite at iteration {iteration}")
        self.iteration = iteration
