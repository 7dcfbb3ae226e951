"""A real ``mlflow server`` for the registry tests.

``mlflow_server`` is a session fixture: one server (SQLite backend, artifacts proxied through
the server, so clients upload and download over HTTP exactly as they would against a shared
server) for the whole test session. ``running_mlflow_server`` starts a throwaway one, for tests
that kill the server. Use them from a test module with::

    from mlflow_server import mlflow_server, running_mlflow_server  # noqa: F401
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log: Path

    def kill(self) -> None:
        """Kill the server's whole process group (the CLI plus its uvicorn/gunicorn worker)."""
        _kill_group(self.proc)


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlflow_executable() -> Path:
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        pytest.skip(f"no mlflow executable next to {sys.executable}")
    return exe


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(root: Path) -> MlflowServer:
    """Start ``mlflow server`` with its state under ``root`` and wait until /health answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(mlflow_executable()),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        # Artifacts go through the server (mlflow-artifacts:/ proxy), stored under root/artifacts:
        # the clients never touch the artifact directory themselves.
        "--serve-artifacts",
        "--default-artifact-root",
        "mlflow-artifacts:/",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        if _healthy(uri):
            return MlflowServer(uri=uri, proc=proc, port=port, root=root, log=log)
        time.sleep(0.25)
    _kill_group(proc)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"mlflow server did not answer {uri}/health in {STARTUP_TIMEOUT_S:.0f}s:\n{tail}")


@contextmanager
def running_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """A throwaway server, killed (process group) on exit."""
    server = start_mlflow_server(root)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
