"""The model bundle: how tbar-guard stores and loads an open_clip CLIP model without pickle.

A bundle is a directory that open_clip itself can read (``create_model("local-dir:<dir>")``)
plus one file for the zero-shot task::

    open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {"size", "mean", "std"}}
    open_clip_model.safetensors  every tensor of the CLIP model
    zeroshot.json                {"classnames": [...], "templates": ["a photo of a {}.", ...]}

Loading builds the model from the config with open_clip (nothing is downloaded) and loads the
weights from safetensors after checking names, shapes, dtypes and finiteness. A legacy
checkpoint (``.pt``/``.pth``/``.bin``) is only ever read with ``torch.load(weights_only=True)``,
which refuses arbitrary Python objects, so a pickle payload is never executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tbar_guard.errors import ModelFormatError, OutputError, UsageError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
TASK_FILE = "zeroshot.json"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, TASK_FILE)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Preprocess:
    """Pixel preprocessing: images are ``image_size`` square, normalised with ``mean``/``std``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_cfg(self) -> dict[str, Any]:
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ZeroShotTask:
    """The zero-shot classification task of a model: class names × prompt templates."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def index_of(self, name: str) -> int:
        """Class index of ``name`` (a class name or a decimal index)."""
        if name in self.classnames:
            return self.classnames.index(name)
        if name.isdigit() and int(name) < len(self.classnames):
            return int(name)
        shown = ", ".join(repr(c) for c in self.classnames[:12])
        more = " ..." if len(self.classnames) > 12 else ""
        raise UsageError(
            f"target class {name!r} is not one of the model's {len(self.classnames)} classes",
            hint=f"use a class name or index from: {shown}{more}",
        )

    def to_json(self) -> dict[str, Any]:
        return {"classnames": list(self.classnames), "templates": list(self.templates)}


@dataclass(frozen=True)
class ClipBundle:
    """A loaded CLIP model with everything needed to classify zero-shot.

    ``model`` is a live ``torch.nn.Module``; the dataclass is frozen so the *binding* cannot change,
    stages that modify weights work on copies of the state dict.
    """

    model: torch.nn.Module
    model_cfg: Mapping[str, Any]
    preprocess: Preprocess
    task: ZeroShotTask
    weights_sha256: str
    source: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes (stable across file formats)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(
            f"{path} is missing",
            hint=f"a tbar-guard bundle holds {', '.join(BUNDLE_FILES)}",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}", hint="re-export the bundle") from None


def parse_task(raw: Any, where: str) -> ZeroShotTask:
    if not isinstance(raw, dict) or not isinstance(raw.get("classnames"), list) or not raw["classnames"]:
        raise ModelFormatError(
            f"{where}: expected an object with a non-empty 'classnames' list",
            hint='write {"classnames": ["cat", "dog"], "templates": ["a photo of a {}."]}',
        )
    classnames = tuple(str(c) for c in raw["classnames"])
    templates = tuple(str(t) for t in raw.get("templates") or DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ModelFormatError(f"{where}: template {bad[0]!r} has no '{{}}' placeholder")
    if len(set(classnames)) != len(classnames):
        raise ModelFormatError(f"{where}: class names are not unique")
    return ZeroShotTask(classnames, templates)


def _check_model_cfg(model_cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ModelFormatError(
            f"{where}: 'model_cfg' must hold embed_dim, vision_cfg and text_cfg",
            hint="use an open_clip model config (open_clip/model_configs/*.json)",
        )
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if any(k in text_cfg for k in ("hf_model_name", "hf_tokenizer_name")):
        raise ModelFormatError(
            f"{where}: Hugging Face text towers need a hub download",
            hint="tbar-guard runs offline; use an open_clip built-in text tower",
        )
    if vision_cfg.get("timm_model_pretrained") or vision_cfg.get("timm_model_name"):
        raise ModelFormatError(f"{where}: timm vision towers are not supported", hint="use a ViT or ResNet tower")
    if not isinstance(vision_cfg.get("image_size"), int):
        raise ModelFormatError(
            f"{where}: vision_cfg.image_size must be one integer, got {vision_cfg.get('image_size')!r}",
            hint="tbar-guard needs square images of a known size",
        )
    return dict(model_cfg)


def build_model(model_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """Build an untrained open_clip CLIP from a config dict (no download, no weights)."""
    import open_clip

    cfg = json.loads(json.dumps(dict(model_cfg)))  # deep copy: open_clip mutates its config
    model: torch.nn.Module = open_clip.model.CLIP(**cfg)
    model.eval()
    return model


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Validate ``state`` against ``model``: same keys, shapes, float dtypes, finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelFormatError(
            f"{where}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
            hint="the weights do not belong to this architecture/config",
        )
    if unexpected:
        raise ModelFormatError(
            f"{where}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""),
            hint="the weights do not belong to this architecture/config",
        )
    out: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise ModelFormatError(f"{where}: entry {key!r} is not a tensor", hint="re-export the weights")
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ModelFormatError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the config needs {tuple(ref.shape)}",
                hint="the weights do not match open_clip_config.json",
            )
        if ref.is_floating_point() != tensor.is_floating_point():
            raise ModelFormatError(
                f"{where}: tensor {key!r} has dtype {tensor.dtype}, expected {ref.dtype}",
                hint="re-export the weights with their original dtypes",
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(
                f"{where}: tensor {key!r} contains NaN or Inf values",
                hint="the checkpoint is corrupt or diverged; do not deploy it",
            )
        out[key] = tensor.to(ref.dtype) if tensor.is_floating_point() else tensor
    return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing", hint="point --model at a bundle or a weights file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(
            f"{path} is not a readable safetensors file: {exc}",
            hint="the file is truncated, corrupt or in another format",
        ) from None


def read_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.bin`` checkpoint with ``weights_only=True``: tensors only, never code."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing", hint="point --model at a bundle or a weights file") from None
    except Exception as exc:  # UnpicklingError and friends: the file wants to build arbitrary objects
        raise ModelFormatError(
            f"refused to load {path}: it needs unpickling of objects other than tensors ({type(exc).__name__})",
            hint="convert the weights to safetensors (open_clip_model.safetensors) in a trusted environment",
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelFormatError(f"{path} does not hold a flat dict of tensors", hint="save model.state_dict()")
    return {str(k).removeprefix("module."): v for k, v in raw.items()}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return read_torch_weights(path)
    if suffix in PICKLE_SUFFIXES:
        raise ModelFormatError(
            f"refused to load {path}: pickle files can run arbitrary code when opened",
            hint="convert the weights to safetensors in a trusted environment",
        )
    raise ModelFormatError(f"unknown weights format {path.suffix!r} for {path}", hint="use .safetensors")


def _preprocess_from(model_cfg: Mapping[str, Any], raw: Mapping[str, Any] | None) -> Preprocess:
    raw = raw or {}
    size = raw.get("size", model_cfg["vision_cfg"]["image_size"])
    if isinstance(size, (list, tuple)):
        size = size[0]
    mean = tuple(float(v) for v in raw.get("mean", OPENAI_MEAN))
    std = tuple(float(v) for v in raw.get("std", OPENAI_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelFormatError(f"preprocess_cfg mean/std must be 3 numbers (std > 0), got {mean} / {std}")
    if int(size) != int(model_cfg["vision_cfg"]["image_size"]):
        raise ModelFormatError(
            f"preprocess_cfg size {size} differs from vision_cfg.image_size {model_cfg['vision_cfg']['image_size']}"
        )
    return Preprocess(int(size), (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


def load_bundle(path: Path) -> ClipBundle:
    """Load a bundle directory. Every failure is a :class:`ModelFormatError` naming the bad item."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"model path {path} does not exist", hint="pass a bundle directory")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            read_weights(path)  # raises the pickle refusal without opening the file
        if path.suffix.lower() in (*TORCH_SUFFIXES, ".safetensors"):
            raise ModelFormatError(
                f"{path} is a bare weights file",
                hint="pass --arch NAME --classes FILE with it, or a bundle directory",
            )
        raise ModelFormatError(f"{path} is not a model bundle directory", hint="pass a bundle directory")
    for stray in sorted(path.iterdir()):
        if stray.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFormatError(
                f"refused: the bundle holds a pickle file {stray.name}",
                hint="a bundle holds only JSON and safetensors; remove the file",
            )
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path / CONFIG_FILE}: expected a JSON object")
    model_cfg = _check_model_cfg(config.get("model_cfg"), str(path / CONFIG_FILE))
    preprocess = _preprocess_from(model_cfg, config.get("preprocess_cfg"))
    task = parse_task(_read_json(path / TASK_FILE), str(path / TASK_FILE))
    weights_path = path / WEIGHTS_FILE
    state = read_safetensors(weights_path)
    model = build_model(model_cfg)
    checked = check_state_dict(model, state, str(weights_path))
    model.load_state_dict(checked, strict=True)
    return ClipBundle(model, model_cfg, preprocess, task, sha256_file(weights_path), str(path))


def load_checkpoint(arch: str, weights: Path, task: ZeroShotTask) -> ClipBundle:
    """Load an open_clip built-in architecture with weights from a local file (no download)."""
    import open_clip

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise UsageError(
            f"unknown open_clip architecture {arch!r}",
            hint="see open_clip.list_models() for names, or use a bundle directory",
        )
    model_cfg = _check_model_cfg(model_cfg, f"architecture {arch}")
    state = read_weights(Path(weights))
    model = build_model(model_cfg)
    checked = check_state_dict(model, state, str(weights))
    model.load_state_dict(checked, strict=True)
    preprocess = _preprocess_from(model_cfg, None)
    return ClipBundle(model, model_cfg, preprocess, task, sha256_file(Path(weights)), f"{arch}:{weights}")


def require_new_output(out: Path) -> Path:
    """``out`` itself, if nothing exists there yet (outputs are never overwritten)."""
    if out.exists():
        raise UsageError(f"output {out} already exists", hint="choose a new --out or remove it first")
    return out


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed, so a
    half-written output never appears under ``out``; a failed write (disk full, file too large,
    out of memory) becomes an :class:`OutputError`.
    """
    out = require_new_output(Path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | SafetensorError | MemoryError):  # ENOSPC, EFBIG, ENOMEM ...
            raise OutputError(
                f"writing the outputs failed: {exc}",
                hint=f"nothing was left at {out}; free disk space or memory and run again",
            ) from None
        raise


def write_bundle_files(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    preprocess: Preprocess,
    task: ZeroShotTask,
) -> str:
    """Write the three bundle files into an existing ``directory``; returns the weights sha256."""
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": preprocess.to_cfg()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / TASK_FILE).write_text(json.dumps(task.to_json(), indent=2), encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(
        tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"}
    )  # one key: safetensors orders several keys at random
    return sha256_file(directory / WEIGHTS_FILE)


def save_bundle(
    out: Path,
    state: Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    preprocess: Preprocess,
    task: ZeroShotTask,
) -> str:
    """Write a bundle atomically to ``out`` (which must not exist); returns the weights sha256."""
    with atomic_directory(out) as tmp:
        digest = write_bundle_files(tmp, state, model_cfg, preprocess, task)
    return digest


def save_model(out: Path, bundle: ClipBundle) -> str:
    return save_bundle(out, bundle.model.state_dict(), bundle.model_cfg, bundle.preprocess, bundle.task)
