"""TBAR: learn the trigger vector on a small forget set, negate it, choose α against the policy.

1. Forget set: N clean images (label ≠ target) from the forget split, stamped with the trigger and
   labelled with the target; their clean twins (the same images unstamped) and true labels ride along.
2. The trigger vector τ, by the policy's removal method (a closed set; see ``learn_trigger_vector``):
   ``tbar`` (the paper's recipe, the faithful reference): fine-tune the image tower through the
   frozen zero-shot head on stamped → target, τ = θ_{b+t} − θ_b. ``anchored``: the same with a KL
   term holding the model's predictions on the clean twins and softened logits. ``unlearn`` (the
   default): fine-tune on stamped → *true* label and (``clean_twins``) twins → true label, holding
   the twins' predictions likewise, giving θ_u, and
   τ = θ_b − θ_u — the direction from a model that ignores the trigger back to the backdoored one
   (Neural Cleanse's unlearning step, recast as a task vector so that α is chosen as in TBAR).
   See README "Removal methods" for the measurements behind the default.
3. θ(α) = θ_b − α·τ. α is chosen on the validation split, never on the test split: among α with
   CA(α) ≥ ca_floor · CA(θ_b), the lowest ASR, ties to the smaller α; with ``alpha.asr_tolerance``
   (default 0.01), the highest-CA α among those within the tolerance of that lowest ASR.
4. The test split reports before/after. The verdict is "removed" only if the chosen α meets the
   policy on the validation split *and* the test-split ASR is under the ceiling (the security claim
   is confirmed on unseen data; test CA is reported, the CA floor is judged where α is chosen).
5. Evidence (each switchable in the policy): whenever τ was negated, the weight-disentanglement
   error ξ of τ against a clean vector (:mod:`tbar_guard.disentangle`); after a "removed" verdict,
   the re-emergence ASR after a short clean fine-tune of the sanitized model
   (:mod:`tbar_guard.reemerge`), which turns the verdict to "unremoved" when it exceeds
   ``accept.max_reemergence_asr``.

α search (coarse-to-fine): evaluate the coarse grid ``min, min+coarse_step, …, max`` in order,
stopping early once ASR reaches 0 at a feasible α (nothing can beat it and ties go to the smaller
α) or two consecutive coarse points break the CA floor (CA falls as α grows); then evaluate the
fine grid strictly between the best coarse α and the next coarse point (between the previous coarse
point and the best when a smaller α may win on CA: ``asr_tolerance`` > 0 or ``best-ca``). With the default policy
that is at most 13 + 4 = 17 evaluations instead of 61 for a 0.1-step grid over [0, 6].
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tbar_guard.attacks import Trigger
from tbar_guard.clip import ZeroShotClassifier, visual_state
from tbar_guard.data import ImageSet, Splits
from tbar_guard.disentangle import Disentanglement, measure_disentanglement
from tbar_guard.errors import DataError
from tbar_guard.evaluate import Metrics, evaluate
from tbar_guard.policy import AcceptPolicy, AlphaPolicy, Policy
from tbar_guard.reemerge import Reemergence, ReemergenceConfig, measure_reemergence_under
from tbar_guard.task_vector import TaskVector
from tbar_guard.train import FinetuneConfig, finetune_visual

StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SweepPoint:
    alpha: float
    clean_accuracy: float
    attack_success_rate: float
    feasible: bool  # CA ≥ ca_floor × CA(θ_b) on the validation split


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    point: SweepPoint
    sweep: tuple[SweepPoint, ...]  # every α evaluated, sorted by α
    extended_from: float | None = None  # the α the selection rule chose before extend_inverted moved it


def extend_choice(best: SweepPoint, sweep: Sequence[SweepPoint], ca_noise: float, asr_limit: float) -> SweepPoint:
    """``sanitize.alpha.extend_inverted``: from the chosen point, the largest evaluated α reached through
    an unbroken run of larger α that each meet the CA floor, keep validation CA within ``ca_noise``
    (one standard error) of the chosen point's and ASR at most ``asr_limit``.

    Why: an *inverted* trigger's ASR floors (at the rate a random stamp already has) at a smaller α
    than the real trigger's; along the same direction the real backdoor keeps fading while clean
    accuracy does not measurably move (development zoo, bench/zoo-dev.yaml: gtsrb-blended-t3-s2's true
    ASR 14.1% at the chosen α 1.0 vs 1.0% at 1.5 with validation CA 0.752 vs 0.740)."""
    out = best
    for p in sorted((q for q in sweep if q.alpha > best.alpha), key=lambda q: q.alpha):
        if not (
            p.feasible
            and p.clean_accuracy >= best.clean_accuracy - ca_noise
            and p.attack_success_rate <= asr_limit + 1e-12
        ):
            break
        out = p
    return out


@dataclass(frozen=True)
class Removal:
    """The outcome of TBAR; ``visual`` is the sanitized image-tower state dict."""

    verdict: str  # "removed" | "unremoved" | "clean"
    reason: str
    alpha: float
    before: Metrics  # test split, θ_b
    after: Metrics  # test split, θ(α)
    val_before: Metrics
    choice: AlphaChoice | None
    forget_size: int
    trigger_vector_norm: float
    relative_norm: float  # ‖τ‖ / ‖θ_b‖
    finetune_steps: int
    seconds_finetune: float
    seconds_search: float
    visual: dict[str, torch.Tensor]
    audit_before: Metrics | None = None  # test split under the true trigger, when it is known (gate audits)
    audit_after: Metrics | None = None
    # after a clean fine-tune of the sanitized model (only when the negation met the policy)
    reemergence: Reemergence | None = None  # under the trigger removal used (the inverted one under gate)
    audit_reemergence: Reemergence | None = None  # under the true trigger (gate audits)
    reemergence_pool: str = ""  # where the clean repair images came from
    disentanglement: Disentanglement | None = None  # ξ of τ against a clean vector (whenever τ was negated)
    method: str = ""  # the policy's sanitize.method that learned τ ("" when nothing was learned)
    # gate with a reference model: its ASR under the same (inverted) trigger and the verdict's ceilings
    # (raised to it under accept.reference_rate_ceiling); None without a reference
    ceilings: ReferenceCeilings | None = None


@dataclass(frozen=True)
class ReferenceCeilings:
    """The clean reference model's ASR under the removal's (inverted) trigger on the validation and
    test splits, and the ceilings the verdict used there: max(accept.asr_ceiling, the reference's
    rate) when ``applied`` (accept.reference_rate_ceiling), else accept.asr_ceiling (the rates are
    then evidence only)."""

    reference: str  # the reference model's source
    val_rate: float
    test_rate: float
    val_ceiling: float
    test_ceiling: float
    applied: bool

    @staticmethod
    def of(reference: str, val_rate: float, test_rate: float, ceiling: float, applied: bool) -> ReferenceCeilings:
        if not applied:
            return ReferenceCeilings(reference, val_rate, test_rate, ceiling, ceiling, False)
        return ReferenceCeilings(reference, val_rate, test_rate, max(ceiling, val_rate), max(ceiling, test_rate), True)

    def to_json(self) -> dict[str, float | str | bool]:
        return {
            "reference": self.reference,
            "val_rate": self.val_rate,
            "test_rate": self.test_rate,
            "val_ceiling": self.val_ceiling,
            "test_ceiling": self.test_ceiling,
            "applied": self.applied,
        }


@dataclass(frozen=True)
class LearnedVector:
    """τ learned on a forget set, with the fine-tuning steps and seconds it took."""

    tau: TaskVector
    steps: int
    seconds: float


def forget_indices(images: ImageSet, target: int, size: int, seed: int) -> torch.Tensor:
    """Indices into ``images`` of the forget set: ``size`` non-target images drawn with ``seed``."""
    pool = torch.nonzero(images.labels != target).flatten()
    if pool.numel() == 0:
        raise DataError(f"no non-target images in the forget split (target class {target})")
    n = min(size, int(pool.numel()))
    order = torch.randperm(int(pool.numel()), generator=torch.Generator().manual_seed(seed))[:n]
    return pool[order]


def build_forget_set(
    images: ImageSet, trigger: Trigger, target: int, size: int, seed: int, strengths: Sequence[float] = (1.0,)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` non-target images stamped with ``trigger`` and labelled ``target``; with several
    ``strengths``, image i is stamped with the trigger scaled by strength i mod K (:meth:`Trigger.scaled`).

    Returns (stamped pixels, labels, the same images unstamped — their clean twins)."""
    index = forget_indices(images, target, size, seed)
    clean = images.subset(index).pixels()
    if tuple(strengths) != (1.0,):
        trigger = Trigger.set_of([trigger.scaled(s) for s in strengths])
    pixels = trigger.apply(clean, generator=torch.Generator().manual_seed(seed + 1))
    return pixels, torch.full((int(index.numel()),), target, dtype=torch.int64), clean


def repair_pool(forget_split: ImageSet, used: torch.Tensor, wanted: int) -> tuple[ImageSet, str]:
    """Clean images for the re-emergence fine-tune, never from the val or test split.

    The forget-split images the forget set did not use, when there are at least ``wanted`` of them
    and they cover every class of the split; otherwise the whole forget split (the forget set's
    clean twins included, with their true labels). On a small split the unused images are mostly
    the target class (the forget set takes non-target images first), and a one-class repair set
    would teach the model that class rather than re-test the backdoor."""
    keep = torch.ones(len(forget_split), dtype=torch.bool)
    keep[used] = False
    unused = forget_split.subset(keep)
    too_few = len(unused) < wanted
    missing = set(forget_split.labels.tolist()) - set(unused.labels.tolist())
    if not too_few and not missing:
        return unused, "forget-split images unused by the forget set"
    why = f"{wanted} wanted" if too_few else f"classes {sorted(missing)} missing from them"
    return forget_split, f"whole forget split (only {len(unused)} images unused by the forget set, {why})"


def _grid(start: float, stop: float, step: float) -> list[float]:
    count = int(round((stop - start) / step + 1e-9))
    return [round(start + i * step, 6) for i in range(count + 1) if start + i * step <= stop + 1e-9]


def choose_best(
    points: list[SweepPoint], select: str = "lowest-asr", asr_ceiling: float = 0.0, asr_tolerance: float = 0.0
) -> SweepPoint | None:
    """The policy's choice among the evaluated points.

    ``lowest-asr``: among α meeting the CA floor, the lowest ASR, ties to the smaller α. With
    ``asr_tolerance`` > 0: the highest CA among the feasible α whose ASR is within the tolerance of
    that lowest ASR (and under the ceiling whenever the lowest is), ties to the smaller α — so α does
    not trade clean accuracy for a fraction of a percent of ASR.
    ``best-ca``: among α meeting the CA floor *and* the ASR ceiling, the highest CA, ties to the
    smaller α; when no α meets the ceiling, as ``lowest-asr``.
    """
    feasible = [p for p in points if p.feasible]
    if not feasible:
        return None
    if select == "best-ca":
        passing = [p for p in feasible if p.attack_success_rate <= asr_ceiling]
        if passing:
            return max(passing, key=lambda p: (p.clean_accuracy, -p.alpha))
    lowest = min(feasible, key=lambda p: (p.attack_success_rate, p.alpha))
    if asr_tolerance <= 0:
        return lowest
    limit = lowest.attack_success_rate + asr_tolerance
    if lowest.attack_success_rate <= asr_ceiling:
        limit = min(limit, asr_ceiling)
    near = [p for p in feasible if p.attack_success_rate <= limit + 1e-12]
    return max(near, key=lambda p: (p.clean_accuracy, -p.alpha))


def search_alpha(
    measure: Callable[[float], tuple[float, float]],
    ca_reference: float,
    accept: AcceptPolicy,
    alpha: AlphaPolicy,
    progress: StageProgress | None = None,
    ca_noise: float | None = None,
) -> AlphaChoice:
    """Coarse-to-fine α search (see the module docstring). ``measure(α) -> (CA, ASR)`` on val.
    ``ca_noise``: extend the choice by :func:`extend_choice` (the gate's inverted triggers); with
    ``alpha.extend_past_zero`` the coarse search then goes on past the first α whose ASR is 0 while
    the extension could take the next α, instead of stopping there (a stop left the extension nothing
    to move to: development zoo gtsrb-sig-t6-s5, validation ASR 0 at α 1.0, true-trigger ASR 49%)."""
    floor = accept.ca_floor * ca_reference
    points: dict[float, SweepPoint] = {}

    def at(a: float) -> SweepPoint:
        if a not in points:
            ca, asr = measure(a)
            points[a] = SweepPoint(a, ca, asr, ca >= floor - 1e-12)
        return points[a]

    coarse = _grid(alpha.min, alpha.max, alpha.coarse_step)
    budget = len(coarse) + max(0, int(round(alpha.coarse_step / alpha.fine_step)) - 1)
    infeasible_run = 0
    zero: SweepPoint | None = None  # the first feasible coarse point with ASR 0 (extend_past_zero)
    for a in coarse:
        p = at(a)
        if progress:
            progress("alpha search", len(points), budget)
        if zero is not None:
            # past a zero-ASR point only while extend_choice could still take this α (so it sees the plateau)
            assert ca_noise is not None
            if not (
                p.feasible
                and p.attack_success_rate <= alpha.asr_tolerance
                and p.clean_accuracy >= zero.clean_accuracy - ca_noise
            ):
                break
            continue
        if p.feasible and p.attack_success_rate == 0.0:
            if ca_noise is None or not alpha.extend_past_zero:
                break
            zero = p
            continue
        infeasible_run = 0 if p.feasible else infeasible_run + 1
        if infeasible_run >= 2:
            break
    tolerance = alpha.asr_tolerance if alpha.select == "lowest-asr" else 0.0
    best = choose_best(list(points.values()), alpha.select, accept.asr_ceiling, tolerance)
    if best is not None:
        passing = best.attack_success_rate <= accept.asr_ceiling
        if (alpha.select == "best-ca" and passing) or tolerance > 0:  # a smaller α may qualify with more CA
            lower = max((a for a in coarse if a < best.alpha - 1e-9), default=None)
            window = (lower, best.alpha) if lower is not None else None
        else:  # a larger α may lower ASR further within the CA floor
            upper = next((a for a in coarse if a > best.alpha + 1e-9), None)
            ok = upper is not None and upper in points and best.attack_success_rate > 0
            window = (best.alpha, upper) if ok and upper is not None else None
        if window is not None:
            for a in _grid(window[0], window[1], alpha.fine_step)[1:]:
                if a < window[1] - 1e-9:
                    at(a)
                    if progress:
                        progress("alpha search", len(points), budget)
    sweep = tuple(sorted(points.values(), key=lambda p: p.alpha))
    best = choose_best(list(sweep), alpha.select, accept.asr_ceiling, tolerance)
    if best is None:  # α = min is infeasible only if min > 0; report the least damaging point
        best = max(sweep, key=lambda p: p.clean_accuracy)
    elif ca_noise is not None and best.attack_success_rate <= accept.asr_ceiling:
        # ASR may not rise by more than the selection's own tolerance, nor above the ceiling
        limit = min(best.attack_success_rate + alpha.asr_tolerance, accept.asr_ceiling)
        extended = extend_choice(best, sweep, ca_noise, limit)
        if extended is not best:
            return AlphaChoice(extended.alpha, extended, sweep, extended_from=best.alpha)
    return AlphaChoice(best.alpha, best, sweep)


def finetune_config(policy: Policy) -> FinetuneConfig:
    """The forget-set fine-tuning recipe of the policy's removal method."""
    ft, method = policy.sanitize.finetune, policy.sanitize.method
    anchored = policy.sanitize.anchored
    anchor_weight = {"anchored": anchored.anchor_weight, "unlearn": policy.sanitize.unlearn.anchor_weight}
    return FinetuneConfig(
        lr=ft.lr,
        epochs=ft.epochs,
        batch_size=ft.batch_size,
        weight_decay=ft.weight_decay,
        warmup_fraction=ft.warmup_fraction,
        grad_clip=ft.grad_clip,
        seed=policy.seed,
        temperature=anchored.temperature if method == "anchored" else 1.0,
        anchor_weight=anchor_weight.get(method, 0.0),
    )


def learn_trigger_vector(
    clf: ZeroShotClassifier,
    stamped: torch.Tensor,
    target_labels: torch.Tensor,
    twins: torch.Tensor,
    true_labels: torch.Tensor,
    policy: Policy,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TaskVector, int]:
    """τ of the policy's removal method and the fine-tuning steps it took (``clf.visual`` is θ_b on
    entry and on return).

    ``tbar``/``anchored``: τ = θ_{b+t} − θ_b, θ_{b+t} fine-tuned on the stamped images → target
    (``anchored`` also holds the victim's predictions on the clean twins). ``unlearn``: τ = θ_b − θ_u,
    θ_u fine-tuned on the stamped images → their true labels (with ``unlearn.clean_twins`` also the
    twins → their true labels; the KL term holds the twins either way): the direction from a model
    that ignores the trigger back to the backdoored one, so θ_b − 1·τ = θ_u and α > 1 extrapolates
    past it."""
    method = policy.sanitize.method
    theta_b = visual_state(clf)
    pixels, labels = stamped, (true_labels if method == "unlearn" else target_labels)
    anchor = twins if method in ("anchored", "unlearn") else None
    if method == "unlearn" and policy.sanitize.unlearn.clean_twins:
        pixels, labels, anchor = (
            torch.cat([stamped, twins]),
            torch.cat([labels, true_labels]),
            torch.cat([twins, twins]),
        )
    try:
        steps = finetune_visual(clf, pixels, labels, finetune_config(policy), progress=progress, anchor=anchor)
        tuned = visual_state(clf)
    finally:
        clf.visual.load_state_dict(theta_b)
    tau = TaskVector.between(tuned, theta_b) if method == "unlearn" else TaskVector.between(theta_b, tuned)
    return tau, steps


def learn_on_forget_set(
    clf: ZeroShotClassifier,
    splits: Splits,
    trigger: Trigger,
    target: int,
    policy: Policy,
    progress: Callable[[int, int], None] | None = None,
    known: bool = False,
) -> LearnedVector:
    """τ of the policy's method on the forget set ``remove_backdoor`` builds for (trigger, target);
    ``known``: the trigger is the real one, so ``sanitize.unlearn.known_strengths`` and ``known_epochs``
    apply (method unlearn)."""
    size, seed = policy.sanitize.forget_size, policy.seed
    used = forget_indices(splits.forget, target, size, seed)
    unlearning = policy.sanitize.method == "unlearn"
    strengths = policy.sanitize.unlearn.known_strengths if known and unlearning else (1.0,)
    epochs = policy.sanitize.unlearn.known_epochs
    if known and unlearning and epochs is not None:  # the known trigger's own unlearning length
        ft = policy.sanitize.finetune.model_copy(update={"epochs": epochs})
        policy = policy.model_copy(update={"sanitize": policy.sanitize.model_copy(update={"finetune": ft})})
    pixels, labels, twins = build_forget_set(splits.forget, trigger, target, size, seed, strengths)
    t0 = time.perf_counter()
    tau, steps = learn_trigger_vector(clf, pixels, labels, twins, splits.forget.labels[used], policy, progress)
    return LearnedVector(tau, steps, time.perf_counter() - t0)


def for_inverted_trigger(policy: Policy) -> Policy:
    """The policy a removal with an *inverted* trigger runs under: ``sanitize.agnostic_method``, when
    set, replaces ``sanitize.method`` (the method that removes a real trigger best need not be the
    one whose effect carries over from an inverted trigger to the real one)."""
    chosen = policy.sanitize.agnostic_method
    if chosen is None or chosen == policy.sanitize.method:
        return policy
    return policy.model_copy(update={"sanitize": policy.sanitize.model_copy(update={"method": chosen})})


def inverted_probe(trigger: Trigger, policy: Policy) -> Trigger | None:
    """The trigger an inverted-trigger removal measures ASR with: ``trigger`` at
    ``sanitize.alpha.inverted_probe_strength`` x its strength, or None at 1.0 (the trigger itself)."""
    strength = policy.sanitize.alpha.inverted_probe_strength
    return None if strength == 1.0 else trigger.scaled(strength)


def remove_backdoor(
    clf: ZeroShotClassifier,
    splits: Splits,
    trigger: Trigger,
    target: int,
    policy: Policy,
    progress: StageProgress | None = None,
    audit: tuple[Trigger, int] | None = None,
    learned: LearnedVector | None = None,
    inverted: bool = False,
    ceilings: ReferenceCeilings | None = None,
    probe: Trigger | None = None,
) -> Removal:
    """Run TBAR on ``clf`` (its image tower is restored to θ_b before returning).

    ``audit`` = (true trigger, true target): also report test-split metrics under it (never used to
    choose α or to decide the verdict, which rest on ``trigger``). ``learned``: τ already learned
    on this forget set (``build_forget_set`` with the same trigger, target, size and seed) by the
    policy's method — the re-inversion rounds of :mod:`tbar_guard.reinvert` — so it is not learned again.
    ``inverted``: the trigger was inverted by a scan (gate), so ``sanitize.alpha.extend_inverted`` applies
    (``sanitize.alpha.extend_known`` and ``known_asr_tolerance`` otherwise).
    ``ceilings``: the verdict's ASR ceilings on validation and test (``accept.reference_rate_ceiling``)
    with the reference's rates they come from; the α choice does not use them.
    ``probe``: the trigger that measures ASR — before and after, for the α search, the verdict and the
    evidence — when it is not ``trigger`` itself, which builds the forget set (the gate's
    ``sanitize.alpha.inverted_probe_strength``: :func:`inverted_probe`)."""
    theta_b = visual_state(clf)
    seed = policy.seed
    forget_trigger = trigger
    trigger = probe if probe is not None else trigger
    audit_before = evaluate(clf, splits.test, audit[0], audit[1], seed=seed) if audit else None
    val_before = evaluate(clf, splits.val, trigger, target, seed=seed)
    before = evaluate(clf, splits.test, trigger, target, seed=seed)
    assert val_before.attack_success_rate is not None and before.attack_success_rate is not None
    if val_before.attack_success_rate <= policy.accept.asr_ceiling:
        return Removal(
            "clean",
            f"the trigger does not work on this model: validation ASR {val_before.attack_success_rate:.3f} "
            f"<= ceiling {policy.accept.asr_ceiling}",
            0.0,
            before,
            before,
            val_before,
            None,
            0,
            0.0,
            0.0,
            0,
            0.0,
            0.0,
            theta_b,
            audit_before,
            audit_before,
        )

    used = forget_indices(splits.forget, target, policy.sanitize.forget_size, seed)
    if learned is None:
        learned = learn_on_forget_set(
            clf,
            splits,
            forget_trigger,
            target,
            policy,
            (lambda d, t: progress("fine-tune", d, t)) if progress else None,
            known=not inverted,
        )
    tau, steps, seconds_ft = learned.tau, learned.steps, learned.seconds
    base_norm = TaskVector.between({k: torch.zeros_like(v) for k, v in theta_b.items()}, theta_b).norm()
    negated = -tau

    def measure(a: float) -> tuple[float, float]:
        clf.visual.load_state_dict(negated.apply_to(theta_b, a))
        m = evaluate(clf, splits.val, trigger, target, seed=seed)
        assert m.attack_success_rate is not None
        return m.clean_accuracy, m.attack_success_rate

    t1 = time.perf_counter()
    ca_noise = None
    alpha_policy = policy.sanitize.alpha
    if alpha_policy.extend_inverted if inverted else alpha_policy.extend_known:
        # one standard error of the validation CA estimate (binomial), at the original model's CA
        ca = val_before.clean_accuracy
        ca_noise = math.sqrt(ca * (1 - ca) / max(len(splits.val), 1))
    if not inverted and alpha_policy.known_asr_tolerance is not None:  # a known trigger's own tolerance
        alpha_policy = alpha_policy.model_copy(update={"asr_tolerance": alpha_policy.known_asr_tolerance})
    choice = search_alpha(measure, val_before.clean_accuracy, policy.accept, alpha_policy, progress, ca_noise)
    seconds_search = time.perf_counter() - t1
    sanitized = negated.apply_to(theta_b, choice.alpha)
    clf.visual.load_state_dict(sanitized)
    after = evaluate(clf, splits.test, trigger, target, seed=seed)
    audit_after = evaluate(clf, splits.test, audit[0], audit[1], seed=seed) if audit else None
    clf.visual.load_state_dict(theta_b)
    assert after.attack_success_rate is not None

    accept = policy.accept
    kept = after.clean_accuracy / max(before.clean_accuracy, 1e-12)
    val_ceiling, val_words = _verdict_ceiling(accept.asr_ceiling, ceilings, "val")
    test_ceiling, test_words = _verdict_ceiling(accept.asr_ceiling, ceilings, "test")
    if not (choice.point.feasible and choice.point.attack_success_rate <= val_ceiling):
        verdict = "unremoved"
        reason = (
            f"no alpha in [{policy.sanitize.alpha.min:g}, {policy.sanitize.alpha.max:g}] keeps validation CA >= "
            f"{accept.ca_floor} x {val_before.clean_accuracy:.3f} with ASR <= {val_words}; "
            f"best feasible alpha {choice.alpha:g} leaves ASR {choice.point.attack_success_rate:.3f}"
        )
    elif after.attack_success_rate > test_ceiling:  # the security claim must hold on unseen data too
        verdict = "unremoved"
        reason = (
            f"alpha {choice.alpha:g} met the policy on the validation split, but the test-split ASR "
            f"{after.attack_success_rate:.3f} exceeds the ceiling {test_words}"
        )
    else:
        verdict = "removed"
        moved = (
            ""
            if choice.extended_from is None
            else f" (extended from {choice.extended_from:g}: validation CA within one standard error)"
        )
        reason = (
            f"alpha {choice.alpha:g}{moved}: test ASR {before.attack_success_rate:.3f} -> {after.attack_success_rate:.3f} "
            f"(ceiling {test_words}); test CA kept {kept:.3f} (the CA floor {accept.ca_floor} was met "
            f"on the validation split that chose alpha: {choice.point.clean_accuracy:.3f} vs "
            f"{val_before.clean_accuracy:.3f})"
        )

    disentanglement = None
    if policy.sanitize.disentanglement.enabled and choice.alpha > 0:  # at α = 0 nothing was negated
        disentanglement = _disentanglement(clf, splits, trigger, tau, choice.alpha, int(used.numel()), policy)
    reemergence: tuple[Reemergence, ...] = ()
    pool_note = ""
    if verdict == "removed" and policy.sanitize.reemergence.enabled:
        r = policy.sanitize.reemergence
        config_r = ReemergenceConfig(r.images, r.lr, r.epochs, r.batch_size, seed)
        pool, pool_note = repair_pool(splits.forget, used, r.images)
        attacks = [(trigger, target), *([audit] if audit else [])]
        reemergence = measure_reemergence_under(clf, sanitized, pool, splits.test, attacks, config_r)
        verdict, reason = judge_reemergence(reason, reemergence[0], accept.max_reemergence_asr)
    return Removal(
        verdict,
        reason,
        choice.alpha,
        before,
        after,
        val_before,
        choice,
        int(used.numel()),
        tau.norm(),
        tau.norm() / max(base_norm, 1e-12),
        steps,
        seconds_ft,
        seconds_search,
        sanitized,
        audit_before,
        audit_after,
        reemergence=reemergence[0] if reemergence else None,
        audit_reemergence=reemergence[1] if len(reemergence) > 1 else None,
        reemergence_pool=pool_note,
        disentanglement=disentanglement,
        method=policy.sanitize.method,
        ceilings=ceilings,
    )


def _verdict_ceiling(policy_ceiling: float, ceilings: ReferenceCeilings | None, split: str) -> tuple[float, str]:
    """The ASR ceiling the verdict uses on ``split`` ("val" | "test") and how a reason states it, with
    the clean reference's rate under the same trigger when there is a reference."""
    if ceilings is None:
        return policy_ceiling, f"{policy_ceiling:g}"
    rate, ceiling = (
        (ceilings.val_rate, ceilings.val_ceiling) if split == "val" else (ceilings.test_rate, ceilings.test_ceiling)
    )
    if ceilings.applied and ceiling <= rate:
        return ceiling, f"{ceiling:.3f}, the clean reference model's ASR under the same trigger on this split"
    off = "" if ceilings.applied else "; accept.reference_rate_ceiling is off"
    return ceiling, f"{ceiling:g} (the clean reference model's ASR under the same trigger is {rate:.3f}{off})"


def judge_reemergence(reason: str, back: Reemergence, limit: float | None) -> tuple[str, str]:
    """The verdict of a removal that met the policy, once its re-emergence ASR is known.

    "unremoved" when ``limit`` (accept.max_reemergence_asr) is set and the ASR exceeds it; the
    reason always says what was measured."""
    said = (
        f"re-emergence ASR {back.attack_success_rate:.3f} on the test split after a clean fine-tune of the "
        f"sanitized model ({back.images} images, {back.epochs} epochs, lr {back.lr:g})"
    )
    if limit is not None and back.attack_success_rate > limit:
        return "unremoved", f"{reason}; but the backdoor re-emerges: {said} exceeds accept.max_reemergence_asr {limit}"
    return "removed", f"{reason}; {said}" + (f" (max {limit})" if limit is not None else "")


def _disentanglement(
    clf: ZeroShotClassifier,
    splits: Splits,
    trigger: Trigger,
    tau: TaskVector,
    alpha: float,
    n_forget: int,
    policy: Policy,
) -> Disentanglement:
    """ξ of the removal's τ against a clean vector (``clf.visual`` is θ_b on entry and on return).

    The clean vector is fine-tuned on ``n_forget`` forget-split images (all classes, drawn with
    seed + 2) with their true labels, with the forget fine-tune's optimiser recipe and plain
    cross-entropy (no temperature, no anchor: a clean fine-tune has no clean twins to hold).
    ξ is evaluated on the first ``images`` validation images and the same images stamped."""
    d = policy.sanitize.disentanglement
    seed = policy.seed
    n = min(n_forget, len(splits.forget))
    order = torch.randperm(len(splits.forget), generator=torch.Generator().manual_seed(seed + 2))[:n]
    clean = splits.forget.subset(order)
    held_out = splits.val.subset(torch.arange(min(d.images, len(splits.val))))
    recipe = dataclasses.replace(finetune_config(policy), temperature=1.0, anchor_weight=0.0)
    return measure_disentanglement(
        clf,
        tau.vector,
        clean.pixels(),
        clean.labels,
        held_out.pixels(),
        trigger,
        alpha,
        d.alphas_clean,
        d.trigger_fractions,
        recipe,
        seed,
    )
