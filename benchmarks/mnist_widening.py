"""Grow MNIST networks from half width: new neurons random (zero outgoing, 4.19), data-driven
(GradMax directions, zero outgoing), Net2Net split, against the final architecture trained from
scratch; then grow-then-prune (magnitude) with parameter count and accuracy before and after.

MLP: mnist_fnn at half width (784-50-50-50-10) grown to 784-100-100-100-10. CNN: cnn_vgg at half
width (conv 8/16, fc 64/32) grown to the full cnn_vgg (16/32, 128/64); its from-scratch baseline
is cnn_vgg with batch norm after each convolution (a network that trains from the start), beside
the plain one. Every layer is widened at epoch ``--grow-at`` by one ``passes.widen`` per layer
(the optimizer's state carried by ``passes.transfer_optimizer``). SGD with momentum 0.9, batch 64,
the 10k MNIST test set split 8,000/2,000 (``../shared/data/mnist``). Reported per run: test error
and loss, training FLOPs per training sample (3 x forward FLOPs per sample and epoch, plus the
cross-term pass of GradMax), wall time and CPU time (the process's, one thread: on a shared
machine the comparable one). Single thread.

    PYTHONPATH=. python benchmarks/mnist_widening.py [--nets mlp cnn] [--seeds 3] [--epochs 6] [--grow-at 2]
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
from torch.nn import functional as F

import passes
from graphgrow import Network, graph_from_text, load_graph
from graphgrow.runtime.data import load_data
from graphgrow.sensli import gradmax_rows

REPORT = Path(__file__).resolve().parent / "reports" / "passes"


def half_width(spec: str, batchnorm: bool = False) -> tuple:
    """The full network's graph, the half-width graph and the layers to grow (all hidden ones)."""
    full = load_graph(spec)
    if batchnorm:  # batch norm after every convolution: a from-scratch baseline that trains
        text = Path(spec).read_text()
        for conv in ("conv1", "conv2"):
            line = next(l for l in text.splitlines() if f"name: {conv}," in l)
            text = text.replace(line, line + f"\n  - {{name: {conv}_bn, op: batchnorm}}")
        full = graph_from_text(text)
    half = full.copy()
    layers = [n.name for n in full.nodes if n.opdef.width_arg is not None and n.name not in full.outputs]
    for name in layers:
        node = half.node(name)
        node.args = {**node.args, node.opdef.width_arg: node.args[node.opdef.width_arg] // 2}
    half.infer_shapes()
    return full, half, layers


def evaluate(network: Network, x, y) -> tuple[float, float]:
    network.module.eval()
    with torch.no_grad():
        out = network(x)
    network.module.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) != y).float().mean())


def train(network, optimizer, x, y, epochs, generator, ledger):
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(network(x[rows]), y[rows]).backward()
            optimizer.step()
        ledger["flops"] += 3 * network.graph.flops()


def grow(network, optimizer, method, layers, targets, data, seed, ledger):
    """Widen every layer in ``layers`` to its target width (last first, see sensli.widening)."""
    for k, layer in reversed(list(enumerate(layers))):
        by = targets[layer] - network.graph.node(layer).args[network.graph.node(layer).opdef.width_arg]
        options = {"method": "split", "alpha": 0.7, "seed": seed + k} if method == "split" else {"seed": seed + k}
        if method == "random":
            fan_in = math.prod(network.graph.node(layer).param_shapes()["weight"][1:])
            options["scale"] = 1 / math.sqrt(fan_in)
        if method == "gradmax":  # A has rank <= the consumer's outputs: random rows for the rest
            rows, _ = gradmax_rows(network, layer, data, by, batch=1000)
            fan_in = rows.shape[1:]
            extra = torch.randn(by - len(rows), *fan_in, generator=torch.Generator().manual_seed(seed + k),
                                dtype=torch.float64) / math.sqrt(math.prod(fan_in))
            options["incoming"] = torch.cat([rows, extra])
            ledger["gradmax_rows"] = ledger.get("gradmax_rows", 0) + len(rows)
            ledger["flops"] += 3 * network.graph.flops() * 2000 / len(data.x_train)  # the cross-term pass
        wider, record = passes.widen(network, layer, by, **options)
        passes.transfer_optimizer(optimizer, network.module, wider.module, record)
        network = wider
    return network


def run(name, graph, data, x, y, xt, yt, seed, epochs, grow_at=None, method=None, layers=(), targets=None, lr=0.05):
    torch.manual_seed(seed)
    network = Network.build(graph.copy(), seed=seed)
    optimizer = torch.optim.SGD(network.module.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    ledger = {"flops": 0.0}
    start, cpu_start = time.perf_counter(), time.process_time()
    if grow_at is not None:
        train(network, optimizer, x, y, grow_at, generator, ledger)
        sample = load_subset(data, 2000)
        network = grow(network, optimizer, method, layers, targets, sample, seed, ledger)
        train(network, optimizer, x, y, epochs - grow_at, generator, ledger)
    else:
        train(network, optimizer, x, y, epochs, generator, ledger)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    loss, error = evaluate(network, xt, yt)
    result = {"name": name, "seed": seed, "test_loss": loss, "test_error": error, "seconds": seconds,
              "cpu_seconds": cpu_seconds,
              "train_flops_per_sample": ledger["flops"], "params": network.graph.num_params()}
    print(json.dumps(result), flush=True)
    return result, network, optimizer


class load_subset:  # the first rows of the training split, as a data set for gradmax_rows
    def __init__(self, data, rows):
        self.x_train, self.y_train = data.x_train[:rows], data.y_train[:rows]


def prune_demo(network, optimizer, layers, x, y, xt, yt, seed):
    """Grow-then-prune: remove half of each grown layer's units by magnitude, then train one epoch."""
    params_before = network.graph.num_params()
    loss_before, error_before = evaluate(network, xt, yt)
    changes = []
    for layer in layers:
        n = network.graph.node(layer).args[network.graph.node(layer).opdef.width_arg]
        pruned, record = passes.prune(network, layer, count=n // 2)
        passes.transfer_optimizer(optimizer, network.module, pruned.module, record)
        network = pruned
        changes.append(record.change)
    loss_pruned, error_pruned = evaluate(network, xt, yt)
    train(network, optimizer, x, y, 1, torch.Generator().manual_seed(seed), {"flops": 0.0})
    loss_tuned, error_tuned = evaluate(network, xt, yt)
    result = {"params_before": params_before, "params_after": network.graph.num_params(),
              "test_error_before": error_before, "test_error_pruned": error_pruned,
              "test_error_after_1_epoch": error_tuned, "test_loss_before": loss_before,
              "test_loss_pruned": loss_pruned, "test_loss_after_1_epoch": loss_tuned,
              "max_output_change_per_prune": changes}
    print("prune:", json.dumps(result), flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grow-at", type=int, default=2)
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--tag", default="")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data(f"mnist:{opts.data}", seed=0)
    results = {}
    for net in opts.nets:
        spec = "specs/mnist_fnn.yaml" if net == "mlp" else "specs/cnn_vgg.yaml"
        full, half, layers = half_width(spec)
        shape = full.input_shape
        x, y = data.x_train.reshape(-1, *shape), data.y_train
        xt, yt = data.x_test.reshape(-1, *shape), data.y_test
        data_net = type("Data", (), {"x_train": x, "y_train": y})()
        targets = {layer: full.node(layer).args[full.node(layer).opdef.width_arg] for layer in layers}
        contenders = {m: dict(graph=half, grow_at=opts.grow_at, method=m, layers=layers, targets=targets)
                      for m in ("random", "gradmax", "split")}
        contenders["scratch (final architecture)"] = dict(graph=full)
        if net == "cnn":
            contenders["scratch with batchnorm"] = dict(graph=half_width(spec, batchnorm=True)[0])
        rows, demo = [], None
        for seed in range(opts.seeds):  # contenders interleaved within each seed
            for name, setting in contenders.items():
                result, network, optimizer = run(name, setting["graph"], data_net, x, y, xt, yt, seed, opts.epochs,
                                                 **{k: v for k, v in setting.items() if k != "graph"})
                rows.append(result)
                if seed == 0 and name == "gradmax":
                    demo = prune_demo(network, optimizer, layers, x, y, xt, yt, seed)
        summary = {}
        for name in contenders:
            mine = [r for r in rows if r["name"] == name]
            summary[name] = {key: statistics.median(r[key] for r in mine)
                             for key in ("test_error", "test_loss", "seconds", "cpu_seconds", "train_flops_per_sample", "params")}
            summary[name]["test_errors"] = [r["test_error"] for r in mine]
        results[net] = {"runs": rows, "median": summary, "grow_then_prune": demo}
        print(f"\n{net}: medians over {opts.seeds} seeds ({opts.epochs} epochs, grown at {opts.grow_at})")
        for name, s in summary.items():
            print(f"  {name:30s} error {s['test_error']:.4f} loss {s['test_loss']:.4f} "
                  f"{s['seconds']:.1f} s ({s['cpu_seconds']:.1f} s CPU) {s['train_flops_per_sample']:.3g} FLOPs/sample {s['params']} params")
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / f"mnist_widening{opts.tag}.json").write_text(json.dumps(
        {"args": vars(opts), "load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
