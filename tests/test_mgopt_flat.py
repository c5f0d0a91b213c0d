"""Flat parameter vectors and compiled transfers give the same MG/Opt runs as parameter dicts
with the ``passes`` transfers applied tensor by tensor, and their cost is in the work ledger."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from graphgrow.compiler import Network
from graphgrow.ir import graph_from_text
from graphgrow.mgopt import Hierarchy, MGOptConfig, optimize, run
from graphgrow.mgopt.flat import FLAT
from graphgrow.mgopt.network import build_network_hierarchy
from graphgrow.runtime.data import Dataset
from graphgrow.runtime.splits import Split
from test_mgopt_network import WIDE_FNN

RESNET = (Path(__file__).resolve().parent.parent / "specs" / "resnet_ode.yaml").read_text()
# two hidden layers, so that fc2's weight is mapped along both of its axes
WIDE_FNN = WIDE_FNN.replace("  - {name: head", "  - {name: fc2, op: linear, out: 8}\n  - {name: act2, op: tanh}\n  - {name: head")


class NamedProblem:
    """The reference: a level's loss on {name: tensor} dicts (one autograd leaf per parameter)."""

    def __init__(self, problem):
        self.problem, self.cost = problem, problem.cost

    def draw_batch(self, generator):
        return self.problem.draw_batch(generator)

    def _loss(self, params, batch):
        x, y = self.problem.inputs(batch)
        return F.cross_entropy(functional_call(self.problem.network.module, params, (x,)), y)

    def value_and_grad(self, params, batch):
        leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        loss = self._loss(leaves, batch)
        return float(loss.detach()), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def value(self, params, batch):
        with torch.no_grad():
            return float(self._loss(params, batch))


def split(n=48, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    return Split(x, (x[:, 0] * x[:, 1] > 0).long())


CASES = {
    "injection, constant, V-cycle every iteration, same batch, momentum":
        ("depth", RESNET, dict(restriction="injection", interpolation="constant"),
         dict(min_gap=0, kappa=0.0, same_batch=True, momentum=0.5)),
    "half-transpose, linear, Algorithm 5": ("depth", RESNET, dict(restriction="half-transpose", interpolation="linear"),
                                            dict(kappa=0.1, lam=0.1)),
    "width (maps on unit axes)": ("width", WIDE_FNN, {}, dict(kappa=0.0, backtracking=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flat_vectors_give_the_same_run_as_parameter_dicts(case):
    kind, spec, options, settings = CASES[case]
    network = Network.build(graph_from_text(spec), seed=2, dtype=torch.float64)
    flat = build_network_hierarchy(network, split(), kind, 3, batch=16, **options)
    named = Hierarchy([NamedProblem(p) for p in flat.levels], [t.named for t in flat.transfers])
    fine = flat.levels[0]
    config = MGOptConfig(alpha=0.2, K=2, descent_check=False, **settings)
    end, history, optimizer = optimize(flat, fine.parameters(), config, 6, seed=4)
    reference, reference_history, reference_optimizer = optimize(named, fine.named(fine.parameters()), config, 6,
                                                                 seed=4)
    assert [i.kind for i in history] == [i.kind for i in reference_history]
    assert optimizer.corrections >= 2
    for name, value in fine.named(end).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-10, atol=1e-12)
    # the transfers are in the ledger: same count as the dict run, each at the transfer's cost
    assert optimizer.transfers == reference_optimizer.transfers > 0
    expected = sum(t.cost for t in flat.transfers) / len(flat.transfers) * optimizer.transfers
    if len({t.cost for t in flat.transfers}) == 1:
        assert optimizer.transfer_work == pytest.approx(expected, rel=1e-12)
    assert optimizer.transfer_work > 0
    assert optimizer.work == pytest.approx(reference_optimizer.work + optimizer.transfer_work, rel=1e-12)


def test_copies_compile_to_a_single_gather():
    """Injection (R) and constant interpolation (P) are row selections: no matrix products."""
    network = Network.build(graph_from_text(RESNET), seed=0)
    hierarchy = build_network_hierarchy(network, split(dtype=torch.float32), "depth", 2, batch=None,
                                        restriction="injection")
    transfer = hierarchy.transfers[0]
    assert transfer.compiled and transfer._restrict.mixed == [] and transfer._prolong.mixed == []
    averaged = build_network_hierarchy(network, split(dtype=torch.float32), "depth", 2, batch=None).transfers[0]
    assert len(averaged._restrict.mixed) == 1 and averaged._prolong.mixed == []  # one group: the stage's roles
    weights, sources, _ = averaged._restrict.mixed[0]
    assert weights.shape == (4, 2) and bool((weights == 0.5).all())  # 8 -> 4 blocks, two fine blocks each
    # float32 in, float32 out, on the parameters' device
    out = averaged.restrict(hierarchy.levels[0].parameters())[FLAT]
    assert out.dtype == torch.float32 and out.shape == (hierarchy.levels[1].layout.numel,)


def test_run_records_transfer_work():
    data = Dataset(*(lambda s: (s.x[:32].float(), s.y[:32], s.x[32:].float(), s.y[32:]))(split()), (2,), 2, "q")
    result = run(graph_from_text(RESNET), data, levels=3, K=1, kappa=0.0, epochs=1, batch=16, log_steps=False)
    final = result.summary["final"]
    assert final["transfers"] > 0 and 0 < final["transfer_work"] < final["work"]
