"""Seed 003: linear representation learning under anisotropic inputs, SGD vs Adam vs layer-wise.

Inputs x = Σ^{1/2} u with u Rademacher in d = 100 dimensions; Σ = Q diag(λ) Qᵀ with λ log-spaced
from 1 to 1/κ and a random rotation Q. Targets y = F* G* x + noise with G* (5 x 100, orthonormal
rows) and F* (20 x 5). The model is two bias-free Linear layers 100 -> 5 -> 20 trained on MSE with a
fresh batch of 256 per step. We count the steps until the subspace distance ‖(I − G*ᵀG*) V‖₂
(V an orthonormal basis of the first layer's row space) falls to 0.05.

Contenders: SGD, Adam, and FrobeniusPreconditioner (second moments, Monte-Carlo Fisher labels,
exponential averages of the estimates). Each contender's learning rate is tuned on a small grid
(the champion has the lowest median step count over the seeds; runs that never reach the threshold
count as the step limit), for every κ separately.

    PYTHONPATH=. python benchmarks/frobenius_linear_repr.py            # 4 κ x 3 seeds x 10 (method, lr): ~25 min
    PYTHONPATH=. python benchmarks/frobenius_linear_repr.py --quick    # κ = 1e3 only, 2 seeds, writes linear_repr_quick*
"""
import argparse
import json
import math
import os
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from graphgrow.precond import FrobeniusPreconditioner  # noqa: E402

REPORT_DIR = os.path.join(os.path.dirname(__file__), "reports", "frobenius")
INPUT_DIM, RANK, OUTPUT_DIM, BATCH, NOISE, THRESHOLD = 100, 5, 20, 256, 0.1, 0.05

LEARNING_RATES = {
    "SGD": [3.0, 1.0, 0.3],
    "Adam": [0.1, 0.03, 0.01],
    "layer-wise": [0.1, 0.03, 0.01, 0.003],
}


class Problem:
    """One draw of the teacher (Σ, G*, F*) for a given condition number."""

    def __init__(self, condition: float, seed: int):
        generator = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(INPUT_DIM, INPUT_DIM, generator=generator, dtype=torch.float64))
        eigenvalues = torch.logspace(0, -math.log10(condition), INPUT_DIM, dtype=torch.float64)
        self.sqrt_covariance = rotation @ torch.diag(eigenvalues.sqrt()) @ rotation.T
        basis, _ = torch.linalg.qr(torch.randn(INPUT_DIM, RANK, generator=generator, dtype=torch.float64))
        self.features = basis.T                                  # G*, orthonormal rows
        self.head = torch.randn(OUTPUT_DIM, RANK, generator=generator, dtype=torch.float64)
        self.complement = torch.eye(INPUT_DIM, dtype=torch.float64) - self.features.T @ self.features
        self.generator = generator

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        signs = torch.randint(0, 2, (BATCH, INPUT_DIM), generator=self.generator, dtype=torch.float64) * 2 - 1
        x = signs @ self.sqrt_covariance
        y = x @ self.features.T @ self.head.T + NOISE * torch.randn(BATCH, OUTPUT_DIM, generator=self.generator,
                                                                  dtype=torch.float64)
        return x.float(), y.float()

    def subspace_distance(self, first_layer: torch.Tensor) -> float:
        """‖(I − G*ᵀG*) V‖₂ for V an orthonormal basis of the row space of the first layer."""
        orthonormal, _ = torch.linalg.qr(first_layer.detach().double().T)
        return float(torch.linalg.matrix_norm(self.complement @ orthonormal, ord=2))


def make_optimizer(method: str, model: nn.Module, lr: float):
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    # damping far below the smallest input eigenvalue 1/κ, so that the input side whitens
    return FrobeniusPreconditioner(model, lr=lr, moment="second", labels="sampled", loss=nn.MSELoss(),
                                   estimate="ema", beta=0.05, damping_in=1e-6, damping_out=1e-4)


def run(method: str, lr: float, condition: float, seed: int, max_steps: int, record: bool = False):
    """Steps until the subspace distance reaches THRESHOLD (``max_steps`` if never) and the history."""
    problem = Problem(condition, seed)
    torch.manual_seed(1000 + seed)
    model = nn.Sequential(nn.Linear(INPUT_DIM, RANK, bias=False), nn.Linear(RANK, OUTPUT_DIM, bias=False))
    optimizer = make_optimizer(method, model, lr)
    loss_fn = nn.MSELoss()
    history = [problem.subspace_distance(model[0].weight)]
    for step in range(1, max_steps + 1):
        x, y = problem.batch()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return max_steps, history
        loss.backward()
        optimizer.step()
        distance = problem.subspace_distance(model[0].weight)
        if record:
            history.append(distance)
        if distance <= THRESHOLD and not record:
            return step, history
    reached = [i for i, d in enumerate(history) if d <= THRESHOLD]
    return (reached[0] if reached else max_steps), history


def main():
    global NOISE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", type=float, nargs="+", default=[1.0, 1e2, 1e3, 1e4])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="κ = 1e3 and 2 seeds only")
    parser.add_argument("--noise", type=float, default=NOISE, help="standard deviation of the label noise")
    parser.add_argument("--prefix", default=None,
                        help="output file prefix in reports/frobenius (default linear_repr, linear_repr_quick with --quick)")
    args = parser.parse_args()
    NOISE = args.noise
    if args.quick:
        args.conditions, args.seeds = [1e3], 2
    prefix = args.prefix or ("linear_repr_quick" if args.quick else "linear_repr")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.makedirs(REPORT_DIR, exist_ok=True)
    results = {}
    started = time.perf_counter()
    for condition in args.conditions:
        results[condition] = {}
        for method, rates in LEARNING_RATES.items():
            per_rate = {lr: [run(method, lr, condition, seed, args.max_steps)[0] for seed in range(args.seeds)]
                        for lr in rates}
            champion = min(rates, key=lambda lr: (sorted(per_rate[lr])[len(per_rate[lr]) // 2], sum(per_rate[lr])))
            results[condition][method] = {"champion_lr": champion, "steps": per_rate[champion],
                                          "grid": {str(lr): steps for lr, steps in per_rate.items()}}
            print(f"kappa={condition:g} {method:10s} champion lr={champion:g} steps per seed={per_rate[champion]} "
                  f"(grid {per_rate}) [{time.perf_counter() - started:.0f}s]", flush=True)
    with open(os.path.join(REPORT_DIR, f"{prefix}.json"), "w") as handle:
        json.dump({"max_steps": args.max_steps, "seeds": args.seeds, "threshold": THRESHOLD,
                   "results": {f"{c:g}": r for c, r in results.items()}}, handle, indent=1)
    plot_steps(results, args.max_steps, prefix)
    plot_curves(results, min(args.conditions, key=lambda c: abs(math.log10(c) - 3)), args.max_steps, prefix)


def plot_steps(results: dict, max_steps: int, prefix: str) -> None:
    conditions = sorted(results)
    figure, axis = plt.subplots(figsize=(6, 4))
    for offset, method in zip((-0.06, 0.0, 0.06), LEARNING_RATES):
        steps = [sorted(results[c][method]["steps"]) for c in conditions]
        medians = [s[len(s) // 2] for s in steps]
        positions = [math.log10(c) + offset for c in conditions]
        axis.errorbar(positions, medians, yerr=[[m - s[0] for m, s in zip(medians, steps)],
                                                [s[-1] - m for m, s in zip(medians, steps)]],
                      marker="o", capsize=3, label=method)
    axis.axhline(max_steps, color="grey", linestyle=":", label=f"step limit ({max_steps})")
    axis.set_xticks([math.log10(c) for c in conditions], [f"{c:g}" for c in conditions])
    axis.set_xlabel("condition number κ of the input covariance")
    axis.set_ylabel(f"steps to subspace distance ≤ {THRESHOLD}")
    axis.set_yscale("log")
    axis.set_title("Linear representation learning (median, min-max over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(REPORT_DIR, f"{prefix}_steps.png"), dpi=110)
    plt.close(figure)


def plot_curves(results: dict, condition: float, max_steps: int, prefix: str) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in LEARNING_RATES:
        lr = results[condition][method]["champion_lr"]
        _, history = run(method, lr, condition, 0, max_steps, record=True)
        axis.plot(history, label=f"{method} (lr {lr:g})")
    axis.axhline(THRESHOLD, color="grey", linestyle=":")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("‖(I − G*ᵀG*) V‖₂")
    axis.set_title(f"Subspace distance, κ = {condition:g}, seed 0, champions")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(REPORT_DIR, f"{prefix}_distance.png"), dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
