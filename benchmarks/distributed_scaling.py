"""Data-parallel growth, 1 vs N processes on this machine: samples/s, speedup, and the cost of
the growth event (sensitivity pass with its all-reduce, the digest check, the pass, the DDP
re-wrap, the loss after) as a share of an epoch.

    PYTHONPATH=. python benchmarks/distributed_scaling.py [--specs mnist_fnn cnn_vgg]
        [--epochs 3] [--repeats 2] [--nproc 2] [--lr 0.01] [--data ../shared/data/mnist]

Each run is ``graphgrow grow SPEC --data mnist:DIR --epochs E --insert-at 1 --batch 256`` (global
batch 256, SGD lr 0.01, momentum 0.9, one SensLI insertion after epoch 1) with one thread per
process (OMP_NUM_THREADS=1), on the CPU with gloo, on the MNIST test set (10,000 images) split
8,000 / 2,000 as the CLI does. Runs of 1 and N processes
alternate, ``--repeats`` times; medians are reported. Times come from each run's log.jsonl (rank
0): an epoch is the time between consecutive ``eval`` records of epochs without growth (training
plus the held-out evaluation); the growth event is the time from the insertion epoch's ``eval``
record to its ``architecture`` record. Adds the specs' results to
benchmarks/reports/distributed_scaling.json (results of other specs there are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "reports" / "distributed_scaling.json"


def one_run(spec: str, nproc: int, args, out: Path) -> dict:
    command = [sys.executable, "-m", "graphgrow", "grow", str(ROOT / "specs" / f"{spec}.yaml"),
               "--data", f"mnist:{args.data}", "--epochs", str(args.epochs), "--insert-at", "1", "--batch", "256",
               "--lr", str(args.lr), "--momentum", "0.9", "--device", "cpu", "--quiet", "--out", str(out),
               "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    architecture = next(r for r in records if r["event"] == "architecture")
    grown_at = architecture["epoch"]
    epoch_times = [b["time"] - a["time"] for a, b in zip(evals, evals[1:]) if a["epoch"] != grown_at]
    growth = architecture["time"] - next(r["time"] for r in evals if r["epoch"] == grown_at)
    summary = json.loads((out / "summary.json").read_text())
    train_size = next(r for r in records if r["event"] == "start")["train_size"]
    epoch = statistics.median(epoch_times)
    return {"epoch_seconds": epoch, "samples_per_second": train_size / epoch, "growth_seconds": growth,
            "growth_share_of_epoch": growth / epoch,
            "final_train_loss": summary["final"]["train"]["loss"],
            "positions": summary["insertions"][0]["positions"] if summary["insertions"] else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=["mnist_fnn", "cnn_vgg"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.specs:
            runs = {1: [], args.nproc: []}
            for repeat in range(args.repeats):
                for nproc in runs:  # interleaved, so that machine load hits both alike
                    runs[nproc].append(one_run(spec, nproc, args, Path(scratch) / f"{spec}-{nproc}-{repeat}"))
            median = {n: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "positions"}
                      for n, rs in runs.items()}
            results[spec] = {"runs": runs, "median": median,
                             "speedup": median[args.nproc]["samples_per_second"] / median[1]["samples_per_second"]}
            print(f"{spec}: {median[1]['samples_per_second']:.0f} samples/s with 1 process, "
                  f"{median[args.nproc]['samples_per_second']:.0f} with {args.nproc} "
                  f"(speedup {results[spec]['speedup']:.2f}); growth event "
                  f"{median[1]['growth_share_of_epoch']:.2f} / {median[args.nproc]['growth_share_of_epoch']:.2f} "
                  f"of an epoch; final train loss {median[1]['final_train_loss']:.4f} / "
                  f"{median[args.nproc]['final_train_loss']:.4f}; inserted at "
                  f"{runs[1][0]['positions']} / {runs[args.nproc][0]['positions']}", flush=True)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    for spec, result in results.items():
        report[spec] = {"args": vars(args), **result}
    REPORT.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
