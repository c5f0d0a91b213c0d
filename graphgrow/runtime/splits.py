"""Splits of a data set as tensors, mini-batches, losses and evaluation: what the trainer and
the engines share about data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from ..compiler.network import Network
from ..errors import GraphgrowError

LOSSES = ("cross_entropy", "mse")


@dataclass
class Split:
    """Inputs and targets of one split as tensors."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


def as_splits(data) -> tuple[Split, Split | None]:
    """Train and test splits from anything with x_train, y_train (and x_test, y_test)."""
    def tensor(value, name):
        if value is None:
            return None
        try:
            out = torch.as_tensor(value)
        except Exception as err:  # numpy object arrays, ragged lists, ...
            raise GraphgrowError(f"data field {name} is not an array: {err}") from None
        return out.float() if out.is_floating_point() else out
    missing = [n for n in ("x_train", "y_train") if getattr(data, n, None) is None]
    if missing:
        raise GraphgrowError(f"data has no {', '.join(missing)}",
                             hint="pass a data set with x_train, y_train, x_test, y_test")
    train = Split(tensor(data.x_train, "x_train"), tensor(data.y_train, "y_train"))
    x_test, y_test = getattr(data, "x_test", None), getattr(data, "y_test", None)
    test = Split(tensor(x_test, "x_test"), tensor(y_test, "y_test")) if x_test is not None and y_test is not None and len(x_test) else None
    for split, name in ((train, "train"), (test, "test")):
        if split is not None and split.x.shape[0] != split.y.shape[0]:
            raise GraphgrowError(f"{name} split has {split.x.shape[0]} inputs but {split.y.shape[0]} targets")
    return train, test


def check_data_fits(network: Network, train: Split) -> None:
    expected = tuple(network.graph.input_shape)
    got = tuple(train.x.shape[1:])
    if got != expected:
        raise GraphgrowError(f"data inputs have shape {list(got)} per sample, network "
                             f"'{network.graph.name}' expects {list(expected)}", file=network.graph.source,
                             hint="choose the spec that matches the data (e.g. input: {shape: [1, 28, 28]} for MNIST)")


def loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean loss over a batch. Class-index targets work for both losses (one-hot for MSE)."""
    if kind == "mse":
        def mse(output, target):
            if not target.is_floating_point():
                target = F.one_hot(target, output.shape[-1]).to(output.dtype)
            return F.mse_loss(output, target.reshape(output.shape))
        return mse
    def cross_entropy(output, target):
        return F.cross_entropy(output, target)
    return cross_entropy


def error_count(output: torch.Tensor, target: torch.Tensor) -> int | None:
    """Misclassified samples, or None when targets are not classes (regression)."""
    if target.is_floating_point():
        if target.shape != output.shape or output.dim() != 2:
            return None
        target = target.argmax(dim=1)  # one-hot or probability targets
    if output.dim() != 2:
        return None
    return int((output.argmax(dim=1) != target).sum())


def epoch_order(size: int, batch: int | None, generator: torch.Generator | None) -> torch.Tensor | None:
    """The sample order of one epoch: a seeded permutation, or None for full batch."""
    if batch is None or batch >= size:
        return None
    return torch.randperm(size, generator=generator)


def batches_of(order: torch.Tensor | None, batch: int | None) -> list[torch.Tensor | slice]:
    """The index batches of an epoch with sample ``order`` (one slice for full batch)."""
    if order is None:
        return [slice(None)]
    return [order[start:start + batch] for start in range(0, len(order), batch)]


def batches(size: int, batch: int | None, generator: torch.Generator | None) -> Iterator[torch.Tensor | slice]:
    """Index batches of one epoch: one slice (full batch), else a seeded permutation in chunks."""
    yield from batches_of(epoch_order(size, batch, generator), batch)


@torch.no_grad()
def evaluate(network: Network, split: Split, loss: str = "cross_entropy", batch: int = 256) -> dict:
    """Mean loss and error rate (None for regression) over a split, in eval mode. Batches of a
    few hundred: on CPU, larger ones were slower per sample (activations fall out of cache; for the
    VGG-like CNN on MNIST, batch 4096 was 1.5x slower than a whole training epoch)."""
    module = network.module
    was_training = module.training
    module.eval()
    compute = loss_fn(loss)
    total_loss, wrong, counted = 0.0, 0, True
    try:
        for start in range(0, len(split), batch):
            x, y = split.x[start:start + batch], split.y[start:start + batch]
            output = module(x)
            total_loss += float(compute(output, y)) * x.shape[0]
            errors = error_count(output, y)
            if errors is None:
                counted = False
            else:
                wrong += errors
    finally:
        module.train(was_training)
    n = max(len(split), 1)
    return {"loss": total_loss / n, "error": wrong / n if counted else None}
