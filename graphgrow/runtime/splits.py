"""Splits of a data set as tensors, mini-batches, losses and evaluation: what the trainer and
the engines share about data."""
from __future__ import annotations

import math
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

    def rows(self, index, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the rows ``index`` (a slice or index tensor) on ``device``
        (a no-op where the split already lives there)."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.x.device)
        return self.x[index].to(device, non_blocking=True), self.y[index].to(device, non_blocking=True)

    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes


def place(split: Split | None, device: torch.device | str) -> Split | None:
    """``split`` on ``device`` when it fits there (on a CUDA device: in a quarter of its free
    memory), else where it is; batches then move to the device one at a time."""
    device = torch.device(device)
    if split is None or split.x.device == device:
        return split
    if device.type == "cuda" and split.nbytes() > torch.cuda.mem_get_info(device)[0] // 4:
        return split
    return Split(split.x.to(device), split.y.to(device))


def _finite(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).reshape(len(tensor), -1).any(dim=1).nonzero()[0, 0])
        raise GraphgrowError(f"data field {name} holds NaN or infinite values (first in sample {bad})",
                             option="data", hint="clean or impute the data; training on it would silently go wrong")


def as_splits(data, dtype: torch.dtype = torch.float32) -> tuple[Split, Split | None]:
    """Train and test splits from anything with x_train, y_train (and x_test, y_test);
    floating-point arrays are cast to ``dtype`` (the network's). Empty training data and NaN or
    infinite values are errors."""
    def tensor(value, name):
        if value is None:
            return None
        try:
            out = torch.as_tensor(value)
        except Exception as err:  # numpy object arrays, ragged lists, ...
            raise GraphgrowError(f"data field {name} is not an array: {err}", option="data") from None
        if out.dim() == 0:
            raise GraphgrowError(f"data field {name} is a scalar, not an array of samples", option="data")
        _finite(out, name)
        return out.to(dtype) if out.is_floating_point() else out
    missing = [n for n in ("x_train", "y_train") if getattr(data, n, None) is None]
    if missing:
        raise GraphgrowError(f"data has no {', '.join(missing)}", option="data",
                             hint="pass a data set with x_train, y_train, x_test, y_test")
    train = Split(tensor(data.x_train, "x_train"), tensor(data.y_train, "y_train"))
    if len(train) == 0:
        raise GraphgrowError("the training split is empty", option="data", hint="x_train needs at least one sample")
    x_test, y_test = getattr(data, "x_test", None), getattr(data, "y_test", None)
    test = Split(tensor(x_test, "x_test"), tensor(y_test, "y_test")) if x_test is not None and y_test is not None and len(x_test) else None
    for split, name in ((train, "train"), (test, "test")):
        if split is not None and split.x.shape[0] != split.y.shape[0]:
            raise GraphgrowError(f"{name} split has {split.x.shape[0]} inputs but {split.y.shape[0]} targets",
                                 option="data")
    return train, test


def check_data_fits(network: Network, train: Split, loss: str | None = None, test: Split | None = None) -> None:
    """The inputs have the network's input shape; with ``loss``, the targets of both splits fit
    the network's output under that loss (class labels in range, regression targets of the
    output's size)."""
    expected = tuple(network.graph.input_shape)
    got = tuple(train.x.shape[1:])
    if got != expected:
        raise GraphgrowError(f"data inputs have shape {list(got)} per sample, network "
                             f"'{network.graph.name}' expects {list(expected)}", file=network.graph.source,
                             hint="choose the spec that matches the data (e.g. input: {shape: [1, 28, 28]} for MNIST)")
    graph = network.graph
    if graph.input_tokens is not None:
        for split, name in ((train, "x_train"), (test, "x_test")):
            if split is not None:
                _check_token_ids(split.x, name, graph)
    if loss is None or len(graph.outputs) != 1:
        return
    out_shape = tuple(graph.shape_of(graph.outputs[0]))
    for split, name in ((train, "y_train"), (test, "y_test")):
        if split is not None:
            _check_targets(split.y, name, out_shape, loss, graph)


def _check_token_ids(x: torch.Tensor, name: str, graph) -> None:
    """A token model's inputs are whole numbers in [0, tokens) (as floats too: features may have
    been cast to the network's dtype)."""
    bad = (x < 0) | (x >= graph.input_tokens) | (x != x.round() if x.is_floating_point() else False)
    if bool(bad.any()):
        sample = int(bad.reshape(len(x), -1).any(dim=1).nonzero()[0, 0])
        raise GraphgrowError(f"data field {name} holds values that are not token ids below {graph.input_tokens} "
                             f"(first in sample {sample})", option="data", file=graph.source,
                             hint="a token model's inputs are integer ids in [0, tokens) (input: {shape, tokens})")


def _check_targets(y: torch.Tensor, name: str, out_shape: tuple[int, ...], loss: str, graph) -> None:
    per_sample = tuple(y.shape[1:])
    if y.is_floating_point():
        if loss == "cross_entropy" and per_sample != out_shape:
            raise GraphgrowError(f"cross-entropy needs integer class labels, but {name} holds floats "
                                 f"of shape {list(per_sample)} per sample", option="data",
                                 hint="store labels as integers, or use --loss mse for regression targets")
        if loss == "mse" and math.prod(per_sample) != math.prod(out_shape):
            raise GraphgrowError(f"{name} has shape {list(per_sample)} per sample, network '{graph.name}' "
                                 f"outputs {list(out_shape)}", option="data")
        return
    if not out_shape or per_sample != out_shape[:-1]:
        raise GraphgrowError(f"class labels in {name} must be one integer per sample for a network with a "
                             f"vector output, or one per position for an output of shape (..., classes) "
                             f"(a language model's next tokens); got shape {list(per_sample)} per sample, "
                             f"output {list(out_shape)}", option="data", file=graph.source)
    classes = out_shape[-1]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise GraphgrowError(f"{name} holds label {high if high >= classes else low}, outside 0..{classes - 1} "
                             f"for network '{graph.name}' with {classes} outputs", option="data",
                             hint="the last layer needs one output per class")


def loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean loss over a batch. Class-index targets work for both losses (one-hot for MSE). The
    classes are the output's last axis; with a class per position (output (batch, T, classes),
    targets (batch, T): a language model's next tokens) the mean is over every position."""
    if kind == "mse":
        def mse(output, target):
            if not target.is_floating_point():
                target = F.one_hot(target, output.shape[-1]).to(output.dtype)
            return F.mse_loss(output, target.reshape(output.shape))
        return mse
    def cross_entropy(output, target):
        return F.cross_entropy(output.flatten(0, -2),
                               target.flatten(0, -2) if target.is_floating_point() else target.flatten())
    return cross_entropy


def error_count(output: torch.Tensor, target: torch.Tensor) -> int | float | None:
    """Misclassified samples, or None when targets are not classes (regression). With a class
    per position (targets of the output's shape without its last axis), each sample counts the
    fraction of its positions it gets wrong, so that over equal-length samples the count over
    the samples is the error rate of the positions."""
    if target.is_floating_point():
        if target.shape != output.shape or output.dim() != 2:
            return None
        target = target.argmax(dim=1)  # one-hot or probability targets
    if output.dim() < 2 or target.shape != output.shape[:-1]:
        return None
    wrong = output.argmax(dim=-1) != target
    return int(wrong.sum()) if wrong.dim() == 1 else float(wrong.flatten(1).double().mean(dim=1).sum())


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
def evaluate(network: Network, split: Split, loss: str = "cross_entropy", batch: int = 256,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Mean loss and error rate (None for regression) over a split, in eval mode. Batches of a
    few hundred: on CPU, larger ones were slower per sample (activations fall out of cache; for the
    VGG-like CNN on MNIST, batch 4096 was 1.5x slower than a whole training epoch).
    ``reduce``: sums a tensor over the processes of a data-parallel run, each holding a part of
    the split (the sums of losses, errors and samples are reduced, then divided)."""
    module = network.module
    device = network.device
    was_training = module.training
    module.eval()
    compute = loss_fn(loss)
    total_loss, wrong, counted = 0.0, 0, True
    try:
        for start in range(0, len(split), batch):
            x, y = split.rows(slice(start, start + batch), device)
            output = module(x)
            total_loss += float(compute(output, y)) * x.shape[0]
            errors = error_count(output, y)
            if errors is None:
                counted = False
            else:
                wrong += errors
    finally:
        module.train(was_training)
    sums = torch.tensor([total_loss, wrong, len(split)], dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums)
    n = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / n, "error": float(sums[1]) / n if counted else None}
