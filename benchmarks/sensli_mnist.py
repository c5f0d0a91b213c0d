"""SensLI on MNIST with the VGG-like CNN (thesis (2.11); cf. Figure 4.8 on CIFAR-10).

    PYTHONPATH=. python benchmarks/sensli_mnist.py [--epochs 8] [--insert-every 2] [--data ../shared/data/mnist]

The 10,000-image MNIST test set split 8,000/2,000; mini-batch SGD with momentum 0.9 (carried
over insertions), batch 100, lr 0.02. SensLI tries an insertion every ``insert-every`` epochs,
up to 3, merit = squared operator norm (B.1c), threshold tau = 1. Compared with the final
architecture trained from scratch for the same epochs: wall time and FLOPs per training sample
to reach the same training loss. Also measures the sensitivity evaluation over all training data
against one training epoch of the base network (target: at most 2.5x).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graphgrow import Network
from graphgrow.ir import load_graph
from graphgrow.plots import plot_comparison
from graphgrow.runlog import select as select_events
from graphgrow.sensli import grow, load_data, sensitivities
from graphgrow.train import TrainConfig, Trainer

REPORT = Path(__file__).parent / "reports" / "sensli"
SPEC = "specs/cnn_vgg.yaml"
SENS_BATCH = 256  # CPU: batches of a few hundred were faster than 1000 for this CNN


def sensitivity_cost(data, repeats: int, norm: str = "op"):
    """Median seconds of the sensitivity evaluation over all 8,000 training images (base
    network, batch SENS_BATCH) and of one training epoch (batch 100), measured interleaved."""
    network = Network.build(load_graph(SPEC), seed=0)
    trainer = Trainer(network, data, TrainConfig(epochs=1, lr=0.02, momentum=0.9, batch=100, log_steps=False))
    sens_s, epoch_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        sensitivities(network, data, norm=norm, batch=SENS_BATCH)
        sens_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for index in torch.randperm(len(data.x_train)).split(100):
            trainer.step(data.x_train[index], data.y_train[index])
        epoch_s.append(time.perf_counter() - t)
    sens, epoch = statistics.median(sens_s), statistics.median(epoch_s)
    print(f"sensitivity evaluation ({norm}) {sens:.2f} s vs one training epoch {epoch:.2f} s: "
          f"ratio {sens / epoch:.2f} (target <= 2.5)")
    return sens, epoch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--insert-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-only", action="store_true", help="only the sensitivity-vs-epoch measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(f"mnist:{args.data}", seed=0)
    if args.cost_only:
        for norm in ("fro", "op"):
            sensitivity_cost(data, repeats=3, norm=norm)
        return
    common = dict(epochs=args.epochs, lr=0.02, momentum=0.9, batch=100, seed=args.seed, log_steps=False)
    start = time.perf_counter()
    grown = grow(SPEC, data, strategy="sensli", insert_every=args.insert_every, max_insertions=3, tau=1.0,
                 norm="op", sens_batch=SENS_BATCH, **common)
    scratch = grow(Network.build(grown.network.graph, seed=args.seed), data, strategy="none", **common)
    print(f"(both runs: {time.perf_counter() - start:.0f} s)")
    for name, result in (("SensLI", grown), ("final arch. from scratch", scratch)):
        final = result.summary["final"]
        print(f"{name}: train loss {final['train']['loss']:.4f}, test error {final['test']['error']:.4f}, "
              f"{final['seconds']:.1f} s, params {final['params']}, "
              f"FLOPs/sample {result.summary['flops_per_sample']['run']['total']:.4g} "
              f"(sensitivity {result.summary['flops_per_sample']['run']['sensitivity']:.4g})")
    for event in select_events(grown.records, "insertion"):
        print(f"  epoch {event['epoch']}: inserted={event['inserted']} at {event['positions']} "
              f"ratios {[round(r, 3) for r in event['ratios']]} best ratio {event['best_ratio']:.3f} "
              f"(sensitivities {event['sensitivity_seconds']:.2f} s)")
    # time and FLOPs to equal loss: the first epoch each run's training loss reaches the worse final loss
    target = max(grown.summary["final"]["train"]["loss"], scratch.summary["final"]["train"]["loss"])
    reach = {}
    for name, result in (("SensLI", grown), ("scratch", scratch)):
        records = result.records
        origin = next(r["time"] for r in records if r["event"] == "start")
        flops, current, seen = 0.0, next(r["flops"] for r in records if r["event"] == "start"), None
        for record in records:
            if record["event"] == "sensitivities":
                flops += 3 * record["extended_flops"] * record["samples"] / len(data.x_train)
            elif record["event"] == "eval" and record["epoch"] > 0:
                flops += 3 * current
                if seen is None and record["train_loss"] <= target:
                    seen = (record["time"] - origin, record["epoch"], flops)
            elif record["event"] == "architecture":
                current = record["flops"]
        reach[name] = seen
    print(f"epoch-mean training loss {target:.4f} first reached:",
          json.dumps({k: {"seconds": v[0], "epoch": v[1], "flops_per_sample": v[2]} if v else None
                      for k, v in reach.items()}))
    ratio = grown.summary["final"]["seconds"] / scratch.summary["final"]["seconds"]
    print(f"wall time SensLI / scratch for {args.epochs} epochs: {ratio:.2f} (target <= 0.75)")
    sens, epoch = sensitivity_cost(data, repeats=3)
    REPORT.mkdir(parents=True, exist_ok=True)
    runs = {"SensLI": [grown.records], "final arch. from scratch": [scratch.records]}
    plot_comparison(runs, REPORT / "mnist_cnn_time.png", x="time", title="MNIST 8k/2k, VGG-like CNN")
    plot_comparison(runs, REPORT / "mnist_cnn_iteration.png", x="iteration", title="MNIST 8k/2k, VGG-like CNN")
    (REPORT / "mnist_results.json").write_text(json.dumps(
        {"sensli": grown.summary, "scratch": scratch.summary, "reach": reach, "time_ratio": ratio,
         "sensitivity_s": sens, "epoch_s": epoch}, indent=1, default=str))


if __name__ == "__main__":
    main()
