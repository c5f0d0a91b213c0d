"""The PINN problem of the RMNTR experiments: -div(kappa grad u) = f on (0, 1)^2, u = 0 on the
boundary, with

    kappa(x, y) = 1.1 + 0.2 sin(2 pi x) cos(2 pi y),
    u*(x, y)    = x (1 - x) y (1 - y) (1 + 0.25 sin(2 pi x) sin(pi y) + 0.1 x y)

(manufactured: f is -div(kappa grad u*) in closed form). The boundary condition is hard:
u = x (1 - x) y (1 - y) N(x, y) with N the network. The loss is 1/2 mean r^2 over the 29 x 29 =
841 interior points of the 31 x 31 grid, r = -kappa lap(u) - grad(kappa) . grad(u) - f (the full
divergence form; the authors' code drops the grad(kappa) term). Derivatives in the inputs go
through the compiled fx module by autograd; parameters enter through ``functional_call``.
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call

from ..errors import GraphgrowError

PI = math.pi


def grid_points(n: int = 31, interior: bool = True, dtype=torch.float64, device=None) -> torch.Tensor:
    """Points of the n x n grid on [0, 1]^2 (interior only: (n-2)^2 points), x fastest."""
    ticks = torch.linspace(0.0, 1.0, n, dtype=dtype, device=device)
    if interior:
        ticks = ticks[1:-1]
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def kappa(p: torch.Tensor) -> torch.Tensor:
    x, y = p[:, 0], p[:, 1]
    return 1.1 + 0.2 * torch.sin(2 * PI * x) * torch.cos(2 * PI * y)


def bubble(p: torch.Tensor) -> torch.Tensor:
    """x (1 - x) y (1 - y): zero on the boundary."""
    x, y = p[:, 0], p[:, 1]
    return x * (1 - x) * y * (1 - y)


def exact_solution(p: torch.Tensor) -> torch.Tensor:
    x, y = p[:, 0], p[:, 1]
    return bubble(p) * (1 + 0.25 * torch.sin(2 * PI * x) * torch.sin(PI * y) + 0.1 * x * y)


def source(p: torch.Tensor) -> torch.Tensor:
    """f = -div(kappa grad u*) by the product rule, written out (independent of autograd)."""
    x, y = p[:, 0], p[:, 1]
    px, qy = x * (1 - x), y * (1 - y)
    B, Bx, By, Bxx, Byy = px * qy, (1 - 2 * x) * qy, px * (1 - 2 * y), -2 * qy, -2 * px
    s2x, c2x, spy, cpy = torch.sin(2 * PI * x), torch.cos(2 * PI * x), torch.sin(PI * y), torch.cos(PI * y)
    G = 1 + 0.25 * s2x * spy + 0.1 * x * y
    Gx, Gy = 0.5 * PI * c2x * spy + 0.1 * y, 0.25 * PI * s2x * cpy + 0.1 * x
    Gxx, Gyy = -PI ** 2 * s2x * spy, -0.25 * PI ** 2 * s2x * spy
    ux, uy = Bx * G + B * Gx, By * G + B * Gy
    uxx, uyy = Bxx * G + 2 * Bx * Gx + B * Gxx, Byy * G + 2 * By * Gy + B * Gyy
    kx = 0.4 * PI * c2x * torch.cos(2 * PI * y)
    ky = -0.4 * PI * s2x * torch.sin(2 * PI * y)
    return -(kappa(p) * (uxx + uyy) + kx * ux + ky * uy)


def divergence_operator(u_of, p: torch.Tensor) -> torch.Tensor:
    """-div(kappa grad u) at the points p for a pointwise function u_of (points -> values):
    -kappa (u_xx + u_yy) - kappa_x u_x - kappa_y u_y, all derivatives by autograd (graphs kept
    so the result can be differentiated again)."""
    with torch.enable_grad():
        p = p.detach().requires_grad_(True)
        u = u_of(p)
        grad_u, = torch.autograd.grad(u.sum(), p, create_graph=True)
        u_xx = torch.autograd.grad(grad_u[:, 0].sum(), p, create_graph=True)[0][:, 0]
        u_yy = torch.autograd.grad(grad_u[:, 1].sum(), p, create_graph=True)[0][:, 1]
        grad_k, = torch.autograd.grad(kappa(p).sum(), p, create_graph=True)
        return -kappa(p) * (u_xx + u_yy) - (grad_k * grad_u).sum(dim=1)


class PoissonPINN:
    """The loss 1/2 mean r^2 of a network N: R^2 -> R with u = bubble * N, as a function of the
    module and a parameter dict (``graphgrow.rmntr.levels.NetworkLoss``). Pointwise networks
    only (the sum trick for input derivatives needs every output to depend on its own point)."""

    def __init__(self, grid: int = 31, dtype=torch.float64, device=None):
        if grid < 3:
            raise GraphgrowError(f"the PINN grid needs at least 3 points per side, got {grid}")
        self.points = grid_points(grid, True, dtype, device)
        self.rhs = source(self.points)
        self.test_points = grid_points(101, False, dtype, device)

    def solution(self, module, params):
        return lambda p: bubble(p) * functional_call(module, params, (p,)).reshape(-1)

    def residual(self, module, params) -> torch.Tensor:
        return divergence_operator(self.solution(module, params), self.points) - self.rhs

    def __call__(self, module, params) -> torch.Tensor:
        return 0.5 * (self.residual(module, params) ** 2).mean()

    def check_network(self, network) -> None:
        shape, out = tuple(network.graph.input_shape), network.graph.node(network.graph.outputs[0]).out_shape
        if shape != (2,) or tuple(out) != (1,):
            raise GraphgrowError(f"the PINN needs a network R^2 -> R, '{network.graph.name}' maps {list(shape)} "
                                 f"to {list(out)}", file=network.graph.source,
                                 hint="use input: {shape: [2]} and a last layer with out: 1 (specs/pinn_60.yaml)")

    def metrics(self, module, params) -> dict:
        """L2 relative error to u* on the 101 x 101 grid and the residual RMSE at the collocation points."""
        with torch.no_grad():
            u = self.solution(module, params)(self.test_points)
            exact = exact_solution(self.test_points)
            l2 = float(torch.linalg.vector_norm(u - exact) / torch.linalg.vector_norm(exact))
        residual = self.residual(module, params).detach()
        return {"l2_error": l2, "residual_rmse": float(residual.pow(2).mean().sqrt())}
