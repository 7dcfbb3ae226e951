"""Clean image data: a folder of class sub-folders, or an ``.npz`` with ``x`` and ``y``.

Images become a uint8 tensor [N,3,H,W] at the model's image size; labels are indices into the
model's class list. Splits are deterministic under a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tbar_guard.bundle import ZeroShotTask
from tbar_guard.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])

    def pixels(self) -> torch.Tensor:
        """Float pixels in [0, 1]."""
        return self.images.float() / 255.0


@dataclass(frozen=True)
class Splits:
    """Disjoint splits: ``forget`` feeds the forget set, ``val`` chooses α, ``test`` reports."""

    forget: ImageSet
    val: ImageSet
    test: ImageSet


def _to_rgb_array(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _load_folder(path: Path, task: ZeroShotTask, size: int) -> ImageSet:
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(f"{path} has no class sub-folders", hint="lay out DATA/<class name>/<image files>")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for folder in dirs:
        if folder.name in task.classnames:
            label = task.classnames.index(folder.name)
        elif folder.name.isdigit() and int(folder.name) < len(task.classnames):
            label = int(folder.name)
        else:
            raise DataError(
                f"folder {folder} is not a class of the model",
                hint=f"sub-folders must be class names or indices; the model knows {len(task.classnames)} "
                f"classes, e.g. {task.classnames[0]!r}",
            )
        for file in sorted(folder.iterdir()):
            if file.name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    images.append(_to_rgb_array(img, size))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {file}: {exc}", hint="remove or re-encode the file") from None
            labels.append(label)
    if not images:
        raise DataError(f"no images found under {path}", hint=f"supported: {', '.join(IMAGE_SUFFIXES)}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64))


def _load_npz(path: Path, task: ZeroShotTask, size: int) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{path} lacks arrays 'x' and 'y' (has {sorted(data.files)})")
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="an .npz needs uint8 x [N,H,W,3] and int y [N]") from None
    if x.dtype != np.uint8:
        raise DataError(f"{path}: x has dtype {x.dtype}, expected uint8", hint="store pixels as 0..255 uint8")
    if x.ndim == 3:  # grayscale N×H×W
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{path}: x has shape {x.shape}, expected [N,H,W,3]")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        x = x[..., :3]
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has shape {y.shape} / dtype {y.dtype}, expected {x.shape[0]} integer labels")
    if x.shape[1:3] != (size, size):
        x = np.stack([_to_rgb_array(Image.fromarray(img), size) for img in x])
    tensor = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(tensor, torch.from_numpy(y.astype(np.int64)))


def load_images(path: Path, task: ZeroShotTask, image_size: int) -> ImageSet:
    """Load clean labelled images, converting grayscale/RGBA to RGB and resizing to ``image_size``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist", hint="pass a folder of class sub-folders or an .npz")
    images = _load_folder(path, task, image_size) if path.is_dir() else _load_npz(path, task, image_size)
    if len(images) == 0:
        raise DataError(f"{path} holds no images")
    bad = images.labels[(images.labels < 0) | (images.labels >= len(task.classnames))]
    if bad.numel():
        raise DataError(
            f"{path}: label {int(bad[0])} is not a class of the model ({len(task.classnames)} classes)",
            hint="labels are indices into the model's zeroshot.json classnames",
        )
    if int(torch.bincount(images.labels).gt(0).sum()) < 2:
        raise DataError(
            f"{path}: all images have the same label {int(images.labels[0])}",
            hint="clean accuracy and attack success need images of at least two classes",
        )
    return images


def split(images: ImageSet, fractions: tuple[float, float, float], seed: int) -> Splits:
    """Shuffle with ``seed`` and cut into forget / val / test by ``fractions`` (they sum to ≤ 1)."""
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_forget = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    n_test = min(n - n_forget - n_val, int(round(fractions[2] * n)))
    if min(n_forget, n_val, n_test) < 1:
        raise DataError(
            f"{n} images are too few for the forget/val/test split {fractions}",
            hint="provide more clean images (a few hundred at least)",
        )
    return Splits(
        images.subset(order[:n_forget]),
        images.subset(order[n_forget : n_forget + n_val]),
        images.subset(order[n_forget + n_val : n_forget + n_val + n_test]),
    )
