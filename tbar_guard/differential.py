"""Differential per-target trigger inversion: the default detector.

Faithful DECREE (``detect.py``) asks for a small mask that collapses *embeddings*. On CLIPs that
were fine-tuned through a classification head, triggered embeddings do not collapse, and clean
small encoders collapse under scattered-pixel masks, so DECREE misses BadNet
(../shared/reference/prototype-study.md, part 2; measured again here). This detector uses what
DECREE did not:

- the zero-shot head: for every class k it searches the smallest mask + pattern that sends
  held-out clean images to k (cross-entropy on the candidate's predictions, Neural-Cleanse style);
- a compactness prior: the mask lives on a coarse grid (``mask_cells`` × ``mask_cells``,
  nearest-upsampled), which rules out the scattered single-pixel adversarial solutions;
- a reference model (the base model the candidate was fine-tuned from, or the promoted version):
  a KL term keeps the reference's predictions on the stamped images unchanged, so triggers that
  are universal adversarial patterns of the shared architecture are penalised and what remains
  is specific to the candidate — what a backdoor is.

Decision: a backdoored class needs a much smaller mask than the others. With the per-class mask
areas a_k, the class is flagged when a_min is below ``area_ratio`` × the median (default 0.6), or,
when ``z_threshold`` is set, when the robust z-score of the smallest one, (a_min − median) /
(1.4826·MAD), is below it. The z-score is off by default: over 43 classes the smallest of a clean
model's masks reaches z −2.5 by chance (about one in four for normal scores), and on the development
zoo (bench/zoo-dev.yaml) the rule "z < −2.5 or ratio < 0.5" flagged a clean GTSRB fine-tune and a
SIG victim (wrong class) by z alone; the patch/blend victims whose class came out right sat at
0.17–0.54 × the median (one failed BadNet attack, ASR 88%, at 0.64) and the 8 clean fine-tunes at
0.66–0.93. The class with the smallest mask is the inferred target and its mask +
pattern is the inverted trigger handed to removal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tbar_guard.errors import DataError, RemovalError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DifferentialConfig:
    steps: int = 100  # optimisation steps per chunk of targets (the policy's defaults)
    batch_size: int = 8  # clean images per step (each stamped with every target's trigger)
    lr: float = 0.1
    mask_cells: int = 7  # the mask is a mask_cells × mask_cells grid upsampled to the image
    area_weight: float = 5.0  # weight of the mask area (fraction of the image) in the loss
    reference_weight: float = 1.0  # weight of KL(reference on clean || reference on stamped)
    z_threshold: float | None = None  # flag when the smallest mask's robust z-score is below this (None: off)
    area_ratio: float = 0.6  # flag when the smallest mask is below this fraction of the median (0: off)
    max_transfer: float | None = None  # with a reference: flag only when ref ASR / candidate ASR <= this
    targets_per_chunk: int = 11
    seed: int = 0
    max_seconds: float | None = None


@dataclass(frozen=True)
class TargetTrigger:
    target: int
    area: float  # mask area fraction on the image
    asr: float  # held-out share sent to ``target`` by the candidate
    reference_asr: float  # same, on the reference model (nan without a reference)
    # where the trigger actually sends held-out images on the candidate (the mode of its predictions):
    # an inversion for class k that did not reach k can still open the backdoor of another class
    hit: int = -1  # -1: not measured (then ``target`` is taken)
    hit_asr: float = math.nan  # held-out share sent to ``hit`` by the candidate
    hit_reference_asr: float = math.nan  # same, on the reference

    def effect(self) -> tuple[int, float, float]:
        """(class the trigger sends held-out images to, that share on the candidate, on the reference):
        the measured hit, or the searched class when the hit was not measured."""
        if self.hit >= 0:
            return self.hit, self.hit_asr, self.hit_reference_asr
        return self.target, self.asr, self.reference_asr


def _score_trigger(
    classify: nn.Module, reference: nn.Module | None, stamped: torch.Tensor, target: int, score: float
) -> TargetTrigger:
    """The held-out effect of one class's inverted trigger (``stamped``: the held-out images stamped)."""
    pred = classify(stamped).argmax(1)
    hit = int(torch.bincount(pred).argmax())
    ref_pred = reference(stamped).argmax(1) if reference is not None else None

    def share(p: torch.Tensor | None, c: int) -> float:
        return math.nan if p is None else float((p == c).float().mean())

    return TargetTrigger(
        target, score, share(pred, target), share(ref_pred, target), hit, share(pred, hit), share(ref_pred, hit)
    )


@dataclass(frozen=True)
class DifferentialResult:
    per_target: tuple[TargetTrigger, ...]
    target: int
    mask: torch.Tensor  # [H, W] in [0, 1]
    pattern: torch.Tensor  # [3, H, W] in [0, 1]
    area: float
    median_area: float
    z: float
    flagged: bool
    explanation: str
    steps: int
    seconds: float
    family: str = "mask"  # which trigger family produced this result ("mask", "blend" or "additive")
    additive: torch.Tensor | None = None  # additive family: the perturbation [3, H, W] the trigger adds
    relative: RelativeDecision | None = None  # additive family with relative_ratio and a reference


@dataclass(frozen=True)
class RelativeDecision:
    """The additive family's second rule: each class's amplitude on the candidate over the amplitude
    the same search needs on the clean reference itself (how cheap the class is on the model the
    candidate came from). A class that every model of the task reaches cheaply (CIFAR-10's trucks)
    keeps a quotient near the others'; a class only the candidate reaches cheaply stands out."""

    reference_scores: tuple[float, ...]  # per searched class, the reference's own amplitude
    target: int  # the class with the smallest working quotient
    quotient: float  # its amplitude on the candidate / on the reference
    median_quotient: float
    threshold: float
    flagged: bool  # the ratio rule fired and (with max_transfer) the trigger is specific to the candidate
    explanation: str
    steps: int  # of the reference's search
    seconds: float

    @property
    def ratio(self) -> float:
        """The quotient over the median quotient."""
        return self.quotient / max(self.median_quotient, 1e-12)

    @property
    def fired(self) -> bool:
        """The ratio rule alone (before the transfer check)."""
        return self.ratio < self.threshold


def _freeze(module: nn.Module) -> list[bool]:
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    return flags


def _restore(module: nn.Module, flags: list[bool]) -> None:
    for p, flag in zip(module.parameters(), flags, strict=True):
        p.requires_grad_(flag)


def _masks(raw: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(torch.sigmoid(raw), size=(size, size), mode="nearest")


def _chunks(searched: list[int], per_chunk: int) -> list[list[int]]:
    """The searched class indices in groups of ``per_chunk``, optimised together."""
    return [searched[s : s + per_chunk] for s in range(0, len(searched), per_chunk)]


@torch.no_grad()
def _reference_predictions(
    reference: nn.Module | None, shadow: torch.Tensor, device: torch.device
) -> torch.Tensor | None:
    """The reference model's softmax on the clean shadow images (the KL term's teacher), or None."""
    if reference is None:
        return None
    return torch.cat([F.softmax(reference(shadow[i : i + 256].to(device)), 1) for i in range(0, len(shadow), 256)])


def robust_z(values: torch.Tensor, index: int) -> tuple[float, float]:
    """(median, robust z-score of values[index]) with the MAD scaled to a normal's sigma."""
    median = float(values.median())
    mad = float((values - median).abs().median()) * 1.4826
    return median, (float(values[index]) - median) / max(mad, 1e-6)


def invert_per_target(
    classify: nn.Module,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    config: DifferentialConfig,
    reference: nn.Module | None = None,
    progress: Progress | None = None,
    classes: list[int] | None = None,
) -> DifferentialResult:
    """Search a compact trigger per class on ``shadow``; score it on ``heldout`` (pixels in [0,1]).

    ``classes``: search only these classes (default: all ``n_classes``); ``per_target`` then lists
    only them, and the decision statistics are over them."""
    if shadow.shape[0] < config.batch_size:
        raise DataError(
            f"{shadow.shape[0]} shadow images are fewer than the batch size {config.batch_size}",
            hint="provide more clean images or lower detect.batch_size",
        )
    t0 = time.perf_counter()
    device = next(classify.parameters()).device
    size = int(shadow.shape[-1])
    gen = torch.Generator().manual_seed(config.seed)
    flags = _freeze(classify)
    ref_flags = _freeze(reference) if reference is not None else []
    was_training = classify.training
    classify.eval()
    if reference is not None:
        reference.eval()
    masks: list[torch.Tensor] = []
    patterns: list[torch.Tensor] = []
    searched = list(range(n_classes)) if classes is None else list(classes)
    chunks = _chunks(searched, config.targets_per_chunk)
    total = config.steps * len(chunks)
    done = 0
    try:
        ref_clean = _reference_predictions(reference, shadow, device)
        for chunk in chunks:
            k = len(chunk)
            m_raw = (torch.rand(k, 1, config.mask_cells, config.mask_cells, generator=gen) * 0.2 - 3).to(device)
            p_raw = torch.randn(k, 3, size, size, generator=gen).to(device)
            m_raw.requires_grad_(True)
            p_raw.requires_grad_(True)
            opt = torch.optim.Adam([m_raw, p_raw], lr=config.lr)
            targets = torch.tensor(chunk, device=device).repeat_interleave(config.batch_size)
            for _ in range(config.steps):
                idx = torch.randint(0, shadow.shape[0], (config.batch_size,), generator=gen)
                x = shadow[idx].to(device)
                m = _masks(m_raw, size)
                pat = torch.sigmoid(p_raw)
                stamped = ((1 - m[:, None]) * x[None] + (m * pat)[:, None]).reshape(
                    k * config.batch_size, 3, size, size
                )
                ce = F.cross_entropy(classify(stamped), targets, reduction="none").view(k, -1).mean(1)
                loss_k = ce + config.area_weight * m.mean(dim=(1, 2, 3))
                if reference is not None and ref_clean is not None:
                    log_ref = F.log_softmax(reference(stamped), 1)
                    teacher = ref_clean[idx.to(device)].repeat(k, 1)
                    kl = F.kl_div(log_ref, teacher, reduction="none").sum(1).view(k, -1).mean(1)
                    loss_k = loss_k + config.reference_weight * kl
                loss = loss_k.sum()
                if not torch.isfinite(loss):
                    raise RemovalError(f"trigger inversion loss became {loss.item()}", hint="the model may be broken")
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                done += 1
                if progress is not None:
                    progress(done, total)
                if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
                    break
            with torch.no_grad():
                masks.append(_masks(m_raw, size).detach())
                patterns.append(torch.sigmoid(p_raw).detach())
        mask_all = torch.cat(masks)[:, 0]  # [C, H, W]
        pattern_all = torch.cat(patterns)  # [C, 3, H, W]
        per_target = []
        with torch.no_grad():
            held = heldout.to(device)
            for i, c in enumerate(searched):
                m = mask_all[i][None, None]
                stamped = (1 - m) * held + m * pattern_all[i][None]
                per_target.append(_score_trigger(classify, reference, stamped, c, float(mask_all[i].mean())))
    finally:
        _restore(classify, flags)
        classify.train(was_training)
        if reference is not None:
            _restore(reference, ref_flags)
    pt = tuple(per_target)
    best, median, z, flagged, explanation = decide(
        pt, config.z_threshold, config.area_ratio, "mask (share of the image)", config.max_transfer
    )
    return DifferentialResult(
        pt,
        pt[best].target,
        mask_all[best].cpu(),
        pattern_all[best].cpu(),
        pt[best].area,
        median,
        z,
        flagged,
        explanation,
        done,
        time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class BlendConfig:
    """The full-image blend family: ``x' = (1 − a_k)·x + a_k·p_k`` per class k.

    a_k = sigmoid(raw) is one scalar per class (the score: the blend strength class k needs);
    p_k = sigmoid(raw pattern) lives on a ``pattern_cells`` × ``pattern_cells`` grid, bilinearly
    upsampled to the image (0: full resolution)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 0.1
    pattern_cells: int = 0
    strength_weight: float = 5.0  # weight of a_k in the loss
    reference_weight: float = 1.0  # weight of KL(reference on clean || reference on stamped)
    z_threshold: float | None = None  # flag when the smallest a_k has a robust z-score below this (None: off)
    ratio: float = 0.7  # flag when the smallest a_k is below this fraction of the median (0: off)
    max_transfer: float | None = None  # with a reference: flag only when ref ASR / candidate ASR <= this
    targets_per_chunk: int = 11
    seed: int = 0
    max_seconds: float | None = None


def _patterns(raw: torch.Tensor, size: int) -> torch.Tensor:
    if raw.shape[-1] == size:
        return torch.sigmoid(raw)
    return torch.sigmoid(F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False))


def transfer_ratio(t: TargetTrigger) -> float:
    """How much of the inverted trigger's effect carries over to the reference: the share of held-out
    images it sends to the class it hits (the mode of the candidate's predictions; its own class when
    not measured) on the reference over that share on the candidate (nan without a reference). A
    backdoor is specific to the model that learned it (small ratio); a universal adversarial patch
    of the architecture moves both models (large ratio)."""
    _, cand, ref = t.effect()
    if ref != ref:
        return math.nan
    return ref / max(cand, 1e-12)


def decide(
    per_target: tuple[TargetTrigger, ...],
    z_threshold: float | None,
    ratio_threshold: float,
    what: str,
    max_transfer: float | None = None,
    min_share: float = 0.5,
    as_share: bool = True,
) -> tuple[int, float, float, bool, str]:
    """(index into ``per_target`` of the smallest score, median score, robust z, flagged, explanation).

    Only triggers that work compete for the smallest score: an inversion whose trigger sends fewer
    than ``min_share`` of the held-out images to any one class (the class it hits) just shrank its
    mask or amplitude to nothing, and its score means nothing (when no trigger works, all compete).
    The smallest score is anomalous when its robust z-score among all classes is below
    ``z_threshold`` (None: never) or it is below ``ratio_threshold`` × the median (0: never). With
    ``max_transfer`` and a reference, an anomalous class is flagged only when its trigger is
    specific to the candidate: :func:`transfer_ratio` ≤ ``max_transfer``. ``as_share``: the scores are
    shares of something (written as percentages); otherwise plain numbers."""
    scores = torch.tensor([t.area for t in per_target])
    working = torch.tensor([t.effect()[1] >= min_share for t in per_target])
    pool = scores.masked_fill(~working, math.inf) if bool(working.any()) else scores
    best = int(pool.argmin())
    median, z = robust_z(scores, best)
    ratio = per_target[best].area / max(median, 1e-12)
    by_z = z_threshold is not None and z < z_threshold
    by_ratio = ratio < ratio_threshold
    z_part = (
        f"robust z {z:.2f}, not a criterion"
        if z_threshold is None
        else f"robust z {z:.2f} {'<' if by_z else '>='} {z_threshold}"
    )

    def num(v: float) -> str:
        return f"{100 * v:.1f}%" if as_share else f"{v:.2f}"

    explanation = (
        f"class {per_target[best].target} needs a {what} of {num(per_target[best].area)} vs a median of "
        f"{num(median)} over {len(per_target)} classes ({z_part}; "
        f"{ratio:.2f} x the median {'<' if by_ratio else '>='} {ratio_threshold:g})"
    )
    anomalous = by_z or by_ratio
    transfer = transfer_ratio(per_target[best])
    if max_transfer is None or transfer != transfer:
        return best, median, z, anomalous, explanation
    specific = transfer <= max_transfer
    t = per_target[best]
    hit, cand, ref = t.effect()
    explanation += (
        f"; transfer to the reference {transfer:.2f} {'<=' if specific else '>'} {max_transfer:g} "
        f"(held-out share the trigger sends to class {hit}: {100 * cand:.1f}% on the candidate, {100 * ref:.1f}% "
        "on the reference"
        + ("" if specific else ": the trigger moves the reference too, an adversarial patch, not a backdoor")
        + ")"
    )
    return best, median, z, anomalous and specific, explanation


@dataclass(frozen=True)
class BlendSearch:
    """Per searched class: the held-out effect, the blend strength a_k and the pattern p_k."""

    per_target: tuple[TargetTrigger, ...]
    strengths: torch.Tensor  # [C]
    patterns: torch.Tensor  # [C, 3, H, W] in [0, 1]
    steps: int
    seconds: float

    def trigger(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, pattern) of the i-th searched class: the blend as an ordinary mask + pattern trigger."""
        size = int(self.patterns.shape[-1])
        return torch.full((size, size), float(self.strengths[i])), self.patterns[i]


def search_blend(
    classify: nn.Module,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    config: BlendConfig,
    reference: nn.Module | None = None,
    progress: Progress | None = None,
    classes: list[int] | None = None,
) -> BlendSearch:
    """Search the weakest full-image blend ``(1 − a)·x + a·p`` that sends ``shadow`` to each class
    (all ``n_classes``, or ``classes``); score it on ``heldout``."""
    size = int(shadow.shape[-1])

    def stamp(x: torch.Tensor, a: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return (1 - a.view(-1, 1, 1, 1, 1)) * x[None] + a.view(-1, 1, 1, 1, 1) * _patterns(raw, size)[:, None]

    run = _invert_global(
        classify,
        shadow,
        heldout,
        n_classes,
        _GlobalFamily(
            config.steps,
            config.batch_size,
            config.lr,
            (config.pattern_cells or size,) * 2,
            config.strength_weight,
            config.reference_weight,
            config.targets_per_chunk,
            config.seed + 7919,  # independent of the mask family's draws
            config.max_seconds,
            lambda raw: torch.sigmoid(raw),
            stamp,
        ),
        reference,
        progress,
        classes,
    )
    return BlendSearch(run.per_target, run.scores, _patterns(run.raw_patterns, size), run.steps, run.seconds)


def invert_blend_per_target(
    classify: nn.Module,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    config: BlendConfig,
    reference: nn.Module | None = None,
    progress: Progress | None = None,
) -> DifferentialResult:
    """:func:`search_blend` over every class and the family's decision. The result's mask is a_k
    everywhere and its pattern p_k, so the inverted trigger is an ordinary mask + pattern trigger."""
    found = search_blend(classify, shadow, heldout, n_classes, config, reference, progress)
    pt = found.per_target
    best, median, z, flagged, explanation = decide(
        pt, config.z_threshold, config.ratio, "full-image blend strength", config.max_transfer
    )
    mask, pattern = found.trigger(best)
    return DifferentialResult(
        pt,
        pt[best].target,
        mask,
        pattern,
        float(found.strengths[best]),
        median,
        z,
        flagged,
        explanation,
        found.steps,
        found.seconds,
        "blend",
    )


@dataclass(frozen=True)
class AdditiveConfig:
    """The full-image additive family: ``x' = clip(x + ε_k·d_k)`` per class k, the signal-type
    trigger of SIG (a faint sinusoid added to the whole image), which neither a compact mask nor a
    blend toward a fixed image can express.

    ε_k = ``max_amplitude``·sigmoid(raw) is one scalar per class, the L∞ amplitude of the
    perturbation (the score); d_k = tanh(raw direction) ∈ [−1, 1]. ``shape`` "full": the direction
    lives on a ``pattern_cells`` × ``pattern_cells`` grid, bilinearly upsampled (0: full
    resolution). "separable": per channel, tanh(r(col) + c(row)), a profile across the image plus a
    profile down it (2 × side numbers per channel instead of side²): stripes, gratings and ramps in
    either orientation, the shape of signal triggers such as SIG's sinusoid, while most of the
    pixel-level freedom a universal adversarial perturbation needs is gone."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 0.1
    pattern_cells: int = 0
    shape: Literal["full", "separable"] = "separable"
    equal_effect: float | None = 0.9  # score = the amplitude that reaches this held-out share (None: the optimiser's)
    amplitude_weight: float = 5.0  # weight of ε_k in the loss
    max_amplitude: float = 0.5
    reference_weight: float = 1.0
    z_threshold: float | None = None
    ratio: float = 0.45
    max_transfer: float | None = None
    targets_per_chunk: int = 11
    seed: int = 0
    max_seconds: float | None = None
    # with a reference: also flag when the smallest per-class quotient (amplitude on the candidate / the
    # amplitude the same search needs on the reference itself) is below this x the median quotient (None: off)
    relative_ratio: float | None = 0.2


def _directions(raw: torch.Tensor, size: int, shape: Literal["full", "separable"] = "full") -> torch.Tensor:
    """tanh of the raw direction at image resolution: ``raw`` is [k, 3, cells, cells] ("full") or
    [k, 3, 2, size] ("separable": row 0 the profile across the image, row 1 the profile down it)."""
    if shape == "separable":
        return torch.tanh(raw[:, :, 0, None, :] + raw[:, :, 1, :, None])
    if raw.shape[-1] != size:
        raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
    return torch.tanh(raw)


def _additive_words(config: AdditiveConfig) -> str:
    """What the additive family's score is, for the decision's explanation."""
    what = "separable" if config.shape == "separable" else "full-image"
    if config.equal_effect is None:
        return f"{what} additive amplitude (L-inf)"
    return f"{what} additive amplitude (L-inf; the one that sends {100 * config.equal_effect:.0f}% of held-out images there)"


def invert_additive_per_target(
    classify: nn.Module,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    config: AdditiveConfig,
    reference: nn.Module | None = None,
    progress: Progress | None = None,
) -> DifferentialResult:
    """Search the faintest full-image additive signal that sends ``shadow`` to each class; score it
    on ``heldout``. The result carries the perturbation in ``additive`` (the trigger for removal);
    its mask is |perturbation| / ε and its pattern 0.5 + perturbation / 2ε (pictures only)."""
    size = int(shadow.shape[-1])

    def stamp(x: torch.Tensor, eps: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return (x[None] + eps.view(-1, 1, 1, 1, 1) * _directions(raw, size, config.shape)[:, None]).clamp(0, 1)

    cells = config.pattern_cells or size
    family = _GlobalFamily(
        config.steps,
        config.batch_size,
        config.lr,
        (2, size) if config.shape == "separable" else (cells, cells),
        config.amplitude_weight,
        config.reference_weight,
        config.targets_per_chunk,
        config.seed + 7927,
        config.max_seconds,
        lambda raw: config.max_amplitude * torch.sigmoid(raw),
        stamp,
        config.equal_effect,
        config.max_amplitude,
    )
    relative = reference is not None and config.relative_ratio is not None
    run = _invert_global(
        classify, shadow, heldout, n_classes, family, reference, _part(progress, 0, 2 if relative else 1)
    )
    pt = run.per_target
    best, median, z, flagged, explanation = decide(
        pt, config.z_threshold, config.ratio, _additive_words(config), config.max_transfer
    )
    rel: RelativeDecision | None = None
    if relative and flagged:
        # the plain rule fired: the relative rule could change neither the verdict nor the class
        explanation += "; the relative rule was not evaluated (the plain rule fired)"
        if progress is not None:
            progress(2 * run.steps, 2 * run.steps)
    elif relative:
        assert reference is not None and config.relative_ratio is not None
        # the same search on the reference itself (no KL term: its own cheapest signals are the point)
        ref_run = _invert_global(reference, shadow, heldout, n_classes, family, None, _part(progress, 1, 2))
        ref_scores = tuple(float(v) for v in ref_run.scores)
        rel, rel_best = relative_decision(
            pt, ref_scores, config.relative_ratio, config.max_transfer, ref_run.steps, ref_run.seconds
        )
        explanation += f"; relative to the reference: {rel.explanation}"
        if rel.flagged and not flagged:
            best, flagged = rel_best, True  # the relative rule alone fired: its class decides
    eps = float(run.scores[best])
    direction = _directions(run.raw_patterns[best : best + 1], size, config.shape)[0].cpu()
    return DifferentialResult(
        pt,
        pt[best].target,
        direction.abs().mean(0),
        (0.5 + direction / 2).clamp(0, 1),
        eps,
        median,
        z,
        flagged,
        explanation,
        run.steps + (0 if rel is None else rel.steps),
        run.seconds + (0.0 if rel is None else rel.seconds),
        "additive",
        additive=eps * direction,
        relative=rel,
    )


def _part(progress: Progress | None, index: int, parts: int) -> Progress | None:
    """``progress`` for the ``index``-th of ``parts`` equal runs reported as one."""
    if progress is None or parts == 1:
        return progress
    sink = progress

    def update(done: int, total: int) -> None:
        sink(index * total + done, parts * total)

    return update


def relative_decision(
    per_target: tuple[TargetTrigger, ...],
    ref_scores: tuple[float, ...],
    threshold: float,
    max_transfer: float | None,
    steps: int = 0,
    seconds: float = 0.0,
) -> tuple[RelativeDecision, int]:
    """(the relative rule's decision, index into ``per_target`` of its class): :func:`decide` over the
    quotients score on the candidate / ``ref_scores`` (the same search's score on the reference), with
    the candidate's own held-out effect and transfer (only working triggers compete; the transfer check
    as for the plain rule). ``steps``, ``seconds``: what the reference's search took."""
    quotients = tuple(replace(t, area=t.area / max(r, 1e-6)) for t, r in zip(per_target, ref_scores, strict=True))
    best, median, _, flagged, explanation = decide(
        quotients,
        None,
        threshold,
        "quotient (amplitude on the candidate / on the reference)",
        max_transfer,
        as_share=False,
    )
    decision = RelativeDecision(
        ref_scores,
        per_target[best].target,
        quotients[best].area,
        median,
        threshold,
        flagged,
        explanation,
        steps,
        seconds,
    )
    return decision, best


@dataclass(frozen=True)
class _GlobalFamily:
    """A whole-image trigger family: one scalar score per class (its weight in the loss) and one pattern."""

    steps: int
    batch_size: int
    lr: float
    raw_shape: tuple[int, int]  # the raw pattern per channel (rows, columns)
    score_weight: float
    reference_weight: float
    targets_per_chunk: int
    seed: int
    max_seconds: float | None
    score: Callable[[torch.Tensor], torch.Tensor]  # raw [k] -> score [k]
    stamp: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, score, raw) -> [k, B, 3, H, W]
    # re-score at equal effect: the smallest score (in [0, score_max]) at which the class's optimised
    # pattern sends this share of held-out images to the class (None: the optimiser's own score)
    equal_effect: float | None = None
    score_max: float = 1.0
    effect_images: int = 256  # held-out images the equal-effect search reads


@dataclass(frozen=True)
class _GlobalRun:
    per_target: tuple[TargetTrigger, ...]
    scores: torch.Tensor  # [C]
    raw_patterns: torch.Tensor  # [C, 3, *raw_shape]
    steps: int
    seconds: float


@torch.no_grad()
def _equal_effect_scores(
    classify: nn.Module,
    heldout: torch.Tensor,
    searched: list[int],
    family: _GlobalFamily,
    raw_all: torch.Tensor,
    device: torch.device,
    iterations: int = 10,
) -> torch.Tensor:
    """Per searched class, bisect the score along the class's optimised pattern for the smallest value
    that sends ``family.equal_effect`` of (up to ``effect_images``) held-out images to the class;
    ``score_max`` when even that does not. The optimiser's penalised score lands where the loss's
    trade-off balances, at a different effect per class; at equal effect a backdoor's trigger stays
    cheap while a universal adversarial perturbation must grow."""
    assert family.equal_effect is not None
    held = heldout[: family.effect_images].to(device)
    out = torch.empty(len(searched))
    for i, c in enumerate(searched):
        raw = raw_all[i : i + 1].to(device)

        def share(s: float, raw: torch.Tensor = raw, c: int = c) -> float:
            stamped = family.stamp(held, torch.tensor([s], device=device), raw)[0]
            return float((classify(stamped).argmax(1) == c).float().mean())

        lo, hi = 0.0, family.score_max
        if share(hi) < family.equal_effect:
            out[i] = hi
            continue
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if share(mid) >= family.equal_effect:
                hi = mid
            else:
                lo = mid
        out[i] = hi
    return out.to(device)


def _invert_global(
    classify: nn.Module,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    family: _GlobalFamily,
    reference: nn.Module | None,
    progress: Progress | None,
    classes: list[int] | None = None,
) -> _GlobalRun:
    """The optimisation shared by the whole-image families: per chunk of classes (all ``n_classes``,
    or ``classes``), Adam on (score raw, pattern raw) minimising cross-entropy to the class +
    score_weight × score (+ the reference KL)."""
    if shadow.shape[0] < family.batch_size:
        raise DataError(
            f"{shadow.shape[0]} shadow images are fewer than the batch size {family.batch_size}",
            hint="provide more clean images or lower detect.batch_size",
        )
    t0 = time.perf_counter()
    device = next(classify.parameters()).device
    size = int(shadow.shape[-1])
    gen = torch.Generator().manual_seed(family.seed)
    flags = _freeze(classify)
    ref_flags = _freeze(reference) if reference is not None else []
    was_training = classify.training
    classify.eval()
    if reference is not None:
        reference.eval()
    scores: list[torch.Tensor] = []
    raws: list[torch.Tensor] = []
    searched = list(range(n_classes)) if classes is None else list(classes)
    chunks = _chunks(searched, family.targets_per_chunk)
    total = family.steps * len(chunks)
    done = 0
    bs = family.batch_size
    try:
        ref_clean = _reference_predictions(reference, shadow, device)
        for chunk in chunks:
            k = len(chunk)
            s_raw = (torch.rand(k, generator=gen) * 0.2 - 3).to(device)
            p_raw = torch.randn(k, 3, *family.raw_shape, generator=gen).to(device)
            s_raw.requires_grad_(True)
            p_raw.requires_grad_(True)
            opt = torch.optim.Adam([s_raw, p_raw], lr=family.lr)
            targets = torch.tensor(chunk, device=device).repeat_interleave(bs)
            for _ in range(family.steps):
                idx = torch.randint(0, shadow.shape[0], (bs,), generator=gen)
                x = shadow[idx].to(device)
                score = family.score(s_raw)
                stamped = family.stamp(x, score, p_raw).reshape(k * bs, 3, size, size)
                ce = F.cross_entropy(classify(stamped), targets, reduction="none").view(k, -1).mean(1)
                loss_k = ce + family.score_weight * score
                if reference is not None and ref_clean is not None:
                    log_ref = F.log_softmax(reference(stamped), 1)
                    teacher = ref_clean[idx.to(device)].repeat(k, 1)
                    kl = F.kl_div(log_ref, teacher, reduction="none").sum(1).view(k, -1).mean(1)
                    loss_k = loss_k + family.reference_weight * kl
                loss = loss_k.sum()
                if not torch.isfinite(loss):
                    raise RemovalError(f"trigger inversion loss became {loss.item()}", hint="the model may be broken")
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                done += 1
                if progress is not None:
                    progress(done, total)
                if family.max_seconds is not None and time.perf_counter() - t0 > family.max_seconds:
                    break
            scores.append(family.score(s_raw).detach())
            raws.append(p_raw.detach())
        score_all = torch.cat(scores)  # [C]
        raw_all = torch.cat(raws)  # [C, 3, *raw_shape]
        if family.equal_effect is not None:
            score_all = _equal_effect_scores(classify, heldout, searched, family, raw_all, device)
        per_target = []
        with torch.no_grad():
            held = heldout.to(device)
            for i, c in enumerate(searched):
                stamped = family.stamp(held, score_all[i : i + 1], raw_all[i : i + 1])[0]
                per_target.append(_score_trigger(classify, reference, stamped, c, float(score_all[i])))
    finally:
        _restore(classify, flags)
        classify.train(was_training)
        if reference is not None:
            _restore(reference, ref_flags)
    return _GlobalRun(tuple(per_target), score_all.cpu(), raw_all.cpu(), done, time.perf_counter() - t0)
