"""One trust-region step on one level: the model m(s) = <g, s> + 1/2 <s, H s> + phi(x + s) -
phi(x) with exact Hessian-vector products, the generalized Cauchy point (a proximal gradient
step with backtracking, Baraldi and Kouri's proximal trust region), spectral proximal gradient
iterations from it, all inside ||s|| <= radius; and the acceptance and radius rules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .prox import L1Term

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """A trial step s with H s, its predicted reduction m(0) - m(s) and the HVPs it took."""
    s: torch.Tensor
    Hs: torch.Tensor
    predicted: float
    hvps: int
    spg_iterations: int


def model_value(g: torch.Tensor, s: torch.Tensor, Hs: torch.Tensor, phi: L1Term, x: torch.Tensor) -> float:
    """m(s) - m(0) = <g, s> + 1/2 <s, H s> + phi(x + s) - phi(x)."""
    return float(g @ s + 0.5 * (s @ Hs)) + phi.change(x, s)


def boundary_fraction(s: torch.Tensor, d: torch.Tensor, radius: float) -> float:
    """The largest tau in [0, 1] with ||s + tau d|| <= radius (||s|| <= radius)."""
    dd, sd, ss = float(d @ d), float(s @ d), float(s @ s)
    if dd == 0.0 or ss + 2 * sd + dd <= radius ** 2:
        return 1.0
    root = (-sd + math.sqrt(max(sd * sd + dd * (radius ** 2 - ss), 0.0))) / dd
    return min(max(root, 0.0), 1.0)


def cauchy_point(x: torch.Tensor, g: torch.Tensor, hvp: HVP, phi: L1Term, radius: float, *, t0: float = 1.0,
                 mu: float = 1e-4, backtrack: float = 0.5, max_tries: int = 60) -> tuple[Step, float]:
    """The generalized Cauchy point s(t) = prox_{t phi}(x - t g) - x with the largest
    t = t0 backtrack^k such that ||s|| <= radius and m(s) - m(0) <= mu (<g, s> + phi(x+s) - phi(x));
    returns the step and its t. A zero step (x stationary) is returned as is."""
    t, hvps = t0, 0
    for _ in range(max_tries):
        s = phi.prox(x - t * g, t) - x
        norm = float(torch.linalg.vector_norm(s))
        if norm == 0.0:
            return Step(s, torch.zeros_like(s), 0.0, hvps, 0), t
        if norm <= radius:
            Hs = hvp(s)
            hvps += 1
            linear = float(g @ s) + phi.change(x, s)
            change = linear + 0.5 * float(s @ Hs)
            if change <= mu * linear:
                return Step(s, Hs, -change, hvps, 0), t
        t *= backtrack
    zero = torch.zeros_like(x)
    return Step(zero, zero, 0.0, hvps, 0), t


def spectral_prox_gradient(x: torch.Tensor, g: torch.Tensor, hvp: HVP, phi: L1Term, radius: float, start: Step,
                           t_start: float, *, max_iterations: int = 25, rtol: float = 1e-2, h0: float = 1.0,
                           alpha_min: float = 1e-10, alpha_max: float = 1e10) -> Step:
    """Improve the Cauchy point by proximal gradient steps on the model with Barzilai-Borwein
    step sizes (curvature from the exact H d). Each iteration moves along d = p - s from s
    (p the prox-gradient point) by the tau in [0, 1] inside the radius that minimises the
    quadratic part plus the convex-combination bound (1 - tau) phi(x+s) + tau phi(x+p) >=
    phi(x + s + tau d), so the model never increases. Stops when the model's stationarity
    ||prox_phi(x+s - grad q(s)) - (x+s)|| <= rtol * h0, on the boundary, or after max_iterations."""
    s, Hs, hvps, alpha = start.s, start.Hs, start.hvps, t_start
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        model_gradient = g + Hs
        point = x + s
        if float(torch.linalg.vector_norm(phi.prox(point - model_gradient) - point)) <= rtol * h0:
            break
        d = phi.prox(point - alpha * model_gradient, alpha) - x - s
        tau_max = boundary_fraction(s, d, radius)
        if tau_max <= 0.0 or float(d @ d) == 0.0:
            break
        Hd = hvp(d)
        hvps += 1
        curvature = float(d @ Hd)
        linear = float(model_gradient @ d) + phi.change(point, d)
        if curvature > 0:
            tau = min(tau_max, max(0.0, -linear / curvature))
        else:
            tau = tau_max if linear < 0 else 0.0
        if tau <= 0.0:
            break
        s, Hs = s + tau * d, Hs + tau * Hd
        alpha = min(max(float(d @ d) / curvature, alpha_min), alpha_max) if curvature > 0 else alpha_max
        if tau == tau_max and tau_max < 1.0:
            break   # reached the boundary
    predicted = -model_value(g, s, Hs, phi, x)
    return Step(s, Hs, predicted, hvps, iterations)


def reduction_ratio(actual: float, predicted: float, reference: float, eps: float = 2.2e-16) -> float:
    """rho = actual / predicted; a step with predicted <= 0 gets -inf (never accepted). When both
    reductions are at rounding level of the objective (50 eps |reference|, eps of the dtype) rho is 1."""
    if not predicted > 0.0:
        return -math.inf
    noise = 50 * eps * max(abs(reference), 1.0)
    if abs(actual) <= noise and predicted <= noise:
        return 1.0
    return actual / predicted


def update_radius(radius: float, rho: float, step_norm: float, *, eta1: float = 0.05, eta2: float = 0.9,
                  shrink: float = 0.25, grow: float = 2.0, radius_max: float = 1e4,
                  boundary: float = 1 - 1e-6) -> float:
    """Shrink (x shrink) on rejection (rho < eta1), grow (x grow, at most radius_max) on very
    good steps (rho >= eta2) that reached the boundary, keep the radius otherwise."""
    if rho < eta1:
        return shrink * radius
    if rho >= eta2 and step_norm >= boundary * radius:
        return min(grow * radius, radius_max)
    return radius


def regularised_gauss_newton_step(g: torch.Tensor, hvp: HVP, lam: float, *, max_iterations: int = 25,
                                  rtol: float = 1e-2) -> Step:
    """The Levenberg-Marquardt step: conjugate gradients on (H + lam I) s = -g from s = 0 (H a
    positive semidefinite Gauss-Newton matrix given by products), stopped when the residual is at
    most rtol ||g|| or after max_iterations. ``Hs`` is (H + lam I) s and ``predicted`` the
    reduction of the regularised model m(s) = <g, s> + 1/2 <s, H s> + lam/2 ||s||^2; CG from zero
    decreases m at every iteration, so it is positive for g != 0."""
    s, As = torch.zeros_like(g), torch.zeros_like(g)
    residual = -g
    direction = residual.clone()
    rr = float(residual @ residual)
    target = (rtol * float(torch.linalg.vector_norm(g))) ** 2
    hvps = 0
    for _ in range(max_iterations):
        if rr <= target or rr == 0.0:
            break
        Ad = hvp(direction) + lam * direction
        hvps += 1
        curvature = float(direction @ Ad)
        if not curvature > 0.0:
            break
        alpha = rr / curvature
        s, As = s + alpha * direction, As + alpha * Ad
        residual = residual - alpha * Ad
        rr, previous = float(residual @ residual), rr
        direction = residual + (rr / previous) * direction
    return Step(s, As, -float(g @ s + 0.5 * (s @ As)), hvps, hvps)


def update_lambda(lam: float, rho: float, *, eta1: float = 0.05, eta2: float = 0.9, shrink: float = 0.25,
                  grow: float = 2.0, lam_min: float = 1e-12) -> float:
    """The trust-region-style Levenberg-Marquardt update, the radius rule mirrored (lam acts like
    1 / radius): lam / shrink on rejection (rho < eta1), lam / grow (at least lam_min) on very good
    steps (rho >= eta2), unchanged otherwise."""
    if rho < eta1:
        return lam / shrink
    if rho >= eta2:
        return max(lam / grow, lam_min)
    return lam


def rescaled_step(x: torch.Tensor, g: torch.Tensor, hvp: HVP, phi: L1Term, s: torch.Tensor) -> Step:
    """alpha s with the alpha in [0, 1] that minimises the fine Taylor model's quadratic plus the
    convex-combination bound of phi along s (one HVP); its predicted reduction is that of the fine
    model m(alpha s), never less than the bound's. Used for recursive steps, whose direction comes
    from the coarse model but whose length and prediction then come from the fine one."""
    Hs = hvp(s)
    linear = float(g @ s) + phi.change(x, s)
    curvature = float(s @ Hs)
    alpha = 1.0 if curvature <= 0 else min(1.0, max(0.0, -linear / curvature))
    if linear >= 0:
        alpha = 0.0
    s, Hs = alpha * s, alpha * Hs
    return Step(s, Hs, -model_value(g, s, Hs, phi, x), 1, 0)
