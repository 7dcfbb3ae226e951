"""Re-inversion rounds (tbar_guard.reinvert) on real tiny open_clip models planted at test time.

The gate unlearns the trigger its scan inverted; when that trigger is only one member of the
backdoor's family, the real trigger keeps working. Here the scan's trigger is replaced by a decoy
(a patch in the wrong corner, which this victim never learned): unlearning the decoy leaves the
BadNet backdoor in place, the re-inversion on the unlearned model finds a small specific trigger for
the target again and adds it, and unlearning the set removes the real trigger. On the clean twin the
re-inverted trigger looks like every other class's and nothing is added.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tbar_guard.attacks import Trigger, build_trigger, parse_trigger
from tbar_guard.bundle import ClipBundle
from tbar_guard.clip import ZeroShotClassifier, classifier_for, visual_state
from tbar_guard.data import ImageSet, Splits, split
from tbar_guard.differential import BlendConfig, DifferentialConfig, DifferentialResult, invert_per_target
from tbar_guard.errors import PolicyError, UsageError
from tbar_guard.evaluate import evaluate
from tbar_guard.policy import Policy, policy_from_dict
from tbar_guard.reinvert import _unlearned, harden
from tbar_guard.sanitize import LearnedVector
from tbar_guard.zoo import finetune_victim

TARGET = 0


def _patch(row: int, col: int, value: float, size: int = 28) -> Trigger:
    mask = torch.zeros(size, size)
    mask[row : row + 3, col : col + 3] = 1
    return Trigger.from_mask(mask, torch.full((3, size, size), value))


# --- trigger sets (fast) ---------------------------------------------------------------------------


def test_trigger_set_stamps_members_round_robin() -> None:
    a, b = _patch(0, 0, 1.0), _patch(25, 25, 0.0)
    both = Trigger.from_masks([a, b])
    assert both.count == 2 and a.count == 1
    x = torch.full((5, 3, 28, 28), 0.5)
    out = both.apply(x)
    for i in range(5):
        want = (a if i % 2 == 0 else b).apply(x[i : i + 1])
        assert torch.equal(out[i : i + 1], want), i
    assert Trigger.from_masks([a]) is a


def test_trigger_set_refuses_what_it_cannot_stamp() -> None:
    with pytest.raises(UsageError, match="at least one mask"):
        Trigger.from_masks([])
    with pytest.raises(UsageError, match="image sizes"):
        Trigger.from_masks([_patch(0, 0, 1.0), Trigger.from_mask(torch.ones(32, 32), torch.ones(3, 32, 32))])


def test_mixed_trigger_set_stamps_members_round_robin() -> None:
    """An additive signal and a patch in one set: image i gets member i mod 2, each stamped as it is alone."""
    signal = Trigger(None, 28, additive=torch.full((3, 28, 28), 0.1))
    patch = _patch(0, 0, 1.0)
    both = Trigger.set_of([signal, patch])
    assert both.count == 2 and both.members == (signal, patch) and both.mask is None
    x = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    out = both.apply(x)
    for i in range(5):
        want = (signal if i % 2 == 0 else patch).apply(x[i : i + 1])
        assert torch.equal(out[i : i + 1], want), i
    assert torch.equal(both.apply(x[:1]), signal.apply(x[:1]))  # a batch smaller than the set
    masks_only = Trigger.set_of([patch, _patch(25, 25, 0.0)])  # mask + pattern members: the stacked set
    assert masks_only.members == () and masks_only.mask is not None and masks_only.count == 2
    assert Trigger.set_of([signal]) is signal


def test_mixed_trigger_set_refuses_what_it_cannot_stamp() -> None:
    signal = Trigger(None, 28, additive=torch.zeros(3, 28, 28))
    with pytest.raises(UsageError, match="none"):
        Trigger.set_of([])
    with pytest.raises(UsageError, match="single triggers"):
        Trigger.set_of([signal, Trigger.from_masks([_patch(0, 0, 1.0), _patch(25, 25, 0.0)])])
    with pytest.raises(UsageError, match="image sizes"):
        Trigger.set_of([signal, Trigger(None, 32, additive=torch.zeros(3, 32, 32))])


def test_harden_families_policy() -> None:
    from tbar_guard.gate import hardens

    default = Policy()
    assert default.sanitize.unlearn.harden_families == ("mask",)
    assert hardens(default, "mask") and not hardens(default, "additive")
    both = policy_from_dict({"sanitize": {"unlearn": {"harden_families": ["mask", "additive"]}}})
    assert hardens(both, "mask") and hardens(both, "additive") and not hardens(both, "blend")
    no_companion = policy_from_dict(
        {"sanitize": {"unlearn": {"harden_families": ["mask", "additive"], "companions": []}}}
    )
    assert hardens(no_companion, "mask") and not hardens(no_companion, "additive")  # nothing to add to a signal
    no_rounds = policy_from_dict({"sanitize": {"unlearn": {"harden_families": ["additive"], "reinvert_rounds": 0}}})
    assert hardens(no_rounds, "additive") and not hardens(no_rounds, "mask")
    anchored = policy_from_dict({"sanitize": {"method": "anchored", "unlearn": {"harden_families": ["additive"]}}})
    assert not hardens(anchored, "additive")
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"sanitize": {"unlearn": {"harden_families": ["warp"]}}})
    assert any(p.startswith("sanitize.unlearn.harden_families") for p in info.value.problems), info.value.problems


def test_reinvert_rounds_policy() -> None:
    assert Policy().sanitize.unlearn.reinvert_rounds == 2
    assert policy_from_dict({"sanitize": {"unlearn": {"reinvert_rounds": 0}}}).sanitize.unlearn.reinvert_rounds == 0
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"sanitize": {"unlearn": {"reinvert_rounds": 9}}})
    assert any("sanitize.unlearn.reinvert_rounds" in p for p in info.value.problems), info.value.problems


def test_companions_policy() -> None:
    assert Policy().sanitize.unlearn.companions == ("blend",)
    assert policy_from_dict({"sanitize": {"unlearn": {"companions": []}}}).sanitize.unlearn.companions == ()
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"sanitize": {"unlearn": {"companions": ["warp"]}}})
    assert any(p.startswith("sanitize.unlearn.companions") for p in info.value.problems), info.value.problems


# --- rounds on real models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(test_images: ImageSet) -> Splits:
    return split(test_images, (0.4, 0.3, 0.3), 0)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return policy_from_dict(
        {"sanitize": {"forget_size": 400, "unlearn": {"reinvert_rounds": 1}}, "detect": {"batch_size": 16}}
    )


CONFIG = DifferentialConfig(steps=120, batch_size=16, seed=0, max_transfer=0.25)


def _asr_unlearned(
    clf: ZeroShotClassifier, theta_b: dict[str, torch.Tensor], learned: LearnedVector, splits: Splits, trigger: Trigger
) -> float:
    """Validation ASR of ``trigger`` on θ_b − τ (α = 1); ``clf.visual`` is θ_b again on return."""
    with _unlearned(clf, theta_b, learned):
        m = evaluate(clf, splits.val, trigger, TARGET)
    assert m.attack_success_rate is not None
    return m.attack_success_rate


def _decoy_scan(
    model: ClipBundle, foundation: ClipBundle, splits: Splits
) -> tuple[DifferentialResult, torch.nn.Module, torch.Tensor]:
    """A real scan of ``model``, its trigger swapped for a top-left decoy patch (the victim's is bottom-right)."""
    clf, ref = classifier_for(model), classifier_for(foundation)
    shadow = splits.forget.pixels()[:128]
    scan = invert_per_target(clf, shadow, splits.val.pixels(), 10, CONFIG, ref)
    decoy = _patch(0, 0, 0.5)
    assert decoy.mask is not None and decoy.pattern is not None
    return dataclasses.replace(scan, mask=decoy.mask[0], pattern=decoy.pattern), ref, shadow


def test_rounds_find_what_the_decoy_missed(
    badnet_victim: ClipBundle, foundation: ClipBundle, splits: Splits, badnet_trigger: Trigger, policy: Policy
) -> None:
    scan, ref, shadow = _decoy_scan(badnet_victim, foundation, splits)
    clf = classifier_for(badnet_victim)
    theta_b = visual_state(clf)
    raw = policy.to_json()
    raw["sanitize"]["unlearn"]["reinvert_rounds"] = 0
    off = policy_from_dict(raw)
    decoy_only = harden(clf, splits, scan, TARGET, off, CONFIG, shadow, ref)
    assert decoy_only.rounds == () and decoy_only.trigger.count == 1
    hardened = harden(clf, splits, scan, TARGET, policy, CONFIG, shadow, ref)
    assert all(torch.equal(v, theta_b[k]) for k, v in visual_state(clf).items()), "theta_b restored"
    assert len(hardened.rounds) == 1 and hardened.rounds[0].added, hardened.rounds[0].explanation
    assert hardened.trigger.count == 2
    first = hardened.rounds[0]
    assert first.area < 0.5 * first.median_area and first.asr > 0.5 > first.reference_asr

    def true_asr(learned: LearnedVector) -> float:
        return _asr_unlearned(clf, theta_b, learned, splits, badnet_trigger)

    before = evaluate(clf, splits.val, badnet_trigger, TARGET).attack_success_rate
    assert before is not None and before > 0.9
    decoy_asr, set_asr = true_asr(decoy_only.learned), true_asr(hardened.learned)
    assert decoy_asr > 0.5, f"the decoy alone should leave the backdoor ({decoy_asr:.3f})"
    assert set_asr < 0.1 < decoy_asr, (decoy_asr, set_asr)


def test_rounds_add_nothing_on_a_clean_model(
    clean_twin: ClipBundle, foundation: ClipBundle, splits: Splits, policy: Policy
) -> None:
    scan, ref, shadow = _decoy_scan(clean_twin, foundation, splits)
    hardened = harden(classifier_for(clean_twin), splits, scan, TARGET, policy, CONFIG, shadow, ref)
    assert len(hardened.rounds) == 1 and not hardened.rounds[0].added, hardened.rounds[0].explanation
    assert hardened.trigger.count == 1


# --- companion triggers (the flagged class inverted as a full-image blend) --------------------------


@pytest.fixture(scope="module")
def blended_trigger() -> Trigger:
    return build_trigger(parse_trigger("blended:alpha=0.2,seed=0"), 28)


@pytest.fixture(scope="module")
def blended_victim(foundation: ClipBundle, train_images: ImageSet, blended_trigger: Trigger) -> ClipBundle:
    return finetune_victim(
        foundation, train_images.subset(torch.arange(5000, 10000)), blended_trigger, TARGET, epochs=3
    )


@pytest.mark.slow
def test_blend_companion_reaches_a_blended_backdoor_the_mask_missed(
    blended_victim: ClipBundle, foundation: ClipBundle, splits: Splits, blended_trigger: Trigger, policy: Policy
) -> None:
    """A blended backdoor is no small mask: unlearning the scan's mask trigger (here a decoy) leaves it.
    The blend companion inverted for the flagged class works, is specific, joins the forget set, and
    unlearning the set removes the real blended trigger."""
    scan, ref, shadow = _decoy_scan(blended_victim, foundation, splits)
    clf = classifier_for(blended_victim)
    theta_b = visual_state(clf)
    raw = policy.to_json()
    raw["sanitize"]["unlearn"]["reinvert_rounds"] = 0
    decoy_only = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref)
    raw["sanitize"]["unlearn"]["companions"] = ["blend"]
    blend = BlendConfig(steps=120, batch_size=16, seed=0)
    with_companion = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref, blend=blend)
    assert decoy_only.companions == () and decoy_only.trigger.count == 1
    (companion,) = with_companion.companions
    assert companion.added and companion.asr >= 0.5 > companion.reference_asr, companion.explanation
    assert companion.score < 0.7 * companion.median_score, companion.explanation
    assert with_companion.trigger.count == 2
    assert all(torch.equal(v, theta_b[k]) for k, v in visual_state(clf).items()), "theta_b restored"

    def true_asr(learned: LearnedVector) -> float:
        return _asr_unlearned(clf, theta_b, learned, splits, blended_trigger)

    before = evaluate(clf, splits.val, blended_trigger, TARGET).attack_success_rate
    assert before is not None and before > 0.9
    decoy_asr, set_asr = true_asr(decoy_only.learned), true_asr(with_companion.learned)
    assert decoy_asr > 0.5, f"the decoy alone should leave the backdoor ({decoy_asr:.3f})"
    assert set_asr < 0.25 < 0.5 < decoy_asr, (decoy_asr, set_asr)  # measured: 0.90 -> 0.19 at alpha 1


@pytest.mark.slow
def test_blend_companion_stays_out_once_the_mask_rounds_removed_a_patch(
    badnet_victim: ClipBundle, foundation: ClipBundle, splits: Splits, policy: Policy
) -> None:
    """On a BadNet victim the round finds the patch the decoy missed; on the model unlearned with both
    masks the target's blend is no weaker than other classes' blends, so no companion joins (on the
    benchmark zoo, a blend that joined diluted the set and let the real patch survive)."""
    scan, ref, shadow = _decoy_scan(badnet_victim, foundation, splits)
    raw = policy.to_json()
    raw["sanitize"]["unlearn"]["companions"] = ["blend"]
    blend = BlendConfig(steps=120, batch_size=16, seed=0)
    clf = classifier_for(badnet_victim)
    hardened = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref, blend=blend)
    assert hardened.rounds[0].added, hardened.rounds[0].explanation
    (companion,) = hardened.companions
    assert not companion.added, companion.explanation
    assert hardened.trigger.count == 2  # the decoy and the re-inverted patch


def test_companion_trial_ratio_policy() -> None:
    assert Policy().sanitize.unlearn.companion_trial_ratio == 0.99  # on by default since session 12
    off = policy_from_dict({"sanitize": {"unlearn": {"companion_trial_ratio": None}}})
    assert off.sanitize.unlearn.companion_trial_ratio is None
    for bad in (0, 1.5):
        with pytest.raises(PolicyError) as info:
            policy_from_dict({"sanitize": {"unlearn": {"companion_trial_ratio": bad}}})
        assert any(p.startswith("sanitize.unlearn.companion_trial_ratio") for p in info.value.problems), bad


@pytest.mark.slow
def test_blend_companion_joins_on_trial_and_leaves_the_set_without_it(
    blended_victim: ClipBundle, foundation: ClipBundle, splits: Splits, policy: Policy
) -> None:
    """With the family's join ratio lowered to 0.1 x the median, the Blended victim's companion (below
    0.7 x: the test above) no longer joins outright; under a trial ratio of 1.0 it joins on trial, and
    the hardened result keeps the set and τ without it for the gate's fallback. Without a trial ratio
    it stays out."""
    scan, ref, shadow = _decoy_scan(blended_victim, foundation, splits)
    clf = classifier_for(blended_victim)
    raw = policy.to_json()
    raw["sanitize"]["unlearn"].update({"reinvert_rounds": 0, "companions": ["blend"], "companion_trial_ratio": 1.0})
    blend = BlendConfig(steps=120, batch_size=16, seed=0, ratio=0.1)
    hardened = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref, blend=blend)
    (companion,) = hardened.companions
    assert companion.added and companion.trial, companion.explanation
    assert 0.1 * companion.median_score <= companion.score < companion.median_score, companion.explanation
    assert "on trial below 1 x" in companion.explanation and "added to the forget set on trial" in companion.explanation
    assert companion.to_json()["trial"] is True
    assert hardened.trigger.count == 2  # the decoy and the blend on trial
    assert hardened.without_trial is not None
    without, learned = hardened.without_trial
    assert without.count == 1
    assert learned.tau != hardened.learned.tau  # τ learned once more with the blend
    raw["sanitize"]["unlearn"]["companion_trial_ratio"] = None
    strict = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref, blend=blend)
    assert not strict.companions[0].added and not strict.companions[0].trial, strict.companions[0].explanation
    assert strict.without_trial is None and strict.trigger.count == 1
    assert strict.learned.tau == learned.tau  # the same τ as the fallback: the decoy alone, same seeds


@pytest.mark.slow
def test_an_additive_scan_gets_the_companion_and_no_rounds(
    blended_victim: ClipBundle, foundation: ClipBundle, splits: Splits, blended_trigger: Trigger, policy: Policy
) -> None:
    """A scan decided by the additive family (here a decoy: a weak uniform signal this victim never
    learned) starts the set with its signal; the mask rounds do not run (rounds 1 in the policy), the
    blend companion does, joins, and unlearning the mixed set removes the real blended trigger that
    unlearning the signal alone leaves."""
    scan, ref, shadow = _decoy_scan(blended_victim, foundation, splits)
    signal = torch.full((3, 28, 28), 0.05)
    scan = dataclasses.replace(scan, family="additive", additive=signal)
    clf = classifier_for(blended_victim)
    theta_b = visual_state(clf)
    raw = policy.to_json()
    raw["sanitize"]["unlearn"]["companions"] = []
    signal_only = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref)
    assert signal_only.rounds == () and signal_only.companions == () and signal_only.trigger.count == 1
    assert signal_only.trigger.additive is not None and torch.equal(signal_only.trigger.additive, signal)
    raw["sanitize"]["unlearn"]["companions"] = ["blend"]
    blend = BlendConfig(steps=120, batch_size=16, seed=0)
    hardened = harden(clf, splits, scan, TARGET, policy_from_dict(raw), CONFIG, shadow, ref, blend=blend)
    assert hardened.rounds == ()
    (companion,) = hardened.companions
    assert companion.added, companion.explanation
    assert hardened.trigger.count == 2
    first, second = hardened.trigger.members
    assert first.additive is not None and torch.equal(first.additive, signal) and second.mask is not None
    assert all(torch.equal(v, theta_b[k]) for k, v in visual_state(clf).items()), "theta_b restored"
    signal_asr = _asr_unlearned(clf, theta_b, signal_only.learned, splits, blended_trigger)
    set_asr = _asr_unlearned(clf, theta_b, hardened.learned, splits, blended_trigger)
    assert signal_asr > 0.5, f"the decoy signal alone should leave the backdoor ({signal_asr:.3f})"
    assert set_asr < 0.25 < 0.5 < signal_asr, (signal_asr, set_asr)
