"""Evidence pictures for an inverted trigger: mask, pattern, trigger, clean vs stamped examples.

One function per picture; each writes a PNG atomically (a temporary file in the target folder,
then ``os.replace``) and returns the path. Matplotlib is used through its Agg canvas only, so no
global backend is switched and no display is needed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tbar_guard.errors import UsageError

_CELL_INCHES = (1.6, 1.8)  # width, height of one example in the grid
_DPI = 100
_LABEL_CHARS = 18


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _to_uint8(values: torch.Tensor, what: str) -> np.ndarray:
    v = values.detach().float().cpu()
    if not bool(torch.isfinite(v).all()):
        raise UsageError(f"the {what} holds non-finite values", hint="pass the inversion's mask and pattern")
    return np.asarray((v.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def _check_scale(scale: int) -> None:
    if scale < 1:
        raise UsageError(f"picture scale {scale} is invalid", hint="use an integer >= 1")


def _save_pil(array: np.ndarray, mode: str, path: Path, scale: int) -> Path:
    _check_scale(scale)
    img = Image.fromarray(array, mode=mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return _atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _mask_2d(mask: torch.Tensor) -> torch.Tensor:
    m = mask.squeeze(0) if mask.ndim == 3 and mask.shape[0] == 1 else mask
    if m.ndim != 2:
        raise UsageError(f"mask of shape {tuple(mask.shape)} is not 2-D", hint="pass the inversion's [H, W] mask")
    return m


def _pattern_3d(pattern: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
    if pattern.ndim != 3 or pattern.shape[0] != 3 or (size is not None and tuple(pattern.shape[1:]) != size):
        want = f"[3, {size[0]}, {size[1]}]" if size else "[3, H, W]"
        raise UsageError(f"pattern of shape {tuple(pattern.shape)} is not {want}", hint="pass the inversion's pattern")
    return pattern


def save_mask_png(mask: torch.Tensor, path: Path, scale: int = 8) -> Path:
    """The mask [H, W] in [0,1] as grayscale (white = stamped), upscaled ``scale``× with nearest."""
    return _save_pil(_to_uint8(_mask_2d(mask), "mask"), "L", path, scale)


def save_pattern_png(pattern: torch.Tensor, path: Path, scale: int = 8) -> Path:
    """The pattern [3, H, W] in [0,1] as RGB, upscaled ``scale``× with nearest."""
    rgb = _to_uint8(_pattern_3d(pattern).permute(1, 2, 0), "pattern")
    return _save_pil(np.ascontiguousarray(rgb), "RGB", path, scale)


def save_trigger_png(mask: torch.Tensor, pattern: torch.Tensor, path: Path, scale: int = 8) -> Path:
    """What the trigger adds: ``mask · pattern`` as RGB (black where the mask is 0)."""
    m = _mask_2d(mask)
    p = _pattern_3d(pattern, tuple(m.shape))
    rgb = _to_uint8((m.float().cpu() * p.float().cpu()).permute(1, 2, 0), "trigger")
    return _save_pil(np.ascontiguousarray(rgb), "RGB", path, scale)


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


def _check_labels(labels: Sequence[str] | None, k: int, which: str) -> None:
    if labels is not None and len(labels) < k:
        raise UsageError(f"{len(labels)} {which} labels for {k} examples", hint="give one label per example shown")


def save_examples_grid(
    clean: torch.Tensor,
    stamped: torch.Tensor,
    path: Path,
    labels_clean: Sequence[str] | None = None,
    labels_stamped: Sequence[str] | None = None,
    n: int = 8,
) -> Path:
    """Two rows, clean above stamped, of the first ``min(n, N)`` images [N,3,H,W] in [0,1].

    Titles are the given labels (e.g. predicted class names). The PNG is ``160·k × 360`` pixels
    for ``k`` examples.
    """
    if clean.ndim != 4 or clean.shape[1] != 3 or clean.shape != stamped.shape:
        raise UsageError(
            f"clean {tuple(clean.shape)} and stamped {tuple(stamped.shape)} images do not match",
            hint="pass two [N, 3, H, W] batches of the same images, un-stamped and stamped",
        )
    k = min(n, int(clean.shape[0]))
    if k < 1:
        raise UsageError(f"no examples to draw (n={n}, {clean.shape[0]} images)", hint="pass at least one image")
    _check_labels(labels_clean, k, "clean")
    _check_labels(labels_stamped, k, "stamped")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_CELL_INCHES[0] * k, _CELL_INCHES[1] * 2), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, k, squeeze=False)
    rows = ((clean, labels_clean, "clean"), (stamped, labels_stamped, "stamped"))
    for r, (batch, labels, name) in enumerate(rows):
        pixels = _to_uint8(batch[:k].permute(0, 2, 3, 1), f"{name} images")
        for i in range(k):
            ax = axes[r][i]
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if labels is not None:
                ax.set_title(_short(str(labels[i])), fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.02, top=0.9, wspace=0.1, hspace=0.3)
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
