"""How close can inserting a layer into a compiled network come to Net2DeeperNet in place?

Issue 17 asks for insert-layer at or below the fastest peer; the fastest is the Net2DeeperNet
port changing its nn.Sequential in place (no copy, and no new forward: a Sequential's forward is
a loop over its modules). This benchmark measures a prototype of the least a graphgrow insertion
must do, the **in-place floor**: plan the identity layer, wire it into the graph in place, infer
the new shapes, make its module from an old one (the rebuild's template), and write and compile
the forward over the old modules. No copies, no record, the input network consumed (it is not a
pass: a pass leaves its input usable). Beside it, interleaved: the insert-identity pass, the
port in place and the port + copy (the cases of ``passes_widths.py``, same timing rules: CPU
time, garbage collection off inside a timing, one thread, a fresh copy made outside the timing
for what changes its model in place).

    PYTHONPATH=. python benchmarks/insert_floor.py [--repeats 25]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import passes
from graphgrow import Network, load_graph
from graphgrow.compiler.network import compile_graph
from passes.insert import apply_plan, plan_identity
from passes.record import _template
from passes_widths import NETWORKS, net2net_deeper, peer_module, timed


def insert_in_place(after: str):
    """The in-place floor of an identity insertion after ``after``; consumes its network."""
    def run(network: Network):
        graph = network.graph
        plan = plan_identity(graph, after)
        apply_plan(graph, plan)
        graph.infer_shapes([node.name for node in plan.nodes])
        head = plan.nodes[0]
        modules = dict(network.module._modules)
        modules[head.name] = _template(network, head, {name.partition(".")[2]: value
                                                       for name, value in plan.values.items()})
        return compile_graph(graph, {}, modules=modules)
    return run


def cases(network: Network, after: str) -> dict:
    template = peer_module(network)
    port = net2net_deeper(network.graph.names().index(after), network.graph.node(after).out_shape)
    return {
        "Net2DeeperNet port, in place (baseline)": (port, template, False),
        "Net2DeeperNet port, + copy": (port, template, True),
        "graphgrow insert_identity (pass)": lambda: passes.insert_identity(network, after),
        "graphgrow in-place floor (prototype)": (insert_in_place(after), network, False),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    suites = {label: cases(Network.build(load_graph(spec), seed=0), after)
              for label, (spec, _, after) in NETWORKS.items()}
    times = {(label, name): [] for label, suite in suites.items() for name in suite}
    for suite in suites.values():
        for case in suite.values():
            timed(case)  # warm-up
    for _ in range(opts.repeats):
        for label, suite in suites.items():
            for name, case in suite.items():
                times[(label, name)].append(timed(case))
    print(f"| network | case | CPU ms (median of {opts.repeats}) | ratio to the port in place |\n|---|---|---|---|")
    for label, suite in suites.items():
        base = times[(label, next(iter(suite)))]
        for name in suite:
            ratio = statistics.median(a / b for a, b in zip(times[(label, name)], base))
            print(f"| {label} | {name} | {1e3 * statistics.median(times[(label, name)]):.2f} | {ratio:.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
