"""The fault suite: hostile artifacts, a misbehaving MLflow, signals, full disks, credentials.

Each test tries to break one row of the README's "Guarantees" table with real parts: a real
``mlflow server`` (tests/mlflow_server.py), a real misbehaving HTTP proxy in front of it
(tests/faulty_proxy.py), real files, real resource limits and real signals to a real
``python -m tbar_guard`` subprocess. Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_proxy import Fault, faulty_proxy
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tbar_guard import registry
from tbar_guard.bundle import WEIGHTS_FILE, ClipBundle, build_model, save_model, sha256_state
from tbar_guard.cli import app
from tbar_guard.exit_codes import ExitCode
from tbar_guard.zoo import DEMO_PREPROCESS, DEMO_TASK, tiny_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object creates ``marker``: the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (open, (self.marker, "w"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def invoke(args: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, args, catch_exceptions=False, env=env)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny CLIP bundle: enough for everything that fails before any model work."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    bundle = ClipBundle(model, cfg, DEMO_PREPROCESS, DEMO_TASK, sha256_state(model.state_dict()), "test:tiny")
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    save_model(out, bundle)
    return out


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """tbar-guard's own retry defaults (MLFLOW_ENV_DEFAULTS), not whatever the developer set."""
    for key in registry.MLFLOW_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)


def client_for(server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def versions(server: MlflowServer, name: str) -> list[str]:
    return sorted(str(v.version) for v in client_for(server).search_model_versions(f"name = '{name}'"))


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def register_raw(server: MlflowServer, bundle: Path, name: str) -> str:
    """Register a directory as a model version with the plain MLflow client (no tbar-guard
    checks, no sha256 tag): what an attacker with write access to the registry can do."""
    client = client_for(server)
    exp = client.get_experiment_by_name("raw-uploads")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("raw-uploads")
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(bundle), "model")
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(Exception):  # already there
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return str(mv.version)


# ================================================================================================
# hostile model artifacts: pickles hidden in MLflow, corrupt tensors through the CLI


def test_pickle_hidden_in_an_mlflow_artifact_never_runs(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    """Three ways to hide a payload in a registered version: a pickle next to the bundle files,
    a torch (zip) checkpoint in place of the safetensors file, a raw pickle in its place. The
    gate downloads each over HTTP and refuses it before unpickling anything."""
    marker = tmp_path / "pwned"
    cases: dict[str, Path] = {}
    extra = copy_bundle(tiny_dir, tmp_path / "extra")
    (extra / "extra.pkl").write_bytes(pickle.dumps(Payload(marker)))
    cases["extra.pkl"] = extra
    zipped = copy_bundle(tiny_dir, tmp_path / "zipped")
    torch.save({"visual.proj": torch.zeros(2), "evil": Payload(marker)}, zipped / WEIGHTS_FILE)
    cases["zip checkpoint as safetensors"] = zipped
    raw = copy_bundle(tiny_dir, tmp_path / "raw")
    (raw / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload(marker)))
    cases["raw pickle as safetensors"] = raw
    for label, bundle in cases.items():
        name = unique("hostile")
        version = register_raw(mlflow_server, bundle, name)
        out = tmp_path / f"out-{name}"
        res = invoke(
            [
                "gate",
                "--model",
                f"models:/{name}/{version}",
                "--data",
                str(test_npz),
                "--out",
                str(out),
                "--tracking-uri",
                mlflow_server.uri,
            ]
        )
        assert res.exit_code == ExitCode.ERROR == 2, (label, res.output)
        assert not marker.exists(), label
        assert "safetensors" in res.stderr, (label, res.stderr)  # names the format to use
        assert "pickle" in res.stderr or "refused" in res.stderr or "not a readable" in res.stderr, res.stderr
        assert not out.exists(), label
        assert versions(mlflow_server, f"{name}-sanitized") == [], label
        assert "tbar_guard.verdict" not in client_for(mlflow_server).get_model_version(name, version).tags


def _corrupt(bundle: Path, kind: str) -> str:
    """Corrupt ``bundle`` in place; returns the text the error message must contain."""
    path = bundle / WEIGHTS_FILE
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return WEIGHTS_FILE
    state = load_file(str(path))
    if kind == "nan":
        state["visual.proj"][0, 0] = math.nan
        needle = "'visual.proj'"
    elif kind == "inf":
        state["logit_scale"] = torch.tensor(math.inf)
        needle = "'logit_scale'"
    elif kind == "missing":
        del state["text_projection"]
        needle = "'text_projection'"
    elif kind == "shape":
        state["visual.proj"] = state["visual.proj"][:-1]
        needle = "'visual.proj'"
    elif kind == "dtype":
        state["visual.proj"] = state["visual.proj"].to(torch.int32)
        needle = "'visual.proj'"
    else:
        raise AssertionError(kind)
    save_file(state, str(path))
    return needle


@pytest.mark.parametrize("kind", ["truncated", "nan", "inf", "missing", "shape", "dtype"])
def test_corrupt_weights_exit_2_naming_the_tensor(tiny_dir: Path, test_npz: Path, tmp_path: Path, kind: str) -> None:
    bundle = copy_bundle(tiny_dir, tmp_path / "bundle")
    needle = _corrupt(bundle, kind)
    for command in (
        ["scan", "--model", str(bundle), "--data", str(test_npz), "--out", str(tmp_path / "scan")],
        ["gate", "--model", str(bundle), "--data", str(test_npz), "--out", str(tmp_path / "gate")],
        [
            "sanitize",
            "--model",
            str(bundle),
            "--data",
            str(test_npz),
            "--trigger",
            "badnet",
            "--target",
            "0",
            "--out",
            str(tmp_path / "sanitize"),
        ],
    ):
        res = invoke(command)
        assert res.exit_code == 2, (command[0], res.output)
        assert needle in res.stderr, (command[0], res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing written, no .partial


def test_corrupt_weights_are_never_registered(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    test_npz: Path,
    tmp_path: Path,
) -> None:
    """`push` refuses a corrupt bundle before any request; a corrupt version that is already in
    the registry fails the gate with exit 2 and nothing is registered or tagged."""
    bundle = copy_bundle(tiny_dir, tmp_path / "bundle")
    needle = _corrupt(bundle, "nan")
    name = unique("nan")
    res = invoke(
        ["push", "--model", str(bundle), "--name", name, "--alias", "candidate", "--tracking-uri", mlflow_server.uri]
    )
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert versions(mlflow_server, name) == []
    version = register_raw(mlflow_server, bundle, name)
    out = tmp_path / "out"
    res = invoke(
        [
            "gate",
            "--model",
            f"models:/{name}/{version}",
            "--data",
            str(test_npz),
            "--out",
            str(out),
            "--tracking-uri",
            mlflow_server.uri,
        ]
    )
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert not out.exists()
    assert versions(mlflow_server, f"{name}-sanitized") == []
    assert "tbar_guard.verdict" not in client_for(mlflow_server).get_model_version(name, version).tags


# ================================================================================================
# policy and data through the CLI


def test_every_bad_policy_key_is_listed_at_once_exit_4(tiny_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text(
        "colour: blue\n"  # unknown key
        "seed: [1]\n"  # wrong type
        "accept:\n  ca_floor: 0\n"  # outside (0, 1]
        "detect:\n  batch_size: -4\n"  # negative size
        "sanitize:\n  forget_size: -1\n  alpha:\n    min: 3\n    max: 1\n",  # empty alpha range
        encoding="utf-8",
    )
    res = invoke(
        [
            "scan",
            "--model",
            str(tiny_dir),
            "--data",
            str(test_npz),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert res.exit_code == ExitCode.USAGE == 4, res.output
    for key_path in (
        "colour",
        "seed",
        "accept.ca_floor",
        "detect.batch_size",
        "sanitize.forget_size",
        "sanitize.alpha",
    ):
        assert f"- {key_path}" in res.stderr, (key_path, res.stderr)
    assert not (tmp_path / "o").exists()


def _image_folder(root: Path, n_per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for cls in DEMO_TASK.classnames[:3]:
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_bad_data_exits_2_naming_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = _image_folder(tmp_path / "unreadable")
    (unreadable / DEMO_TASK.classnames[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    wrong_label = _image_folder(tmp_path / "wrong-label")
    (wrong_label / "giraffe").mkdir()
    Image.new("RGB", (28, 28)).save(wrong_label / "giraffe" / "0.png")
    one_class = tmp_path / "one-class"
    (one_class / DEMO_TASK.classnames[0]).mkdir(parents=True)
    for i in range(50):
        Image.new("RGB", (28, 28), (i, i, i)).save(one_class / DEMO_TASK.classnames[0] / f"{i}.png")
    for data, code, needle in (
        (empty, 2, "empty"),
        (unreadable, 2, "broken.png"),
        (wrong_label, 2, "giraffe"),
        (one_class, 2, "class"),
    ):
        out = tmp_path / f"out-{data.name}"
        res = invoke(["scan", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)])
        assert res.exit_code == code, (data.name, res.output)
        assert needle in res.stderr, (data.name, res.stderr)
        assert not out.exists()


def test_grayscale_rgba_and_other_sizes_are_converted(tmp_path: Path) -> None:
    from tbar_guard.data import load_images

    root = tmp_path / "mixed"
    for cls, mode, size in (("0", "L", (28, 28)), ("1", "RGBA", (28, 28)), ("2", "RGB", (40, 17)), ("3", "P", (9, 9))):
        (root / cls).mkdir(parents=True)
        Image.new(mode, size).save(root / cls / "a.png")
    images = load_images(root, DEMO_TASK, 28)
    assert tuple(images.images.shape) == (4, 3, 28, 28)
    assert sorted(images.labels.tolist()) == [0, 1, 2, 3]


# ================================================================================================
# a misbehaving MLflow: 5xx, slow answers, lost answers, nobody listening


def _push_args(bundle: Path, name: str, uri: str) -> list[str]:
    return ["push", "--model", str(bundle), "--name", name, "--alias", "candidate", "--tracking-uri", uri]


def test_5xx_is_retried_with_backoff_then_exit_2_nothing_registered(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    fast_retries: None,
) -> None:
    """The server answers 503 to every create-model-version: 1 + 3 retries with growing pauses,
    then exit 2. The run made before is marked FAILED and no version or alias exists."""
    name = unique("five-hundred")
    with faulty_proxy(mlflow_server.uri, [Fault("model-versions/create", method="POST", status=503)]) as proxy:
        start = time.monotonic()
        res = invoke(_push_args(tiny_dir, name, proxy.uri))
        elapsed = time.monotonic() - start
        attempts = proxy.requests("model-versions/create", "POST")
    assert res.exit_code == 2, res.output
    assert "503" in res.stderr or "INTERNAL_ERROR" in res.stderr or "too many" in res.stderr.lower(), res.stderr
    assert len(attempts) == 4, attempts  # bounded: MLFLOW_HTTP_REQUEST_MAX_RETRIES=3
    gaps = [b[3] - a[3] for a, b in itertools.pairwise(attempts)]
    assert gaps[1] >= 1.5 and gaps[2] >= 3.5, gaps  # exponential backoff: ~0, 2, 4 s (+ jitter)
    assert elapsed < 60, elapsed
    assert versions(mlflow_server, name) == []
    assert registry.get_alias_version(name, "candidate", tracking_uri=mlflow_server.uri) is None


def test_slow_server_times_out_with_bounded_retries_then_exit_2(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_retries: None,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    name = unique("slow")
    with faulty_proxy(mlflow_server.uri, [Fault("/api/", method="GET", delay_s=3.0)]) as proxy:
        start = time.monotonic()
        res = invoke(_push_args(tiny_dir, name, proxy.uri))
        elapsed = time.monotonic() - start
        slow = [r for r in proxy.requests("/api/", "GET") if r[2].startswith("delay")]
    assert res.exit_code == 2, res.output
    assert "reachable" in res.stderr or "timed out" in res.stderr.lower(), res.stderr
    assert len(slow) == 4, slow
    assert elapsed < 60, elapsed
    assert versions(mlflow_server, name) == []


def test_5xx_while_pulling_the_candidate_exits_2_and_writes_nothing(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    test_npz: Path,
    tmp_path: Path,
    fast_retries: None,
) -> None:
    name = unique("pull-5xx")
    registry.push_bundle(tiny_dir, name, tracking_uri=mlflow_server.uri)
    registry.move_alias(name, "candidate", "1", tracking_uri=mlflow_server.uri)
    out = tmp_path / "out"
    with faulty_proxy(mlflow_server.uri, [Fault("/artifacts/", status=500)]) as proxy:
        res = invoke(
            [
                "gate",
                "--model",
                f"models:/{name}@candidate",
                "--data",
                str(test_npz),
                "--out",
                str(out),
                "--tracking-uri",
                proxy.uri,
            ]
        )
        assert proxy.requests("/artifacts/"), proxy.log
    assert res.exit_code == 2, res.output
    assert not out.exists()
    assert versions(mlflow_server, f"{name}-sanitized") == []
    assert "tbar_guard.verdict" not in client_for(mlflow_server).get_model_version(name, "1").tags


def test_unreachable_server_exits_2_quickly(test_npz: Path, tmp_path: Path, fast_retries: None) -> None:
    """Library-level: tests/test_registry.py::test_unreachable_server_fails_fast_without_leaking_credentials.
    Here the CLI's exit code and its output directory."""
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    start = time.monotonic()
    res = invoke(
        ["gate", "--model", "models:/clip@candidate", "--data", str(test_npz), "--out", str(out), "--tracking-uri", uri]
    )
    assert time.monotonic() - start < 60
    assert res.exit_code == 2, res.output
    assert "reachable" in res.stderr
    assert not out.exists()


# ================================================================================================
# credentials


SECRETS = {"token": "tok-5ecret-Z1", "password": "pw-5ecret-Z2", "userinfo": "ui-5ecret-Z3"}


def _credential_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRETS["token"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["password"])


def assert_no_secret(text: str, where: str) -> None:
    for kind, secret in SECRETS.items():
        assert secret not in text, f"{kind} credential leaked in {where}"


def test_credentials_never_in_output_of_failing_calls(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_dir: Path,
    test_npz: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_retries: None,
) -> None:
    """Every failure path prints, with credentials in all three places: the token and password
    variables and userinfo in the URI; also with TBAR_GUARD_DEBUG=1. (Tracebacks of unexpected errors:
    tests/test_bypasses.py::test_internal_error_messages_and_tracebacks_are_scrubbed.)"""
    _credential_env(monkeypatch)
    name = unique("creds")
    with faulty_proxy(mlflow_server.uri, [Fault("model-versions/create", status=500)]) as proxy:
        uri = proxy.uri.replace("http://", f"http://alice:{SECRETS['userinfo']}@")
        calls = (
            ("1", _push_args(tiny_dir, name, uri)),  # a 500 after retries, with the full traceback
            ("", ["gate", "--model", f"models:/{name}@nope", "--data", str(test_npz),
                  "--out", str(tmp_path / "o"), "--tracking-uri", uri]),
        )  # fmt: skip
        for debug, args in calls:
            proc = subprocess.run(
                [sys.executable, "-m", "tbar_guard", *args],
                capture_output=True,
                text=True,
                timeout=240,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), "TBAR_GUARD_DEBUG": debug},
            )
            assert proc.returncode == 2, (args[0], proc.stdout, proc.stderr)
            assert_no_secret(proc.stdout, f"stdout of {args[0]} (debug={debug!r})")
            assert_no_secret(proc.stderr, f"stderr of {args[0]} (debug={debug!r})")
    assert versions(mlflow_server, name) == []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_text(errors="replace"), str(path))


# ================================================================================================
# disk full while writing outputs


def _sanitize_subprocess(
    model: Path, data: Path, out: Path, policy: Path, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [
        "sanitize",
        "--model",
        str(model),
        "--data",
        str(data),
        "--trigger",
        "badnet",
        "--target",
        "0",
        "--out",
        str(out),
        "--policy",
        str(policy),
    ]
    return subprocess.run(
        [sys.executable, "-m", "tbar_guard", *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        preexec_fn=preexec,  # the child sets its own resource limit
    )


# A quick removal that always writes a bundle: one fine-tuning epoch, four alpha points, a floor
# and ceiling the victim (ASR ~98%) meets at some alpha.
FAST_SANITIZE = (
    "sanitize:\n  forget_size: 128\n  finetune:\n    epochs: 1\n"
    "  alpha:\n    min: 0.0\n    max: 6.0\n    coarse_step: 2.0\n    fine_step: 2.0\n"
    "accept:\n  ca_floor: 0.01\n  asr_ceiling: 0.9\n"
)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.parametrize("how", ["rlimit-fsize", "tmpfs-full"])
def test_disk_full_while_writing_outputs_exit_2_no_partial_bundle(
    victim_dir: Path, test_npz: Path, tmp_path: Path, how: str, request: pytest.FixtureRequest
) -> None:
    """The sanitized weights (~13 MB) do not fit: exit 2 and no output, partial or not."""
    policy = tmp_path / "fast.yaml"
    policy.write_text(FAST_SANITIZE, encoding="utf-8")
    if how == "tmpfs-full":
        where = request.getfixturevalue("tmpfs")
        proc = _sanitize_subprocess(victim_dir, test_npz, where / "out", policy)
        leftovers = list(where.iterdir())
    else:
        where = tmp_path / "outputs"
        where.mkdir()
        proc = _sanitize_subprocess(victim_dir, test_npz, where / "out", policy, preexec=_limit_file_size)
        leftovers = list(where.iterdir())
    assert (victim_dir / WEIGHTS_FILE).stat().st_size > 1024 * 1024  # it really cannot fit
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "writing the outputs failed" in proc.stderr, proc.stderr
    assert "No space left" in proc.stderr or "File too large" in proc.stderr, proc.stderr
    assert leftovers == [], leftovers


def test_out_of_memory_while_writing_outputs_exit_2_no_partial_bundle(
    victim_dir: Path, test_npz: Path, tmp_path: Path
) -> None:
    """A real RLIMIT_AS, set in the child just before the bundle is written (the rest of the run
    needs the memory): the allocation fails, exit 2, and nothing is left in the output folder."""
    policy = tmp_path / "fast.yaml"
    policy.write_text(FAST_SANITIZE, encoding="utf-8")
    where = tmp_path / "outputs"
    where.mkdir()
    script = (
        "import resource, sys\n"
        "import tbar_guard.bundle as b, tbar_guard.pipeline as p\n"
        "real = b.write_bundle_files\n"
        "def limited(*args, **kwargs):\n"
        "    with open('/proc/self/statm') as f:\n"
        "        vm = int(f.read().split()[0]) * resource.getpagesize()\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 18), resource.RLIM_INFINITY))\n"
        "    return real(*args, **kwargs)\n"
        "p.write_bundle_files = limited\n"
        "from tbar_guard.cli import main\n"
        "sys.argv = ['tbar-guard', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = [
        "sanitize",
        "--model",
        str(victim_dir),
        "--data",
        str(test_npz),
        "--trigger",
        "badnet",
        "--target",
        "0",
        "--out",
        str(where / "out"),
        "--policy",
        str(policy),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "error" in proc.stderr, proc.stderr
    assert list(where.iterdir()) == []
