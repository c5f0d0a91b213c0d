"""Compiling a network whose forward is new (what a pass that inserts a layer needs): compile_graph
with every module handed in, as a pass's rebuild calls it, made the way it is now (the ops' nodes
recorded, the forward written from the recording by graphgrow.compiler.codegen, the module built
directly, no fx graph) against the same call with the recording replayed into an fx graph and the
module made by ``fx.GraphModule``'s constructor and fx's code generator (``_compiled_by_fx``, fx's
way), in the same process. To compare with an earlier commit, run the script there and here in
turn (its "now" column).

Networks: the MNIST MLP and the VGG-like CNN with an identity layer inserted after act2 (the
network a pass compiles), and the spec as it is for the ResNet and the ViT. Contenders alternate
within each round (order swapped every round), ``--number`` calls per timing, garbage collection
off inside a timing (as in timeit), torch threads 1; medians of CPU time (``time.process_time``)
per call and the median over the rounds of the ratio now / before.

    PYTHONPATH=. python benchmarks/compile_forward.py [--repeats 21] [--number 40]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

import passes
from graphgrow import Network, compile_graph, load_graph
from graphgrow.compiler import network as compiler

NETWORKS = {  # spec, position of an inserted identity layer (None: the spec as it is)
    "MLP (mnist_fnn) + identity layer": ("specs/mnist_fnn.yaml", "act2"),
    "CNN (cnn_vgg) + identity layer": ("specs/cnn_vgg.yaml", "act2"),
    "ResNet (resnet_small)": ("specs/resnet_small.yaml", None),
    "ViT (vit_small)": ("specs/vit_small.yaml", None),
}
CONTENDERS = {"now": compiler._compiled, "fx.GraphModule (before)": compiler._compiled_by_fx}


def timed(call, make, number: int) -> float:
    """CPU seconds per call of ``call`` with compile_graph making its module by ``make``."""
    compiler._compiled = make
    try:
        gc.disable()
        start = time.process_time()
        for _ in range(number):
            call()
        elapsed = time.process_time() - start
    finally:
        gc.enable()
        compiler._compiled = CONTENDERS["now"]
    return elapsed / number


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--number", type=int, default=40)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    calls = {}
    for label, (spec, after) in NETWORKS.items():
        network = Network.build(load_graph(spec), seed=0)
        if after is not None:
            network, _ = passes.insert_identity(network, after)
        modules = dict(network.module.named_children())
        calls[label] = lambda graph=network.graph, modules=modules: compile_graph(graph, {}, modules=modules)
    times = {(label, name): [] for label in calls for name in CONTENDERS}
    for label, call in calls.items():
        for make in CONTENDERS.values():
            timed(call, make, 2)  # warm-up
    for round_ in range(opts.repeats):
        for label, call in calls.items():
            order = list(CONTENDERS.items())
            for name, make in order if round_ % 2 else reversed(order):
                times[(label, name)].append(timed(call, make, opts.number))
    print(f"| network | now: CPU ms | fx.GraphModule (before): CPU ms | ratio now / before |\n"
          "|---|---|---|---|")
    for label in calls:
        now, before = times[(label, "now")], times[(label, "fx.GraphModule (before)")]
        print(f"| {label} | {1e3 * statistics.median(now):.3f} | {1e3 * statistics.median(before):.3f} "
              f"| {statistics.median(a / b for a, b in zip(now, before)):.2f} |")
    print(f"\nmedians of {opts.repeats} rounds of {opts.number} calls; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch {torch.__version__}")


if __name__ == "__main__":
    main()
