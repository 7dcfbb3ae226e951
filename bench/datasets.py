"""Real datasets for the benchmark, read from ../shared/data (never needed by the product itself).

Decoded arrays are cached as uncompressed ``.npz`` under the cache directory, so only the first run
pays for decoding the CIFAR-10 JPEG archive.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tbar_guard.data import ImageSet

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GTSRB_CLASSES = (
    "speed limit 20",
    "speed limit 30",
    "speed limit 50",
    "speed limit 60",
    "speed limit 70",
    "speed limit 80",
    "end of speed limit 80",
    "speed limit 100",
    "speed limit 120",
    "no passing",
    "no passing for trucks",
    "right-of-way at next intersection",
    "priority road",
    "yield",
    "stop",
    "no vehicles",
    "trucks prohibited",
    "no entry",
    "general caution",
    "dangerous curve left",
    "dangerous curve right",
    "double curve",
    "bumpy road",
    "slippery road",
    "road narrows on the right",
    "road work",
    "traffic signals",
    "pedestrians",
    "children crossing",
    "bicycles crossing",
    "beware of ice or snow",
    "wild animals crossing",
    "end of all speed and passing limits",
    "turn right ahead",
    "turn left ahead",
    "ahead only",
    "go straight or right",
    "go straight or left",
    "keep right",
    "keep left",
    "roundabout mandatory",
    "end of no passing",
    "end of no passing for trucks",
)
MNIST_CLASSES = tuple(
    f"the digit {d}" for d in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)
CLASSES = {"cifar10": CIFAR10_CLASSES, "gtsrb": GTSRB_CLASSES, "mnist": MNIST_CLASSES}


def _to_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
    """uint8 N×H×W×3 (or N×H×W) + labels → ImageSet (N×3×H×W)."""
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=3)
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64))
    )


def _cifar_zip(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg"))
        for name in names:
            label = CIFAR10_CLASSES.index(name.split("/")[-2])
            with Image.open(io.BytesIO(archive.read(name))) as img:
                xs.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            ys.append(label)
    if not xs:
        raise FileNotFoundError(f"{path} holds no {split} JPEGs")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as handle:
        x = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as handle:
        y = np.frombuffer(handle.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def load(name: str, split: str, shared: Path = DEFAULT_SHARED, cache: Path | None = None) -> ImageSet:
    """``name`` in cifar10 | gtsrb | mnist, ``split`` in train | test; shuffled once with seed 1234
    (the CIFAR archive is ordered by class, GTSRB train by track), so prefixes are class-balanced."""
    cached = cache / f"{name}-{split}.npz" if cache is not None else None
    if cached is not None and cached.exists():
        with np.load(cached, allow_pickle=False) as data:
            return _to_set(data["x"], data["y"])
    if name == "cifar10":
        x, y = _cifar_zip(shared / "cifar10" / f"cifar10_{split}_jpg.zip", split)
    elif name == "gtsrb":
        file = "gtsrb32_train_evenframes.npz" if split == "train" else "gtsrb32_test.npz"
        with np.load(shared / "gtsrb32" / file, allow_pickle=False) as data:
            x, y = data["x"], data["y"].astype(np.int64)
    elif name == "mnist":
        x, y = _mnist(shared / "mnist", split)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: cifar10, gtsrb, mnist")
    order = np.random.default_rng(1234).permutation(len(y))
    x, y = x[order], y[order]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: parallel bench workers
        np.savez(tmp, x=x, y=y)
        tmp.replace(cached)
    return _to_set(x, y)


def save_npz(images: ImageSet, path: Path) -> Path:
    """The product's .npz data format (x uint8 N×H×W×3, y class indices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: parallel bench workers
    np.savez(tmp, x=images.images.permute(0, 2, 3, 1).numpy(), y=images.labels.numpy())
    tmp.replace(path)
    return path
