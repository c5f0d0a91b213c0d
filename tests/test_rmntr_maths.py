"""RMNTR maths (float64): the l1 prox, the composite prox on coarse levels against a brute-force
argmin, the Cauchy point and the spectral prox-gradient solver on a quadratic model, the
acceptance and radius rules."""
import itertools
import math

import numpy as np
import pytest
import torch

from graphgrow import GraphgrowError
from graphgrow.rmntr.prox import L1Term, Restriction, soft_threshold, stationarity
from graphgrow.rmntr.subproblem import (boundary_fraction, cauchy_point, model_value, reduction_ratio,
                                        spectral_prox_gradient, update_radius)

DT = torch.float64


def random_restriction(fine: int, coarse: int, seed: int, unused: int = 1) -> torch.Tensor:
    """A dense R (coarse x fine) with R R^T = I whose rows have disjoint random supports of
    random sizes and random signed weights; ``unused`` fine coordinates belong to no row."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(fine)
    cuts = np.sort(rng.choice(np.arange(1, fine - unused), coarse - 1, replace=False))
    R = np.zeros((coarse, fine))
    for j, group in enumerate(np.split(order[:fine - unused], cuts)):
        weights = rng.normal(size=len(group))
        R[j, group] = weights / np.linalg.norm(weights)
    return torch.tensor(R, dtype=DT)


def brute_force_composite_prox(R, theta, weight, v):
    """argmin_y 1/2||y - v||^2 + sum_i w_i |z_i(y)|, z(y) = theta + R^T (y - R theta), by
    enumerating which z_i are zero and the signs of the others: on each pattern the problem is
    an equality-constrained quadratic; the minimiser is the best candidate over all patterns."""
    R, theta, weight, v = (np.asarray(a, dtype=float) for a in (R, theta, weight, v))
    A, b = R.T, theta - R.T @ (R @ theta)           # z = A y + b
    best, best_value = None, math.inf
    for pattern in itertools.product((-1, 0, 1), repeat=len(theta)):
        pattern = np.array(pattern)
        zero = pattern == 0
        w = v - A.T @ (weight * pattern)                 # unconstrained minimiser of the smooth piece
        if zero.any():
            C, d = A[zero], -b[zero]
            correction, *_ = np.linalg.lstsq(C @ C.T, C @ w - d, rcond=None)
            y = w - C.T @ correction
            if np.abs(C @ y - d).max() > 1e-9:
                continue                                  # the zero set cannot be met
        else:
            y = w
        value = 0.5 * np.sum((y - v) ** 2) + np.sum(weight * np.abs(A @ y + b))
        if value < best_value:
            best, best_value = y, value
    return best


def test_fine_prox_is_soft_thresholding_and_satisfies_the_optimality_condition():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, generator=g, dtype=DT)
    weight = torch.rand(50, generator=g, dtype=DT)
    weight[:5] = 0.0
    y = L1Term.fine(weight).prox(v, 0.7)
    assert torch.equal(y, soft_threshold(v, 0.7 * weight))
    # v - y in 0.7 w d|y|: equal to 0.7 w sign(y) where y != 0, inside [-0.7 w, 0.7 w] where y = 0
    r = v - y
    nonzero = y != 0
    assert torch.allclose(r[nonzero], 0.7 * weight[nonzero] * torch.sign(y[nonzero]), atol=1e-15)
    assert bool((r[~nonzero].abs() <= 0.7 * weight[~nonzero] + 1e-15).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_composite_prox_equals_the_brute_force_argmin(seed):
    fine, coarse = 6, 3
    R = random_restriction(fine, coarse, seed)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(fine, generator=g, dtype=DT)
    weight = 0.3 + torch.rand(fine, generator=g, dtype=DT)
    restriction = Restriction.from_linear_map(lambda x: R @ x, fine, coarse)
    assert torch.allclose(restriction.dense(), R, atol=1e-15)
    phi_c = L1Term.fine(weight).compose(restriction, theta)
    for k in range(4):
        v = R @ theta + 0.8 * torch.randn(coarse, generator=g, dtype=DT)
        if k == 0:   # a point whose prox sits on a kink
            v = R @ theta
        y = phi_c.prox(v)
        expected = brute_force_composite_prox(R, theta, weight, v)
        assert np.abs(y.numpy() - expected).max() <= 1e-10
        # and the composite term is phi at the prolonged point
        assert phi_c.value(y) == pytest.approx(float((weight * (theta + R.T @ (y - R @ theta)).abs()).sum()),
                                               rel=1e-14)


def test_composite_terms_compose_over_levels():
    R1, R2 = random_restriction(9, 5, 3, unused=1), random_restriction(5, 2, 4, unused=1)
    r1 = Restriction.from_linear_map(lambda x: R1 @ x, 9, 5)
    r2 = Restriction.from_linear_map(lambda x: R2 @ x, 5, 2)
    g = torch.Generator().manual_seed(5)
    theta, weight = torch.randn(9, generator=g, dtype=DT), torch.rand(9, generator=g, dtype=DT)
    y = R1 @ theta + torch.randn(5, generator=g, dtype=DT)       # a coarse point after some coarse steps
    phi2 = L1Term.fine(weight).compose(r1, theta).compose(r2, y)
    for _ in range(3):
        w = torch.randn(2, generator=g, dtype=DT)
        fine_point = theta + R1.T @ (y + R2.T @ (w - R2 @ y) - R1 @ theta)
        assert phi2.value(w) == pytest.approx(float((weight * fine_point.abs()).sum()), rel=1e-14)


def test_restrictions_without_a_closed_form_prox_are_refused():
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    dense = q.T                                     # row-orthonormal, every row touches every coordinate
    with pytest.raises(GraphgrowError, match="closed-form prox") as info:
        Restriction.from_linear_map(lambda x: dense @ x, 6, 3)
    assert "orthonormal" in info.value.hint and "injection" in info.value.hint
    average = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=DT)   # R R^T = I/2
    with pytest.raises(GraphgrowError, match="not orthonormal"):
        Restriction.from_linear_map(lambda x: average @ x, 4, 2)


def quadratic_model(n: int, seed: int, indefinite: bool):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eigenvalues = torch.linspace(-1.0 if indefinite else 0.1, 5.0, n, dtype=DT)
    H = Q @ torch.diag(eigenvalues) @ Q.T
    return H, torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("radius", [0.05, 0.5, 100.0])
def test_cauchy_point_and_spg_stay_inside_and_decrease_the_model(indefinite, radius):
    H, grad, x = quadratic_model(12, 1, indefinite)
    phi = L1Term.fine(torch.full((12,), 0.3, dtype=DT))
    calls = []

    def hvp(v):
        calls.append(1)
        return H @ v
    gcp, t = cauchy_point(x, grad, hvp, phi, radius)
    h0 = stationarity(phi, x, grad)
    step = spectral_prox_gradient(x, grad, hvp, phi, radius, gcp, t, h0=h0, max_iterations=50)
    for candidate in (gcp, step):
        norm = float(torch.linalg.vector_norm(candidate.s))
        assert norm <= radius * (1 + 1e-12)
        direct = float(grad @ candidate.s + 0.5 * candidate.s @ H @ candidate.s) \
            + phi.value(x + candidate.s) - phi.value(x)
        assert candidate.predicted == pytest.approx(-direct, rel=1e-10, abs=1e-13)
        assert candidate.predicted > 0
    assert step.predicted >= gcp.predicted
    assert step.hvps == len(calls)
    assert model_value(grad, step.s, H @ step.s, phi, x) == pytest.approx(-step.predicted, rel=1e-10)


def test_spg_reaches_the_minimiser_of_a_convex_model_inside_a_large_radius():
    H, grad, x = quadratic_model(10, 2, indefinite=False)
    phi = L1Term.fine(torch.full((10,), 0.2, dtype=DT))
    gcp, t = cauchy_point(x, grad, lambda v: H @ v, phi, 1e3)
    step = spectral_prox_gradient(x, grad, lambda v: H @ v, phi, 1e3, gcp, t, rtol=1e-12, h0=1.0,
                                  max_iterations=2000)
    # independent: ISTA on z = x + s with step 1/L
    L = float(torch.linalg.eigvalsh(H).max())
    z = x.clone()
    for _ in range(5000):
        z = soft_threshold(z - (grad + H @ (z - x)) / L, 0.2 / L)
    assert torch.allclose(x + step.s, z, atol=1e-9)


def test_boundary_fraction_hits_the_sphere():
    s, d = torch.tensor([0.3, 0.0], dtype=DT), torch.tensor([1.0, 1.0], dtype=DT)
    tau = boundary_fraction(s, d, 1.0)
    assert float(torch.linalg.vector_norm(s + tau * d)) == pytest.approx(1.0, rel=1e-14)
    assert boundary_fraction(s, 0.01 * d, 1.0) == 1.0


def test_radius_rules_under_a_scripted_rho_sequence():
    radius, trace = 1.0, []
    # (rho, step length relative to the radius)
    script = [(0.01, 1.0), (0.95, 1.0), (0.95, 0.5), (0.5, 1.0), (-3.0, 0.2), (0.9, 1.0), (0.05, 1.0),
              (0.049, 0.1)]
    for rho, fraction in script:
        radius = update_radius(radius, rho, fraction * radius)
        trace.append(radius)
    assert trace == [0.25, 0.5, 0.5, 0.5, 0.125, 0.25, 0.25, 0.0625]
    assert update_radius(3e3, 1.0, 3e3, radius_max=5e3) == 5e3


def test_reduction_ratio_never_accepts_a_nonpositive_prediction():
    assert reduction_ratio(1.0, 0.0, 1.0) == -math.inf
    assert reduction_ratio(1.0, -1e-3, 1.0) == -math.inf
    assert reduction_ratio(0.5, 1.0, 1.0) == 0.5
    assert reduction_ratio(-1e-17, 1e-17, 1.0) == 1.0          # both at rounding level
    assert reduction_ratio(-1e-3, 1e-3, 1.0) == -1.0


def test_the_composite_prox_in_float32_matches_float64():
    R = random_restriction(6, 3, 7)
    g = torch.Generator().manual_seed(7)
    theta, weight, v = torch.randn(6, generator=g, dtype=DT), torch.rand(6, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    results = []
    for dtype in (torch.float64, torch.float32):
        restriction = Restriction.from_linear_map(lambda x: R.to(dtype) @ x, 6, 3, dtype=dtype)
        y = L1Term.fine(weight.to(dtype)).compose(restriction, theta.to(dtype)).prox(v.to(dtype), 0.5)
        assert y.dtype == dtype
        results.append(y.double())
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_snap_zeros_removes_rounding_residue_of_penalised_entries_only():
    from graphgrow.rmntr.prox import snap_zeros
    x = torch.tensor([0.1, 0.3, 0.3, 2.0], dtype=DT)
    two_ulps = lambda v: torch.nextafter(torch.nextafter(v, torch.zeros_like(v)), torch.zeros_like(v))  # noqa: E731
    s = torch.cat([-x[:1], two_ulps(-x[1:3]), torch.tensor([-1.0], dtype=DT)])
    assert bool(((x + s)[1:3] != 0).all())                      # a residue of a few ulps
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=DT)
    z = x + snap_zeros(x, s, weight)
    assert z[0] == 0 and z[1] == 0 and z[2] != 0 and z[3] == 1.0


def test_strongest_pairs_pairs_greedily_and_leaves_an_odd_unit_alone():
    import passes
    strength = torch.tensor([[1.0, 0.1, 0.9, 0.2, 0.0], [0.1, 1.0, 0.3, 0.8, 0.0], [0.9, 0.3, 1.0, 0.1, 0.95],
                             [0.2, 0.8, 0.1, 1.0, 0.0], [0.0, 0.0, 0.95, 0.0, 1.0]])
    # 2-4 (0.95) first, then 1-3 (0.8); 0 stays alone although 0-2 (0.9) is strong
    assert passes.strongest_pairs(strength) == [[0], [1, 3], [2, 4]]


def test_a_rescaled_step_minimises_the_fine_model_along_its_direction():
    from graphgrow.rmntr.subproblem import model_value, rescaled_step
    g = torch.Generator().manual_seed(5)
    A = torch.randn(6, 6, generator=g, dtype=DT)
    H = A @ A.T + 0.1 * torch.eye(6, dtype=DT)
    grad = torch.randn(6, generator=g, dtype=DT)
    x = torch.randn(6, generator=g, dtype=DT)
    phi = L1Term.fine(torch.full((6,), 0.05, dtype=DT))
    s = -0.8 * grad
    step = rescaled_step(x, grad, lambda v: H @ v, phi, s)
    alpha = float(step.s @ s) / float(s @ s)
    assert 0 < alpha <= 1 and torch.allclose(step.s, alpha * s, atol=1e-15)
    assert step.predicted == pytest.approx(-model_value(grad, step.s, H @ step.s, phi, x), rel=1e-12)
    # alpha minimises the quadratic plus the convex bound of phi over [0, 1]
    linear = float(grad @ s) + phi.change(x, s)
    bound = lambda a: a * linear + 0.5 * a * a * float(s @ H @ s)    # noqa: E731
    assert all(bound(alpha) <= bound(a) + 1e-15 for a in torch.linspace(0, 1, 101).tolist())
    assert step.predicted >= -bound(alpha) - 1e-15 and step.hvps == 1
    ascent = rescaled_step(x, grad, lambda v: H @ v, phi, grad)   # uphill: no step
    assert float(ascent.s.abs().max()) == 0.0 and ascent.predicted == 0.0
