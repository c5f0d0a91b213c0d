"""The recursive method (float64): first-order coherence on graphgrow hierarchies, one level ==
the single-level method, the lasso solution, the reductions of recursive steps."""
import pytest
import torch
from torch.autograd.functional import jacobian

from graphgrow import GraphgrowError
from graphgrow.compiler.io import load_network
from graphgrow.rmntr.levels import AutogradObjective, Level, build_levels, supervised_loss
from graphgrow.rmntr.method import RMNTR, RMNTRConfig
from graphgrow.rmntr.prox import Restriction, soft_threshold
from graphgrow.runtime.data import spiral
from graphgrow.runtime.splits import loss_fn

DT = torch.float64


def spiral_levels(spec, kind, levels=2, **options):
    network = load_network(spec, seed=0)
    network.module.to(DT)
    data = spiral(0, points_per_class=40, n_train=60)
    loss = supervised_loss(data.x_train.to(DT), data.y_train, loss_fn("cross_entropy"))
    return build_levels(network, loss, kind, levels, **options)


@pytest.mark.parametrize("spec, kind, options", [
    ("specs/fnn_spiral.yaml", "width", {"layers": ["fc1"], "groups": [[0, 1], [2, 3], [4]]}),
    ("specs/resnet_ode.yaml", "depth", {}),
])
def test_first_order_coherence_on_graphgrow_hierarchies(spec, kind, options):
    levels = spiral_levels(spec, kind, **options)
    fine, coarse = levels
    # R independently: the Jacobian of the passes' restriction on flat vectors
    transfer_R = jacobian(lambda x: fine.restriction.restrict(x), torch.zeros(fine.vector.size, dtype=DT))
    assert torch.allclose(transfer_R, fine.restriction.dense(), atol=0)
    assert torch.allclose(transfer_R @ transfer_R.T, torch.eye(coarse.vector.size, dtype=DT), atol=1e-14)
    theta = fine.vector.of(fine.network) + 0.1 * torch.randn(fine.vector.size, dtype=DT,
                                                             generator=torch.Generator().manual_seed(1))
    method = RMNTR(levels, torch.full((fine.vector.size,), 1e-3, dtype=DT))
    gradient = fine.objective.linearize(theta).gradient
    from graphgrow.rmntr.prox import L1Term
    y0, coarse_gradient, _, _ = method.coarse_model(0, theta, gradient, L1Term.fine(method.weight))
    shift, _ = method.coarse_shift(0, y0, coarse_gradient)
    # the coarse model's smooth part as its own function, differentiated by autograd
    model = AutogradObjective(lambda y: coarse.objective.function(y) + shift @ y)
    model_gradient = model.linearize(y0).gradient
    expected = transfer_R @ gradient
    assert float((model_gradient - expected).abs().max()) <= 1e-12 * max(1.0, float(expected.abs().max()))
    assert float(gradient.abs().max()) > 1e-3          # not trivially zero


def test_depth_hierarchies_need_injection_and_width_needs_orthonormal_scaling():
    with pytest.raises(GraphgrowError, match="injection"):
        spiral_levels("specs/resnet_ode.yaml", "depth", restriction="half-transpose")
    with pytest.raises(GraphgrowError, match="orthonormal"):
        spiral_levels("specs/fnn_spiral_deep.yaml", "width", scaling="average")
    with pytest.raises(GraphgrowError, match="width or depth"):
        spiral_levels("specs/fnn_spiral_deep.yaml", "batch")


def lasso_levels(seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = 30, 16
    A = torch.randn(m, n, generator=g, dtype=DT) / m ** 0.5
    b = torch.randn(m, generator=g, dtype=DT)
    pairs = torch.arange(n) // 2
    restriction = Restriction(pairs, torch.full((n,), 2 ** -0.5, dtype=DT), n // 2)
    R = restriction.dense()
    fine = AutogradObjective(lambda x: 0.5 * ((A @ x - b) ** 2).sum())
    coarse = AutogradObjective(lambda y: 0.5 * ((A @ (R.T @ y) - b) ** 2).sum())   # Galerkin
    levels = [Level(None, fine, None, 1.0, restriction, "fine"), Level(None, coarse, None, 0.5, None, "coarse")]
    return levels, A, b


def ista(A, b, beta, iterations=4000):
    L = float(torch.linalg.matrix_norm(A, 2)) ** 2
    x = torch.zeros(A.shape[1], dtype=DT)
    for _ in range(iterations):
        x = soft_threshold(x - A.T @ (A @ x - b) / L, beta / L)
    return x


@pytest.mark.parametrize("nlevels, rescale", [(1, False), (2, False), (2, True)])
def test_lasso_reaches_the_ista_solution(nlevels, rescale):
    levels, A, b = lasso_levels()
    beta = 0.3
    expected = ista(A, b, beta)
    assert int((expected == 0).sum()) >= 2                    # the l1 term is active
    config = RMNTRConfig(gtol=1e-12, max_iterations=300, kappa_h=0.1, coarse_min_h=0.0, rescale_coarse_steps=rescale)
    method = RMNTR(levels[:nlevels], torch.full((16,), beta, dtype=DT), config)
    result = method.minimize(torch.zeros(16, dtype=DT))
    assert result.reason == "stationary"
    assert float((result.x - expected).abs().max()) <= 1e-8
    accepted = [r for r in result.records if r["accepted"]]
    assert all(r["predicted"] >= 0 and r["step_norm"] <= r["radius"] * (1 + 1e-12) for r in accepted)
    assert torch.equal(result.x == 0, expected == 0)          # exact zeros, also after coarse steps
    if nlevels == 2:
        assert method.coarse_accepted[1] >= 1
        assert any(r["level"] == 1 for r in result.records)


def test_a_recursive_step_predicts_with_the_composite_l1_term():
    levels, A, b = lasso_levels(1)
    beta = 0.3
    weight = torch.full((16,), beta, dtype=DT)
    method = RMNTR(levels, weight, RMNTRConfig(kappa_h=0.0, coarse_min_h=0.0))
    x = torch.randn(16, dtype=DT, generator=torch.Generator().manual_seed(2))
    lin = method._linearize(0, x, None)
    from graphgrow.rmntr.prox import L1Term, stationarity
    phi = L1Term.fine(weight)
    step, run = method._recursive_step(0, x, lin, phi, stationarity(phi, x, lin.gradient), 1.0)
    assert step is not None and run.accepted >= 1
    R = levels[0].restriction.dense()
    y0, y = R @ x, R @ x + R @ step.s
    assert torch.allclose(R.T @ (y - y0), step.s, atol=1e-15)           # s lies in the range of R^T
    fc = lambda v: 0.5 * float(((A @ (R.T @ v) - b) ** 2).sum())   # noqa: E731
    v = R @ (A.T @ (A @ x - b)) - R @ (A.T @ (A @ (R.T @ y0) - b))
    l1 = lambda z: beta * float(z.abs().sum())                      # noqa: E731
    predicted = (fc(y0) + float(v @ y0) + l1(x)) - (fc(y) + float(v @ y) + l1(x + step.s))
    assert step.predicted == pytest.approx(predicted, rel=1e-10, abs=1e-14)
    # the coarse solve's own l1 would be beta ||y||_1, which is a different number
    assert abs(l1(y) - l1(x + step.s)) > 1e-6
    assert float(torch.linalg.vector_norm(step.s)) <= 1.0 + 1e-12


def test_one_level_equals_two_levels_that_never_recurse():
    runs = []
    for nlevels, kappa in ((1, 0.5), (2, float("inf"))):
        levels = spiral_levels("specs/fnn_spiral_deep.yaml", "width", levels=nlevels)
        x0 = levels[0].vector.of(levels[0].network)
        method = RMNTR(levels, torch.full((x0.numel(),), 1e-3, dtype=DT),
                       RMNTRConfig(max_iterations=15, kappa_h=kappa, gtol=1e-10))
        runs.append((method.minimize(x0), levels[0].counts))
    (one, counts_one), (two, counts_two) = runs
    assert torch.equal(one.x, two.x)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("elapsed", "work", "gradients", "hvps", "values")}   # noqa: E731
                             for r in records]
    assert strip(one.records) == strip(two.records)
    assert (counts_one.gradients, counts_one.hvps) == (counts_two.gradients, counts_two.hvps)
    assert len(one.records) == 15 and one.value < one.records[0]["F"]
