"""Thesis Figures 3.1/3.2 (Section 3.3.1, Appendix B.2): one coarse grid correction after 50
SGD steps on a 50-dimensional quadratic, for restrictions onto 25 eigenvectors (largest,
smallest, random eigenvalues), at a moderate (0.01) and a small (0.001) learning rate.

    PYTHONPATH=. python benchmarks/mgopt_quadratic.py [--seeds 10]

Writes benchmarks/reports/mgopt/quadratic_lr*.png and prints, per learning rate, how often
each restriction's correction was taken and the median final loss relative to plain SGD.
The start point is theta0 = 3 N(0, I) (Appendix B.2 does not state it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from graphgrow.mgopt.quadratic import eigen_restriction, figure_run, model_problem
from graphgrow.runtime.plots import plt

REPORT = Path(__file__).parent / "reports" / "mgopt"
KINDS = ("sgd", "largest", "smallest", "random")
COLORS = {"sgd": "C0", "largest": "C3", "smallest": "C2", "random": "C1"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--start-scale", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    REPORT.mkdir(parents=True, exist_ok=True)
    for lr in (0.01, 0.001):
        curves = {k: [] for k in KINDS}
        taken = {k: 0 for k in KINDS}
        best = {k: 0 for k in KINDS}
        for seed in range(args.seeds):
            problem, eigenvalues, Q = model_problem(seed)
            theta0 = args.start_scale * torch.randn(50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            optimum = problem.value({"theta": problem.minimizer()})
            finals = {}
            for kind in KINDS:  # every contender sees the same noise sequence (same seed)
                R = None if kind == "sgd" else eigen_restriction(eigenvalues, Q, kind, 25, seed=seed)
                result = figure_run(problem, R, lr, seed=seed, theta0=theta0)
                losses = np.array(result["losses"]) - optimum
                if result["corrected"]:
                    losses = np.delete(losses, 51)  # keep the x-axis in SGD iterations: cgc sits at 50
                curves[kind].append(losses)
                taken[kind] += result["corrected"]
                finals[kind] = losses[-1]
            best[min(finals, key=finals.get)] += 1
        figure, axis = plt.subplots(figsize=(7, 4))
        for kind in KINDS:
            stacked = np.stack(curves[kind])
            axis.plot(np.median(stacked, axis=0), color=COLORS[kind],
                      label=f"{kind} (cgc taken {taken[kind]}/{args.seeds})" if kind != "sgd" else "SGD")
        axis.axvline(50, color="0.4", linestyle=":")
        axis.set_yscale("log")
        axis.set_xlabel("SGD iteration (correction after 50)")
        axis.set_ylabel("f(theta) - f* (median over seeds)")
        axis.set_title(f"quadratic model problem, lr {lr}")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(REPORT / f"quadratic_lr{lr}.png", dpi=110)
        plt.close(figure)
        sgd_final = np.array([c[-1] for c in curves["sgd"]])
        print(f"lr {lr}:")
        for kind in KINDS[1:]:
            ratio = np.array([c[-1] for c in curves[kind]]) / sgd_final
            print(f"  {kind:9s} cgc taken {taken[kind]:2d}/{args.seeds}  median final gap / SGD's {np.median(ratio):.3f}"
                  f"  best restriction in {best[kind]}/{args.seeds} seeds")


if __name__ == "__main__":
    main()
