"""What checkpoints cost a data-parallel run: 2 ranks (gloo, one thread each), mnist_fnn on the
MNIST test set split 8,000 / 2,000 as the CLI does, global batch 256, SGD with momentum.

* The stop-signal agreement: every step, each rank's vote (did SIGINT/SIGTERM reach it?) rides
  along in the step's loss/error sum over the ranks (what graphgrow runs). Measured against
  steps without a vote, and against a separate 2-element MAX all-reduce after every step (the
  obvious alternative), as ratios of the time of ``--steps`` steps, interleaved, ``--rounds``
  rounds, medians.
* A checkpoint (every rank's RNG state gathered, rank 0 writes while the others wait for its
  outcome) as a share of an epoch (ceil(8000 / 256) = 32 steps with the vote).

    PYTHONPATH=. python benchmarks/distributed_checkpoint.py [--rounds 15] [--steps 20]
        [--data ../shared/data/mnist]

Writes benchmarks/reports/distributed_checkpoint.json (with the load average beside the figures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "reports" / "distributed_checkpoint.json"
BATCH, RANKS = 256, 2


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist
    from graphgrow.compiler.io import load_network
    from graphgrow.runtime.checkpoint import Checkpointer, placement
    from graphgrow.runtime.interrupts import InterruptFlag
    from graphgrow.runtime.data import load_data
    from graphgrow.runtime.distributed import DataParallelTrainer, joined
    from graphgrow.runtime.splits import batches_of, epoch_order
    from graphgrow.runtime.train import TrainConfig

    torch.set_num_threads(1)
    with joined(torch.device("cpu"), timeout=120) as parallel:
        network = load_network(str(ROOT / "specs" / "mnist_fnn.yaml"), 0)
        trainer = DataParallelTrainer(network, load_data(f"mnist:{args.data}", 0),
                                      TrainConfig(batch=BATCH, lr=0.01, momentum=0.9, log_steps=False),
                                      data_parallel=parallel)
        batches = batches_of(epoch_order(len(trainer.train_split), BATCH, torch.Generator().manual_seed(0)), BATCH)
        vote = InterruptFlag()
        vote.shared = True

        def steps(mode: str) -> float:
            parallel.interrupt = None if mode == "no vote" else vote
            dist.barrier()
            began = time.perf_counter()
            for i in range(args.steps):
                trainer.train_batch(batches[i % len(batches)])
                if mode == "separate all-reduce":
                    dist.all_reduce(torch.zeros(2, dtype=torch.float64), op=dist.ReduceOp.MAX)
            return time.perf_counter() - began

        modes = ("no vote", "vote in the step's sum", "separate all-reduce")
        steps("no vote")  # warm-up
        times = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            # interleaved, so that machine load hits all alike, and rotated, so that no mode
            # always runs first after the warm-up or last before the next round
            for mode in modes[round_ % 3:] + modes[:round_ % 3]:
                times[mode].append(steps(mode))
        with tempfile.TemporaryDirectory() as scratch:
            checkpointer = Checkpointer(scratch if parallel.rank == 0 else None, "grow",
                                        {"options": {}, "placement": placement(network)}, data_parallel=parallel)
            writes = []
            for _ in range(args.rounds):
                dist.barrier()
                began = time.perf_counter()
                checkpointer.save(trainer)
                writes.append(time.perf_counter() - began)
        if parallel.rank == 0:
            step = statistics.median(times["vote in the step's sum"]) / args.steps
            epoch = math.ceil(len(trainer.train_split) / BATCH) * step
            report = {
                "args": vars(args), "load_average": os.getloadavg(), "step_seconds_with_vote": step,
                "vote_over_no_vote": statistics.median(a / b for a, b in zip(times["vote in the step's sum"], times["no vote"])),
                "separate_allreduce_over_no_vote": statistics.median(
                    a / b for a, b in zip(times["separate all-reduce"], times["no vote"])),
                "checkpoint_seconds": statistics.median(writes), "checkpoint_share_of_epoch": statistics.median(writes) / epoch}
            REPORT.parent.mkdir(parents=True, exist_ok=True)
            REPORT.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    from graphgrow.runtime.distributed import free_port
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(RANKS),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env={**env, "RANK": str(rank)})
               for rank in range(RANKS)]
    sys.exit(max(w.wait() for w in workers))


if __name__ == "__main__":
    main()
