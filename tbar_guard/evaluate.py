"""Clean accuracy (CA) and attack success rate (ASR), batched, without gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tbar_guard.attacks import Trigger
from tbar_guard.data import ImageSet


@dataclass(frozen=True)
class Metrics:
    """``clean_accuracy`` over all images; ``attack_success_rate`` over the triggered images whose
    true class is not the target (``None`` when no trigger was evaluated)."""

    clean_accuracy: float
    attack_success_rate: float | None
    n_clean: int
    n_attack: int

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "n_clean": self.n_clean,
            "n_attack": self.n_attack,
        }


@torch.no_grad()
def predict(
    clf: nn.Module,
    images: ImageSet | torch.Tensor,
    trigger: Trigger | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Predicted class per image (optionally stamped with ``trigger``), on the classifier's device."""
    device = next(clf.parameters()).device
    x = images.images if isinstance(images, ImageSet) else images
    gen = torch.Generator().manual_seed(seed)
    was_training = clf.training
    clf.eval()
    preds = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        pixels = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        if trigger is not None:
            pixels = trigger.apply(pixels, generator=gen)
        preds.append(clf(pixels.to(device)).argmax(dim=1).cpu())
    clf.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def evaluate(
    clf: nn.Module,
    images: ImageSet,
    trigger: Trigger | None = None,
    target: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> Metrics:
    """CA on ``images``; ASR of ``trigger`` toward ``target`` on the non-target images."""
    clean = predict(clf, images, None, batch_size)
    ca = float((clean == images.labels).float().mean()) if len(images) else 0.0
    if trigger is None or target is None:
        return Metrics(ca, None, len(images), 0)
    keep = images.labels != target
    attacked = images.subset(keep)
    if len(attacked) == 0:
        return Metrics(ca, None, len(images), 0)
    hits = predict(clf, attacked, trigger, batch_size, seed) == target
    return Metrics(ca, float(hits.float().mean()), len(images), len(attacked))
