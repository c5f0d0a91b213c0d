"""Width passes on the MNIST MLP and the VGG-like CNN: widen by 2, insert a layer and prune 2 units,
each including the rebuild of the network, against compiling the same network and against peers
doing the same operation on an equal nn.Sequential:

- widen by 2: a Net2Net port (Net2WiderNet as the public PyTorch ports do it, written here:
  replicate 2 random units of the layer, divide the consumer's columns of each replicated unit by
  its number of copies, set the new tensors on the modules);
- insert a layer: a Net2Net port (Net2DeeperNet: an identity linear/conv layer and the same
  activation put into the Sequential);
- prune 2 units: torch-pruning (benchmark-only dependency, `pip install --no-deps
  torch-pruning==1.6.1`, never imported by the package), dependency graph built in the timing.

The peers change their model in place; each is timed twice: on a fresh copy made outside the
timing ("in place"), and with that copy inside it ("+ copy"). A graphgrow pass returns a new
network and leaves its input valid (SensLI compares candidates built from one network; MG/Opt
trains the coarse and the fine network), so "+ copy" is the like-for-like figure; "in place" is
the peers' best case.

Cases are interleaved over ``--repeats`` rounds, garbage collection off inside a timing (as in
timeit), a case's result freed after the clock stops, torch threads 1; medians in milliseconds of
CPU time (``time.process_time``: on the shared 2-core machine wall time mostly measures the other
jobs) and medians of per-round ratios.

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
COMPILE = "compile (baseline)"
PEERS = {  # graphgrow case -> the peer doing the same operation
    "widen by 2 (sensli)": "Net2Net port: widen by 2",
    "widen by 2 (split)": "Net2Net port: widen by 2",
    "insert identity layer": "Net2Net port: insert identity layer",
    "prune 2 units": "torch-pruning: prune 2 units",
}


def peer_module(network: Network) -> nn.Module:
    """The same network as a plain nn.Sequential (what the peers work on)."""
    layers = []
    for node in network.graph.nodes:
        module = getattr(network.module, node.name, None)
        layers.append(copy.deepcopy(module) if module is not None else node.opdef.torch_module(node.args))
    return nn.Sequential(*layers)


def torch_pruning_prune(index: int, example: torch.Tensor):
    """torch-pruning: build the dependency graph, remove 2 output units of layer ``index``."""
    def run(model):
        graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example)
        group = graph.get_pruning_group(model[index], torch_pruning.prune_linear_out_channels
                                        if isinstance(model[index], nn.Linear)
                                        else torch_pruning.prune_conv_out_channels, idxs=[0, 1])
        group.prune()
    return run


def net2net_wider(first: int, second: int, by: int):
    """Net2WiderNet on ``model[first]`` (linear or conv2d) and its consumer ``model[second]``
    (linear or conv2d; after a flatten, a block of columns per channel), in place."""
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run(model):
        producer, consumer = model[first], model[second]
        n = producer.weight.shape[0]
        mapping = torch.cat([torch.arange(n), torch.randint(n, (by,), generator=generator)])
        share = 1.0 / torch.bincount(mapping, minlength=n).to(consumer.weight.dtype)[mapping]
        producer.weight = nn.Parameter(producer.weight[mapping])
        producer.bias = nn.Parameter(producer.bias[mapping])
        columns = consumer.weight.reshape(consumer.weight.shape[0], n, -1)  # (out, unit, entries per unit)
        widened = columns[:, mapping] * share[None, :, None]
        consumer.weight = nn.Parameter(widened.reshape(consumer.weight.shape[0], n + by, *consumer.weight.shape[2:])
                                       if isinstance(consumer, nn.Conv2d) else widened.flatten(1))
        if isinstance(producer, nn.Linear):
            producer.out_features += by
        else:
            producer.out_channels += by
        if isinstance(consumer, nn.Linear):
            consumer.in_features = consumer.weight.shape[1]
        else:
            consumer.in_channels += by
    return run


def net2net_deeper(after: int, shape: tuple[int, ...]):
    """Net2DeeperNet: an identity layer and the same activation right after ``model[after]`` (an
    idempotent activation on vectors or images of ``shape``), in place."""
    @torch.no_grad()
    def run(model):
        width = shape[0]
        if len(shape) == 1:
            layer = nn.Linear(width, width)
            nn.init.eye_(layer.weight)
        else:
            layer = nn.Conv2d(width, width, 3, padding=1)
            nn.init.dirac_(layer.weight)
        nn.init.zeros_(layer.bias)
        model.insert(after + 1, layer)
        model.insert(after + 2, copy.copy(model[after]))
    return run


def cases(network: Network, layer: str, after: str) -> dict:
    """graphgrow's cases (callables returning their result) and the peers' ((run, template):
    ``run`` changes a copy of ``template`` in place)."""
    state = network.module.state_dict()
    found = {
        COMPILE: lambda: Network.build(network.graph.copy(), state),
        "widen by 2 (sensli)": lambda: passes.widen(network, layer, by=2),
        "widen by 2 (split)": lambda: passes.widen(network, layer, by=2, method="split"),
        "insert identity layer": lambda: passes.insert_identity(network, after),
        "prune 2 units": lambda: passes.prune(network, layer, units=[0, 1], measure=False),
        "prune 2 units + measured change": lambda: passes.prune(network, layer, units=[0, 1]),
    }
    template = peer_module(network)
    names = network.graph.names()
    index = names.index(layer)
    consumer = next(k for k in range(index + 1, len(names)) if isinstance(template[k], (nn.Linear, nn.Conv2d)))
    peers = {PEERS["widen by 2 (sensli)"]: net2net_wider(index, consumer, 2),
             PEERS["insert identity layer"]: net2net_deeper(names.index(after), network.graph.node(after).out_shape)}
    if torch_pruning is not None:
        peers[PEERS["prune 2 units"]] = torch_pruning_prune(index, torch.randn(1, *network.graph.input_shape))
    for name, run in peers.items():
        found[f"{name}, in place"] = (run, template, False)
        found[f"{name}, + copy"] = (run, template, True)
    return found


def timed(case) -> float:
    if isinstance(case, tuple):  # a peer that changes its model in place: a fresh copy per run
        run, template, copy_timed = case
        gc.disable()
        start = time.process_time()
        model = copy.deepcopy(template)
        if not copy_timed:
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
    print(f"| network | case | CPU ms (median of {opts.repeats}) | ratio to compile "
          "| ratio to the peer in place | ratio to the peer + copy |\n|---|---|---|---|---|---|")
    for label, suite in suites.items():
        for name in suite:
            median = statistics.median(times[(label, name)])
            peer = PEERS.get(name)
            print(f"| {label} | {name} | {1e3 * median:.2f} | {ratio(times, label, name, COMPILE)} "
                  f"| {ratio(times, label, name, f'{peer}, in place') if peer else ''} "
                  f"| {ratio(times, label, name, f'{peer}, + copy') if peer else ''} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch-pruning "
          f"{getattr(torch_pruning, '__version__', 'not installed')}")


if __name__ == "__main__":
    main()
