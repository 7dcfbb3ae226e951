"""Known-trigger TBAR on the session BadNet victim, and the α search on synthetic curves.

On this tiny model the removal costs clean accuracy, so the end-to-end tests use a policy whose
CA floor is 0.85 × the original. Plain TBAR (method ``tbar``) cannot keep the default 0.95 floor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tbar_guard import __version__
from tbar_guard.attacks import BadNetSpec, Trigger, build_trigger, parse_trigger
from tbar_guard.bundle import WEIGHTS_FILE, ClipBundle, load_bundle, sha256_file, sha256_state
from tbar_guard.clip import classifier_for, resolve_device, visual_state
from tbar_guard.data import ImageSet
from tbar_guard.errors import UsageError
from tbar_guard.evaluate import evaluate
from tbar_guard.exit_codes import ExitCode
from tbar_guard.pipeline import RunResult, prepare, sanitize
from tbar_guard.policy import AcceptPolicy, AlphaPolicy, Policy, policy_from_dict
from tbar_guard.report import removal_json
from tbar_guard.sanitize import (
    AlphaChoice,
    LearnedVector,
    ReferenceCeilings,
    Removal,
    SweepPoint,
    _grid,
    choose_best,
    inverted_probe,
    learn_on_forget_set,
    remove_backdoor,
    search_alpha,
)
from tbar_guard.task_vector import TaskVector

# plain removal costs more than 5% CA on the tiny model; the evidence (re-emergence, ξ) made cheap
EVIDENCE = {"reemergence": {"images": 200, "epochs": 2}, "disentanglement": {"images": 200}}
RELAXED = {"accept": {"ca_floor": 0.85}, "sanitize": EVIDENCE}
NO_EVIDENCE = {
    "accept": {"ca_floor": 0.85},
    "sanitize": {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}},
}
PLAIN_TBAR = {"sanitize": {"method": "tbar"}}  # the paper's recipe under the default 0.95 floor


def _run(victim_dir: Path, test_npz: Path, out: Path, policy: Policy, target: str = "0") -> RunResult:
    return sanitize(victim_dir, test_npz, policy, parse_trigger("badnet"), target, out)


@pytest.fixture(scope="module")
def removed(victim_dir: Path, test_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    out = tmp_path_factory.mktemp("sanitize") / "removed"
    return _run(victim_dir, test_npz, out, policy_from_dict(RELAXED), target="the digit zero")


@pytest.fixture(scope="module")
def unremoved(victim_dir: Path, test_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    out = tmp_path_factory.mktemp("sanitize") / "unremoved"
    return _run(victim_dir, test_npz, out, policy_from_dict(PLAIN_TBAR))


# --- the victim ---------------------------------------------------------------------------------


def test_victim_is_backdoored(badnet_victim: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger) -> None:
    m = evaluate(classifier_for(badnet_victim), test_images, badnet_trigger, 0)
    assert m.attack_success_rate is not None and m.attack_success_rate > 0.9
    assert m.clean_accuracy > 0.75
    assert m.n_attack == int((test_images.labels != 0).sum())


def test_clean_twin_is_not_backdoored(clean_twin: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger) -> None:
    m = evaluate(classifier_for(clean_twin), test_images, badnet_trigger, 0)
    assert m.attack_success_rate is not None and m.attack_success_rate < 0.2
    assert m.clean_accuracy > 0.75


# --- end to end: removed ------------------------------------------------------------------------


def test_relaxed_policy_removes_the_backdoor(removed: RunResult) -> None:
    r = removed.report
    assert removed.verdict == r["verdict"] == "removed", r["reason"]
    assert removed.exit_code == ExitCode.BACKDOOR_REMOVED == r["exit_code"] == 1
    assert r["before"]["attack_success_rate"] > 0.9
    assert r["after"]["attack_success_rate"] <= 0.05
    assert r["after"]["clean_accuracy"] >= 0.85 * r["before"]["clean_accuracy"]


def test_report_contents(removed: RunResult, victim_dir: Path) -> None:
    assert removed.out is not None
    r = json.loads((removed.out / "report.json").read_text())
    assert r == removed.report
    assert r["tool"] == "tbar-guard" and r["command"] == "sanitize" and r["version"] == __version__
    assert r["verdict"] == "removed" and r["reason"]
    assert r["seed"] == 0 and r["device"] == str(resolve_device("auto"))
    for side in ("before", "after", "val_before"):
        assert set(r[side]) >= {"clean_accuracy", "attack_success_rate", "n_clean", "n_attack"}
        assert 0 <= r[side]["clean_accuracy"] <= 1 and 0 <= r[side]["attack_success_rate"] <= 1
    assert r["trigger"] == {"kind": "badnet", "size": 3, "location": "bottom-right", "color": "white", "seed": 0}
    assert r["trigger_description"].startswith("badnet(")
    assert r["target"] == {"index": 0, "name": "the digit zero"}
    assert r["model"]["sha256"] == sha256_file(victim_dir / WEIGHTS_FILE)
    assert r["output"]["path"] == str(removed.out / "model")
    assert r["output"]["sha256"] == sha256_file(removed.out / "model" / WEIGHTS_FILE)
    assert r["output"]["sha256"] != r["model"]["sha256"]
    assert r["policy"]["accept"]["ca_floor"] == 0.85
    assert r["policy_sha256"] == policy_from_dict(RELAXED).sha256()
    assert r["data"]["n_images"] == 2000
    assert r["data"]["splits"] == {"forget": 800, "val": 600, "test": 600}
    assert 0 < r["forget_size"] <= 800 and r["finetune_steps"] > 0
    assert r["trigger_vector_norm"] > 0 and 0 < r["trigger_vector_relative_norm"] < 1
    assert set(r["timings"]) == {"load", "finetune", "alpha_search", "reemergence", "disentanglement", "total"}
    assert all(v >= 0 for v in r["timings"].values())
    assert r["timings"]["reemergence"] > 0 and r["timings"]["disentanglement"] > 0
    assert r["timings"]["total"] >= sum(v for k, v in r["timings"].items() if k not in ("load", "total"))
    assert (removed.out / "report.md").read_text().startswith("# tbar-guard sanitize: **REMOVED**")
    assert (removed.out / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["pictures"] == {"alpha_sweep": "alpha_sweep.png"}


def test_report_alpha_sweep(removed: RunResult) -> None:
    r = removed.report
    sweep = r["alpha_sweep"]
    alphas = [p["alpha"] for p in sweep]
    assert alphas == sorted(alphas) and len(set(alphas)) == len(alphas)
    assert alphas[0] == 0.0
    assert r["alpha"] in alphas
    assert r["alpha"] > 0
    assert len(sweep) < 31
    for p in sweep:
        assert set(p) == {"alpha", "clean_accuracy", "attack_success_rate", "feasible"}
        assert p["feasible"] == (p["clean_accuracy"] >= 0.85 * r["val_before"]["clean_accuracy"] - 1e-12)
    chosen = next(p for p in sweep if p["alpha"] == r["alpha"])
    assert chosen["feasible"] and chosen["attack_success_rate"] <= 0.05
    # the chosen α (a known trigger: alpha.known_asr_tolerance 0): the lowest ASR among feasible points,
    # ties to the smaller α
    feasible = [p for p in sweep if p["feasible"]]
    assert chosen == min(feasible, key=lambda p: (p["attack_success_rate"], p["alpha"]))
    # α = 0 is the unmodified victim on the validation split
    assert sweep[0]["clean_accuracy"] == pytest.approx(r["val_before"]["clean_accuracy"])
    assert sweep[0]["attack_success_rate"] == pytest.approx(r["val_before"]["attack_success_rate"])


def test_written_model_is_sanitized(
    removed: RunResult, test_images: ImageSet, badnet_trigger: Trigger, badnet_victim: ClipBundle
) -> None:
    assert removed.out is not None
    model = load_bundle(removed.out / "model")
    assert model.weights_sha256 == removed.report["output"]["sha256"]
    assert model.task == badnet_victim.task and model.preprocess == badnet_victim.preprocess
    m = evaluate(classifier_for(model), test_images, badnet_trigger, 0)
    assert m.attack_success_rate is not None and m.attack_success_rate <= 0.05
    assert m.clean_accuracy >= 0.85 * 0.8
    # only the image tower changed
    new, old = model.model.state_dict(), badnet_victim.model.state_dict()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(k.startswith("visual.") for k in changed)


def test_input_model_is_untouched(removed: RunResult, victim_dir: Path, badnet_victim: ClipBundle) -> None:
    assert removed.report["model"]["sha256"] == sha256_file(victim_dir / WEIGHTS_FILE)
    assert sha256_state(load_bundle(victim_dir).model.state_dict()) == sha256_state(badnet_victim.model.state_dict())


def test_reemergence_in_report(removed: RunResult) -> None:
    r = removed.report
    back = r["reemergence"]
    assert set(back) == {
        "clean_accuracy",
        "attack_success_rate",
        "images",
        "epochs",
        "lr",
        "seconds",
        "repair_images_from",
        "audit",
    }
    assert (back["images"], back["epochs"], back["lr"]) == (200, 2, 1e-4)
    assert 0 <= back["attack_success_rate"] <= 1 and back["seconds"] > 0
    assert back["clean_accuracy"] > 0.5, "a clean fine-tune keeps the model usable"
    assert back["audit"] is None  # sanitize knows only the trigger it removed
    # 800 forget-split images, ~720 of them in the forget set: too few unused, the whole split repairs
    assert back["repair_images_from"].startswith("whole forget split")
    assert f"re-emergence ASR {back['attack_success_rate']:.3f}" in r["reason"]
    assert removed.out is not None
    md = (removed.out / "report.md").read_text()
    assert "## Re-emergence (test split, after a clean fine-tune of the sanitized model: 200 images" in md
    assert f"| {100 * back['attack_success_rate']:.1f}% |" in md


def test_disentanglement_in_report(removed: RunResult) -> None:
    r = removed.report
    d = r["disentanglement"]
    assert set(d) >= {
        "alphas_clean",
        "alphas_trigger",
        "xi",
        "clean_part",
        "trigger_part",
        "mean_xi",
        "at_chosen_alpha",
    }
    a = r["alpha"]
    assert d["alphas_clean"] == [0.0, 0.5, 1.0]
    assert d["alphas_trigger"] == pytest.approx([-a, -a / 2, 0.0]) and d["alphas_trigger"][2] == 0.0
    assert d["images"] == 200 and d["clean_images"] == r["forget_size"] and d["clean_vector_norm"] > 0
    cells = [v for row in d["xi"] for v in row]
    assert len(cells) == 9 and all(0.0 <= v <= 2.0 for v in cells)
    for i in range(3):
        for j in range(3):
            assert 0.0 <= d["clean_part"][i][j] <= 1.0 and 0.0 <= d["trigger_part"][i][j] <= 1.0
            assert d["xi"][i][j] == pytest.approx(d["clean_part"][i][j] + d["trigger_part"][i][j])
    # sanity: at α_c = 0, α_t = 0 both sides are the same model, exactly
    assert d["xi"][0][2] == 0.0
    assert all(row[2] == 0.0 for row in d["clean_part"]), "α_t = 0 adds nothing to θ_b + α_c·τ_c"
    assert all(v == 0.0 for v in d["trigger_part"][0]), "α_c = 0 adds nothing to θ_b + α_t·τ_t"
    # the negation changes some clean predictions (it costs CA here): ξ is measured, not constant
    assert d["xi"][0][0] > 0
    assert d["mean_xi"] == pytest.approx(sum(cells) / 9)
    chosen = d["at_chosen_alpha"]
    assert chosen["alpha_trigger"] == pytest.approx(-a)
    assert chosen["xi"] == [row[0] for row in d["xi"]] and chosen["max_xi"] == max(chosen["xi"])
    assert removed.out is not None
    md = (removed.out / "report.md").read_text()
    assert "## Weight disentanglement" in md and "Low ξ means the trigger vector acts on triggered inputs only" in md
    assert f"| 0 | {d['xi'][0][0]:.3f} | {d['xi'][0][1]:.3f} | 0.000 |" in md


def test_same_removal_without_evidence(removed: RunResult, victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    """Same inputs, same α and weights; re-emergence and ξ are measured after the removal and change
    nothing in it, and a policy that disables them gets neither in the report."""
    again = _run(victim_dir, test_npz, tmp_path / "again", policy_from_dict(NO_EVIDENCE))
    assert "reemergence" not in again.report and "disentanglement" not in again.report
    assert again.report["timings"]["reemergence"] == 0.0 == again.report["timings"]["disentanglement"]
    assert again.out is not None
    md = (again.out / "report.md").read_text()
    assert "## Re-emergence" not in md and "## Weight disentanglement" not in md
    assert "re-emergence" not in again.report["reason"]
    assert again.verdict == removed.verdict
    assert again.report["alpha"] == removed.report["alpha"]
    assert again.report["alpha_sweep"] == removed.report["alpha_sweep"]
    assert again.report["after"] == removed.report["after"]
    assert removed.out is not None
    a = load_bundle(removed.out / "model").model.state_dict()
    b = load_bundle(tmp_path / "again" / "model").model.state_dict()
    assert sha256_state(a) == sha256_state(b)
    assert again.report["output"]["sha256"] == removed.report["output"]["sha256"]


# --- end to end: unremoved / clean --------------------------------------------------------------


def test_plain_tbar_cannot_meet_the_default_floor(unremoved: RunResult) -> None:
    r = unremoved.report
    assert unremoved.verdict == r["verdict"] == "unremoved", r["reason"]
    assert unremoved.exit_code == ExitCode.UNREMOVED == 3
    assert r["policy"]["accept"]["ca_floor"] == 0.95
    assert r["output"] is None
    assert unremoved.out is not None
    assert (unremoved.out / "report.json").is_file()
    assert not (unremoved.out / "model").exists()
    assert json.loads((unremoved.out / "report.json").read_text())["verdict"] == "unremoved"
    # every feasible α leaves the ASR above the ceiling
    feasible = [p for p in r["alpha_sweep"] if p["feasible"]]
    assert feasible and all(p["attack_success_rate"] > 0.05 for p in feasible)
    assert "no alpha" in r["reason"]
    assert "reemergence" not in r, "re-emergence is measured only for a removal that met the policy"
    assert ("disentanglement" in r) == (r["alpha"] > 0), "ξ explains the best negation found, if any"


def test_clean_model_gets_clean_verdict(clean_twin_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    result = _run(clean_twin_dir, test_npz, tmp_path / "o", policy_from_dict(RELAXED))
    assert result.verdict == "clean" and result.exit_code == ExitCode.CLEAN == 0
    assert result.report["alpha"] == 0.0 and result.report["alpha_sweep"] == []
    assert "reemergence" not in result.report and "disentanglement" not in result.report  # no removal ran
    assert not (tmp_path / "o" / "model").exists()
    assert (tmp_path / "o" / "report.json").is_file()


def test_errors_write_nothing(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(UsageError, match="target class"):
        _run(victim_dir, test_npz, out, Policy(), target="the digit eleven")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UsageError, match="already exists"):
        _run(victim_dir, test_npz, out, Policy())
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_trigger_that_does_not_fit_the_model(victim_dir: Path, test_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exceeds"):
        sanitize(victim_dir, test_npz, Policy(), BadNetSpec(size=40), "0", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --- search_alpha on synthetic curves -----------------------------------------------------------


class Curve:
    """measure(α) -> (CA, ASR) from two functions, recording every α evaluated."""

    def __init__(self, ca: Callable[[float], float], asr: Callable[[float], float]) -> None:
        self.ca, self.asr = ca, asr
        self.calls: list[float] = []

    def __call__(self, a: float) -> tuple[float, float]:
        self.calls.append(a)
        return self.ca(a), self.asr(a)


ACCEPT = AcceptPolicy(ca_floor=0.9, asr_ceiling=0.05)
ALPHA = AlphaPolicy(asr_tolerance=0.0)  # 0..6, coarse 0.5, fine 0.1, the strict lowest-ASR rule


def _linear(start: float, slope: float) -> Callable[[float], float]:
    return lambda a: min(1.0, max(0.0, start + slope * a))


def test_picks_lowest_asr_feasible_alpha() -> None:
    # CA = 0.8 - 0.039α meets 0.9 × 0.8 = 0.72 up to α ≈ 2.05; ASR falls linearly, never reaching 0
    curve = Curve(_linear(0.8, -0.039), lambda a: max(0.01, 0.9 - 0.3 * a))
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert choice.alpha == 2.0
    assert choice.point.feasible
    feasible = [p for p in choice.sweep if p.feasible]
    assert choice.point.attack_success_rate == min(p.attack_success_rate for p in feasible)
    assert all(not p.feasible for p in choice.sweep if p.alpha > choice.alpha + 1e-9)


def test_fine_grid_refines_between_coarse_points() -> None:
    # feasible up to α = 1.75: coarse stops at 1.5 (2.0 and 2.5 infeasible); fine adds 1.6..1.9
    curve = Curve(_linear(0.8, -0.08 / 1.75), _linear(1.0, -0.5))
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert curve.calls == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 1.6, 1.7, 1.8, 1.9]
    assert choice.alpha == 1.7
    assert [p.alpha for p in choice.sweep] == sorted(curve.calls)
    assert len(choice.sweep) == len(curve.calls), "each α is measured once"


def test_ties_go_to_the_smaller_alpha() -> None:
    # ASR plateaus at 0.02 from α = 1 on; CA stays feasible everywhere
    curve = Curve(lambda a: 0.8, lambda a: max(0.02, 1.0 - a))
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert choice.alpha == 1.0
    assert choice.point.attack_success_rate == 0.02


def test_reaches_alpha_above_one_when_needed() -> None:
    curve = Curve(_linear(0.8, -0.01), _linear(1.0, -0.3))
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert choice.alpha > 1.0
    assert choice.point.attack_success_rate == 0.0
    assert choice.alpha == pytest.approx(3.5)


def test_stops_early_when_asr_hits_zero() -> None:
    curve = Curve(lambda a: 0.8, lambda a: 0.0 if a >= 1.0 else 0.9)
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert curve.calls == [0.0, 0.5, 1.0], "nothing beats ASR 0 at a smaller α; no fine grid either"
    assert choice.alpha == 1.0


def test_stops_after_two_infeasible_coarse_points() -> None:
    curve = Curve(_linear(0.8, -0.1), lambda a: 0.5)
    search_alpha(curve, 0.8, ACCEPT, ALPHA)
    coarse = [a for a in curve.calls if a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    # CA ≥ 0.72 up to α = 0.8: 1.0 and 1.5 break the floor, nothing after them is measured
    assert coarse == [0.0, 0.5, 1.0, 1.5]
    assert max(curve.calls) == 1.5


def test_evaluates_fewer_points_than_the_fine_grid() -> None:
    full = _grid(ALPHA.min, ALPHA.max, ALPHA.fine_step)
    assert len(full) == 61
    coarse = _grid(ALPHA.min, ALPHA.max, ALPHA.coarse_step)
    budget = len(coarse) + round(ALPHA.coarse_step / ALPHA.fine_step) - 1
    for ca_slope, asr_slope in [(-0.001, -0.1), (-0.021, -0.2), (-0.045, -0.15), (0.0, -0.01), (-0.19, -1.0)]:
        curve = Curve(_linear(0.8, ca_slope), _linear(1.0, asr_slope))
        choice = search_alpha(curve, 0.8, ACCEPT, ALPHA)
        assert len(curve.calls) <= budget < len(full)
        assert len(curve.calls) < 31
        # the coarse-to-fine answer is as good as the exhaustive fine grid on monotone curves
        exhaustive = min(
            (a for a in full if _linear(0.8, ca_slope)(a) >= 0.72 - 1e-12),
            key=lambda a: (_linear(1.0, asr_slope)(a), a),
        )
        assert _linear(1.0, asr_slope)(choice.alpha) == pytest.approx(_linear(1.0, asr_slope)(exhaustive))


def test_infeasible_everywhere_reports_least_damaging_point() -> None:
    alpha = AlphaPolicy(min=1.0, max=3.0)
    curve = Curve(_linear(0.5, -0.1), _linear(1.0, -0.3))
    choice = search_alpha(curve, 0.8, ACCEPT, alpha)
    assert not choice.point.feasible
    assert choice.alpha == 1.0
    assert curve.calls == [1.0, 1.5]


def test_progress_is_reported() -> None:
    seen: list[tuple[str, int, int]] = []
    search_alpha(
        Curve(_linear(0.8, -0.04), _linear(1.0, -0.3)),
        0.8,
        ACCEPT,
        ALPHA,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert seen and all(stage == "alpha search" for stage, _, _ in seen)
    assert [d for _, d, _ in seen] == list(range(1, len(seen) + 1))


def _plateau_curve() -> Curve:
    """An inverted trigger's ASR floors at 0.02 from α 1 on; CA falls slowly (−0.004 per 0.1 α)
    from 0.8, faster past α 2."""
    return Curve(
        lambda a: 0.8 - 0.04 * a - (0.1 * (a - 2.0) if a > 2.0 else 0.0),
        lambda a: max(0.02, 1.0 - a),
    )


def test_extension_moves_along_the_plateau_while_ca_is_within_the_noise() -> None:
    plain = search_alpha(_plateau_curve(), 0.8, ACCEPT, ALPHA)
    assert plain.alpha == 1.0 and plain.extended_from is None  # the plateau's start
    curve = _plateau_curve()
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA, ca_noise=0.025)
    # CA(1.0) = 0.76: every evaluated α with CA >= 0.735 and ASR <= 0.02 qualifies: 1.5 (0.74), not 2.0 (0.72)
    assert choice.extended_from == 1.0 and choice.alpha == 1.5
    assert choice.point.clean_accuracy >= 0.76 - 0.025 and choice.point.attack_success_rate == 0.02
    assert choice.sweep == search_alpha(_plateau_curve(), 0.8, ACCEPT, ALPHA).sweep  # nothing more measured
    tight = search_alpha(_plateau_curve(), 0.8, ACCEPT, ALPHA, ca_noise=0.001)
    assert tight.alpha == 1.0 and tight.extended_from is None  # any CA cost above the noise stops it


def test_extension_stops_at_a_rise_in_asr_and_never_crosses_the_ceiling() -> None:
    # ASR 0.02 on the plateau [1, 1.5], then 0.04 (within the ceiling 0.05, beyond tolerance 0), CA flat
    curve = Curve(lambda a: 0.8, lambda a: 1.0 - a if a < 1.0 else (0.02 if a <= 1.5 else 0.04))
    choice = search_alpha(curve, 0.8, ACCEPT, ALPHA, ca_noise=0.05)
    assert choice.alpha == 1.5 and choice.extended_from == 1.0
    # a choice over the ceiling is not extended (nothing was removed to go on from)
    stuck = Curve(lambda a: 0.8, lambda a: 0.3)
    assert search_alpha(stuck, 0.8, ACCEPT, ALPHA, ca_noise=0.05).extended_from is None


def test_custom_alpha_range() -> None:
    alpha = AlphaPolicy(min=0.0, max=2.0, coarse_step=1.0, fine_step=0.25)
    curve = Curve(_linear(0.8, -0.05), _linear(1.0, -0.4))
    choice = search_alpha(curve, 0.8, ACCEPT, alpha)
    assert curve.calls[:3] == [0.0, 1.0, 2.0]
    assert max(curve.calls) <= 2.0
    assert choice.alpha in curve.calls


def test_trigger_built_from_spec_matches_the_session_trigger(badnet_trigger: Trigger) -> None:
    rebuilt = build_trigger(parse_trigger("badnet"), 28)
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(rebuilt.apply(x), badnet_trigger.apply(x))


def test_best_ca_selection_keeps_the_most_clean_accuracy_under_the_ceiling() -> None:
    # ASR reaches 0.04 at α = 1.8 and 0 at α ≥ 3; CA falls with α. lowest-asr chases ASR 0 (α 3),
    # best-ca takes the smallest α under the 0.05 ceiling (most CA), refined on the fine grid below it.
    curve = Curve(_linear(0.8, -0.02), lambda a: max(0.0, 0.4 - 0.2 * a))
    lowest = search_alpha(curve, 0.8, ACCEPT, ALPHA)
    assert lowest.point.attack_success_rate == 0.0 and lowest.alpha == 2.0
    curve = Curve(_linear(0.8, -0.02), lambda a: max(0.0, 0.4 - 0.2 * a))
    best = search_alpha(curve, 0.8, ACCEPT, AlphaPolicy(select="best-ca"))
    assert best.point.attack_success_rate <= ACCEPT.asr_ceiling
    assert best.alpha == 1.8
    assert best.point.clean_accuracy > lowest.point.clean_accuracy
    assert {1.6, 1.7, 1.8, 1.9} <= set(curve.calls)


def test_asr_tolerance_keeps_clean_accuracy_near_the_lowest_asr() -> None:
    # ASR 0.015 at α = 1 falling to 0.005 at α ≥ 2; CA falls all the way. The strict rule spends CA on a
    # point of ASR; with the default tolerance 0.01 the highest-CA α within 0.01 of the lowest ASR wins.
    def asr(a: float) -> float:
        return 0.9 if a < 1 else max(0.005, 0.015 - 0.01 * (a - 1))

    strict = search_alpha(Curve(_linear(0.8, -0.02), asr), 0.8, ACCEPT, ALPHA)
    assert strict.point.attack_success_rate == pytest.approx(0.005) and strict.alpha == 2.0
    curve = Curve(_linear(0.8, -0.02), asr)
    tolerant = search_alpha(curve, 0.8, ACCEPT, AlphaPolicy())
    assert AlphaPolicy().asr_tolerance == 0.01
    assert tolerant.alpha == 1.0 and tolerant.point.clean_accuracy > strict.point.clean_accuracy
    assert tolerant.point.attack_success_rate <= strict.point.attack_success_rate + 0.01
    assert {0.6, 0.7, 0.8, 0.9} <= set(curve.calls), "refined below the choice, where more CA may qualify"


def test_asr_tolerance_never_crosses_the_ceiling() -> None:
    # the lowest ASR (0.045) is under the 0.05 ceiling; a point at 0.052 is within the tolerance but not chosen
    points = [SweepPoint(0.5, 0.79, 0.052, True), SweepPoint(1.0, 0.75, 0.045, True)]
    assert choose_best(points, "lowest-asr", 0.05, 0.01) == points[1]
    assert choose_best(points, "lowest-asr", 0.05, 0.0) == points[1]
    assert choose_best([SweepPoint(0.5, 0.8, 0.2, False)], "lowest-asr", 0.05, 0.01) is None


# --- accept.reference_rate_ceiling: the verdict's ceiling at the clean reference's rate -------------


def test_reference_ceilings_take_the_larger_of_policy_and_reference_only_when_applied() -> None:
    on = ReferenceCeilings.of("ref", val_rate=0.126, test_rate=0.02, ceiling=0.05, applied=True)
    assert (on.val_ceiling, on.test_ceiling) == (0.126, 0.05)
    assert on.to_json() == {
        "reference": "ref",
        "val_rate": 0.126,
        "test_rate": 0.02,
        "val_ceiling": 0.126,
        "test_ceiling": 0.05,
        "applied": True,
    }
    off = ReferenceCeilings.of("ref", val_rate=0.126, test_rate=0.02, ceiling=0.05, applied=False)
    assert (off.val_ceiling, off.test_ceiling, off.val_rate) == (0.05, 0.05, 0.126)


def test_reference_ceilings_decide_the_verdict_not_alpha(
    victim_dir: Path, test_npz: Path, badnet_trigger: Trigger
) -> None:
    """The same sweep (a zero trigger vector: the backdoor stays at every α) is unremoved under the
    policy's ceiling, under a reference rate below the ASR left, and with the option off; it passes
    only when applied and the reference model's own rate under the trigger is at least the ASR left.
    α is the same in all four."""
    policy = policy_from_dict({"sanitize": {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}}})
    p = prepare(victim_dir, test_npz, policy, "cpu")
    theta = {k: v.clone() for k, v in visual_state(p.clf).items()}
    zero = LearnedVector(TaskVector.between(theta, theta), 0, 0.0)

    def run(ceilings: ReferenceCeilings | None) -> Removal:
        return remove_backdoor(
            p.clf, p.splits, badnet_trigger, 0, policy, learned=zero, inverted=True, ceilings=ceilings
        )

    plain = run(None)
    low = run(ReferenceCeilings.of("ref", 0.2, 0.2, 0.05, applied=True))
    off = run(ReferenceCeilings.of("ref", 1.0, 1.0, 0.05, applied=False))
    high = run(ReferenceCeilings.of("ref", 1.0, 1.0, 0.05, applied=True))
    assert plain.after.attack_success_rate is not None and plain.after.attack_success_rate > 0.5
    assert plain.verdict == low.verdict == off.verdict == "unremoved" and high.verdict == "removed", high.reason
    assert plain.alpha == low.alpha == off.alpha == high.alpha
    assert plain.ceilings is None and high.ceilings is not None and high.ceilings.val_ceiling == 1.0
    assert "0.200, the clean reference model's ASR under the same trigger on this split" in low.reason
    assert "is 1.000; accept.reference_rate_ceiling is off" in off.reason
    assert "clean reference model" not in plain.reason
    assert removal_json(high)["asr_ceilings"]["test_ceiling"] == 1.0 and removal_json(plain)["asr_ceilings"] is None
    for name, value in theta.items():  # the classifier is θ_b again
        assert torch.equal(visual_state(p.clf)[name], value), name


def test_extension_sees_past_an_alpha_whose_asr_is_zero() -> None:
    """An inverted trigger's validation ASR reaches exactly 0 at α 1.0 and CA stays flat to α 2.0, then
    falls. The coarse search used to stop at the first zero (nothing above it measured, so nothing to
    extend to); with extend_past_zero it goes on while the extension could take the next α."""

    def curve() -> Curve:
        return Curve(lambda a: 0.8 if a <= 2.0 else 0.8 - 0.05 * (a - 2.0), lambda a: max(0.0, 1.0 - a))

    stopped = curve()
    old = search_alpha(stopped, 0.8, ACCEPT, AlphaPolicy(asr_tolerance=0.0, extend_past_zero=False), ca_noise=0.01)
    assert old.alpha == 1.0 and old.extended_from is None and max(stopped.calls) == 1.0
    going = curve()
    new = search_alpha(going, 0.8, ACCEPT, ALPHA, ca_noise=0.01)
    # 1.5 and 2.0 keep CA 0.8 and ASR 0; 2.5 (CA 0.775) is below 0.8 - 0.01: the search stops there
    assert new.alpha == 2.0 and new.extended_from == 1.0, new
    assert max(going.calls) == 2.5 and 3.0 not in going.calls
    # without ca_noise (a known trigger: no extension) the search still stops at the first zero
    known = curve()
    assert search_alpha(known, 0.8, ACCEPT, ALPHA).alpha == 1.0 and max(known.calls) == 1.0


def test_extend_past_zero_policy() -> None:
    assert Policy().sanitize.alpha.extend_past_zero is True
    off = policy_from_dict({"sanitize": {"alpha": {"extend_past_zero": False}}})
    assert off.sanitize.alpha.extend_past_zero is False


def test_extend_known_extends_a_known_trigger_as_the_gate_extends_an_inverted_one(
    victim_dir: Path, test_npz: Path, badnet_trigger: Trigger
) -> None:
    """``sanitize.alpha.extend_known`` gives a known trigger the extension ``extend_inverted`` gives an
    inverted one: on the same learned vector, known+extend_known chooses exactly what inverted+
    extend_inverted chooses, and known without it what inverted without extend_inverted chooses. The
    extension never takes a smaller α, never lowers validation CA by more than one standard error and
    never raises ASR above the selection's tolerance or the ceiling."""
    base = {
        "accept": {"ca_floor": 0.85},
        "sanitize": {"reemergence": {"enabled": False}, "disentanglement": {"enabled": False}, "forget_size": 200},
    }
    assert Policy().sanitize.alpha.extend_known is False  # default off: README "How removal works"
    policies = {
        (inv, on): policy_from_dict(
            {
                **base,
                "sanitize": {
                    **base["sanitize"],
                    # one tolerance for both (a known trigger's own, known_asr_tolerance, is tested below)
                    "alpha": {
                        "extend_known": on and not inv,
                        "extend_inverted": on and inv,
                        "known_asr_tolerance": None,
                    },
                },
            }
        )
        for inv in (False, True)
        for on in (False, True)
    }
    p = prepare(victim_dir, test_npz, policies[(False, False)], "cpu")
    learned = learn_on_forget_set(p.clf, p.splits, badnet_trigger, 0, policies[(False, False)])

    def run(inv: bool, on: bool) -> Removal:
        return remove_backdoor(p.clf, p.splits, badnet_trigger, 0, policies[(inv, on)], learned=learned, inverted=inv)

    known_off, known_on, inv_off, inv_on = run(False, False), run(False, True), run(True, False), run(True, True)
    assert known_off.choice is not None and known_on.choice is not None
    assert known_off.choice.extended_from is None
    assert (known_on.alpha, known_on.choice.extended_from) == (
        inv_on.alpha,
        inv_on.choice.extended_from if inv_on.choice else None,
    )
    assert known_off.alpha == inv_off.alpha
    assert known_on.alpha >= known_off.alpha
    if known_on.choice.extended_from is not None:
        start = next(q for q in known_on.choice.sweep if q.alpha == known_on.choice.extended_from)
        ca = known_off.val_before.clean_accuracy
        noise = (ca * (1 - ca) / len(p.splits.val)) ** 0.5
        assert known_on.choice.point.clean_accuracy >= start.clean_accuracy - noise - 1e-9
        assert known_on.choice.point.attack_success_rate <= min(start.attack_success_rate + 0.01, 0.05) + 1e-9


def test_known_asr_tolerance_sets_a_known_triggers_alpha_choice_only(
    victim_dir: Path, test_npz: Path, badnet_trigger: Trigger
) -> None:
    """``sanitize.alpha.known_asr_tolerance`` (default 0 since session 16): a known trigger's α is the strict
    lowest validation ASR within the CA floor (ties: the smaller α), while an inverted trigger keeps
    ``asr_tolerance``; null gives a known trigger ``asr_tolerance`` again. One learned vector, so only the
    choice differs."""
    assert Policy().sanitize.alpha.known_asr_tolerance == 0.0 and Policy().sanitize.alpha.asr_tolerance == 0.01
    assert Policy().sanitize.unlearn.known_epochs == 10  # its companion default (README "Session 16")

    def policy(known_tolerance: float | None) -> Policy:
        return policy_from_dict(
            {
                "accept": {"ca_floor": 0.85},
                "sanitize": {
                    "reemergence": {"enabled": False},
                    "disentanglement": {"enabled": False},
                    "forget_size": 200,
                    "alpha": {"extend_inverted": False, "known_asr_tolerance": known_tolerance, "asr_tolerance": 0.2},
                },
            }
        )

    strict, inherit = policy(0.0), policy(None)
    p = prepare(victim_dir, test_npz, strict, "cpu")
    learned = learn_on_forget_set(p.clf, p.splits, badnet_trigger, 0, strict)

    def choice(pol: Policy, inverted: bool) -> AlphaChoice:
        r = remove_backdoor(p.clf, p.splits, badnet_trigger, 0, pol, learned=learned, inverted=inverted)
        assert r.choice is not None
        return r.choice

    known_strict, known_inherit = choice(strict, False), choice(inherit, False)
    inverted_under_strict, inverted_inherit = choice(strict, True), choice(inherit, True)
    feasible = [q for q in known_strict.sweep if q.feasible]
    lowest = min(feasible, key=lambda q: (q.attack_success_rate, q.alpha))
    assert known_strict.point == lowest
    # the wide tolerance (0.2) takes the highest-CA α near the lowest ASR: a different α on this victim
    assert known_inherit.point == choose_best(list(known_inherit.sweep), "lowest-asr", 0.05, 0.2)
    assert known_inherit.alpha != known_strict.alpha
    # an inverted trigger is not touched by the known trigger's setting
    assert inverted_under_strict.alpha == inverted_inherit.alpha == known_inherit.alpha


def test_inverted_probe_measures_asr_with_the_scaled_trigger_and_leaves_the_forget_set(
    victim_dir: Path, test_npz: Path, badnet_trigger: Trigger
) -> None:
    """``sanitize.alpha.inverted_probe_strength``: a removal with a probe learns τ on the forget set of the
    trigger itself (the same τ as without the probe) while every ASR it reports, chooses α on and judges
    is the scaled trigger's. At 1.0 there is no probe; the default (2.0 since session 19) has one. (Half
    strength here: the session trigger is an opaque patch, and a mask's opacity is clamped at 1, so only a
    weaker probe differs.)"""
    assert Policy().sanitize.alpha.inverted_probe_strength == 2.0
    assert inverted_probe(badnet_trigger, Policy()) is not None
    base = {"accept": {"ca_floor": 0.85}, "sanitize": {**NO_EVIDENCE["sanitize"], "forget_size": 200}}
    plain = policy_from_dict({**base, "sanitize": {**base["sanitize"], "alpha": {"inverted_probe_strength": 1.0}}})
    assert inverted_probe(badnet_trigger, plain) is None
    probed = policy_from_dict({**base, "sanitize": {**base["sanitize"], "alpha": {"inverted_probe_strength": 0.5}}})
    probe = inverted_probe(badnet_trigger, probed)
    assert probe is not None
    p = prepare(victim_dir, test_npz, plain, "cpu")
    without = remove_backdoor(p.clf, p.splits, badnet_trigger, 0, plain, inverted=True)
    with_probe = remove_backdoor(p.clf, p.splits, badnet_trigger, 0, probed, inverted=True, probe=probe)
    assert with_probe.trigger_vector_norm == pytest.approx(without.trigger_vector_norm, rel=1e-6)
    for split, got, other in (
        (p.splits.val, with_probe.val_before, without.val_before),
        (p.splits.test, with_probe.before, without.before),
    ):
        expected = evaluate(p.clf, split, probe, 0, seed=probed.seed).attack_success_rate
        assert got.attack_success_rate == pytest.approx(expected)
        assert got.attack_success_rate != pytest.approx(other.attack_success_rate)
    assert with_probe.choice is not None
    assert with_probe.choice.sweep[0].attack_success_rate == pytest.approx(with_probe.val_before.attack_success_rate)
