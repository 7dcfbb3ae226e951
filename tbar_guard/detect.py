"""DECREE-style trigger inversion on a CLIP image tower, the detection rules, and target inference.

The inversion follows GiantSeaweed/DECREE:main.py (algorithms.md §1): a 2-D mask and an RGB pattern
in tanh space, stamped in pixel space, normalised, and pushed through the encoder; the loss asks the
stamped batch's embeddings to collapse (mean off-diagonal cosine) with a small mask (λ·L1 of the
3-channel mask). PL1 is the 2-D mask's area fraction (§1.6); the verdict is either the paper's fixed
threshold or a comparison with clean reference models of the same architecture (§7, §9.1).

Pure functions over tensors and modules: no file I/O, no printing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tbar_guard.errors import DataError, RemovalError, UsageError

EPS = 1e-7  # DECREE utils.epsilon(): keeps arctanh finite at init
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what the official code normalises CLIP inputs with (§1.5)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAMBDA_CAP = 1e5  # λ is only raised while below this
LR_MILESTONES = ((200, 0.2), (500, 0.1))  # (first epoch, lr factor): 0.5 → 0.1 → 0.05 for CLIP (§1.5)
OFFICIAL_SHADOW_IMAGES = 10_000  # ImageNet-val × 0.2 in the official CLIP runs

StopReason = Literal["early_stop", "steps", "epochs", "time"]


@dataclass(frozen=True)
class InversionConfig:
    """DECREE's hyperparameters (algorithms.md §1.4-1.5); the defaults are sized for CI.

    Steps and epochs: one *step* is one batch, as in DECREE, and every λ/early-stop counter counts
    steps. One *epoch* is one pass over the shadow images in a fresh random order (the official
    ``DataLoader(shuffle=True)``; a trailing partial batch is kept, as there, unless it holds a
    single image). The run ends at whichever comes first: ``steps`` steps, ``max_epochs`` epochs,
    ``max_seconds``, or DECREE's end-of-epoch early stop.

    LR schedule: kept in epochs, as in the official ``adjust_learning_rate`` for CLIP: ``lr`` before
    epoch 200, ``0.2·lr`` before epoch 500, then ``0.1·lr`` (0.5 → 0.1 → 0.05 at the official lr).
    It is not rescaled to ``steps``: official CLIP runs early-stop within a few epochs and never
    reach epoch 200, so a CI-sized run keeps the constant lr the official runs actually used.
    """

    steps: int = 300  # max optimisation steps (batches); official(): epoch-bounded
    batch_size: int = 32
    lr: float = 0.5
    betas: tuple[float, float] = (0.5, 0.9)
    init_lambda: float = 1e-3
    lambda_min: float = 1e-7  # official CLIP value; 1e-5 for CIFAR-style encoders
    adaptor: float = 5.0  # λ is multiplied / divided by this
    patience: int = 5  # consecutive (un)successful steps before λ moves; λ resets after 2·patience
    success_threshold: float = 0.99  # τ: a batch succeeds when its mean off-diagonal cosine exceeds it
    early_stop_patience: int = 35  # steps without a smaller successful L1 before the epoch-end stop
    normalization: Literal["model", "imagenet"] = "model"
    max_seconds: float | None = None  # wall-clock budget
    seed: int = 0
    max_epochs: int = 1000  # the official epoch cap

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, object, str]] = [
            (self.steps >= 1, "steps", self.steps, "use at least 1 step"),
            (self.batch_size >= 2, "batch_size", self.batch_size, "the cosine needs at least 2 images a batch"),
            (self.lr > 0, "lr", self.lr, "use a positive learning rate (official: 0.5)"),
            (all(0 <= b < 1 for b in self.betas), "betas", self.betas, "Adam betas lie in [0, 1)"),
            (self.init_lambda > 0, "init_lambda", self.init_lambda, "official: 1e-3"),
            (self.lambda_min > 0, "lambda_min", self.lambda_min, "official CLIP: 1e-7"),
            (self.adaptor > 1, "adaptor", self.adaptor, "official: 5.0"),
            (self.patience >= 1, "patience", self.patience, "official: 5"),
            (0 < self.success_threshold <= 1, "success_threshold", self.success_threshold, "official: 0.99"),
            (self.early_stop_patience >= 0, "early_stop_patience", self.early_stop_patience, "official CLIP: 35"),
            (self.normalization in ("model", "imagenet"), "normalization", self.normalization, "model or imagenet"),
            (self.max_seconds is None or self.max_seconds > 0, "max_seconds", self.max_seconds, "null or > 0"),
            (self.max_epochs >= 1, "max_epochs", self.max_epochs, "official: 1000"),
        ]
        for ok, name, value, hint in checks:
            if not ok:
                raise UsageError(f"inversion setting {name}={value!r} is invalid", hint=hint)

    @classmethod
    def official(cls) -> InversionConfig:
        """The official CLIP run (GiantSeaweed/DECREE run_decree.py + main.py).

        ``steps`` is 1000 epochs of the official 10,000-image shadow set at batch 32, so with any
        shadow set of up to that size the 1000-epoch cap (or the early stop) ends the run.
        Normalisation is ImageNet's, as in the official code even for CLIP (§1.5).
        """
        return cls(
            steps=1000 * math.ceil(OFFICIAL_SHADOW_IMAGES / 32),
            batch_size=32,
            lr=0.5,
            betas=(0.5, 0.9),
            init_lambda=1e-3,
            lambda_min=1e-7,
            adaptor=5.0,
            patience=5,
            success_threshold=0.99,
            early_stop_patience=35,
            normalization="imagenet",
            max_epochs=1000,
        )


@dataclass(frozen=True)
class Inversion:
    mask: torch.Tensor  # [H, W] in [0,1], on CPU: the smallest successful mask, else the last one
    pattern: torch.Tensor  # [3, H, W] in [0,1] pixel space, on CPU
    pl1: float  # Σ mask / (H·W): the area fraction DECREE's separation is measured in (§1.6)
    l1_official: float  # 3·Σ mask: DECREE's logged 3-channel L1
    succeeded: bool  # some batch reached mean off-diagonal cosine > τ
    best_cosine: float  # the highest batch mean off-diagonal cosine seen
    steps: int
    seconds: float
    device: str
    stop_reason: StopReason = "steps"


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``clamp((1 − m)·x + m·p, 0, 1)`` with x [N,3,H,W] in [0,1], m [H,W], p [3,H,W]; differentiable.

    Mask and pattern are moved to the images' device and dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise UsageError(
            f"images of shape {tuple(images.shape)} cannot be stamped", hint="pass float pixels [N, 3, H, W] in [0, 1]"
        )
    size = tuple(images.shape[-2:])
    if tuple(mask.shape) != size or tuple(pattern.shape) != (3, *size):
        raise UsageError(
            f"mask {tuple(mask.shape)} / pattern {tuple(pattern.shape)} do not fit images {tuple(images.shape)}",
            hint=f"the mask must be {list(size)} and the pattern [3, {size[0]}, {size[1]}]",
        )
    m = mask.to(images.device, images.dtype)
    p = pattern.to(images.device, images.dtype)
    return torch.clamp((1 - m) * images + m * p, 0, 1)


def _tanh_param(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # official 'rand' init: arctanh((U[0,1) − 0.5)·(2 − ε)), float64
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.arctanh((u - 0.5) * (2 - EPS)).to(device).requires_grad_(True)


def _from_tanh(raw: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.tanh(raw) / (2 - EPS) + 0.5, 0, 1)


def _mean_offdiag_cosine(z: torch.Tensor) -> torch.Tensor:
    """DECREE ``compute_self_cos_sim``: the mean of the B·(B−1) off-diagonal cosines."""
    z = F.normalize(z.flatten(1), dim=-1)
    sim = z @ z.t()
    b = z.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def _check_images(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(
            f"shadow images have shape {tuple(images.shape)}", hint="pass clean pixels as a [N, 3, H, W] tensor"
        )
    if images.shape[0] < batch_size:
        raise DataError(
            f"only {images.shape[0]} clean images for trigger inversion, the batch size is {batch_size}",
            hint="provide more clean images or lower detect.batch_size",
        )
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    if not x.is_floating_point():
        raise DataError(f"shadow images have dtype {images.dtype}", hint="pass float pixels in [0, 1] or uint8")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise DataError(
            f"shadow pixel values span [{lo:.3g}, {hi:.3g}]",
            hint="pass un-normalised pixels in [0, 1]; the inversion applies the model's normalisation itself",
        )
    return x.detach()


def _norm_constants(
    mean: Sequence[float], std: Sequence[float], which: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sigma = (IMAGENET_MEAN, IMAGENET_STD) if which == "imagenet" else (tuple(mean), tuple(std))
    if len(mu) != 3 or len(sigma) != 3 or min(sigma) <= 0:
        raise UsageError(f"normalisation mean {mu} / std {sigma} is invalid", hint="three means and three stds > 0")
    as_t = {"dtype": torch.float64, "device": device}
    return torch.tensor(mu, **as_t).view(1, 3, 1, 1), torch.tensor(sigma, **as_t).view(1, 3, 1, 1)  # type: ignore[arg-type]


def _resolve(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(dev)!r} requested but CUDA is not available", hint="use device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _model_dtype(visual: nn.Module, device: torch.device) -> torch.dtype:
    param = next((p for p in visual.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.float32
    if param.device != device:
        raise UsageError(
            f"the image tower is on {param.device}, the inversion was asked to run on {device}",
            hint=f"move the model first (model.to({str(device)!r})) or pass device={str(param.device)!r}",
        )
    return param.dtype


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients inside; every flag restored afterwards."""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if idx.numel() >= 2:  # a 1-image batch has no off-diagonal cosine
            yield idx


class _Lambda:
    """DECREE's λ schedule (§1.4); ``update`` is called once per step with that batch's success."""

    def __init__(self, cfg: InversionConfig) -> None:
        self.cfg = cfg
        self.value = cfg.init_lambda
        self.up = self.down = self.set_cnt = 0

    def update(self, success: bool) -> None:
        c = self.cfg
        if self.value < c.lambda_min and success:
            self.set_cnt += 1
            if self.set_cnt > 2 * c.patience:  # stuck below λ_min while succeeding: start over
                self.value = c.init_lambda
                self.up = self.down = 0
        else:
            self.set_cnt = 0
        self.up, self.down = (self.up + 1, 0) if success else (0, self.down + 1)
        if self.up > c.patience:
            if self.value < LAMBDA_CAP:
                self.value *= c.adaptor
            self.up = 0
        elif self.down > c.patience:
            if self.value >= c.lambda_min:
                self.value /= c.adaptor
            self.down = 0


class _Best:
    """The smallest successful mask and DECREE's early-stop counter (§1.4)."""

    def __init__(self) -> None:
        self.l1 = math.inf
        self.es_best = math.inf
        self.es_cnt = 0
        self.mask: torch.Tensor | None = None
        self.pattern: torch.Tensor | None = None

    def update(self, success: bool, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        if success and l1 < self.l1:
            self.l1, self.mask, self.pattern = l1, mask.detach().clone(), pattern.detach().clone()
        if self.mask is not None:
            self.es_cnt = self.es_cnt + 1 if self.l1 >= self.es_best else 0
        self.es_best = min(self.l1, self.es_best)


def lr_factor(epoch: int) -> float:
    """DECREE's CLIP LR schedule as a factor of the base lr: 1 before epoch 200, 0.2 before 500, then 0.1."""
    return min((factor for first, factor in LR_MILESTONES if epoch >= first), default=1.0)


def _loss_step(
    visual: nn.Module,
    x: torch.Tensor,
    raw: tuple[torch.Tensor, torch.Tensor],
    norm: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One forward/backward of DECREE's loss; returns the batch's (mask, pattern, cosine, 3-ch L1)."""
    m, p = _from_tanh(raw[0]), _from_tanh(raw[1])
    bd = (stamp(x, m, p) - norm[0]) / norm[1]  # pixel-space stamp, then the model's normalisation
    out = visual(bd.to(dtype))
    cos = _mean_offdiag_cosine(out[0] if isinstance(out, tuple) else out)  # (pooled, tokens) towers
    l1 = 3 * m.sum()  # the 3-channel L1 of the broadcast mask
    loss = -cos + lam * l1
    loss_v, cos_v, l1_v = torch.stack([loss.detach(), cos.detach().double(), l1.detach()]).tolist()
    if not (math.isfinite(loss_v) and math.isfinite(cos_v)):
        raise RemovalError(
            f"trigger inversion loss became {loss_v} (batch cosine {cos_v}, lambda {lam:.3g})",
            hint="the image tower returned non-finite embeddings; check the model weights and dtype",
        )
    loss.backward()  # type: ignore[no-untyped-call]
    return m.detach(), p.detach(), cos_v, l1_v


def invert_trigger(
    visual: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    config: InversionConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Inversion:
    """Invert a trigger that collapses ``visual``'s embeddings of stamped clean images (DECREE).

    Args:
        visual: maps normalised images [N,3,H,W] to embeddings (open_clip ``model.visual``); must
            already be on ``device``. Its weights and train/eval flags are left as they were.
        images: clean shadow pixels [N,3,H,W] in [0,1] (or uint8), N >= ``config.batch_size``.
        mean, std: the model's normalisation (ignored when ``config.normalization == "imagenet"``).
        progress: called as ``progress(step, total)`` after every step.

    Raises:
        DataError: too few or malformed images. UsageError: bad device or normalisation.
        RemovalError: a non-finite loss (a diverged run never ends as "clean").
    """
    dev = _resolve(device)
    x_all = _check_images(images, config.batch_size)
    dtype = _model_dtype(visual, dev)
    norm = _norm_constants(mean, std, config.normalization, dev)
    n, _, h, w = x_all.shape
    gen = torch.Generator().manual_seed(config.seed)
    raw = (_tanh_param((h, w), gen, dev), _tanh_param((3, h, w), gen, dev))
    opt = torch.optim.Adam(list(raw), lr=config.lr, betas=config.betas)
    lam, best = _Lambda(config), _Best()
    per_epoch = sum(1 for start in range(0, n, config.batch_size) if n - start >= 2)
    total = min(config.steps, config.max_epochs * per_epoch)
    step, best_cos = 0, -math.inf
    reason: StopReason = "epochs"
    m = p = torch.empty(0)
    t0 = time.perf_counter()
    with _frozen(visual):
        for epoch in range(config.max_epochs):
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(epoch)
            epoch_cos: list[float] = []
            for idx in _batches(n, config.batch_size, gen):
                x = x_all[idx.to(x_all.device)].to(dev, torch.float64)
                opt.zero_grad(set_to_none=True)
                m, p, cos_v, l1_v = _loss_step(visual, x, raw, norm, dtype, lam.value)
                opt.step()
                success = abs(cos_v) > config.success_threshold
                best.update(success, l1_v, m, p)
                lam.update(success)
                epoch_cos.append(cos_v)
                best_cos = max(best_cos, cos_v)
                step += 1
                if progress is not None:
                    progress(step, total)
                if step >= config.steps or (
                    config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds
                ):
                    reason = "steps" if step >= config.steps else "time"
                    break
            else:  # DECREE's end-of-epoch stop: epoch-mean cosine > τ and no L1 progress for a while
                if abs(sum(epoch_cos) / len(epoch_cos)) > config.success_threshold and (
                    best.es_cnt > config.early_stop_patience
                ):
                    reason = "early_stop"
                    break
                continue
            break
    mask = best.mask if best.mask is not None else m
    pattern = best.pattern if best.pattern is not None else p
    area = float(mask.sum())
    return Inversion(
        mask=mask.float().cpu(),
        pattern=pattern.float().cpu(),
        pl1=area / (h * w),
        l1_official=3 * area,
        succeeded=best.mask is not None,
        best_cosine=best_cos,
        steps=step,
        seconds=time.perf_counter() - t0,
        device=str(dev),
        stop_reason=reason,
    )


@dataclass(frozen=True)
class TargetInference:
    target: int  # class index: the mode of the predictions on stamped images
    proxy_asr: float  # share of stamped held-out images predicted as target
    base_rate: float  # share of un-stamped images predicted as target
    top3: tuple[tuple[int, float], ...]  # (class, share of stamped images), most frequent first
    actionable: bool  # proxy_asr ≥ min_proxy_asr and proxy_asr − base_rate ≥ min_lift
    reason: str


@torch.no_grad()
def _predict(classify: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    logits = classify(pixels)
    if logits.ndim != 2 or logits.shape[0] != pixels.shape[0]:
        raise UsageError(
            f"the classifier returned shape {tuple(logits.shape)} for {pixels.shape[0]} images",
            hint="classify must map pixels [N,3,H,W] to logits [N, classes]",
        )
    if not bool(torch.isfinite(logits).all()):
        raise RemovalError("the classifier returned non-finite logits", hint="check the model weights and dtype")
    return logits.argmax(dim=1).cpu()


def infer_target(
    classify: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    min_proxy_asr: float = 0.5,
    min_lift: float = 0.3,
    batch_size: int = 256,
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TargetInference:
    """The target class of an inverted trigger (algorithms.md §2.5): the mode of the predictions
    on stamped held-out images, with its share (proxy ASR) against its share on the same images
    un-stamped (a natural majority class is not a backdoor target).

    ``classify`` maps pixels [N,3,H,W] in [0,1] to logits [N,C] and normalises internally.
    ``apply``: stamps a batch with a trigger that is not a mask + pattern (e.g. an additive one);
    ``mask``/``pattern`` are then unused.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(
            f"target inference got images of shape {tuple(images.shape)}", hint="pass held-out clean pixels [N,3,H,W]"
        )
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is invalid", hint="use a positive batch size")
    clean, stamped = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch
        clean.append(_predict(classify, x))
        stamped.append(_predict(classify, apply(x) if apply is not None else stamp(x, mask, pattern)))
    pred_clean, pred_stamped = torch.cat(clean), torch.cat(stamped)
    counts = torch.bincount(pred_stamped, minlength=int(max(pred_stamped.max(), pred_clean.max())) + 1)
    n = pred_stamped.numel()
    order = sorted(range(counts.numel()), key=lambda c: (-int(counts[c]), c))
    target = order[0]
    proxy = int(counts[target]) / n
    base = int((pred_clean == target).sum()) / n
    top3 = tuple((c, int(counts[c]) / n) for c in order[:3] if int(counts[c]) > 0)
    actionable = proxy >= min_proxy_asr and proxy - base >= min_lift
    return TargetInference(
        target, proxy, base, top3, actionable, _target_reason(target, proxy, base, min_proxy_asr, min_lift)
    )


def _target_reason(target: int, proxy: float, base: float, min_proxy: float, min_lift: float) -> str:
    said = f"the inverted trigger sends {proxy:.1%} of stamped images to class {target} ({base:.1%} without it)"
    missing = []
    if proxy < min_proxy:
        missing.append(f"proxy ASR {proxy:.1%} < {min_proxy:.0%}")
    if proxy - base < min_lift:
        missing.append(f"lift {proxy - base:.1%} over the clean rate < {min_lift:.0%}")
    if missing:
        return f"not actionable: {said}; " + " and ".join(missing)
    return f"actionable: {said}; proxy ASR >= {min_proxy:.0%} and lift >= {min_lift:.0%}"


@dataclass(frozen=True)
class DetectionDecision:
    flagged: bool
    rule: Literal["paper", "calibrated"]
    pl1: float
    threshold: float  # the number PL1 was compared against
    reference_pl1: tuple[float, ...]  # references used (empty for the paper rule)
    explanation: str
    z_score: float | None = None  # robust z of PL1 among the references (3+ references, MAD > 0)


def _num(x: float) -> str:
    return f"{x:.3f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def _check_pl1(value: float, what: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{what} {value!r} is not a PL1 value", hint="PL1 is an area fraction in [0, 1]")


def decide_paper(pl1: float, threshold: float = 0.1) -> DetectionDecision:
    """DECREE's fixed rule: PL1 < threshold ⇒ trojaned (§1.6). Known to flag many clean ViTs (§7.2)."""
    _check_pl1(pl1, "PL1")
    if not 0 < threshold <= 1:
        raise UsageError(f"paper threshold {threshold!r} is outside (0, 1]", hint="the paper's value is 0.1")
    flagged = pl1 < threshold
    op = "<" if flagged else ">="
    return DetectionDecision(
        flagged, "paper", pl1, threshold, (), f"PL1 {_num(pl1)} {op} paper threshold {_num(threshold)}"
    )


def decide_calibrated(
    pl1: float, reference_pl1: Sequence[float], ratio: float = 0.5, z_threshold: float = -2.5
) -> DetectionDecision:
    """Flag PL1 that is anomalously small next to clean references of the same architecture.

    Flagged when ``pl1 < ratio · median(references)``; with 3+ references, also when the robust
    z-score ``(pl1 − median) / (1.4826 · MAD)`` is below ``z_threshold`` (skipped when MAD is 0).
    """
    refs = tuple(float(r) for r in reference_pl1)
    if not refs:
        raise UsageError(
            "the calibrated rule needs clean reference PL1 values and got none",
            hint="name a clean reference model (detect.reference_models) or reference_pl1 in the policy, "
            "or use the paper rule",
        )
    _check_pl1(pl1, "PL1")
    for r in refs:
        _check_pl1(r, "reference PL1")
    if not ratio > 0:
        raise UsageError(f"calibrated ratio {ratio!r} must be positive", hint="the default is 0.5")
    median = statistics.median(refs)
    threshold = ratio * median
    flagged = pl1 < threshold
    listed = ", ".join(_num(r) for r in refs)
    text = f"PL1 {_num(pl1)} {'<' if flagged else '>='} {ratio:g} x reference median {_num(median)}"
    z: float | None = None
    if len(refs) >= 3:
        mad = statistics.median(abs(r - median) for r in refs)
        if mad > 0:
            z = (pl1 - median) / (1.4826 * mad)
            z_flag = z < z_threshold
            flagged = flagged or z_flag
            text += f"; robust z {z:.2f} {'<' if z_flag else '>='} {z_threshold:g}"
        else:
            text += "; robust z not used (the references' MAD is 0)"
    return DetectionDecision(flagged, "calibrated", pl1, threshold, refs, f"{text} (references: {listed})", z)


@dataclass(frozen=True)
class DisentanglementGrid:
    """ξ(α_c, α_t) of Ortiz-Jimenez et al. (algorithms.md §3.4) for a clean and a trigger vector.

    ``xi[i][j] = clean_part[i][j] + trigger_part[i][j]`` at ``(alphas_clean[i], alphas_trigger[j])``:
    the share of clean images whose prediction under θ0 + α_c·τ_c + α_t·τ_t differs from θ0 + α_c·τ_c,
    plus the share of triggered images whose prediction differs from θ0 + α_t·τ_t. In [0, 2].
    """

    alphas_clean: tuple[float, ...]
    alphas_trigger: tuple[float, ...]
    xi: tuple[tuple[float, ...], ...]
    clean_part: tuple[tuple[float, ...], ...]
    trigger_part: tuple[tuple[float, ...], ...]


def _combine(
    base: Mapping[str, torch.Tensor], parts: Sequence[tuple[float, Mapping[str, torch.Tensor]]]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in base.items():
        if value.is_floating_point():
            value = value.clone()
            for coef, vec in parts:
                if coef != 0 and key in vec:
                    value += coef * vec[key].to(value.device, value.dtype)
        out[key] = value
    return out


def _predictions(
    build: Callable[[Mapping[str, torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]],
    state: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    classify = build(state)
    return torch.cat([_predict(classify, images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def disentanglement_error(
    base: Mapping[str, torch.Tensor],
    clean_vector: Mapping[str, torch.Tensor],
    trigger_vector: Mapping[str, torch.Tensor],
    build: Callable[[Mapping[str, torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]],
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    alphas_clean: Sequence[float] = (0.0, 0.5, 1.0),
    alphas_trigger: Sequence[float] = (-2.0, -1.0, 0.0),
    batch_size: int = 256,
) -> DisentanglementGrid:
    """Weight-disentanglement error ξ(α_c, α_t) on a grid (algorithms.md §3.4, TBAR's analogue).

    ``build(state)`` returns a pixels → logits classifier for a state dict; the vectors hold
    ``tuned − base`` for (a subset of) the base's float tensors. Costs |α_c|·|α_t| + |α_c| + |α_t|
    builds.
    """
    for name, vec in (("clean", clean_vector), ("trigger", trigger_vector)):
        extra = sorted(set(vec) - set(base))
        if extra:
            raise UsageError(f"{name} vector has tensor {extra[0]!r} the base lacks", hint="vectors are tuned − base")
    if clean_images.shape[0] == 0 or triggered_images.shape[0] == 0:
        raise DataError("ξ needs clean and triggered images, got an empty batch", hint="pass both image sets")
    a_c, a_t = tuple(float(a) for a in alphas_clean), tuple(float(a) for a in alphas_trigger)
    own_c = [_predictions(build, _combine(base, [(a, clean_vector)]), clean_images, batch_size) for a in a_c]
    own_t = [_predictions(build, _combine(base, [(a, trigger_vector)]), triggered_images, batch_size) for a in a_t]
    clean_part, trigger_part = [], []
    for i, ac in enumerate(a_c):
        row_c, row_t = [], []
        for j, at in enumerate(a_t):
            state = _combine(base, [(ac, clean_vector), (at, trigger_vector)])
            both_c = _predictions(build, state, clean_images, batch_size)
            both_t = _predictions(build, state, triggered_images, batch_size)
            row_c.append(float((both_c != own_c[i]).float().mean()))
            row_t.append(float((both_t != own_t[j]).float().mean()))
        clean_part.append(tuple(row_c))
        trigger_part.append(tuple(row_t))
    xi = tuple(
        tuple(c + t for c, t in zip(rc, rt, strict=True)) for rc, rt in zip(clean_part, trigger_part, strict=True)
    )
    return DisentanglementGrid(a_c, a_t, xi, tuple(clean_part), tuple(trigger_part))
