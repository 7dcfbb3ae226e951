"""Known-trigger removal on a tiny CLIP trained here: every removal method (--methods), per attack.

Usage (from the repository root, ../shared/data present):
    .venv/bin/python bench/known_trigger.py --out bench/results/known_trigger.md [--seeds 0 1]

What it does, per seed:
  1. foundation: tiny ViT CLIP (tbar_guard.zoo.tiny_config) trained on MNIST train[0:5000] (both towers);
  2. victims: image tower fine-tuned through the frozen zero-shot head on MNIST train[5000:10000] with 10%
     poisoned (BadNet 3x3 white bottom-right, Blended 0.2 seeded noise, WaNet k=4 s=0.5, SIG delta=40 f=6),
     target class 0;
  3. sanitize data: MNIST test (10,000 images) split forget 0.4 / val 0.3 / test 0.3; forget set 1,000;
  4. each removal method through tbar_guard.pipeline.sanitize (the CLI's code path), default policy except
     the method; numbers are on the test split;
  5. re-emergence: the sanitized model fine-tuned on 1,000 clean MNIST train images (train[10000:11000]),
     lr 1e-4, 5 epochs; ASR measured again on the test split.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch

from tbar_guard.attacks import build_trigger, parse_trigger
from tbar_guard.bundle import load_bundle, save_model
from tbar_guard.clip import classifier_for
from tbar_guard.data import ImageSet, load_images, split
from tbar_guard.evaluate import evaluate
from tbar_guard.pipeline import sanitize
from tbar_guard.policy import policy_from_dict
from tbar_guard.train import FinetuneConfig, finetune_visual
from tbar_guard.zoo import finetune_victim, train_foundation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
ATTACKS = ("badnet", "blended", "wanet", "sig")


def _idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(SHARED / name) as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def mnist(split_name: str) -> ImageSet:
    prefix = "train" if split_name == "train" else "t10k"
    x = _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = _idx(f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return ImageSet(torch.from_numpy(np.repeat(x[:, None], 3, axis=1).copy()), torch.from_numpy(y))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/known_trigger.md"))
    parser.add_argument("--work", type=Path, default=Path("bench/cache/known_trigger"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["tbar", "anchored", "unlearn"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = mnist("train"), mnist("test")
    args.work.mkdir(parents=True, exist_ok=True)
    data_npz = args.work / "mnist_test.npz"
    np.savez(data_npz, x=test.images.permute(0, 2, 3, 1).numpy(), y=test.labels.numpy())
    repair = train.subset(torch.arange(10000, 11000))
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        foundation = train_foundation(train.subset(torch.arange(0, 5000)), epochs=10, seed=seed)
        found_ca = evaluate(classifier_for(foundation), test).clean_accuracy
        print(f"seed {seed}: foundation zero-shot CA {found_ca:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for attack in args.attacks:
            spec = parse_trigger(attack)
            trigger = build_trigger(spec, 28)
            victim = finetune_victim(
                foundation, train.subset(torch.arange(5000, 10000)), trigger, 0, epochs=3, seed=seed
            )
            vdir = args.work / f"seed{seed}-{attack}"
            if vdir.exists():
                import shutil

                shutil.rmtree(vdir)
            save_model(vdir / "victim", victim)
            for method in args.methods:
                policy = policy_from_dict({"seed": seed, "sanitize": {"method": method}})
                t1 = time.perf_counter()
                result = sanitize(vdir / "victim", data_npz, policy, spec, "0", vdir / f"out-{method}")
                wall = time.perf_counter() - t1
                r = result.report
                reemerge = None
                if r.get("alpha_sweep") and r["alpha"] > 0:
                    bundle = load_bundle(vdir / "victim")
                    model_dir = vdir / f"out-{method}" / "model"
                    if model_dir.exists():
                        clf = classifier_for(load_bundle(model_dir))
                        finetune_visual(
                            clf, repair.pixels(), repair.labels, FinetuneConfig(lr=1e-4, epochs=5, batch_size=64)
                        )
                        images = load_images(data_npz, bundle.task, 28)
                        splits = split(images, (0.4, 0.3, 0.3), seed)
                        reemerge = evaluate(clf, splits.test, trigger, 0).attack_success_rate
                rows.append(
                    {
                        "seed": seed,
                        "attack": attack,
                        "method": method,
                        "verdict": r["verdict"],
                        "alpha": r["alpha"],
                        "ca_before": r["before"]["clean_accuracy"],
                        "asr_before": r["before"]["attack_success_rate"],
                        "ca_after": r["after"]["clean_accuracy"],
                        "asr_after": r["after"]["attack_success_rate"],
                        "reemerge": reemerge,
                        "forget": r["forget_size"],
                        "points": len(r["alpha_sweep"]),
                        "wall": wall,
                    }
                )
                row = rows[-1]
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_table(args.out, rows, args)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def write_table(out: Path, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Known-trigger removal per method: plain TBAR, anchored TBAR, unlearn vector (tiny ViT CLIP, MNIST)",
        "",
        f"Command: `.venv/bin/python bench/known_trigger.py --seeds {' '.join(map(str, args.seeds))}` "
        "(2-core CPU, no GPU). Default policy (CA floor 0.95, ASR ceiling 0.05, forget set 1,000) except "
        "`sanitize.method`. CA/ASR in % on the test split (3,000 MNIST test images); α chosen on the "
        "validation split. Re-emergence = ASR after fine-tuning the sanitized model on 1,000 clean "
        "images (lr 1e-4, 5 epochs); – where no sanitized model was written.",
        "",
        "| seed | attack | method | verdict | α | CA before | ASR before | CA after | CA kept | ASR after | "
        "re-emergence ASR | α points | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = float(r["ca_after"]) / float(r["ca_before"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['seed']} | {r['attack']} | {r['method']} | {r['verdict']} | {float(r['alpha']):g} | "  # type: ignore[arg-type]
            f"{_pct(r['ca_before'])} | {_pct(r['asr_before'])} | {_pct(r['ca_after'])} | {kept:.3f} | "  # type: ignore[arg-type]
            f"{_pct(r['asr_after'])} | {_pct(r['reemerge'])} | {r['points']} | {float(r['wall']):.1f} |"  # type: ignore[arg-type]
        )
    failed = sorted({str(r["attack"]) for r in rows if float(r["asr_before"]) < 0.9})  # type: ignore[arg-type]
    if failed:
        lines += [
            "",
            f"Failed attacks (victim ASR < 90%, reported, not dropped): {', '.join(failed)}. WaNet with the "
            "published k=4, s=0.5 barely moves a 28-px image (a fraction of a pixel) and the 3-epoch poisoned "
            "fine-tune of this tiny tower does not learn it; its rows measure removal of a 6% ASR.",
        ]
    lines.append("")
    out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
