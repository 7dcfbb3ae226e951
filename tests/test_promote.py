"""The registry gate end to end against a real ``mlflow server``: push, gate, register, promote."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fast_policy import FAST_REMOVAL
from mlflow import MlflowClient
from mlflow_server import mlflow_server, running_mlflow_server  # noqa: F401

from tbar_guard import registry
from tbar_guard.bundle import save_model
from tbar_guard.errors import RegistryError
from tbar_guard.policy import policy_from_dict
from tbar_guard.promote import gate_uri, push_model


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def base_dir(foundation, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("base") / "base"
    save_model(out, foundation)
    return out


def _policy(base_uri: str, test_npz: Path, **extra: object):  # type: ignore[no-untyped-def]
    raw: dict[str, object] = {
        "data": {"path": str(test_npz)},
        "detect": {"reference_models": [base_uri], "differential": {"families": ["mask"]}},  # half the scan time
        "registry": {"alias": "production"},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value  # type: ignore[dict-item]
    return policy_from_dict(raw)


def test_backdoored_version_is_sanitized_registered_and_promoted(
    mlflow_server,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("clip")
    base = push_model(base_dir, unique("base"), None, uri)
    push_model(victim_dir, name, "candidate", uri)
    policy = _policy(base.uri, test_npz, sanitize=FAST_REMOVAL)  # the evidence is test_gate's
    result = gate_uri(f"models:/{name}@candidate", test_npz, policy, tmp_path / "r1", uri)
    assert result.verdict == "removed", result.report["reason"]
    reg = result.report["registered"]
    assert reg["name"] == f"{name}-sanitized"
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version(reg["name"], reg["version"])
    tags = version.tags
    for key in (
        "source_uri",
        "source_key",
        "verdict",
        "alpha",
        "pl1",
        "target",
        "ca_before",
        "ca_after",
        "asr_before",
        "asr_after",
        "input_sha256",
        "output_sha256",
        "policy_sha256",
        "tool_version",
    ):
        assert f"tbar_guard.{key}" in tags, key
    assert tags["tbar_guard.verdict"] == "removed"
    assert tags["tbar_guard.removal_method"] == result.report["policy"]["sanitize"]["method"]
    assert tags["tbar_guard.source_key"] == f"{name}/1"
    assert tags["tbar_guard.output_sha256"] == result.report["output"]["sha256"]
    run = client.get_run(version.run_id)
    assert {"ca_before", "ca_after", "asr_before", "asr_after", "alpha", "pl1"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/alpha_sweep.png", "report/mask.png"} <= artifacts
    assert registry.get_alias_version(reg["name"], "production", tracking_uri=uri) == reg["version"]
    assert client.get_model_version(name, "1").tags["tbar_guard.verdict"] == "removed"
    # the sanitized version pulls and loads without unpickling
    pulled = registry.pull(reg["uri"], tmp_path / "pulled", tracking_uri=uri)
    assert pulled.sha256 == result.report["output"]["sha256"]

    # idempotent: the same source version with the same policy does not make a second version
    again = gate_uri(f"models:/{name}/1", test_npz, policy, tmp_path / "r2", uri)
    assert again.verdict == "removed"
    assert again.report["registered"]["version"] == reg["version"]
    assert again.report["registered"]["reused"] is True
    assert len(client.search_model_versions(f"name = '{reg['name']}'")) == 1


def test_clean_version_moves_alias_to_itself(
    mlflow_server,  # noqa: F811
    clean_twin_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("clean")
    base = push_model(base_dir, unique("base"), None, uri)
    push_model(clean_twin_dir, name, "candidate", uri)
    result = gate_uri(f"models:/{name}@candidate", test_npz, _policy(base.uri, test_npz), tmp_path / "r", uri)
    assert result.verdict == "clean", result.report["reason"]
    assert registry.get_alias_version(name, "production", tracking_uri=uri) == "1"
    client = MlflowClient(tracking_uri=uri)
    assert client.search_model_versions(f"name = '{name}-sanitized'") == []
    assert client.get_model_version(name, "1").tags["tbar_guard.verdict"] == "clean"


def test_unremovable_keeps_alias_and_tags_source(
    mlflow_server,  # noqa: F811
    victim_dir: Path,
    base_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("hard")
    base = push_model(base_dir, unique("base"), None, uri)
    push_model(victim_dir, name, "candidate", uri)
    push_model(victim_dir, name, None, uri)  # version 2, currently in production
    registry.move_alias(name, "production", "2", tracking_uri=uri)
    policy = _policy(base.uri, test_npz, accept={"ca_floor": 1.0, "asr_ceiling": 0.0}, sanitize=FAST_REMOVAL)
    result = gate_uri(f"models:/{name}/1", test_npz, policy, tmp_path / "r", uri)
    assert result.verdict == "unremoved"
    assert int(result.exit_code) == 3
    assert registry.get_alias_version(name, "production", tracking_uri=uri) == "2"
    client = MlflowClient(tracking_uri=uri)
    assert client.get_model_version(name, "1").tags["tbar_guard.verdict"] == "unremoved"
    assert client.search_model_versions(f"name = '{name}-sanitized'") == []
    assert "not moved" in result.report["alias_note"]


def test_server_killed_mid_run_registers_nothing(
    victim_dir: Path, base_dir: Path, test_npz: Path, tmp_path: Path
) -> None:
    root = tmp_path / "server"
    name = unique("killed")
    with running_mlflow_server(root) as server:
        base = push_model(base_dir, unique("base"), None, server.uri)
        push_model(victim_dir, name, "candidate", server.uri)
        policy = _policy(base.uri, test_npz, sanitize=FAST_REMOVAL)
        killed = []

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "fine-tune" and not killed:
                server.kill()
                killed.append(stage)

        with pytest.raises(RegistryError):
            gate_uri(f"models:/{name}@candidate", test_npz, policy, tmp_path / "r", server.uri, progress=progress)
        assert killed
    with running_mlflow_server(root) as server:
        client = MlflowClient(tracking_uri=server.uri)
        assert client.search_model_versions(f"name = '{name}-sanitized'") == []
        assert registry.get_alias_version(name, "production", tracking_uri=server.uri) is None


def test_unknown_model_is_an_error(mlflow_server, test_npz: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(RegistryError):
        gate_uri(f"models:/{unique('nope')}/1", test_npz, policy_from_dict({}), tmp_path / "r", mlflow_server.uri)
    assert not (tmp_path / "r").exists()
