"""Tiny data sets written in their real on-disk formats, and tiny model factories."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import torch
from torch import nn

from ckptavg.nn.models import register_model


def write_idx(path: str, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as f:
        f.write(data)


def write_mnist(root: str, n_train: int = 64, n_test: int = 32, compress: bool = True,
                layout: str = "flat", seed: int = 0) -> dict:
    """Fashion-MNIST-format IDX files. layout: 'flat' (files in root, like ../shared/data)
    or 'torchvision' (root/FashionMNIST/raw). Returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root if layout == "flat" else os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, compress)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(root: str, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-10-batches-py as torchvision reads it: pickled dicts, data N x 3072 uint8."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
        out[name] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return out


def write_cifar100(root: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """CIFAR-100's python files; returns {split: (data, fine labels)} as written. The
    coarse labels are the fine ones' superclass (fine // 5 here): never what a reader
    should return."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(5, 100, n)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"filenames": [f"{name}_{i}.png" for i in range(n)], "data": data,
                         "fine_labels": fine, "coarse_labels": [y // 5 for y in fine]}, f,
                        protocol=2)
        written[name] = (data, fine)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f, protocol=2)
    return written


@register_model
def zero_linear(num_classes: int = 10, in_channels: int = 1):
    """Predicts equal logits for every class: accuracy = share of class 0, loss = log(C)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))
    nn.init.zeros_(net[1].weight)
    nn.init.zeros_(net[1].bias)
    return net


@register_model
def tiny_bn(num_classes: int = 10, in_channels: int = 1):
    """Conv-BN-ReLU-pool-linear: a BN net that runs in milliseconds."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def dict_batches(split: str = "train", augment: bool = False):
    """A user data function returning a Dataset of dict samples."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(12, 1, 28, 28, generator=g)
    return [{"image": xs[i], "label": i % 10} for i in range(12)]


class Blobs(torch.utils.data.Dataset):
    """Two classes of 2-D points, split by the sign of the first coordinate."""

    classes = ["left", "right"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def blobs(split: str = "train", augment: bool = False):
    """A user data function: 600 training points, 200 test points."""
    return Blobs(600, 0) if split == "train" else Blobs(200, 1)


def blobs_no_test(split: str = "train", augment: bool = False):
    """As `blobs`, but reading the test split is an error (selection must not read it)."""
    if split == "test":
        raise AssertionError("the test split was read")
    return blobs(split, augment)


def linear2(num_classes: int = 2, in_channels: int = 1):
    """Logits W x + b for 2-D points."""
    return nn.Linear(2, num_classes)


def bn2(num_classes: int = 2, in_channels: int = 1):
    """A 2-D net with BatchNorm: its statistics are the data's mean and variance."""
    return nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, num_classes))


@register_model
def dropout_bn(num_classes: int = 10, in_channels: int = 1):
    """Dropout before BatchNorm: the recalibrated statistics depend on the dropout draws."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.Dropout(0.5),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


class LoggedImages(torch.utils.data.Dataset):
    """30 fixed random 1x28x28 images whose augmentation adds torch-random noise; every item
    loaded is appended to $CKPTAVG_TEST_LOG/loaded-$RANK.txt (which images each rank read)."""

    def __init__(self, augment: bool):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(30, 1, 28, 28, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        log = os.environ.get("CKPTAVG_TEST_LOG")
        if log:
            with open(os.path.join(log, f"loaded-{os.environ.get('RANK', '0')}.txt"), "a") as f:
                f.write(f"{i}\n")
        x = self.x[i] + (torch.rand(()) if self.augment else 0.0)
        return x, i % 10


def logged_images(split: str = "train", augment: bool = False):
    return LoggedImages(augment)
