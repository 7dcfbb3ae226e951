"""measure_reemergence on the session BadNet victim: a clean fine-tune, CA/ASR after it, state restored."""

from __future__ import annotations

import pytest
import torch

from tbar_guard.attacks import Trigger
from tbar_guard.bundle import ClipBundle
from tbar_guard.clip import ZeroShotClassifier, classifier_for, visual_state
from tbar_guard.data import ImageSet
from tbar_guard.errors import DataError
from tbar_guard.evaluate import evaluate
from tbar_guard.reemerge import Reemergence, ReemergenceConfig, measure_reemergence, measure_reemergence_under
from tbar_guard.sanitize import judge_reemergence, repair_pool

TINY = ReemergenceConfig(images=64, lr=1e-4, epochs=1, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def clf(badnet_victim: ClipBundle) -> ZeroShotClassifier:
    return classifier_for(badnet_victim)


@pytest.fixture(scope="module")
def repair(test_images: ImageSet) -> ImageSet:
    return test_images.subset(torch.arange(1000, 1200))  # disjoint from heldout_split


@pytest.fixture(scope="module")
def heldout_split(test_images: ImageSet) -> ImageSet:
    return test_images.subset(torch.arange(0, 300))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_measures_after_a_clean_finetune_and_restores_the_tower(
    clf: ZeroShotClassifier,
    repair: ImageSet,
    heldout_split: ImageSet,
    badnet_trigger: Trigger,
    clean_twin: ClipBundle,
) -> None:
    entry = visual_state(clf)
    before = evaluate(clf, heldout_split, badnet_trigger, 0)
    r = measure_reemergence(clf, entry, repair, heldout_split, badnet_trigger, 0, TINY)
    assert isinstance(r, Reemergence)
    assert _same(visual_state(clf), entry), "clf.visual is back to its entry state"
    assert (r.images, r.epochs, r.lr) == (64, 1, 1e-4) and r.seconds > 0
    assert 0.0 <= r.clean_accuracy <= 1.0 and 0.0 <= r.attack_success_rate <= 1.0
    # the victim's backdoor survives one small clean epoch; the fine-tune moved the weights (not a no-op)
    assert r.attack_success_rate > 0.5
    # the fine-tune is real and follows the config: a destructive learning rate changes the model
    wrecked = measure_reemergence(
        clf, entry, repair, heldout_split, badnet_trigger, 0, ReemergenceConfig(64, 0.05, 1, 32)
    )
    assert wrecked.lr == 0.05 and wrecked.clean_accuracy < before.clean_accuracy - 0.1
    assert _same(visual_state(clf), entry)
    assert r.to_json() == {
        "clean_accuracy": r.clean_accuracy,
        "attack_success_rate": r.attack_success_rate,
        "images": 64,
        "epochs": 1,
        "lr": 1e-4,
        "seconds": r.seconds,
    }
    # deterministic under the seed (timing aside), and under several triggers one fine-tune serves all
    again = measure_reemergence_under(
        clf, entry, repair, heldout_split, [(badnet_trigger, 0), (badnet_trigger, 1)], TINY
    )
    assert (again[0].clean_accuracy, again[0].attack_success_rate) == (r.clean_accuracy, r.attack_success_rate)
    assert again[1].clean_accuracy == r.clean_accuracy and again[1].attack_success_rate < 0.5
    assert _same(visual_state(clf), entry)
    # the measurement is about ``visual``, not about the tower clf holds: the clean twin's stays clean
    twin = measure_reemergence(
        clf, visual_state(classifier_for(clean_twin)), repair, heldout_split, badnet_trigger, 0, TINY
    )
    assert twin.attack_success_rate < 0.2 < r.attack_success_rate
    assert _same(visual_state(clf), entry)


def test_uses_at_most_the_repair_images_given(
    clf: ZeroShotClassifier, repair: ImageSet, heldout_split: ImageSet, badnet_trigger: Trigger
) -> None:
    few = repair.subset(torch.arange(0, 10))
    r = measure_reemergence(clf, visual_state(clf), few, heldout_split, badnet_trigger, 0, TINY)
    assert r.images == 10


def test_empty_repair_set_is_a_data_error(
    clf: ZeroShotClassifier, repair: ImageSet, heldout_split: ImageSet, badnet_trigger: Trigger
) -> None:
    empty = repair.subset(torch.arange(0))
    with pytest.raises(DataError, match="repair images") as info:
        measure_reemergence(clf, visual_state(clf), empty, heldout_split, badnet_trigger, 0, TINY)
    assert "reemergence.enabled" in info.value.hint


def test_tower_restored_when_the_measurement_fails(
    clf: ZeroShotClassifier, repair: ImageSet, heldout_split: ImageSet, badnet_trigger: Trigger
) -> None:
    entry = visual_state(clf)
    only_target = heldout_split.subset(heldout_split.labels == 0)  # no non-target image: ASR undefined
    with pytest.raises(DataError, match="no image outside the target class"):
        measure_reemergence(clf, entry, repair, only_target, badnet_trigger, 0, TINY)
    assert _same(visual_state(clf), entry)
    broken = {k: v[..., :1] if v.ndim > 1 else v for k, v in entry.items()}  # wrong shapes: load fails
    with pytest.raises(RuntimeError):
        measure_reemergence(clf, broken, repair, heldout_split, badnet_trigger, 0, TINY)
    assert _same(visual_state(clf), entry)


# --- where the repair images come from, and how the policy judges the result ------------------


def _images(labels: list[int]) -> ImageSet:
    return ImageSet(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), torch.tensor(labels))


def test_repair_pool_prefers_unused_images_covering_every_class() -> None:
    split = _images([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    pool, note = repair_pool(split, torch.tensor([1, 2]), wanted=5)
    assert len(pool) == 8 and note == "forget-split images unused by the forget set"
    pool, note = repair_pool(split, torch.tensor([1, 2]), wanted=9)  # too few unused: the whole split
    assert len(pool) == 10 and "9 wanted" in note
    pool, note = repair_pool(split, torch.tensor([1, 4, 7, 9]), wanted=3)  # class 1 only in the forget set
    assert len(pool) == 10 and "classes [1] missing" in note


def _back(asr: float) -> Reemergence:
    return Reemergence(clean_accuracy=0.8, attack_success_rate=asr, images=100, epochs=5, lr=1e-4, seconds=1.0)


def test_judge_reemergence() -> None:
    verdict, reason = judge_reemergence("alpha 2: removed", _back(0.3), None)
    assert verdict == "removed" and "re-emergence ASR 0.300" in reason and reason.startswith("alpha 2: removed; ")
    verdict, reason = judge_reemergence("alpha 2: removed", _back(0.3), 0.3)
    assert verdict == "removed" and "(max 0.3)" in reason
    verdict, reason = judge_reemergence("alpha 2: removed", _back(0.31), 0.3)
    assert verdict == "unremoved"
    assert "re-emerges" in reason and "0.310" in reason and "max_reemergence_asr 0.3" in reason
