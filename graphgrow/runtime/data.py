"""Data sets: the thesis spiral (generated), MNIST from local IDX files, and arrays from ``.npz``.

Every loader returns a :class:`Dataset` of torch tensors. Nothing is downloaded and nothing is
written to disk; randomness goes through an explicit seed.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from graphgrow.errors import GraphgrowError

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    """Train/test tensors plus what a network spec needs to know about them.

    ``num_classes`` is ``None`` for regression targets.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int | None
    name: str = ""


def spiral(seed: int = 0, *, points_per_class: int = 300, r0: float = 0.5, turns: float = 1.0,
           noise: float = 0.0, n_train: int = 450) -> Dataset:
    """The two-spiral classification set of the thesis (Section 2.2.2, Figure 2.4).

    Class ``k`` lies on the arc ``r = r0 + t``, ``angle = 2*pi*turns*t + k*pi`` for ``t`` evenly
    spaced in ``[0, 1]``; ``r0`` is the gap between the spiral starts in the centre. Optional
    Gaussian ``noise`` is added to the coordinates. The 600 points are shuffled by ``seed`` and split
    450/150 by default. Labels are class indices (0 or 1), ready for ``CrossEntropyLoss``.
    """
    if points_per_class < 1 or not 0 < n_train < 2 * points_per_class:
        raise GraphgrowError(
            f"spiral needs 0 < n_train < 2*points_per_class, got n_train={n_train}, "
            f"points_per_class={points_per_class}", hint="the thesis uses 300 points per class, 450 for training")
    if r0 < 0 or turns <= 0 or noise < 0:
        raise GraphgrowError(f"spiral needs r0 >= 0, turns > 0, noise >= 0; got r0={r0}, turns={turns}, noise={noise}")
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 1.0, points_per_class, dtype=torch.float64)
    radius = r0 + t
    points, labels = [], []
    for label in (0, 1):
        angle = 2 * math.pi * turns * t + label * math.pi
        points.append(torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1))
        labels.append(torch.full((points_per_class,), label, dtype=torch.int64))
    x = torch.cat(points)
    y = torch.cat(labels)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    order = torch.randperm(len(x), generator=generator)
    x, y = x[order].to(torch.float32), y[order]
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], (2,), 2, "spiral")


def _open_maybe_gzip(path: str):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) whose header must carry ``magic``."""
    try:
        with _open_maybe_gzip(path) as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise GraphgrowError(f"cannot read IDX file: {err}", file=path) from err
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size or struct.unpack(">I", raw[:4])[0] != magic:
        raise GraphgrowError(
            f"not an IDX file of the expected kind (magic 0x{magic:08x})", file=path,
            hint="images need the idx3-ubyte file, labels the idx1-ubyte file")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise GraphgrowError(
            f"IDX header announces shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header_size} bytes", file=path, hint="the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_mnist_pair(directory: str, part: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    image_stem, label_stem = _MNIST_FILES[part]
    image_path, label_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
    if image_path is None and label_path is None:
        return None
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise GraphgrowError(f"found one half of the MNIST '{part}' pair but not {missing}[.gz]", file=directory)
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise GraphgrowError(f"MNIST images must be 28x28, got {images.shape[1:]}", file=image_path)
    if len(images) != len(labels):
        raise GraphgrowError(f"{len(images)} images but {len(labels)} labels", file=label_path)
    if labels.size and labels.max() > 9:
        raise GraphgrowError(f"MNIST labels must be digits 0-9, found {labels.max()}", file=label_path)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist(path: str, *, split: tuple[int, int] | None = None, seed: int = 0) -> Dataset:
    """MNIST from the canonical IDX files in directory ``path`` (``.gz`` or plain).

    Without ``split`` both the ``train-*`` and ``t10k-*`` pairs must be present and are returned as
    train/test. With ``split=(n_train, n_test)`` all images found are pooled, shuffled by ``seed``
    and the first ``n_train`` / next ``n_test`` are returned (e.g. ``(8000, 2000)`` on the 10k test
    set). Images are float32 in [0, 1] with shape (N, 1, 28, 28); labels are int64 digits.
    """
    if not os.path.isdir(path):
        raise GraphgrowError("MNIST directory does not exist", file=path,
                             hint="pass the folder holding t10k-images-idx3-ubyte[.gz] and friends")
    parts = {part: _read_mnist_pair(path, part) for part in _MNIST_FILES}
    found = {part: pair for part, pair in parts.items() if pair is not None}
    if not found:
        raise GraphgrowError("no MNIST IDX files found", file=path,
                             hint="expected train-images-idx3-ubyte[.gz] / t10k-images-idx3-ubyte[.gz] "
                                  "with the matching labels files")
    if split is None:
        if len(found) < 2:
            raise GraphgrowError(f"only the '{next(iter(found))}' files are present, so there is no "
                                 "canonical train/test split", file=path,
                                 hint="pass split=(n_train, n_test), e.g. split=(8000, 2000)")
        (x_train, y_train), (x_test, y_test) = found["train"], found["t10k"]
    else:
        n_train, n_test = split
        x_all = torch.cat([pair[0] for pair in found.values()])
        y_all = torch.cat([pair[1] for pair in found.values()])
        if n_train < 1 or n_test < 0 or n_train + n_test > len(x_all):
            raise GraphgrowError(f"split {split} does not fit the {len(x_all)} images found", file=path,
                                 hint="n_train >= 1, n_test >= 0 and n_train + n_test <= the images found")
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
        train_index, test_index = order[:n_train], order[n_train:n_train + n_test]
        x_train, y_train, x_test, y_test = x_all[train_index], y_all[train_index], x_all[test_index], y_all[test_index]
    return Dataset(x_train, y_train, x_test, y_test, (1, 28, 28), 10, "mnist")


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz(path: str) -> Dataset:
    """Arrays ``x_train, y_train, x_test, y_test`` from one ``.npz`` file.

    Integer labels are treated as classes (``num_classes = max + 1``); float targets as regression.
    Features become float32.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # missing, corrupt, truncated
        raise GraphgrowError(f"cannot read .npz file: {err.__class__.__name__}: {str(err)[:160]}", file=path,
                             hint="save with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from err
    missing = [key for key in _NPZ_KEYS if key not in arrays]
    if missing:
        raise GraphgrowError(f"missing arrays {missing}; found {sorted(arrays)}", file=path,
                             hint=f"the file must hold {', '.join(_NPZ_KEYS)}")
    x_train, y_train, x_test, y_test = (arrays[key] for key in _NPZ_KEYS)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise GraphgrowError(f"features and targets differ in length: x_train {len(x_train)}, y_train {len(y_train)}, "
                             f"x_test {len(x_test)}, y_test {len(y_test)}", file=path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise GraphgrowError(f"train and test features differ in shape: {x_train.shape[1:]} vs {x_test.shape[1:]}",
                             file=path)
    classification = np.issubdtype(y_train.dtype, np.integer) and np.issubdtype(y_test.dtype, np.integer)
    if classification:
        if min(y_train.min(initial=0), y_test.min(initial=0)) < 0:
            raise GraphgrowError("integer labels must be non-negative class indices", file=path)
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        to_target = lambda array: torch.from_numpy(array.astype(np.int64))  # noqa: E731
    else:
        num_classes = None
        to_target = lambda array: torch.from_numpy(array.astype(np.float32))  # noqa: E731
    to_features = lambda array: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))  # noqa: E731
    return Dataset(to_features(x_train), to_target(y_train), to_features(x_test), to_target(y_test),
                   tuple(x_train.shape[1:]), num_classes, os.path.basename(path))


def load_data(source, seed: int = 0):
    """A data set from ``spiral``, ``mnist:PATH`` or ``npz:PATH`` (or a data set object,
    returned as is). MNIST without train-* files (only the 10k t10k-* test set) is split
    8,000 train / 2,000 test, shuffled by ``seed``."""
    if not isinstance(source, str):
        return source
    kind, _, path = source.partition(":")
    if kind == "spiral" and not path:
        return spiral(seed)
    if kind == "mnist" and path:
        has_train = any(os.path.exists(os.path.join(path, "train-images-idx3-ubyte" + s)) for s in ("", ".gz"))
        return mnist(path) if has_train else mnist(path, split=(8000, 2000), seed=seed)
    if kind == "npz" and path:
        return npz(path)
    raise GraphgrowError(f"unknown data source '{source}'", option="data", hint="use spiral, mnist:PATH or npz:PATH")
