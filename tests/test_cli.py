"""The CLI's exit-code contract: 0 clean, 1 removed, 2 error, 3 unremoved, 4 usage."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from typer.testing import CliRunner

from tbar_guard import __version__
from tbar_guard.bundle import WEIGHTS_FILE, sha256_file
from tbar_guard.cli import app
from tbar_guard.exit_codes import ExitCode
from tbar_guard.zoo import DEMO_TASK, tiny_config

runner = CliRunner()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _sanitize(model: Path, data: Path, out: Path, *extra: str, trigger: str = "badnet", target: str = "0") -> list[str]:
    return [
        "sanitize",
        "--model", str(model),
        "--data", str(data),
        "--trigger", trigger,
        "--target", target,
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    return runner.invoke(app, args, catch_exceptions=False)


# --- verdict exit codes -------------------------------------------------------------------------


def test_removed_exits_1(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    cheap_evidence = "sanitize:\n  reemergence:\n    images: 100\n    epochs: 1\n  disentanglement:\n    images: 100\n"
    policy = _policy(tmp_path, "accept:\n  ca_floor: 0.85\n" + cheap_evidence)
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out, "--policy", str(policy), target="the digit zero"))
    assert result.exit_code == ExitCode.BACKDOOR_REMOVED == 1, result.output
    assert "verdict: removed" in result.stdout
    assert "re-emergence: ASR " in result.stdout and "(100 images, 1 epochs, lr 0.0001;" in result.stdout
    assert "disentanglement: mean xi " in result.stdout
    assert f"sanitized model: {out / 'model'}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "removed" and report["exit_code"] == 1
    assert report["output"]["sha256"] == sha256_file(out / "model" / WEIGHTS_FILE)
    assert (out / "report.md").is_file()


def test_unremoved_exits_3(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    # plain TBAR under the default CA floor 0.95 cannot push the ASR under the ceiling on this model
    policy = _policy(tmp_path, "sanitize:\n  method: tbar\n")
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out, "--policy", str(policy)))
    assert result.exit_code == ExitCode.UNREMOVED == 3, result.output
    assert "verdict: unremoved" in result.stdout
    assert json.loads((out / "report.json").read_text())["verdict"] == "unremoved"
    assert not (out / "model").exists()


def test_clean_model_exits_0(clean_twin_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    result = _invoke(_sanitize(clean_twin_dir, test_npz, tmp_path / "out"))
    assert result.exit_code == ExitCode.CLEAN == 0, result.output
    assert "verdict: clean" in result.stdout
    assert not (tmp_path / "out" / "model").exists()


# --- usage errors: 4 ----------------------------------------------------------------------------


def test_unknown_target_class_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out, target="the digit eleven"))
    assert result.exit_code == ExitCode.USAGE == 4, result.output
    assert "the digit eleven" in result.stderr
    assert "hint:" in result.stderr and "the digit zero" in result.stderr
    assert not out.exists()


def test_target_index_out_of_range_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    result = _invoke(_sanitize(victim_dir, test_npz, tmp_path / "out", target="10"))
    assert result.exit_code == 4, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("trigger", "needle"),
    [("badnet:size=0", "trigger.size"), ("badnet:colour=red", "colour"), ("laser", "laser"), ("badnet:size", "size")],
)
def test_malformed_trigger_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path, trigger: str, needle: str) -> None:
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out, trigger=trigger))
    assert result.exit_code == 4, result.output
    assert needle in result.stderr
    assert not out.exists()


def test_trigger_file_with_syntax_error_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    spec = tmp_path / "trigger.yaml"
    spec.write_text("kind: badnet\nsize: [3\n")
    result = _invoke(_sanitize(victim_dir, test_npz, tmp_path / "out", trigger=str(spec)))
    assert not (tmp_path / "out").exists()
    assert result.exit_code == 4, result.output


def test_invalid_policy_lists_every_key_path_and_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    policy = _policy(
        tmp_path, "seed: abc\naccept:\n  ca_floor: 0\n  asr_ceiling: 2\nsanitize:\n  forget_size: -3\n  colour: red\n"
    )
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out, "--policy", str(policy)))
    assert result.exit_code == 4, result.output
    for key_path in ("seed", "accept.ca_floor", "accept.asr_ceiling", "sanitize.forget_size", "sanitize.colour"):
        assert f"  - {key_path}:" in result.stderr, key_path
    assert str(policy) in result.stderr
    assert "init-policy" in result.stderr
    assert not out.exists()


def test_policy_file_missing_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    result = _invoke(_sanitize(victim_dir, test_npz, tmp_path / "out", "--policy", str(tmp_path / "none.yaml")))
    assert result.exit_code == 4, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["--model", "--data", "--trigger", "--target", "--out"])
def test_missing_required_option_exits_4(tmp_path: Path, missing: str) -> None:
    args = _sanitize(tmp_path / "m", tmp_path / "d.npz", tmp_path / "out")
    i = args.index(missing)
    del args[i : i + 2]
    result = _invoke(args)
    assert result.exit_code == 4, result.output
    assert missing in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["sanitize", "--bogus", "1"], ["no-such-command"]])
def test_unknown_option_or_command_exits_4(args: list[str]) -> None:
    assert _invoke(args).exit_code == 4


def test_click_usage_errors_never_exit_0(tmp_path: Path) -> None:
    """Whatever the code, a usage error must fail CI and write nothing."""
    for args in (["sanitize", "--model", str(tmp_path / "m")], ["sanitize", "--bogus", "1"], ["no-such-command"]):
        result = _invoke(args)
        assert result.exit_code not in (0, 1, 3), (args, result.output)
        assert "Usage:" in result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_out_exits_4(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    result = _invoke(_sanitize(victim_dir, test_npz, out))
    assert result.exit_code == 4, result.output
    assert "already exists" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_arch_without_classes_exits_4(tmp_path: Path, test_npz: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"")
    result = _invoke(_sanitize(tmp_path / "m.pt", test_npz, tmp_path / "out", "--arch", "ViT-B-32"))
    assert result.exit_code == 4, result.output
    assert "--classes" in result.stderr


# --- errors: 2 ----------------------------------------------------------------------------------


def test_missing_model_exits_2(test_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(_sanitize(tmp_path / "no-model", test_npz, out))
    assert result.exit_code == ExitCode.ERROR == 2, result.output
    assert "no-model" in result.stderr and "does not exist" in result.stderr
    assert not out.exists()


def test_pickle_payload_with_arch_exits_2(test_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tbar-tiny", tiny_config())
    marker = tmp_path / "pwned"
    model = tmp_path / "model.pt"
    import torch

    torch.save({"state_dict": {}, "evil": Payload(marker)}, model)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(DEMO_TASK.to_json()))
    out = tmp_path / "out"
    result = _invoke(_sanitize(model, test_npz, out, "--arch", "tbar-tiny", "--classes", str(classes)))
    assert result.exit_code == 2, result.output
    assert "refused" in result.stderr
    assert not marker.exists()
    assert not out.exists()


def test_raw_pickle_model_exits_2(test_npz: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(Payload(marker)))
    result = _invoke(_sanitize(model, test_npz, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "pickle" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_missing_data_exits_2(victim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, tmp_path / "missing.npz", out))
    assert result.exit_code == 2, result.output
    assert "missing.npz" in result.stderr
    assert not out.exists()


def test_unusable_data_exits_2(victim_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    data = tmp_path / "tiny.npz"
    np.savez(data, x=np.zeros((2, 28, 28, 3), dtype=np.uint8), y=np.array([0, 1]))
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, data, out))
    assert result.exit_code == 2, result.output
    assert "too few" in result.stderr
    assert not out.exists()


def test_internal_error_is_exit_2_never_0(
    victim_dir: Path, test_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("tbar_guard.pipeline.remove_backdoor", boom)
    monkeypatch.delenv("TBAR_GUARD_DEBUG", raising=False)
    out = tmp_path / "out"
    result = _invoke(_sanitize(victim_dir, test_npz, out))
    assert result.exit_code == 2, result.output
    assert "internal error: RuntimeError: simulated crash" in result.stderr
    assert not out.exists()


# --- help and version ---------------------------------------------------------------------------


def test_python_m_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "tbar_guard", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("sanitize", "scan", "gate", "init-policy"):
        assert command in proc.stdout


def test_sanitize_help_lists_options() -> None:
    result = _invoke(["sanitize", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--data", "--trigger", "--target", "--out", "--policy", "--arch", "--classes"):
        assert option in result.stdout


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "sanitize" in result.output
    assert result.exit_code != 0


def test_version() -> None:
    result = _invoke(["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__
