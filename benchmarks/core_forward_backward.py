"""Forward + backward of the compiled GraphModule against an equivalent hand-written nn.Module.

Both hold the same weights (outputs and gradients checked bitwise before timing). Single thread,
contenders interleaved in alternating order every round, medians reported as the ratio
compiled / hand-written, by wall clock and by process CPU time. An A/A control row (hand-written
against a copy of itself) shows the noise floor of the machine.

    PYTHONPATH=. python benchmarks/core_forward_backward.py [--rounds 20] [--steps N]

(--steps defaults to 20 for mnist_fnn and 3 for cnn_vgg: a round of either takes ~0.5 s.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from graphgrow.compiler import compile_graph
from graphgrow.ir import load_graph

SPECS = Path(__file__).resolve().parent.parent / "specs"


class HandMnistFNN(nn.Module):
    """784-w-w-w-10 ReLU classifier written out by hand."""

    def __init__(self, width: int = 100):
        super().__init__()
        self.fc1 = nn.Linear(784, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.head(x)


class HandCnnVgg(nn.Module):
    """Two conv3x3-ReLU-maxpool2 blocks, flatten, three dense layers (thesis eq. 2.11 layout)."""

    def __init__(self, c1: int, c2: int, f1: int, f2: int, classes: int, head_bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.head = nn.Linear(f2, classes, bias=head_bias)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


def hand_written(name: str, graph) -> nn.Module:
    if name == "mnist_fnn":
        return HandMnistFNN(graph.node("fc1").args["out"])
    out = lambda n: graph.node(n).args["out"]
    return HandCnnVgg(out("conv1"), out("conv2"), out("fc1"), out("fc2"), out("head"),
                      graph.node("head").args["bias"])


def step(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    F.cross_entropy(module(x), target).backward()


def check_same_function(compiled, reference, x, target) -> None:
    with torch.no_grad():
        assert torch.equal(compiled(x), reference(x)), "outputs differ"
    step(compiled, x, target)
    step(reference, x, target)
    grads = dict(reference.named_parameters())
    for key, param in compiled.named_parameters():
        assert torch.equal(param.grad, grads[key].grad), f"gradient of {key} differs"


def timed_rounds(contenders: dict, x, target, rounds: int, steps: int, clock) -> dict:
    """Per-round seconds per step of each contender; order alternates every round."""
    for module in contenders.values():  # warm-up
        for _ in range(3):
            step(module, x, target)
    times = {key: [] for key in contenders}
    for r in range(rounds):
        for key in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            start = clock()
            for _ in range(steps):
                step(contenders[key], x, target)
            times[key].append((clock() - start) / steps)
    return times


def measure(name: str, batch: int, rounds: int, steps: int, control: bool = False) -> dict:
    """Compiled vs hand-written; with ``control``, hand-written vs a second hand-written copy
    (an A/A run that shows how large the noise of this machine is)."""
    graph = load_graph(SPECS / f"{name}.yaml")
    compiled = compile_graph(graph, seed=0)
    reference = hand_written(name, graph)
    reference.load_state_dict(compiled.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *graph.input_shape, generator=generator)
    target = torch.randint(0, 10, (batch,), generator=generator)
    check_same_function(compiled, reference, x, target)
    if control:
        compiled = hand_written(name, graph)
        compiled.load_state_dict(reference.state_dict())
    contenders = {"compiled": compiled, "hand-written": reference}
    row = {"spec": name + (" (A/A control)" if control else ""), "batch": batch}
    for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        times = timed_rounds(contenders, x, target, rounds, steps, clock)
        ratios = [a / b for a, b in zip(times["compiled"], times["hand-written"])]
        row[clock_name] = {"compiled_ms": 1e3 * statistics.median(times["compiled"]),
                           "hand_ms": 1e3 * statistics.median(times["hand-written"]),
                           "ratio": statistics.median(times["compiled"]) / statistics.median(times["hand-written"]),
                           "round_ratio": statistics.median(ratios)}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--specs", nargs="+", default=["mnist_fnn", "cnn_vgg"], choices=["mnist_fnn", "cnn_vgg"])
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {opts.batch}, "
          f"{opts.rounds} rounds, interleaved; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| spec | clock | compiled ms/step | hand-written ms/step | ratio of medians | median per-round ratio |")
    print("|---|---|---|---|---|---|")
    for name in opts.specs:
        steps = opts.steps or {"mnist_fnn": 20, "cnn_vgg": 3}[name]
        for control in (False, True):
            row = measure(name, opts.batch, opts.rounds, steps, control)
            for clock in ("wall", "cpu"):
                r = row[clock]
                print(f"| {row['spec']} | {clock} | {r['compiled_ms']:.3f} | {r['hand_ms']:.3f} | "
                      f"{r['ratio']:.3f} | {r['round_ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
