"""SensLI on MNIST with the VGG-like CNN (thesis (2.11); cf. Figure 4.8 on CIFAR-10).

    PYTHONPATH=. python benchmarks/sensli_mnist.py [--seeds 4] [--epochs 8] [--insert-every 2 | --insert-at 4 5 6]
        [--sample 2000] [--sample-only] [--scratch-lr LR] [--tag _late]
        [--lr-grid 0.005,0.01,0.02,0.05] [--grid-epochs 3] [--data ../shared/data/mnist] [--batchnorm-only]

The 10,000-image MNIST test set split 8,000/2,000 (split seed 0); mini-batch SGD with momentum 0.9
(carried over insertions), batch 100. SensLI (lr 0.02) tries an insertion every ``insert-every``
epochs, up to 3, merit = squared operator norm (B.1c), threshold tau = 1, sensitivities over all
training data and, in a second run, over a seeded sample of ``sample`` images. Each SensLI run is
compared with its final architecture trained from scratch (fresh initialisation, same seed, same
epochs) at the best learning rate of a short grid on seed 0's final architecture. Runs of one
seed follow each other (SensLI full, scratch, SensLI sample[, scratch of the sample run's
architecture when it differs]), so machine load affects the contenders alike. Reports per seed
the wall-time ratio SensLI / scratch for the same epochs and the wall time and FLOPs per training
sample to reach the worse of the two final training losses. ``--cost-only`` measures the
sensitivity evaluation over all training data against one training epoch (target: at most 2.5x).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import passes
from graphgrow import Network, Node, get_op
from graphgrow.ir import load_graph
from graphgrow.runtime.plots import plot_comparison
from graphgrow.runtime.runlog import select as select_events
from graphgrow.sensli import grow, load_data, sensitivities
from graphgrow.runtime.train import TrainConfig, Trainer

REPORT = Path(__file__).parent / "reports" / "sensli"
SPEC = "specs/cnn_vgg.yaml"
SENS_BATCH = 256  # CPU: batches of a few hundred were faster than 1000 for this CNN
SENSLI_LR = 0.02


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


def train_settings(epochs: int, lr: float, seed: int) -> dict:
    """Training settings shared by every run: SGD, batch 100, momentum 0.9."""
    return dict(epochs=epochs, lr=lr, momentum=0.9, batch=100, seed=seed, log_steps=False)


def timed(label: str, run):
    """Run ``run()``; print its outcome; return it and its measurements: load averages before
    and after, and the process CPU seconds (one thread, so less sensitive to other processes'
    load than wall time)."""
    load_before = os.getloadavg()
    cpu_start = time.process_time()
    result = run()
    cpu = time.process_time() - cpu_start
    final = result.summary["final"]
    print(f"  {label}: train loss {final['train']['loss']:.4f}, test error {final['test']['error']:.4f}, "
          f"{final['seconds']:.1f} s, params {final['params']}, FLOPs/sample "
          f"{result.summary['flops_per_sample']['run']['total']:.4g} (sensitivity "
          f"{result.summary['flops_per_sample']['run']['sensitivity']:.4g}); CPU {cpu:.1f} s; "
          f"load average {load_before} -> {os.getloadavg()}", flush=True)
    for event in select_events(result.records, "insertion"):
        print(f"    epoch {event['epoch']}: inserted={event['inserted']} at {event['positions']} "
              f"ratios {[round(r, 3) for r in event['ratios']]} best ratio {event['best_ratio']:.3f} "
              f"(sensitivities {event['sensitivity_seconds']:.2f} s)", flush=True)
    return result, {"load": [load_before, os.getloadavg()], "cpu_s": cpu, "breakdown": breakdown(result.records)}


def breakdown(records) -> dict:
    """Where a run's wall time went: seconds per epoch (training plus the per-epoch test
    evaluation, insertions excluded), and per insertion the sensitivity evaluation and the rest
    of the insertion (loss before/after over the training data, building the grown network)."""
    times = {r["epoch"]: r["time"] for r in select_events(records, "eval")}
    insertions = []
    for sens, event in zip(select_events(records, "sensitivities"), select_events(records, "insertion")):
        insertions.append({"epoch": event["epoch"], "sensitivity_s": event["sensitivity_seconds"],
                           "rest_s": event["time"] - sens["time"]})
    epoch_s = [times[e] - times[e - 1] for e in sorted(times) if e >= 1]
    for item in insertions:  # the insertion after epoch k lies between the evaluations of k and k+1
        if item["epoch"] < len(epoch_s):
            epoch_s[item["epoch"]] -= item["sensitivity_s"] + item["rest_s"]
    return {"epoch_s": epoch_s, "insertions": insertions}


def run_sensli(data, seed: int, epochs: int, schedule: dict, sample):
    """SensLI with up to 3 insertions, tau = 1, op-norm merit; ``sample``: sensitivity sample size or None."""
    return grow(SPEC, data, strategy="sensli", **schedule, max_insertions=3, tau=1.0, norm="op",
                sens_batch=SENS_BATCH, sample=sample, **train_settings(epochs, SENSLI_LR, seed))


def run_scratch(graph, data, seed: int, epochs: int, lr: float):
    """The final architecture with a fresh initialisation (same seed), no growth."""
    return grow(Network.build(graph, seed=seed), data, strategy="none", **train_settings(epochs, lr, seed))


def with_batchnorm(graph):
    """``graph`` with a batch norm after every convolution: a from-scratch baseline that trains
    (the plain five-conv network stayed at chance level in 2 of 5 runs at lr 0.05)."""
    graph = graph.copy()
    for conv in [n.name for n in graph.nodes if n.op == "conv2d"]:
        norm = Node(graph.unique_name(f"{conv}_bn"), "batchnorm", get_op("batchnorm").check_args({}), [conv])
        graph.add(norm, after=conv)
        graph.redirect(conv, norm.name)
    graph.infer_shapes()
    return graph


def replayed_architecture(row: dict):
    """The final architecture of a recorded SensLI run: its insertions replayed on the base
    network (each a conv + relu after the recorded position, as ``grow`` inserts them)."""
    network = Network.build(load_graph(SPEC), seed=0)
    for _, positions in row["insertions"]:
        for position in positions:
            network, _ = passes.insert_identity(network, position.removeprefix("layer:"))
    if network.graph.num_params() != row["params"]["final"]:
        raise RuntimeError(f"replayed architecture has {network.graph.num_params()} parameters, "
                           f"the run had {row['params']['final']}")
    return network.graph


def batchnorm_baselines(data, epochs: int, lr: float) -> None:
    """Train the final architectures of the recorded runs (``sensli/mnist_results.json``) with
    batch norm after every convolution from scratch, and set them beside SensLI and the plain
    network from scratch (deterministic: same seed, same code, same numbers as the recorded run)."""
    recorded = json.loads((REPORT / "mnist_results.json").read_text())
    runs, rows = {}, []
    for variant, seed_rows in recorded["per_seed"].items():
        for row in seed_rows:
            key = (row["seed"], tuple(p for _, positions in row["insertions"] for p in positions))
            if key not in runs:
                graph = with_batchnorm(replayed_architecture(row))
                runs[key], load = timed(f"seed {key[0]}: batchnorm from scratch {list(key[1])}, lr {lr}",
                                        lambda: run_scratch(graph, data, key[0], epochs, lr))
            final = runs[key].summary["final"]
            rows.append({"variant": variant, "seed": row["seed"], "architecture": list(key[1]),
                         "sensli_loss": row["sensli_loss"], "sensli_test_error": row["sensli_test_error"],
                         "scratch_loss": row["scratch_loss"], "scratch_test_error": row["scratch_test_error"],
                         "batchnorm_loss": final["train"]["loss"], "batchnorm_test_error": final["test"]["error"],
                         "batchnorm_test_loss": final["test"]["loss"],
                         "batchnorm_epoch_losses": [e["train_loss"] for e in select_events(runs[key].records, "eval")]})
            print(f"  {variant}, seed {row['seed']}: train loss / test error SensLI {row['sensli_loss']:.4f} / "
                  f"{row['sensli_test_error']:.4f}, plain from scratch {row['scratch_loss']:.4f} / "
                  f"{row['scratch_test_error']:.4f}, batchnorm from scratch {rows[-1]['batchnorm_loss']:.4f} / "
                  f"{rows[-1]['batchnorm_test_error']:.4f}", flush=True)
            (REPORT / "mnist_results_batchnorm.json").write_text(json.dumps(
                {"epochs": epochs, "lr": lr, "rows": rows}, indent=1))


def insertion_history(result) -> list:
    """(epoch, positions) of each accepted insertion of a run."""
    return [(event["epoch"], tuple(event["positions"])) for event in select_events(result.records, "insertion")
            if event["inserted"]]


def choose_lr(graph, data, lrs, epochs: int) -> tuple[float, dict]:
    """Best learning rate (lowest final training loss, seed 0) for ``graph`` trained from scratch."""
    losses = {}
    for lr in lrs:
        result = run_scratch(graph, data, 0, epochs, lr)
        loss = result.summary["final"]["train"]["loss"]
        losses[lr] = loss if math.isfinite(loss) else math.inf
        print(f"  lr {lr}: train loss after {epochs} epochs {loss:.4f} ({result.summary['final']['seconds']:.0f} s)",
              flush=True)
    return min(losses, key=losses.get), losses


def reach(result, target: float, train_size: int):
    """Wall seconds, epoch and FLOPs per training sample (3x forward per step plus the
    sensitivity evaluations, as in the run ledger) when the epoch-mean training loss first
    reaches ``target``; None if never."""
    records = result.records
    origin = next(r["time"] for r in records if r["event"] == "start")
    flops, current = 0.0, next(r["flops"] for r in records if r["event"] == "start")
    for record in records:
        if record["event"] == "sensitivities":
            flops += record["flops_per_sample"] * record["samples"] / train_size
        elif record["event"] == "eval" and record["epoch"] > 0:
            flops += 3 * current
            if record["train_loss"] <= target:
                return {"seconds": record["time"] - origin, "epoch": record["epoch"], "flops_per_sample": flops}
        elif record["event"] == "architecture":
            current = record["flops"]
    return None


def last_epoch_loss(result) -> float:
    """Epoch-mean training loss of the last epoch (the quantity ``reach`` compares)."""
    return select_events(result.records, "eval")[-1]["train_loss"]


def compare(grown, scratch, loads, train_size: int) -> dict:
    """Same-epochs wall-time ratio and time/FLOPs to the worse of the two last-epoch
    (epoch-mean) training losses."""
    target = max(last_epoch_loss(grown), last_epoch_loss(scratch))
    row = {"time_ratio": grown.summary["final"]["seconds"] / scratch.summary["final"]["seconds"],
           "sensli_s": grown.summary["final"]["seconds"], "scratch_s": scratch.summary["final"]["seconds"],
           "sensli_loss": grown.summary["final"]["train"]["loss"],
           "scratch_loss": scratch.summary["final"]["train"]["loss"],
           "sensli_test_error": grown.summary["final"]["test"]["error"],
           "scratch_test_error": scratch.summary["final"]["test"]["error"],
           "sensli_flops": grown.summary["flops_per_sample"]["run"]["total"],
           "sensli_sensitivity_flops": grown.summary["flops_per_sample"]["run"]["sensitivity"],
           "scratch_flops": scratch.summary["flops_per_sample"]["run"]["total"],
           "sensitivity_s": sum(e["sensitivity_seconds"] for e in select_events(grown.records, "insertion")),
           "insertions": insertion_history(grown), "params": grown.summary["params"],
           "equal_loss": target, "reach_sensli": reach(grown, target, train_size),
           "reach_scratch": reach(scratch, target, train_size), "sensli_cpu_s": loads[0]["cpu_s"], "scratch_cpu_s": loads[1]["cpu_s"],
           "cpu_ratio": loads[0]["cpu_s"] / loads[1]["cpu_s"], "measurements": loads}
    print(f"  -> wall time SensLI / scratch {row['time_ratio']:.3f}, CPU time {row['cpu_ratio']:.3f} "
          f"(sensitivities {row['sensitivity_s']:.1f} s); "
          f"loss {target:.4f} reached: SensLI {row['reach_sensli']}, scratch {row['reach_scratch']}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--insert-every", type=int, default=2)
    parser.add_argument("--insert-at", type=int, nargs="+", help="try insertions at these epochs instead")
    parser.add_argument("--sample-only", action="store_true", help="skip the SensLI run on all training data")
    parser.add_argument("--tag", default="", help="appended to the names of the results file and plots")
    parser.add_argument("--sample", type=int, default=2000, help="sensitivity sample size of the second SensLI run")
    parser.add_argument("--lr-grid", default="0.005,0.01,0.02,0.05", help="from-scratch learning rates to try")
    parser.add_argument("--grid-epochs", type=int, default=3)
    parser.add_argument("--scratch-lr", type=float, help="skip the grid and train from scratch at this lr")
    parser.add_argument("--cost-only", action="store_true", help="only the sensitivity-vs-epoch measurement")
    parser.add_argument("--batchnorm-only", action="store_true",
                        help="only the final architectures of sensli/mnist_results.json with batch norm, from scratch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(f"mnist:{args.data}", seed=0)
    if args.cost_only:
        for norm in ("fro", "op"):
            sensitivity_cost(data, repeats=3, norm=norm)
        return
    if args.batchnorm_only:
        batchnorm_baselines(data, args.epochs, args.scratch_lr or 0.05)
        return
    train_size = len(data.x_train)
    variants = {f"sample {args.sample}": args.sample} if args.sample_only else {"full": None, f"sample {args.sample}": args.sample}
    schedule = {"insert_at": args.insert_at} if args.insert_at else {"insert_every": args.insert_every}
    rows = {name: [] for name in variants}
    records = {name: [] for name in ("SensLI", f"SensLI (sample {args.sample})", "final arch. from scratch")}
    scratch_lr, grid = args.scratch_lr, {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        scratch_by_architecture = {}
        # alternate which SensLI variant runs first, so that neither always follows the other
        for name in (list(variants) if seed % 2 == 0 else list(variants)[::-1]):
            sample = variants[name]
            grown, grown_load = timed(f"SensLI ({name})",
                                      lambda: run_sensli(data, seed, args.epochs, schedule, sample))
            records["SensLI" if sample is None else f"SensLI (sample {args.sample})"].append(grown.records)
            if scratch_lr is None:
                print("learning-rate grid for the final architecture from scratch (seed 0):", flush=True)
                scratch_lr, grid = choose_lr(grown.network.graph, data,
                                             [float(v) for v in args.lr_grid.split(",")], args.grid_epochs)
                print(f"  chosen lr {scratch_lr}", flush=True)
            architecture = tuple(position for _, positions in insertion_history(grown) for position in positions)
            if architecture not in scratch_by_architecture:
                scratch_by_architecture[architecture] = timed(
                    f"scratch {list(architecture)}, lr {scratch_lr}",
                    lambda: run_scratch(grown.network.graph, data, seed, args.epochs, scratch_lr))
            scratch, scratch_load = scratch_by_architecture[architecture]
            if name == next(iter(variants)):  # one from-scratch curve per seed in the plots
                records["final arch. from scratch"].append(scratch.records)
            rows[name].append(compare(grown, scratch, [grown_load, scratch_load], train_size) | {"seed": seed})
        write_results(rows, grid, scratch_lr, args)
        plot_runs(records, args.seeds, args.tag)
    print(f"(all runs: {time.perf_counter() - started:.0f} s)")
    for name, seed_rows in rows.items():
        ratios = [r["time_ratio"] for r in seed_rows]
        cpu = [r["cpu_ratio"] for r in seed_rows]
        print(f"SensLI ({name}): wall time SensLI / scratch for {args.epochs} epochs per seed "
              f"{[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f} (target <= 0.75); "
              f"CPU time {[round(r, 3) for r in cpu]}, median {statistics.median(cpu):.3f}")


def plot_runs(records, seeds: int, tag: str) -> None:
    title = f"MNIST 8k/2k, VGG-like CNN, seeds 0-{seeds - 1}"
    records = {name: runs for name, runs in records.items() if runs}
    plot_comparison(records, REPORT / f"mnist_cnn{tag}_time.png", x="time", title=title)
    plot_comparison(records, REPORT / f"mnist_cnn{tag}_iteration.png", x="iteration", title=title)


def write_results(rows, grid, scratch_lr, args) -> None:
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / f"mnist_results{args.tag}.json").write_text(json.dumps(
        {"settings": vars(args), "sensli_lr": SENSLI_LR, "scratch_lr": scratch_lr,
         "lr_grid_final_loss": {str(k): v for k, v in grid.items()}, "per_seed": rows,
         "median_time_ratio": {k: statistics.median(r["time_ratio"] for r in v) for k, v in rows.items() if v},
         "median_cpu_ratio": {k: statistics.median(r["cpu_ratio"] for r in v) for k, v in rows.items() if v}},
        indent=1, default=str))


if __name__ == "__main__":
    main()
