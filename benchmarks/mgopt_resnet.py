"""MG/Opt on a one_weight tanh ResNet (MNIST 10k test set, 8,000/2,000 split, inputs max-pooled
to 7x7 and flattened): fine-level SGD against two-level MG/Opt (Algorithm 5), a 3-level
V-cycle, coarse training without the correction term and nested iteration, all on the depth
hierarchy built by ``passes`` (constant interpolation, R_p = R_g = P^T / 2, h doubled).

    PYTHONPATH=. python benchmarks/mgopt_resnet.py [--blocks 16 --width 32 --epochs 4 --seeds 5]

Contenders are interleaved (seed outer, contender inner), torch uses one thread. Reports,
per contender, the median over seeds of the final training loss, the training wall time
(evaluations excluded) and the work units, and the fraction of fine SGD's wall time (same
seed) each contender needs to first reach SGD's final training loss (evaluated every
``--evals-per-epoch``-th of an epoch). Multilevel contenders run ``--epochs`` fine epochs or
until they spent ``--work-factor`` times SGD's work units, whichever comes first (nested:
``--nested-epochs`` epochs on each coarse level first). Writes
benchmarks/reports/mgopt/resnet_*.png and resnet_results.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from graphgrow.runtime.data import mnist
from graphgrow.ir import graph_from_text
from graphgrow.mgopt import run
from graphgrow.runtime.plots import plt

REPORT = Path(__file__).parent / "reports" / "mgopt"
SPEC = """
graphgrow: 1
name: resnet_mnist
input: {{shape: [1, 28, 28]}}
layers:
  - {{name: pool, op: maxpool2d, kernel: 4}}
  - {{name: flat, op: flatten}}
  - {{name: lift, op: linear, out: {width}}}
  - repeat: {blocks}
    layers:
      - {{name: "res${{i}}", op: residual, form: one_weight, activation: tanh, h: {h}}}
  - {{name: head, op: linear, out: 10}}
"""


def contenders(args) -> dict[str, dict]:
    common = dict(hierarchy="depth", K=args.K, kappa=args.kappa, lam=args.lam, alpha_cgc=1.0)
    return {
        "fine SGD": dict(hierarchy="depth", levels=1),
        "MG/Opt 2-level": dict(common, levels=2, variant="mgopt"),
        "V-cycle 3-level": dict(common, levels=3, variant="mgopt", pre_smooth=1, post_smooth=1),
        "no-correction 2-level": dict(common, levels=2, variant="no-correction"),
        "nested 3-level": dict(hierarchy="depth", levels=3, variant="nested", nested_epochs=args.nested_epochs),
    }


def time_to_reach(evals: list[dict], target: float) -> float | None:
    for record in evals:
        if record["train_loss"] <= target:
            return record["train_time"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--K", type=int, default=3)
    parser.add_argument("--kappa", type=float, default=0.5)
    parser.add_argument("--lam", type=float, default=0.0)
    parser.add_argument("--nested-epochs", type=int, default=2)
    parser.add_argument("--work-factor", type=float, default=2.0,
                        help="multilevel contenders stop after this many times fine SGD's work units")
    parser.add_argument("--evals-per-epoch", type=int, default=4)
    parser.add_argument("--data", default="/work/shared/data/mnist")
    args = parser.parse_args()
    torch.set_num_threads(1)
    REPORT.mkdir(parents=True, exist_ok=True)
    graph = graph_from_text(SPEC.format(width=args.width, blocks=args.blocks, h=1.0 / args.blocks))
    data = mnist(args.data, split=(8000, 2000), seed=0)
    runs: dict[str, list[list[dict]]] = {name: [] for name in contenders(args)}
    finals: dict[str, list[dict]] = {name: [] for name in contenders(args)}
    began = time.perf_counter()
    for seed in range(args.seeds):
        for name, settings in contenders(args).items():
            budget = None if settings["levels"] == 1 else args.work_factor * args.epochs * -(-8000 // args.batch)
            result = run(graph, data, alpha=args.lr, epochs=args.epochs, batch=args.batch, seed=seed,
                         log_steps=False, evals_per_epoch=args.evals_per_epoch, work_budget=budget, **settings)
            evals = [r for r in result.records if r["event"] == "eval"]
            runs[name].append(evals)
            finals[name].append(result.summary["final"])
            print(f"seed {seed} {name:22s} loss {evals[-1]['train_loss']:.4f} test error {evals[-1]['test_error']:.4f} "
                  f"time {result.summary['final']['train_time']:6.2f}s work {result.summary['final']['work']:7.1f} "
                  f"corrections {result.summary['final']['corrections']} rejected {result.summary['final']['rejected']}",
                  flush=True)
    print(f"total benchmark time {time.perf_counter() - began:.0f}s")
    rows = []
    for name in runs:
        ratios = []
        for seed in range(args.seeds):
            target = runs["fine SGD"][seed][-1]["train_loss"]
            reached = time_to_reach(runs[name][seed], target)
            ratios.append(np.nan if reached is None else reached / finals["fine SGD"][seed]["train_time"])
        rows.append({"contender": name,
                     "final_train_loss": float(np.median([f["train"]["loss"] for f in finals[name]])),
                     "final_test_error": float(np.median([f["test"]["error"] for f in finals[name]])),
                     "train_time": float(np.median([f["train_time"] for f in finals[name]])),
                     "work": float(np.median([f["work"] for f in finals[name]])),
                     "time_to_sgd_loss_ratio": float(np.nanmedian(ratios)) if np.isfinite(ratios).any() else None,
                     "reached": int(np.isfinite(ratios).sum()), "ratios": [None if np.isnan(r) else round(r, 3) for r in ratios]})
    print("\n| contender | final train loss | test error | train time [s] | work units | time to SGD's final loss / SGD time (median) | seeds reaching it |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = "-" if row["time_to_sgd_loss_ratio"] is None else f"{row['time_to_sgd_loss_ratio']:.2f}"
        print(f"| {row['contender']} | {row['final_train_loss']:.4f} | {row['final_test_error']:.4f} | {row['train_time']:.1f} | "
              f"{row['work']:.0f} | {ratio} {row['ratios']} | {row['reached']}/{args.seeds} |")
    (REPORT / "resnet_results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    plot_medians(runs, f"ResNet {args.blocks} blocks x width {args.width}, MNIST 8k, depth hierarchy", "resnet")


def plot_medians(runs: dict[str, list[list[dict]]], title: str, prefix: str) -> None:
    """Training loss (median and IQR over seeds) against wall time and against work units:
    REPORT/<prefix>_loss_vs_time.png and _work.png."""
    for x_key, label in (("train_time", "training wall time [s]"), ("work", "work units (fine gradient evaluations)")):
        figure, axis = plt.subplots(figsize=(7.5, 4.5))
        for index, (name, seed_runs) in enumerate(runs.items()):
            end = max(r[-1][x_key] for r in seed_runs)  # past the shortest seed: a median of fewer seeds
            grid = np.linspace(0, end, 100)
            stacked = np.stack([np.interp(grid, [e[x_key] for e in r], [e["train_loss"] for e in r], right=np.nan)
                                for r in seed_runs])
            axis.plot(grid, np.nanmedian(stacked, axis=0), color=f"C{index}", label=name)
            axis.fill_between(grid, np.nanpercentile(stacked, 25, axis=0), np.nanpercentile(stacked, 75, axis=0),
                              color=f"C{index}", alpha=0.15)
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("training loss (median, IQR over seeds)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(REPORT / f"{prefix}_loss_vs_{'time' if x_key == 'train_time' else 'work'}.png", dpi=110)
        plt.close(figure)

if __name__ == "__main__":
    main()
