"""The quadratic model problem of thesis Section 3.3.1: Galerkin coarse matrix, the exact
coarse grid correction and its properties (float64, against direct matrix computations)."""
from __future__ import annotations

import numpy as np
import torch

from graphgrow.mgopt.quadratic import (KEY, CoarseQuadratic, algorithm4, eigen_restriction, figure_run,
                                       model_problem, random_orthogonal)


def test_model_problem_spectrum_and_minimizer():
    problem, eigenvalues, Q = model_problem(seed=0, n=50)
    spectrum = torch.linalg.eigvalsh(problem.A)
    torch.testing.assert_close(spectrum, torch.sort(eigenvalues).values, rtol=1e-10, atol=1e-12)
    assert ((eigenvalues[:25] >= 0.1) & (eigenvalues[:25] <= 0.5)).all()
    assert ((eigenvalues[25:] >= 1.0) & (eigenvalues[25:] <= 5.0)).all()
    torch.testing.assert_close(Q @ Q.T, torch.eye(50, dtype=torch.float64), rtol=0, atol=1e-12)
    theta_star = problem.minimizer()
    _, grad = problem.value_and_grad({KEY: theta_star})
    assert float(grad[KEY].norm()) < 1e-10


def test_noisy_gradient_is_unbiased():
    problem, _, _ = model_problem(seed=1, n=8)
    theta = torch.linspace(-1, 1, 8, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([problem.value_and_grad({KEY: theta}, problem.draw_batch(generator))[1][KEY]
                           for _ in range(4000)])
    exact = problem.A @ theta - problem.b
    standard_error = samples.std(dim=0) / 4000 ** 0.5
    assert ((samples.mean(dim=0) - exact).abs() < 5 * standard_error + 1e-12).all()


def test_galerkin_coarse_matrix_is_spd_lemma_3_2():
    problem, eigenvalues, Q = model_problem(seed=2, n=20)
    P = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coarse = CoarseQuadratic(problem, 0.5 * P.T, P)
    torch.testing.assert_close(coarse.A, coarse.A.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(coarse.A).min()) > 0
    torch.testing.assert_close(coarse.A, 0.5 * P.T @ problem.A @ P, rtol=1e-12, atol=1e-12)


def test_exact_correction_properties_lemma_3_3_and_theorem_3_10():
    """With eigenvector restriction (Definition 3.6) the exact cgc satisfies
    R_g grad f = -R A e (Lemma 3.3), e = P R (theta* - theta) (Lemma 3.9(4)) and
    ||theta + e - theta*|| = ||(1 - P R)(theta - theta*)|| (Theorem 3.10)."""
    problem, eigenvalues, Q = model_problem(seed=3, n=30)
    R = eigen_restriction(eigenvalues, Q, "largest", 15)
    torch.testing.assert_close(R @ R.T, torch.eye(15, dtype=torch.float64), rtol=0, atol=1e-12)
    losses, kinds = algorithm4(problem, R, lr=0.01, iterations=1, kappa=0.0)
    assert kinds[0].kind == "cgc"
    theta = torch.zeros(30, dtype=torch.float64)  # algorithm4 starts at 0
    grad = problem.A @ theta - problem.b
    coarse_A = R @ problem.A @ R.T
    e = R.T @ torch.linalg.solve(coarse_A, -(R @ grad))
    torch.testing.assert_close(R @ grad, -(R @ problem.A @ e), rtol=1e-10, atol=1e-12)
    theta_star = problem.minimizer()
    torch.testing.assert_close(e, R.T @ R @ (theta_star - theta), rtol=1e-9, atol=1e-10)
    projector = torch.eye(30, dtype=torch.float64) - R.T @ R
    distance = torch.linalg.vector_norm(theta + e - theta_star)
    torch.testing.assert_close(distance, torch.linalg.vector_norm(projector @ (theta - theta_star)),
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(problem.value({KEY: theta + e})),
                               rtol=1e-12, atol=1e-12)


def test_algorithm4_alternates_corrections_with_sgd_and_decreases_the_loss():
    problem, eigenvalues, Q = model_problem(seed=4, n=20)
    R = eigen_restriction(eigenvalues, Q, "largest", 10)
    losses, kinds = algorithm4(problem, R, lr=0.01, iterations=20, kappa=0.0)
    pattern = [k.kind for k in kinds]
    assert pattern == ["cgc", "sgd"] * 10
    assert losses[-1] < losses[0]


def test_figure_run_takes_one_correction_after_the_sgd_phase():
    problem, eigenvalues, Q = model_problem(seed=5, n=10)
    R = eigen_restriction(eigenvalues, Q, "random", 5, seed=1)
    run = figure_run(problem, R, 0.01, before=5, after=5, coarse_steps=3, kappa1=0.0, kappa2=0.0)
    plain = figure_run(problem, None, 0.01, before=5, after=5)
    assert run["corrected"] and len(run["losses"]) == 1 + 5 + 1 + 5
    assert not plain["corrected"] and len(plain["losses"]) == 1 + 5 + 5
    assert run["losses"][:6] == plain["losses"][:6]  # same seed, same SGD phase


def test_random_orthogonal_is_seeded_orthogonal_and_haar():
    """Orthogonal to rounding, the same bits for the same seed, and Haar distributed: for n = 3
    each entry of a Haar matrix is uniform on [-1, 1] (Archimedes), so the empirical CDF of
    Q[0, 0] over 4000 draws stays within the Kolmogorov-Smirnov 0.1% band (1.95 / sqrt(4000)).
    QR without the sign fix fails this (LAPACK makes Q[0, 0] always negative)."""
    Q = random_orthogonal(50, np.random.default_rng(7))
    np.testing.assert_allclose(Q @ Q.T, np.eye(50), rtol=0, atol=1e-12)
    assert np.array_equal(Q, random_orthogonal(50, np.random.default_rng(7)))
    rng = np.random.default_rng(0)
    corner = np.sort([random_orthogonal(3, rng)[0, 0] for _ in range(4000)])
    uniform_cdf = (corner + 1) / 2
    empirical = np.arange(1, 4001) / 4000
    assert np.abs(empirical - uniform_cdf).max() < 1.95 / 4000 ** 0.5
