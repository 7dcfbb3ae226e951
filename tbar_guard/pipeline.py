"""The commands as library calls: load → stages → report. No printing, no exiting.

Every function returns a :class:`RunResult`; every failure raises a :class:`TbarGuardError`
before anything is written (outputs go through :func:`atomic_directory`), so an exception never
becomes a "clean" verdict and never leaves a half-written output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tbar_guard.attacks import TriggerSpec, build_trigger, describe, spec_to_dict
from tbar_guard.bundle import (
    ClipBundle,
    ZeroShotTask,
    atomic_directory,
    load_bundle,
    load_checkpoint,
    parse_task,
    require_new_output,
    write_bundle_files,
)
from tbar_guard.clip import ZeroShotClassifier, classifier_for, full_state, resolve_device
from tbar_guard.data import ImageSet, Splits, load_images, split
from tbar_guard.errors import UsageError
from tbar_guard.exit_codes import ExitCode
from tbar_guard.policy import Policy
from tbar_guard.report import base_report, removal_json, write_report
from tbar_guard.sanitize import StageProgress, remove_backdoor

VERDICT_EXIT = {
    "clean": ExitCode.CLEAN,
    "removed": ExitCode.BACKDOOR_REMOVED,
    "unremoved": ExitCode.UNREMOVED,
    "backdoor": ExitCode.BACKDOOR_REMOVED,
}


@dataclass(frozen=True)
class RunResult:
    verdict: str
    exit_code: ExitCode
    report: dict[str, Any]
    out: Path | None


def load_model(model: Path, arch: str | None = None, classes: Path | None = None) -> ClipBundle:
    """A bundle directory, or ``arch`` + a weights file + a ``classes`` JSON (zero-shot task)."""
    if arch is None:
        return load_bundle(model)
    if classes is None:
        raise UsageError("--arch needs --classes FILE", hint='FILE is JSON: {"classnames": [...], "templates": [...]}')
    import json

    try:
        raw = json.loads(Path(classes).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read classes file {classes}: {exc}") from None
    task: ZeroShotTask = parse_task(raw, str(classes))
    return load_checkpoint(arch, model, task)


@dataclass(frozen=True)
class Prepared:
    bundle: ClipBundle
    clf: ZeroShotClassifier
    images: ImageSet
    splits: Splits
    references: list[ClipBundle]
    device: torch.device
    seconds: float


def prepare(
    model: Path,
    data: Path | None,
    policy: Policy,
    device: str | None,
    arch: str | None = None,
    classes: Path | None = None,
    references: list[ClipBundle] | None = None,
) -> Prepared:
    """Everything a run needs: the model, its classifier, the clean splits, the reference models.

    ``references=None`` loads ``policy.detect.reference_models`` (bundle paths); a list is used as given.
    """
    t0 = time.perf_counter()
    if data is None:
        raise UsageError("no clean data given", hint="pass --data (a folder of class sub-folders or an .npz)")
    torch.manual_seed(policy.seed)
    dev = resolve_device(device or policy.device)
    bundle = load_model(model, arch, classes)
    if references is not None:  # already resolved by the caller (registry URIs)
        refs = list(references)
    else:
        refs = []
        for ref in policy.detect.reference_models:
            if ref.startswith(("models:/", "runs:/")):
                raise UsageError(
                    f"reference {ref!r} is a registry URI",
                    hint="registry references are resolved by `gate --model models:/...`; give a bundle path here",
                )
            refs.append(load_model(Path(ref)))
    images = load_images(data, bundle.task, bundle.preprocess.image_size)
    fractions = (policy.data.forget_fraction, policy.data.val_fraction, policy.data.test_fraction)
    splits = split(images, fractions, policy.seed)
    clf = classifier_for(bundle, dev)
    return Prepared(bundle, clf, images, splits, refs, dev, time.perf_counter() - t0)


def sanitize(
    model: Path,
    data: Path,
    policy: Policy,
    trigger_spec: TriggerSpec,
    target: str,
    out: Path,
    arch: str | None = None,
    classes: Path | None = None,
    progress: StageProgress | None = None,
    device: str | None = None,
) -> RunResult:
    """Known-trigger TBAR. Writes ``out/report.json``, ``out/report.md`` and, when the backdoor
    was removed under the policy, the sanitized bundle ``out/model/``."""
    t_start = time.perf_counter()
    out = require_new_output(Path(out))
    p = prepare(model, data, policy, device, arch, classes, references=[])
    bundle, images, splits, dev = p.bundle, p.images, p.splits, p.device
    target_index = bundle.task.index_of(target)
    trigger = build_trigger(trigger_spec, bundle.preprocess.image_size)
    removal = remove_backdoor(p.clf, splits, trigger, target_index, policy, progress)

    code = VERDICT_EXIT[removal.verdict]
    report = base_report("sanitize", removal.verdict, int(code), removal.reason)
    report.update(
        {
            "model": {"source": str(model), "sha256": bundle.weights_sha256},
            "output": None,
            "trigger": spec_to_dict(trigger_spec),
            "trigger_description": describe(trigger_spec),
            "target": {"index": target_index, "name": bundle.task.classnames[target_index]},
            **removal_json(removal),
            "data": {
                "source": str(data),
                "n_images": len(images),
                "splits": {"forget": len(splits.forget), "val": len(splits.val), "test": len(splits.test)},
            },
            "policy": policy.to_json(),
            "policy_sha256": policy.sha256(),
            "seed": policy.seed,
            "device": str(dev),
        }
    )
    with atomic_directory(out) as tmp:
        if removal.verdict == "removed":
            (tmp / "model").mkdir()
            digest = write_bundle_files(
                tmp / "model",
                full_state(bundle, removal.visual),
                bundle.model_cfg,
                bundle.preprocess,
                bundle.task,
            )
            report["output"] = {"path": str(out / "model"), "sha256": digest}
        report["timings"] = {
            "load": p.seconds,
            "finetune": removal.seconds_finetune,
            "alpha_search": removal.seconds_search,
            "reemergence": removal.reemergence.seconds if removal.reemergence else 0.0,
            "disentanglement": removal.disentanglement.seconds if removal.disentanglement else 0.0,
            "total": time.perf_counter() - t_start,
        }
        report = write_report(tmp, report)
    return RunResult(removal.verdict, code, report, out)
