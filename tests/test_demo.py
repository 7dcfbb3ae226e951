"""The README's first command: `tbar-guard demo` on an embedded default, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tbar_guard.demo import MARKER, fresh_workdir


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tbar_guard", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["command"] == "gate"
    assert report["verdict"] == "removed", report["reason"]
    assert report["registered"]["uri"] == f"models:/demo-clip-sanitized/{report['registered']['version']}"
    assert report["alias_moved"].startswith("demo-clip-sanitized@production")
    assert report["true_trigger"]["after"]["attack_success_rate"] <= 0.05
    assert (workdir / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists(), "the demo must keep everything under its workdir"
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert "verdict: removed" in proc.stdout
    # the gate stopped at the mask family (it fired), as a default policy does
    assert report["detection"]["families_not_run"] == ["additive"]


def test_demo_reuses_its_own_workdir(tmp_path: Path) -> None:
    """A second `tbar-guard demo` in the same workdir starts from scratch (the marker says the folder
    is the demo's); the whole second run is not repeated here, only the step that decides it."""
    workdir = tmp_path / "demo"
    fresh_workdir(workdir)
    (workdir / "mlflow.db").write_text("stale")
    (workdir / "models").mkdir()
    again = fresh_workdir(workdir)
    assert again == workdir.resolve()
    assert sorted(p.name for p in workdir.iterdir()) == [MARKER]


def test_demo_refuses_foreign_workdir(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "tbar_guard", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4
    assert (tmp_path / "mine.txt").read_text() == "keep me"
