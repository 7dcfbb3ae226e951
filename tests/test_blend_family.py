"""The blend trigger family of the differential detector on real tiny open_clip models.

A SIG victim (the conftest foundation's image tower fine-tuned with 10% of its images carrying a
horizontal sinusoid, relabelled to class 0) cannot be expressed by a compact mask; the blend family
((1 − a)·x + a·p per class, score = the strength a) finds it with the right target, and the trigger
it hands on is an ordinary mask + pattern trigger (mask = a everywhere).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tbar_guard.attacks import Trigger, build_trigger, parse_trigger
from tbar_guard.bundle import ClipBundle, save_model
from tbar_guard.clip import classifier_for
from tbar_guard.data import ImageSet, split
from tbar_guard.differential import (
    AdditiveConfig,
    BlendConfig,
    DifferentialResult,
    TargetTrigger,
    decide,
    invert_additive_per_target,
    invert_blend_per_target,
    relative_decision,
    transfer_ratio,
)
from tbar_guard.errors import PolicyError
from tbar_guard.gate import additive_config, blend_config, deciding_family, gate, run_differential, scan
from tbar_guard.policy import Policy, policy_from_dict
from tbar_guard.zoo import finetune_victim

TARGET = 0


@pytest.fixture(scope="module")
def splits(test_images: ImageSet):  # type: ignore[no-untyped-def]
    return split(test_images, (0.4, 0.3, 0.3), 0)


@pytest.fixture(scope="module")
def sig_trigger() -> Trigger:
    return build_trigger(parse_trigger("sig"), 28)


@pytest.fixture(scope="module")
def sig_victim(foundation: ClipBundle, train_images: ImageSet, sig_trigger: Trigger) -> ClipBundle:
    return finetune_victim(foundation, train_images.subset(torch.arange(5000, 10000)), sig_trigger, TARGET, epochs=3)


# --- policy ----------------------------------------------------------------------------------


def test_families_default_and_selection() -> None:
    assert Policy().detect.differential.families == ("mask", "additive")
    p = policy_from_dict({"detect": {"differential": {"families": ["blend"]}}})
    assert p.detect.differential.families == ("blend",)


@pytest.mark.parametrize(
    ("families", "where"),
    [
        (["mask", "warp"], "detect.differential.families.1"),
        ([], "detect.differential.families"),
        (["blend", "blend"], "detect.differential"),
        ("mask", "detect.differential.families"),
    ],
)
def test_families_are_a_closed_set(families: object, where: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"detect": {"differential": {"families": families}}})
    assert any(p.startswith(where) for p in info.value.problems), info.value.problems


def test_blend_options_are_validated() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"detect": {"differential": {"blend": {"pattern_cells": -1, "ratio": 1.5, "colour": 1}}}})
    problems = " ".join(info.value.problems)
    assert "detect.differential.blend.pattern_cells" in problems
    assert "detect.differential.blend.ratio" in problems
    assert "detect.differential.blend.colour" in problems


# --- the decision rule -----------------------------------------------------------------------


def _scores(values: list[float]) -> tuple[TargetTrigger, ...]:
    return tuple(TargetTrigger(i, v, 0.9, 0.1) for i, v in enumerate(values))


def test_decide_by_ratio_and_by_z() -> None:
    spread = [0.20, 0.21, 0.19, 0.22, 0.20, 0.21, 0.19, 0.20, 0.22]
    best, median, z, flagged, why = decide(_scores([0.09, *spread]), -99.0, 0.7, "blend strength")
    assert (best, flagged) == (0, True) and median == pytest.approx(0.20) and "0.45 x the median <" in why
    best, _, z, flagged, _ = decide(_scores([0.18, *spread]), -99.0, 0.7, "blend strength")
    assert (best, flagged) == (0, False)
    best, _, z, flagged, why = decide(_scores([*spread, 0.14]), -2.5, 0.0, "blend strength")
    assert best == 9 and z < -2.5 and flagged and "robust z" in why


def _family(name: str, target: int, area: float, median: float, flagged: bool) -> DifferentialResult:
    return DifferentialResult(
        (), target, torch.zeros(2, 2), torch.zeros(3, 2, 2), area, median, -1.0, flagged, "", 1, 0.0, name
    )


def test_the_first_listed_family_that_fired_decides() -> None:
    mask = _family("mask", 4, 0.045, 0.10, True)  # 0.45 x its median
    additive = _family("additive", 9, 0.013, 0.10, True)  # 0.13 x its median: cheaper, but listed second
    assert deciding_family({"mask": mask, "additive": additive}).family == "mask"
    assert deciding_family({"additive": additive, "mask": mask}).family == "additive"  # the listed order
    cheap_but_silent = _family("additive", 9, 0.001, 0.10, False)  # did not fire: does not decide
    assert deciding_family({"mask": mask, "additive": cheap_but_silent}).family == "mask"
    quiet = _family("mask", 4, 0.09, 0.10, False)
    assert deciding_family({"mask": quiet, "additive": cheap_but_silent}) is quiet  # none fired: the first listed


def test_a_trigger_that_does_nothing_does_not_compete() -> None:
    spread = [0.20, 0.21, 0.19, 0.22, 0.20, 0.21, 0.19, 0.20, 0.22]
    shrunk = (TargetTrigger(0, 0.01, 0.12, 0.11, hit=3, hit_asr=0.2, hit_reference_asr=0.2), *_scores(spread)[1:])
    best, median, _, flagged, why = decide(shrunk, -2.5, 0.5, "mask")
    assert best != 0 and not flagged, why  # the 1% mask sends no more than 20% anywhere: not a trigger
    assert median == pytest.approx(0.20)
    nothing_works = tuple(TargetTrigger(i, v, 0.1, 0.1) for i, v in enumerate([0.01, *spread]))
    best, _, _, flagged, _ = decide(nothing_works, -2.5, 0.5, "mask")
    assert best == 0 and flagged  # when no trigger works, every class competes (as before)


def test_transfer_check_vetoes_a_trigger_that_moves_the_reference() -> None:
    spread = [0.20, 0.21, 0.19, 0.22, 0.20, 0.21, 0.19, 0.20, 0.22]
    specific = (TargetTrigger(0, 0.05, 0.99, 0.12), *_scores(spread)[1:])  # ratio 0.12
    universal = (TargetTrigger(0, 0.05, 0.55, 0.30), *_scores(spread)[1:])  # ratio 0.55
    assert transfer_ratio(specific[0]) == pytest.approx(0.12 / 0.99)
    _, _, _, flagged, why = decide(specific, -2.5, 0.5, "mask", max_transfer=0.25)
    assert flagged and "transfer to the reference 0.12 <= 0.25" in why
    _, _, _, flagged, why = decide(universal, -2.5, 0.5, "mask", max_transfer=0.25)
    assert not flagged and "0.55 > 0.25" in why and "adversarial patch" in why
    _, _, _, flagged, _ = decide(universal, -2.5, 0.5, "mask", max_transfer=None)  # check off: area rule alone
    assert flagged
    no_reference = (TargetTrigger(0, 0.05, 0.55, math.nan), *_scores(spread)[1:])
    assert math.isnan(transfer_ratio(no_reference[0]))
    _, _, _, flagged, why = decide(no_reference, -2.5, 0.5, "mask", max_transfer=0.25)
    assert flagged and "transfer" not in why  # nothing to check against: the area rule decides
    # an inversion for class 0 that missed class 0 but opens the backdoor of class 7: judged by where it sends images
    elsewhere = (TargetTrigger(0, 0.05, 0.0, 0.0, hit=7, hit_asr=0.96, hit_reference_asr=0.06), *_scores(spread)[1:])
    assert transfer_ratio(elsewhere[0]) == pytest.approx(0.06 / 0.96)
    _, _, _, flagged, why = decide(elsewhere, -2.5, 0.5, "mask", max_transfer=0.25)
    assert flagged and "sends to class 7: 96.0% on the candidate, 6.0% on the reference" in why
    assert Policy().detect.differential.max_transfer == 0.25
    with pytest.raises(PolicyError):
        policy_from_dict({"detect": {"differential": {"max_transfer": 0}}})


def test_relative_rule_finds_a_class_cheap_only_on_the_candidate() -> None:
    # class 9 is cheap on every model of the task (the reference reaches it at 0.05); class 3 is cheap
    # only on the candidate (the reference needs the largest amplitude searched): the plain rule sees
    # class 9 at 0.62 x the median and stays silent, the quotients single out class 3
    candidate = [0.20, 0.19, 0.21, 0.13, 0.22, 0.20, 0.21, 0.19, 0.22, 0.12]
    reference = [0.10, 0.09, 0.11, 0.50, 0.12, 0.10, 0.10, 0.09, 0.11, 0.05]
    pt = _scores(candidate)
    best, _, _, flagged, _ = decide(pt, None, 0.45, "additive amplitude")
    assert (best, flagged) == (9, False)
    rel, index = relative_decision(pt, tuple(reference), 0.2, None)
    assert (index, rel.target, rel.flagged, rel.fired) == (3, 3, True, True)
    assert rel.quotient == pytest.approx(0.13 / 0.50)
    assert rel.median_quotient == pytest.approx(2.0)  # the lower middle of the ten quotients (1.9 .. 2.4)
    assert rel.ratio == pytest.approx(0.26 / 2.0) and rel.threshold == 0.2
    assert "quotient (amplitude on the candidate / on the reference) of 0.26 vs a median of 2.00" in rel.explanation
    # the same class when the reference reaches it as cheaply as the others: nothing stands out
    rel, _ = relative_decision(pt, tuple(0.1 for _ in reference), 0.2, None)
    assert not rel.flagged and rel.target == 9
    # the transfer check applies to the relative rule's class as to the plain rule's
    moving = tuple(TargetTrigger(i, v, 0.95, 0.6 if i == 3 else 0.0) for i, v in enumerate(candidate))
    rel, _ = relative_decision(moving, tuple(reference), 0.2, 0.25)
    assert rel.fired and not rel.flagged and "adversarial patch" in rel.explanation


def test_relative_ratio_default_and_validation() -> None:
    assert Policy().detect.differential.additive.relative_ratio == 0.2  # fixed on the development zoo
    assert AdditiveConfig().relative_ratio == 0.2
    assert additive_config(Policy()).relative_ratio == 0.2
    p = policy_from_dict({"detect": {"differential": {"additive": {"relative_ratio": None}}}})
    assert additive_config(p).relative_ratio is None
    for bad in (0, 1, -0.1, "low"):
        with pytest.raises(PolicyError, match="relative_ratio"):
            policy_from_dict({"detect": {"differential": {"additive": {"relative_ratio": bad}}}})


# --- inversion on real tiny CLIPs ----------------------------------------------------------------


def test_blend_trigger_is_a_mask_pattern_trigger(foundation: ClipBundle, splits) -> None:  # type: ignore[no-untyped-def]
    clf = classifier_for(foundation)
    shadow = splits.forget.pixels()[:32]
    held = splits.val.pixels()[:64]
    r = invert_blend_per_target(clf, shadow, held, 10, BlendConfig(steps=3, batch_size=8))
    assert r.family == "blend" and r.steps == 3 and len(r.per_target) == 10
    assert torch.all(r.mask == r.area) and 0 < r.area < 1 and r.area == min(t.area for t in r.per_target)
    assert r.pattern.shape == (3, 28, 28) and float(r.pattern.min()) >= 0 and float(r.pattern.max()) <= 1
    trig = Trigger.from_mask(r.mask, r.pattern)
    x = held[:4]
    expected = torch.round(((1 - r.area) * x + r.area * r.pattern).clamp(0, 1) * 255) / 255
    assert torch.allclose(trig.apply(x), expected, atol=1e-6)
    assert all(t.reference_asr != t.reference_asr for t in r.per_target)  # nan: no reference given
    assert all(p.requires_grad for p in clf.parameters())  # the model is left as it was


def test_additive_trigger_adds_a_signal(foundation: ClipBundle, splits) -> None:  # type: ignore[no-untyped-def]
    clf = classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:32], splits.val.pixels()[:64]
    config = AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, shape="full", equal_effect=None)
    r = invert_additive_per_target(clf, shadow, held, 10, config)
    assert r.family == "additive" and r.steps == 3 and len(r.per_target) == 10
    assert r.area == min(t.area for t in r.per_target) and 0 < r.area < 0.4
    assert r.additive is not None and r.additive.shape == (3, 28, 28)
    assert float(r.additive.abs().max()) <= r.area + 1e-6  # the score is the L-inf amplitude
    trig = Trigger(None, 28, additive=r.additive)
    x = held[:4]
    assert torch.allclose(trig.apply(x), torch.round((x + r.additive).clamp(0, 1) * 255) / 255, atol=1e-6)
    for t in r.per_target:  # each trigger's own class and the class it actually hits
        assert 0 <= t.hit < 10 and t.hit_asr >= t.asr - 1e-9


def test_relative_rule_searches_the_reference_too(foundation: ClipBundle, badnet_victim: ClipBundle, splits) -> None:  # type: ignore[no-untyped-def]
    clf, ref = classifier_for(badnet_victim), classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:32], splits.val.pixels()[:64]
    # ratio 0: the plain rule never fires, so the relative rule is evaluated
    config = AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, ratio=0.0, relative_ratio=0.3)
    seen: list[tuple[int, int]] = []
    r = invert_additive_per_target(clf, shadow, held, 10, config, ref, lambda d, t: seen.append((d, t)))
    assert r.relative is not None and len(r.relative.reference_scores) == 10
    assert all(0 < v <= 0.4 + 1e-6 for v in r.relative.reference_scores)  # float32 scores
    i = [t.target for t in r.per_target].index(r.relative.target)
    assert r.relative.quotient == pytest.approx(r.per_target[i].area / r.relative.reference_scores[i])
    assert r.steps == 6 and "relative to the reference" in r.explanation  # one search on each model
    assert [d for d, _ in seen] == list(range(1, 7)) and {t for _, t in seen} == {6}  # one bar, never backwards
    # without the rule, or without a reference, the reference is not searched
    alone = invert_additive_per_target(clf, shadow, held, 10, config)
    assert alone.relative is None and alone.steps == 3
    off = invert_additive_per_target(
        clf,
        shadow,
        held,
        10,
        AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, ratio=0.0, relative_ratio=None),
        ref,
    )
    assert off.relative is None and off.steps == 3
    assert [t.area for t in off.per_target] == [t.area for t in r.per_target]  # the candidate's search is unchanged
    # when the plain rule fires (ratio 0.999 on the optimiser's own, untied amplitudes) the reference is not searched
    fires = AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, equal_effect=None, ratio=0.999, relative_ratio=0.3)
    seen.clear()
    fired = invert_additive_per_target(clf, shadow, held, 10, fires, ref, lambda d, t: seen.append((d, t)))
    assert fired.flagged and fired.relative is None and fired.steps == 3, fired.explanation
    assert "the relative rule was not evaluated (the plain rule fired)" in fired.explanation
    assert seen[-1] == (6, 6)  # the bar still ends full


def test_scan_report_carries_the_relative_rule(
    foundation: ClipBundle, victim_dir: Path, test_npz: Path, tmp_path: Path
) -> None:
    save_model(tmp_path / "base", foundation)
    policy = policy_from_dict(
        {
            "detect": {
                "reference_models": [str(tmp_path / "base")],
                "shadow_images": 32,
                "differential": {
                    "families": ["additive"],
                    "steps": 3,
                    # the plain rule cannot fire (ratio off, z -99), so the relative rule is evaluated
                    "additive": {"ratio": 0, "z_threshold": -99, "relative_ratio": 0.3},
                },
            }
        }
    )
    r = scan(victim_dir, test_npz, policy, tmp_path / "out").report
    rel = r["detection"]["families"]["additive"]["relative"]
    assert rel["ratio_threshold"] == 0.3 and len(rel["reference_scores"]) == 10
    assert rel["ratio"] == pytest.approx(rel["quotient"] / rel["median_quotient"])
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "additive, relative to the reference (" in markdown and rel["explanation"] in markdown


def test_separable_additive_signal_is_a_profile_across_plus_a_profile_down(foundation: ClipBundle, splits) -> None:  # type: ignore[no-untyped-def]
    clf = classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:32], splits.val.pixels()[:64]
    config = AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, shape="separable", equal_effect=None)
    r = invert_additive_per_target(clf, shadow, held, 10, config)
    assert r.additive is not None and r.additive.shape == (3, 28, 28)
    assert float(r.additive.abs().max()) <= r.area + 1e-6

    # d = tanh(a(col) + b(row)) per channel: the row-to-row steps of atanh(d) are the same in every
    # column (read where tanh is not saturated, so atanh is exact enough in float32)
    def column_spread(signal: torch.Tensor, eps: float) -> float:
        d = (signal / eps).double()
        raw = torch.atanh(d.clamp(-0.999, 0.999))
        ok = (d.abs() < 0.9)[:, 1:, :] & (d.abs() < 0.9)[:, :-1, :]
        step = raw[:, 1:, :] - raw[:, :-1, :]
        worst = 0.0
        for c in range(3):
            for i in range(step.shape[1]):
                vals = step[c, i][ok[c, i]]
                if vals.numel() > 1:
                    worst = max(worst, float(vals.max() - vals.min()))
        return worst

    assert column_spread(r.additive, r.area) < 1e-3
    assert "separable additive amplitude (L-inf)" in r.explanation
    full_config = AdditiveConfig(steps=3, batch_size=8, max_amplitude=0.4, shape="full", equal_effect=None)
    full = invert_additive_per_target(clf, shadow, held, 10, full_config)
    assert full.additive is not None
    assert column_spread(full.additive, full.area) > 0.1  # the check can fail: a full-resolution signal fails it


def test_equal_effect_score_is_the_amplitude_that_reaches_the_share(foundation: ClipBundle, splits) -> None:  # type: ignore[no-untyped-def]
    clf = classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:32], splits.val.pixels()[:64]
    level, top = 0.5, 0.4
    config = AdditiveConfig(steps=3, batch_size=8, max_amplitude=top, shape="full", equal_effect=level)
    r = invert_additive_per_target(clf, shadow, held, 10, config)
    reached = [t for t in r.per_target if t.area < top - 1e-6]
    assert reached, "no class reached the share within the largest amplitude: the check below would be empty"
    for t in reached:  # held-out (64 images) is the whole equal-effect sample here
        assert t.asr >= level
    for t in r.per_target:
        if t.area >= top - 1e-6:
            assert t.area == pytest.approx(top) and t.asr < level
    assert r.additive is not None
    eps = r.area
    with torch.no_grad():
        at = (clf((held + r.additive).clamp(0, 1)).argmax(1) == r.target).float().mean()
        below = (clf((held + r.additive * (1 - 2 * top / 1024 / eps)).clamp(0, 1)).argmax(1) == r.target).float().mean()
    assert at >= level > below  # the bisection's answer is the smallest amplitude (to 1/1024 of the range)
    assert "the one that sends 50% of held-out images there) of " in r.explanation


def test_additive_shape_is_a_closed_set() -> None:
    a = Policy().detect.differential.additive
    assert (a.shape, a.equal_effect, a.ratio) == ("separable", 0.9, 0.45)
    assert (AdditiveConfig().shape, AdditiveConfig().equal_effect, AdditiveConfig().ratio) == ("separable", 0.9, 0.45)
    p = policy_from_dict({"detect": {"differential": {"additive": {"shape": "full", "equal_effect": None}}}})
    assert (additive_config(p).shape, additive_config(p).equal_effect) == ("full", None)
    with pytest.raises(PolicyError, match="shape"):
        policy_from_dict({"detect": {"differential": {"additive": {"shape": "stripes"}}}})


def test_mask_family_is_the_same_with_or_without_blend(
    foundation: ClipBundle, badnet_victim: ClipBundle, splits
) -> None:  # type: ignore[no-untyped-def]
    clf, ref = classifier_for(badnet_victim), classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:64], splits.val.pixels()[:64]

    def policy(families: list[str]) -> Policy:
        differential = {"steps": 4, "families": families, "search_all": True}  # both run even if mask fires
        return policy_from_dict({"detect": {"batch_size": 8, "differential": differential}})

    alone, by_alone = run_differential(clf, shadow, held, 10, policy(["mask"]), ref)
    both, by_both = run_differential(clf, shadow, held, 10, policy(["mask", "blend"]), ref)
    assert set(by_alone) == {"mask"} and set(by_both) == {"mask", "blend"}
    assert [t.area for t in by_alone["mask"].per_target] == [t.area for t in by_both["mask"].per_target]
    assert by_alone["mask"].z == by_both["mask"].z and torch.equal(by_alone["mask"].mask, by_both["mask"].mask)
    assert alone.family == "mask" and both.family in ("mask", "blend")
    fired = [r for r in by_both.values() if r.flagged]
    if fired:  # the deciding family is the first fired one in the listed order
        assert both is fired[0]


@pytest.mark.slow
def test_blend_family_finds_sig_with_the_right_target_and_not_the_twin(  # type: ignore[no-untyped-def]
    foundation: ClipBundle, sig_victim: ClipBundle, clean_twin: ClipBundle, sig_trigger: Trigger, splits
) -> None:
    ref = classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:256], splits.val.pixels()
    config = blend_config(Policy())
    victim_clf = classifier_for(sig_victim)
    real = (victim_clf(sig_trigger.apply(held)).argmax(1) == TARGET).float().mean()
    assert real > 0.8  # the planted backdoor works
    r = invert_blend_per_target(victim_clf, shadow, held, 10, config, ref)
    assert r.flagged and r.target == TARGET, r.explanation
    hit = r.per_target[TARGET]
    assert hit.asr > 0.8 and hit.reference_asr < 0.5  # specific to the victim: the transfer check
    twin = invert_blend_per_target(classifier_for(clean_twin), shadow, held, 10, config, ref)
    assert not twin.flagged, twin.explanation


@pytest.mark.slow
def test_additive_family_finds_sig_and_not_the_twin(  # type: ignore[no-untyped-def]
    foundation: ClipBundle, sig_victim: ClipBundle, clean_twin: ClipBundle, splits
) -> None:
    ref = classifier_for(foundation)
    shadow, held = splits.forget.pixels()[:256], splits.val.pixels()
    config = additive_config(Policy())
    r = invert_additive_per_target(classifier_for(sig_victim), shadow, held, 10, config, ref)
    assert r.flagged and r.target == TARGET, r.explanation
    assert transfer_ratio(r.per_target[TARGET]) <= 0.25
    twin = invert_additive_per_target(classifier_for(clean_twin), shadow, held, 10, config, ref)
    assert not twin.flagged, twin.explanation
    assert r.area < twin.area


@pytest.mark.slow
def test_gate_hands_an_additive_trigger_to_removal(  # type: ignore[no-untyped-def]
    foundation: ClipBundle, sig_victim: ClipBundle, test_npz: Path, tmp_path: Path
) -> None:
    save_model(tmp_path / "base", foundation)
    save_model(tmp_path / "victim", sig_victim)
    policy = policy_from_dict(
        {
            "detect": {"reference_models": [str(tmp_path / "base")], "differential": {"families": ["additive"]}},
            "sanitize": {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}},
            "trigger": {"kind": "sig"},
            "target": "0",
        }
    )
    r = gate(tmp_path / "victim", test_npz, policy, tmp_path / "out").report
    det = r["detection"]
    assert det["flagged"] and det["family"] == "additive" and det["target_index"] == TARGET
    assert "additive signal" in r["trigger_description"] and "reinversion" not in r  # rounds: mask family only
    assert r["claim"].startswith("a full-image additive backdoor was found")
    assert r["true_trigger"]["before"]["attack_success_rate"] > 0.8
    assert r["true_trigger"]["after"]["attack_success_rate"] < 0.2, r["reason"]
    assert (tmp_path / "out" / "examples.png").is_file()


@pytest.mark.slow
def test_gate_hands_a_blend_trigger_to_removal(  # type: ignore[no-untyped-def]
    foundation: ClipBundle, sig_victim: ClipBundle, test_npz: Path, tmp_path: Path
) -> None:
    save_model(tmp_path / "base", foundation)
    save_model(tmp_path / "victim", sig_victim)
    policy = policy_from_dict(
        {
            "detect": {"reference_models": [str(tmp_path / "base")], "differential": {"families": ["blend"]}},
            "sanitize": {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}},
            "trigger": {"kind": "sig"},
            "target": "0",
        }
    )
    r = gate(tmp_path / "victim", test_npz, policy, tmp_path / "out").report
    det = r["detection"]
    assert det["flagged"] and det["family"] == "blend" and det["target_index"] == TARGET
    assert set(det["families"]) == {"blend"} and det["families"]["blend"]["flagged"]
    assert "blend" in r["trigger_description"] and r["alpha_sweep"]
    assert r["claim"].startswith("a full-image blend backdoor was found")
    assert any("transfer check" in e for e in r["established"])
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| blend | yes | 0 |" in markdown and "transfer (reference / this model)" in markdown
    assert r["true_trigger"]["before"]["attack_success_rate"] > 0.8
    assert r["true_trigger"]["after"]["attack_success_rate"] < r["true_trigger"]["before"]["attack_success_rate"]
