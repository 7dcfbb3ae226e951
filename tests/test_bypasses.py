"""Regression tests for evasions and bypasses of tbar-guard's guarantees.

Convention: every evasion or bypass found (by us, a reviewer or a user) gets exactly one test
here, added before or with its fix, headed by a one-line comment::

    # BYPASS <n>: <what an attacker or a fault could do> -> <what holds now> (<fixed in / status>)

The test reproduces the attack or fault with real parts (a real MLflow server, a real proxy
that loses answers, real signals, real models), and asserts the guarantee that the bypass
broke. A bypass that is not fixed yet stays here as ``xfail(strict=True)`` with the reason, so
the day it is fixed the suite says so. Never delete a test from this file; the README's
"Guarantees" table points at them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_proxy import Fault, faulty_proxy
from mlflow import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401
from typer.testing import CliRunner

from tbar_guard import promote, registry
from tbar_guard.attacks import build_trigger, parse_trigger
from tbar_guard.bundle import ClipBundle, build_model, save_model, sha256_file, sha256_state
from tbar_guard.cli import app
from tbar_guard.clip import classifier_for
from tbar_guard.data import ImageSet
from tbar_guard.evaluate import evaluate
from tbar_guard.exit_codes import ExitCode
from tbar_guard.gate import NOT_CLEAN_CLAIM
from tbar_guard.pipeline import RunResult
from tbar_guard.policy import policy_from_dict
from tbar_guard.zoo import DEMO_PREPROCESS, DEMO_TASK, tiny_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    bundle = ClipBundle(model, cfg, DEMO_PREPROCESS, DEMO_TASK, sha256_state(model.state_dict()), "test:tiny")
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    save_model(out, bundle)
    return out


@pytest.fixture
def own_retry_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in registry.MLFLOW_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)


def _versions(server: MlflowServer, name: str) -> list[Any]:
    return list(
        MlflowClient(tracking_uri=server.uri, registry_uri=server.uri).search_model_versions(f"name = '{name}'")
    )


# BYPASS 1: a lost answer to create-model-version (5xx/timeout after the server applied it) made MLflow's retry register a second, orphaned version -> one version (registry._register keeps only the answered one)
def test_lost_create_answer_leaves_one_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    own_retry_defaults: None,
) -> None:
    name = unique("lost-answer")
    lose_once = Fault("model-versions/create", method="POST", forward_then_status=502, times=1)
    with faulty_proxy(mlflow_server.uri, [lose_once]) as proxy:
        version = registry.push_bundle(tiny_dir, name, tracking_uri=proxy.uri)
        assert len(proxy.requests("model-versions/create", "POST")) == 2  # the server saw both
    found = _versions(mlflow_server, name)
    assert [str(v.version) for v in found] == [version.version], [(v.version, v.run_id) for v in found]


# BYPASS 2: when every create-model-version answer is lost, the versions the server did make stayed registered although push/gate failed -> exit 2 and none is left (rollback deletes every version of the run)
def test_all_create_answers_lost_leaves_no_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    own_retry_defaults: None,
) -> None:
    name = unique("all-lost")
    lose_all = Fault("model-versions/create", method="POST", forward_then_status=502)
    with faulty_proxy(mlflow_server.uri, [lose_all]) as proxy:
        res = runner.invoke(
            app,
            ["push", "--model", str(tiny_dir), "--name", name, "--alias", "candidate", "--tracking-uri", proxy.uri],
            catch_exceptions=False,
        )
        made = len(proxy.requests("model-versions/create", "POST"))
    assert res.exit_code == 2, res.output
    assert made == 4  # 1 + 3 retries reached the server, each made a version
    assert _versions(mlflow_server, name) == []
    assert registry.get_alias_version(name, "candidate", tracking_uri=mlflow_server.uri) is None


# BYPASS 3: SIGTERM (CI cancelling a job) killed the CLI without running any cleanup: the pulled candidate stayed in $TMPDIR and a registration was not rolled back -> exit 2, temporary files removed (cli._sigterm_as_interrupt)
def test_sigterm_runs_the_cleanup(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    name = unique("sigterm")
    registry.push_bundle(tiny_dir, name, tracking_uri=mlflow_server.uri)
    registry.move_alias(name, "candidate", "1", tracking_uri=mlflow_server.uri)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "report"
    hold = Fault("open_clip_model.safetensors", method="GET", hold=True, times=1)  # the download hangs
    with faulty_proxy(mlflow_server.uri, [hold]) as proxy:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tbar_guard",
                "gate",
                "--model",
                f"models:/{name}@candidate",
                "--data",
                str(test_npz),
                "--out",
                str(out),
                "--tracking-uri",
                proxy.uri,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)},
        )
        try:
            assert proxy.held.wait(300), "the download never started"
            assert list(tmpdir.iterdir()), "the gate had no temporary directory yet"
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert proc.returncode == 2, (proc.returncode, stdout, stderr)
    assert "terminated (SIGTERM)" in stderr
    assert list(tmpdir.iterdir()) == []
    assert not out.exists()


# BYPASS 4: two gates of the same source version at once both found no sanitized version and both registered one -> the older version wins, the other gate deletes its own (promote._apply_to_registry; end to end: tests/test_faults_gate.py::test_two_gates_at_once_register_one_sanitized_version)
def test_a_gate_that_loses_the_race_deletes_its_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    """Both gates have passed their "already gated?" check (nothing was registered then) and
    reach the registry step one after the other, as two concurrent gate jobs do."""
    uri = mlflow_server.uri
    name = unique("race")
    registry.push_bundle(tiny_dir, name, tracking_uri=uri)
    source = registry.pull(f"models:/{name}/1", tmp_path / "pull", tracking_uri=uri)
    policy = policy_from_dict({"registry": {"alias": "production"}})
    reports = []
    for i in range(2):
        out = tmp_path / f"gate{i}"
        (out / "model").mkdir(parents=True)
        for f in sorted(tiny_dir.iterdir()):
            (out / "model" / f.name).write_bytes(f.read_bytes())
        (out / "report.json").write_text("{}")
        report: dict[str, Any] = {
            "verdict": "removed",
            "output": {"sha256": sha256_file(out / "model" / "open_clip_model.safetensors")},
        }
        result = RunResult("removed", ExitCode.BACKDOOR_REMOVED, report, out)
        tmp = tmp_path / f"tmp{i}"
        tmp.mkdir()
        promote._apply_to_registry(report, result, source, policy, out, tmp, f"{name}-sanitized", uri, None)
        reports.append(report)
    found = _versions(mlflow_server, f"{name}-sanitized")
    assert [str(v.version) for v in found] == ["1"]
    assert reports[0]["registered"]["version"] == "1" and not reports[0]["registered"].get("reused")
    assert reports[1]["registered"]["version"] == "1" and reports[1]["registered"]["reused"] is True
    assert registry.get_alias_version(f"{name}-sanitized", "production", tracking_uri=uri) == "1"


# BYPASS 5: an unexpected error (not a TbarGuardError) printed its message, and TBAR_GUARD_DEBUG=1 its traceback, unscrubbed: URI userinfo and MLflow tokens reached the CI log -> every printed error is scrubbed (cli._redact)
@pytest.mark.parametrize("debug", ["", "1"])
def test_internal_error_messages_and_tracebacks_are_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug: str
) -> None:
    token, password = "tok-bypass-5ecret", "pw-bypass-5ecret"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{password}@127.0.0.1:9")
    monkeypatch.setenv("TBAR_GUARD_DEBUG", debug)

    def crash(*args: object, **kwargs: object) -> RunResult:  # a bug deep in a dependency, say
        raise RuntimeError(f"GET http://bob:{password}@127.0.0.1:9/api failed (Authorization: Bearer {token})")

    monkeypatch.setattr(promote, "gate_uri", crash)
    res = runner.invoke(app, ["gate", "--model", "models:/m/1", "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert "RuntimeError" in res.stderr
    if debug:
        assert "Traceback" in res.stderr
    assert token not in res.output and password not in res.output, res.output


# BYPASS 6: a backdoor the detector misses (here: BadNet under detect.method decree, a documented miss on CLIPs fine-tuned through a head) got a bare "clean" -> exit 0 stays (CI contract) but report.json, report.md and stdout say "no small-mask trigger found; this does not establish that the model is clean" and list what was not established (gate.claims; the miss itself is a known limit)
def test_missed_backdoor_is_not_called_proven_clean(
    foundation: ClipBundle,
    badnet_victim: ClipBundle,
    victim_dir: Path,
    test_images: ImageSet,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    trigger = build_trigger(parse_trigger("badnet"), 28)
    backdoor = evaluate(classifier_for(badnet_victim), test_images, trigger, 0)
    assert backdoor.attack_success_rate is not None and backdoor.attack_success_rate > 0.9  # it is a backdoor
    save_model(tmp_path / "base", foundation)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"detect:\n  method: decree\n  reference_models: ['{tmp_path / 'base'}']\n", encoding="utf-8")
    out = tmp_path / "scan"
    res = runner.invoke(
        app,
        ["scan", "--model", str(victim_dir), "--data", str(test_npz), "--out", str(out), "--policy", str(policy)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output  # the evasion: the detector misses it
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "clean"
    assert report["claim"] == NOT_CLEAN_CLAIM
    assert NOT_CLEAN_CLAIM in report["reason"]
    assert any("that the model is clean" in item for item in report["not_established"])
    assert any("warping" in item and "blended" in item for item in report["not_established"])
    markdown = (out / "report.md").read_text()
    assert NOT_CLEAN_CLAIM in markdown and "What it did not establish" in markdown
    assert NOT_CLEAN_CLAIM in res.stdout
