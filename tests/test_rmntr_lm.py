"""The smooth Levenberg-Marquardt member of RMNTR (float64): the lambda rules under a scripted rho
sequence, the CG step against a dense solve, one level against an independent LM loop with a
dense Jacobian, first-order coherence of the regularised coarse model, convergence to the known
solution of a nonlinear least-squares problem on two levels, and the PINN through run()."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from graphgrow import GraphgrowError
from graphgrow.rmntr.levels import AutogradObjective, GaussNewtonObjective, Level
from graphgrow.rmntr.method import RMNTR, Correction, RMNTRConfig
from graphgrow.rmntr.prox import L1Term, Restriction
from graphgrow.rmntr.subproblem import regularised_gauss_newton_step, update_lambda

DT = torch.float64
LM = dict(globalisation="levenberg-marquardt")


def test_lambda_rules_under_a_scripted_rho_sequence():
    lam, trace = 1.0, []
    for rho in (0.01, 0.95, 0.95, 0.5, -3.0, 0.9, 0.05, 0.049, float("-inf")):
        lam = update_lambda(lam, rho)
        trace.append(lam)
    # rejection x4, very good /2, in between unchanged
    assert trace == [4.0, 2.0, 1.0, 1.0, 4.0, 2.0, 2.0, 8.0, 32.0]
    assert update_lambda(3e-12, 1.0, lam_min=2e-12) == 2e-12


def test_the_cg_step_solves_the_regularised_gauss_newton_system():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(12, 7, generator=g, dtype=DT)
    H = J.T @ J / 12
    grad = torch.randn(7, generator=g, dtype=DT)
    lam = 0.3
    step = regularised_gauss_newton_step(grad, lambda v: H @ v, lam, max_iterations=50, rtol=1e-14)
    expected = torch.linalg.solve(H + lam * torch.eye(7, dtype=DT), -grad)
    assert torch.allclose(step.s, expected, rtol=1e-10, atol=1e-13)
    model = float(grad @ expected + 0.5 * expected @ H @ expected + 0.5 * lam * expected @ expected)
    assert step.predicted == pytest.approx(-model, rel=1e-10)
    assert step.hvps <= 8 and step.predicted > 0
    short = regularised_gauss_newton_step(grad, lambda v: H @ v, lam, max_iterations=2)
    assert short.hvps == 2 and 0 < short.predicted < step.predicted     # CG from zero decreases the model


def rosenbrock_residual(x):
    """Extended Rosenbrock: r = (10 (x2 - x1^2), 1 - x1, 10 (x4 - x3^2), 1 - x3, ...); zero at all ones."""
    odd, even = x[0::2], x[1::2]
    return torch.stack([10 * (even - odd ** 2), 1 - odd], dim=1).reshape(-1)


def rosenbrock_levels(n=8):
    # pairs (x1, x3), (x2, x4), ...: the coarse variables keep the odd/even roles
    owner = torch.tensor([(i // 4) * 2 + i % 2 for i in range(n)])
    restriction = Restriction(owner, torch.full((n,), 2 ** -0.5, dtype=DT), n // 2)
    R = restriction.dense()
    fine = GaussNewtonObjective(rosenbrock_residual)
    coarse = GaussNewtonObjective(lambda y: rosenbrock_residual(R.T @ y))   # Galerkin: f_c(y) = f(R^T y)
    return [Level(None, fine, None, 1.0, restriction, "fine"), Level(None, coarse, None, 0.5, None, "coarse")]


def plain_lm(x, iterations, lam=1.0):
    """Levenberg-Marquardt with a dense Jacobian: s = -(J^T J/m + lam I)^-1 g, the same ratio test and
    lambda rule; returns the iterates and lambdas."""
    f = lambda z: 0.5 * float(rosenbrock_residual(z).pow(2).mean())   # noqa: E731
    xs, lams = [x], [lam]
    for _ in range(iterations):
        r = rosenbrock_residual(x)
        J = jacobian(rosenbrock_residual, x)
        m = r.numel()
        A = J.T @ J / m + lam * torch.eye(x.numel(), dtype=DT)
        g = J.T @ r / m
        s = torch.linalg.solve(A, -g)
        predicted = -float(g @ s + 0.5 * s @ A @ s)
        rho = (f(x) - f(x + s)) / predicted
        if rho >= 0.05:
            x = x + s
        lam = update_lambda(lam, rho)
        xs.append(x)
        lams.append(lam)
    return xs, lams


def test_one_level_equals_an_independent_levenberg_marquardt_loop():
    x0 = torch.tensor([-1.2, 1.0, -1.0, 1.2, 0.5, 0.3, -0.8, 0.9], dtype=DT)
    levels = rosenbrock_levels()[:1]
    method = RMNTR(levels, torch.zeros(8, dtype=DT),
                   RMNTRConfig(max_iterations=12, gtol=0.0, spg_iterations=50, spg_rtol=1e-15, **LM))
    result = method.minimize(x0)
    xs, lams = plain_lm(x0, 12)
    records = result.records
    assert len(records) == 12 and all(r["kind"] == "taylor" and r["radius"] is None for r in records)
    assert [r["lambda"] for r in records] == pytest.approx(lams[:-1], rel=1e-12)
    assert torch.allclose(result.x, xs[-1], rtol=1e-9, atol=1e-11)
    assert any(not r["accepted"] for r in records) and sum(r["accepted"] for r in records) >= 6


def test_the_regularised_coarse_model_is_first_order_coherent():
    levels = rosenbrock_levels()
    method = RMNTR(levels, torch.zeros(8, dtype=DT), RMNTRConfig(**LM))
    x = torch.linspace(-1, 1, 8, dtype=DT)
    gradient = levels[0].objective.linearize(x).gradient
    y0, coarse_gradient, _, _ = method.coarse_model(0, x, gradient, L1Term.fine(method.weight))
    shift, lin = method.coarse_shift(0, y0, coarse_gradient)
    lam = 0.7
    _, parent, correction = method.rule.coarse(lam, y0, shift)
    assert parent is None and correction.weight == lam
    model = correction.linearize(lin, y0)
    R = levels[0].restriction.dense()
    assert torch.allclose(model.gradient, R @ gradient, rtol=0, atol=1e-13)
    # the model as its own function: f_c(y) + <v, y> + lam/2 ||y - y0||^2, by autograd
    reference = AutogradObjective(lambda y: levels[1].objective.function(y) + shift @ y
                                  + 0.5 * lam * (y - y0) @ (y - y0))
    y = y0 + 0.1
    ref = reference.linearize(y)
    at_y = correction.linearize(levels[1].objective.linearize(y), y)
    assert at_y.value == pytest.approx(ref.value, rel=1e-13)
    assert torch.allclose(at_y.gradient, ref.gradient, atol=1e-12)
    v = torch.ones(4, dtype=DT)
    # Gauss-Newton curvature of f_c plus lam I
    J = jacobian(lambda z: rosenbrock_residual(R.T @ z), y)
    assert torch.allclose(at_y.hvp(v), J.T @ (J @ v) / J.shape[0] + lam * v, atol=1e-12)
    s = torch.full((4,), 0.05, dtype=DT)
    assert correction.change(y, s) == pytest.approx(correction.value(y + s) - correction.value(y), rel=1e-12)


def test_two_level_lm_reaches_the_known_solution_with_coarse_steps():
    levels = rosenbrock_levels()
    x0 = torch.tensor([-1.2, 1.0, -1.0, 1.2, 0.5, 0.3, -0.8, 0.9], dtype=DT)
    method = RMNTR(levels, torch.zeros(8, dtype=DT),
                   RMNTRConfig(max_iterations=200, gtol=1e-13, kappa_h=0.7, coarse_iterations=2,
                               coarse_min_h=0.0, **LM))
    result = method.minimize(x0)
    assert result.reason == "stationary"
    assert float((result.x - 1).abs().max()) <= 1e-8
    assert method.coarse_accepted[1] >= 1 and any(r["level"] == 1 for r in result.records)
    assert all(r["predicted"] > 0 for r in result.records if r["accepted"])
    assert all(math.isfinite(r["lambda"]) and r["lambda"] > 0 for r in result.records)


def test_lm_refuses_an_l1_term_and_unknown_globalisations():
    levels = rosenbrock_levels()
    with pytest.raises(GraphgrowError, match="beta = 0"):
        RMNTR(levels, torch.full((8,), 1e-3, dtype=DT), RMNTRConfig(**LM))
    with pytest.raises(GraphgrowError, match="globalisation"):
        RMNTR(levels, torch.zeros(8, dtype=DT), RMNTRConfig(globalisation="line-search"))


def test_the_pinn_with_the_lm_member_through_run_in_float64_and_float32():
    from pathlib import Path
    from graphgrow.ir import graph_from_text
    from graphgrow.rmntr import run
    spec = Path(__file__).resolve().parent.parent / "specs" / "pinn_60.yaml"
    graph = graph_from_text(spec.read_text().replace("width: 60", "width: 8"), str(spec))
    for dtype in (torch.float64, torch.float32):
        result = run(graph, "pinn", levels=2, beta=0.0, model="levenberg-marquardt", max_iterations=4,
                     spg_iterations=5, coarse_iterations=2, kappa_h=0.1, dtype=dtype)
        steps = [r for r in result.records if r["event"] == "step"]
        assert result.result.x.dtype == dtype
        assert result.result.value < steps[0]["F"] and all("lambda" in r for r in steps)
        assert result.summary["model"] == "levenberg-marquardt"
    with pytest.raises(GraphgrowError, match="beta = 0"):
        run(graph, "pinn", levels=1, beta=1e-4, model="levenberg-marquardt", max_iterations=1)


def test_correction_without_regularisation_is_the_linear_shift():
    shift = torch.tensor([1.0, -2.0], dtype=DT)
    term = Correction(shift)
    y, s = torch.tensor([0.5, 0.25], dtype=DT), torch.tensor([0.1, 0.1], dtype=DT)
    assert term.value(y) == pytest.approx(0.0) and term.change(y, s) == pytest.approx(-0.1)
