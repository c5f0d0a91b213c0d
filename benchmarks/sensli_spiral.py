"""SensLI on the spiral data (thesis 4.3.3, Figures 4.5a/c and 4.9a).

    PYTHONPATH=. python benchmarks/sensli_spiral.py [--seeds 10] [--only fnn,resnet,fnn44] [--cost-only]

Experiments (full-batch GD, insertion at epoch 450, then 1400 more epochs):
  fnn     FNN 2-5-2 ReLU, lr 0.2: SensLI vs baseline (no growth) vs the final 2-5-5-2 from scratch
  resnet  ResNet lift 2->3, one two-weight tanh block growing to two, lr 0.1: same comparisons
  fnn44   FNN 2-4-4-2 ReLU, lr 0.2: SensLI (max merit) vs LIother (min merit) vs random position
Network seeds 0..N-1, one data split (spiral seed 0). Writes benchmarks/reports/sensli/*.png and
prints a markdown table per experiment plus the sensitivity-cost ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graphgrow import Network
from graphgrow.data import spiral
from graphgrow.ir import load_graph
from graphgrow.plots import plot_comparison
from graphgrow.sensli import grow, sensitivities
from graphgrow.train import TrainConfig, Trainer

REPORT = Path(__file__).parent / "reports" / "sensli"
INSERT_AT, EPOCHS = 450, 1850


def run(spec, data, seed, lr, strategy, **extra):
    return grow(spec, data, strategy=strategy, insert_at=[INSERT_AT], max_insertions=1, epochs=EPOCHS, lr=lr,
                seed=seed, log_steps=False, **extra)


def from_scratch(graph, data, seed, lr):
    """The final architecture with a fresh initialisation, trained for the same epochs."""
    return grow(Network.build(graph, seed=seed), data, strategy="none", epochs=EPOCHS, lr=lr, seed=seed,
                log_steps=False)


def stats(values):
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "median": statistics.median(values),
            "min": min(values), "max": max(values), "values": values}


def table(name, results):
    lines = [f"### {name}", "", "| variant | final train loss mean ± std (median) [min, max] | "
             "final test error mean ± std | wall s (median) | params |", "|---|---|---|---|---|"]
    for variant, rows in results.items():
        loss = stats(r.summary["final"]["train"]["loss"] for r in rows)
        error = stats(r.summary["final"]["test"]["error"] for r in rows)
        seconds = statistics.median(r.summary["final"]["seconds"] for r in rows)
        params = sorted({r.summary["params"]["final"] for r in rows})
        lines.append(f"| {variant} | {loss['mean']:.4f} ± {loss['std']:.4f} ({loss['median']:.4f}) "
                     f"[{loss['min']:.4f}, {loss['max']:.4f}] | {error['mean']:.3f} ± {error['std']:.3f} | "
                     f"{seconds:.2f} | {params} |")
    return "\n".join(lines)


def experiment_comparison(spec, lr, seeds, data):
    results = {"SensLI": [], "baseline": [], "final arch. from scratch": []}
    for seed in range(seeds):
        grown = run(spec, data, seed, lr, "sensli")
        results["SensLI"].append(grown)
        results["baseline"].append(run(spec, data, seed, lr, "none"))
        results["final arch. from scratch"].append(from_scratch(grown.network.graph, data, seed, lr))
    return results


def experiment_positions(spec, lr, seeds, data):
    results = {"SensLI (max)": [], "LIother (min)": [], "random": []}
    for seed in range(seeds):
        for name, strategy in zip(results, ("sensli", "min", "random")):
            results[name].append(run(spec, data, seed, lr, strategy))
    return results


def sensitivity_cost(spec, data, repeats=20):
    """Median seconds of one sensitivity evaluation over all training data against one
    full-batch training epoch of the same (current) network, measured interleaved."""
    network = Network.build(load_graph(spec), seed=0)
    trainer = Trainer(network, data, TrainConfig(epochs=1, lr=0.1, log_steps=False))
    sens, epoch = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        sensitivities(network, data, batch=None)
        sens.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.step(trainer.train_split.x, trainer.train_split.y)
        epoch.append(time.perf_counter() - start)
    return statistics.median(sens), statistics.median(epoch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--only", default="fnn,resnet,fnn44")
    parser.add_argument("--cost-only", action="store_true", help="only the sensitivity-vs-epoch measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = spiral(0)
    if args.cost_only:
        for spec in ("specs/fnn_spiral.yaml", "specs/resnet_spiral.yaml"):
            sens_s, epoch_s = sensitivity_cost(spec, data)
            print(f"{spec}: sensitivity evaluation {sens_s * 1e3:.2f} ms vs one training epoch "
                  f"{epoch_s * 1e3:.2f} ms: ratio {sens_s / epoch_s:.1f} (target <= 2.5)")
        return
    REPORT.mkdir(parents=True, exist_ok=True)
    experiments = {
        "fnn": ("Spiral FNN 2-5-2 ReLU, full-batch GD lr 0.2", "specs/fnn_spiral.yaml", 0.2, experiment_comparison),
        "resnet": ("Spiral ResNet 2-3(tanh block)-2, full-batch GD lr 0.1", "specs/resnet_spiral.yaml", 0.1,
                   experiment_comparison),
        "fnn44": ("Spiral FNN 2-4-4-2 ReLU, insertion position, full-batch GD lr 0.2", "specs/fnn_spiral_deep.yaml",
                  0.2, experiment_positions),
    }
    results_path = REPORT / "spiral_results.json"
    summary = json.loads(results_path.read_text()) if results_path.exists() else {}  # --only keeps the rest
    for key in args.only.split(","):
        title, spec, lr, experiment = experiments[key]
        start = time.perf_counter()
        results = experiment(spec, lr, args.seeds, data)
        print(table(title, results))
        print(f"\n({args.seeds} seeds, {time.perf_counter() - start:.0f} s for the experiment)\n")
        for axis in ("iteration", "time"):
            plot_comparison({k: [r.records for r in v] for k, v in results.items()},
                            REPORT / f"spiral_{key}_{axis}.png", x=axis, title=title)
        positions = {k: [r.insertions[0]["positions"][0] if r.insertions else None for r in v]
                     for k, v in results.items()}
        flops = {k: statistics.median(r.summary["flops_per_sample"]["run"]["total"] for r in v)
                 for k, v in results.items()}
        sens_flops = statistics.median(r.summary["flops_per_sample"]["run"]["sensitivity"] for r in next(iter(results.values())))
        print("insertion positions:", json.dumps(positions))
        print("FLOPs per training sample over the run (median):", json.dumps(flops),
              f"of which sensitivity evaluation {sens_flops}")
        summary[key] = {k: {"train_loss": stats(r.summary["final"]["train"]["loss"] for r in v),
                            "test_error": stats(r.summary["final"]["test"]["error"] for r in v),
                            "positions": positions[k], "flops": flops[k]} for k, v in results.items()}
        if key != "fnn44":
            sens_s, epoch_s = sensitivity_cost(spec, data)
            print(f"sensitivity evaluation {sens_s * 1e3:.2f} ms vs one training epoch {epoch_s * 1e3:.2f} ms: "
                  f"ratio {sens_s / epoch_s:.1f}\n")
            summary[key]["sensitivity_cost"] = {"sensitivity_s": sens_s, "epoch_s": epoch_s, "ratio": sens_s / epoch_s}
    results_path.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
