"""scan and gate on tiny models planted at test time (attack unknown to the tool)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fast_policy import FAST_REMOVAL_YAML
from PIL import Image
from typer.testing import CliRunner

from tbar_guard import gate as gate_module
from tbar_guard import reinvert
from tbar_guard.bundle import load_bundle, save_model, sha256_file
from tbar_guard.cli import app
from tbar_guard.gate import gate, scan
from tbar_guard.policy import policy_from_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def base_dir(foundation, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("base") / "base"
    save_model(out, foundation)
    return out


def _policy(base_dir: Path, default_families: bool = False, **extra: object):  # type: ignore[no-untyped-def]
    """The test policy: reference = the base model; the mask family only (half the scan time) unless
    ``default_families`` (the default scan, [mask, additive], is what the scan fixtures test)."""
    detect: dict[str, object] = {"reference_models": [str(base_dir)]}
    if not default_families:
        detect["differential"] = {"families": ["mask"]}
    raw: dict[str, object] = {"detect": detect}
    raw.update(extra)
    return policy_from_dict(raw)


@pytest.fixture(scope="module")
def victim_scan(victim_dir: Path, test_npz: Path, base_dir: Path, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("victim-scan") / "scan"
    return scan(victim_dir, test_npz, _policy(base_dir, default_families=True), out), out


@pytest.fixture(scope="module")
def twin_scan(clean_twin_dir: Path, test_npz: Path, base_dir: Path, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("twin-scan") / "scan"
    return scan(clean_twin_dir, test_npz, _policy(base_dir, default_families=True), out), out


def test_scan_flags_backdoor_and_infers_target(victim_scan) -> None:  # type: ignore[no-untyped-def]
    result, out = victim_scan
    det = result.report["detection"]
    assert result.verdict == "backdoor" and int(result.exit_code) == 1
    assert det["method"] == "differential" and det["rule_note"] == ""
    assert det["target_index"] == 0
    assert det["actionable"] is True
    assert det["proxy_asr"] > 0.5 > det["base_rate"]
    assert det["family"] == "mask" and det["families"]["mask"]["flagged"]
    # the mask family fired, so the additive family (listed after it) was not run: it could not change
    # the verdict or the deciding trigger (detect.differential.search_all: false, the default)
    assert set(det["families"]) == {"mask"} and det["families_not_run"] == ["additive"]
    assert "Not searched (an earlier family fired" in (out / "report.md").read_text()
    assert det["z_threshold"] is None  # the default rule: the area ratio alone
    assert det["area_ratio"] < det["area_ratio_threshold"] == 0.6
    areas = [c["area"] for c in det["per_class"]]
    assert det["pl1"] == min(areas) and areas.index(min(areas)) == 0
    for name in ("mask.png", "pattern.png", "trigger.png", "examples.png", "report.json", "report.md"):
        assert (out / name).is_file(), name
    with Image.open(out / "mask.png") as img:
        assert img.size[0] >= 28 and img.size[0] % 28 == 0


def test_clean_twin_not_flagged_with_reference(twin_scan, victim_scan) -> None:  # type: ignore[no-untyped-def]
    twin, _ = twin_scan
    victim, _ = victim_scan
    assert twin.verdict == "clean" and int(twin.exit_code) == 0, twin.report["reason"]
    # "clean" is never claimed as proven: the report says what was and was not established
    assert "this does not establish that the model is clean" in twin.report["reason"]
    assert twin.report["claim"] == (
        "no small-mask or full-image additive trigger found; this does not establish that the model is clean"
    )
    assert set(twin.report["detection"]["families"]) == {"mask", "additive"}  # the default; blend is opt-in
    assert twin.report["detection"]["families_not_run"] == []  # nothing fired: every family searched
    assert twin.report["detection"]["family"] == "mask"
    # the additive family's relative rule (default 0.2) was evaluated against the base model and did not fire
    relative = twin.report["detection"]["families"]["additive"]["relative"]
    assert relative["ratio_threshold"] == 0.2 and not relative["flagged"], relative["explanation"]
    assert any("that the model is clean" in item for item in twin.report["not_established"])
    assert victim.report["established"] and victim.report["not_established"]
    assert victim.report["detection"]["z_score"] < twin.report["detection"]["z_score"]
    assert victim.report["detection"]["pl1"] < 0.7 * twin.report["detection"]["pl1"]


def test_scan_is_deterministic(victim_dir: Path, test_npz: Path, base_dir: Path, tmp_path: Path, victim_scan) -> None:  # type: ignore[no-untyped-def]
    first, out = victim_scan
    again = scan(victim_dir, test_npz, _policy(base_dir, default_families=True), tmp_path / "b")
    assert again.report["detection"]["pl1"] == first.report["detection"]["pl1"]
    assert (out / "mask.png").read_bytes() == (tmp_path / "b" / "mask.png").read_bytes()


def test_gate_removes_backdoor_with_inverted_trigger(
    victim_dir: Path, test_npz: Path, base_dir: Path, tmp_path: Path
) -> None:
    evidence = {"reemergence": {"images": 200, "epochs": 2}, "disentanglement": {"images": 200}}
    policy = _policy(base_dir, trigger={"kind": "badnet"}, target="0", sanitize=evidence)
    result = gate(victim_dir, test_npz, policy, tmp_path / "gate")
    report = result.report
    assert result.verdict == "removed", report["reason"]
    assert report["removal_method"] == (policy.sanitize.agnostic_method or policy.sanitize.method)
    # re-emergence under the inverted trigger removal used, and under the true trigger of the audit
    back = report["reemergence"]
    assert back["images"] == 200 and back["audit"] is not None
    assert back["audit"]["clean_accuracy"] == back["clean_accuracy"], "one clean fine-tune serves both triggers"
    assert 0 <= back["audit"]["attack_success_rate"] <= 1
    assert report["disentanglement"]["at_chosen_alpha"]["alpha_trigger"] == -report["alpha"]
    md = (tmp_path / "gate" / "report.md").read_text()
    assert "| true trigger (audit) |" in md
    # re-inversion rounds (default on for unlearn): evidence for each, and the trigger count it ended with
    rounds = report["reinversion"]
    assert rounds["max_rounds"] == 2 and 1 <= len(rounds["rounds"]) <= 2
    # the blend companion (default on): searched once after the rounds, its evidence whether or not it joined
    (companion,) = rounds["companions"]
    assert companion["family"] == "blend" and 0 < companion["score"] <= 1, companion
    if companion["added"]:  # only a small (or, on trial, below-median), working blend joins
        ratio = policy.sanitize.unlearn.companion_trial_ratio if companion["trial"] else 0.7
        assert ratio is not None and companion["score"] < ratio * companion["median_score"], companion
        assert companion["asr"] >= 0.5, companion
    if companion["trial"]:  # joined on trial: kept, or dropped when the removal with it missed the policy
        assert rounds["trial_companion"] in ("kept", "dropped"), rounds
    else:
        assert rounds["trial_companion"] is None, rounds
    kept = companion["added"] and rounds["trial_companion"] != "dropped"
    assert rounds["triggers"] == 1 + sum(r["added"] for r in rounds["rounds"]) + int(kept)
    assert "## Re-inversion rounds" in md and "## Companion triggers" in md
    assert int(result.exit_code) == 1
    # the base model's rate under the inverted trigger is evidence; the verdict raises its ceilings to it
    # only under accept.reference_rate_ceiling (off by default)
    ceilings = report["asr_ceilings"]
    assert ceilings["reference"] == str(base_dir) and ceilings["applied"] is False, ceilings
    for split in ("val", "test"):
        assert 0 <= ceilings[f"{split}_rate"] <= 1
        assert ceilings[f"{split}_ceiling"] == policy.accept.asr_ceiling
    assert f"- clean reference `{base_dir}` under the same trigger:" in md
    assert report["after"]["attack_success_rate"] <= policy.accept.asr_ceiling
    true = report["true_trigger"]
    assert true["before"]["attack_success_rate"] > 0.9
    assert true["after"]["attack_success_rate"] <= policy.accept.asr_ceiling, true
    assert report["output"]["sha256"] == sha256_file(tmp_path / "gate" / "model" / "open_clip_model.safetensors")
    load_bundle(tmp_path / "gate" / "model")


def test_gate_clean_twin_writes_no_model(clean_twin_dir: Path, test_npz: Path, base_dir: Path, tmp_path: Path) -> None:
    result = gate(clean_twin_dir, test_npz, _policy(base_dir), tmp_path / "gate")
    assert result.verdict == "clean"
    assert not (tmp_path / "gate" / "model").exists()
    assert result.report["output"] is None


def test_decree_without_reference_falls_back_to_paper_rule(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    policy = policy_from_dict({"detect": {"method": "decree", "decree": {"steps": 60}}})
    result = scan(victim_dir, test_npz, policy, tmp_path / "s")
    det = result.report["detection"]
    assert det["method"] == "decree"
    assert det["rule"] == "paper" and "no clean reference" in det["rule_note"]
    assert det["threshold"] == 0.1
    assert det["l1_official"] == pytest.approx(3 * det["pl1"] * 28 * 28, rel=1e-4)


def test_differential_without_reference_says_uncalibrated(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    policy = policy_from_dict({"detect": {"differential": {"steps": 30, "families": ["mask"]}}})
    result = scan(victim_dir, test_npz, policy, tmp_path / "s")
    assert "no clean reference model" in result.report["detection"]["rule_note"]


def test_cli_scan_and_gate_exit_codes(victim_dir: Path, test_npz: Path, base_dir: Path, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"  # the removal's evidence is test_gate_removes_backdoor_with_inverted_trigger's
    policy.write_text(
        f"detect:\n  reference_models: ['{base_dir}']\n  differential: {{families: [mask]}}\n{FAST_REMOVAL_YAML}"
    )
    res = runner.invoke(
        app,
        [
            "scan",
            "--model",
            str(victim_dir),
            "--data",
            str(test_npz),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "scan"),
        ],
    )
    assert res.exit_code == 1, res.output
    res = runner.invoke(
        app,
        [
            "gate",
            "--model",
            str(victim_dir),
            "--data",
            str(test_npz),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "gate"),
        ],
    )
    assert res.exit_code == 1, res.output
    assert (tmp_path / "gate" / "model").is_dir()


def test_gate_errors_fail_closed(victim_dir: Path, tmp_path: Path, base_dir: Path) -> None:
    policy = tmp_path / "p.yaml"  # batch 32: more than the small data set below leaves for the inversion
    policy.write_text(
        f"detect:\n  reference_models: ['{base_dir}']\n  batch_size: 32\n  differential: {{families: [mask]}}\n"
    )
    # no data at all: usage error, nothing written
    res = runner.invoke(
        app, ["gate", "--model", str(victim_dir), "--policy", str(policy), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 4, res.output
    assert not (tmp_path / "o").exists()
    # too few images for the inversion batch: exit 2, nothing written
    import numpy as np

    small = tmp_path / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(small, x=rng.integers(0, 255, (40, 28, 28, 3), dtype=np.uint8), y=np.arange(40) % 10)
    res = runner.invoke(
        app,
        [
            "gate",
            "--model",
            str(victim_dir),
            "--data",
            str(small),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".o2.*"))


def test_reference_of_other_image_size_is_refused(victim_dir: Path, test_npz: Path, tmp_path: Path, foundation) -> None:  # type: ignore[no-untyped-def]
    from tbar_guard.bundle import ClipBundle, build_model
    from tbar_guard.zoo import tiny_config

    cfg = tiny_config(image_size=32, patch_size=8)
    other = ClipBundle(
        build_model(cfg),
        cfg,
        foundation.preprocess.__class__(32, (0.5,) * 3, (0.5,) * 3),
        foundation.task,
        "x",
        "other",
    )
    save_model(tmp_path / "other", other)
    policy = tmp_path / "p.yaml"
    policy.write_text(f"detect:\n  reference_models: ['{tmp_path / 'other'}']\n")
    res = runner.invoke(
        app,
        [
            "scan",
            "--model",
            str(victim_dir),
            "--data",
            str(test_npz),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 4, res.output
    assert "reference" in res.output


def test_gate_drops_a_companion_on_trial_when_the_removal_with_it_misses_the_policy(
    victim_dir: Path, test_npz: Path, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection around real components: the companion blend is made to join on trial, and the
    removal with it is made to miss the policy. The gate then removes without it (a second real
    removal), says so, and registers that model; when the removal without it fails too, the verdict
    is unremoved, the companion is reported kept and nothing is written."""
    real_companion, real_remove = reinvert._companion, gate_module.remove_backdoor
    monkeypatch.setattr(
        reinvert,
        "_companion",
        lambda *a, **k: (lambda c, t: (dataclasses.replace(c, added=True, trial=True), t))(*real_companion(*a, **k)),
    )
    calls: list[int] = []  # the trigger count of each removal
    fail_all = False

    def remove(clf, splits, trigger, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(trigger.count)
        result = real_remove(clf, splits, trigger, *args, **kwargs)
        if len(calls) == 1 or fail_all:
            return dataclasses.replace(result, verdict="unremoved", reason="forced by the test")
        return result

    monkeypatch.setattr(gate_module, "remove_backdoor", remove)
    off = {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}}
    sanitize = {"unlearn": {"reinvert_rounds": 1, "companion_trial_ratio": 0.99}, **off}
    policy = _policy(base_dir, trigger={"kind": "badnet"}, target="0", sanitize=sanitize)
    result = gate(victim_dir, test_npz, policy, tmp_path / "dropped")
    report = result.report
    assert len(calls) == 2 and calls[1] == calls[0] - 1, calls  # the fallback: the same set less the blend
    assert report["reinversion"]["triggers"] == calls[1]
    assert result.verdict == "removed", report["reason"]
    assert (
        "the companion blend on trial was dropped: with it the removal was unremoved (forced by the test)"
        in (report["reason"])
    )
    (companion,) = report["reinversion"]["companions"]
    assert companion["added"] and companion["trial"]
    assert report["reinversion"]["trial_companion"] == "dropped"
    assert "companion" not in report.get("trigger_description", "")
    assert report["true_trigger"]["after"]["attack_success_rate"] <= policy.accept.asr_ceiling
    assert (tmp_path / "dropped" / "model").is_dir()
    assert "The companion on trial was dropped" in (tmp_path / "dropped" / "report.md").read_text()

    calls.clear()
    fail_all = True
    result = gate(victim_dir, test_npz, policy, tmp_path / "kept")
    assert len(calls) == 2 and result.verdict == "unremoved" and int(result.exit_code) == 3
    assert "without the companion blend on trial the removal was unremoved too" in result.report["reason"]
    assert result.report["reinversion"]["trial_companion"] == "kept"
    assert result.report["output"] is None and not (tmp_path / "kept" / "model").exists()
