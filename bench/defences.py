"""Baseline defences the benchmark runs beside TBAR, on the same victims and the same splits.

Each takes the victim's classifier and the defender's clean data and returns the defended image
tower plus the data and time it used. TBAR itself (known trigger and agnostic) runs through the
product's own code paths (``tbar_guard.pipeline.sanitize`` and ``tbar_guard.gate.gate``).

- clean fine-tuning: cross-entropy through the frozen zero-shot head on N clean labelled images;
- gradient ascent: *maximise* the cross-entropy of the forget set (triggered images → target),
  stopping at the step the policy rule prefers on the validation split (never the test split);
- CleanCLIP-style: the cross-modal term with de-duplicated template captions (= cross-entropy
  through the frozen head) plus the in-modal self-supervised term (NT-Xent between two augmented
  views of each image, AutoAugment + shifts), on clean images (algorithms.md §6.1). Only the image
  tower is tuned so the zero-shot head, and therefore the task, stays fixed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from tbar_guard.attacks import Trigger
from tbar_guard.clip import ZeroShotClassifier, visual_state
from tbar_guard.data import ImageSet, Splits
from tbar_guard.evaluate import evaluate
from tbar_guard.sanitize import build_forget_set
from tbar_guard.train import FinetuneConfig, finetune_visual, lr_at


@dataclass(frozen=True)
class Defended:
    visual: dict[str, torch.Tensor]
    data_used: int  # images the defence trained on
    seconds: float
    note: str


def clean_finetune(clf: ZeroShotClassifier, pool: ImageSet, n: int, epochs: int, lr: float, seed: int) -> Defended:
    theta_b = visual_state(clf)
    n = min(n, len(pool))
    chosen = pool.subset(torch.arange(n))
    t0 = time.perf_counter()
    finetune_visual(clf, chosen.pixels(), chosen.labels, FinetuneConfig(lr=lr, epochs=epochs, batch_size=64, seed=seed))
    out = visual_state(clf)
    clf.visual.load_state_dict(theta_b)
    return Defended(out, n, time.perf_counter() - t0, f"{n} clean images, lr {lr:g}, {epochs} epochs")


def gradient_ascent(
    clf: ZeroShotClassifier,
    splits: Splits,
    trigger: Trigger,
    target: int,
    forget_size: int,
    lr: float,
    max_steps: int,
    eval_every: int,
    ca_floor: float,
    seed: int,
) -> Defended:
    """Ascend the forget-set loss; keep the checkpoint with the lowest validation ASR whose
    validation CA stays ≥ ``ca_floor`` × the victim's (the same rule the policy applies to α)."""
    theta_b = visual_state(clf)
    pixels, labels, _ = build_forget_set(splits.forget, trigger, target, forget_size, seed)
    v0 = evaluate(clf, splits.val, trigger, target, seed=seed)
    best = (v0.attack_success_rate or 0.0, 0, theta_b)
    params = [p for p in clf.visual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    clf.eval()
    n = pixels.shape[0]
    step = 0
    while step < max_steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            loss = -F.cross_entropy(clf(pixels[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % eval_every == 0:
                m = evaluate(clf, splits.val, trigger, target, seed=seed)
                asr = m.attack_success_rate or 0.0
                if m.clean_accuracy >= ca_floor * v0.clean_accuracy and asr < best[0]:
                    best = (asr, step, visual_state(clf))
                if m.clean_accuracy < 0.5 * v0.clean_accuracy:  # collapsed; further ascent only destroys
                    step = max_steps
            if step >= max_steps:
                break
    opt.zero_grad(set_to_none=True)
    clf.visual.load_state_dict(theta_b)
    return Defended(best[2], n, time.perf_counter() - t0, f"{n} forget images, lr {lr:g}, stopped at step {best[1]}")


def _nt_xent(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views (row i of ``a`` matches row i of ``b``)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def cleanclip(
    clf: ZeroShotClassifier,
    pool: ImageSet,
    n: int,
    epochs: int,
    lr: float,
    inmodal_weight: float,
    seed: int,
) -> Defended:
    theta_b = visual_state(clf)
    n = min(n, len(pool))
    chosen = pool.subset(torch.arange(n))
    torch.manual_seed(seed)
    augment = v2.Compose(
        [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.RandomCrop(chosen.images.shape[-1], padding=2)]
    )
    params = [p for p in clf.visual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / 64)
    total = per_epoch * epochs
    warmup = max(1, int(0.05 * total))
    t0 = time.perf_counter()
    clf.eval()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            raw = chosen.images[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            x = raw.float() / 255.0
            x1 = torch.stack([augment(img) for img in raw]).float() / 255.0
            x2 = torch.stack([augment(img) for img in raw]).float() / 255.0
            cross = F.cross_entropy(clf(x), chosen.labels[idx])
            inmodal = _nt_xent(clf.embed(x1), clf.embed(x2), clf.logit_scale)
            loss = cross + inmodal_weight * inmodal
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
    opt.zero_grad(set_to_none=True)
    out = visual_state(clf)
    clf.visual.load_state_dict(theta_b)
    return Defended(out, n, time.perf_counter() - t0, f"{n} clean image-caption pairs, lr {lr:g}, {epochs} epochs")
