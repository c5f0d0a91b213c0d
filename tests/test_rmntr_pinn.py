"""The PINN problem of RMNTR (float64): the closed-form source against sympy, the residual of u*
through the autograd operator, the divergence form, hard boundary conditions, a two-level smoke
run on [2, 8, 1]."""
import math
from pathlib import Path

import pytest
import sympy
import torch

from graphgrow.compiler.network import Network
from graphgrow.ir import graph_from_text
from graphgrow.rmntr.levels import build_levels
from graphgrow.rmntr.method import RMNTR, RMNTRConfig
from graphgrow.rmntr.pinn import PoissonPINN, bubble, divergence_operator, exact_solution, grid_points, kappa, source

DT = torch.float64
SPEC = Path(__file__).resolve().parent.parent / "specs" / "pinn_60.yaml"


def pinn_network(width: int, seed: int = 0) -> Network:
    text = SPEC.read_text().replace("width: 60", f"width: {width}")
    return Network.build(graph_from_text(text, str(SPEC)), seed=seed, dtype=DT)


def test_collocation_points_are_the_interior_of_the_31_grid():
    points = PoissonPINN().points
    assert points.shape == (841, 2) and points.dtype == DT
    assert float(points.min()) == pytest.approx(1 / 30) and float(points.max()) == pytest.approx(29 / 30)


def test_the_source_equals_the_symbolic_divergence_of_the_manufactured_solution():
    x, y = sympy.symbols("x y")
    k = 1.1 + sympy.Rational(1, 5) * sympy.sin(2 * sympy.pi * x) * sympy.cos(2 * sympy.pi * y)
    u = x * (1 - x) * y * (1 - y) * (1 + sympy.Rational(1, 4) * sympy.sin(2 * sympy.pi * x) * sympy.sin(sympy.pi * y)
                                     + sympy.Rational(1, 10) * x * y)
    f = sympy.lambdify((x, y), -(sympy.diff(k * sympy.diff(u, x), x) + sympy.diff(k * sympy.diff(u, y), y)), "math")
    points = grid_points(7, interior=True)
    expected = torch.tensor([f(float(a), float(b)) for a, b in points], dtype=DT)
    assert torch.allclose(source(points), expected, rtol=0, atol=1e-13)


def test_the_residual_of_the_exact_solution_is_at_rounding_level():
    problem = PoissonPINN()
    residual = (divergence_operator(exact_solution, problem.points) - problem.rhs).detach()
    assert float(residual.abs().max()) <= 1e-12 * float(problem.rhs.abs().max())
    # the grad(kappa) . grad(u) term matters: the non-divergence operator -kappa lap(u) misses f by O(1)
    def laplacian_only(p):
        p = p.detach().requires_grad_(True)
        u = exact_solution(p)
        g, = torch.autograd.grad(u.sum(), p, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), p, create_graph=True)[0][:, i] for i in range(2))
        return -kappa(p) * lap
    assert float((laplacian_only(problem.points) - problem.rhs).detach().abs().max()) > 0.1


def test_boundary_values_are_exactly_zero_and_the_loss_is_half_the_mean_square_residual():
    network = pinn_network(8)
    problem = PoissonPINN()
    params = dict(network.module.named_parameters())
    edge = torch.tensor([[0.0, 0.3], [1.0, 0.7], [0.4, 0.0], [0.2, 1.0]], dtype=DT)
    assert torch.equal(problem.solution(network.module, params)(edge), torch.zeros(4, dtype=DT))
    r = problem.residual(network.module, params).detach()
    assert float(problem(network.module, params).detach()) == pytest.approx(0.5 * float((r ** 2).mean()), rel=1e-14)
    assert bubble(edge).abs().max() == 0


def test_two_level_smoke_run_on_a_narrow_pinn():
    torch.manual_seed(0)
    network = pinn_network(8)
    problem = PoissonPINN()
    levels = build_levels(network, problem, "width", 2)
    assert [level.vector.size for level in levels] == [33, 17]
    x0 = levels[0].vector.of(network)
    method = RMNTR(levels, torch.full((33,), 1e-4, dtype=DT), RMNTRConfig(max_iterations=8, kappa_h=0.1, spg_iterations=5, coarse_iterations=2))
    result = method.minimize(x0)
    fine = [r for r in result.records if r["level"] == 0]
    assert len(fine) == 8 and result.value < fine[0]["F"]
    assert method.coarse_tried[1] >= 1 and any(r["level"] == 1 for r in result.records)
    for r in result.records:
        if r["accepted"]:
            assert r["predicted"] >= 0 and r["step_norm"] <= r["radius"] * (1 + 1e-12)
            assert r["trial_F"] < r["F"] or math.isclose(r["trial_F"], r["F"], rel_tol=1e-13)


def test_gauss_newton_products_equal_the_dense_jacobian_formula():
    from torch.autograd.functional import jacobian
    from graphgrow.rmntr.levels import network_objective
    network = pinn_network(4)
    problem = PoissonPINN(grid=9)
    objective, vector = network_objective(network, problem, "gauss-newton")
    x = vector.of(network)
    residual = lambda z: problem.residual(network.module, vector.unflatten(z))   # noqa: E731
    J = jacobian(residual, x)
    r = residual(x).detach()
    lin = objective.linearize(x)
    assert torch.allclose(lin.gradient, J.T @ r / r.numel(), rtol=1e-10, atol=1e-14)
    v = torch.randn(x.numel(), dtype=DT, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lin.hvp(v), J.T @ (J @ v) / r.numel(), rtol=1e-10, atol=1e-14)
    assert objective.counts.hvps == 1


def test_the_smooth_gauss_newton_member_decreases_the_pinn_loss_on_two_levels():
    from graphgrow import GraphgrowError
    network = pinn_network(8)
    levels = build_levels(network, PoissonPINN(), "width", 2, model="gauss-newton")
    x0 = levels[0].vector.of(network)
    method = RMNTR(levels, torch.zeros(33, dtype=DT), RMNTRConfig(max_iterations=4, kappa_h=0.1, spg_iterations=5,
                                                                  coarse_iterations=2))
    result = method.minimize(x0)
    assert result.value < result.records[0]["F"]
    assert all(r["predicted"] >= 0 for r in result.records if r["accepted"])
    with pytest.raises(GraphgrowError, match="least-squares"):
        from graphgrow.rmntr.levels import supervised_loss
        build_levels(network, supervised_loss(torch.zeros(3, 2, dtype=DT), torch.zeros(3, 1, dtype=DT),
                                              torch.nn.functional.mse_loss), "width", 1, model="gauss-newton")


def test_gradient_pairing_reads_the_residual_jacobian_and_gives_coherent_levels():
    from torch.autograd.functional import jacobian
    import passes
    from graphgrow.rmntr.levels import unit_strength
    network = pinn_network(6)
    problem = PoissonPINN(grid=9)
    params = {n: p.detach() for n, p in network.module.named_parameters()}
    J = jacobian(lambda b: problem.residual(network.module, {**params, "hidden.bias": b}), params["hidden.bias"])
    A = (J / J.abs().amax(dim=1, keepdim=True)).T @ J
    expected = (A / torch.outer(A.diagonal().sqrt(), A.diagonal().sqrt())).abs()
    strength = unit_strength(network, problem, "hidden")
    assert torch.allclose(strength, expected, rtol=1e-10, atol=1e-12)
    groups = passes.strongest_pairs(strength)
    assert sorted(u for g in groups for u in g) == list(range(6)) and all(len(g) == 2 for g in groups)
    best = max(((i, j) for i in range(6) for j in range(i + 1, 6)), key=lambda ij: float(strength[ij]))
    assert list(best) in groups
    levels = build_levels(network, problem, "width", 2, pairing="gradient")
    R = levels[0].restriction.dense()
    assert torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=DT), atol=1e-14)
    assert levels[1].vector.size == 3 * 2 + 3 + 3 + 1      # the [2, 3, 1] network


def test_average_coarse_scaling_preserves_equal_pairs_through_tanh_and_stays_coherent():
    from graphgrow import GraphgrowError
    from graphgrow.rmntr.prox import L1Term
    network = pinn_network(4)
    with torch.no_grad():   # units 0 = 1 and 2 = 3 (in and out weights, biases)
        for name in ("hidden.weight", "hidden.bias"):
            p = dict(network.module.named_parameters())[name]
            p[1], p[3] = p[0].clone(), p[2].clone()
        head = network.module.head.weight
        head[0, 1], head[0, 3] = head[0, 0].clone(), head[0, 2].clone()
        network.module.hidden.weight.mul_(3.0)   # saturating pre-activations
    problem = PoissonPINN(grid=9)
    values = {}
    for scaling in ("orthonormal", "average"):
        fine, coarse = build_levels(network, problem, "width", 2, coarse_scaling=scaling)
        x = fine.vector.of(network)
        values[scaling] = (fine.objective.value(x), coarse.objective.value(fine.restriction.restrict(x)))
    fine_value, coarse_value = values["average"]
    assert coarse_value == pytest.approx(fine_value, rel=1e-13)
    assert abs(values["orthonormal"][1] - fine_value) > 1e-3 * fine_value     # orthonormal is not
    levels = build_levels(network, problem, "width", 2, coarse_scaling="average")
    x = levels[0].vector.of(network) + 0.05
    method = RMNTR(levels, torch.zeros(x.numel(), dtype=DT))
    gradient = levels[0].objective.linearize(x).gradient
    y0, coarse_gradient, _, _ = method.coarse_model(0, x, gradient, L1Term.fine(method.weight))
    shift, lin = method.coarse_shift(0, y0, coarse_gradient)
    assert torch.allclose(lin.gradient + shift, levels[0].restriction.dense() @ gradient, rtol=0, atol=1e-13)
    with pytest.raises(GraphgrowError, match="width"):
        build_levels(network, problem, "depth", 2, coarse_scaling="average")
    with pytest.raises(GraphgrowError, match="coarse scaling"):
        build_levels(network, problem, "width", 2, coarse_scaling="sum")
