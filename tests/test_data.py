"""Data module: the thesis spiral, MNIST IDX reading, .npz arrays, and the errors users can cause."""
import gzip
import math
import os
import struct
import subprocess

import numpy as np
import pytest
import torch

from graphgrow.runtime import data
from graphgrow.errors import GraphgrowError



def find_mnist_dir() -> str:
    """The real MNIST test set: $GRAPHGROW_MNIST, else ``shared/data/mnist`` beside the checkout,
    else beside the repository this one was cloned from (a clone made elsewhere, e.g. in /tmp)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.environ.get("GRAPHGROW_MNIST"), os.path.join(repo, "..", "shared", "data", "mnist")]
    origin = subprocess.run(["git", "-C", repo, "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and os.path.isdir(origin):
        candidates.append(os.path.join(origin, "..", "shared", "data", "mnist"))
    return next((c for c in candidates if c and os.path.isdir(c)), candidates[1])


MNIST_DIR = find_mnist_dir()


def write_idx(path, array, magic, compress=False):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_mnist_pair(directory, part, images, labels, compress=False):
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images, 0x803, compress)
    write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels, 0x801, compress)


# ------------------------------------------------------------------------------------ spiral
def test_spiral_matches_the_thesis_construction():
    dataset = data.spiral(seed=3)
    assert dataset.x_train.shape == (450, 2) and dataset.x_test.shape == (150, 2)
    assert dataset.num_classes == 2 and dataset.input_shape == (2,)
    x = torch.cat([dataset.x_train, dataset.x_test]).double()
    y = torch.cat([dataset.y_train, dataset.y_test])
    assert torch.bincount(y).tolist() == [300, 300]
    radius = x.norm(dim=1)
    assert radius.min() == pytest.approx(0.5, abs=1e-6) and radius.max() == pytest.approx(1.5, abs=1e-6)
    # every point lies on its arm: angle = 2*pi*(r - r0) + label*pi (mod 2*pi)
    expected = 2 * math.pi * (radius - 0.5) + y * math.pi
    difference = torch.atan2(x[:, 1], x[:, 0]) - expected
    assert torch.allclose(torch.cos(difference), torch.ones_like(difference), atol=1e-5)


def test_spiral_is_deterministic_by_seed_and_shuffled_differently_by_another():
    first, again, other = data.spiral(seed=1), data.spiral(seed=1), data.spiral(seed=2)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)


def test_spiral_rejects_impossible_split():
    with pytest.raises(GraphgrowError, match="n_train"):
        data.spiral(n_train=600)


# ------------------------------------------------------------------------------------- mnist
def test_mnist_reads_the_real_test_set_with_a_deterministic_split():
    dataset = data.mnist(MNIST_DIR, split=(8000, 2000), seed=0)
    assert dataset.x_train.shape == (8000, 1, 28, 28) and dataset.x_test.shape == (2000, 1, 28, 28)
    assert dataset.x_train.dtype == torch.float32 and 0 <= dataset.x_train.min() and dataset.x_train.max() <= 1
    assert set(dataset.y_train.unique().tolist()) == set(range(10))
    again = data.mnist(MNIST_DIR, split=(8000, 2000), seed=0)
    assert torch.equal(dataset.x_test, again.x_test) and torch.equal(dataset.y_train, again.y_train)
    # the two parts are disjoint: together they are a permutation of all 10,000 images
    pooled = torch.cat([dataset.x_train, dataset.x_test]).flatten(1).sum(1)
    with gzip.open(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as handle:
        raw = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(10000, 784)
    assert torch.allclose(pooled.sort().values, torch.from_numpy(raw.sum(1) / 255.0).float().sort().values)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_plain_and_gzipped_pairs_in_canonical_order(tmp_path, compress):
    rng = np.random.default_rng(0)
    train_images, test_images = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    write_mnist_pair(tmp_path, "train", train_images, np.arange(5), compress)
    write_mnist_pair(tmp_path, "t10k", test_images, np.array([7, 8, 9]), compress)
    dataset = data.mnist(str(tmp_path))
    assert torch.equal(dataset.y_train, torch.arange(5)) and dataset.y_test.tolist() == [7, 8, 9]
    assert torch.allclose(dataset.x_test[:, 0] * 255, torch.from_numpy(test_images).float())


def test_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(GraphgrowError, match="does not exist"):
        data.mnist(str(tmp_path / "missing"))
    with pytest.raises(GraphgrowError, match="no MNIST IDX files"):
        data.mnist(str(tmp_path))
    with pytest.raises(GraphgrowError, match="no canonical train/test split"):
        data.mnist(MNIST_DIR)
    with pytest.raises(GraphgrowError, match="does not fit"):
        data.mnist(MNIST_DIR, split=(9000, 2000))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)), 0x803)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), 0x801)
    with pytest.raises(GraphgrowError, match="2 images but 3 labels"):
        data.mnist(str(tmp_path), split=(1, 1))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((2, 28, 28)), 0x803)  # an image file as labels
    with pytest.raises(GraphgrowError, match="not an IDX file") as error:
        data.mnist(str(tmp_path), split=(1, 1))
    assert error.value.file.endswith("t10k-labels-idx1-ubyte")
    with open(tmp_path / "t10k-labels-idx1-ubyte", "wb") as handle:
        handle.write(struct.pack(">II", 0x801, 5) + b"\x01\x02")  # truncated
    with pytest.raises(GraphgrowError, match="truncated"):
        data.mnist(str(tmp_path), split=(1, 1))


def test_mnist_rejects_wrong_image_size(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 14, 14)), 0x803)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2), 0x801)
    with pytest.raises(GraphgrowError, match="28x28"):
        data.mnist(str(tmp_path), split=(1, 1))


# --------------------------------------------------------------------------------------- npz
def test_npz_classification_and_regression(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, x_train=np.ones((4, 3)), y_train=np.array([0, 2, 1, 0]),
             x_test=np.zeros((2, 3)), y_test=np.array([1, 1]))
    dataset = data.npz(str(path))
    assert dataset.num_classes == 3 and dataset.input_shape == (3,) and dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    np.savez(path, x_train=np.ones((4, 3)), y_train=np.ones((4, 2)), x_test=np.zeros((2, 3)), y_test=np.ones((2, 2)))
    regression = data.npz(str(path))
    assert regression.num_classes is None and regression.y_test.dtype == torch.float32


def test_npz_errors(tmp_path):
    with pytest.raises(GraphgrowError, match="cannot read"):
        data.npz(str(tmp_path / "nothing.npz"))
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.ones((4, 3)), y_train=np.zeros(4, dtype=int))
    with pytest.raises(GraphgrowError, match="missing arrays"):
        data.npz(str(path))
    np.savez(path, x_train=np.ones((4, 3)), y_train=np.zeros(3, dtype=int), x_test=np.ones((2, 3)),
             y_test=np.zeros(2, dtype=int))
    with pytest.raises(GraphgrowError, match="differ in length"):
        data.npz(str(path))
    np.savez(path, x_train=np.ones((4, 3)), y_train=np.zeros(4, dtype=int), x_test=np.ones((2, 5)),
             y_test=np.zeros(2, dtype=int))
    with pytest.raises(GraphgrowError, match="differ in shape"):
        data.npz(str(path))
