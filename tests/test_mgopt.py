"""MG/Opt on the abstract problem interface: the thesis identities (float64, compared with
independent matrix computations), the kappa and gap rules, V-cycles and safeguards."""
from __future__ import annotations

import pytest
import torch

from graphgrow.errors import GraphgrowError
from graphgrow.mgopt import (Hierarchy, IdentityTransfer, MatrixTransfer, MGOptConfig, MultilevelOptimizer,
                             Shifted, correction_linear_term, optimize, pd_sq_norm)
from graphgrow.mgopt.quadratic import CoarseQuadratic, QuadraticProblem

KEY = "theta"
f64 = torch.float64


class TanhRegression:
    """A non-convex full-batch objective mean_i (tanh(x_i . w) - y_i)^2 of w = P_level theta, so
    the same class serves as fine and coarse level (the coarse one sees w = P theta_bar)."""
    cost = 1.0

    def __init__(self, x, y, lift=None):
        self.x, self.y, self.lift = x, y, lift

    def draw_batch(self, generator):
        return None  # full batch: gradients are exact, so the identities are exact

    def _loss(self, theta):
        w = theta if self.lift is None else self.lift @ theta
        return ((torch.tanh(self.x @ w) - self.y) ** 2).mean()

    def value(self, params, batch=None):
        return float(self._loss(params[KEY]))

    def value_and_grad(self, params, batch=None):
        theta = params[KEY].detach().requires_grad_(True)
        loss = self._loss(theta)
        (grad,) = torch.autograd.grad(loss, theta)
        return float(loss.detach()), {KEY: grad}


def tanh_two_level(seed=0, n=6, m=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, n, generator=g, dtype=f64)
    y = torch.randn(20, generator=g, dtype=f64)
    P = torch.randn(n, m, generator=g, dtype=f64)
    R = 0.5 * P.T  # R_p = R_g = 1/2 P^T as for the ResNet depth hierarchy
    fine = TanhRegression(x, y)
    coarse = TanhRegression(x, y, lift=P)
    coarse.cost = 0.5
    theta = {KEY: torch.randn(n, generator=g, dtype=f64)}
    return Hierarchy([fine, coarse], [MatrixTransfer(R, P)]), theta, P, R


def test_first_order_coherence_one_coarse_step_gives_minus_alpha_P_Rg_grad():
    """Lemma 2.34: K = 1, lam = 0: e = -alpha_bar P R_g grad f(theta)."""
    hierarchy, theta, P, R = tanh_two_level()
    alpha_bar = 0.3
    config = MGOptConfig(alpha=0.1, alpha_bar=alpha_bar, alpha_cgc=1.0, K=1, lam=0.0, kappa=0.0,
                         descent_check=False)
    optimizer = MultilevelOptimizer(hierarchy, config, torch.Generator().manual_seed(0))
    new, info = optimizer.step(theta)
    assert info.kind == "cgc"
    # work: the fine gradient, the coarse gradient of the linear term, K = 1 coarse step
    assert optimizer.work == 1.0 + 0.5 + 0.5
    _, grad = hierarchy.levels[0].value_and_grad(theta)
    expected = -alpha_bar * P @ (R @ grad[KEY])
    torch.testing.assert_close(new[KEY] - theta[KEY], expected, rtol=1e-12, atol=1e-14)


def test_correction_gradient_at_restricted_point_is_restricted_fine_gradient():
    """grad h(R_p theta) = R_g grad f(theta), also with the lam term (it vanishes there)."""
    hierarchy, theta, P, R = tanh_two_level(seed=1)
    fine, coarse = hierarchy.levels
    transfer = hierarchy.transfers[0]
    _, grad = fine.value_and_grad(theta)
    start = transfer.restrict(theta)
    linear, _ = correction_linear_term(transfer, coarse, grad, start, None)
    for lam in (0.0, 2.5):
        _, h_grad = Shifted(coarse, linear, lam, start).value_and_grad(start, None)
        torch.testing.assert_close(h_grad[KEY], R @ grad[KEY], rtol=1e-12, atol=1e-14)
    # the coarse gradient itself differs: the linear term is what makes h first-order coherent
    _, plain = coarse.value_and_grad(start)
    assert not torch.allclose(plain[KEY], R @ grad[KEY])


class ScriptedProblem:
    """Fine level whose k-th mini-batch gradient is script[k] (batches are counters)."""
    cost = 1.0

    def __init__(self, script):
        self.script = [torch.tensor(g, dtype=f64) for g in script]
        self.drawn = 0

    def draw_batch(self, generator):
        self.drawn += 1
        return self.drawn - 1

    def value(self, params, batch):
        return 0.0

    def value_and_grad(self, params, batch):
        return 0.0, {KEY: self.script[batch].clone()}


class CoarseBowl:
    """f_H(t) = 1/2 ||t||^2 with exact gradients."""
    cost = 0.5

    def draw_batch(self, generator):
        return None

    def value(self, params, batch=None):
        return 0.5 * float(params[KEY] @ params[KEY])

    def value_and_grad(self, params, batch=None):
        return self.value(params), {KEY: params[KEY].clone()}


def test_kappa_rule_and_no_consecutive_corrections_on_scripted_gradients():
    # R_g picks the first coordinate; ||R_g g||^2 / ||g||^2 = a^2 / (a^2 + b^2)
    script = [(3, 1), (3, 1), (1, 3), (3, 1), (1, 1), (3, 1), (3, 1), (3, 1), (0, 2), (2, 0)]
    kappa = 0.6
    R = torch.tensor([[1.0, 0.0]], dtype=f64)
    hierarchy = Hierarchy([ScriptedProblem(script), CoarseBowl()], [MatrixTransfer(R, R.T)])
    config = MGOptConfig(alpha=0.1, kappa=kappa, K=2, descent_check=False)
    optimizer = MultilevelOptimizer(hierarchy, config, torch.Generator().manual_seed(0))
    theta = {KEY: torch.zeros(2, dtype=f64)}
    kinds = []
    for _ in script:
        theta, info = optimizer.step(theta)
        kinds.append(info.kind)
    expected, previous = [], "sgd"
    for a, b in script:  # Algorithm 5's rule, written out independently
        ratio = a * a / (a * a + b * b)
        previous = "cgc" if ratio > kappa and previous != "cgc" else "sgd"
        expected.append(previous)
    assert kinds == expected
    assert kinds.count("cgc") == 5  # the script exercises both rules, not only one of them


def test_min_gap_requires_that_many_sgd_steps_between_corrections():
    script = [(1, 0)] * 9  # every gradient lies in the coarse space
    R = torch.tensor([[1.0, 0.0]], dtype=f64)
    hierarchy = Hierarchy([ScriptedProblem(script), CoarseBowl()], [MatrixTransfer(R, R.T)])
    optimizer = MultilevelOptimizer(hierarchy, MGOptConfig(kappa=0.5, min_gap=3, descent_check=False),
                                    torch.Generator())
    theta = {KEY: torch.zeros(2, dtype=f64)}
    kinds = []
    for _ in script:
        theta, info = optimizer.step(theta)
        kinds.append(info.kind)
    assert kinds == ["cgc", "sgd", "sgd", "sgd", "cgc", "sgd", "sgd", "sgd", "cgc"]


def galerkin_hierarchy(levels=3, n=12, seed=0, sig=0.0):
    """A convex quadratic with Galerkin coarse levels R A P, P random full rank, R = P^T / 2."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=f64)
    A = M @ M.T / n + 0.1 * torch.eye(n, dtype=f64)
    b = torch.randn(n, generator=g, dtype=f64)
    problems, transfers = [QuadraticProblem(A, b, sig, sig)], []
    size = n
    base = problems[0]
    P_total = torch.eye(n, dtype=f64)
    for _ in range(levels - 1):
        P = torch.randn(size, size // 2, generator=g, dtype=f64)
        R = 0.5 * P.T
        transfers.append(MatrixTransfer(R, P))
        P_total = P_total @ P
        R_total = 0.5 ** len(transfers) * P_total.T
        problems.append(CoarseQuadratic(base, R_total, P_total, cost=0.5 ** len(transfers)))
        size //= 2
    theta = {KEY: torch.randn(n, generator=g, dtype=f64)}
    return Hierarchy(problems, transfers), theta


def test_three_level_v_cycle_decreases_a_convex_quadratic():
    hierarchy, theta = galerkin_hierarchy(levels=3)
    fine = hierarchy.levels[0]
    config = MGOptConfig(alpha=0.05, alpha_bar=0.05, K=5, pre_smooth=2, post_smooth=2, kappa=0.0,
                         lam=0.1, backtracking=8)
    start = fine.value(theta)
    values = [start]

    def record(params, info, optimizer):
        values.append(fine.value(params))

    end, history, optimizer = optimize(hierarchy, theta, config, 12, seed=0, callback=record)
    kinds = [info.kind for info in history]
    assert kinds.count("cgc") >= 4  # the V-cycle ran, not only fine SGD
    for before, after, kind in zip(values, values[1:], kinds):
        assert after < before, f"{kind} step increased the objective"


def test_safeguard_rejects_an_ascent_correction_and_takes_the_sgd_step():
    hierarchy, theta = galerkin_hierarchy(levels=2, seed=3)
    fine, coarse = hierarchy.levels
    R = hierarchy.transfers[0].R_p
    # a prolongation pointing the wrong way: e = -alpha_bar (-R^T) R g is an ascent direction
    flipped = Hierarchy([fine, coarse], [MatrixTransfer(R, -R.T)])
    config = MGOptConfig(alpha=0.05, kappa=0.0, K=1, lam=0.0)
    optimizer = MultilevelOptimizer(flipped, config, torch.Generator())
    new, info = optimizer.step(theta)
    _, grad = fine.value_and_grad(theta)
    assert info.kind == "rejected" and info.reason == "ascent" and info.slope > 0
    torch.testing.assert_close(new[KEY], theta[KEY] - 0.05 * grad[KEY])
    # without the check the same correction is taken and increases the objective
    unchecked = MultilevelOptimizer(flipped, MGOptConfig(alpha=0.05, kappa=0.0, K=1, descent_check=False),
                                    torch.Generator())
    worse, info = unchecked.step(theta)
    assert info.kind == "cgc" and fine.value(worse) > fine.value(theta)


def test_backtracking_halves_alpha_cgc_until_armijo_holds():
    hierarchy, theta = galerkin_hierarchy(levels=2, seed=4)
    fine = hierarchy.levels[0]
    config = MGOptConfig(alpha=0.05, alpha_bar=0.05, alpha_cgc=64.0, kappa=0.0, K=3, backtracking=12)
    optimizer = MultilevelOptimizer(hierarchy, config, torch.Generator())
    new, info = optimizer.step(theta)
    assert info.kind == "cgc" and info.step < 64.0
    assert fine.value(new) <= fine.value(theta) + config.armijo * info.step * info.slope
    # the step before the accepted one violated the Armijo condition (so halving was needed)
    direction = (new[KEY] - theta[KEY]) / info.step
    previous = fine.value({KEY: theta[KEY] + 2 * info.step * direction})
    assert previous > fine.value(theta) + config.armijo * 2 * info.step * info.slope


def test_no_correction_variant_trains_the_plain_coarse_objective():
    hierarchy, theta, P, R = tanh_two_level(seed=2)
    config = MGOptConfig(alpha_bar=0.3, K=1, kappa=0.0, variant="no-correction", descent_check=False)
    new, info = MultilevelOptimizer(hierarchy, config, torch.Generator()).step(theta)
    _, coarse_grad = hierarchy.levels[1].value_and_grad({KEY: R @ theta[KEY]})
    torch.testing.assert_close(new[KEY] - theta[KEY], -0.3 * P @ coarse_grad[KEY], rtol=1e-12, atol=1e-14)


def test_nested_iteration_trains_coarse_then_prolongs_then_fine_sgd():
    hierarchy, theta, P, R = tanh_two_level(seed=5)
    config = MGOptConfig(alpha=0.2, variant="nested", nested_iterations=3)
    end, history, _ = optimize(hierarchy, theta, config, 2, seed=0)
    assert [i.kind for i in history] == ["level1"] * 3 + ["sgd"] * 2
    coarse = {KEY: R @ theta[KEY]}
    for _ in range(3):
        _, g = hierarchy.levels[1].value_and_grad(coarse)
        coarse = {KEY: coarse[KEY] - 0.2 * g[KEY]}
    fine = {KEY: P @ coarse[KEY]}
    for _ in range(2):
        _, g = hierarchy.levels[0].value_and_grad(fine)
        fine = {KEY: fine[KEY] - 0.2 * g[KEY]}
    torch.testing.assert_close(end[KEY], fine[KEY], rtol=1e-12, atol=1e-14)


def test_diminishing_step_sizes_follow_robbins_monro_schedule():
    hierarchy, theta, _, _ = tanh_two_level(seed=6)
    single = Hierarchy(hierarchy.levels[:1], [])
    config = MGOptConfig(alpha=0.4, schedule="diminishing", decay=2.0)
    end, _, _ = optimize(single, theta, config, 3, seed=0)
    expected = theta[KEY]
    for k in range(3):
        _, g = single.levels[0].value_and_grad({KEY: expected})
        expected = expected - 0.4 / (1 + k / 2.0) * g[KEY]
    torch.testing.assert_close(end[KEY], expected, rtol=1e-12, atol=1e-14)


def test_same_seed_same_run_on_noisy_problem():
    hierarchy, theta = galerkin_hierarchy(levels=3, sig=0.2)
    config = MGOptConfig(alpha=0.05, K=3, kappa=0.1)
    first, h1, _ = optimize(hierarchy, theta, config, 10, seed=7)
    second, h2, _ = optimize(hierarchy, theta, config, 10, seed=7)
    other, _, _ = optimize(hierarchy, theta, config, 10, seed=8)
    assert torch.equal(first[KEY], second[KEY]) and [i.kind for i in h1] == [i.kind for i in h2]
    assert not torch.equal(first[KEY], other[KEY])


def test_identity_transfer_with_identical_levels_gives_zero_linear_term():
    """Example 3.38 with the same mini-batch: v = R_g g - G_H(R_p theta, xi) = 0."""
    hierarchy, theta, _, _ = tanh_two_level(seed=8)
    fine = hierarchy.levels[0]
    _, grad = fine.value_and_grad(theta)
    linear, _ = correction_linear_term(IdentityTransfer(), fine, grad, theta, None)
    assert pd_sq_norm(linear) == 0.0


@pytest.mark.parametrize("settings, word", [({"variant": "vcycle"}, "variant"), ({"kappa": 1.5}, "kappa"),
                                             ({"K": 0}, "K"), ({"min_gap": -1}, "min_gap"), ({"momentum": 1.0}, "momentum"),
                                             ({"alpha": -1.0}, "alpha")])
def test_bad_settings_raise_graphgrow_error(settings, word):
    with pytest.raises(GraphgrowError, match=word):
        MGOptConfig(**settings)


def test_min_gap_zero_is_a_v_cycle_every_iteration_sgd_step_then_correction():
    """min_gap = 0: theta' = theta - alpha g(theta), then the correction at theta' from
    g(theta'); written out with the matrices."""
    hierarchy, theta, P, R = tanh_two_level(seed=9)
    fine, coarse = hierarchy.levels
    alpha, alpha_bar, K = 0.2, 0.3, 2
    config = MGOptConfig(alpha=alpha, alpha_bar=alpha_bar, K=K, kappa=0.0, min_gap=0, descent_check=False)
    end, history, optimizer = optimize(hierarchy, theta, config, 3, seed=0)
    assert [i.kind for i in history] == ["cgc"] * 3
    expected = theta[KEY]
    for _ in range(3):
        expected = expected - alpha * fine.value_and_grad({KEY: expected})[1][KEY]
        g = fine.value_and_grad({KEY: expected})[1][KEY]
        start = R @ expected
        v = R @ g - coarse.value_and_grad({KEY: start})[1][KEY]
        t = start
        for _ in range(K):
            t = t - alpha_bar * (coarse.value_and_grad({KEY: t})[1][KEY] + v)
        expected = expected + P @ (t - start)
    torch.testing.assert_close(end[KEY], expected, rtol=1e-12, atol=1e-14)
    # per iteration: 2 fine gradients, the coarse gradient of v, K coarse steps (cost 0.5 each)
    assert optimizer.work == 3 * (2 + 0.5 + K * 0.5)
    assert optimizer.transfers == 3 * 4  # R_g for the kappa rule, R_p, R_g for v, P


class Recording:
    """Wraps a problem; logs the batch of every gradient evaluation as (level, batch)."""

    def __init__(self, problem, level, log):
        self.problem, self.level, self.log, self.cost = problem, level, log, problem.cost

    def draw_batch(self, generator):
        return self.problem.draw_batch(generator)

    def value(self, params, batch):
        return self.problem.value(params, batch)

    def value_and_grad(self, params, batch):
        self.log.append((self.level, batch))
        return self.problem.value_and_grad(params, batch)


@pytest.mark.parametrize("same_batch", [True, False])
def test_same_batch_reuses_the_fine_mini_batch_on_every_level(same_batch):
    hierarchy, theta = galerkin_hierarchy(levels=3, sig=0.2)
    log: list = []
    recorded = Hierarchy([Recording(p, l, log) for l, p in enumerate(hierarchy.levels)], hierarchy.transfers)
    config = MGOptConfig(alpha=0.05, K=2, kappa=0.0, min_gap=0, same_batch=same_batch, descent_check=False)
    optimize(recorded, theta, config, 4, seed=0)
    fine_batches = [b for level, b in log if level == 0]
    # each iteration: the fine gradient, the V-cycle's second fine gradient, then coarse work
    per_iteration = len(log) // 4
    for k in range(4):
        chunk = log[k * per_iteration:(k + 1) * per_iteration]
        distinct = {id(b) for _, b in chunk}
        assert (len(distinct) == 1) == same_batch
        assert chunk[0][0] == 0 and {level for level, _ in chunk} == {0, 1, 2}
    assert len({id(b) for b in fine_batches}) == (4 if same_batch else 8)


def test_momentum_on_one_level_matches_torch_sgd():
    hierarchy, theta, _, _ = tanh_two_level(seed=10)
    single = Hierarchy(hierarchy.levels[:1], [])
    end, _, optimizer = optimize(single, theta, MGOptConfig(alpha=0.3, momentum=0.9), 6, seed=0)
    w = theta[KEY].clone().requires_grad_(True)
    sgd = torch.optim.SGD([w], lr=0.3, momentum=0.9)
    for _ in range(6):
        sgd.zero_grad()
        single.levels[0]._loss(w).backward()
        sgd.step()
    torch.testing.assert_close(end[KEY], w.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(optimizer.velocity[KEY], sgd.state[w]["momentum_buffer"], rtol=1e-12, atol=1e-14)


def test_momentum_in_nested_iteration_prolongs_the_buffer():
    hierarchy, theta, P, R = tanh_two_level(seed=11)
    config = MGOptConfig(alpha=0.2, variant="nested", nested_iterations=3, momentum=0.5)
    end, _, optimizer = optimize(hierarchy, theta, config, 0, seed=0)
    t, m = R @ theta[KEY], None
    for _ in range(3):
        g = hierarchy.levels[1].value_and_grad({KEY: t})[1][KEY]
        m = g if m is None else g + 0.5 * m
        t = t - 0.2 * m
    torch.testing.assert_close(end[KEY], P @ t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(optimizer.velocity[KEY], P @ m, rtol=1e-12, atol=1e-14)


def test_v_cycle_without_smoothing_equals_two_levels_with_composed_transfers():
    """pre_smooth = post_smooth = 0: grad h_1(R theta) = R g is known (no gradient evaluated),
    so the 3-level V-cycle is the 2-level correction from level 0 to level 2 with R2 R1, P1 P2."""
    hierarchy, theta = galerkin_hierarchy(levels=3, seed=12)
    (fine, middle, coarsest), (t1, t2) = hierarchy.levels, hierarchy.transfers
    direct = Hierarchy([fine, coarsest], [MatrixTransfer(t2.R_p @ t1.R_p, t1.P @ t2.P)])
    config = MGOptConfig(alpha=0.05, K=4, kappa=0.0, pre_smooth=0, post_smooth=0, descent_check=False)
    three, history, optimizer = optimize(hierarchy, theta, config, 5, seed=0)
    two, _, direct_optimizer = optimize(direct, theta, config, 5, seed=0)
    assert [i.kind for i in history] == ["cgc", "sgd", "cgc", "sgd", "cgc"]
    torch.testing.assert_close(three[KEY], two[KEY], rtol=1e-12, atol=1e-13)
    # the only extra work: the level-1 coarse gradient in v_1 (cost 0.5) per correction
    assert optimizer.work == pytest.approx(direct_optimizer.work + 3 * middle.cost)
