"""``tbar-guard demo``: the whole gate on an embedded example, in a few minutes on 2 CPU cores.

1. A local MLflow store under WORKDIR (sqlite + an artifact folder), no server.
2. A tiny CLIP trained here on the MNIST subset that ships with the package (the *base* model),
   and a fine-tune of it on poisoned data: a 3×3 white BadNet patch that sends digits to "zero".
3. The backdoored fine-tune is registered as ``demo-clip`` with alias ``candidate``.
4. ``gate models:/demo-clip@candidate``: scan (calibrated against the base model), remove with the
   inverted trigger, register ``demo-clip-sanitized`` with its audit trail, move ``production``.
The report lands in WORKDIR/report/ (same schema as ``gate``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from tbar_guard.attacks import BadNetSpec, build_trigger, spec_to_dict
from tbar_guard.bundle import save_model
from tbar_guard.errors import UsageError
from tbar_guard.pipeline import RunResult
from tbar_guard.policy import load_policy
from tbar_guard.promote import gate_uri, push_model
from tbar_guard.sanitize import StageProgress
from tbar_guard.zoo import demo_images, finetune_victim, train_foundation

MARKER = ".tbar-guard-demo"
MODEL_NAME = "demo-clip"


def fresh_workdir(workdir: Path) -> Path:
    """WORKDIR, empty but for the demo marker; refuses a non-empty folder the demo did not make."""
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise UsageError(
                f"{workdir} exists and was not made by `tbar-guard demo`",
                hint="pass an empty or new --workdir",
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by tbar-guard demo; safe to delete\n", encoding="utf-8")
    return workdir


def run_demo(
    workdir: Path, progress: StageProgress | None = None, log: Callable[[str], None] | None = None
) -> RunResult:
    say = log or (lambda _msg: None)
    torch.manual_seed(0)
    workdir = fresh_workdir(Path(workdir))
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    train, test = demo_images("train"), demo_images("test")

    say("1/4 training a tiny CLIP on the bundled MNIST subset (the clean base model)")
    foundation = train_foundation(
        train.subset(torch.arange(0, 5000)),
        epochs=10,
        progress=(lambda d, t: progress("base model", d, t)) if progress else None,
    )
    save_model(workdir / "models" / "base", foundation)

    say("2/4 planting a backdoor: fine-tuning on data poisoned with a 3x3 white patch -> 'zero'")
    spec = BadNetSpec(size=3, location="bottom-right")
    victim = finetune_victim(
        foundation,
        train.subset(torch.arange(5000, 10000)),
        build_trigger(spec, foundation.preprocess.image_size),
        target=0,
        epochs=3,
        progress=(lambda d, t: progress("backdoor", d, t)) if progress else None,
    )
    save_model(workdir / "models" / "candidate", victim)
    (workdir / "data").mkdir()
    np.savez(workdir / "data" / "clean.npz", x=test.images.permute(0, 2, 3, 1).numpy(), y=test.labels.numpy())

    policy_file = workdir / "policy.yaml"
    policy_raw = {
        "data": {"path": "data/clean.npz"},
        "detect": {"reference_models": [str(workdir / "models" / "base")]},
        "registry": {"alias": "production", "experiment": "tbar-guard-demo"},
        "trigger": spec_to_dict(spec),
        "target": "0",
    }
    policy_file.write_text(
        "# Written by `tbar-guard demo`; see policies/default.yaml for every key.\n"
        + yaml.safe_dump(policy_raw, sort_keys=False),
        encoding="utf-8",
    )
    policy = load_policy(policy_file)

    say(f"3/4 registering the backdoored model as {MODEL_NAME}@candidate in {tracking_uri}")
    push_model(
        workdir / "models" / "candidate",
        MODEL_NAME,
        "candidate",
        tracking_uri,
        artifact_location=(workdir / "mlartifacts").as_uri(),
    )

    say(f"4/4 tbar-guard gate --model models:/{MODEL_NAME}@candidate --policy {policy_file}")
    return gate_uri(
        f"models:/{MODEL_NAME}@candidate",
        None if policy.data.path is None else Path(policy.data.path),
        policy,
        workdir / "report",
        tracking_uri,
        None,
        progress,
        artifact_location=(workdir / "mlartifacts").as_uri(),
    )
