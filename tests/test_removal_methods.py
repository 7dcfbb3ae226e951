"""The pluggable removal methods: how each learns its trigger vector τ, and the policy that names them.

``unlearn`` learns τ = θ_b − θ_u from a fine-tune of the stamped forget images at their *true*
labels, so θ_b − 1·τ is that fine-tuned model; ``tbar``/``anchored`` learn τ = θ_{b+t} − θ_b from
the stamped images at the target. Everything runs on the session's real tiny BadNet victim.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tbar_guard.attacks import Trigger, parse_trigger
from tbar_guard.bundle import ClipBundle
from tbar_guard.clip import classifier_for, visual_state
from tbar_guard.data import ImageSet, split
from tbar_guard.errors import PolicyError
from tbar_guard.evaluate import evaluate
from tbar_guard.exit_codes import ExitCode
from tbar_guard.pipeline import sanitize
from tbar_guard.policy import DEFAULT_POLICY_YAML, policy_from_dict
from tbar_guard.sanitize import (
    build_forget_set,
    for_inverted_trigger,
    forget_indices,
    learn_on_forget_set,
    learn_trigger_vector,
)
from tbar_guard.task_vector import TaskVector

FORGET = 300


def _vector(victim: ClipBundle, images: ImageSet, trigger: Trigger, method: str) -> tuple[object, dict, object]:
    policy = policy_from_dict({"sanitize": {"method": method, "forget_size": FORGET}})
    splits = split(images, (0.4, 0.3, 0.3), 0)
    clf = classifier_for(victim)
    theta_b = visual_state(clf)
    stamped, target_labels, twins = build_forget_set(splits.forget, trigger, 0, FORGET, 0)
    true_labels = splits.forget.labels[forget_indices(splits.forget, 0, FORGET, 0)]
    tau, steps = learn_trigger_vector(clf, stamped, target_labels, twins, true_labels, policy)
    assert steps > 0
    return tau, theta_b, (clf, splits)


@pytest.fixture(scope="module")
def unlearn_vector(badnet_victim: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger) -> tuple:
    return _vector(badnet_victim, test_images, badnet_trigger, "unlearn")


def test_unlearn_vector_leaves_the_model_at_theta_b(unlearn_vector: tuple) -> None:
    _tau, theta_b, (clf, _splits) = unlearn_vector
    now = visual_state(clf)
    assert all(torch.equal(now[k], theta_b[k]) for k in theta_b)


def test_negating_the_unlearn_vector_once_removes_the_trigger(unlearn_vector: tuple, badnet_trigger: Trigger) -> None:
    tau, theta_b, (clf, splits) = unlearn_vector
    before = evaluate(clf, splits.val, badnet_trigger, 0)
    clf.visual.load_state_dict((-tau).apply_to(theta_b, 1.0))  # θ_b − 1·τ = θ_u
    after = evaluate(clf, splits.val, badnet_trigger, 0)
    clf.visual.load_state_dict(theta_b)
    assert before.attack_success_rate is not None and after.attack_success_rate is not None
    assert before.attack_success_rate > 0.9
    assert after.attack_success_rate < 0.1, "θ_u was trained to read stamped images at their true labels"
    # 300 forget images of a 2,000-image demo set cost this tiny tower a few points at α = 1
    assert after.clean_accuracy >= 0.9 * before.clean_accuracy


def test_unlearn_and_tbar_vectors_point_the_same_way(
    unlearn_vector: tuple, badnet_victim: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger
) -> None:
    """Both are 'toward the backdoor' vectors (negated by removal): their cosine is positive."""
    tau_u, _theta_b, _ = unlearn_vector
    tau_t, _, _ = _vector(badnet_victim, test_images, badnet_trigger, "tbar")
    cos = tau_u.dot(tau_t) / (tau_u.norm() * tau_t.norm())  # type: ignore[attr-defined]
    assert cos > 0.0, cos


def test_unlearn_meets_the_default_policy_and_mostly_stays_removed(
    victim_dir: Path, test_npz: Path, tmp_path: Path
) -> None:
    """Under the default 0.95 CA floor (which plain TBAR cannot meet on this victim, see test_sanitize),
    ``unlearn`` removes the BadNet backdoor on the test split, and a clean fine-tune does not bring it
    back to anything like its original strength."""
    policy = policy_from_dict(
        {"sanitize": {"method": "unlearn", "reemergence": {"images": 400}, "disentanglement": {"enabled": False}}}
    )
    result = sanitize(victim_dir, test_npz, policy, parse_trigger("badnet"), "0", tmp_path / "out")
    r = result.report
    assert result.verdict == "removed" and result.exit_code == ExitCode.BACKDOOR_REMOVED, r["reason"]
    assert r["policy"]["sanitize"]["method"] == r["removal_method"] == "unlearn"
    assert "(removal method `unlearn`)" in (tmp_path / "out" / "report.md").read_text()
    assert r["before"]["attack_success_rate"] > 0.9
    assert r["after"]["attack_success_rate"] <= 0.05
    assert r["after"]["clean_accuracy"] >= 0.93 * r["before"]["clean_accuracy"]  # floor judged on val
    # a clean fine-tune on the small demo set's leftover images brings back ~12% here (measured; the
    # MNIST dev zoo with 3,000 held-out images: <= 4%): far below the victim's ASR, not zero
    assert r["reemergence"]["attack_success_rate"] <= 0.25


def test_policy_lists_the_methods_and_validates_their_options() -> None:
    assert policy_from_dict({}).sanitize.method == "unlearn"
    assert policy_from_dict({"sanitize": {"method": "unlearn"}}).sanitize.unlearn.anchor_weight == 3.0
    with pytest.raises(PolicyError) as err:
        policy_from_dict({"sanitize": {"method": "forget-harder", "unlearn": {"anchor_weight": -1}}})
    paths = {p.split(":")[0] for p in err.value.problems}
    assert paths == {"sanitize.method", "sanitize.unlearn.anchor_weight"}
    assert any("'unlearn', 'anchored' or 'tbar'" in p for p in err.value.problems)
    assert "method: " in DEFAULT_POLICY_YAML and "unlearn:" in DEFAULT_POLICY_YAML


def test_an_inverted_trigger_runs_the_agnostic_method() -> None:
    mine = policy_from_dict({"seed": 3, "sanitize": {"method": "unlearn", "agnostic_method": "anchored"}})
    inverted = for_inverted_trigger(mine)
    assert inverted.sanitize.method == "anchored"
    assert inverted.seed == 3 and inverted.sanitize.forget_size == mine.sanitize.forget_size
    assert mine.sanitize.method == "unlearn", "the user's policy object is not changed"
    same = policy_from_dict({"sanitize": {"method": "tbar", "agnostic_method": None}})
    assert for_inverted_trigger(same) is same


def test_forget_set_strengths_and_their_policy(test_images: ImageSet, badnet_trigger: Trigger) -> None:
    """``sanitize.unlearn.known_strengths``: the forget set's image i is stamped at strength i mod K
    (same images, same labels, same twins); the default [1.0] is the trigger as given; bad values are
    policy errors naming the key."""
    splits = split(test_images, (0.4, 0.3, 0.3), 0)
    plain, labels, twins = build_forget_set(splits.forget, badnet_trigger, 0, 40, 0)
    mixed, labels2, twins2 = build_forget_set(splits.forget, badnet_trigger, 0, 40, 0, (0.5, 1.0))
    assert torch.equal(labels, labels2) and torch.equal(twins, twins2)
    assert torch.equal(mixed[1::2], plain[1::2])  # strength 1.0: the trigger as given
    half = badnet_trigger.scaled(0.5).apply(twins[0::2])
    assert torch.equal(mixed[0::2], half)
    assert (mixed[0::2] - twins[0::2]).abs().sum() < (plain[0::2] - twins[0::2]).abs().sum()
    assert policy_from_dict({}).sanitize.unlearn.known_strengths == (1.0,)
    assert policy_from_dict(
        {"sanitize": {"unlearn": {"known_strengths": [0.5, 1, 1.5]}}}
    ).sanitize.unlearn.known_strengths == (
        0.5,
        1.0,
        1.5,
    )
    for bad in ([], [0.0], [-1.0, 1.0], [5.0]):
        with pytest.raises(PolicyError, match="known_strengths"):
            policy_from_dict({"sanitize": {"unlearn": {"known_strengths": bad}}})


def test_known_strengths_reach_only_a_known_trigger_under_unlearn(
    badnet_victim: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger
) -> None:
    """The strengths change τ when the trigger is known and the method is unlearn; an inverted trigger
    (gate) and the other methods learn exactly the vector of the default."""
    splits = split(test_images, (0.4, 0.3, 0.3), 0)
    clf = classifier_for(badnet_victim)

    def tau(method: str, strengths: list[float], known: bool) -> TaskVector:
        policy = policy_from_dict(
            {
                "sanitize": {
                    "method": method,
                    "forget_size": 60,
                    # the strengths alone (a known trigger's own epochs, default 10, are tested below)
                    "unlearn": {"known_strengths": strengths, "known_epochs": None},
                }
            }
        )
        return learn_on_forget_set(clf, splits, badnet_trigger, 0, policy, known=known).tau

    base = tau("unlearn", [1.0], True)  # TaskVector == compares every tensor exactly
    assert tau("unlearn", [0.5, 1.0], True) != base
    assert tau("unlearn", [0.5, 1.0], False) == base
    assert tau("anchored", [0.5, 1.0], True) == tau("anchored", [1.0], True)


def test_known_epochs_lengthen_only_a_known_triggers_unlearning(
    test_images: ImageSet, badnet_victim: ClipBundle, badnet_trigger: Trigger
) -> None:
    """``sanitize.unlearn.known_epochs`` sets the unlearning fine-tune's epochs for a known trigger (twice
    the steps at 2 x the epochs); an inverted trigger and the other methods keep ``finetune.epochs``."""
    splits = split(test_images, (0.4, 0.3, 0.3), 0)
    clf = classifier_for(badnet_victim)

    def steps(method: str, known_epochs: int | None, known: bool) -> int:
        policy = policy_from_dict(
            {
                "sanitize": {
                    "method": method,
                    "forget_size": 40,
                    "finetune": {"epochs": 1},
                    "unlearn": {"known_epochs": known_epochs},
                }
            }
        )
        return learn_on_forget_set(clf, splits, badnet_trigger, 0, policy, known=known).steps

    one = steps("unlearn", None, True)
    assert steps("unlearn", 2, True) == 2 * one
    assert steps("unlearn", 2, False) == one
    assert steps("anchored", 2, True) == steps("anchored", None, True)
    with pytest.raises(PolicyError, match="known_epochs"):
        policy_from_dict({"sanitize": {"unlearn": {"known_epochs": 0}}})
