"""The reporting step of the GitHub Action (``action.yml``): turn a gate run into CI results.

``python -m tbar_guard.action --report DIR/report.json --exit-code N --fail-on LIST --sarif PATH``
(optional: ``--gate-log LOG`` the gate's captured output, whose error lines are quoted for an
error; ``--model M --policy P`` the inputs, where findings and annotations point; ``--check``
only validates ``--fail-on``) reads what ``tbar-guard gate`` left behind and

- appends ``key=value`` lines to ``$GITHUB_OUTPUT`` (the action's outputs),
- appends Markdown to ``$GITHUB_STEP_SUMMARY`` (the job summary),
- prints ``::error::`` / ``::warning::`` / ``::notice::`` workflow commands (annotations),
- writes a SARIF 2.1.0 log for code scanning,
- exits 1 when the verdict is in ``--fail-on``, else 0 (2 for a bad ``--fail-on``).

The verdict fails closed: a missing or unreadable report, an exit code of 2 (error) or 4 (usage),
or a report that disagrees with the exit code all give the verdict ``error``. A usage error
(exit 4) never wrote the report it finds, so that report (e.g. left by an earlier run in the same
directory) is ignored. Every piece is a pure function of the report so it can be tested alone.
This module imports nothing heavy (no torch): the step runs in a second or so. (No
``from __future__ import annotations`` here: it would shadow the ``annotations`` function; the
annotations below all evaluate on Python 3.10+.)
"""

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from tbar_guard import __version__
from tbar_guard.exit_codes import ExitCode

VERDICTS = ("clean", "removed", "unremoved", "error")
FAIL_ON_ALIASES: dict[str, tuple[str, ...]] = {"backdoor": ("removed", "unremoved"), "none": ()}
DEFAULT_FAIL_ON = "unremoved,error"
EXIT_VERDICT = {
    int(ExitCode.CLEAN): "clean",
    int(ExitCode.BACKDOOR_REMOVED): "removed",
    int(ExitCode.UNREMOVED): "unremoved",
}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
BUNDLE_WEIGHTS = "open_clip_model.safetensors"
TITLES = {
    "clean": "no small-mask trigger found (not proof of clean)",
    "removed": "backdoor found and removed",
    "unremoved": "backdoor found, not removable under the policy",
    "error": "gate error",
}
ICONS = {"clean": "✅", "removed": "⚠️", "unremoved": "⛔", "error": "❌"}


# --- fail-on ----------------------------------------------------------------------------------


def parse_fail_on(text: str | Iterable[str]) -> frozenset[str]:
    """``"unremoved,error"`` → the verdicts that fail the job. ``backdoor`` = removed + unremoved,
    ``none`` = never fail. Unknown names raise ValueError (a typo must not pass silently)."""
    items = re.split(r"[\s,]+", text) if isinstance(text, str) else list(text)
    names = [item.strip().lower() for item in items if item.strip()]
    if not names:
        raise ValueError("fail-on is empty; name verdicts (clean, removed, unremoved, error, backdoor) or 'none'")
    verdicts: set[str] = set()
    unknown = []
    for name in names:
        if name in FAIL_ON_ALIASES:
            verdicts.update(FAIL_ON_ALIASES[name])
        elif name in VERDICTS:
            verdicts.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"fail-on: unknown verdict(s) {', '.join(repr(u) for u in unknown)}; "
            f"choose from {', '.join(VERDICTS)}, backdoor (= removed,unremoved) or none"
        )
    return frozenset(verdicts)


def should_fail(verdict: str, fail_on: str | Iterable[str]) -> bool:
    """True when ``verdict`` is in ``fail_on``. A verdict this module does not know counts as
    ``error`` (fail closed)."""
    verdicts = parse_fail_on(fail_on)
    return (verdict if verdict in VERDICTS else "error") in verdicts


# --- reading the gate's result ----------------------------------------------------------------


def _parse_exit_code(value: str | int | None) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _error_report(exit_code: int | None, reason: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = dict(base or {"tool": "tbar-guard", "command": "gate"})
    if base is not None and base.get("verdict") != "error":
        report["gate_verdict"] = base.get("verdict")
    report["verdict"] = "error"
    report["exit_code"] = exit_code
    report["reason"] = reason
    return report


def gate_messages(log: str, limit: int = 8) -> list[str]:
    """The CLI's own error lines (``error:``, its problem list, ``hint:``) from the gate's log."""
    keep = re.compile(r"^(error:|internal error:|hint:|interrupted:|  - )")
    lines = [line.rstrip() for line in log.splitlines() if keep.match(line)]
    return lines[-limit:]


def resolve(report_path: Path | None, exit_code: str | int | None, gate_log: str = "") -> dict[str, Any]:
    """The gate's report with the verdict the job should act on (``error`` whenever in doubt).

    ``report_path`` may not exist (the gate failed before writing it). The returned dict always
    has ``verdict`` (one of VERDICTS), ``exit_code`` (the gate's, or None if unknown) and ``reason``;
    for an error, the reason quotes the CLI's error lines from ``gate_log``."""
    report = _resolve(report_path, exit_code)
    messages = gate_messages(gate_log)
    if report["verdict"] == "error" and messages:
        report["reason"] = f"{report['reason']}. tbar-guard said: " + " ".join(m.strip() for m in messages)
    return report


def _resolve(report_path: Path | None, exit_code: str | int | None) -> dict[str, Any]:
    code = _parse_exit_code(exit_code)
    if code is None:
        return _error_report(None, f"the gate step reported no usable exit code ({exit_code!r})")
    if code == int(ExitCode.USAGE):
        note = ""
        if report_path is not None and report_path.is_file():
            note = (
                f"; the existing {report_path} was ignored (a usage error writes no report: it is from an earlier run)"
            )
        return _error_report(code, f"tbar-guard gate exited {code} (usage error){note}")
    if report_path is None or not report_path.is_file():
        return _error_report(code, f"tbar-guard gate exited {code} and wrote no report")
    try:
        loaded = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error_report(code, f"the gate's report {report_path} is unreadable: {exc}")
    if not isinstance(loaded, dict):
        return _error_report(code, f"the gate's report {report_path} is not a JSON object")
    report: dict[str, Any] = loaded
    reason = str(report.get("reason", ""))
    if code not in EXIT_VERDICT:
        return _error_report(code, f"tbar-guard gate exited {code} (error): {reason}".rstrip(": "), report)
    expected = EXIT_VERDICT[code]
    if report.get("verdict") != expected or _parse_exit_code(report.get("exit_code")) != code:
        return _error_report(
            code,
            f"the gate exited {code} ({expected}) but its report says verdict {report.get('verdict')!r}, "
            f"exit code {report.get('exit_code')!r}; treated as an error",
            report,
        )
    return dict(report)


# --- small formatting helpers -----------------------------------------------------------------


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _num(value: Any, spec: str = ".6g") -> str:
    number = _float(value)
    return "" if number is None else format(number, spec)


def _yes(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else "n/a"


def _pct(value: Any) -> str:
    number = _float(value)
    return "n/a" if number is None else f"{100 * number:.1f}%"


def _md(value: Any) -> str:
    """Text from the report, safe inside Markdown and table cells: one line; no links, images,
    HTML, emphasis or cell breaks can come from it."""
    text = " ".join(str(value).split())
    text = re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)
    return "\\" + text if text[:1] in ("#", "+", "-", "=") else text


def _code(value: Any, in_table: bool = True) -> str:
    """An inline code span (in a GFM table cell a pipe must still be escaped inside it)."""
    text = " ".join(str(value).split())
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def sanitized_uri(report: Mapping[str, Any]) -> str:
    registered = _obj(report.get("registered"))
    if registered.get("uri"):
        return str(registered["uri"])
    output = _obj(report.get("output"))
    return str(output["path"]) if output.get("path") else ""


def _target(report: Mapping[str, Any]) -> str:
    target = _obj(report.get("target"))
    if "index" not in target:
        det = _obj(report.get("detection"))
        if "target_index" not in det:
            return ""
        target = {"index": det["target_index"], "name": det.get("target_name", "")}
    return f"{target['index']} ({target.get('name', '')!s})"


# --- outputs ----------------------------------------------------------------------------------


def outputs(report: Mapping[str, Any], report_path: str | Path | None = None) -> dict[str, str]:
    """The action's outputs (every value a string; absent numbers are empty strings)."""
    before, after = _obj(report.get("before")), _obj(report.get("after"))
    code = report.get("exit_code")
    return {
        "verdict": str(report.get("verdict", "error")),
        "exit-code": "" if code is None else str(code),
        "sanitized-model-uri": sanitized_uri(report),
        "alpha": _num(report.get("alpha"), "g"),
        "ca-before": _num(before.get("clean_accuracy")),
        "ca-after": _num(after.get("clean_accuracy")),
        "asr-before": _num(before.get("attack_success_rate")),
        "asr-after": _num(after.get("attack_success_rate")),
        "report-path": "" if report_path is None else str(report_path),
    }


def github_output_lines(values: Mapping[str, str]) -> str:
    """``$GITHUB_OUTPUT`` syntax: ``key=value``, or a random heredoc delimiter for multi-line values."""
    lines = []
    for key, value in values.items():
        if "\n" in value or "\r" in value:
            delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
            lines.append(f"{key}<<{delimiter}\n{value}\n{delimiter}")
        else:
            lines.append(f"{key}={value}")
    return "".join(f"{line}\n" for line in lines)


# --- job summary ------------------------------------------------------------------------------


def _before_after(report: Mapping[str, Any]) -> list[str]:
    before, after = _obj(report.get("before")), _obj(report.get("after"))
    if not before or not after:
        return []
    lines = [
        "### Before / after (test split)",
        "",
        "| | clean accuracy | attack success rate |",
        "|---|---|---|",
        f"| before | {_pct(before.get('clean_accuracy'))} | {_pct(before.get('attack_success_rate'))} |",
        f"| after | {_pct(after.get('clean_accuracy'))} | {_pct(after.get('attack_success_rate'))} |",
        "",
    ]
    ca_b, ca_a = _float(before.get("clean_accuracy")), _float(after.get("clean_accuracy"))
    notes = []
    if _float(report.get("alpha")) is not None:
        notes.append(f"α = {_num(report.get('alpha'), 'g')}")
    if ca_b and ca_a is not None:
        notes.append(f"clean accuracy kept: {ca_a / ca_b:.3f} of the original")
    sizes = [f"{k}: {before[k]}" for k in ("n_clean", "n_attack") if isinstance(before.get(k), int)]
    if sizes:
        notes.append(", ".join(sizes))
    if notes:
        lines += ["; ".join(notes) + ".", ""]
    return lines


def _sweep(report: Mapping[str, Any]) -> list[str]:
    sweep = [p for p in report.get("alpha_sweep") or [] if isinstance(p, dict)]
    if not sweep:
        return []
    lines = [
        "### α sweep (validation split; the test split never chooses α)",
        "",
        "| α | clean accuracy | attack success rate | meets CA floor |",
        "|---|---|---|---|",
    ]
    chosen = _float(report.get("alpha"))
    for point in sweep:
        alpha = _float(point.get("alpha"))
        mark = " **(chosen)**" if alpha is not None and alpha == chosen else ""
        feasible = _yes(point.get("feasible"))
        lines.append(
            f"| {_num(alpha, 'g')}{mark} | {_pct(point.get('clean_accuracy'))} | "
            f"{_pct(point.get('attack_success_rate'))} | {feasible} |"
        )
    return [*lines, ""]


def _detection(report: Mapping[str, Any]) -> list[str]:
    det = _obj(report.get("detection"))
    if not det:
        return []
    lines = []
    if "target_index" in det or report.get("target"):
        top3 = [_obj(t) for t in det.get("top3") or []]
        shares = ", ".join(f"{_md(t.get('name', t.get('index')))} {_pct(t.get('share'))}" for t in top3)
        heading = "Inferred target" if det.get("flagged") is not False else "Inferred target (not flagged)"
        lines += [
            f"### {heading}",
            "",
            f"Class **{_md(_target(report))}**: {_pct(det.get('proxy_asr'))} of held-out clean images stamped "
            f"with the inverted trigger go to it (proxy ASR), against {_pct(det.get('base_rate'))} unstamped "
            f"(base rate)." + (f" Top 3: {shares}." if shares else ""),
            "",
        ]
        if det.get("actionable") is False:
            lines += [f"Not actionable: {_md(det.get('actionable_reason', ''))}", ""]
    refs = [_num(v, ".4g") for v in det.get("reference_pl1") or []]
    rows = [
        ("method", _md(det.get("method", ""))),
        ("rule", _md(det.get("rule", ""))),
        ("flagged", _yes(det.get("flagged"))),
        ("PL1 (mask area fraction)", _num(det.get("pl1"), ".4g")),
        ("threshold", _num(det.get("threshold"), ".4g")),
        ("reference PL1", ", ".join(r for r in refs if r) or "none"),
        ("official L1", _num(det.get("l1_official"), ".4g")),
        ("inversion succeeded", _yes(det.get("inversion_succeeded"))),
        ("best cosine", _num(det.get("best_cosine"), ".4g")),
        ("steps / seconds", f"{_num(det.get('steps'), 'g')} / {_num(det.get('seconds'), '.1f')}"),
    ]
    lines += ["### Detection (DECREE trigger inversion)", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    if det.get("explanation"):
        lines += [_md(det["explanation"]), ""]
    if det.get("rule_note"):
        lines += [f"> [!WARNING]\n> {_md(det['rule_note'])}", ""]
    return lines


def _true_trigger(report: Mapping[str, Any]) -> list[str]:
    true = _obj(report.get("true_trigger"))
    if not true:
        return []
    before, after = _obj(true.get("before")), _obj(true.get("after"))
    if not before and not after:
        measured = "not measured (no removal ran)."
    else:
        measured = (
            f"attack success rate {_pct(before.get('attack_success_rate'))} → {_pct(after.get('attack_success_rate'))}."
        )
    return [
        "### Audit: the true trigger (from the policy)",
        "",
        f"{_md(true.get('description', ''))}, target {_md(_obj(true.get('target')).get('name', ''))}: {measured}",
        "",
    ]


def _evidence(report: Mapping[str, Any], report_dir: str) -> list[str]:
    pictures = {str(k): str(v) for k, v in _obj(report.get("pictures")).items()}
    root = report_dir.rstrip("/") or "."
    lines = ["### Evidence", ""]
    if pictures:
        lines += ["| picture | file in the report directory |", "|---|---|"]
        lines += [f"| {_md(name)} | {_code(f'{root}/{path}')} |" for name, path in pictures.items()]
        lines.append("")
    lines += [
        f"The report directory {_code(root + '/', in_table=False)} (report.json, report.md"
        + (", the pictures" if pictures else "")
        + ") is uploaded as an artifact of this workflow run: download it from the run's **Artifacts** "
        "section; report.md there shows the pictures inline.",
        "",
    ]
    return lines


def summary_markdown(
    report: Mapping[str, Any], report_dir: str = "tbar-guard-report", fail_on: str | Iterable[str] = DEFAULT_FAIL_ON
) -> str:
    """The job summary for one gate run."""
    verdict = str(report.get("verdict", "error"))
    fails = should_fail(verdict, fail_on)
    model = _obj(report.get("model"))
    lines = [
        f"## {ICONS.get(verdict, '❌')} tbar-guard: {TITLES.get(verdict, 'gate error')} (`{_md(verdict)}`)",
        "",
        f"> {_md(report.get('reason', ''))}",
        "",
        "| | |",
        "|---|---|",
    ]
    rows: list[tuple[str, str]] = []
    if model.get("source"):
        rows.append(("model", _code(model["source"])))
    if model.get("sha256"):
        rows.append(("model sha256", _code(model["sha256"])))
    if sanitized_uri(report):
        rows.append(("sanitized model", _code(sanitized_uri(report))))
    output = _obj(report.get("output"))
    if output.get("sha256"):
        rows.append(("sanitized sha256", _code(output["sha256"])))
    if _obj(report.get("registered")).get("reused"):
        rows.append(("registry", "already gated with this policy: the existing sanitized version was reused"))
    if report.get("alias_moved"):
        rows.append(("alias moved", _md(report["alias_moved"])))
    elif report.get("alias_note"):
        rows.append(("alias", _md(report["alias_note"])))
    if _target(report) and verdict != "clean":
        rows.append(("inferred target", _md(_target(report))))
    if _float(report.get("alpha")) is not None:
        rows.append(("α", _num(report.get("alpha"), "g")))
    if report.get("registry_error"):
        rows.append(("registry error", _md(report["registry_error"])))
    code = report.get("exit_code")
    rows.append(("gate exit code", "unknown" if code is None else _md(code)))
    wanted = ", ".join(v for v in VERDICTS if should_fail(v, fail_on)) or "none"
    rows.append(("job", f"**{'fails' if fails else 'passes'}** (fail-on: {wanted})"))
    if report.get("policy_sha256"):
        rows.append(("policy sha256", _code(str(report["policy_sha256"])[:16])))
    if report.get("device"):
        rows.append(("device", _md(report["device"])))
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    lines += _before_after(report)
    lines += _sweep(report)
    lines += _detection(report)
    lines += _true_trigger(report)
    if verdict != "error" or report.get("pictures"):
        lines += _evidence(report, report_dir)
    version = report.get("version") or __version__
    lines += [f"<sub>tbar-guard {_md(version)}, {_md(report.get('created_at', ''))}</sub>", "", ""]
    return "\n".join(lines)


# --- annotations (workflow commands) ----------------------------------------------------------


def escape_data(text: str) -> str:
    """Escape a workflow command's message (GitHub's rules: %, CR, LF)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command's property value (the message rules plus ``:`` and ``,``)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(level: str, message: str, **properties: str | int) -> str:
    props = ",".join(f"{key}={escape_property(str(value))}" for key, value in properties.items())
    return f"::{level}{' ' + props if props else ''}::{escape_data(message)}"


def _numbers(report: Mapping[str, Any]) -> str:
    parts = []
    det = _obj(report.get("detection"))
    if _float(det.get("pl1")) is not None:
        parts.append(
            f"PL1 {_num(det.get('pl1'), '.4g')} vs threshold {_num(det.get('threshold'), '.4g')} "
            f"({det.get('rule', '')} rule)"
        )
    if _target(report) and det.get("flagged") is not False:
        parts.append(f"target {_target(report)}, proxy ASR {_pct(det.get('proxy_asr'))}")
    before, after = _obj(report.get("before")), _obj(report.get("after"))
    if before and after:
        parts.append(
            f"alpha {_num(report.get('alpha'), 'g')}: clean accuracy {_pct(before.get('clean_accuracy'))} -> "
            f"{_pct(after.get('clean_accuracy'))}, attack success rate {_pct(before.get('attack_success_rate'))} -> "
            f"{_pct(after.get('attack_success_rate'))} (test split)"
        )
    if sanitized_uri(report):
        parts.append(f"sanitized model {sanitized_uri(report)}")
    return "; ".join(parts)


def _message(report: Mapping[str, Any]) -> str:
    verdict = str(report.get("verdict", "error"))
    source = _obj(report.get("model")).get("source")
    head = f"tbar-guard: {TITLES.get(verdict, 'gate error')}" + (f" in {source}" if source else "")
    numbers = _numbers(report)
    return f"{head}. {report.get('reason', '')}" + (f" [{numbers}]" if numbers else "")


def _level(verdict: str, fail_on: str | Iterable[str]) -> str:
    if should_fail(verdict, fail_on):
        return "error"
    return {"clean": "notice", "removed": "warning", "unremoved": "error", "error": "error"}.get(verdict, "error")


def annotations(
    report: Mapping[str, Any], fail_on: str | Iterable[str] = DEFAULT_FAIL_ON, file: str | None = None
) -> list[str]:
    """The workflow commands to print (already escaped). ``file`` (a repository-relative path) puts
    the main annotation on that file in the pull request."""
    verdict = str(report.get("verdict", "error"))
    where: dict[str, str | int] = {"title": f"tbar-guard: {TITLES.get(verdict, 'gate error')}"}
    if file:
        where.update({"file": file, "line": 1})
    commands = [workflow_command(_level(verdict, fail_on), _message(report), **where)]
    note = _obj(report.get("detection")).get("rule_note")
    if note:
        commands.append(workflow_command("warning", str(note), title="tbar-guard: uncalibrated detection"))
    if report.get("alias_note"):
        commands.append(workflow_command("notice", str(report["alias_note"]), title="tbar-guard: alias"))
    verdicts = parse_fail_on(fail_on)
    if "error" not in verdicts:
        commands.append(
            workflow_command(
                "warning",
                "fail-on does not include 'error': a gate that errors will not fail this job",
                title="tbar-guard: fail-on",
            )
        )
    if should_fail(verdict, fail_on):
        wanted = ", ".join(v for v in VERDICTS if v in verdicts)
        commands.append(
            workflow_command(
                "error", f"verdict {verdict!r} is in fail-on ({wanted}): failing the job", title="tbar-guard"
            )
        )
    return commands


# --- SARIF ------------------------------------------------------------------------------------

RULES: tuple[dict[str, Any], ...] = (
    {
        "id": "TBG001",
        "name": "backdoor-detected",
        "shortDescription": {"text": "Backdoor detected in the model (removed under the policy)"},
        "fullDescription": {
            "text": "DECREE trigger inversion found a trigger that is anomalously easy to plant in the image "
            "encoder, with an actionable target class. TBAR removed it within the policy's clean-accuracy "
            "floor and attack-success ceiling; promote the sanitized model, never the original."
        },
        "help": {
            "text": "The original model carries a backdoor. Use the sanitized version named in the result and review "
            "the report artifact (before/after metrics, alpha sweep, inverted trigger pictures).",
            "markdown": "The original model carries a backdoor. Use the **sanitized** version named in the result "
            "and review the report artifact (before/after metrics, α sweep, inverted trigger pictures).",
        },
        "defaultConfiguration": {"level": "warning"},
        "properties": {
            "tags": ["security", "ml-model", "backdoor"],
            "precision": "medium",
            "security-severity": "5.0",
        },
    },
    {
        "id": "TBG002",
        "name": "backdoor-unremovable",
        "shortDescription": {"text": "Backdoor detected and not removable under the policy"},
        "fullDescription": {
            "text": "A backdoor was detected but no sanitized model meets the policy (or the inverted trigger is not "
            "actionable). Nothing was registered and no alias was moved: do not deploy this model."
        },
        "help": {
            "text": "Do not promote this model version. Retrain from trusted data, or relax the policy only after "
            "reviewing the alpha sweep in the report.",
            "markdown": "Do **not** promote this model version. Retrain from trusted data, or relax the policy only "
            "after reviewing the α sweep in the report.",
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {
            "tags": ["security", "ml-model", "backdoor"],
            "precision": "medium",
            "security-severity": "8.5",
        },
    },
    {
        "id": "TBG003",
        "name": "gate-error",
        "shortDescription": {"text": "The model-security gate could not reach a verdict"},
        "fullDescription": {
            "text": "tbar-guard gate failed (unreadable or unsafe model, bad data or policy, MLflow failure, crash). "
            "Nothing was registered or promoted; the model is unchecked."
        },
        "help": {
            "text": "Read the gate step's log and the result message, fix the input, and run the gate again.",
            "markdown": "Read the gate step's log and the result message, fix the input, and run the gate again.",
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "ml-model", "reliability"], "precision": "high"},
    },
    {
        "id": "TBG004",
        "name": "detection-uncalibrated",
        "shortDescription": {"text": "Detection ran without a clean reference"},
        "fullDescription": {
            "text": "No clean reference model (or, for DECREE, reference PL1) was given, so the verdict is "
            "uncalibrated: universal adversarial patterns of the architecture are not discounted and clean "
            "models can be flagged."
        },
        "help": {
            "text": "Add detect.reference_models (the base model or the promoted version) or detect.decree.reference_pl1 to "
            "the policy.",
            "markdown": "Add `detect.reference_models` (the base model or the promoted version) or "
            "`detect.decree.reference_pl1` to the policy.",
        },
        "defaultConfiguration": {"level": "note"},
        "properties": {"tags": ["security", "ml-model", "configuration"], "precision": "low"},
    },
)
_RULE_INDEX = {rule["id"]: i for i, rule in enumerate(RULES)}
_VERDICT_RULE = {"removed": "TBG001", "unremoved": "TBG002", "error": "TBG003"}


def _has_scheme(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) is not None


def repo_path(path: str | None, workspace: str | Path | None = None, *, must_exist: bool = False) -> str | None:
    """``path`` as a POSIX path relative to the workspace (what code scanning and annotations take),
    or None for registry URIs and paths outside the workspace. A bundle directory maps to its
    weights file."""
    if not path or _has_scheme(path):
        return None
    root = Path(workspace or os.getcwd()).resolve()
    full = Path(path) if Path(path).is_absolute() else root / path
    full = Path(os.path.normpath(full))
    try:
        relative = full.relative_to(root)
    except ValueError:
        return None
    if full.is_dir():
        if not (full / BUNDLE_WEIGHTS).is_file():
            return None
        relative = relative / BUNDLE_WEIGHTS
    elif must_exist and not full.is_file():
        return None
    text = PurePosixPath(*relative.parts).as_posix()
    return None if text in ("", ".") else text


def workflow_file(workflow_ref: str | None) -> str | None:
    """``owner/repo/.github/workflows/x.yml@refs/...`` (``$GITHUB_WORKFLOW_REF``) → the file's path."""
    match = re.match(r"^[^/]+/[^/]+/(.+?)@", workflow_ref or "")
    return match.group(1) if match else None


def primary_location(
    model: str | None, policy: str | None, workspace: str | Path | None = None, fallback: str | None = None
) -> str | None:
    """Where a finding points: the model when it is a file in the repository, else the policy,
    else ``fallback`` (the workflow file)."""
    return repo_path(model, workspace, must_exist=True) or repo_path(policy, workspace) or fallback


def _metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    det = _obj(report.get("detection"))
    before, after = _obj(report.get("before")), _obj(report.get("after"))
    values: dict[str, Any] = {
        "verdict": report.get("verdict"),
        "gateExitCode": report.get("exit_code"),
        "modelSource": _obj(report.get("model")).get("source"),
        "modelSha256": _obj(report.get("model")).get("sha256"),
        "sanitizedModel": sanitized_uri(report) or None,
        "sanitizedSha256": _obj(report.get("output")).get("sha256"),
        "alpha": _float(report.get("alpha")),
        "cleanAccuracyBefore": _float(before.get("clean_accuracy")),
        "cleanAccuracyAfter": _float(after.get("clean_accuracy")),
        "attackSuccessRateBefore": _float(before.get("attack_success_rate")),
        "attackSuccessRateAfter": _float(after.get("attack_success_rate")),
        "detectionRule": det.get("rule"),
        "pl1": _float(det.get("pl1")),
        "threshold": _float(det.get("threshold")),
        "proxyAttackSuccessRate": _float(det.get("proxy_asr")),
        "baseRate": _float(det.get("base_rate")),
        "target": _target(report) or None,
        "policySha256": report.get("policy_sha256"),
    }
    return {key: value for key, value in values.items() if value is not None and value != ""}


def _result(rule_id: str, level: str, text: str, report: Mapping[str, Any], uri: str | None) -> dict[str, Any]:
    model = _obj(report.get("model"))
    identity = f"{rule_id}|{model.get('source', '')}|{model.get('sha256', '')}"
    result: dict[str, Any] = {
        "ruleId": rule_id,
        "ruleIndex": _RULE_INDEX[rule_id],
        "level": level,
        "message": {"text": text},
        "partialFingerprints": {"tbarGuardFinding/v1": hashlib.sha256(identity.encode()).hexdigest()[:32]},
        "properties": _metrics(report),
    }
    if uri:
        result["locations"] = [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": uri, "uriBaseId": "%SRCROOT%"},
                    "region": {"startLine": 1},
                }
            }
        ]
    return result


def sarif(
    report: Mapping[str, Any],
    *,
    model: str | None = None,
    policy: str | None = None,
    fail_on: str | Iterable[str] = DEFAULT_FAIL_ON,
    workspace: str | Path | None = None,
    fallback_uri: str | None = None,
) -> dict[str, Any]:
    """A SARIF 2.1.0 log: one result per finding (none for a clean, calibrated verdict)."""
    verdict = str(report.get("verdict", "error"))
    if verdict not in VERDICTS:
        verdict = "error"
    model = model or _obj(report.get("model")).get("source")
    uri = primary_location(model, policy, workspace, fallback_uri)
    results = []
    if verdict in _VERDICT_RULE:
        rule_id = _VERDICT_RULE[verdict]
        level = (
            "error"
            if should_fail(verdict, fail_on)
            else str(RULES[_RULE_INDEX[rule_id]]["defaultConfiguration"]["level"])
        )
        results.append(_result(rule_id, level, _message(report), report, uri))
    note = _obj(report.get("detection")).get("rule_note")
    if note:
        results.append(_result("TBG004", "note", f"tbar-guard: {note}", report, uri))
    code = _parse_exit_code(report.get("exit_code"))
    invocation: dict[str, Any] = {"executionSuccessful": verdict != "error"}
    if code is not None:
        invocation["exitCode"] = code
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "tbar-guard",
                "version": __version__,
                "semanticVersion": __version__,
                "rules": [dict(rule) for rule in RULES],
            }
        },
        "invocations": [invocation],
        "results": results,
        "properties": _metrics(report),
    }
    root = Path(workspace or os.getcwd()).resolve()
    run["originalUriBaseIds"] = {"%SRCROOT%": {"uri": root.as_uri().rstrip("/") + "/"}}
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


# --- the CLI ----------------------------------------------------------------------------------


def _append(path: str | None, text: str) -> bool:
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tbar_guard.action",
        description="Report a `tbar-guard gate` run to GitHub Actions: outputs, job summary, annotations, SARIF.",
    )
    p.add_argument("--report", type=Path, help="the gate's report.json (may be missing)")
    p.add_argument("--exit-code", default="", help="the exit code of `tbar-guard gate`")
    p.add_argument("--fail-on", default=DEFAULT_FAIL_ON, help="comma list of verdicts that fail the job")
    p.add_argument("--sarif", default="", help="where to write the SARIF log ('' = none)")
    p.add_argument("--gate-log", type=Path, default=None, help="the gate's captured output (for error messages)")
    p.add_argument("--model", default=None, help="the model input (SARIF/annotation location)")
    p.add_argument("--policy", default=None, help="the policy input (SARIF/annotation location)")
    p.add_argument("--check", action="store_true", help="only validate --fail-on and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        parse_fail_on(args.fail_on)
    except ValueError as exc:
        print(workflow_command("error", str(exc), title="tbar-guard: fail-on"))  # noqa: T201
        return int(ExitCode.ERROR)
    if args.check:
        return 0
    gate_log = ""
    if args.gate_log is not None and args.gate_log.is_file():
        gate_log = args.gate_log.read_text(encoding="utf-8", errors="replace")
    report = resolve(args.report, args.exit_code, gate_log)
    usable = args.report is not None and args.report.is_file() and report["exit_code"] != int(ExitCode.USAGE)
    values = outputs(report, args.report if usable else None)
    report_dir = str(args.report.parent) if args.report is not None else "tbar-guard-report"
    workspace = os.environ.get("GITHUB_WORKSPACE") or os.getcwd()
    fallback = workflow_file(os.environ.get("GITHUB_WORKFLOW_REF"))
    model = args.model or _obj(report.get("model")).get("source")
    location = primary_location(model, args.policy, workspace, fallback)
    for command in annotations(report, args.fail_on, file=location):
        print(command)  # noqa: T201
    if not _append(os.environ.get("GITHUB_OUTPUT"), github_output_lines(values)):
        for key, value in values.items():
            print(f"{key}: {value}")  # noqa: T201
    summary = summary_markdown(report, report_dir, args.fail_on)
    if not _append(os.environ.get("GITHUB_STEP_SUMMARY"), summary):
        print(summary)  # noqa: T201
    if args.sarif:
        log = sarif(
            report, model=model, policy=args.policy, fail_on=args.fail_on, workspace=workspace, fallback_uri=fallback
        )
        target = Path(args.sarif)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    return 1 if should_fail(report["verdict"], args.fail_on) else 0


if __name__ == "__main__":
    sys.exit(main())
