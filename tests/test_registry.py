"""tbar_guard.registry against a real ``mlflow server`` (no mocks of the MLflow client)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port, mlflow_server, running_mlflow_server  # noqa: F401
from safetensors.torch import save_file

from tbar_guard import registry
from tbar_guard.errors import RegistryError
from tbar_guard.registry import (
    BUNDLE_FILES,
    POLICY_SHA256_TAG,
    SOURCE_KEY_TAG,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_TAG,
    ModelRef,
    find_bundle_dir,
    find_sanitized,
    get_alias_version,
    is_bundle,
    move_alias,
    parse_model_uri,
    pull,
    push_bundle,
    redact_uri,
    register_sanitized,
    set_version_tags,
    sha256_file,
)


def make_bundle(path: Path, fill: float = 0.0) -> Path:
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 2}, "preprocess_cfg": {"size": 4}})
    )
    save_file({"w": torch.full((2,), fill)}, str(path / WEIGHTS_FILE))
    (path / "zeroshot.json").write_text(json.dumps({"classnames": ["a", "b"], "templates": ["{}"]}))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_same_bundle(a: Path, b: Path) -> None:
    for name in BUNDLE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ------------------------------------------------------------------------------------------
# no server needed


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/clip/3", ModelRef("models:/clip/3", "models", name="clip", version="3")),
        ("models:/clip/007", ModelRef("models:/clip/007", "models", name="clip", version="7")),
        ("models:/clip/latest", ModelRef("models:/clip/latest", "models", name="clip", version="latest")),
        ("models:/clip/LATEST", ModelRef("models:/clip/LATEST", "models", name="clip", version="latest")),
        (
            "models:/my.clip-b_32@prod",
            ModelRef("models:/my.clip-b_32@prod", "models", name="my.clip-b_32", alias="prod"),
        ),
        (
            "runs:/0123abcd/model",
            ModelRef("runs:/0123abcd/model", "runs", run_id="0123abcd", path="model"),
        ),
        (
            "runs:/0123abcd/a/b/",
            ModelRef("runs:/0123abcd/a/b/", "runs", run_id="0123abcd", path="a/b"),
        ),
        ("./bundles/x", ModelRef("./bundles/x", "local", path="./bundles/x")),
        ("/abs/x", ModelRef("/abs/x", "local", path="/abs/x")),
        ("rel", ModelRef("rel", "local", path="rel")),
        ("file:///abs/my%20x", ModelRef("file:///abs/my%20x", "local", path="/abs/my x")),
        ("C:\\models\\x", ModelRef("C:\\models\\x", "local", path="C:\\models\\x")),
    ],
)
def test_parse_model_uri_forms(uri: str, expected: ModelRef) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "models:/",
        "models:/clip",
        "models:/clip/",
        "models:/clip/notanumber",
        "models:/clip/Production",
        "models:/clip/0",
        "models:/clip/-1",
        "models:/clip/1/extra",
        "models:/clip@",
        "models:/@prod",
        "models:/clip@latest",
        "models:/clip@v3",
        "models:/clip@a/b",
        "models:/clip@bad alias",
        "models:/ clip/1",
        "models://profile@databricks/clip/1",
        "models:clip/1",
        "runs:/",
        "runs:/abc",
        "runs:/abc/",
        "runs:/a b/model",
        "runs:/abc/../other",
        "s3://bucket/model",
        "https://example.com/model",
        "file://otherhost/x",
    ],
)
def test_parse_model_uri_malformed(uri: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_model_uri(uri)
    assert repr(uri) in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:secret@127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://tok@mlflow.example.com/prefix/", "https://mlflow.example.com/prefix/"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("databricks", "databricks"),
        ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
        (
            "postgresql://u:p%40ss@db:5432/mlflow?sslmode=require&password=hunter2",
            "postgresql://db:5432/mlflow?sslmode=require&password=***",
        ),
        ("http://h/x?token=abc&page=2", "http://h/x?token=***&page=2"),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_scrub_removes_credentials_from_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    text = "API request to http://bob:pw%21x@h:1/api failed; header Bearer tok-123456; pw!x"
    scrubbed = registry._scrub(text, "http://bob:pw%21x@h:1")
    assert "tok-123456" not in scrubbed
    assert "pw%21x" not in scrubbed and "pw!x" not in scrubbed
    assert "bob" not in scrubbed
    assert "http://h:1/api" in scrubbed


def test_configure_mlflow_env_keeps_user_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in registry.MLFLOW_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    registry.configure_mlflow_env()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    from mlflow.environment_variables import (
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
        MLFLOW_PRINT_MODEL_URLS_ON_CREATION,
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    )

    # MLflow parses every value we set (the names exist and the types fit).
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 9
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get() == 0.5
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True
    assert MLFLOW_PRINT_MODEL_URLS_ON_CREATION.get() is False


def test_is_bundle_and_nesting(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "outer" / "model")
    assert is_bundle(bundle)
    assert not is_bundle(tmp_path / "outer")
    assert find_bundle_dir(tmp_path / "outer") == bundle
    assert find_bundle_dir(bundle) == bundle
    (tmp_path / "outer" / "other").mkdir()
    assert find_bundle_dir(tmp_path / "outer") is None  # two entries: ambiguous
    (bundle / "zeroshot.json").unlink()
    assert not is_bundle(bundle)
    assert find_bundle_dir(bundle) is None


def test_pull_local(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", fill=1.0)
    pulled = pull(str(bundle), tmp_path / "dest")
    assert pulled.local_dir == bundle
    assert pulled.ref.kind == "local"
    assert (pulled.name, pulled.version, pulled.run_id) == (None, None, None)
    assert pulled.sha256 == sha256_file(bundle / WEIGHTS_FILE)
    assert not (tmp_path / "dest").exists()  # nothing copied
    assert pull(f"file://{tmp_path}", tmp_path / "dest").local_dir == bundle  # nested one level

    (bundle / "open_clip_config.json").unlink()
    with pytest.raises(RegistryError, match=r"not a tbar-guard bundle: missing open_clip_config\.json"):
        pull(str(bundle), tmp_path / "dest")
    with pytest.raises(RegistryError, match="does not exist"):
        pull(str(tmp_path / "nope"), tmp_path / "dest")


def test_bad_names_fail_before_any_request(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("", "  ", "a/b", "a:b"):
        with pytest.raises(RegistryError, match="model name"):
            push_bundle(bundle, name, tracking_uri=dead)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="not a tbar-guard bundle"):
        push_bundle(tmp_path / "empty", "ok", tracking_uri=dead)
    with pytest.raises(RegistryError, match="reserved alias"):
        move_alias("ok", "latest", "1", tracking_uri=dead)
    with pytest.raises(RegistryError, match="finite"):
        register_sanitized(bundle, tmp_path, "ok", {}, {"acc": float("nan")}, {}, tracking_uri=dead)


def test_unsupported_tracking_uri_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="foo://x"):
        get_alias_version("clip", "prod", tracking_uri="foo://user:pw@x")
    with pytest.raises(RegistryError) as info:
        pull("models:/clip/1", tmp_path, tracking_uri="foo://user:pw@x")
    assert "pw" not in str(info.value)


# ------------------------------------------------------------------------------------------
# real server


def test_push_and_pull_every_uri_form(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    uri = mlflow_server.uri
    name = unique("clip")
    b1 = make_bundle(tmp_path / "b1", fill=1.0)
    b2 = make_bundle(tmp_path / "b2", fill=2.0)
    capfd.readouterr()

    v1 = push_bundle(b1, name, tracking_uri=uri, tags={"team": "vision"})
    assert (v1.name, v1.version, v1.uri) == (name, "1", f"models:/{name}/1")
    sha1 = sha256_file(b1 / WEIGHTS_FILE)

    p = pull(f"models:/{name}/1", tmp_path / "d1", tracking_uri=uri)
    assert (p.name, p.version, p.run_id, p.sha256) == (name, "1", v1.run_id, sha1)
    assert p.local_dir.is_relative_to(tmp_path / "d1")
    assert_same_bundle(p.local_dir, b1)
    assert sorted(f.name for f in p.local_dir.iterdir()) == sorted(BUNDLE_FILES)  # no MLmodel, no pickle

    assert get_alias_version(name, "champion", tracking_uri=uri) is None
    move_alias(name, "champion", "1", tracking_uri=uri)
    p = pull(f"models:/{name}@champion", tmp_path / "d2", tracking_uri=uri)
    assert (p.version, p.sha256) == ("1", sha1)
    assert p.ref.alias == "champion"
    assert_same_bundle(p.local_dir, b1)

    v2 = push_bundle(b2, name, tracking_uri=uri)
    assert v2.version == "2"
    p = pull(f"models:/{name}/latest", tmp_path / "d3", tracking_uri=uri)
    assert (p.version, p.run_id, p.sha256) == ("2", v2.run_id, sha256_file(b2 / WEIGHTS_FILE))
    assert_same_bundle(p.local_dir, b2)

    p = pull(f"runs:/{v1.run_id}/model", tmp_path / "d4", tracking_uri=uri)
    assert (p.name, p.version, p.run_id, p.sha256) == (None, None, v1.run_id, sha1)
    assert_same_bundle(p.local_dir, b1)

    # the same pull twice into the same dest does not mix files
    again = pull(f"models:/{name}/1", tmp_path / "d1", tracking_uri=uri)
    assert again.local_dir != pull(f"models:/{name}/1", tmp_path / "d1", tracking_uri=uri).local_dir

    out, err = capfd.readouterr()
    assert out == "", out  # no "View run ... at: <url>" lines
    assert err == "", err  # no progress bars, no "Waiting up to 300 seconds ..." INFO logs

    # the version is tagged with the weights' hash, and the version's source is the run
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, "1")
    assert mv.tags[WEIGHTS_SHA256_TAG] == sha1 and mv.tags["team"] == "vision"
    assert mv.source == f"runs:/{v1.run_id}/model"


def test_tracking_uri_from_mlflow_env(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    name = unique("envclip")
    v = push_bundle(make_bundle(tmp_path / "b"), name)
    assert pull(v.uri, tmp_path / "d").version == "1"


def test_pull_errors(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("clip")
    v1 = push_bundle(make_bundle(tmp_path / "b"), name, tracking_uri=uri)

    cases = {
        f"models:/{unique('nosuch')}/1": "not found",
        f"models:/{name}/7": "not found",
        f"models:/{name}@staging": "alias 'staging' is not set",
        f"models:/{unique('nosuch')}/latest": "not found",
        f"runs:/{'0' * 32}/model": "not found",
        f"runs:/{v1.run_id}/nothere": "nothere",
    }
    for bad, fragment in cases.items():
        with pytest.raises(RegistryError) as info:
            pull(bad, tmp_path / "d", tracking_uri=uri)
        assert repr(bad) in str(info.value) and fragment in str(info.value), str(info.value)
        assert info.value.hint

    # a registered version whose artifacts are not a bundle
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.pkl").write_bytes(b"not a bundle")
    (junk / "README.md").write_text("hi")
    exp = client.get_experiment_by_name("tbar-guard")
    assert exp is not None
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(junk), "model")
    client.set_terminated(run.info.run_id)
    other = unique("junk")
    client.create_registered_model(other)
    client.create_model_version(other, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    for bad in (f"models:/{other}/1", f"runs:/{run.info.run_id}/model"):
        with pytest.raises(RegistryError, match="not a tbar-guard bundle") as info:
            pull(bad, tmp_path / "d", tracking_uri=uri)
        assert repr(bad) in str(info.value)


def test_pull_reads_a_version_registered_as_an_mlflow3_logged_model(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Versions made by other tools the MLflow 3 way (a LoggedModel, source models:/m-...) pull too."""
    uri = mlflow_server.uri
    bundle = make_bundle(tmp_path / "b", fill=6.0)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("tbar-guard") or client.get_experiment(client.create_experiment("tbar-guard"))
    run = client.create_run(exp.experiment_id)
    logged = client.create_logged_model(exp.experiment_id, source_run_id=run.info.run_id, name="model")
    client.log_model_artifacts(logged.model_id, str(bundle))
    client.finalize_logged_model(logged.model_id, "READY")
    client.set_terminated(run.info.run_id)
    name = unique("logged")
    client.create_registered_model(name)
    client.create_model_version(
        name, f"models:/{logged.model_id}", run_id=run.info.run_id, model_id=logged.model_id, await_creation_for=0
    )
    pulled = pull(f"models:/{name}/1", tmp_path / "d", tracking_uri=uri)
    assert_same_bundle(pulled.local_dir, bundle)
    assert (pulled.version, pulled.run_id) == ("1", run.info.run_id)


def test_pull_refuses_tampered_weights(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("clip")
    v = push_bundle(make_bundle(tmp_path / "b", fill=3.0), name, tracking_uri=uri)
    stored = list((mlflow_server.root / "artifacts").rglob(f"{v.run_id}/artifacts/model/{WEIGHTS_FILE}"))
    assert len(stored) == 1
    save_file({"w": torch.full((2,), 666.0)}, str(stored[0]))  # swapped behind the registry's back
    with pytest.raises(RegistryError, match="changed after registration"):
        pull(v.uri, tmp_path / "d", tracking_uri=uri)


def test_register_sanitized_and_find(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    bundle = make_bundle(tmp_path / "out" / "model", fill=4.0)
    report = tmp_path / "artifacts"
    report.mkdir()
    (report / "report.json").write_text('{"verdict": "removed"}')
    (report / "report.md").write_text("# report\n")
    (report / "alpha.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    target = unique("clip-sanitized")
    tags = {SOURCE_KEY_TAG: "clip/3", POLICY_SHA256_TAG: "a" * 64, "tbar_guard.verdict": "removed"}
    metrics = {"ca_before": 0.91, "ca_after": 0.9, "asr_after": 0.01}
    params = {"policy_sha256": "a" * 64, "source_uri": "models:/clip/3"}

    assert find_sanitized(target, "clip/3", "a" * 64, tracking_uri=uri) is None  # no such model yet
    reg = register_sanitized(bundle, report, target, tags, metrics, params, tracking_uri=uri, experiment="tbar-test")
    assert (reg.name, reg.version, reg.uri) == (target, "1", f"models:/{target}/1")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version(target, "1")
    assert {k: mv.tags[k] for k in tags} == tags
    assert mv.run_id == reg.run_id and mv.status == "READY"
    run = client.get_run(reg.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == pytest.approx(metrics)
    assert run.data.params == params
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "tbar-test"
    assert sorted(f.path for f in client.list_artifacts(reg.run_id, "report")) == [
        "report/alpha.png",
        "report/report.json",
        "report/report.md",
    ]
    assert sorted(f.path for f in client.list_artifacts(reg.run_id)) == ["model", "report"]

    pulled = pull(reg.uri, tmp_path / "d", tracking_uri=uri)
    assert_same_bundle(pulled.local_dir, bundle)

    found = find_sanitized(target, "clip/3", "a" * 64, tracking_uri=uri)
    assert found == reg
    assert find_sanitized(target, "clip/3", "b" * 64, tracking_uri=uri) is None
    assert find_sanitized(target, "clip/4", "a" * 64, tracking_uri=uri) is None

    set_version_tags(target, "1", {"tbar_guard.sanitized_uri": reg.uri}, tracking_uri=uri)
    assert client.get_model_version(target, "1").tags["tbar_guard.sanitized_uri"] == reg.uri
    with pytest.raises(RegistryError, match="no version 9"):
        set_version_tags(target, "9", {"x": "y"}, tracking_uri=uri)

    # a re-registration makes version 2, and find_sanitized returns the newest match
    reg2 = register_sanitized(bundle, report, target, tags, metrics, params, tracking_uri=uri)
    assert reg2.version == "2"
    assert find_sanitized(target, "clip/3", "a" * 64, tracking_uri=uri) == reg2


def test_move_alias_and_get_alias_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = mlflow_server.uri
    name = unique("clip")
    bundle = make_bundle(tmp_path / "b")
    push_bundle(bundle, name, tracking_uri=uri)
    push_bundle(bundle, name, tracking_uri=uri)
    assert get_alias_version(name, "production", tracking_uri=uri) is None
    move_alias(name, "production", "1", tracking_uri=uri)
    assert get_alias_version(name, "production", tracking_uri=uri) == "1"
    move_alias(name, "production", "2", tracking_uri=uri)
    assert get_alias_version(name, "production", tracking_uri=uri) == "2"
    assert pull(f"models:/{name}@production", tmp_path / "d", tracking_uri=uri).version == "2"
    assert get_alias_version(unique("nosuch"), "production", tracking_uri=uri) is None
    with pytest.raises(RegistryError, match="no version 5"):
        move_alias(name, "production", "5", tracking_uri=uri)
    assert get_alias_version(name, "production", tracking_uri=uri) == "2"  # unchanged


def test_failure_after_version_creation_deletes_it(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injected in our own post-creation check (the MLflow client is real): the version
    that was created is deleted again and the run is marked FAILED."""
    uri = mlflow_server.uri
    target = unique("clip-sanitized")
    bundle = make_bundle(tmp_path / "b")
    report = tmp_path / "r"
    report.mkdir()

    def broken(*args: object, **kwargs: object) -> None:
        raise RegistryError("injected failure after the version was created", hint="test")

    monkeypatch.setattr(registry, "_verify_version", broken)
    tags = {SOURCE_KEY_TAG: "k", POLICY_SHA256_TAG: "p"}
    with pytest.raises(RegistryError, match=r"injected failure.*created and deleted again"):
        register_sanitized(bundle, report, target, tags, {}, {}, tracking_uri=uri)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert list(client.search_model_versions(f"name = '{target}'")) == []
    assert find_sanitized(target, "k", "p", tracking_uri=uri) is None
    exp = client.get_experiment_by_name("tbar-guard")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SOURCE_KEY_TAG}` = 'k'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_server_fails_fast_without_leaking_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in registry.MLFLOW_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)  # our defaults, not the developer's
    port = free_port()  # nothing listens there
    uri = f"http://user:secret@127.0.0.1:{port}"
    bundle = make_bundle(tmp_path / "b")
    for call in (
        lambda: pull("models:/clip/1", tmp_path / "d", tracking_uri=uri),
        lambda: push_bundle(bundle, "clip", tracking_uri=uri),
        lambda: find_sanitized("clip", "k", "p", tracking_uri=uri),
    ):
        start = time.monotonic()
        with pytest.raises(RegistryError) as info:
            call()
        elapsed = time.monotonic() - start
        assert elapsed < 60, elapsed
        text = str(info.value)
        assert "secret" not in text and "user:" not in text, text
        assert f"127.0.0.1:{port}" in text
        assert "reachable" in info.value.hint
        cause = info.value.__cause__
        while cause is not None:  # a chained exception is printed in tracebacks too
            assert "secret" not in str(cause)
            cause = cause.__cause__


def test_server_killed_midway(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", fill=5.0)
    report = tmp_path / "r"
    report.mkdir()
    (report / "report.json").write_text("{}")
    root = tmp_path / "server"
    target = unique("clip-sanitized")
    with running_mlflow_server(root) as server:
        v = push_bundle(bundle, "clip", tracking_uri=server.uri)
        server.kill()
        start = time.monotonic()
        with pytest.raises(RegistryError) as info:
            register_sanitized(bundle, report, target, {SOURCE_KEY_TAG: "k"}, {"m": 1.0}, {}, tracking_uri=server.uri)
        assert time.monotonic() - start < 60
        assert server.uri in str(info.value)
    # Restart a server on the same database and artifact store: nothing half-registered.
    with running_mlflow_server(root) as again:
        client = MlflowClient(tracking_uri=again.uri, registry_uri=again.uri)
        assert list(client.search_model_versions(f"name = '{target}'")) == []
        p = pull(v.uri, tmp_path / "d", tracking_uri=again.uri)
        assert_same_bundle(p.local_dir, bundle)
