"""Fault tests that run the real gate in real ``python -m tbar_guard`` subprocesses against a
real ``mlflow server``: signals during inversion, fine-tuning and upload; two gates at once on
the same version; credentials end to end; the same inputs giving the same outputs.

A subprocess's stderr is a pseudo-terminal, so the CLI draws its progress bars there and the test
knows which stage the gate is in ("inversion", "fine-tune") before it sends the signal; uploads
are caught by a proxy (tests/faulty_proxy.py) that holds the weights upload open.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fast_policy import FAST_REMOVAL_YAML
from faulty_proxy import Fault, faulty_proxy
from mlflow import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401

from tbar_guard import registry
from tbar_guard.bundle import save_model, sha256_file
from tbar_guard.promote import push_model

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"token": "tok-5ecret-G1", "password": "pw-5ecret-G2", "userinfo": "ui-5ecret-G3"}
STAGE_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 120.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def base_dir(foundation, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("base") / "base"
    save_model(out, foundation)
    return out


@dataclass(frozen=True)
class Registered:
    name: str  # the candidate's registered name; version 1 holds the alias "candidate"
    policy: Path


def register_candidate(server: MlflowServer, victim_dir: Path, base_dir: Path, test_npz: Path, tmp: Path) -> Registered:
    base = push_model(base_dir, unique("base"), None, server.uri)
    name = unique("cand")
    push_model(victim_dir, name, "candidate", server.uri)
    policy = tmp / f"policy-{name}.yaml"
    policy.write_text(
        f"data:\n  path: {test_npz}\ndetect:\n  reference_models: ['{base.uri}']\n  differential: {{families: [mask]}}\n"
        f"registry:\n  alias: production\n{FAST_REMOVAL_YAML}",
        encoding="utf-8",
    )
    return Registered(name, policy)


class Gate:
    """``python -m tbar_guard gate`` in a subprocess whose stderr is a pseudo-terminal."""

    def __init__(self, args: list[str], tmpdir: Path, env: dict[str, str] | None = None) -> None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir = tmpdir
        master, slave = pty.openpty()
        self._master = master
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.stdout_path = tmpdir.parent / f"{tmpdir.name}.stdout"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TMPDIR": str(tmpdir),
            "TERM": "xterm",
            "COLUMNS": "120",
            **(env or {}),
        }
        with self.stdout_path.open("wb") as stdout:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tbar_guard", "gate", *args],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=slave,
                cwd=REPO,
                env=full_env,
            )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            with self._lock:
                self._buf += chunk

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = STAGE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.stderr:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"gate exited {self.proc.returncode} before {needle!r}:\n{self.stderr[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no {needle!r} within {timeout:.0f}s:\n{self.stderr[-3000:]}")

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        os.close(self._master)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def gate_args(reg: Registered, out: Path, uri: str) -> list[str]:
    return [
        "--model",
        f"models:/{reg.name}@candidate",
        "--policy",
        str(reg.policy),
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        "--device",
        "cpu",
    ]


def assert_nothing_promoted(server: MlflowServer, reg: Registered) -> None:
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    assert client.search_model_versions(f"name = '{reg.name}-sanitized'") == []
    assert registry.get_alias_version(reg.name, "production", tracking_uri=server.uri) is None
    assert registry.get_alias_version(f"{reg.name}-sanitized", "production", tracking_uri=server.uri) is None
    assert "tbar_guard.verdict" not in client.get_model_version(reg.name, "1").tags


def assert_interrupted_cleanly(gate: Gate, sig: signal.Signals, out: Path) -> None:
    code = gate.wait()
    assert code == 2, (code, gate.stderr[-3000:])
    word = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted (SIGINT)"
    assert word in gate.stderr, gate.stderr[-3000:]
    assert list(gate.tmpdir.iterdir()) == [], list(gate.tmpdir.iterdir())  # temporary files removed
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())  # no half-written output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_inversion(
    mlflow_server: MlflowServer,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    reg = register_candidate(mlflow_server, victim_dir, base_dir, test_npz, tmp_path)
    out = tmp_path / "report"
    gate = Gate(gate_args(reg, out, mlflow_server.uri), tmp_path / "tmp")
    gate.wait_for("inversion")
    time.sleep(1.0)  # well inside the inversion loop
    gate.proc.send_signal(sig)
    assert_interrupted_cleanly(gate, sig, out)
    assert not out.exists()
    assert_nothing_promoted(mlflow_server, reg)


@pytest.mark.slow
def test_sigterm_during_fine_tuning(
    mlflow_server: MlflowServer,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    reg = register_candidate(mlflow_server, victim_dir, base_dir, test_npz, tmp_path)
    out = tmp_path / "report"
    gate = Gate(gate_args(reg, out, mlflow_server.uri), tmp_path / "tmp")
    gate.wait_for("fine-tune")
    gate.proc.send_signal(signal.SIGTERM)
    assert_interrupted_cleanly(gate, signal.SIGTERM, out)
    assert not out.exists()
    assert_nothing_promoted(mlflow_server, reg)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_upload_of_the_sanitized_model(
    mlflow_server: MlflowServer,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """The gate found and removed the backdoor and is uploading the sanitized weights (the proxy
    holds that request open) when the signal comes: the run is rolled back, nothing is
    registered, the alias is not moved, and the local report says ``error``."""
    reg = register_candidate(mlflow_server, victim_dir, base_dir, test_npz, tmp_path)
    out = tmp_path / "report"
    hold = Fault("model/open_clip_model.safetensors", method="PUT", hold=True, times=1)
    with faulty_proxy(mlflow_server.uri, [hold]) as proxy:
        gate = Gate(gate_args(reg, out, proxy.uri), tmp_path / "tmp")
        deadline = time.monotonic() + STAGE_TIMEOUT_S * 2
        while not proxy.held.wait(0.5):
            assert gate.proc.poll() is None, gate.stderr[-3000:]
            assert time.monotonic() < deadline, gate.stderr[-3000:]
        gate.proc.send_signal(sig)
        assert_interrupted_cleanly(gate, sig, out)
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "error" and report["exit_code"] == 2
    assert "nothing was promoted" in report["reason"]
    assert_nothing_promoted(mlflow_server, reg)


def test_signal_during_push_upload(
    mlflow_server: MlflowServer,  # noqa: F811
    victim_dir: Path,
    tmp_path: Path,
) -> None:
    """`push --alias` interrupted while the weights upload hangs: no version, no alias."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        name = unique("push-sig")
        hold = Fault("model/open_clip_model.safetensors", method="PUT", hold=True, times=1)
        with faulty_proxy(mlflow_server.uri, [hold]) as proxy:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tbar_guard",
                    "push",
                    "--model",
                    str(victim_dir),
                    "--name",
                    name,
                    "--alias",
                    "candidate",
                    "--tracking-uri",
                    proxy.uri,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
            )
            try:
                assert proxy.held.wait(STAGE_TIMEOUT_S), "the upload never started"
                proc.send_signal(sig)
                stdout, stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        assert proc.returncode == 2, (sig, stdout, stderr)
        assert ("terminated" if sig == signal.SIGTERM else "interrupted") in stderr, stderr
        client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
        assert client.search_model_versions(f"name = '{name}'") == []
        assert registry.get_alias_version(name, "candidate", tracking_uri=mlflow_server.uri) is None
        runs = client.search_runs(
            [client.get_experiment_by_name("tbar-guard").experiment_id],  # type: ignore[union-attr]
            filter_string=f"attributes.run_name = 'tbar-guard-{name}'",
        )
        assert [r.info.status for r in runs] == ["FAILED"]
    assert list(tmp_path.iterdir()) == []


# ================================================================================================
# two gates at once on the same version, with credentials everywhere; same inputs, same outputs


@dataclass(frozen=True)
class TwoGates:
    server: MlflowServer
    reg: Registered
    outs: tuple[Path, Path]
    codes: tuple[int, int]
    stdout: tuple[str, str]
    stderr: tuple[str, str]
    reports: tuple[dict[str, Any], dict[str, Any]]


@pytest.fixture(scope="module")
def two_gates(
    mlflow_server: MlflowServer,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TwoGates]:
    tmp = tmp_path_factory.mktemp("two-gates")
    reg = register_candidate(mlflow_server, victim_dir, base_dir, test_npz, tmp)
    creds = {
        "MLFLOW_TRACKING_TOKEN": SECRETS["token"],
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": SECRETS["password"],
    }
    uri = mlflow_server.uri.replace("http://", f"http://alice:{SECRETS['userinfo']}@")
    outs = (tmp / "r1", tmp / "r2")
    gates = [Gate(gate_args(reg, out, uri), tmp / f"tmp{i}", env=creds) for i, out in enumerate(outs)]
    codes = tuple(g.wait(timeout=1500) for g in gates)
    reports = tuple(json.loads((out / "report.json").read_text()) for out in outs)
    yield TwoGates(
        mlflow_server,
        reg,
        outs,
        (codes[0], codes[1]),
        (gates[0].stdout, gates[1].stdout),
        (gates[0].stderr, gates[1].stderr),
        (reports[0], reports[1]),
    )


@pytest.mark.slow
def test_two_gates_at_once_register_one_sanitized_version(two_gates: TwoGates) -> None:
    g = two_gates
    assert g.codes == (1, 1), (g.stderr[0][-2000:], g.stderr[1][-2000:])
    client = MlflowClient(tracking_uri=g.server.uri, registry_uri=g.server.uri)
    found = client.search_model_versions(f"name = '{g.reg.name}-sanitized'")
    assert len(found) == 1, [(v.version, v.run_id) for v in found]
    winner = str(found[0].version)
    assert {r["registered"]["version"] for r in g.reports} == {winner}
    assert sorted(bool(r["registered"].get("reused")) for r in g.reports) == [False, True]
    assert registry.get_alias_version(f"{g.reg.name}-sanitized", "production", tracking_uri=g.server.uri) == winner
    source_tags = client.get_model_version(g.reg.name, "1").tags
    assert source_tags["tbar_guard.sanitized_uri"] == f"models:/{g.reg.name}-sanitized/{winner}"


@pytest.mark.slow
def test_same_inputs_and_seed_same_alpha_metrics_and_weights(two_gates: TwoGates) -> None:
    """Two processes, same inputs and seed, on CPU: the same α, metrics and output weights.
    (In-process: tests/test_sanitize.py::test_same_inputs_same_alpha_and_weights,
    tests/test_gate.py::test_scan_is_deterministic.)"""
    a, b = two_gates.reports
    for key in ("alpha", "before", "after", "val_before", "alpha_sweep"):
        assert a[key] == b[key], key
    for key in ("pl1", "target_index", "proxy_asr", "z_score", "per_class"):
        assert a["detection"][key] == b["detection"][key], key
    assert a["output"]["sha256"] == b["output"]["sha256"]
    assert sha256_file(two_gates.outs[0] / "model" / "open_clip_model.safetensors") == a["output"]["sha256"]
    assert sha256_file(two_gates.outs[1] / "model" / "open_clip_model.safetensors") == a["output"]["sha256"]


@pytest.mark.slow
def test_credentials_never_in_outputs_of_a_registering_gate(two_gates: TwoGates, tmp_path: Path) -> None:
    """Token, password and URI userinfo: not in stdout, stderr, the report files, the version's
    and the run's tags and params, nor the artifacts uploaded to MLflow."""
    g = two_gates
    texts: dict[str, str] = {}
    for i in range(2):
        texts[f"stdout {i}"] = g.stdout[i]
        texts[f"stderr {i}"] = g.stderr[i]
        for path in g.outs[i].rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes().decode(errors="replace")
    client = MlflowClient(tracking_uri=g.server.uri, registry_uri=g.server.uri)
    for mv in [
        *client.search_model_versions(f"name = '{g.reg.name}-sanitized'"),
        client.get_model_version(g.reg.name, "1"),
    ]:
        texts[f"version tags {mv.name}/{mv.version}"] = json.dumps(mv.tags)
        run = client.get_run(mv.run_id)
        texts[f"run {mv.run_id}"] = json.dumps(
            {"tags": run.data.tags, "params": run.data.params, "metrics": run.data.metrics}
        )
    sanitized = client.search_model_versions(f"name = '{g.reg.name}-sanitized'")[0]
    local = Path(client.download_artifacts(sanitized.run_id, "", str(tmp_path)))
    for path in local.rglob("*"):
        if path.is_file():
            texts[f"artifact {path.relative_to(local)}"] = path.read_bytes().decode(errors="replace")
    assert any("report.json" in k for k in texts), sorted(texts)
    for where, text in texts.items():
        for kind, secret in SECRETS.items():
            assert secret not in text, f"{kind} credential leaked in {where}"
