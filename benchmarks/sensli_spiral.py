"""SensLI on the spiral data (thesis 4.3.3, Figures 4.5a/c and 4.9a).

    PYTHONPATH=. python benchmarks/sensli_spiral.py [--seeds 10] [--only fnn,resnet,fnn44] [--cost-only]

Experiments (full-batch GD, insertion at epoch 450, then 1400 more epochs):
  fnn     FNN 2-5-2 ReLU, lr 0.2: SensLI vs baseline (no growth) vs the final 2-5-5-2 from scratch
  resnet  ResNet lift 2->3, one two-weight tanh block growing to two, lr 0.1: same comparisons
  fnn44   FNN 2-4-4-2 ReLU, lr 0.2: SensLI (max merit) vs LIother (min merit) vs random position
Network seeds 0..N-1, one data split (spiral seed 0); per seed the variants run one after the
other. Writes benchmarks/reports/sensli/*.png and spiral_results.json and prints a markdown table
per experiment, the insertion-position counts, for fnn/resnet the per-seed wall- and CPU-time
ratio SensLI / final architecture from scratch (same epochs) with its per-epoch breakdown and the
sensitivity-cost ratio, for fnn44 the paired win counts. Load averages are printed per experiment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from graphgrow import Network
from graphgrow.runtime.data import spiral
from graphgrow.ir import load_graph
from graphgrow.runtime.plots import plot_comparison
from graphgrow.sensli import grow, sensitivities
from graphgrow.runtime.train import TrainConfig, Trainer

REPORT = Path(__file__).parent / "reports" / "sensli"
INSERT_AT, EPOCHS = 450, 1850


def cpu_timed(run_fn):
    """``run_fn()`` and the process CPU seconds it took (one thread: less sensitive to other
    processes' load than wall time)."""
    start = time.process_time()
    result = run_fn()
    return result, time.process_time() - start


def run(spec, data, seed, lr, strategy, **extra):
    return grow(spec, data, strategy=strategy, insert_at=[INSERT_AT], max_insertions=1, epochs=EPOCHS, lr=lr,
                seed=seed, log_steps=False, **extra)


def from_scratch(graph, data, seed, lr):
    """The final architecture with a fresh initialisation, trained for the same epochs."""
    return grow(Network.build(graph, seed=seed), data, strategy="none", epochs=EPOCHS, lr=lr, seed=seed,
                log_steps=False)


def epoch_seconds(records, first, last):
    """Median wall seconds per epoch (training plus its evaluation) over epochs first..last."""
    times = {r["epoch"]: r["time"] for r in records if r["event"] == "eval"}
    return statistics.median(times[e] - times[e - 1] for e in range(max(first, 1), last + 1) if e - 1 in times)


def wall_time_breakdown(results, cpu):
    """Per seed: wall seconds of SensLI and of its final architecture from scratch (same
    epochs, run back to back), their ratio, and what bounds it: seconds per epoch of the small
    network (before the insertion), of the grown network (after it) and of the from-scratch
    network, and the insertion overhead (sensitivities, insertion) = the rest of SensLI's time."""
    rows = []
    for grown, scratch, grown_cpu, scratch_cpu in zip(results["SensLI"], results["final arch. from scratch"],
                                                     cpu["SensLI"], cpu["final arch. from scratch"]):
        small = epoch_seconds(grown.records, 1, INSERT_AT - 1)
        large = epoch_seconds(grown.records, INSERT_AT + 2, EPOCHS)
        seconds = grown.summary["final"]["seconds"]
        rows.append({"sensli_s": seconds, "scratch_s": scratch.summary["final"]["seconds"],
                     "ratio": seconds / scratch.summary["final"]["seconds"], "sensli_cpu_s": grown_cpu,
                     "scratch_cpu_s": scratch_cpu, "cpu_ratio": grown_cpu / scratch_cpu, "small_epoch_s": small,
                     "grown_epoch_s": large, "scratch_epoch_s": epoch_seconds(scratch.records, 1, EPOCHS),
                     "overhead_s": seconds - INSERT_AT * small - (EPOCHS - INSERT_AT) * large})
    keys = rows[0].keys()
    median = {k: statistics.median(r[k] for r in rows) for k in keys}
    print("wall time per seed (SensLI s / scratch s = ratio):",
          " ".join(f"{r['sensli_s']:.2f}/{r['scratch_s']:.2f}={r['ratio']:.3f}" for r in rows))
    print("CPU time per seed:", " ".join(f"{r['sensli_cpu_s']:.2f}/{r['scratch_cpu_s']:.2f}={r['cpu_ratio']:.3f}"
                                         for r in rows))
    print("medians:", json.dumps({k: round(v, 6) for k, v in median.items()}),
          f"| bound (450 r + 1400) / 1850 with r = small/grown epoch = "
          f"{(INSERT_AT * median['small_epoch_s'] / median['grown_epoch_s'] + EPOCHS - INSERT_AT) / EPOCHS:.3f}")
    return {"per_seed": rows, "median": median}


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
    """Per seed, one after the other: SensLI, baseline, SensLI's final architecture from
    scratch. Returns the results and the CPU seconds per variant."""
    results = {"SensLI": [], "baseline": [], "final arch. from scratch": []}
    cpu = {name: [] for name in results}
    for seed in range(seeds):
        runs = {"SensLI": lambda: run(spec, data, seed, lr, "sensli"),
                "baseline": lambda: run(spec, data, seed, lr, "none"),
                "final arch. from scratch": lambda: from_scratch(results["SensLI"][-1].network.graph, data, seed, lr)}
        for name, run_fn in runs.items():
            result, seconds = cpu_timed(run_fn)
            results[name].append(result)
            cpu[name].append(seconds)
    return results, cpu


def experiment_positions(spec, lr, seeds, data):
    """Per seed: SensLI (max merit), LIother (min merit), random position. Returns the results
    and the CPU seconds per variant."""
    results = {"SensLI (max)": [], "LIother (min)": [], "random": []}
    cpu = {name: [] for name in results}
    for seed in range(seeds):
        for name, strategy in zip(results, ("sensli", "min", "random")):
            result, seconds = cpu_timed(lambda: run(spec, data, seed, lr, strategy))
            results[name].append(result)
            cpu[name].append(seconds)
    return results, cpu


def paired_wins(results):
    """How often (over seeds, same initialisation) each variant ends with a lower training loss
    than each other variant; ties counted separately."""
    losses = {k: [r.summary["final"]["train"]["loss"] for r in v] for k, v in results.items()}
    names = list(losses)
    wins = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = list(zip(losses[a], losses[b]))
            wins[f"{a} vs {b}"] = {"a lower": sum(x < y for x, y in pairs), "b lower": sum(x > y for x, y in pairs),
                                   "tie": sum(x == y for x, y in pairs)}
    return wins


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
        load_before = os.getloadavg()
        results, cpu = experiment(spec, lr, args.seeds, data)
        load_after = os.getloadavg()
        print(table(title, results))
        print(f"\n({args.seeds} seeds, {time.perf_counter() - start:.0f} s for the experiment; load average "
              f"(1, 5, 15 min) before {load_before}, after {load_after})\n")
        for axis in ("iteration", "time"):
            plot_comparison({k: [r.records for r in v] for k, v in results.items()},
                            REPORT / f"spiral_{key}_{axis}.png", x=axis, title=title)
        positions = {k: [r.insertions[0]["positions"][0] if r.insertions else None for r in v]
                     for k, v in results.items()}
        flops = {k: statistics.median(r.summary["flops_per_sample"]["run"]["total"] for r in v)
                 for k, v in results.items()}
        sens_flops = statistics.median(r.summary["flops_per_sample"]["run"]["sensitivity"] for r in next(iter(results.values())))
        print("insertion positions:", json.dumps(positions))
        print("position counts:", json.dumps({k: {str(p): v.count(p) for p in sorted(set(v), key=str)}
                                              for k, v in positions.items()}))
        print("FLOPs per training sample over the run (median):", json.dumps(flops),
              f"of which sensitivity evaluation {sens_flops}")
        summary[key] = {k: {"train_loss": stats(r.summary["final"]["train"]["loss"] for r in v),
                            "test_error": stats(r.summary["final"]["test"]["error"] for r in v),
                            "positions": positions[k], "flops": flops[k]} for k, v in results.items()}
        summary[key]["load_average"] = {"before": load_before, "after": load_after}
        if key == "fnn44":
            wins = paired_wins(results)
            print("paired final training loss (lower wins):", json.dumps(wins))
            summary[key]["paired_wins"] = wins
        else:
            summary[key]["wall_time"] = wall_time_breakdown(results, cpu)
            sens_s, epoch_s = sensitivity_cost(spec, data)
            print(f"sensitivity evaluation {sens_s * 1e3:.2f} ms vs one training epoch {epoch_s * 1e3:.2f} ms: "
                  f"ratio {sens_s / epoch_s:.1f}\n")
            summary[key]["sensitivity_cost"] = {"sensitivity_s": sens_s, "epoch_s": epoch_s, "ratio": sens_s / epoch_s}
    results_path.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
