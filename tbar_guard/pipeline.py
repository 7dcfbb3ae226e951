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
    write_bundle_files,
)
from tbar_guard.clip import classifier_for, full_state, resolve_device
from tbar_guard.data import load_images, split
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


def _seeded(policy: Policy) -> None:
    torch.manual_seed(policy.seed)


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
    out = Path(out)
    if out.exists():
        raise UsageError(f"output {out} already exists", hint="choose a new --out or remove it first")
    _seeded(policy)
    dev = resolve_device(device or policy.device)
    bundle = load_model(model, arch, classes)
    target_index = bundle.task.index_of(target)
    trigger = build_trigger(trigger_spec, bundle.preprocess.image_size)
    images = load_images(data, bundle.task, bundle.preprocess.image_size)
    fractions = (policy.data.forget_fraction, policy.data.val_fraction, policy.data.test_fraction)
    splits = split(images, fractions, policy.seed)
    clf = classifier_for(bundle, dev)
    t_loaded = time.perf_counter()
    removal = remove_backdoor(clf, splits, trigger, target_index, policy, progress)

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
            "load": t_loaded - t_start,
            "finetune": removal.seconds_finetune,
            "alpha_search": removal.seconds_search,
            "total": time.perf_counter() - t_start,
        }
        report = write_report(tmp, report)
    return RunResult(removal.verdict, code, report, out)
