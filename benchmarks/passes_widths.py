"""Width passes on the MNIST MLP and the VGG-like CNN: widen by 2, insert a layer and prune 2 units,
each including the rebuild of the network, against compiling the same network; and the peer
torch-pruning (benchmark-only dependency, `pip install torch-pruning==1.6.1`, never imported by
the package) removing 2 units from the same layer of an equal nn.Sequential, dependency graph
included.

Cases are interleaved over ``--repeats`` rounds, garbage collection off inside a timing (as in
timeit), torch threads 1; medians in milliseconds of CPU time (``time.process_time``: on the shared
2-core machine, at load averages of 10-15, wall time mostly measures the other jobs) and ratios
to graphgrow's compile.

    PYTHONPATH=. python benchmarks/passes_widths.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

import torch
from torch import nn

import passes
from graphgrow import Network, load_graph

try:
    import torch_pruning
except ImportError:  # the peer is optional
    torch_pruning = None

NETWORKS = {  # spec, layer to widen/prune, position for an identity layer
    "MLP (mnist_fnn)": ("specs/mnist_fnn.yaml", "fc2", "act2"),
    "CNN (cnn_vgg)": ("specs/cnn_vgg.yaml", "conv2", "act2"),
}


def peer_module(network: Network) -> nn.Module:
    """The same network as a plain nn.Sequential (what torch-pruning works on)."""
    layers = []
    for node in network.graph.nodes:
        module = getattr(network.module, node.name, None)
        layers.append(copy.deepcopy(module) if module is not None else node.opdef.torch_module(node.args))
    return nn.Sequential(*layers)


def peer_prune(template: nn.Module, index: int, example: torch.Tensor):
    """torch-pruning: build the dependency graph, remove 2 output units of layer ``index``."""
    def run(model):
        graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example)
        group = graph.get_pruning_group(model[index], torch_pruning.prune_linear_out_channels
                                        if isinstance(model[index], nn.Linear)
                                        else torch_pruning.prune_conv_out_channels, idxs=[0, 1])
        group.prune()
    return run, template


def cases(network: Network, layer: str, after: str) -> dict:
    state = network.module.state_dict()
    found = {
        "compile (baseline)": lambda: Network.build(network.graph.copy(), state),
        "widen by 2 (sensli)": lambda: passes.widen(network, layer, by=2),
        "widen by 2 (split)": lambda: passes.widen(network, layer, by=2, method="split"),
        "insert identity layer": lambda: passes.insert_identity(network, after),
        "prune 2 units": lambda: passes.prune(network, layer, units=[0, 1], measure=False),
        "prune 2 units + measured change": lambda: passes.prune(network, layer, units=[0, 1]),
    }
    if torch_pruning is not None:
        index = network.graph.names().index(layer)
        example = torch.randn(1, *network.graph.input_shape)
        run, template = peer_prune(peer_module(network), index, example)
        found[PEER] = (run, template)
    return found


def timed(case) -> float:
    if isinstance(case, tuple):  # a peer that changes its model in place: a fresh copy per run
        run, template = case
        model = copy.deepcopy(template)
        gc.disable()
        start = time.process_time()
        run(model)
        elapsed = time.process_time() - start
    else:
        gc.disable()
        start = time.process_time()
        result = case()  # freed after the clock stops, as the peers' models are
        elapsed = time.process_time() - start
        del result
    gc.enable()
    return elapsed


PEER = "torch-pruning: prune 2 units"


def ratio(times: dict, label: str, name: str, base: str) -> str:
    """Median over the rounds of the case's time over ``base``'s in the same round."""
    if (label, base) not in times:
        return "-"
    return f"{statistics.median(a / b for a, b in zip(times[(label, name)], times[(label, base)])):.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    suites = {}
    for label, (spec, layer, after) in NETWORKS.items():
        network = Network.build(load_graph(spec), seed=0)
        suites[label] = cases(network, layer, after)
    times = {(label, name): [] for label, suite in suites.items() for name in suite}
    for case in [c for suite in suites.values() for c in suite.values()]:
        timed(case)  # warm-up
    for _ in range(opts.repeats):
        for label, suite in suites.items():
            for name, case in suite.items():
                times[(label, name)].append(timed(case))
    print(f"| network | case | CPU ms (median of {opts.repeats}) | ratio to compile | ratio to torch-pruning |\n"
          "|---|---|---|---|---|")
    for label, suite in suites.items():
        for name in suite:
            median = statistics.median(times[(label, name)])
            print(f"| {label} | {name} | {1e3 * median:.2f} | {ratio(times, label, name, 'compile (baseline)')} "
                  f"| {ratio(times, label, name, PEER)} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch-pruning "
          f"{getattr(torch_pruning, '__version__', 'not installed')}")


if __name__ == "__main__":
    main()
