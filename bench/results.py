"""results.json → RESULTS.md and plots. Pure formatting: every number comes from the run's records."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tbar_guard.policy import DifferentialPolicy

DEFENCE_LABELS = {
    "tbar-known": "TBAR known trigger (anchored)",
    "tbar-plain-known": "TBAR known trigger (plain, paper recipe)",
    "tbar-unlearn-known": "TBAR known trigger (unlearn vector, the default: negate theta_b - theta_unlearned)",
    "tbar-unlearn-known-extend": "TBAR known trigger (unlearn vector), alpha extended past the ASR floor while validation CA stays within one standard error",
    "tbar-unlearn-known-strengths": "TBAR known trigger (unlearn vector), the forget set stamped at 0.5, 1 and 1.5 x the trigger's strength",
    "tbar-unlearn-known-10ep": "TBAR known trigger (unlearn vector), the unlearning fine-tune 10 epochs (default 5)",
    "tbar-unlearn-known-lr3": "TBAR known trigger (unlearn vector), the unlearning fine-tune at lr 3e-4 (default 1e-4)",
    "tbar-unlearn-known-strict": "TBAR known trigger (unlearn vector), alpha = the strict lowest validation ASR within the CA floor (asr_tolerance 0)",
    "tbar-unlearn-known-10ep-strict": "TBAR known trigger (unlearn vector), 10 epochs and the strict lowest validation ASR (asr_tolerance 0)",
    "tbar-agnostic": "TBAR agnostic (gate: inversion -> anchored TBAR)",
    "tbar-unlearn-agnostic": "TBAR agnostic (gate: inversion -> unlearn vector, the default)",
    "tbar-unlearn-agnostic-mask": "TBAR agnostic, mask trigger + re-inversion rounds only (no companion blend)",
    "tbar-unlearn-agnostic-signal": "TBAR agnostic, session 6: mask family (z < -2.5 or < 0.5 x) then the separable additive family",
    "tbar-unlearn-agnostic-blend099": "TBAR agnostic, the default gate with the companion blend joining below 0.99 x the median (default 0.7 x)",
    "tbar-unlearn-agnostic-trial099": "TBAR agnostic, the default gate with the companion blend joining on trial below 0.99 x the median (dropped when the removal with it misses the policy)",
    "tbar-unlearn-agnostic-additive": "TBAR agnostic, the default gate that also hardens an additive-family scan (its signal + the companion blend)",
    "tbar-unlearn-agnostic-signal-first": "TBAR agnostic, the additive family searched first (decides where it fires), not hardened",
    "tbar-unlearn-agnostic-signal-first-hardened": "TBAR agnostic, the additive family searched first, hardened (its signal + the companion blend)",
    "tbar-unlearn-agnostic-relative": "TBAR agnostic, the default gate under its session-14 measurement name (additive family's relative rule, 0.2 x)",
    "tbar-unlearn-agnostic-s13": "TBAR agnostic, the default gate of session 13 (no relative rule)",
    "tbar-unlearn-agnostic-10ep": "TBAR agnostic, the default gate whose unlearning fine-tunes run 10 epochs (default 5)",
    "tbar-unlearn-agnostic-probe2": "TBAR agnostic, the default gate measuring ASR with the inverted trigger at 2x its strength",
    "tbar-unlearn-agnostic-s18": "TBAR agnostic, the default gate of sessions 14-18 (ASR measured with the inverted trigger at 1x)",
    "clean-ft-1x": "clean fine-tune, N = forget size",
    "clean-ft-10x": "clean fine-tune, N = 10x forget size",
    "grad-ascent": "gradient ascent on the forget set",
    "cleanclip": "CleanCLIP-style (cross-modal + in-modal, augmented)",
}
KNOWN_TBAR = (
    "tbar-known",
    "tbar-plain-known",
    "tbar-unlearn-known",
    "tbar-unlearn-known-extend",
    "tbar-unlearn-known-strengths",
    "tbar-unlearn-known-10ep",
    "tbar-unlearn-known-lr3",
    "tbar-unlearn-known-strict",
    "tbar-unlearn-known-10ep-strict",
)
AGNOSTIC_TBAR = (
    "tbar-agnostic",
    "tbar-unlearn-agnostic",
    "tbar-unlearn-agnostic-mask",
    "tbar-unlearn-agnostic-signal",
    "tbar-unlearn-agnostic-blend099",
    "tbar-unlearn-agnostic-trial099",
    "tbar-unlearn-agnostic-additive",
    "tbar-unlearn-agnostic-signal-first",
    "tbar-unlearn-agnostic-signal-first-hardened",
    "tbar-unlearn-agnostic-relative",
    "tbar-unlearn-agnostic-s13",
    "tbar-unlearn-agnostic-10ep",
    "tbar-unlearn-agnostic-probe2",
    "tbar-unlearn-agnostic-s18",
)
TBAR = KNOWN_TBAR + AGNOSTIC_TBAR
REMOVALS = (
    *KNOWN_TBAR,
    *AGNOSTIC_TBAR,
    "clean-ft-1x",
    "clean-ft-10x",
    "grad-ascent",
    "cleanclip",
)


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _rate(hits: Sequence[bool]) -> str:
    return "–" if not hits else f"{sum(hits)}/{len(hits)} ({100 * sum(hits) / len(hits):.0f}%)"


def tradeoff_points(
    sweep: Sequence[dict[str, Any]] | None, ca0: float
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """From an α sweep: ((best CA kept among α with ASR ≤ 2%, its α), (best ASR among α with CA kept ≥ 0.95,
    its α)); ties go to the smaller α."""
    if not sweep or ca0 <= 0:
        return None, None
    low = [(p["clean_accuracy"] / ca0, -p["alpha"]) for p in sweep if p["attack_success_rate"] <= 0.02]
    keep = [(p["attack_success_rate"], p["alpha"]) for p in sweep if p["clean_accuracy"] / ca0 >= 0.95]
    best_low, best_keep = (max(low) if low else None), (min(keep) if keep else None)
    return (None if best_low is None else (best_low[0], -best_low[1])), best_keep


def tradeoff(sweep: Sequence[dict[str, Any]] | None, ca0: float) -> tuple[float | None, float | None]:
    """From a validation α sweep: (best CA kept among α with ASR ≤ 2%, best ASR among α with CA kept ≥ 0.95)."""
    low, keep = tradeoff_points(sweep, ca0)
    return (None if low is None else low[0]), (None if keep is None else keep[0])


def true_curve_table(recs: list[dict[str, Any]]) -> list[str]:
    """Agnostic gates: their α sweep (chosen under the inverted trigger) read again under the true
    trigger on the test split (``true_curve``, an audit added by the runner)."""
    rows = [r for r in recs if r.get("true_curve")]
    if not rows:
        return []
    lines = [
        "",
        "### Agnostic gates: the α sweep under the true trigger (audit, test split)",
        "",
        "The gate chose α on the validation split under its *inverted* trigger; here every α of that sweep is "
        "applied along the same removal direction and measured under the *true* trigger on the test split (it "
        "chooses nothing). `@ASR≤2%`: best CA kept among those α with true ASR ≤ 2%; `@kept≥0.95`: best true ASR "
        "among α keeping ≥ 95% of test CA. Each curve cell is `α: CA kept / true ASR %`.",
        "",
        "| victim | method | chosen α (true ASR) | CA kept @ASR≤2% (α) | best true ASR @kept≥0.95 (α) | curve |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["defence"], r["victim"])):
        ca0 = max(r["ca_before"], 1e-12)
        pts = [(p["alpha"], p["clean_accuracy"] / ca0, p["attack_success_rate"]) for p in r["true_curve"]]
        best_low, best_keep = tradeoff_points(r["true_curve"], ca0)
        chosen = next((asr for a, _, asr in pts if a == r["alpha"]), None)
        lines.append(
            f"| {r['victim']} | {r['defence']} | {r['alpha']} ({pct(chosen)}) | "
            + ("–" if best_low is None else f"{best_low[0]:.3f} ({best_low[1]:g})")
            + " | "
            + ("–" if best_keep is None else f"{pct(best_keep[0])} ({best_keep[1]:g})")
            + " | "
            + ", ".join(f"{a:g}: {k:.3f} / {pct(asr)}" for a, k, asr in pts)
            + " |"
        )
    return lines


def _parallel_words(parallel: dict[str, Any] | None) -> str:
    """How a ``--jobs`` run shared the work (empty for a one-process run)."""
    if not parallel:
        return ""
    return (
        f"with `--jobs {parallel['jobs']}`: the zoo built and prepared in {parallel['build_seconds'] / 60:.1f} min by "
        f"the main process, the defences by {parallel['jobs']} worker processes with "
        f"{parallel['worker_threads']} torch thread(s) each "
    )


def write_markdown(results: dict[str, Any], out: Path, command: str) -> Path:
    recs: list[dict[str, Any]] = results["records"]
    victims: list[dict[str, Any]] = results["victims"]
    m = results["machine"]
    f = results["foundation"]
    lines = [
        f"# tbar-guard benchmark: zoo `{results['zoo']}`",
        "",
        f"Command: `{command}`",
        "",
        f"Commit `{m['commit']}`{' (with uncommitted changes)' if m['dirty'] else ''}; {m['platform']}, "
        f"{m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), open_clip {m['open_clip']}, "
        f"CUDA {'yes' if m['cuda'] else 'no'}. Total wall time {results['wall_seconds'] / 60:.1f} min "
        + _parallel_words(results.get("parallel"))
        + "(cached models and records are reused; see the per-record seconds).",
        "",
        "Foundation: "
        + ", ".join(f"{t} zero-shot CA {pct(ca)}% (defender test split)" for t, ca in f.get("zero_shot_ca", {}).items())
        + (f"; trained {f['train_seconds']:.0f} s on {f['images']} images" if "train_seconds" in f else "")
        + ". All CA/ASR in % on the defender's test split (never used to choose α or a stopping step); "
        "ASR under the *true* trigger. An `unremoved` TBAR verdict ships nothing, so its 'after' is the victim.",
        "",
        "## Victims",
        "",
        "`clean-control ASR` = the same trigger and target on the task's clean controls (no backdoor), test "
        "split: the rate a model without the backdoor already shows, and so the floor a removal is read against.",
        "",
        "| victim | CA | ASR | clean-control ASR | note |",
        "|---|---|---|---|---|",
    ]
    for v in victims:
        note = (
            "FAILED ATTACK (ASR < 90%), kept and reported"
            if v["failed_attack"]
            else ("clean control" if v["attack"] is None else "")
        )
        lines.append(
            f"| {v['name']} | {pct(v['clean_accuracy'])} | {pct(v['attack_success_rate'])} | "
            f"{pct(v.get('clean_control_asr'))} | {note} |"
        )

    # ---- headline -------------------------------------------------------------------------
    groups = sorted({(r["task"], r["attack"]) for r in recs if r["attack"]})
    present = [d for d in REMOVALS if any(r["defence"] == d for r in recs)]
    lines += [
        "",
        "## Headline: CA kept / ASR after (mean over the victims of each cell)",
        "",
        "Each defence cell is `CA kept (after/before) / ASR after %`; `re` = re-emergence ASR % after a short clean "
        "fine-tune of the defended model (policy `sanitize.reemergence`), `–` where nothing was shipped.",
        "",
        "| task | attack | victim CA / ASR | " + " | ".join(present) + " |",
        "|---|---|---|" + "---|" * len(present),
    ]
    for task, attack in groups:
        vs = [v for v in victims if v["task"] == task and v["attack"] == attack]
        row = f"| {task} | {attack} | {pct(_mean(v['clean_accuracy'] for v in vs))} / {pct(_mean(v['attack_success_rate'] for v in vs))} |"
        for d in present:
            rs = [
                r for r in recs if r["task"] == task and r["attack"] == attack and r["defence"] == d and "ca_kept" in r
            ]
            if not rs:
                row += " – |"
                continue
            kept = _mean(r["ca_after"] / max(r["ca_before"], 1e-12) for r in rs)
            asr = _mean(r["asr_after"] for r in rs)
            re = _mean(r.get("reemergence_asr") for r in rs)
            row += f" {kept:.3f} / {pct(asr)}" + (f" (re {pct(re)})" if re is not None else "") + " |"
        lines.append(row)

    # ---- targets --------------------------------------------------------------------------
    lines += ["", "## Targets (from the paper and DECREE) beside the measured numbers", ""]
    lines += targets_table(recs, victims)

    # ---- removal trade-off ------------------------------------------------------------------
    lines += [
        "",
        "## Removal methods: trade-off on the validation α sweep",
        "",
        "Per TBAR run: best CA kept among the α whose validation ASR ≤ 2%, and the best validation ASR among the α "
        "that keep ≥ 95% of validation CA (the issue's two views of the curve); the chosen α and its test numbers.",
        "",
        "### Per method and attack (working attacks only; means over their victims)",
        "",
        "`@ASR≤2%` = the best CA kept among the validation-sweep α whose ASR ≤ 2% (n = victims where some α "
        "reached it); `@kept≥0.95` = the best validation ASR among α keeping ≥ 95% of CA. Test columns: the "
        "policy's chosen α on the test split (an `unremoved` verdict counts as what the user keeps: the victim). "
        "`re` = re-emergence ASR after the policy's clean fine-tune (removed victims only).",
        "",
        "| method | attack | victims | CA kept @ASR≤2% (n) | best ASR @kept≥0.95 | removed | test CA kept | "
        "test ASR | re | s | data |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *method_table(recs, victims),
        "",
        "### Every TBAR run",
        "",
        "| victim | method | CA kept @ ASR≤2% | best ASR @ CA kept≥0.95 | chosen α | test CA kept | test ASR | re-emergence ASR | verdict | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if r["defence"] not in TBAR or not r.get("alpha_sweep"):
            continue
        a, b = _sweep_views(r)
        lines.append(
            f"| {r['victim']} | {r['defence']} | {'–' if a is None else f'{a:.3f}'} | {pct(b)} | {r.get('alpha')} | "
            f"{r['ca_after_chosen_alpha'] / max(r['ca_before'], 1e-12):.3f} | {pct(r['asr_after_chosen_alpha'])} | "
            f"{pct(r.get('reemergence_asr'))} | {r['verdict']} | {r.get('seconds', 0):.0f} |"
        )

    lines += true_curve_table(recs)

    # ---- detection --------------------------------------------------------------------------
    lines += ["", "## Detection", "", *detection_tables(recs, victims)]
    scan_lines = scan_tables(recs, victims)
    if scan_lines:
        lines += ["", "## Detector configurations (scan only, reference = the task's base model)", "", *scan_lines]

    # ---- disentanglement ----------------------------------------------------------------------
    xi_rows = []
    seen: set[tuple[str, str]] = set()
    for r in recs:
        if r["defence"] in KNOWN_TBAR and r.get("disentanglement") and (r["defence"], r["victim"]) not in seen:
            seen.add((r["defence"], r["victim"]))
            d = r["disentanglement"]
            xi_rows.append(
                f"| {r['victim']} | `{r['defence']}` | {d.get('alphas_clean')} | {d.get('alphas_trigger')} | "
                f"{json.dumps([[round(x, 3) for x in row] for row in d.get('xi', [])])} | {d.get('mean_xi', 0):.3f} |"
            )
    if xi_rows:
        lines += [
            "",
            "## Weight disentanglement ξ(α_c, α_t) (one victim per attack)",
            "",
            "| victim | method | α_c | α_t | ξ grid (rows α_c, columns α_t) | mean ξ |",
            "|---|---|---|---|---|---|",
            *xi_rows,
        ]

    if results.get("skipped_failed_attacks"):
        lines += [
            "",
            "## Not defended: failed attacks",
            "",
            "The zoo says `failed_attacks: detect-only`: a victim whose attack failed (ASR < 90%) has no working "
            "backdoor to remove, so only the scan-only detectors ran on it (it is still listed with its CA and ASR "
            "above): " + "; ".join(results["skipped_failed_attacks"]) + ".",
        ]
    if results.get("missing"):
        lines += [
            "",
            "## Not run (no cached result when these tables were written)",
            "",
            "This run only collected cached records (`--from-cache`); these were never computed, so the tables "
            "above do not cover them: " + "; ".join(results["missing"]) + ".",
        ]
    commits = sorted({str(r.get("commit", "not recorded")) for r in recs})
    lines += ["", f"Records computed by commit(s): {', '.join(commits)}."]

    # ---- every record ---------------------------------------------------------------------------
    lines += [
        "",
        "## Every removal record",
        "",
        "| victim | defence | verdict | CA before | ASR before | CA after | ASR after | CA kept | re-emergence ASR | data used | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if "ca_kept" not in r:
            continue
        lines.append(
            f"| {r['victim']} | {r['defence']} | {r.get('verdict')} | {pct(r['ca_before'])} | {pct(r['asr_before'])} | "
            f"{pct(r['ca_after'])} | {pct(r['asr_after'])} | {r['ca_after'] / max(r['ca_before'], 1e-12):.3f} | "
            f"{pct(r.get('reemergence_asr'))} | {r.get('data_used')} | {r.get('seconds', 0):.0f} |"
        )
    lines += ["", "Defences: " + "; ".join(f"`{k}` = {v}" for k, v in DEFENCE_LABELS.items() if k in present), ""]
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _sweep_views(r: dict[str, Any]) -> tuple[float | None, float | None]:
    sweep = r.get("alpha_sweep") or []
    if not sweep:
        return None, None
    ca0 = next((p["clean_accuracy"] for p in sweep if p["alpha"] == 0), None) or sweep[0]["clean_accuracy"]
    return tradeoff(sweep, ca0)


def method_table(recs: list[dict[str, Any]], victims: list[dict[str, Any]]) -> list[str]:
    """One row per TBAR method x attack over the working victims: the two trade-off views and the test numbers."""
    ok = {v["name"] for v in victims if v["attack"] and not v["failed_attack"]}
    rows = []
    for defence in TBAR:
        for attack in sorted({r["attack"] for r in recs if r["attack"]}):
            rs = [r for r in recs if r["defence"] == defence and r["attack"] == attack and r["victim"] in ok]
            rs = [r for r in rs if "ca_kept" in r]
            if not rs:
                continue
            views = [_sweep_views(r) for r in rs]
            reach = [a for a, _ in views if a is not None]
            best = _mean(b for _, b in views)
            removed = [r for r in rs if r["verdict"] == "removed"]
            kept = _mean(r["ca_after"] / max(r["ca_before"], 1e-12) for r in rs)
            rows.append(
                f"| `{defence}` | {attack} | {len(rs)} | "
                f"{'–' if not reach else f'{statistics.fmean(reach):.3f}'} ({len(reach)}/{len(rs)}) | {pct(best)} | "
                f"{len(removed)}/{len(rs)} | {'–' if kept is None else f'{kept:.3f}'} | "
                f"{pct(_mean(r['asr_after'] for r in rs))} | {pct(_mean(r.get('reemergence_asr') for r in removed))} | "
                f"{_mean(r.get('seconds', 0) for r in rs) or 0:.0f} | {rs[0].get('data_used')} |"
            )
    return rows


def targets_table(recs: list[dict[str, Any]], victims: list[dict[str, Any]]) -> list[str]:
    ok_attacks = {v["name"] for v in victims if v["attack"] and not v["failed_attack"]}

    def cells(defence: str) -> list[dict[str, Any]]:
        return [r for r in recs if r["defence"] == defence and r["victim"] in ok_attacks and "ca_kept" in r]

    rows = ["| target | defence | measured | met? |", "|---|---|---|---|"]
    goals = [(d, 0.01, 0.97, "known-trigger TBAR: ASR ≤ 1% on every attack, CA kept ≥ 97%") for d in KNOWN_TBAR]
    goals += [(d, 0.02, 0.95, "issue 8: ASR ≤ 2%, CA kept ≥ 95% (known trigger)") for d in KNOWN_TBAR]
    goals += [(d, 0.02, 0.95, "agnostic TBAR: ASR ≤ 2%, CA kept ≥ 95%") for d in AGNOSTIC_TBAR]
    for defence, asr_t, kept_t, label in goals:
        rs = cells(defence)
        if not rs:
            continue
        met = [r["asr_after"] <= asr_t and r["ca_after"] / max(r["ca_before"], 1e-12) >= kept_t for r in rs]
        worst_asr = max(r["asr_after"] for r in rs)
        worst_kept = min(r["ca_after"] / max(r["ca_before"], 1e-12) for r in rs)
        rows.append(
            f"| {label} | `{defence}` | {sum(met)}/{len(rs)} victims meet both; worst ASR {pct(worst_asr)}%, "
            f"worst CA kept {worst_kept:.3f} | {'met' if all(met) else 'MISSED'} |"
        )
    floor = {v["name"]: v.get("clean_control_asr") for v in victims}
    for defence in TBAR:
        rs = [r for r in cells(defence) if floor.get(r["victim"]) is not None]
        if not rs:
            continue
        met = [
            r["asr_after"] <= max(0.02, floor[r["victim"]] + 0.01)
            and r["ca_after"] / max(r["ca_before"], 1e-12) >= 0.95
            for r in rs
        ]
        rows.append(
            f"| read against the floor: ASR ≤ max(2%, clean-control ASR + 1 point), CA kept ≥ 95% | `{defence}` | "
            f"{sum(met)}/{len(rs)} victims | {'met' if all(met) else 'MISSED'} |"
        )
    for defence in TBAR:
        rs = cells(defence)
        stays = [r for r in rs if r.get("reemergence_asr") is not None]
        if not rs:
            continue
        ok = [r["reemergence_asr"] <= 0.10 for r in stays]
        worst = f"; worst {pct(max(r['reemergence_asr'] for r in stays))}%" if stays else ""
        rows.append(
            f"| stays removed: re-emergence ASR ≤ 10% on every victim | `{defence}` | "
            f"{sum(ok)}/{len(rs)} victims removed and ≤ 10%{worst} | {'met' if len(ok) == len(rs) and all(ok) else 'MISSED'} |"
        )
    for defence in AGNOSTIC_TBAR:  # the scan-only configurations are judged per rule in "Detector configurations"
        det = [r for r in recs if r["defence"] == defence and "flagged" in r]
        pos = [bool(r["flagged"]) for r in det if r["victim"] in ok_attacks]
        neg = [bool(r["flagged"]) for r in det if r["attack"] is None]
        if not det:
            continue
        ok = bool(pos) and bool(neg) and sum(pos) / len(pos) >= 0.95 and sum(neg) / len(neg) <= 0.05
        verdict = "met" if ok else ("MISSED" if pos and neg else "not measured (no victims or no clean controls)")
        rows.append(
            f"| detection (the gate's detector, as run): TPR ≥ 95% at FPR ≤ 5% | `{defence}` | TPR {_rate(pos)}, FPR {_rate(neg)} | "
            f"{verdict} |"
        )
    return rows


def detection_tables(recs: list[dict[str, Any]], victims: list[dict[str, Any]]) -> list[str]:
    ok_attacks = {v["name"] for v in victims if v["attack"] and not v["failed_attack"]}
    failed = {v["name"] for v in victims if v["failed_attack"]}
    rules = (
        (
            "differential, area rule only (gate of tbar-agnostic: first seeds, before the transfer check)",
            "tbar-agnostic",
            "flagged",
        ),
        (
            "differential, the default rule (gate of tbar-unlearn-agnostic: [mask, additive], mask < 0.6 x median, additive < 0.45 x or relative < 0.2 x; reference = base model)",
            "tbar-unlearn-agnostic",
            "flagged",
        ),
        (
            "differential, the default rule under its measurement name (gate of tbar-unlearn-agnostic-relative)",
            "tbar-unlearn-agnostic-relative",
            "flagged",
        ),
        (
            "differential, session 13's default rule, no relative rule (gate of tbar-unlearn-agnostic-s13)",
            "tbar-unlearn-agnostic-s13",
            "flagged",
        ),
        (
            "differential, mask then separable additive family, session 5 mask rule (gate of tbar-unlearn-agnostic-signal)",
            "tbar-unlearn-agnostic-signal",
            "flagged",
        ),
        (
            "differential, the default rule, reference = the promoted version (a clean fine-tune of the task; scan of scan-default-promoted)",
            "scan-default-promoted",
            "flagged",
        ),
        ("DECREE, paper rule (PL1 < 0.1)", "decree", "flagged_paper"),
        ("DECREE, calibrated (PL1 < 0.5 × base model's PL1)", "decree", "flagged_calibrated"),
    )
    lines = [
        "Positives: victims whose attack worked (ASR ≥ 90%); negatives: clean controls. Failed attacks are listed "
        "separately (a backdoor with a low ASR is not a positive nobody would miss).",
        "",
        "| detector / rule | TPR | FPR | target right (flagged victims) | flagged failed attacks | s per model (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for label, defence, key in rules:
        rs = [r for r in recs if r["defence"] == defence]
        if not rs:
            continue
        pos = [bool(r[key]) for r in rs if r["victim"] in ok_attacks]
        neg = [bool(r[key]) for r in rs if r["attack"] is None]
        fl = [bool(r[key]) for r in rs if r["victim"] in failed]
        tgt = [bool(r["target_correct"]) for r in rs if r["victim"] in ok_attacks and r[key]]
        secs = _mean(r.get("scan_seconds") for r in rs)
        lines.append(
            f"| {label} | {_rate(pos)} | {_rate(neg)} | {_rate(tgt)} | {_rate(fl)} | {'–' if secs is None else f'{secs:.0f}'} |"
        )
    lines += ["", "Per attack (TPR): ", ""]
    attacks = sorted({r["attack"] for r in recs if r["attack"]})
    lines += ["| detector / rule | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for label, defence, key in rules:
        rs = [r for r in recs if r["defence"] == defence]
        if not rs:
            continue
        row = f"| {label} |"
        for a in attacks:
            row += f" {_rate([bool(r[key]) for r in rs if r['attack'] == a and r['victim'] in ok_attacks])} |"
        lines.append(row)
    lines += [
        "",
        "| model | default gate: flagged / deciding family / x median / target / proxy ASR | DECREE: PL1 / ref PL1 / paper / calibrated / target |",
        "|---|---|---|",
    ]
    names = sorted({r["victim"] for r in recs if r["defence"] in ("tbar-unlearn-agnostic", "decree")})
    for name in names:
        d = next((r for r in recs if r["victim"] == name and r["defence"] == "tbar-unlearn-agnostic"), None)
        c = next((r for r in recs if r["victim"] == name and r["defence"] == "decree"), None)
        families = (d.get("families") or {}) if d else {}
        # the deciding family: the first listed that fired (the record keeps the families in the policy's order)
        deciding = next((f for f, v in families.items() if v.get("flagged")), next(iter(families), None))
        fam = families.get(deciding or "", {})
        dc = (
            f"{d['flagged']} / {deciding} / {fam['ratio']:.2f} / {d['detected_target']} / {pct(d['proxy_asr'])}"
            if d and fam.get("ratio") is not None
            else "–"
        )
        cc = (
            f"{c['pl1']:.3f} / {c['reference_pl1']:.3f} / {c['flagged_paper']} / {c['flagged_calibrated']} / {c['detected_target']}"
            if c
            else "–"
        )
        lines.append(f"| {name} | {dc} | {cc} |")
    return lines


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in results["records"] if "ca_kept" in r]
    written: list[Path] = []
    if recs:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
        markers = ["o", "s", "^", "v", "D", "P", "X", "*"]
        for i, d in enumerate(REMOVALS):
            rs = [r for r in recs if r["defence"] == d]
            if rs:
                ax.scatter(
                    [100 * r["asr_after"] for r in rs],
                    [r["ca_after"] / max(r["ca_before"], 1e-12) for r in rs],
                    marker=markers[i % len(markers)],
                    label=d,
                    alpha=0.8,
                )
        ax.axhline(0.95, color="gray", lw=0.8, ls="--")
        ax.axvline(2, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("ASR after (%, true trigger, test split)")
        ax.set_ylabel("CA kept (after / before)")
        ax.set_title("Defences: CA kept vs ASR (each point a victim)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "ca_vs_asr.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    # victims only: a flagged clean control's gate also has a sweep, under a trigger nobody planted
    sweeps = [r for r in results["records"] if r["defence"] in TBAR and r.get("alpha_sweep") and r["attack"]]
    if sweeps:
        keys = sorted({(r["task"], r["attack"]) for r in sweeps})
        colours = {d: f"C{i % 10}" for i, d in enumerate(TBAR)}  # matplotlib's colour cycle, one per method
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), dpi=100, squeeze=False)
        for ax, (task, attack) in zip(axes[0], keys, strict=True):
            labelled: set[str] = set()
            for r in sweeps:
                if (r["task"], r["attack"]) != (task, attack):
                    continue
                sweep = sorted(r["alpha_sweep"], key=lambda p: p["alpha"])
                ca0 = sweep[0]["clean_accuracy"] or 1.0
                ax.plot(
                    [100 * p["attack_success_rate"] for p in sweep],
                    [p["clean_accuracy"] / ca0 for p in sweep],
                    "-",
                    marker=".",
                    ms=3,
                    lw=1,
                    color=colours[r["defence"]],
                    label=None if r["defence"] in labelled else r["defence"],
                )
                labelled.add(r["defence"])
            ax.axhline(0.95, color="gray", lw=0.8, ls="--")
            ax.axvline(2, color="gray", lw=0.8, ls=":")
            ax.set_title(f"{task} {attack}", fontsize=9)
            ax.set_xlabel("validation ASR % (trigger removal used)")
            ax.set_xscale("symlog", linthresh=1)
        axes[0][0].set_ylabel("validation CA kept")
        axes[0][0].legend(fontsize=6)
        fig.suptitle("Trade-off curves: every α evaluated, per method (one line per victim)", fontsize=9)
        fig.tight_layout()
        path = out_dir / "tradeoff.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


MAX_TRANSFER = DifferentialPolicy().max_transfer  # the product's default transfer check
# (label, family or None for the scan's combined decision, with the transfer check[, mask ratio rule])
SCAN_RULES: tuple[tuple[Any, ...], ...] = (
    ("mask family, area rule only (the rule before the transfer check)", "mask", False),
    (
        f"mask family as recorded (its z / ratio rule) + transfer check (ref/candidate share ≤ {MAX_TRANSFER})",
        "mask",
        True,
    ),
    (
        f"mask family, < {DifferentialPolicy().area_ratio} × the median only (z off; the default since session 7) + transfer check",
        "mask",
        True,
        DifferentialPolicy().area_ratio,
    ),
    ("blend family, strength rule only", "blend", False),
    (f"blend family + transfer check (≤ {MAX_TRANSFER})", "blend", True),
    ("additive family, amplitude rule only", "additive", False),
    (f"additive family + transfer check (≤ {MAX_TRANSFER})", "additive", True),
    ("every family of the configuration, score rules only (flagged when any fires)", None, False),
    (f"every family of the configuration + transfer check (≤ {MAX_TRANSFER})", None, True),
)


def _specific(f: dict[str, Any]) -> bool:
    """The transfer check on one family's record: the inverted trigger moves the reference at most
    ``MAX_TRANSFER`` × as much as the candidate (records without a reference pass)."""
    if MAX_TRANSFER is None:
        return True
    if "transfer_ratio" in f:  # computed by the product (towards the class the trigger hits)
        return f["transfer_ratio"] is None or bool(f["transfer_ratio"] <= MAX_TRANSFER)
    ref, cand = f.get("target_reference_asr"), f.get("target_asr")  # older records: towards the searched class
    if ref is None or cand is None:
        return True
    return bool(ref / max(cand, 1e-12) <= MAX_TRANSFER)


def _area_flag(f: dict[str, Any]) -> bool:
    """A family's area/strength rule alone (records written before the transfer check have only
    ``flagged``, which was that rule)."""
    return bool(f.get("area_flagged", f["flagged"]))


def _decision(
    r: dict[str, Any], family: str | None, transfer: bool = False, ratio: float | None = None
) -> tuple[bool, bool | None, float | None] | None:
    """(flagged, target right, seconds) of one scan record under one rule; None when the family was not run.
    ``ratio``: re-read the family's score rule as "smallest score < ratio × the median" (z off); the
    target is then right when the class its trigger hits is the victim's target."""
    fams = r.get("families") or {}
    if family is None:
        if not fams:
            return bool(r["flagged"]), r.get("target_correct"), r.get("scan_seconds")
        fired = [n for n, f in fams.items() if _area_flag(f) and (_specific(f) or not transfer)]
        right = next((fams[n].get("target_correct") for n in fired), None)
        return bool(fired), right, r.get("scan_seconds")
    f = fams.get(family)
    if f is None:
        return None
    if ratio is not None:
        if f.get("ratio") is None:
            return None
        right = f.get("hit_class", f["target"]) == r.get("target") if r.get("attack") else None
        return bool(f["ratio"] < ratio) and (_specific(f) or not transfer), right, f.get("seconds")
    return _area_flag(f) and (_specific(f) or not transfer), f.get("target_correct"), f.get("seconds")


def scan_tables(recs: list[dict[str, Any]], victims: list[dict[str, Any]]) -> list[str]:
    """Per scan-only detector configuration and rule: TPR per attack, FPR, target accuracy, seconds."""
    scans = sorted({r["defence"] for r in recs if r["defence"].startswith("scan-")})
    if not scans:
        return []
    ok_attacks = {v["name"] for v in victims if v["attack"] and not v["failed_attack"]}
    failed = {v["name"] for v in victims if v["failed_attack"]}
    attacks = sorted({r["attack"] for r in recs if r["attack"] and r["victim"] in ok_attacks})
    tasks = sorted({r["task"] for r in recs if r["defence"] in scans})
    lines = [
        "One scan per model with the configuration's families (scan-differential-blend: mask and blend; "
        "scan-differential-additive / -separable / -separable-ee: additive); each family's rule (robust z of the smallest per-class "
        "score below its threshold, or below a fraction of the median) is read from the same record. Positives: "
        "working attacks (ASR ≥ 90%); negatives: clean controls; 'target right' over the flagged positives; "
        "'s' = seconds of that family's inversion (combined: the whole scan) per model, mean per task. Each attack "
        "cell is `TPR; target right among the flagged`.",
        "",
        "| configuration | rule | "
        + " | ".join(f"{a}: TPR; target" for a in attacks)
        + " | TPR all | FPR | target right | flagged failed attacks | "
        + " | ".join(f"s per model ({t})" for t in tasks)
        + " |",
        "|---|---|" + "---|" * (len(attacks) + 4 + len(tasks)),
    ]
    for defence in scans:
        rs = [r for r in recs if r["defence"] == defence]
        for label, family, transfer, *ratio in SCAN_RULES:
            ds = [(r, _decision(r, family, transfer, *ratio)) for r in rs]
            got = [(r, d) for r, d in ds if d is not None]
            if not got:
                continue
            row = f"| {defence} | {label} |"
            for a in attacks:
                hits = [d for r, d in got if r["attack"] == a and r["victim"] in ok_attacks]
                row += f" {_rate([d[0] for d in hits])}; {_rate([bool(d[1]) for d in hits if d[0]])} |"
            pos = [d[0] for r, d in got if r["victim"] in ok_attacks]
            neg = [d[0] for r, d in got if r["attack"] is None]
            tgt = [bool(d[1]) for r, d in got if r["victim"] in ok_attacks and d[0]]
            fl = [d[0] for r, d in got if r["victim"] in failed]
            row += f" {_rate(pos)} | {_rate(neg)} | {_rate(tgt)} | {_rate(fl)} |"
            for t in tasks:
                secs = _mean(d[2] for r, d in got if r["task"] == t)
                row += f" {'–' if secs is None else f'{secs:.0f}'} |"
            lines.append(row)
    lines += [
        "",
        "Per model: each family's flag / robust z / score (mask: area fraction; blend: strength a; additive: "
        "amplitude ε) / ratio to the median / the class searched → the class its trigger actually sends held-out "
        "images to / that share on the victim → on the clean reference (transfer check); the scan's flag / deciding "
        "family / target (mode of predictions under the deciding family's trigger) / seconds. Rows of "
        "`tbar-unlearn-agnostic` are the default detector inside the gate (mask family).",
        "",
        "| configuration | model | true target | mask | blend | additive | scan: flagged / family / target / s |",
        "|---|---|---|---|---|---|---|",
    ]

    def fam(r: dict[str, Any], name: str) -> str:
        f = (r.get("families") or {}).get(name)
        if f is None:
            return "–"
        hit = f.get("hit_class", f["target"])
        share = f.get("hit_asr", f["target_asr"])
        ref = (
            f.get("hit_reference_asr", f.get("target_reference_asr"))
            if "hit_class" in f
            else f.get("target_reference_asr")
        )
        return (
            f"{f['flagged']} / {f['z']:.2f} / {f['score']:.3f} / {f['ratio']:.2f} / {f['target']} → {hit} / "
            f"{pct(share)} → {pct(ref)}"
        )

    shown = (*scans, "tbar-unlearn-agnostic")
    rows = [r for r in recs if r["defence"] in shown and r.get("families")]
    for r in sorted(rows, key=lambda r: (r["defence"], r["victim"])):
        target = "–" if r["attack"] is None else r["target"]
        tag = " (failed attack)" if r["victim"] in failed else ""
        lines.append(
            f"| {r['defence']} | {r['victim']}{tag} | {target} | {fam(r, 'mask')} | {fam(r, 'blend')} | "
            f"{fam(r, 'additive')} | {r['flagged']} / {r.get('family')} / {r['detected_target']} / "
            f"{r.get('scan_seconds', 0):.0f} |"
        )
    return lines
