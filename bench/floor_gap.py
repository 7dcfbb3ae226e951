"""How far the CA floor read on the validation split is from the clean accuracy kept on the test split.

The policy enforces ``accept.ca_floor`` on the validation split (1,200 images in the benchmark's
defender data) at the α it chooses; the benchmark reports the CA kept on the test split. Choosing
the largest useful α whose validation CA passes the floor favours α where the validation split
happens to read high, so the test split can land under the floor (issue 8: cifar10-badnet-t1-s0,
validation 0.952, test 0.906 in session 11). This reads a benchmark ``results.json`` and, for every
TBAR record that shipped a model (verdict ``removed``), compares the validation kept ratio at the
chosen α (its validation sweep: CA at α over CA at α = 0) with the test kept ratio.

Usage: ``python -m bench.floor_gap bench/results/results.json [--floor 0.95]`` (Markdown on stdout).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def gaps(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per shipped TBAR record: victim, defence, α, validation and test CA kept."""
    rows = []
    for r in results["records"]:
        sweep = r.get("alpha_sweep")
        if r.get("verdict") != "removed" or not sweep or r.get("ca_kept") is None:
            continue
        by_alpha = {p["alpha"]: p["clean_accuracy"] for p in sweep}
        if 0.0 not in by_alpha or r["alpha"] not in by_alpha or by_alpha[0.0] <= 0:
            continue
        val_kept = by_alpha[r["alpha"]] / by_alpha[0.0]
        rows.append(
            {
                "victim": r["victim"],
                "defence": r["defence"],
                "alpha": r["alpha"],
                "val_kept": val_kept,
                "test_kept": r["ca_kept"],
                "gap": val_kept - r["ca_kept"],
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], floor: float) -> str:
    if not rows:
        return "no shipped TBAR record with a validation sweep\n"
    gap = [r["gap"] for r in rows]
    under = [r for r in rows if r["test_kept"] < floor <= r["val_kept"]]
    lines = [
        f"{len(rows)} shipped TBAR records; validation − test CA kept at the chosen α: mean {statistics.mean(gap):+.3f}, "
        f"SD {statistics.pstdev(gap):.3f}, range {min(gap):+.3f} to {max(gap):+.3f}; "
        f"test under the {floor:g} floor while validation passed it: {len(under)}",
        "",
        "| victim | defence | α | validation kept | test kept | gap |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["gap"]):
        lines.append(
            f"| {r['victim']} | {r['defence']} | {r['alpha']:g} | {r['val_kept']:.3f} | {r['test_kept']:.3f} | "
            f"{r['gap']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmark results.json")
    parser.add_argument("--floor", type=float, default=0.95)
    args = parser.parse_args()
    print(markdown(gaps(json.loads(args.results.read_text(encoding="utf-8"))), args.floor), end="")


if __name__ == "__main__":
    main()
