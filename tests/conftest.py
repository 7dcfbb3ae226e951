"""Shared fixtures: a tiny CLIP foundation trained at test time, a BadNet victim and its clean twin.

Everything here is session-scoped and built once (about 20 s on 2 CPU cores):

- ``foundation``: a tiny ViT CLIP trained on 5,000 shipped MNIST images (~80% zero-shot accuracy);
- ``badnet_victim``: its image tower fine-tuned on 5,000 other images, 10% stamped with a 3×3 white
  bottom-right patch and relabelled to class 0 (CA ~84%, ASR ~98%);
- ``victim_dir`` / ``clean_twin_dir``: the victim and a twin fine-tuned without poison, as bundles;
- ``test_npz``: the 2,000 shipped test images as ``x`` uint8 [N,H,W,3] and ``y`` int64 [N].

``mlflow_server`` is not defined here (tests/mlflow_server.py owns it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tbar_guard.attacks import Trigger, build_trigger, parse_trigger
from tbar_guard.bundle import ClipBundle, ZeroShotTask, save_model
from tbar_guard.data import ImageSet
from tbar_guard.zoo import DEMO_TASK, demo_images, finetune_victim, train_foundation

torch.set_num_threads(2)

VICTIM_TARGET = 0
VICTIM_TRIGGER = "badnet"


@pytest.fixture(scope="session")
def demo_task() -> ZeroShotTask:
    return DEMO_TASK


@pytest.fixture(scope="session")
def train_images() -> ImageSet:
    return demo_images("train")


@pytest.fixture(scope="session")
def test_images() -> ImageSet:
    return demo_images("test")


@pytest.fixture(scope="session")
def badnet_trigger() -> Trigger:
    return build_trigger(parse_trigger(VICTIM_TRIGGER), 28)


@pytest.fixture(scope="session")
def foundation(train_images: ImageSet) -> ClipBundle:
    return train_foundation(train_images.subset(torch.arange(0, 5000)), epochs=10)


@pytest.fixture(scope="session")
def badnet_victim(foundation: ClipBundle, train_images: ImageSet, badnet_trigger: Trigger) -> ClipBundle:
    return finetune_victim(
        foundation,
        train_images.subset(torch.arange(5000, 10000)),
        badnet_trigger,
        target=VICTIM_TARGET,
        epochs=3,
    )


@pytest.fixture(scope="session")
def clean_twin(foundation: ClipBundle, train_images: ImageSet) -> ClipBundle:
    return finetune_victim(
        foundation, train_images.subset(torch.arange(5000, 10000)), None, target=VICTIM_TARGET, epochs=3
    )


@pytest.fixture(scope="session")
def victim_dir(badnet_victim: ClipBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("victim") / "victim"
    save_model(out, badnet_victim)
    return out


@pytest.fixture(scope="session")
def clean_twin_dir(clean_twin: ClipBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean-twin") / "clean-twin"
    save_model(out, clean_twin)
    return out


@pytest.fixture(scope="session")
def test_npz(test_images: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "test.npz"
    np.savez(out, x=test_images.images.permute(0, 2, 3, 1).numpy(), y=test_images.labels.numpy())
    return out
