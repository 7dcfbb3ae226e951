"""Attack-agnostic detection and the gate: differential (default) vs faithful DECREE.

Usage (from the repository root, ../shared/data present):
    .venv/bin/python bench/detection.py --out bench/results/detection.md [--seeds 0]

Per seed: the tiny MNIST CLIP foundation (also the clean reference), victims for BadNet, Blended,
WaNet and SIG (target 0, as in bench/known_trigger.py) and two clean fine-tunes (controls, seeds
100+seed and 200+seed). Every model is scanned with
  - differential, reference = the foundation (the default policy + reference_models), with the trigger
    families of --families (default: mask and blend; each family's own decision is reported too);
  - decree, calibrated against the foundation's PL1 (one reference), and the paper rule (PL1 < 0.1);
then each victim goes through `gate` (inverted trigger → TBAR, anchored; skipped with --no-gate) and the
report gives CA/ASR before/after under the inverted trigger and under the true trigger (audit only).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from known_trigger import mnist

from tbar_guard.attacks import build_trigger, parse_trigger, spec_to_dict
from tbar_guard.bundle import save_model
from tbar_guard.clip import classifier_for
from tbar_guard.evaluate import evaluate
from tbar_guard.gate import gate, scan
from tbar_guard.policy import policy_from_dict
from tbar_guard.zoo import finetune_victim, train_foundation

# The inversion settings this development zoo's committed results (bench/results/blend-dev.md) were made
# with: the product defaults until session 9 (since then 8 / 100 / 11, the GTSRB/CIFAR-10 zoos' settings).
MNIST_DEV_DETECT: dict[str, object] = {"batch_size": 32}
MNIST_DEV_STEPS: dict[str, object] = {"steps": 150, "targets_per_chunk": 10}
ATTACKS = ("badnet", "blended", "wanet", "sig")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/detection.md"))
    parser.add_argument("--work", type=Path, default=Path("bench/cache/detection"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--families", nargs="+", default=["mask", "blend"], help="detect.differential.families")
    parser.add_argument("--no-gate", action="store_true", help="scan only (no removal)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = mnist("train"), mnist("test")
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    data = args.work / "mnist_test.npz"
    np.savez(data, x=test.images.permute(0, 2, 3, 1).numpy(), y=test.labels.numpy())
    scans, gates = [], []
    for seed in args.seeds:
        foundation = train_foundation(train.subset(torch.arange(0, 5000)), epochs=10, seed=seed)
        base = args.work / f"seed{seed}-base"
        save_model(base, foundation)
        models: list[tuple[str, Path, str | None]] = []
        for attack in ATTACKS:
            trigger = build_trigger(parse_trigger(attack), 28)
            victim = finetune_victim(
                foundation, train.subset(torch.arange(5000, 10000)), trigger, 0, epochs=3, seed=seed
            )
            asr = evaluate(classifier_for(victim), test, trigger, 0).attack_success_rate
            path = args.work / f"seed{seed}-{attack}"
            save_model(path, victim)
            models.append((f"{attack} (victim ASR {100 * (asr or 0):.0f}%)", path, attack))
        for k, clean_seed in enumerate((100 + seed, 200 + seed)):
            twin = finetune_victim(
                foundation, train.subset(torch.arange(5000, 10000)), None, 0, epochs=3, seed=clean_seed
            )
            path = args.work / f"seed{seed}-clean{k}"
            save_model(path, twin)
            models.append((f"clean fine-tune {k + 1}", path, None))
        for label, path, attack in models:
            row: dict[str, object] = {"seed": seed, "model": label}
            for method in ("differential", "decree"):
                detect: dict[str, object] = {"method": method, "reference_models": [str(base)], **MNIST_DEV_DETECT}
                if method == "differential":
                    detect["differential"] = {"families": list(args.families), "search_all": True, **MNIST_DEV_STEPS}
                policy = policy_from_dict({"seed": seed, "detect": detect})
                t0 = time.perf_counter()
                result = scan(path, data, policy, path.parent / f"{path.name}-scan-{method}")
                det = result.report["detection"]
                row[f"{method}_flag"] = det["flagged"]
                row[f"{method}_target"] = det["target_index"]
                row[f"{method}_proxy"] = det["proxy_asr"]
                row[f"{method}_pl1"] = det["pl1"]
                row[f"{method}_seconds"] = time.perf_counter() - t0
                if method == "differential":
                    row["z"] = det["z_score"]
                    row["family"] = det["family"]
                    row["families"] = {
                        name: {
                            "flag": f["flagged"],
                            "target": f["target"],
                            "z": f["z_score"],
                            "score": f["score"],
                            "ratio": f["ratio"],
                            "asr": f["target_asr"],
                            "ref_asr": f["target_reference_asr"],
                            "s": f["seconds"],
                        }
                        for name, f in det["families"].items()
                    }
                else:
                    row["decree_ref"] = det["reference_pl1"][0]
                    row["paper_flag"] = det["pl1"] < 0.1
            scans.append(row)
            print(row, flush=True)
            if attack is not None and not args.no_gate:
                spec = parse_trigger(attack)
                policy = policy_from_dict(
                    {
                        "seed": seed,
                        "detect": {
                            "reference_models": [str(base)],
                            **MNIST_DEV_DETECT,
                            "differential": {"families": list(args.families), **MNIST_DEV_STEPS},
                        },
                        "trigger": spec_to_dict(spec),
                        "target": "0",
                    }
                )
                t0 = time.perf_counter()
                result = gate(path, data, policy, path.parent / f"{path.name}-gate")
                r = result.report
                true = r.get("true_trigger") or {}
                gates.append(
                    {
                        "seed": seed,
                        "model": label,
                        "verdict": r["verdict"],
                        "target": r["target"]["index"],
                        "alpha": r.get("alpha"),
                        "ca_before": (r.get("before") or {}).get("clean_accuracy"),
                        "ca_after": (r.get("after") or {}).get("clean_accuracy"),
                        "asr_inv_before": (r.get("before") or {}).get("attack_success_rate"),
                        "asr_inv_after": (r.get("after") or {}).get("attack_success_rate"),
                        "asr_true_before": (true.get("before") or {}).get("attack_success_rate"),
                        "asr_true_after": (true.get("after") or {}).get("attack_success_rate"),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(gates[-1], flush=True)
    write(args, scans, gates)


def _p(v: object) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"  # type: ignore[arg-type]


def write(args: argparse.Namespace, scans: list[dict[str, object]], gates: list[dict[str, object]]) -> None:
    lines = [
        "# Agnostic detection and gate (tiny ViT CLIP, MNIST; reference = the clean foundation)",
        "",
        f"Command: `.venv/bin/python bench/detection.py --seeds {' '.join(map(str, args.seeds))} "
        f"--families {' '.join(args.families)}{' --no-gate' if args.no_gate else ''} --threads {args.threads}` "
        "(2-core CPU). "
        "Target of every attack is class 0. 'flag' = the method's decision; PL1 = mask area fraction; "
        "z = robust z-score of the smallest per-class mask (differential flags z < −2.5); DECREE calibrated "
        "flags PL1 < 0.5 × reference PL1, the paper rule PL1 < 0.1.",
        "",
        "| seed | model | differential flag | target | proxy ASR | area | z | s | DECREE PL1 | ref PL1 | calibrated flag | paper flag | target | proxy ASR | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in scans:
        lines.append(
            f"| {r['seed']} | {r['model']} | {r['differential_flag']} | {r['differential_target']} | "
            f"{_p(r['differential_proxy'])} | {float(r['differential_pl1']):.3f} | {float(r['z']):.2f} | "  # type: ignore[arg-type]
            f"{float(r['differential_seconds']):.0f} | {float(r['decree_pl1']):.3f} | {float(r['decree_ref']):.3f} | "  # type: ignore[arg-type]
            f"{r['decree_flag']} | {r['paper_flag']} | {r['decree_target']} | {_p(r['decree_proxy'])} | "
            f"{float(r['decree_seconds']):.0f} |"  # type: ignore[arg-type]
        )
    lines += [
        "",
        f"## Differential per family (families {', '.join(args.families)}; reference = the foundation)",
        "",
        "Each family's own rule: flag / robust z of the smallest per-class score / the score (mask: area fraction; "
        "blend: strength a of (1 − a)·x + a·p) / its ratio to the median / class / held-out share sent to it on the "
        "candidate → on the clean reference (transfer check) / seconds. The scan is flagged when any family fires.",
        "",
        "| seed | model | "
        + " | ".join(f"{f}: flag / z / score / ratio / class / ASR → ref / s" for f in args.families)
        + " | scan: flag / family / target |",
        "|---|---|" + "---|" * (len(args.families) + 1),
    ]
    for r in scans:
        fams = r["families"]
        assert isinstance(fams, dict)
        cells = []
        for f in args.families:
            d = fams[f]
            cells.append(
                f"{d['flag']} / {d['z']:.2f} / {d['score']:.3f} / {d['ratio']:.2f} / {d['target']} / "
                f"{_p(d['asr'])} → {_p(d['ref_asr'])} / {d['s']:.0f}"
            )
        lines.append(
            f"| {r['seed']} | {r['model']} | "
            + " | ".join(cells)
            + f" | {r['differential_flag']} / {r['family']} / {r['differential_target']} |"
        )
    lines += [
        "",
        "## Agnostic gate (differential inversion → anchored TBAR with the inverted trigger)",
        "",
        "CA and ASR in % on the test split; 'inverted' = ASR of the inverted trigger (what the gate optimises), "
        "'true' = ASR of the real trigger (audit only, never used to choose α).",
        "",
        "| seed | model | verdict | target | α | CA before | CA after | ASR inverted before → after | ASR true before → after | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in gates:
        alpha = "–" if g["alpha"] is None else f"{float(g['alpha']):g}"  # type: ignore[arg-type]
        lines.append(
            f"| {g['seed']} | {g['model']} | {g['verdict']} | {g['target']} | {alpha} | {_p(g['ca_before'])} | "
            f"{_p(g['ca_after'])} | {_p(g['asr_inv_before'])} → {_p(g['asr_inv_after'])} | "
            f"{_p(g['asr_true_before'])} → {_p(g['asr_true_after'])} | {float(g['seconds']):.0f} |"  # type: ignore[arg-type]
        )
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
