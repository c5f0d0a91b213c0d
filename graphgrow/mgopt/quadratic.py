"""The strongly convex quadratic model problem of thesis Section 3.3.1 (Algorithm 4, Figures
3.1/3.2, set-up in Appendix B.2) on the abstract MG/Opt interface.

f(theta) = 1/2 theta^T A theta - b^T theta with A = Q^T diag(lambda) Q, eigenvalues
U(0.1, 0.5) (half) and U(1, 5) (half), Q random orthogonal. Noisy gradients perturb A and b:
A_xi = A + u u^T - E[u u^T], u ~ U(-sig_a, sig_a)^n, b_xi = b + eps, eps ~ U(-sig_b, sig_b)
(one scalar added to every entry). The coarse problem is R A P, R b (3.2)/(3.3) and its noisy
gradients restrict the same perturbed A_xi, b_xi.

Appendix B.2 writes the centring as ``- 2/3 * siga * I``; that does not match the mean of
u u^T (sig_a^2 / 3 I), so we centre by the mean to keep the gradient estimate unbiased
(Assumption 3.19).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .hierarchy import Hierarchy, MatrixTransfer, ParamDict, Shifted
from .config import MGOptConfig
from .optimizer import MultilevelOptimizer, StepInfo

KEY = "theta"
RESTRICTIONS = ("largest", "smallest", "random")


@dataclass
class NoiseSample:
    perturbation: torch.Tensor  # u u^T - E[u u^T]
    shift: float                # eps


class QuadraticProblem:
    """f(theta) = 1/2 theta^T A theta - b^T theta with noisy gradient samples (float64)."""
    cost = 1.0

    def __init__(self, A: torch.Tensor, b: torch.Tensor, sig_a: float = 0.1, sig_b: float = 0.1):
        self.A, self.b = A, b
        self.sig_a, self.sig_b = sig_a, sig_b

    def draw_batch(self, generator: torch.Generator) -> NoiseSample | None:
        n = self.b.shape[0]
        if self.sig_a == 0 and self.sig_b == 0:
            return None
        u = (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * self.sig_a
        eps = float((2 * torch.rand((), generator=generator, dtype=torch.float64) - 1) * self.sig_b)
        mean = self.sig_a ** 2 / 3.0
        return NoiseSample(torch.outer(u, u) - mean * torch.eye(n, dtype=torch.float64), eps)

    def value(self, params: ParamDict, batch=None) -> float:
        """The exact objective (the noise only enters the gradient estimates)."""
        theta = params[KEY]
        return float(0.5 * theta @ self.A @ theta - self.b @ theta)

    def gradient(self, theta: torch.Tensor, batch: NoiseSample | None) -> torch.Tensor:
        if batch is None:
            return self.A @ theta - self.b
        return (self.A + batch.perturbation) @ theta - (self.b + batch.shift)

    def value_and_grad(self, params: ParamDict, batch=None) -> tuple[float, ParamDict]:
        return self.value(params), {KEY: self.gradient(params[KEY], batch)}

    def minimizer(self) -> torch.Tensor:
        return torch.linalg.solve(self.A, self.b)


class CoarseQuadratic:
    """The Galerkin coarse problem R A P, R b; a (fine) noise sample is restricted the same way."""
    cost = 1.0

    def __init__(self, fine: QuadraticProblem, R: torch.Tensor, P: torch.Tensor, cost: float = 1.0):
        self.fine, self.R, self.P = fine, R, P
        self.A = R @ fine.A @ P
        self.b = R @ fine.b
        self.cost = cost

    def draw_batch(self, generator: torch.Generator):
        return self.fine.draw_batch(generator)

    def value(self, params: ParamDict, batch=None) -> float:
        theta = params[KEY]
        return float(0.5 * theta @ self.A @ theta - self.b @ theta)

    def value_and_grad(self, params: ParamDict, batch=None) -> tuple[float, ParamDict]:
        theta = params[KEY]
        if batch is None:
            grad = self.A @ theta - self.b
        else:
            grad = self.R @ ((self.fine.A + batch.perturbation) @ (self.P @ theta)) - self.R @ (self.fine.b + batch.shift)
        return self.value(params), {KEY: grad}


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed random orthogonal n x n matrix: the Q factor of a Gaussian matrix with
    the signs of R's diagonal moved into Q (without that fix LAPACK's sign convention biases Q;
    Mezzadri 2007, "How to generate random matrices from the classical compact groups")."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def model_problem(seed: int = 0, n: int = 50, sig_a: float = 0.1, sig_b: float = 0.1):
    """A, b and the eigen decomposition (eigenvalues, eigenvectors as rows) of Appendix B.2."""
    rng = np.random.default_rng(seed)
    half = n // 2
    eigenvalues = np.concatenate([rng.uniform(0.1, 0.5, half), rng.uniform(1.0, 5.0, n - half)])
    Q = random_orthogonal(n, rng)
    A = Q.T @ np.diag(eigenvalues) @ Q
    A = 0.5 * (A + A.T)
    b = rng.standard_normal(n)
    # rows of Q are the eigenvectors: A Q^T = Q^T diag(lambda)
    problem = QuadraticProblem(torch.tensor(A), torch.tensor(b), sig_a, sig_b)
    return problem, torch.tensor(eigenvalues), torch.tensor(Q)


def eigen_restriction(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, kind: str, size: int,
                      seed: int = 0) -> torch.Tensor:
    """R with ``size`` eigenvectors of A as rows: largest, smallest or random eigenvalues."""
    order = torch.argsort(eigenvalues)
    if kind == "largest":
        chosen = order[-size:]
    elif kind == "smallest":
        chosen = order[:size]
    elif kind == "random":
        chosen = torch.randperm(len(eigenvalues), generator=torch.Generator().manual_seed(seed))[:size]
    else:
        raise ValueError(f"restriction kind must be one of {RESTRICTIONS}, got {kind!r}")
    return eigenvectors[chosen]


def two_level(problem: QuadraticProblem, R: torch.Tensor) -> Hierarchy:
    """The two-level hierarchy of Definition 3.6: R_g = R_p = R, P = R^T."""
    return Hierarchy([problem, CoarseQuadratic(problem, R, R.T)], [MatrixTransfer(R, R.T)], ["fine", "coarse"])


def figure_run(problem: QuadraticProblem, R: torch.Tensor | None, lr: float, *, before: int = 50, after: int = 150,
               coarse_steps: int = 50, kappa1: float = 0.5, kappa2: float = 1e-3, seed: int = 0,
               theta0: torch.Tensor | None = None) -> dict:
    """One curve of Figures 3.1/3.2: ``before`` SGD steps, one correction (K = coarse_steps
    SGD steps on the coarse problem at the same rate, alpha_cgc = 1) if rule (3.4)
    ||R_g grad f|| >= kappa1 ||grad f|| and ||R_g grad f|| >= kappa2 holds for the exact
    gradient, then ``after`` SGD steps. ``R=None``: plain SGD. Returns the exact losses and
    whether the correction was taken."""
    n = problem.b.shape[0]
    theta = {KEY: torch.zeros(n, dtype=torch.float64) if theta0 is None else theta0.clone()}
    config = MGOptConfig(alpha=lr, alpha_bar=lr, alpha_cgc=1.0, K=coarse_steps, kappa=0.0, lam=0.0,
                         descent_check=False)
    hierarchy = two_level(problem, R) if R is not None else Hierarchy([problem], [])
    optimizer = MultilevelOptimizer(hierarchy, config, torch.Generator().manual_seed(seed))
    losses = [problem.value(theta)]

    def sgd_steps(theta, count):
        for _ in range(count):
            _, grad = problem.value_and_grad(theta, problem.draw_batch(optimizer.generator))
            theta = {KEY: theta[KEY] - lr * grad[KEY]}
            losses.append(problem.value(theta))
        return theta

    theta = sgd_steps(theta, before)
    corrected = False
    if R is not None:
        exact = problem.gradient(theta[KEY], None)
        restricted = float(torch.linalg.vector_norm(R @ exact))
        if restricted >= kappa1 * float(torch.linalg.vector_norm(exact)) and restricted >= kappa2:
            batch = problem.draw_batch(optimizer.generator)
            value, grad = problem.value_and_grad(theta, batch)
            new, _, _, _ = optimizer.correct(0, Shifted(problem), theta, grad, value, batch)
            theta, corrected = new, True
            losses.append(problem.value(theta))
    theta = sgd_steps(theta, after)
    return {"losses": losses, "corrected": corrected}


def algorithm4(problem: QuadraticProblem, R: torch.Tensor, lr: float, iterations: int, *, kappa: float = 0.5,
               seed: int = 0) -> tuple[list[float], list[StepInfo]]:
    """Algorithm 4: SGD with an exact coarse grid correction (A_H^{-1} applied to the
    restricted exact gradient) whenever ||P R_g grad f||^2 > kappa ||grad f||^2 and the
    previous iteration was no correction. Returns exact losses and per-iteration kinds."""
    coarse = CoarseQuadratic(problem, R, R.T)
    theta = torch.zeros(problem.b.shape[0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    losses, kinds, previous_cgc = [problem.value({KEY: theta})], [], False
    for k in range(iterations):
        exact = problem.gradient(theta, None)
        projected = R.T @ (R @ exact)
        if not previous_cgc and float(projected @ projected) > kappa * float(exact @ exact):
            # the exact minimiser of h: A_H (tb - R theta) = -R_g grad f  (Lemma 3.3)
            e = R.T @ torch.linalg.solve(coarse.A, -(R @ exact))
            theta, previous_cgc = theta + e, True
            kinds.append(StepInfo(k, "cgc", losses[-1], float(exact @ exact)))
        else:
            theta = theta - lr * problem.gradient(theta, problem.draw_batch(generator))
            previous_cgc = False
            kinds.append(StepInfo(k, "sgd", losses[-1], float(exact @ exact)))
        losses.append(problem.value({KEY: theta}))
    return losses, kinds
