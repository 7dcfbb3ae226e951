"""Attack-agnostic flows: ``scan`` (is there a backdoor?) and ``gate`` (scan, then remove it).

scan: DECREE inversion on the image tower over clean shadow images → PL1 → verdict by the policy's
rule (calibrated against clean reference models by default, or the paper's fixed threshold) →
target inference with the inverted trigger on held-out images → evidence pictures.

gate: scan; if flagged and the inverted trigger is actionable, TBAR with the *inverted* trigger
and the inferred target, α chosen against the policy; when the policy names the true trigger
(audits, benchmarks) the report adds ASR under it. A crash anywhere is an error, never "clean".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tbar_guard import detect, pictures
from tbar_guard.attacks import Trigger, build_trigger, describe, spec_to_dict
from tbar_guard.bundle import ClipBundle, atomic_directory, require_new_output, write_bundle_files
from tbar_guard.clip import ZeroShotClassifier, classifier_for, full_state
from tbar_guard.data import ImageSet, Splits
from tbar_guard.differential import (
    AdditiveConfig,
    BlendConfig,
    DifferentialConfig,
    DifferentialResult,
    RelativeDecision,
    invert_additive_per_target,
    invert_blend_per_target,
    invert_per_target,
    transfer_ratio,
)
from tbar_guard.errors import DataError, UsageError
from tbar_guard.evaluate import evaluate
from tbar_guard.exit_codes import ExitCode
from tbar_guard.pipeline import VERDICT_EXIT, RunResult, prepare
from tbar_guard.policy import DetectPolicy, Policy
from tbar_guard.reinvert import Hardened, harden
from tbar_guard.report import base_report, removal_json, write_report
from tbar_guard.sanitize import (
    LearnedVector,
    ReferenceCeilings,
    Removal,
    StageProgress,
    for_inverted_trigger,
    inverted_probe,
    remove_backdoor,
)


@dataclass(frozen=True)
class Scan:
    method: str
    flagged: bool
    rule: str
    rule_note: str  # how the rule was chosen (e.g. no reference: uncalibrated)
    explanation: str
    mask: torch.Tensor  # [H, W] of the inverted trigger
    pattern: torch.Tensor  # [3, H, W]
    pl1: float  # mask area fraction
    target: detect.TargetInference
    details: dict[str, Any]  # method-specific numbers for the report
    seconds: float
    family: str = "mask"  # trigger family of the inverted trigger (differential: the one that fired most strongly)
    searched: tuple[str, ...] = ("mask",)  # trigger families the scan searched
    inversion: DifferentialResult | None = None  # differential: the deciding family's per-class result
    trigger: Trigger | None = None  # the inverted trigger as stamped (None: the mask + pattern above)

    def inverted_trigger(self) -> Trigger:
        """The inverted trigger removal and pictures use (an additive family's is not a mask + pattern)."""
        return self.trigger if self.trigger is not None else Trigger.from_mask(self.mask, self.pattern)


def decree_config(policy: Policy) -> detect.InversionConfig:
    d = policy.detect
    return detect.InversionConfig(
        steps=d.decree.steps,
        batch_size=d.batch_size,
        normalization=d.decree.normalization,
        max_seconds=d.max_seconds,
        seed=policy.seed,
    )


def differential_config(policy: Policy) -> DifferentialConfig:
    d = policy.detect
    o = d.differential
    return DifferentialConfig(
        steps=o.steps,
        batch_size=d.batch_size,
        mask_cells=o.mask_cells,
        area_weight=o.area_weight,
        reference_weight=o.reference_weight,
        z_threshold=o.z_threshold,
        area_ratio=o.area_ratio,
        max_transfer=o.max_transfer,
        targets_per_chunk=o.targets_per_chunk,
        seed=policy.seed,
        max_seconds=d.max_seconds,
    )


def blend_config(policy: Policy) -> BlendConfig:
    d = policy.detect
    o = d.differential
    return BlendConfig(
        steps=o.steps,
        batch_size=d.batch_size,
        pattern_cells=o.blend.pattern_cells,
        strength_weight=o.blend.strength_weight,
        reference_weight=o.reference_weight,
        z_threshold=o.blend.z_threshold,
        ratio=o.blend.ratio,
        max_transfer=o.max_transfer,
        targets_per_chunk=o.targets_per_chunk,
        seed=policy.seed,
        max_seconds=d.max_seconds,
    )


def additive_config(policy: Policy) -> AdditiveConfig:
    d = policy.detect
    o = d.differential
    a = o.additive
    return AdditiveConfig(
        steps=o.steps,
        batch_size=d.batch_size,
        pattern_cells=a.pattern_cells,
        shape=a.shape,
        equal_effect=a.equal_effect,
        amplitude_weight=a.amplitude_weight,
        max_amplitude=a.max_amplitude,
        reference_weight=o.reference_weight,
        z_threshold=a.z_threshold,
        ratio=a.ratio,
        max_transfer=o.max_transfer,
        targets_per_chunk=o.targets_per_chunk,
        seed=policy.seed,
        max_seconds=d.max_seconds,
        relative_ratio=a.relative_ratio,
    )


FAMILY_WORDS = {"mask": "small-mask", "blend": "full-image blend", "additive": "full-image additive"}


def run_differential(
    clf: ZeroShotClassifier,
    shadow: torch.Tensor,
    heldout: torch.Tensor,
    n_classes: int,
    policy: Policy,
    reference: ZeroShotClassifier | None,
    progress: StageProgress | None = None,
) -> tuple[DifferentialResult, dict[str, DifferentialResult]]:
    """Every family of ``detect.differential.families``; returns (the deciding result, all results).

    The scan is flagged when any family's rule fires; the deciding result is the first fired family
    in the listed order (when none fired: the first family listed, the mask family by default). The
    order, not the robust z, decides: z-scores of different families are not on one scale (an
    equal-effect family caps the classes that never reach the share, and its spread can vanish).
    Measured against the alternative "the family cheapest against its own median decides": where
    both families fired on a patch/blend victim the class was the same, and the mask trigger (whose
    removal the re-inversion rounds and companions harden) removed more of the real trigger
    (cifar10-blended-t1-s0: true-trigger ASR 4.9% after, vs 9.1% with the additive trigger).

    Unless ``detect.differential.search_all``, the families after the first that fired are not run:
    they could neither clear the verdict nor change the deciding trigger (the returned dict then
    holds the families searched, in order)."""
    results: dict[str, DifferentialResult] = {}
    for family in policy.detect.differential.families:
        if family == "mask":
            results[family] = invert_per_target(
                clf, shadow, heldout, n_classes, differential_config(policy), reference, _stage(progress, "inversion")
            )
        elif family == "blend":
            results[family] = invert_blend_per_target(
                clf, shadow, heldout, n_classes, blend_config(policy), reference, _stage(progress, "inversion (blend)")
            )
        else:
            results[family] = invert_additive_per_target(
                clf,
                shadow,
                heldout,
                n_classes,
                additive_config(policy),
                reference,
                _stage(progress, "inversion (additive)"),
            )
        if results[family].flagged and not policy.detect.differential.search_all:
            break  # a later family cannot change the verdict or the deciding trigger
    return deciding_family(results), results


def deciding_family(results: dict[str, DifferentialResult]) -> DifferentialResult:
    """Of the families' results (in the policy's order): the first that fired (see
    :func:`run_differential`); the first one when none fired."""
    fired = [r for r in results.values() if r.flagged]
    return fired[0] if fired else next(iter(results.values()))


def _score_ratio(r: DifferentialResult) -> float:
    """The smallest per-class score as a fraction of the family's median (how much cheaper than a typical class)."""
    return r.area / max(r.median_area, 1e-12)


def _family_json(r: DifferentialResult, z_threshold: float | None, ratio_threshold: float) -> dict[str, Any]:
    hit = next(t for t in r.per_target if t.target == r.target)
    transfer = transfer_ratio(hit)
    hit_class, hit_asr, hit_reference_asr = hit.effect()
    ratio = _score_ratio(r)
    return {
        "flagged": r.flagged,
        # the score rule alone (z or ratio), before the transfer check
        "area_rule_fired": (z_threshold is not None and r.z < z_threshold) or ratio < ratio_threshold,
        "target": r.target,
        "score": r.area,
        "median_score": r.median_area,
        "z_score": r.z,
        "z_threshold": z_threshold,
        "ratio": ratio,
        "ratio_threshold": ratio_threshold,
        "explanation": r.explanation,
        "target_asr": hit.asr,
        # transfer check: the share the inverted trigger sends to the target on the clean reference
        "target_reference_asr": None if math.isnan(hit.reference_asr) else hit.reference_asr,
        "transfer_ratio": None if math.isnan(transfer) else transfer,
        # where the trigger actually sends held-out images (the mode of the candidate's predictions)
        "hit_class": hit_class,
        "hit_asr": hit_asr,
        "hit_reference_asr": None if math.isnan(hit_reference_asr) else hit_reference_asr,
        "steps": r.steps,
        "seconds": r.seconds,
        # the additive family's relative rule (null when off or without a reference)
        "relative": None if r.relative is None else _relative_json(r.relative),
        "per_class": [
            {
                "index": t.target,
                "score": t.area,
                "asr": t.asr,
                "reference_asr": None if math.isnan(t.reference_asr) else t.reference_asr,
            }
            for t in r.per_target
        ],
    }


def _relative_json(rel: RelativeDecision) -> dict[str, Any]:
    return {
        "flagged": rel.flagged,
        "ratio_rule_fired": rel.fired,
        "target": rel.target,
        "quotient": rel.quotient,
        "median_quotient": rel.median_quotient,
        "ratio": rel.ratio,
        "ratio_threshold": rel.threshold,
        "explanation": rel.explanation,
        "reference_scores": list(rel.reference_scores),
        "seconds": rel.seconds,
    }


def _shadow(splits: Splits, d: DetectPolicy) -> torch.Tensor:
    n = min(d.shadow_images, len(splits.forget))
    if n < d.batch_size:
        raise DataError(
            f"only {n} clean images are available for trigger inversion, the batch size is {d.batch_size}",
            hint="provide more clean images or lower detect.batch_size in the policy",
        )
    return splits.forget.pixels()[:n]


def _stage(progress: StageProgress | None, label: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    sink = progress

    def update(done: int, total: int) -> None:
        sink(label, done, total)

    return update


def _decree(
    clf: ZeroShotClassifier,
    shadow: torch.Tensor,
    policy: Policy,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> detect.Inversion:
    mean = clf.get_buffer("mean").flatten().tolist()
    std = clf.get_buffer("std").flatten().tolist()
    return detect.invert_trigger(clf.visual, shadow, mean, std, decree_config(policy), device=device, progress=progress)


def reference_ceilings(
    ref_clf: ZeroShotClassifier, source: str, splits: Splits, trigger: Trigger, target: int, policy: Policy
) -> ReferenceCeilings:
    """The clean reference model's ASR under the inverted ``trigger`` on the validation and test splits,
    and the verdict's ceilings: raised to those rates when ``accept.reference_rate_ceiling`` is on."""
    rates = []
    for split in (splits.val, splits.test):
        rate = evaluate(ref_clf, split, trigger, target, seed=policy.seed).attack_success_rate
        assert rate is not None
        rates.append(rate)
    accept = policy.accept
    return ReferenceCeilings.of(source, rates[0], rates[1], accept.asr_ceiling, accept.reference_rate_ceiling)


def _check_references(references: list[ClipBundle], image_size: int, n_classes: int) -> None:
    for ref in references:
        if ref.preprocess.image_size != image_size:
            raise UsageError(
                f"reference model {ref.source} takes {ref.preprocess.image_size}px images, the candidate {image_size}px",
                hint="a reference must have the candidate's architecture (its base model or promoted version)",
            )
        if len(ref.task.classnames) != n_classes:
            raise UsageError(
                f"reference model {ref.source} has {len(ref.task.classnames)} classes, the candidate {n_classes}",
                hint="a reference must classify the same task (its base model or promoted version)",
            )


def run_scan(
    clf: ZeroShotClassifier,
    splits: Splits,
    policy: Policy,
    device: torch.device,
    references: list[ClipBundle],
    progress: StageProgress | None = None,
    ref_clf: ZeroShotClassifier | None = None,
) -> Scan:
    """``ref_clf``: the classifier of ``references[0]`` when the caller has built it already (the
    differential method builds it otherwise)."""
    t0 = time.perf_counter()
    d = policy.detect
    shadow = _shadow(splits, d)
    n_classes = int(clf.get_buffer("head").shape[0])
    _check_references(references, int(shadow.shape[-1]), n_classes)
    details: dict[str, Any]
    family: str = "mask"  # decree: a small mask
    searched: tuple[str, ...] = ("mask",)
    deciding: DifferentialResult | None = None
    if d.method == "differential":
        if ref_clf is None and references:
            ref_clf = classifier_for(references[0], device)
        result, by_family = run_differential(clf, shadow, splits.val.pixels(), n_classes, policy, ref_clf, progress)
        family, searched, deciding = result.family, tuple(by_family), result
        mask, pattern, pl1 = result.mask, result.pattern, result.area
        flagged = any(r.flagged for r in by_family.values())
        rule = "per-class anomaly"
        explanation = (
            "; ".join(f"{f}: {r.explanation}" for f, r in by_family.items())
            if len(by_family) > 1
            else result.explanation
        )
        note = (
            ""
            if references
            else (
                "no clean reference model was given (detect.reference_models): universal adversarial patches of the "
                "architecture are not discounted, so clean models may be flagged"
            )
        )
        o = d.differential
        thresholds: dict[str, tuple[float | None, float]] = {
            "mask": (o.z_threshold, o.area_ratio),
            "blend": (o.blend.z_threshold, o.blend.ratio),
            "additive": (o.additive.z_threshold, o.additive.ratio),
        }
        details = {
            "family": result.family,
            "z_score": result.z,
            "z_threshold": thresholds[result.family][0],
            "area_ratio": _score_ratio(result),
            "area_ratio_threshold": thresholds[result.family][1],
            "median_area": result.median_area,
            "reference": references[0].source if references else None,
            "per_class": [
                {
                    "index": t.target,
                    "area": t.area,
                    "asr": t.asr,
                    "reference_asr": None if t.reference_asr != t.reference_asr else t.reference_asr,
                }
                for t in result.per_target
            ],
            "steps": sum(r.steps for r in by_family.values()),
            "families": {f: _family_json(r, *thresholds[f]) for f, r in by_family.items()},
            # listed families not run: an earlier family fired (detect.differential.search_all is false)
            "families_not_run": [f for f in o.families if f not in by_family],
        }
    else:
        inversion = _decree(clf, shadow, policy, device, _stage(progress, "inversion"))
        refs = list(d.decree.reference_pl1)
        for i, ref in enumerate(references):
            refs.append(
                _decree(classifier_for(ref, device), shadow, policy, device, _stage(progress, f"reference {i + 1}")).pl1
            )
        note = ""
        if d.decree.rule == "calibrated" and refs:
            decision = detect.decide_calibrated(inversion.pl1, refs, d.decree.calibrated_ratio, d.decree.z_threshold)
        else:
            if d.decree.rule == "calibrated":
                note = (
                    "no clean reference was given (detect.reference_models / detect.decree.reference_pl1), so the "
                    "paper's fixed-threshold rule decided; it is known to flag clean models"
                )
            decision = detect.decide_paper(inversion.pl1, d.decree.paper_threshold)
        mask, pattern, pl1, flagged = inversion.mask, inversion.pattern, inversion.pl1, decision.flagged
        rule, explanation = decision.rule, decision.explanation
        details = {
            "l1_official": inversion.l1_official,
            "threshold": decision.threshold,
            "reference_pl1": list(decision.reference_pl1),
            "inversion_succeeded": inversion.succeeded,
            "best_cosine": inversion.best_cosine,
            "steps": inversion.steps,
        }

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = clf(pixels.to(device))
        return out

    trigger = (
        Trigger(None, int(shadow.shape[-1]), additive=deciding.additive)
        if deciding is not None and deciding.additive is not None
        else None
    )
    target = detect.infer_target(
        classify,
        splits.val.pixels(),
        mask,
        pattern,
        min_proxy_asr=d.min_proxy_asr,
        min_lift=d.min_lift,
        apply=None if trigger is None else trigger.apply,
    )
    return Scan(
        d.method,
        flagged,
        rule,
        note,
        explanation,
        mask,
        pattern,
        pl1,
        target,
        details,
        time.perf_counter() - t0,
        family,
        searched,
        deciding,
        trigger,
    )


def scan_json(scan: Scan, task_names: tuple[str, ...]) -> dict[str, Any]:
    tgt = scan.target
    return {
        "method": scan.method,
        "rule": scan.rule,
        "rule_note": scan.rule_note,
        "flagged": scan.flagged,
        "pl1": scan.pl1,
        "explanation": scan.explanation,
        "seconds": scan.seconds,
        "target_index": tgt.target,
        "target_name": task_names[tgt.target],
        "proxy_asr": tgt.proxy_asr,
        "base_rate": tgt.base_rate,
        "top3": [{"index": i, "name": task_names[i], "share": s} for i, s in tgt.top3],
        "actionable": tgt.actionable,
        "actionable_reason": tgt.reason,
        **scan.details,
    }


def write_pictures(
    directory: Path, scan: Scan, clf: ZeroShotClassifier, images: ImageSet, names: tuple[str, ...]
) -> dict[str, str]:
    trigger = scan.inverted_trigger()
    sample = images.pixels()[:8]
    stamped = trigger.apply(sample)
    device = next(clf.parameters()).device
    with torch.no_grad():
        pred_clean = clf(sample.to(device)).argmax(1).tolist()
        pred_stamped = clf(stamped.to(device)).argmax(1).tolist()
    pictures.save_mask_png(scan.mask, directory / "mask.png")
    pictures.save_pattern_png(scan.pattern, directory / "pattern.png")
    pictures.save_trigger_png(scan.mask, scan.pattern, directory / "trigger.png")
    pictures.save_examples_grid(
        sample,
        stamped,
        directory / "examples.png",
        labels_clean=[names[i] for i in pred_clean],
        labels_stamped=[names[i] for i in pred_stamped],
    )
    return {"mask": "mask.png", "pattern": "pattern.png", "trigger": "trigger.png", "examples": "examples.png"}


NOT_CLEAN_CLAIM = "no small-mask trigger found; this does not establish that the model is clean"


def searched_words(scan: Scan) -> str:
    """The trigger families a scan searched, in words ("small-mask", "small-mask or full-image blend")."""
    return " or ".join(FAMILY_WORDS[f] for f in scan.searched)


def not_clean_claim(scan: Scan) -> str:
    """The claim of a scan that found nothing; ``NOT_CLEAN_CLAIM`` when only small masks were searched."""
    if scan.searched == ("mask",):
        return NOT_CLEAN_CLAIM
    return f"no {searched_words(scan)} trigger found; this does not establish that the model is clean"


def _not_searched(scan: Scan) -> str:
    if "blend" in scan.searched or "additive" in scan.searched:
        return (
            f"that the model is clean: only {searched_words(scan)} triggers were searched for (warping, "
            "input-specific and other triggers were not), and a backdoor weaker than the clean classes' universal "
            "triggers is not anomalous"
        )
    return (
        "that the model is clean: large-area, blended, warping (WaNet), frequency (SIG) and input-specific "
        "triggers are not searched for and may be present"
    )


def claims(scan: Scan, verdict: str, names: tuple[str, ...]) -> dict[str, Any]:
    """What a scan/gate run did and did not establish, for the report (``claim``, ``established``,
    ``not_established``). The detector searches the trigger families of ``scan.searched`` only
    (small masks; with the blend family also full-image blends); a verdict of "clean" means none
    was found, never that the model is proven clean."""
    tgt = scan.target
    established: list[str] = []
    not_established: list[str] = []
    words = FAMILY_WORDS.get(scan.family, "small-mask")
    if not scan.flagged:
        established.append(
            f"{scan.method} trigger inversion found no anomalously small {searched_words(scan)} trigger for any "
            f"class ({scan.explanation})"
        )
        not_established.append(_not_searched(scan))
        claim = not_clean_claim(scan)
    else:
        size = {
            "blend": f"blend strength {scan.pl1:.3f} over the whole image",
            "additive": f"amplitude {scan.pl1:.3f} (L-inf, pixels in [0, 1]) over the whole image",
        }.get(scan.family, f"area {scan.pl1:.3f} of the image")
        established.append(
            f"a {words} trigger ({size}) sends {100 * tgt.proxy_asr:.0f}% of stamped "
            f"held-out images to class {tgt.target} ({names[tgt.target]})"
        )
        transfer = (scan.details.get("families") or {}).get(scan.family, {}).get("target_reference_asr")
        if transfer is not None:
            established.append(
                f"transfer check: the same trigger sends {100 * transfer:.0f}% of those images to class {tgt.target} "
                "on the clean reference model"
            )
        not_established.append("that the inverted trigger is the attacker's trigger (it is a functional stand-in)")
        not_established.append("that no other trigger or target class is present")
        claim = {
            "removed": f"a {words} backdoor was found and the inverted trigger was removed under the policy",
            "unremoved": f"a {words} backdoor was found and could not be removed under the policy",
        }.get(verdict, f"a {words} backdoor was found")
    if scan.rule_note:
        not_established.append(f"calibration against a clean reference model: {scan.rule_note}")
    return {"claim": claim, "established": established, "not_established": not_established}


def scan(
    model: Path,
    data: Path | None,
    policy: Policy,
    out: Path,
    device: str | None = None,
    progress: StageProgress | None = None,
    arch: str | None = None,
    classes: Path | None = None,
) -> RunResult:
    """Scan one model; writes ``out/report.json``, ``report.md`` and the evidence pictures."""
    require_new_output(out)
    p = prepare(model, data, policy, device, arch, classes)
    result = run_scan(p.clf, p.splits, policy, p.device, p.references, progress)
    verdict = "backdoor" if result.flagged else "clean"
    code = ExitCode.BACKDOOR_REMOVED if result.flagged else ExitCode.CLEAN
    reason = result.explanation
    if result.flagged and not result.target.actionable:
        reason += f"; the inverted trigger is not actionable: {result.target.reason}"
    if not result.flagged:
        reason += f"; {not_clean_claim(result)} (large-area or warping triggers are not ruled out)"
    report = base_report("scan", verdict, int(code), reason)
    report.update(
        {
            **claims(result, verdict, p.bundle.task.classnames),
            "model": {"source": str(model), "sha256": p.bundle.weights_sha256},
            "detection": scan_json(result, p.bundle.task.classnames),
            "data": {"source": str(data), "n_images": len(p.images)},
            "policy": policy.to_json(),
            "policy_sha256": policy.sha256(),
            "seed": policy.seed,
            "device": str(p.device),
            "timings": {"load": p.seconds, "scan": result.seconds},
        }
    )
    with atomic_directory(out) as tmp:
        report["pictures"] = write_pictures(tmp, result, p.clf, p.splits.test, p.bundle.task.classnames)
        report = write_report(tmp, report)
    return RunResult(verdict, code, report, out)


def hardens(policy: Policy, family: str) -> bool:
    """Whether the gate hardens an inverted trigger of the scan ``family`` under the removal ``policy``:
    method ``unlearn`` and the family in ``sanitize.unlearn.harden_families``; the mask family's
    hardening starts with the re-inversion rounds (none when ``reinvert_rounds`` is 0), the additive
    family's is the companions only (none when ``companions`` is empty)."""
    u = policy.sanitize.unlearn
    if policy.sanitize.method != "unlearn" or family not in u.harden_families:
        return False
    return u.reinvert_rounds > 0 if family == "mask" else bool(u.companions)


def gate(
    model: Path,
    data: Path | None,
    policy: Policy,
    out: Path,
    device: str | None = None,
    progress: StageProgress | None = None,
    arch: str | None = None,
    classes: Path | None = None,
    references: list[ClipBundle] | None = None,
    source: str | None = None,
) -> RunResult:
    """Scan; if flagged, remove with the inverted trigger. Writes the report and, when the
    backdoor was removed under the policy, ``out/model/``."""
    t0 = time.perf_counter()
    require_new_output(out)
    p = prepare(model, data, policy, device, arch, classes, references)
    names = p.bundle.task.classnames
    audit: tuple[Trigger, int] | None = None
    if policy.trigger is not None:
        if policy.target is None:
            raise UsageError("policy.trigger is set but policy.target is not", hint="name the true target class")
        audit = (build_trigger(policy.trigger, p.bundle.preprocess.image_size), p.bundle.task.index_of(policy.target))
    # the clean reference's classifier, built once: the scan's transfer check, the re-inversion rounds and
    # the verdict's reference rates all use it
    ref_clf = classifier_for(p.references[0], p.device) if p.references else None
    result = run_scan(p.clf, p.splits, policy, p.device, p.references, progress, ref_clf)
    removal = None
    hardened: Hardened | None = None
    trial_outcome: str | None = None  # a companion on trial: "kept" or "dropped" (the gate removed without it)
    if not result.flagged:
        verdict = "clean"
        reason = f"{result.explanation}; {not_clean_claim(result)} (large-area or warping triggers are not ruled out)"
    elif not result.target.actionable:
        verdict = "unremoved"
        reason = f"{result.explanation}; but the inverted trigger is not actionable: {result.target.reason}"
    else:
        inverted = result.inverted_trigger()
        under = for_inverted_trigger(policy)
        if result.inversion is not None and hardens(under, result.family):
            hardened = harden(
                p.clf,
                p.splits,
                result.inversion,
                result.target.target,
                under,
                differential_config(policy),
                _shadow(p.splits, policy.detect),
                ref_clf,
                progress,
                blend_config(policy),
            )
            inverted = hardened.trigger
        target = result.target.target

        def remove(trigger: Trigger, learned: LearnedVector | None) -> Removal:
            probe = inverted_probe(trigger, under)  # None: ASR is measured with the inverted trigger itself
            ceilings = None
            if ref_clf is not None:
                measured = probe if probe is not None else trigger
                ceilings = reference_ceilings(ref_clf, p.references[0].source, p.splits, measured, target, policy)
            return remove_backdoor(
                p.clf,
                p.splits,
                trigger,
                target,
                under,
                progress,
                audit,
                learned,
                inverted=True,
                ceilings=ceilings,
                probe=probe,
            )

        removal = remove(inverted, hardened.learned if hardened else None)
        trial_words = ""
        if hardened is not None and hardened.without_trial is not None:
            trial_outcome = "kept"
            if removal.verdict != "removed":
                # the companion joined on trial only (below the trial ratio, not the family's): without it
                fallback = remove(*hardened.without_trial)
                if fallback.verdict == "removed":
                    trial_words = (
                        f"; the companion blend on trial was dropped: with it the removal was {removal.verdict} "
                        f"({removal.reason})"
                    )
                    trial_outcome = "dropped"
                    inverted, removal = hardened.without_trial[0], fallback
                else:
                    trial_words = f"; without the companion blend on trial the removal was {fallback.verdict} too"
        verdict = "unremoved" if removal.verdict == "clean" else removal.verdict
        reason = f"{result.explanation}; removal: {removal.reason}{trial_words}"
    code = VERDICT_EXIT[verdict]
    report = base_report("gate", verdict, int(code), reason)
    report.update(
        {
            **claims(result, verdict, names),
            "model": {"source": source or str(model), "sha256": p.bundle.weights_sha256},
            "output": None,
            "detection": scan_json(result, names),
            "target": {"index": result.target.target, "name": names[result.target.target]},
            "data": {
                "source": str(data),
                "n_images": len(p.images),
                "splits": {"forget": len(p.splits.forget), "val": len(p.splits.val), "test": len(p.splits.test)},
            },
            "policy": policy.to_json(),
            "policy_sha256": policy.sha256(),
            "seed": policy.seed,
            "device": str(p.device),
        }
    )
    if removal is not None:
        report.update(removal_json(removal))
        report["trigger_description"] = (
            f"inverted ({result.method}, {FAMILY_WORDS.get(result.family, result.family)} family: "
            + ("additive signal)" if result.family == "additive" else "mask + pattern)")
        )
        if hardened is not None:
            report["reinversion"] = {
                "triggers": inverted.count,  # the set unlearned (less a companion on trial that was dropped)
                "max_rounds": policy.sanitize.unlearn.reinvert_rounds,
                "rounds": [r.to_json() for r in hardened.rounds],
                "companions": [c.to_json() for c in hardened.companions],
                "trial_companion": trial_outcome,
            }
            if inverted.count > 1:
                companions = 0 if trial_outcome == "dropped" else sum(c.added for c in hardened.companions)
                parts = ["the scan's"]
                if hardened.rounds:  # an additive scan's hardening runs no rounds
                    parts.append(f"{sum(r.added for r in hardened.rounds)} re-inverted on the unlearned model")
                if companions:
                    parts.append(f"{companions} companion (full-image blend)")
                report["trigger_description"] += (
                    f", {inverted.count} triggers: {', '.join(parts)} (each forget image carries one; ASR is their mean)"
                )
        strength = under.sanitize.alpha.inverted_probe_strength
        if strength != 1.0:
            report["trigger_description"] += (
                f"; ASR (alpha search, verdict, evidence) measured with it at {strength:g}x its strength"
            )
    if audit is not None and policy.trigger is not None:
        report["true_trigger"] = {
            "trigger": spec_to_dict(policy.trigger),
            "description": describe(policy.trigger),
            "target": {"index": audit[1], "name": names[audit[1]]},
            "before": removal.audit_before.to_json() if removal and removal.audit_before else None,
            "after": removal.audit_after.to_json() if removal and removal.audit_after else None,
        }
    with atomic_directory(out) as tmp:
        report["pictures"] = write_pictures(tmp, result, p.clf, p.splits.test, names)
        if removal is not None and verdict == "removed":
            (tmp / "model").mkdir()
            digest = write_bundle_files(
                tmp / "model",
                full_state(p.bundle, removal.visual),
                p.bundle.model_cfg,
                p.bundle.preprocess,
                p.bundle.task,
            )
            report["output"] = {"path": str(out / "model"), "sha256": digest}
        report["timings"] = {
            "load": p.seconds,
            "scan": result.seconds,
            "finetune": removal.seconds_finetune if removal else 0.0,
            "alpha_search": removal.seconds_search if removal else 0.0,
            "reemergence": removal.reemergence.seconds if removal and removal.reemergence else 0.0,
            "disentanglement": removal.disentanglement.seconds if removal and removal.disentanglement else 0.0,
            "total": time.perf_counter() - t0,
        }
        report = write_report(tmp, report)
    return RunResult(verdict, code, report, out)
