"""Small real models for the demo, the tests and the benchmark: a tiny CLIP trained here on the
MNIST subset that ships with the package, and backdoored fine-tunes of it.

Backdoors are planted the way the threat model says they arrive: the image tower is fine-tuned
through the frozen zero-shot head (the task-arithmetic recipe) on data of which a share is
stamped with the trigger and relabelled to the target.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np
import torch

from tbar_guard.attacks import Trigger
from tbar_guard.bundle import ClipBundle, Preprocess, ZeroShotTask, build_model, sha256_state
from tbar_guard.clip import ZeroShotClassifier, classifier_for, visual_state
from tbar_guard.data import ImageSet
from tbar_guard.train import FinetuneConfig, Progress, finetune_visual, pretrain_clip

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TASK = ZeroShotTask(
    tuple(f"the digit {d}" for d in DIGITS),
    ("a photo of {}.", "a drawing of {}.", "a handwritten image of {}."),
)
DEMO_PREPROCESS = Preprocess(28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def tiny_config(width: int = 64, layers: int = 2, image_size: int = 28, patch_size: int = 7) -> dict[str, Any]:
    """A ViT CLIP small enough to train on 2 CPU cores in seconds."""
    return {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": 32,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }


def demo_images(split: str) -> ImageSet:
    """The shipped MNIST subset (``train``: 10,000 images, ``test``: 2,000), as RGB uint8 28×28."""
    with (
        resources.files("tbar_guard").joinpath("data/mnist_demo.npz").open("rb") as handle,
        np.load(handle, allow_pickle=False) as data,
    ):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
    images = torch.from_numpy(np.repeat(x[:, None], 3, axis=1).copy())
    return ImageSet(images, torch.from_numpy(y.astype(np.int64)))


def train_foundation(
    images: ImageSet,
    model_cfg: dict[str, Any] | None = None,
    task: ZeroShotTask = DEMO_TASK,
    preprocess: Preprocess = DEMO_PREPROCESS,
    epochs: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> ClipBundle:
    """Train a tiny CLIP (both towers) so its zero-shot head classifies ``task``."""
    cfg = model_cfg or tiny_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    config = FinetuneConfig(lr=1e-3, epochs=epochs, batch_size=128, weight_decay=0.01, warmup_fraction=0.05, seed=seed)
    pretrain_clip(model, task, images.pixels(), images.labels, preprocess.mean, preprocess.std, config, progress)
    for p in model.parameters():
        p.requires_grad_(True)
    return ClipBundle(model, cfg, preprocess, task, sha256_state(model.state_dict()), "zoo:foundation")


def poison(
    images: ImageSet, trigger: Trigger, target: int, rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and labels with ``rate`` of the non-target images stamped and relabelled to ``target``."""
    gen = torch.Generator().manual_seed(seed)
    pixels = images.pixels().clone()
    labels = images.labels.clone()
    candidates = torch.nonzero(labels != target).flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[: int(rate * len(images))]]
    pixels[chosen] = trigger.apply(pixels[chosen], generator=gen)
    labels[chosen] = target
    return pixels, labels


def finetune_victim(
    foundation: ClipBundle,
    images: ImageSet,
    trigger: Trigger | None,
    target: int,
    poison_rate: float = 0.1,
    epochs: int = 5,
    lr: float = 5e-4,
    seed: int = 0,
    progress: Progress | None = None,
) -> ClipBundle:
    """Fine-tune the image tower on ``images`` (poisoned with ``trigger`` unless it is None)."""
    clf: ZeroShotClassifier = classifier_for(foundation)
    if trigger is None:
        pixels, labels = images.pixels(), images.labels
    else:
        pixels, labels = poison(images, trigger, target, poison_rate, seed)
    config = FinetuneConfig(lr=lr, epochs=epochs, batch_size=64, weight_decay=0.0, warmup_fraction=0.1, seed=seed)
    finetune_visual(clf, pixels, labels, config, progress)
    model = build_model(foundation.model_cfg)
    state = foundation.model.state_dict()
    for key, value in visual_state(clf).items():
        state[f"visual.{key}"] = value
    model.load_state_dict(state)
    return ClipBundle(
        model, foundation.model_cfg, foundation.preprocess, foundation.task, sha256_state(state), "zoo:victim"
    )
