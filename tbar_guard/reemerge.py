"""Re-emergence: does a removed backdoor come back after a short clean fine-tune?

A negated trigger vector can leave the backdoor dormant rather than gone: fine-tuning the sanitized
image tower on a few clean, correctly labelled images (the study's recipe: 1,000 images, lr 1e-4,
5 epochs) can bring the attack success rate back. :func:`measure_reemergence` runs that fine-tune
on a copy of the weights it is given and reports CA and ASR on the test split afterwards; the
classifier's image tower is restored to its entry state whatever happens.

Pure model work: no file I/O, no printing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tbar_guard.attacks import Trigger
from tbar_guard.clip import ZeroShotClassifier, visual_state
from tbar_guard.data import ImageSet
from tbar_guard.errors import DataError
from tbar_guard.evaluate import evaluate
from tbar_guard.train import FinetuneConfig, finetune_visual


@dataclass(frozen=True)
class ReemergenceConfig:
    images: int = 1000  # clean repair images (at most; fewer when the repair set is smaller)
    lr: float = 1e-4
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Reemergence:
    clean_accuracy: float  # test split, after the clean fine-tune
    attack_success_rate: float  # test split, after the clean fine-tune, under the given trigger/target
    images: int  # clean images actually used
    epochs: int
    lr: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "images": self.images,
            "epochs": self.epochs,
            "lr": self.lr,
            "seconds": self.seconds,
        }


def measure_reemergence_under(
    clf: ZeroShotClassifier,
    visual: Mapping[str, torch.Tensor],
    repair: ImageSet,
    test: ImageSet,
    attacks: Sequence[tuple[Trigger, int]],
    config: ReemergenceConfig,
) -> tuple[Reemergence, ...]:
    """One clean fine-tune of ``visual``, then CA and ASR on ``test`` under each (trigger, target).

    The repair images are ``min(config.images, len(repair))`` of ``repair`` drawn with
    ``config.seed``, trained with their own labels (plain cross-entropy through the frozen head,
    the fine-tuning schedule of :func:`finetune_visual`). ``clf.visual`` is restored on return.
    """
    if len(repair) == 0:
        raise DataError(
            "re-emergence needs clean repair images, got an empty set",
            hint="provide more clean images, or set sanitize.reemergence.enabled: false in the policy",
        )
    if not attacks:
        raise DataError("re-emergence needs at least one (trigger, target) to measure", hint="pass the removed trigger")
    n = min(config.images, len(repair))
    order = torch.randperm(len(repair), generator=torch.Generator().manual_seed(config.seed))[:n]
    chosen = repair.subset(order)
    finetune = FinetuneConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    entry = visual_state(clf)
    was_training = clf.training
    t0 = time.perf_counter()
    try:
        clf.visual.load_state_dict(dict(visual))
        finetune_visual(clf, chosen.pixels(), chosen.labels, finetune)
        results = []
        for trigger, target in attacks:
            m = evaluate(clf, test, trigger, target, seed=config.seed)
            if m.attack_success_rate is None:
                raise DataError(
                    f"the test split has no image outside the target class {target}; ASR cannot be measured",
                    hint="provide clean images of more than one class",
                )
            results.append((m.clean_accuracy, m.attack_success_rate))
    finally:
        clf.visual.load_state_dict(entry)
        clf.train(was_training)
    seconds = time.perf_counter() - t0
    return tuple(Reemergence(ca, asr, n, config.epochs, config.lr, seconds) for ca, asr in results)


def measure_reemergence(
    clf: ZeroShotClassifier,
    visual: Mapping[str, torch.Tensor],
    repair: ImageSet,
    test: ImageSet,
    trigger: Trigger,
    target: int,
    config: ReemergenceConfig,
) -> Reemergence:
    """Load ``visual`` into ``clf.visual``, fine-tune it on the clean ``repair`` images with their
    true labels, and measure CA and ASR (``trigger`` → ``target``) on ``test``.

    ``clf.visual`` is restored to its entry state before returning, also on error.
    """
    return measure_reemergence_under(clf, visual, repair, test, [(trigger, target)], config)[0]
