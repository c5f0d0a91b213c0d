"""Growth demo on the shipped ResNet: train specs/resnet_small.yaml, insert a copy of a residual
block (last layer zero) at a block boundary during training, train on.

Data: 512 synthetic CIFAR-size images (Gaussian noise) labelled by a fixed random teacher
(a linear map of the 4x4-pooled image), so the task is learnable and needs no download. SGD with
momentum; the optimizer is carried through the insertion (passes.transfer_optimizer). Printed:
the training loss before and right after the insertion (the same network function, in train
mode, on the same batch) and at the end, and the parameter counts.

    PYTHONPATH=. python benchmarks/grow_blocks_demo.py [--steps 40] [--after s2_2]
"""
from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from graphgrow import Network, load_graph
from passes import insert_block, transfer_optimizer

SPEC = "specs/resnet_small.yaml"


def synthetic_data(samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    teacher = torch.randn(3 * 16, 10, generator=generator)
    labels = (F.adaptive_avg_pool2d(images, 4).flatten(1) @ teacher).argmax(1)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="training steps before and after the insertion")
    parser.add_argument("--after", default="s2_2", help="the block whose copy is inserted after it")
    parser.add_argument("--batch", type=int, default=32)
    options = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images, labels = synthetic_data(512, generator)
    network = Network.build(load_graph(SPEC), seed=0)
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

    print(f"{SPEC}: {network.graph.num_params():,} parameters, {len(network.graph)} nodes")
    last = train(options.steps, 0)
    x, y = batch(options.steps)
    torch.manual_seed(1)
    with torch.no_grad():
        before = F.cross_entropy(network.module(x), y).item()
    old = network
    network, record = insert_block(network, options.after)
    network.module.train()
    transfer_optimizer(optimizer, old.module, network.module, record)
    torch.manual_seed(1)
    with torch.no_grad():
        after = F.cross_entropy(network.module(x), y).item()
    print(f"step {options.steps}: training loss {last:.4f}; on the next batch {before:.6f} before and "
          f"{after:.6f} after the insertion")
    print(record.notes[0])
    print(f"grown: {network.graph.num_params():,} parameters, {len(network.graph)} nodes")
    final = train(options.steps, options.steps)
    print(f"step {2 * options.steps}: training loss {final:.4f}")


if __name__ == "__main__":
    main()
