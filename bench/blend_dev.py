"""Development-zoo measurements behind the blend family's rule (the MNIST zoo of bench/detection.py).

Usage (from the repository root, ../shared/data present):
    .venv/bin/python bench/blend_dev.py build --work /tmp/devzoo --seeds 0 1
    .venv/bin/python bench/blend_dev.py scan --work /tmp/devzoo --seeds 0 1 [--mask] [--cells 0 8]

``build`` trains, per seed, the same models as bench/detection.py (the tiny MNIST CLIP foundation,
BadNet/Blended/WaNet/SIG victims with target 0, two clean fine-tunes with seeds 100+s and 200+s)
and saves them as bundles. ``scan`` runs the blend family (and with --mask the mask family) on
every model with the foundation as the clean reference, one JSON line per model: per family the
inferred class, robust z, score, median, ratio, held-out ASR on the model and on the reference.
The rule in the policy (blend: smallest strength < 0.7 × the median) was fixed from this output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from known_trigger import mnist

from tbar_guard.attacks import build_trigger, parse_trigger
from tbar_guard.bundle import load_bundle, save_model
from tbar_guard.clip import classifier_for
from tbar_guard.data import split
from tbar_guard.differential import (
    BlendConfig,
    DifferentialConfig,
    DifferentialResult,
    invert_blend_per_target,
    invert_per_target,
)
from tbar_guard.evaluate import evaluate
from tbar_guard.zoo import finetune_victim, train_foundation

ATTACKS = ("badnet", "blended", "wanet", "sig")
MODELS = (*ATTACKS, "clean0", "clean1")


def build(work: Path, seeds: list[int]) -> None:
    train, test = mnist("train"), mnist("test")
    for seed in seeds:
        t0 = time.perf_counter()
        foundation = train_foundation(train.subset(torch.arange(0, 5000)), epochs=10, seed=seed)
        save_model(work / f"seed{seed}-base", foundation)
        meta: dict[str, list[float | None]] = {}
        for attack in ATTACKS:
            trigger = build_trigger(parse_trigger(attack), 28)
            victim = finetune_victim(
                foundation, train.subset(torch.arange(5000, 10000)), trigger, 0, epochs=3, seed=seed
            )
            m = evaluate(classifier_for(victim), test, trigger, 0)
            save_model(work / f"seed{seed}-{attack}", victim)
            meta[attack] = [m.clean_accuracy, m.attack_success_rate]
        for k, clean_seed in enumerate((100 + seed, 200 + seed)):
            twin = finetune_victim(
                foundation, train.subset(torch.arange(5000, 10000)), None, 0, epochs=3, seed=clean_seed
            )
            save_model(work / f"seed{seed}-clean{k}", twin)
        (work / f"seed{seed}-meta.json").write_text(json.dumps(meta), encoding="utf-8")
        print(json.dumps({"seed": seed, "victims": meta, "seconds": time.perf_counter() - t0}), flush=True)


def _summary(r: DifferentialResult) -> dict[str, object]:
    t = r.per_target[r.target]
    return {
        "flag": r.flagged,
        "class": r.target,
        "z": round(r.z, 2),
        "score": round(r.area, 3),
        "median": round(r.median_area, 3),
        "ratio": round(r.area / r.median_area, 2),
        "asr": round(t.asr, 2),
        "ref_asr": round(t.reference_asr, 2),
        "s": round(r.seconds),
        "all": [round(x.area, 3) for x in r.per_target],
    }


def scan(args: argparse.Namespace) -> None:
    test = mnist("test")
    splits = split(test, (0.4, 0.3, 0.3), 0)  # the default policy's fractions and seed
    shadow, held = splits.forget.pixels()[:256], splits.val.pixels()
    for seed in args.seeds:
        ref = classifier_for(load_bundle(args.work / f"seed{seed}-base"))
        for name in args.models:
            clf = classifier_for(load_bundle(args.work / f"seed{seed}-{name}"))
            out: dict[str, object] = {"seed": seed, "model": name}
            if args.mask:
                config = DifferentialConfig(steps=args.steps, batch_size=args.batch, seed=seed)
                out["mask"] = _summary(invert_per_target(clf, shadow, held, 10, config, ref))
            for cells in args.cells:
                for w in args.weights:
                    blend = BlendConfig(
                        steps=args.steps, batch_size=args.batch, pattern_cells=cells, strength_weight=w, seed=seed
                    )
                    out[f"blend cells={cells} weight={w}"] = _summary(
                        invert_blend_per_target(clf, shadow, held, 10, blend, ref)
                    )
            print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--seeds", type=int, nargs="+", default=[0])
    s = sub.add_parser("scan")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--models", nargs="+", default=list(MODELS))
    s.add_argument("--cells", type=int, nargs="+", default=[0], help="blend pattern grid sides (0 = full resolution)")
    s.add_argument("--weights", type=float, nargs="+", default=[5.0], help="blend strength weights")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--mask", action="store_true", help="also run the mask family")
    s.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.command == "build":
        args.work.mkdir(parents=True, exist_ok=True)
        build(args.work, args.seeds)
    else:
        scan(args)


if __name__ == "__main__":
    main()
