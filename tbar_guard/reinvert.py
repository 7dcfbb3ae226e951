"""Re-inversion rounds: make an agnostic (inverted-trigger) unlearning carry over to the real trigger.

An inverted trigger is one member of a family of small patches that open the backdoor. Unlearning it
closes that member, but on the benchmark zoo the real trigger often still worked (CIFAR-10 BadNet:
the true trigger's ASR stayed 56% after the gate). So after each unlearning the target class is
inverted *again* on the unlearned model θ_b − τ (same differential search, one class). While the new
trigger is still anomalous — small against the scan's other classes (the scan's area rule) and, with
a reference, specific to the candidate (its transfer check) — the backdoor is still there: the new
trigger joins the forget set (each forget image carries one member, round-robin) and τ is learned
again from θ_b. It stops when the re-inverted trigger looks like any other class's, or after
``sanitize.unlearn.reinvert_rounds`` added triggers.

This is the idea of adversarial unlearning (I-BAU, Zeng et al. ICLR 2022: re-solve the trigger
against the current model while unlearning) run in a few discrete rounds with the product's own
detector, so that every round is evidence in the report.

The rounds search masks only; a Blended backdoor is no small mask, and on the rebuilt benchmark zoo
its real trigger kept 39-48% ASR on the GTSRB victims after them. So a last round searches the
blend family (``sanitize.unlearn.companions``): the target class and a sample of others inverted as
full-image blends on the unlearned model; a target blend that is small against the sample, works
and is specific joins the forget set.

A scan decided by the additive family (``sanitize.unlearn.harden_families`` naming ``additive``)
starts the set with its additive signal; it gets no rounds (they search masks, judged against the
scan's per-class mask areas, which an additive scan does not have), only the companion round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tbar_guard.attacks import Trigger
from tbar_guard.clip import ZeroShotClassifier, visual_state
from tbar_guard.data import Splits
from tbar_guard.differential import (
    BlendConfig,
    DifferentialConfig,
    DifferentialResult,
    invert_per_target,
    robust_z,
    search_blend,
    transfer_ratio,
)
from tbar_guard.policy import Policy
from tbar_guard.sanitize import LearnedVector, learn_on_forget_set

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReinversionRound:
    """One re-inversion of the target class on the model unlearned with the triggers so far."""

    triggers_before: int  # size of the trigger set that was unlearned
    area: float  # the re-inverted mask's area fraction
    median_area: float  # the scan's median over the classes (the target's entry replaced by ``area``)
    z: float
    asr: float  # held-out share the re-inverted trigger sends to the target on the unlearned model
    reference_asr: float  # same on the reference (nan without one)
    added: bool  # still anomalous and specific: joined the forget set
    explanation: str
    seconds: float

    def to_json(self) -> dict[str, float | int | bool | str | None]:
        return {
            "triggers_before": self.triggers_before,
            "area": self.area,
            "median_area": self.median_area,
            "z_score": self.z,
            "asr_on_unlearned": self.asr,
            "reference_asr": None if math.isnan(self.reference_asr) else self.reference_asr,
            "added": self.added,
            "explanation": self.explanation,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Companion:
    """The flagged class inverted with another trigger family on the model unlearned with the mask triggers."""

    family: str
    score: float  # the family's score (blend: the strength a)
    median_score: float  # the median score over the sampled classes (the target's included)
    asr: float  # held-out share it sends to the target on the model it was searched on
    reference_asr: float  # same on the reference (nan without one)
    added: bool  # small, works (>= half the held-out images to the target) and specific: joined the forget set
    explanation: str
    seconds: float
    # joined on trial: not small by the family's ratio but below sanitize.unlearn.companion_trial_ratio x the
    # median; the gate removes without it when the removal with it misses the policy
    trial: bool = False

    def to_json(self) -> dict[str, float | bool | str | None]:
        return {
            "family": self.family,
            "score": self.score,
            "median_score": self.median_score,
            "asr": self.asr,
            "reference_asr": None if math.isnan(self.reference_asr) else self.reference_asr,
            "added": self.added,
            "trial": self.trial,
            "explanation": self.explanation,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Hardened:
    """The trigger set the removal runs with and the τ already learned from it."""

    trigger: Trigger  # every trigger found (``Trigger.set_of``); a single one when none was added
    rounds: tuple[ReinversionRound, ...]
    learned: LearnedVector
    companions: tuple[Companion, ...] = ()
    # with a companion on trial: the trigger set and τ without it (the gate's fallback)
    without_trial: tuple[Trigger, LearnedVector] | None = None


@contextmanager
def _unlearned(clf: ZeroShotClassifier, theta_b: dict[str, torch.Tensor], learned: LearnedVector) -> Iterator[None]:
    """``clf.visual`` is θ_b − τ (α = 1) inside the block and θ_b again after it, also on error."""
    clf.visual.load_state_dict((-learned.tau).apply_to(theta_b, 1.0))
    try:
        yield
    finally:
        clf.visual.load_state_dict(theta_b)


def _companion(
    clf: ZeroShotClassifier,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    target: int,
    config: BlendConfig,
    max_transfer: float | None,
    reference: nn.Module | None,
    progress: Progress | None,
    trial_ratio: float | None = None,
) -> tuple[Companion, Trigger]:
    """(evidence, trigger): the target class inverted as a full-image blend on ``clf``, judged like
    the scan's blend family but against a sample of classes (the target and up to
    ``targets_per_chunk`` − 1 others, one chunk): it joins when its strength is below ``ratio`` ×
    the sample's median, it works (≥ half the held-out images to the target) and it is specific
    (transfer check). With ``trial_ratio`` above ``ratio``, a blend that works and is specific and
    whose strength is below ``trial_ratio`` × the median joins on trial (``Companion.trial``)."""
    t0 = time.perf_counter()
    order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(config.seed)).tolist()
    others = [c for c in order if c != target][: max(1, config.targets_per_chunk - 1)]
    found = search_blend(
        clf,
        shadow,
        heldout,
        n_classes,
        config,
        reference,
        (lambda d, t: progress("companion inversion", d, t)) if progress else None,
        classes=[target, *others],
    )
    hit = found.per_target[0]
    strength = float(found.strengths[0])
    median = float(found.strengths.median())
    ratio = strength / max(median, 1e-12)
    small = ratio < config.ratio
    on_trial = not small and trial_ratio is not None and ratio < trial_ratio
    works = hit.asr >= 0.5
    transfer = transfer_ratio(hit)
    specific = max_transfer is None or math.isnan(transfer) or transfer <= max_transfer
    added = (small or on_trial) and works and specific
    why = [
        w
        for w, bad in (
            ("not small", not (small or on_trial)),
            ("does not work", not works),
            ("moves the reference", not specific),
        )
        if bad
    ]
    joins = f"joins below {config.ratio:g} x" + ("" if trial_ratio is None else f", on trial below {trial_ratio:g} x")
    explanation = (
        f"class {target} as a full-image blend: strength {strength:.3f}, {ratio:.2f} x the median {median:.3f} of "
        f"{len(found.per_target)} classes ({joins}), sends {100 * hit.asr:.1f}% of the held-out images to it"
        + ("" if math.isnan(transfer) else f"; transfer to the reference {transfer:.2f} (max {max_transfer})")
        + (
            ("; added to the forget set on trial" if on_trial else "; added to the forget set")
            if added
            else f"; not added ({', '.join(why)})"
        )
    )
    companion = Companion(
        "blend",
        strength,
        median,
        hit.asr,
        hit.reference_asr,
        added,
        explanation,
        time.perf_counter() - t0,
        added and on_trial,
    )
    return companion, Trigger.from_mask(*found.trigger(0))


def harden(
    clf: ZeroShotClassifier,
    splits: Splits,
    scan: DifferentialResult,
    target: int,
    policy: Policy,
    config: DifferentialConfig,
    shadow: torch.Tensor,
    reference: nn.Module | None,
    progress: Progress | None = None,
    blend: BlendConfig | None = None,
) -> Hardened:
    """Re-inversion rounds from the scan's inverted trigger for the gate's ``target`` (``clf.visual``
    is θ_b on entry and on return). With ``sanitize.unlearn.companions`` naming ``blend`` (and
    ``blend`` given), after the rounds the target class is inverted as a full-image blend on the
    unlearned model; when that trigger is small against a sample of other classes' blends, works and
    is specific, it joins the forget set and τ is learned once more (:func:`_companion`); one that
    joined on trial (``sanitize.unlearn.companion_trial_ratio``) leaves the set and τ without it in
    ``Hardened.without_trial``. An additive ``scan`` (its ``additive`` signal set) starts the set with
    that signal and runs no rounds, only the companion."""
    members = [
        Trigger.from_mask(scan.mask, scan.pattern)
        if scan.additive is None
        else Trigger(None, int(scan.additive.shape[-1]), additive=scan.additive)
    ]
    theta_b = visual_state(clf)
    heldout = splits.val.pixels()
    companions: list[Companion] = []
    without_trial: tuple[Trigger, LearnedVector] | None = None

    def learn() -> LearnedVector:  # τ from θ_b on the current trigger set
        return learn_on_forget_set(
            clf,
            splits,
            Trigger.set_of(members),
            target,
            policy,
            (lambda d, t: progress("fine-tune", d, t)) if progress else None,
        )

    rounds: list[ReinversionRound] = []
    max_rounds = policy.sanitize.unlearn.reinvert_rounds if scan.additive is None else 0
    while True:
        learned = learn()
        if len(rounds) >= max_rounds:
            break
        t1 = time.perf_counter()
        with _unlearned(clf, theta_b, learned):
            again = invert_per_target(
                clf,
                shadow,
                heldout,
                len(scan.per_target),
                config,
                reference,
                (lambda d, t: progress("re-inversion", d, t)) if progress else None,
                classes=[target],
            )
        hit = again.per_target[0]
        others = [hit if t.target == target else t for t in scan.per_target]
        median, z = robust_z(torch.tensor([t.area for t in others]), [t.target for t in others].index(target))
        ratio = hit.area / max(median, 1e-12)
        z_max, ratio_max = policy.sanitize.unlearn.reinvert_z_threshold, policy.sanitize.unlearn.reinvert_area_ratio
        anomalous = (z_max is not None and z < z_max) or ratio < ratio_max
        transfer = transfer_ratio(hit)
        specific = config.max_transfer is None or math.isnan(transfer) or transfer <= config.max_transfer
        added = anomalous and specific
        explanation = (
            f"class {target} re-inverted on the unlearned model: {100 * hit.area:.1f}% of the image vs the scan's "
            f"median {100 * median:.1f}% (robust z {z:.2f}, {ratio:.2f} x the median; anomalous below "
            + ("" if z_max is None else f"z {z_max} or ")
            + f"{ratio_max:g} x)"
            + (
                ""
                if math.isnan(transfer)
                else f"; transfer to the reference {transfer:.2f} (max {config.max_transfer})"
            )
            + (
                "; still a backdoor trigger: added"
                if added
                else "; not an anomalous, specific trigger: the rounds stop"
            )
        )
        rounds.append(
            ReinversionRound(
                len(members),
                hit.area,
                median,
                z,
                hit.asr,
                hit.reference_asr,
                added,
                explanation,
                time.perf_counter() - t1,
            )
        )
        if not added:
            break
        members.append(Trigger.from_mask(again.mask, again.pattern))
    if blend is not None and "blend" in policy.sanitize.unlearn.companions:
        # a last round in the blend family, on the model unlearned with the mask triggers: is a weak
        # full-image blend still a specific trigger for the target? (searched on θ_b it also picked
        # the target of BadNet victims, whose backdoor makes the class easy to reach; unlearning that
        # blend diluted the set and the patch survived: gtsrb-badnet-t1-s0, 0.5% -> 34-92%)
        with _unlearned(clf, theta_b, learned):
            companion, trigger = _companion(
                clf,
                shadow,
                heldout,
                len(scan.per_target),
                target,
                blend,
                config.max_transfer,
                reference,
                progress,
                policy.sanitize.unlearn.companion_trial_ratio,
            )
        companions.append(companion)
        if companion.added:
            if companion.trial:
                without_trial = (Trigger.set_of(members), learned)
            members.append(trigger)
            learned = learn()
    return Hardened(Trigger.set_of(members), tuple(rounds), learned, tuple(companions), without_trial)
