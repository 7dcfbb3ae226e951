"""Per-class trigger scores of zoo models next to the same search on their clean base model.

A development measurement for detection (issue 9): does dividing a candidate's per-class score by
the base model's score for the same class (how cheap that class is on the model the candidate was
fine-tuned from) separate backdoored classes from the classes that are cheap on every model of the
task (CIFAR-10's class 9 under the additive family)?

    python -m bench.reference_scores --zoo bench/zoo-dev.yaml --only cifar10-sig cifar10-clean \
        --families additive --out /tmp/refscores.json

Writes, per model, the family's per-class scores with the base model as the reference (exactly
as the gate searches), and once per task the base model's own per-class scores (no reference).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.runner import Runner
from bench.zoo import load_zoo
from tbar_guard.gate import scan


def _per_class(report: dict[str, Any], family: str, key: str) -> list[float | None]:
    rows = report["detection"]["families"][family]["per_class"]
    return [None if r[key] is None else float(r[key]) for r in sorted(rows, key=lambda r: r["index"])]


def _scores(model: Path, data: Path, runner: Runner, family: str, reference: Path | None) -> dict[str, Any]:
    detect: dict[str, Any] = {"differential": {"families": [family], "search_all": True}}
    detect["reference_models"] = [str(reference)] if reference is not None else []
    policy = runner.policy({"detect": detect})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = scan(model, data, policy, Path(tmp) / "scan").report
        seconds = time.perf_counter() - t0
    fam = report["detection"]["families"][family]
    return {
        "scores": _per_class(report, family, "score"),
        "asr": _per_class(report, family, "asr"),
        "reference_asr": _per_class(report, family, "reference_asr"),
        "target": fam["target"],
        "ratio": fam["ratio"],
        "flagged": fam["flagged"],
        "seconds": seconds,
    }


def _relative(scores: list[float], base: list[float]) -> tuple[int, float]:
    """(class with the smallest quotient, that quotient / the lower-middle quotient), as the product's
    relative rule computes it before its working-trigger and transfer checks."""
    q = [s / max(b, 1e-6) for s, b in zip(scores, base, strict=True)]
    median = sorted(q)[(len(q) - 1) // 2]
    best = min(range(len(q)), key=q.__getitem__)
    return best, q[best] / max(median, 1e-12)


def table(out: dict[str, Any]) -> str:
    """Markdown: per model and family, the plain rule's class and ratio beside the relative one's."""
    lines = [
        "| model | family | true target | plain: class / x median | relative: class / x median quotient |",
        "|---|---|---|---|---|",
    ]
    for m in out["models"]:
        base = out["bases"][f"{m['task']}/{m['family']}"]["scores"]
        best, ratio = _relative(m["scores"], base)
        tag = " (failed attack)" if m.get("failed_attack") else ""
        lines.append(
            f"| {m['name']}{tag} | {m['family']} | {m['true_target'] if m['attack'] else '–'} | "
            f"{m['target']} / {m['ratio']:.2f} | {best} / {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--zoo", type=Path, default=Path("bench/zoo-dev.yaml"))
    ap.add_argument("--cache", type=Path, default=Path("bench/cache"))
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--families", nargs="+", default=["additive"], choices=["mask", "blend", "additive"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out's scores and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())), end="")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_zoo(args.zoo)
    runner = Runner(spec, args.out.parent, args.cache, args.shared, lambda m: print(m, flush=True), ())
    out: dict[str, Any] = {"zoo": spec.name, "families": args.families, "bases": {}, "models": []}
    if args.out.exists():
        out = json.loads(args.out.read_text())
    done = {(m["name"], m["family"]) for m in out["models"]}
    for v in spec.victims:
        if args.only and not any(s in v.name for s in args.only):
            continue
        ctx = runner.task(v.task)
        vdir, meta = runner.zoo.victim(v)
        for family in args.families:
            base_key = f"{v.task}/{family}"
            if base_key not in out["bases"]:
                out["bases"][base_key] = _scores(ctx.base_dir, ctx.data_npz, runner, family, None)
                print(f"base {base_key}: {out['bases'][base_key]['seconds']:.0f} s", flush=True)
            if (v.name, family) in done:
                continue
            row = _scores(vdir, ctx.data_npz, runner, family, ctx.base_dir)
            row.update(
                name=v.name,
                task=v.task,
                attack=v.attack,
                true_target=v.target,
                family=family,
                failed_attack=meta["failed_attack"],
                attack_asr=meta["attack_success_rate"],
            )
            out["models"].append(row)
            print(f"{v.name} {family}: target {row['target']} ratio {row['ratio']:.2f} ({row['seconds']:.0f} s)")
            args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
