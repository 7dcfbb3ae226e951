"""Fine-tuning loops.

``finetune_visual``: the task-arithmetic recipe — cross-entropy through the frozen zero-shot head,
image tower only, AdamW, linear warmup then cosine, grad-norm clip. The model stays in eval mode,
so BatchNorm statistics are frozen and the update lives in the parameters.

``pretrain_clip``: trains both towers of a small CLIP from scratch so that the text tower names
the classes (used by the demo and the tests to make a usable zero-shot model on this CPU). With
only a few distinct captions, plain CLIP loss treats identical captions as negatives; instead each
image is classified against the embeddings of all class prompts (equivalent to the CLIP loss with
de-duplicated captions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tbar_guard.bundle import ZeroShotTask
from tbar_guard.clip import tokenizer_for
from tbar_guard.errors import RemovalError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 1e-4
    epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    temperature: float = 1.0  # logits are divided by this in the cross-entropy (soft, non-saturating)
    anchor_weight: float = 0.0  # weight of KL(victim's clean predictions || current) on the anchor images


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 2 px (pad + crop): cheap augmentation for tiny images."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (2, 2, 2, 2), mode="replicate")
    dy = torch.randint(0, 5, (n,), generator=gen)
    dx = torch.randint(0, 5, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def finetune_visual(
    clf: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    progress: Progress | None = None,
    anchor: torch.Tensor | None = None,
) -> int:
    """Fine-tune ``clf.visual`` in place on (pixels [N,3,H,W] in [0,1], labels). Returns steps run.

    With ``anchor`` (clean pixels paired one-to-one with ``pixels``) and ``config.anchor_weight``
    > 0, each step also pulls the model's predictions on the anchor images toward the predictions
    the model made on them *before* fine-tuning (KL divergence). The update then changes how the
    model treats the stamped images while holding its clean behaviour in place.
    """
    visual: nn.Module = clf.visual  # type: ignore[assignment]
    params = [p for p in visual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    device = next(clf.parameters()).device
    n = pixels.shape[0]
    per_epoch = max(1, math.ceil(n / config.batch_size))
    total = per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total)
    gen = torch.Generator().manual_seed(config.seed)
    clf.eval()  # BatchNorm statistics stay frozen; open_clip towers have no dropout by default
    teacher: torch.Tensor | None = None
    if anchor is not None and config.anchor_weight > 0:
        if anchor.shape[0] != n:
            raise ValueError(f"anchor has {anchor.shape[0]} images for {n} training images")
        with torch.no_grad():
            teacher = torch.cat([F.softmax(clf(anchor[i : i + 256].to(device)), dim=1) for i in range(0, n, 256)])
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, config.lr, warmup)
            logits = clf(pixels[idx].to(device))
            loss = F.cross_entropy(logits / config.temperature, labels[idx].to(device))
            if teacher is not None and anchor is not None:
                log_p = F.log_softmax(clf(anchor[idx].to(device)), dim=1)
                loss = loss + config.anchor_weight * F.kl_div(log_p, teacher[idx.to(device)], reduction="batchmean")
            if not torch.isfinite(loss):
                raise RemovalError(
                    f"fine-tuning loss became {loss.item()} at step {step}",
                    hint="lower sanitize.finetune.lr in the policy",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total)
    opt.zero_grad(set_to_none=True)
    return step


def pretrain_clip(
    model: nn.Module,
    task: ZeroShotTask,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    config: FinetuneConfig,
    progress: Progress | None = None,
) -> None:
    """Train both towers of ``model`` so that zero-shot classification over ``task`` works."""
    tokenizer = tokenizer_for(model)
    prompts = [[t.format(c) for t in task.templates] for c in task.classnames]
    tokens = torch.stack([tokenizer(p) for p in prompts])  # type: ignore[operator]  # [C, T, L]
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = pixels.shape[0]
    per_epoch = max(1, math.ceil(n / config.batch_size))
    total = per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    step = 0
    t = tokens.shape[1]
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, config.lr, warmup)
            x = _augment(pixels[idx], gen).to(device)
            img = F.normalize(model.encode_image((x - m) / s), dim=-1)  # type: ignore[operator]
            template = int(torch.randint(0, t, (1,), generator=gen))
            txt = F.normalize(model.encode_text(tokens[:, template]), dim=-1)  # type: ignore[operator]
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()  # type: ignore[operator]
            loss = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total)
    model.eval()
