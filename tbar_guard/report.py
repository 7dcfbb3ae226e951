"""Reports: one JSON-able dict per run, rendered to report.json, report.md and an α-sweep plot.

Pure formatting: no model work here. ``write_report`` writes into a directory the caller owns
(normally the atomic output directory).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tbar_guard import __version__
from tbar_guard.sanitize import Removal, SweepPoint

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SWEEP_PNG = "alpha_sweep.png"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sweep_json(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    return [
        {
            "alpha": p.alpha,
            "clean_accuracy": p.clean_accuracy,
            "attack_success_rate": p.attack_success_rate,
            "feasible": p.feasible,
        }
        for p in points
    ]


def removal_json(removal: Removal) -> dict[str, Any]:
    """The TBAR part of a report (shared by ``sanitize`` and ``gate``).

    ``reemergence`` (after a clean fine-tune of the sanitized model) and ``disentanglement`` (ξ)
    are present only when they were measured."""
    out: dict[str, Any] = {
        "alpha": removal.alpha,
        "removal_method": removal.method or None,
        "before": removal.before.to_json(),
        "after": removal.after.to_json(),
        "val_before": removal.val_before.to_json(),
        "alpha_sweep": sweep_json(removal.choice.sweep) if removal.choice else [],
        # sanitize.alpha.extend_inverted moved the choice from this α (null: it did not)
        "alpha_extended_from": removal.choice.extended_from if removal.choice else None,
        "forget_size": removal.forget_size,
        "trigger_vector_norm": removal.trigger_vector_norm,
        "trigger_vector_relative_norm": removal.relative_norm,
        "finetune_steps": removal.finetune_steps,
    }
    if removal.reemergence is not None:
        out["reemergence"] = {
            **removal.reemergence.to_json(),
            "repair_images_from": removal.reemergence_pool,
            "audit": removal.audit_reemergence.to_json() if removal.audit_reemergence else None,
        }
    if removal.disentanglement is not None:
        out["disentanglement"] = removal.disentanglement.to_json()
    # accept.reference_rate_ceiling (gate): the ceilings the verdict used, from the clean reference's rate
    out["asr_ceilings"] = removal.ceilings.to_json() if removal.ceilings is not None else None
    return out


def base_report(command: str, verdict: str, exit_code: int, reason: str) -> dict[str, Any]:
    return {
        "tool": "tbar-guard",
        "version": __version__,
        "command": command,
        "verdict": verdict,
        "exit_code": exit_code,
        "reason": reason,
        "created_at": now_iso(),
    }


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def to_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable report; every number comes from ``report``."""
    lines = [
        f"# tbar-guard {report['command']}: **{report['verdict'].upper()}**",
        "",
        str(report["reason"]),
        "",
    ]
    if report.get("claim"):
        lines += [f"**In short:** {report['claim']}.", ""]
    for key, title in (("established", "What this run established"), ("not_established", "What it did not establish")):
        items = report.get(key) or []
        if items:
            lines += [f"## {title}", "", *(f"- {item}" for item in items), ""]
    model = report.get("model", {})
    if model:
        lines += [f"- model: `{model.get('source')}` (sha256 `{model.get('sha256')}`)"]
    output = report.get("output")
    if output:
        lines += [f"- sanitized model: `{output.get('path')}` (sha256 `{output.get('sha256')}`)"]
    if report.get("trigger_description"):
        lines += [f"- trigger: `{report['trigger_description']}`"]
    target = report.get("target")
    if target:
        lines += [f"- target class: {target['index']} ({target['name']})"]
    if "alpha" in report:
        method = f" (removal method `{report['removal_method']}`)" if report.get("removal_method") else ""
        lines += [f"- chosen alpha: {report['alpha']:g}{method}"]
    policy = report.get("policy", {})
    if policy:
        accept = policy.get("accept", {})
        lines += [
            f"- policy: CA floor {accept.get('ca_floor')} x original, ASR ceiling {accept.get('asr_ceiling')} "
            f"(sha256 `{report.get('policy_sha256', '')[:16]}`)"
        ]
    ceilings = report.get("asr_ceilings")
    if ceilings:
        how = (
            "the verdict's ceilings are the larger of the policy's and that"
            if ceilings["applied"]
            else "accept.reference_rate_ceiling is off: the verdict used the policy's ceiling"
        )
        lines += [
            f"- clean reference `{ceilings['reference']}` under the same trigger: {_pct(ceilings['val_rate'])} "
            f"(validation) / {_pct(ceilings['test_rate'])} (test) to the target; {how} "
            f"({_pct(ceilings['val_ceiling'])} / {_pct(ceilings['test_ceiling'])})"
        ]
    if "before" in report and "after" in report:
        before, after = report["before"], report["after"]
        kept = after["clean_accuracy"] / before["clean_accuracy"] if before["clean_accuracy"] else 0.0
        lines += [
            "",
            "## Before / after (test split)",
            "",
            "| | clean accuracy | attack success rate |",
            "|---|---|---|",
            f"| before | {_pct(before['clean_accuracy'])} | {_pct(before['attack_success_rate'])} |",
            f"| after | {_pct(after['clean_accuracy'])} | {_pct(after['attack_success_rate'])} |",
            "",
            f"Clean accuracy kept: {kept:.3f} of the original.",
        ]
    sweep = report.get("alpha_sweep") or []
    if sweep:
        lines += [
            "",
            "## Alpha sweep (validation split; the test split never chooses alpha)",
            "",
            "| alpha | clean accuracy | attack success rate | meets CA floor |",
            "|---|---|---|---|",
        ]
        for p in sweep:
            mark = " **(chosen)**" if p["alpha"] == report.get("alpha") else ""
            lines.append(
                f"| {p['alpha']:g}{mark} | {_pct(p['clean_accuracy'])} | {_pct(p['attack_success_rate'])} | "
                f"{'yes' if p['feasible'] else 'no'} |"
            )
        if report.get("pictures", {}).get("alpha_sweep"):
            lines += ["", f"![alpha sweep]({report['pictures']['alpha_sweep']})"]
    lines += _reinversion_md(report)
    lines += _reemergence_md(report)
    lines += _disentanglement_md(report)
    detection = report.get("detection")
    if detection:
        lines += ["", "## Detection", ""]
        for key, value in detection.items():
            if not isinstance(value, (dict, list)):
                lines.append(f"- {key}: {value}")
        lines += _families_md(detection.get("families"), detection.get("families_not_run"))
    pictures = {k: v for k, v in report.get("pictures", {}).items() if k != "alpha_sweep"}
    if pictures:
        lines += ["", "## Evidence pictures", ""] + [f"![{name}]({path})" for name, path in pictures.items()]
    timings = report.get("timings", {})
    if timings:
        lines += ["", "## Timings", ""] + [f"- {k}: {v:.1f} s" for k, v in timings.items()]
    lines += [
        "",
        f"tbar-guard {report['version']}, seed {report.get('seed')}, device {report.get('device')}, "
        f"{report['created_at']}",
        "",
    ]
    return "\n".join(lines)


def _families_md(families: Any, not_run: Any = None) -> list[str]:
    """The differential detector's per-family evidence: which family fired, the separation, the transfer check."""
    if not isinstance(families, dict) or not families:
        return []
    lines = [
        "",
        "| trigger family | fired | class | score | median | score / median (threshold) | robust z (threshold) | "
        "ASR on this model | ASR on the reference | transfer (reference / this model) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in families.items():
        z_t = "off" if f.get("z_threshold") is None else f"{f['z_threshold']:g}"
        transfer = f.get("transfer_ratio")
        lines.append(
            f"| {name} | {'yes' if f['flagged'] else 'no'} | {f['target']} | {f['score']:.3f} | {f['median_score']:.3f} | "
            f"{f['ratio']:.2f} ({f['ratio_threshold']:g}) | {f['z_score']:.2f} ({z_t}) | {_pct(f['target_asr'])} | "
            f"{_pct(f.get('target_reference_asr'))} | {'–' if transfer is None else f'{transfer:.2f}'} | "
            f"{f['seconds']:.0f} |"
        )
    for name, f in families.items():
        rel = f.get("relative")
        if isinstance(rel, dict):
            lines += [
                "",
                f"{name}, relative to the reference ({'fired' if rel['flagged'] else 'did not fire'}): "
                f"{rel['explanation']}",
            ]
    if not_run:
        lines += [
            "",
            f"Not searched (an earlier family fired; `detect.differential.search_all: true` runs them): "
            f"{', '.join(not_run)}",
        ]
    return lines


def _reinversion_md(report: Mapping[str, Any]) -> list[str]:
    """The gate's re-inversion rounds (tbar_guard.reinvert): each re-inverted trigger and whether it was added."""
    info = report.get("reinversion")
    if not info:
        return []
    lines: list[str] = []
    if info.get("companions"):
        lines += ["", "## Companion triggers", ""] + [
            f"- {c['family']}: {c['explanation']}" for c in info["companions"]
        ]
        trial = info.get("trial_companion")
        if trial == "dropped":
            lines += [
                "",
                "The companion on trial was dropped: the removal with it missed the policy; the one below is without it.",
            ]
        elif trial == "kept":
            lines += ["", "The companion on trial was kept: the removal below unlearned it with the other triggers."]
    if not info.get("rounds"):
        return lines
    lines += [
        "",
        f"## Re-inversion rounds ({info['triggers']} trigger(s) unlearned; at most {info['max_rounds']} added)",
        "",
        "After unlearning, the target class was inverted again on the unlearned model; a trigger that is still "
        "anomalous joins the forget set.",
        "",
        "| unlearned triggers | re-inverted area | median area | robust z | ASR on the unlearned model | "
        "ASR on the reference | added |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in info["rounds"]:
        lines.append(
            f"| {r['triggers_before']} | {r['area']:.3f} | {r['median_area']:.3f} | {r['z_score']:.2f} | "
            f"{_pct(r['asr_on_unlearned'])} | {_pct(r.get('reference_asr'))} | {'yes' if r['added'] else 'no'} |"
        )
    return lines


def _reemergence_md(report: Mapping[str, Any]) -> list[str]:
    back = report.get("reemergence")
    if not back:
        return []
    lines = [
        "",
        f"## Re-emergence (test split, after a clean fine-tune of the sanitized model: {back['images']} images, "
        f"{back['epochs']} epochs, lr {back['lr']:g})",
        "",
        "| trigger | ASR after removal | ASR after the clean fine-tune | clean accuracy after the clean fine-tune |",
        "|---|---|---|---|",
        f"| the one removal used | {_pct(report.get('after', {}).get('attack_success_rate'))} | "
        f"{_pct(back['attack_success_rate'])} | {_pct(back['clean_accuracy'])} |",
    ]
    audit = back.get("audit")
    if audit:
        after = (report.get("true_trigger") or {}).get("after") or {}
        lines.append(
            f"| true trigger (audit) | {_pct(after.get('attack_success_rate'))} | "
            f"{_pct(audit['attack_success_rate'])} | {_pct(audit['clean_accuracy'])} |"
        )
    limit = (report.get("policy", {}).get("accept") or {}).get("max_reemergence_asr")
    lines += [
        "",
        f"Repair images: {back['repair_images_from']} (never the test split). "
        + (f"Policy limit on the re-emergence ASR: {limit}." if limit is not None else "The policy sets no limit."),
    ]
    return lines


def _disentanglement_md(report: Mapping[str, Any]) -> list[str]:
    d = report.get("disentanglement")
    if not d:
        return []
    lines = [
        "",
        f"## Weight disentanglement ξ (trigger vector vs a clean vector; {d['images']} validation images, "
        "clean and stamped)",
        "",
        "| alpha_clean (rows) / alpha_trigger (columns) | " + " | ".join(f"{a:g}" for a in d["alphas_trigger"]) + " |",
        "|---|" + "---|" * len(d["alphas_trigger"]),
    ]
    for a_c, row in zip(d["alphas_clean"], d["xi"], strict=True):
        lines.append(f"| {a_c:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    chosen = d.get("at_chosen_alpha")
    worst = (
        f"; at the chosen alpha (alpha_trigger {chosen['alpha_trigger']:g}) at most {chosen['max_xi']:.3f}"
        if chosen
        else ""
    )
    lines += [
        "",
        f"Mean ξ {d['mean_xi']:.3f}{worst} (0 = disentangled, 2 = fully entangled). Low ξ means the trigger "
        "vector acts on triggered inputs only: negating it leaves clean predictions as they were, and clean "
        "fine-tuning leaves the sanitized model's triggered predictions as they were.",
    ]
    return lines


def plot_sweep(sweep: Sequence[Mapping[str, Any]], chosen: float | None, path: Path) -> Path:
    """CA and ASR against α (validation split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in sweep]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(alphas, [p["clean_accuracy"] for p in sweep], "o-", label="clean accuracy")
    ax.plot(alphas, [p["attack_success_rate"] for p in sweep], "s-", label="attack success rate")
    if chosen is not None:
        ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen alpha {chosen:g}")
    ax.set_xlabel("alpha")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("TBAR alpha sweep (validation)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(directory: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write report.json + report.md (+ the sweep plot) into ``directory``; returns the final report."""
    directory.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    pictures = dict(report.get("pictures", {}))
    if report.get("alpha_sweep"):
        plot_sweep(report["alpha_sweep"], report.get("alpha"), directory / SWEEP_PNG)
        pictures["alpha_sweep"] = SWEEP_PNG
    report["pictures"] = pictures
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (directory / REPORT_MD).write_text(to_markdown(report), encoding="utf-8")
    return report
