"""Forward + backward of imported model families against the original modules.

For each family of tests/zoo.py (small definitions written for this project, the token
transformer included: its input is token ids): the module is
imported, both are put in train mode, and one training step (cross-entropy forward + backward)
is timed on each, single thread, the two interleaved in alternating order every round; the
median over rounds is reported as the ratio imported / original (wall clock and process CPU
time). An A/A row (the original against a copy of itself) shows the machine's noise floor. The import
time of the family with the most nodes is the median of three imports.

    PYTHONPATH=. python benchmarks/import_speed.py [--rounds 9] [--batch 8] [--families vit ...]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import FAMILIES, TOKENS, family_input  # noqa: E402

from graphgrow.compiler.importer import import_module  # noqa: E402


def step(module, x, target) -> None:
    """One training step's forward and backward; per-token outputs (a language model's
    (batch, T, vocabulary)) take a target per token."""
    module.zero_grad(set_to_none=True)
    F.cross_entropy(module(x).flatten(0, -2), target.flatten()).backward()


def timed(module, x, target, steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(module, x, target)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(first, second, x, target, rounds: int, steps: int) -> tuple[float, float]:
    """Median ratios second / first (wall, CPU), contenders interleaved in alternating order."""
    for module in (first, second):
        step(module, x, target)  # warm-up
    walls, cpus = [], []
    for r in range(rounds):
        order = (first, second) if r % 2 == 0 else (second, first)
        results = {id(m): timed(m, x, target, steps) for m in order}
        (w1, c1), (w2, c2) = results[id(first)], results[id(second)]
        walls.append(w2 / w1)
        cpus.append(c2 / c1)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--families", nargs="*", default=sorted(FAMILIES))
    options = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, batch {options.batch}, {options.rounds} rounds x "
          f"{options.steps} steps; ratio imported / original (median); load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'family':18} {'nodes':>5} {'wall':>6} {'cpu':>6} {'A/A wall':>8}")
    largest = None
    for name in options.families:
        make, shape = FAMILIES[name]
        torch.manual_seed(0)
        model = make()
        network = import_module(model, shape, tokens=TOKENS.get(name))
        x = family_input(name, options.batch, torch.float32, seed=0)
        with torch.no_grad():
            out_shape = model(x).shape  # (batch, classes) or (batch, T, vocabulary)
        target = torch.randint(0, out_shape[-1], out_shape[:-1], generator=torch.Generator().manual_seed(1))
        model.train(), network.module.train()
        wall, cpu = compare(model, network.module, x, target, options.rounds, options.steps)
        control, _ = compare(model, copy.deepcopy(model), x, target, options.rounds, options.steps)
        print(f"{name:18} {len(network.graph):5d} {wall:6.3f} {cpu:6.3f} {control:8.3f}")
        if largest is None or len(network.graph) > largest[1]:
            largest = (name, len(network.graph))
    name = largest[0]
    times = []
    for _ in range(3):
        model = FAMILIES[name][0]()
        start = time.perf_counter()
        import_module(model, FAMILIES[name][1], tokens=TOKENS.get(name))
        times.append(time.perf_counter() - start)
    print(f"import of {name} ({largest[1]} nodes): median {statistics.median(times):.3f} s; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
