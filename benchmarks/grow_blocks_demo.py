"""Growth demo on the shipped ResNet or vision transformer: train specs/resnet_small.yaml or
specs/vit_small.yaml, insert a copy of a residual block (last layer zero) at a block boundary
during training, optionally add the best attention heads or MLP units, and train on.

Where the block goes: at ``--after`` (a copy of the block ending there), or, without it, where
SensLI ranks the block candidates highest (graphgrow.sensli.sensitivities with
candidates="blocks": the gradient norm of each candidate's zero layer over the training data).
``--widen K`` then adds the K best units (attention heads, MLP hidden units; neuron candidates
of graphgrow.sensli.widen_best, zero outgoing weights).

Data: 512 synthetic CIFAR-size images (Gaussian noise) labelled by a fixed random teacher
(a linear map of the 4x4-pooled image), so the task is learnable and needs no download. SGD with
momentum; the optimizer is carried through each growth step (passes.transfer_optimizer). Printed:
the ranking, the training loss before and right after each growth step (the same network
function, in train mode, on the same batch) and at the end, and the parameter counts.

    PYTHONPATH=. python benchmarks/grow_blocks_demo.py [--spec resnet|vit] [--steps 40] [--after s2_2] [--widen K]
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from torch.nn import functional as F

from graphgrow import Network, load_graph
from graphgrow.sensli import sensitivities, widen_best
from passes import block_at, insert_block, transfer_optimizer

SPECS = {"resnet": "specs/resnet_small.yaml", "vit": "specs/vit_small.yaml"}


def synthetic_data(samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    teacher = torch.randn(3 * 16, 10, generator=generator)
    labels = (F.adaptive_avg_pool2d(images, 4).flatten(1) @ teacher).argmax(1)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", choices=sorted(SPECS), default="resnet")
    parser.add_argument("--steps", type=int, default=40, help="training steps before and after the insertion")
    parser.add_argument("--after", default=None, help="the block boundary to insert at (default: SensLI's best)")
    parser.add_argument("--widen", type=int, default=0, metavar="K", help="then add the K best units or heads")
    parser.add_argument("--batch", type=int, default=32)
    options = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images, labels = synthetic_data(512, generator)
    spec = SPECS[options.spec]
    network = Network.build(load_graph(spec), seed=0)
    network.module.train()
    optimizer = torch.optim.SGD(network.module.parameters(), lr=0.05, momentum=0.9)

    def batch(step: int):
        start = (step * options.batch) % len(images)
        return images[start:start + options.batch], labels[start:start + options.batch]

    def train(steps: int, first: int) -> float:
        for step in range(first, first + steps):
            x, y = batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(network.module(x), y)
            loss.backward()
            optimizer.step()
        return loss.item()

    def next_batch_loss() -> float:
        x, y = batch(options.steps)
        torch.manual_seed(1)
        with torch.no_grad():
            return F.cross_entropy(network.module(x), y).item()

    def replace(grown, record, what: str) -> None:
        nonlocal network
        before = next_batch_loss()
        old, network = network, grown
        network.module.train()
        transfer_optimizer(optimizer, old.module, network.module, record)
        print(f"{what}: on the next batch {before:.6f} before and {next_batch_loss():.6f} after; "
              f"{old.graph.num_params():,} -> {network.graph.num_params():,} parameters")

    print(f"{spec}: {network.graph.num_params():,} parameters, {len(network.graph)} nodes")
    print(f"step {options.steps}: training loss {train(options.steps, 0):.4f}")
    after = options.after
    if after is None:
        report = sensitivities(network, SimpleNamespace(x_train=images, y_train=labels), candidates="blocks")
        ranked = sorted(report.candidates, key=lambda c: c.merit, reverse=True)
        print("block candidates by merit (||gradient of the zero layer||^2; ratio to the mean over existing weights):")
        for candidate in ranked[:3]:
            print(f"  {candidate.position:12s} {candidate.param:40s} merit {candidate.merit:.4g}  "
                  f"ratio {report.ratio(candidate):.3g}")
        after = ranked[0].after
    grown, record = insert_block(network, block_at(network.graph, after).output, after)
    replace(grown, record, record.notes[0])
    if options.widen:
        grown, chosen, reference, record = widen_best(network, SimpleNamespace(x_train=images, y_train=labels),
                                                      count=options.widen, per_layer=2)
        units = ", ".join(f"{c.layer}[{c.index}] ({c.merit / reference:.3g})" for c in chosen)
        replace(grown, record, f"added {units} (merit ratios)")
    print(f"step {2 * options.steps}: training loss {train(options.steps, options.steps):.4f}")


if __name__ == "__main__":
    main()
