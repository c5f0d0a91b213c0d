"""Pass application plus recompile on chains of linear + relu layers (target: < 0.2 s at 1000).

For each chain size: ``widen`` of the middle linear layer (sensli, 2 units) and
``insert_identity`` after the middle relu, each including the recompile of the new network,
against the baseline of compiling the same network from its state dict (``Network.build``).
Sizes and cases are interleaved over ``--repeats`` runs, garbage collection off inside a timing
(as in timeit); medians and ratios to the baseline.

    PYTHONPATH=. python benchmarks/passes_chain.py [--sizes 100 1000] [--repeats 7]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import passes
from graphgrow import Network, graph_from_text
from chains import chain_spec


def cases(network: Network, layers: int) -> dict:
    middle = layers // 2 - (layers // 2) % 2  # an even index: a linear layer, followed by a relu
    state = network.module.state_dict()
    return {
        "compile (baseline)": lambda: Network.build(network.graph.copy(), state),
        "widen": lambda: passes.widen(network, f"fc{middle}", by=2),
        "insert_identity": lambda: passes.insert_identity(network, f"act{middle + 1}"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    networks = {n: Network.build(graph_from_text(chain_spec(n))) for n in opts.sizes}
    runs = {n: cases(networks[n], n) for n in opts.sizes}
    for n in opts.sizes:  # warm-up, and a check that each pass keeps the function
        x = torch.randn(4, 16)
        for name, run in runs[n].items():
            result = run()
            new = result[0] if isinstance(result, tuple) else result
            assert torch.allclose(new(x), networks[n](x), atol=1e-5), name
    seconds = {(n, name): [] for n in opts.sizes for name in runs[n]}
    for _ in range(opts.repeats):
        for n in opts.sizes:
            for name, run in runs[n].items():
                gc.collect()  # as timeit does: no collection of earlier results inside a timing
                gc.disable()
                start = time.perf_counter()
                run()
                seconds[n, name].append(time.perf_counter() - start)
                gc.enable()
    print(f"torch {torch.__version__}, threads 1, {opts.repeats} repeats (interleaved), medians\n")
    print("| layers | case | seconds | ratio to compile |")
    print("|---|---|---|---|")
    for n in opts.sizes:
        base = statistics.median(seconds[n, "compile (baseline)"])
        for name in runs[n]:
            median = statistics.median(seconds[n, name])
            print(f"| {n} | {name} | {median:.4f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
