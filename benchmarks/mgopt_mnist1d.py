"""MG/Opt on the deep ResNet of von Planta, Kopanicakova & Krause, "Training of deep residual
networks with stochastic MG/OPT" (2021): MNIST-1D (4,000 train / 1,000 test, 40 features), a
40->10 lift, 256 one-weight blocks x <- x + (1/256) ReLU(W x + b), a 10->10 head, SGD lr 0.1,
batch 1000, 4 levels by depth coarsening (256 -> 128 -> 64 -> 32 blocks).

    pip install mnist1d==0.0.2.post1     # benchmark-only dependency, never imported by graphgrow
    PYTHONPATH=. python benchmarks/mgopt_mnist1d.py [--epochs 4 --seeds 3]
    PYTHONPATH=. python benchmarks/mgopt_mnist1d.py --epochs 4 --seeds 2 --momentum-variants \
        --only momentum --prefix mnist1d_momentum

The data come from the ``mnist1d`` package's own generator (``make_dataset`` with its default
arguments: 5,000 samples, 80/20 split, seed 42), run locally; nothing is downloaded. The
generated arrays are cached as an npz file (``--cache``) and read with graphgrow's npz loader.

Contenders (interleaved: seed outer, contender inner; torch on one thread): fine SGD, SGD with
momentum 0.9, the anchor's MG/Opt (a V-cycle every iteration, injection restriction, the same
mini-batch on every level), MG/Opt with graphgrow's defaults (Algorithm 5 with a V-cycle,
kappa 0.5, K 10, R = P^T/2, fresh batches), MG/Opt straight to the coarsest level (no
smoothing on the intermediate levels), coarse training without the correction term, and nested
iteration (``--momentum-variants``: two of them with momentum on every level as well).
Multilevel contenders stop after ``--epochs`` fine epochs or ``--work-factor`` times
SGD's work, whichever comes first. Reports time and work to reach SGD's final training loss
(linear interpolation between evaluations), the diagnosis (share of the blocks in the squared
gradient norm, kappa-rule ratios ||R_g g||^2 / ||g||^2, wall time per gradient on each level,
the cost of moving parameters between levels) and writes benchmarks/reports/mgopt/mnist1d_*.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from graphgrow.compiler import Network
from graphgrow.ir import graph_from_text
from graphgrow.mgopt import run
from graphgrow.mgopt.network import build_network_hierarchy
from graphgrow.runtime.data import npz
from graphgrow.runtime.splits import as_splits
from mgopt_resnet import REPORT, plot_medians

SPEC = """
graphgrow: 1
name: resnet_mnist1d
input: {shape: [40]}
vars: {blocks: 256, width: 10}
layers:
  - {name: lift, op: linear, out: ${width}}
  - repeat: ${blocks}
    layers:
      - {name: "res${i}", op: residual, form: one_weight, activation: relu, h: ${1/blocks}}
  - {name: head, op: linear, out: 10}
"""


def mnist1d_file(cache: Path) -> Path:
    """MNIST-1D from the package's generator (default recipe), cached as npz."""
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset
        data = make_dataset(get_dataset_args())
        np.savez(cache, x_train=data["x"].astype(np.float32), y_train=data["y"].astype(np.int64),
                 x_test=data["x_test"].astype(np.float32), y_test=data["y_test"].astype(np.int64))
    return cache


def contenders(momentum_variants: bool = False) -> dict[str, dict]:
    anchor = dict(levels=4, min_gap=0, kappa=0.0, restriction="injection", same_batch=True)
    return {
        "SGD": dict(levels=1),
        "SGD momentum 0.9": dict(levels=1, momentum=0.9),
        "anchor: V-cycle every it., injection, same batch": anchor,
        "defaults: MG/Opt 4-level (kappa 0.5, K 10)": dict(levels=4),
        "MG/Opt straight to coarsest (no smoothing, K 10)": dict(levels=4, pre_smooth=0, post_smooth=0),
        "no-correction 4-level": dict(levels=4, variant="no-correction"),
        "nested 4-level": dict(levels=4, variant="nested", nested_epochs=1),
    } | ({
        "straight to coarsest + momentum 0.9": dict(levels=4, pre_smooth=0, post_smooth=0, momentum=0.9),
        "no-correction 4-level + momentum 0.9": dict(levels=4, variant="no-correction", momentum=0.9),
    } if momentum_variants else {})


def reach(evals: list[dict], target: float, key: str) -> float | None:
    """``key`` (train_time or work) where the training loss first reaches ``target``, linearly
    interpolated between the evaluations around it."""
    for before, after in zip(evals, evals[1:]):
        if after["train_loss"] <= target:
            if before["train_loss"] <= target:
                return before[key]
            share = (before["train_loss"] - target) / (before["train_loss"] - after["train_loss"])
            return before[key] + share * (after[key] - before[key])
    return None


def median_ms(function, repeats: int = 7) -> float:
    function()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return 1000 * float(np.median(times))


def diagnosis(graph, dataset) -> dict:
    """Gradient share of the blocks, wall time per gradient on each level against its FLOP cost,
    and the time of one restriction + prolongation, compiled (flat vectors) and tensor by tensor."""
    network = Network.build(graph, seed=0)
    train, _ = as_splits(dataset)
    hierarchy = build_network_hierarchy(network, train, "depth", 4, batch=1000)
    fine = hierarchy.levels[0]
    theta = fine.parameters()
    _, grad = fine.value_and_grad(theta, slice(None))
    named = fine.named(grad)
    blocks = sum(float((g ** 2).sum()) for n, g in named.items() if n.startswith("res"))
    share = blocks / float((grad["flat"] ** 2).sum())
    batch = fine.draw_batch(torch.Generator().manual_seed(0))
    level_ms, start = [], theta
    for level, problem in enumerate(hierarchy.levels):
        level_ms.append(median_ms(lambda: problem.value_and_grad(start, batch), 3))
        if level < len(hierarchy.transfers):
            start = hierarchy.transfers[level].restrict(start)
    transfer = hierarchy.transfers[0]
    fine_named = {k: v.clone() for k, v in fine.named(theta).items()}
    flat_ms, dict_ms = [], []
    for _ in range(5):  # interleaved
        flat_ms.append(median_ms(lambda: transfer.prolong(transfer.restrict(theta)), 5))
        dict_ms.append(median_ms(lambda: transfer.named.prolong(transfer.named.restrict(fine_named)), 5))
    return {"block_share_of_squared_gradient_at_init": share,
            "level_costs": [p.cost for p in hierarchy.levels],
            "gradient_ms_per_level": level_ms,
            "wall_time_relative_to_fine": [ms / level_ms[0] for ms in level_ms],
            "transfer_cost_work_units": transfer.cost,
            "restrict_plus_prolong_ms": {"flat": float(np.median(flat_ms)), "dicts": float(np.median(dict_ms))}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work-factor", type=float, default=1.5)
    parser.add_argument("--cache", default="/tmp/graphgrow_mnist1d.npz")
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="run only contenders whose name contains one of these words (SGD always runs)")
    parser.add_argument("--momentum-variants", action="store_true",
                        help="also MG/Opt straight to coarsest and no-correction with momentum 0.9 on every level")
    parser.add_argument("--prefix", default="mnist1d", help="names of the files written to the report folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    REPORT.mkdir(parents=True, exist_ok=True)
    graph = graph_from_text(SPEC)
    dataset = npz(str(mnist1d_file(Path(args.cache))))
    began = time.perf_counter()
    diagnosed = diagnosis(graph, dataset) if args.only is None else None
    print(json.dumps(diagnosed, indent=1), flush=True)
    sgd_work = args.epochs * 4  # 4000 / 1000 fine iterations per epoch
    chosen = {name: settings for name, settings in contenders(args.momentum_variants).items()
              if name == "SGD" or args.only is None or any(word in name for word in args.only)}
    runs: dict[str, list[list[dict]]] = {name: [] for name in chosen}
    finals: dict[str, list[dict]] = {name: [] for name in chosen}
    ratios: dict[str, list[float]] = {name: [] for name in chosen}
    for seed in range(args.seeds):
        for name, settings in chosen.items():
            budget = None if settings["levels"] == 1 else args.work_factor * sgd_work
            result = run(graph, dataset, alpha=0.1, batch=1000, epochs=args.epochs, seed=seed, work_budget=budget,
                         **settings)
            evals = [r for r in result.records if r["event"] == "eval"]
            steps = [r for r in result.records if r["event"] == "step" and r["restricted_sq_norm"] is not None]
            ratios[name].extend(r["restricted_sq_norm"] / r["grad_sq_norm"] for r in steps)
            runs[name].append(evals)
            finals[name].append(result.summary["final"])
            final = result.summary["final"]
            print(f"seed {seed} {name:52s} loss {final['train']['loss']:.4f} acc {1 - final['test']['error']:.3f} "
                  f"time {final['train_time']:6.1f}s work {final['work']:6.1f} it {final['iterations']} "
                  f"cgc {final['corrections']} rej {final['rejected']} transfer work {final['transfer_work']}",
                  flush=True)
    total = time.perf_counter() - began
    rows = []
    for name in runs:
        time_ratio, work_ratio = [], []
        for seed in range(args.seeds):
            sgd = runs["SGD"][seed]
            target = sgd[-1]["train_loss"]
            reached_time, reached_work = reach(runs[name][seed], target, "train_time"), reach(runs[name][seed], target, "work")
            time_ratio.append(np.nan if reached_time is None else reached_time / sgd[-1]["train_time"])
            work_ratio.append(np.nan if reached_work is None else reached_work / sgd[-1]["work"])
        rows.append({"contender": name,
                     "final_train_loss": float(np.median([f["train"]["loss"] for f in finals[name]])),
                     "final_test_accuracy": float(np.median([1 - f["test"]["error"] for f in finals[name]])),
                     "train_time": float(np.median([f["train_time"] for f in finals[name]])),
                     "work": float(np.median([f["work"] for f in finals[name]])),
                     "corrections": float(np.median([f["corrections"] for f in finals[name]])),
                     "time_ratio": [None if np.isnan(r) else round(float(r), 3) for r in time_ratio],
                     "work_ratio": [None if np.isnan(r) else round(float(r), 3) for r in work_ratio],
                     "kappa_ratio_median": float(np.median(ratios[name])) if ratios[name] else None,
                     "kappa_ratio_min": float(np.min(ratios[name])) if ratios[name] else None})
    print(f"\ntotal benchmark time {total:.0f} s")
    print("\n| contender | final train loss | test accuracy | train time [s] | work | corrections | "
          "time to SGD's loss / SGD's time: median [seeds] | work to SGD's loss / SGD's work: median [seeds] |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        def median(values):
            finite = [v for v in values if v is not None]
            return f"{np.median(finite):.2f}" if len(finite) == len(values) else (
                f"{np.median(finite):.2f}*" if finite else "-")
        print(f"| {row['contender']} | {row['final_train_loss']:.4f} | {row['final_test_accuracy']:.3f} | "
              f"{row['train_time']:.1f} | {row['work']:.0f} | {row['corrections']:.0f} | "
              f"{median(row['time_ratio'])} {row['time_ratio']} | {median(row['work_ratio'])} {row['work_ratio']} |")
    for row in rows:
        if row["kappa_ratio_median"] is not None:
            print(f"kappa ratio ||R_g g||^2/||g||^2 {row['contender']}: median {row['kappa_ratio_median']:.6f}, "
                  f"min {row['kappa_ratio_min']:.6f}")
    (REPORT / f"{args.prefix}_results.json").write_text(json.dumps({"args": vars(args), "diagnosis": diagnosed,
                                                              "total_seconds": total, "rows": rows,
                                                              "evaluations": runs}, indent=1) + "\n")
    plot_medians(runs, "ResNet 256 one-weight blocks (h = 1/256), MNIST-1D, depth hierarchy x4", args.prefix)


if __name__ == "__main__":
    main()
