"""The benchmark runner end to end on a tiny zoo (real MNIST from ../shared/data, real tiny CLIPs)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import floor_gap
from bench import results as bench_results
from bench import runner as bench_runner
from bench.__main__ import main as bench_main
from bench.datasets import DEFAULT_SHARED
from bench.zoo import load_zoo
from tbar_guard.attacks import Trigger
from tbar_guard.bundle import ClipBundle
from tbar_guard.clip import classifier_for
from tbar_guard.data import ImageSet
from tbar_guard.evaluate import evaluate

TINY = Path(__file__).parent / "data" / "zoo-tiny.yaml"
needs_data = pytest.mark.skipif(not (DEFAULT_SHARED / "mnist").is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    assert bench_main(["run", "--zoo", str(TINY), "--out", str(out), "--cache", str(cache)]) == 0
    return out, cache, json.loads((out / "results.json").read_text())


@needs_data
def test_tiny_zoo_runs_every_defence_on_every_victim(tiny_run: tuple[Path, Path, dict]) -> None:
    _out, _, res = tiny_run
    zoo = load_zoo(TINY)
    by_victim: dict[str, set[str]] = {}
    for r in res["records"]:
        by_victim.setdefault(r["victim"], set()).add(r["defence"])
    assert by_victim["mnist-badnet-t0-s0"] == set(zoo.defences)
    assert by_victim["mnist-clean-s0"] == {"tbar-agnostic", "decree"}  # controls only get the detectors
    victim = next(v for v in res["victims"] if v["name"] == "mnist-badnet-t0-s0")
    assert victim["attack_success_rate"] >= 0.9 and not victim["failed_attack"]  # the planted backdoor works
    assert 0.0 <= victim["clean_control_asr"] < 0.2  # the clean control does not obey the trigger
    for r in res["records"]:
        if "ca_kept" in r:
            assert 0.0 <= r["ca_after"] <= 1.0 and 0.0 <= r["asr_after"] <= 1.0
            assert r["data_used"] > 0 and r["seconds"] > 0
    for defence in ("tbar-known", "tbar-unlearn-known"):
        known = next(r for r in res["records"] if r["defence"] == defence)
        assert known["asr_after"] < known["asr_before"]
        assert known["alpha_sweep"] and known["alpha"] is not None
    decree = next(r for r in res["records"] if r["defence"] == "decree" and r["attack"])
    assert 0.0 < decree["pl1"] < 1.0 and decree["reference_pl1"] > 0
    assert res["machine"]["commit"] and res["foundation"]["zero_shot_ca"]["mnist"] > 0.2


@needs_data
def test_tiny_zoo_writes_tables_and_plots_from_the_records(tiny_run: tuple[Path, Path, dict]) -> None:
    out, _, res = tiny_run
    md = (out / "RESULTS.md").read_text()
    assert f"Command: `{res['command']}`" in md
    assert res["machine"]["commit"] in md
    victim = next(v for v in res["victims"] if v["name"] == "mnist-badnet-t0-s0")
    assert (
        f"| mnist-badnet-t0-s0 | {100 * victim['clean_accuracy']:.1f} | {100 * victim['attack_success_rate']:.1f} |"
        in md
    )
    for heading in ("## Headline", "## Targets", "## Detection", "## Every removal record"):
        assert heading in md
    for png in ("ca_vs_asr.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_data
def test_a_second_run_resumes_from_the_cache(tiny_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _out, cache, res = tiny_run
    records = sorted((cache / "records").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in records}
    assert bench_main(["run", "--zoo", str(TINY), "--out", str(tmp_path / "again"), "--cache", str(cache)]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in records} == stamps  # nothing was recomputed
    assert [(r["victim"], r["defence"], r.get("asr_after")) for r in again["records"]] == [
        (r["victim"], r["defence"], r.get("asr_after")) for r in res["records"]
    ]
    assert again["wall_seconds"] < res["wall_seconds"]


def _untimed(obj: object) -> object:
    """A record without its wall-clock fields (the only part that may differ between two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not k.endswith("seconds") and k != "commit"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@needs_data
def test_parallel_jobs_compute_the_records_of_a_one_process_run(
    tiny_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    _out, cache, _res = tiny_run
    runs = {}
    for jobs in ("1", "2"):
        c = tmp_path / f"cache-{jobs}"  # the foundation and decoded data: victims and records are built
        shutil.copytree(cache / "models", c / "models", ignore=shutil.ignore_patterns("victim-*", "base-*"))
        shutil.copytree(cache / "data", c / "data")
        out = tmp_path / f"out-{jobs}"
        args = ["run", "--zoo", str(TINY), "--out", str(out), "--cache", str(c), "--threads", "1", "--jobs", jobs]
        assert bench_main([*args, "--defences", "tbar-unlearn-known", "tbar-agnostic", "decree"]) == 0
        runs[jobs] = json.loads((out / "results.json").read_text())
        assert len(list((c / "records").glob("mnist-*-*.json"))) == 5  # 2 victims: 3 + 2 (control) records
    one, two = runs["1"], runs["2"]
    assert two["parallel"]["jobs"] == 2 and two["parallel"]["worker_threads"] == 1 and "parallel" not in one
    assert [(r["victim"], r["defence"]) for r in two["records"]] == [
        (r["victim"], r["defence"]) for r in one["records"]
    ]
    assert _untimed(two["records"]) == _untimed(one["records"])  # bit-identical numbers, same thread count
    assert [v["sha256"] for v in two["victims"]] == [v["sha256"] for v in one["victims"]]  # same victims built
    assert not two["from_cache"] and not two["missing"]
    assert "with `--jobs 2`" in (tmp_path / "out-2" / "RESULTS.md").read_text()
    assert "with `--jobs" not in (tmp_path / "out-1" / "RESULTS.md").read_text()


@needs_data
def test_parallel_slice_has_its_clean_controls_built_by_the_workers(
    tiny_run: tuple[Path, Path, dict], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--only badnet`` leaves the clean control out of the slice; its clean-control ASR still needs it, and
    the workers build it with the victims (before, the main process built it alone after them)."""
    _out, cache, _res = tiny_run
    c = tmp_path / "cache"
    shutil.copytree(cache / "models", c / "models", ignore=shutil.ignore_patterns("victim-*", "base-*"))
    shutil.copytree(cache / "data", c / "data")
    args = ["run", "--zoo", str(TINY), "--out", str(tmp_path / "out"), "--cache", str(c), "--threads", "1"]
    assert bench_main([*args, "--jobs", "2", "--only", "badnet", "--defences", "decree"]) == 0
    printed = capfd.readouterr().out
    (control,) = [v.name for v in load_zoo(TINY).victims if v.attack is None]
    ready = printed.index("zoo ready")
    assert f"{control}: victim ready in" in printed[:ready], printed
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [v["name"] for v in res["victims"] if v["attack"]] and all(
        v["clean_control_asr"] is not None for v in res["victims"] if v["attack"]
    ), res["victims"]


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    assert bench_main(["run", "--zoo", str(TINY), "--out", str(tmp_path), "--jobs", "0"]) == 2


def test_zoo_file_errors_name_the_bad_entry(tmp_path: Path) -> None:
    text = TINY.read_text().replace("attacks: [badnet]", "attacks: [badnett]")
    bad = tmp_path / "zoo.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match="badnett"):
        load_zoo(bad)


def test_failed_attacks_setting_is_validated(tmp_path: Path) -> None:
    assert load_zoo(TINY).failed_attacks == "defend"
    bad = tmp_path / "zoo.yaml"
    bad.write_text(TINY.read_text() + "failed_attacks: skip\n")
    with pytest.raises(ValueError, match="failed_attacks must be 'defend' or 'detect-only', got 'skip'"):
        load_zoo(bad)


def test_tradeoff_reads_both_views_of_the_alpha_curve() -> None:
    sweep = [
        {"alpha": 0.0, "clean_accuracy": 0.80, "attack_success_rate": 0.95},
        {"alpha": 1.0, "clean_accuracy": 0.78, "attack_success_rate": 0.30},
        {"alpha": 2.0, "clean_accuracy": 0.70, "attack_success_rate": 0.01},
        {"alpha": 3.0, "clean_accuracy": 0.60, "attack_success_rate": 0.00},
    ]
    kept_at_low_asr, asr_at_high_kept = bench_results.tradeoff(sweep, 0.80)
    assert kept_at_low_asr == pytest.approx(0.70 / 0.80)
    assert asr_at_high_kept == pytest.approx(0.30)
    assert bench_results.tradeoff([], 0.8) == (None, None)
    low, keep = bench_results.tradeoff_points(sweep, 0.80)
    assert low == (pytest.approx(0.70 / 0.80), 2.0) and keep == (pytest.approx(0.30), 1.0)


def test_true_curve_table_reads_the_agnostic_sweep_under_the_true_trigger() -> None:
    curve = [
        {"alpha": 0.0, "clean_accuracy": 0.60, "attack_success_rate": 0.92},
        {"alpha": 1.0, "clean_accuracy": 0.60, "attack_success_rate": 0.10},
        {"alpha": 1.5, "clean_accuracy": 0.59, "attack_success_rate": 0.015},
        {"alpha": 2.0, "clean_accuracy": 0.50, "attack_success_rate": 0.0},
    ]
    rec = {"victim": "v", "defence": "tbar-unlearn-agnostic", "alpha": 1.0, "ca_before": 0.60, "true_curve": curve}
    lines = bench_results.true_curve_table([rec, {"victim": "w", "defence": "decree"}])
    row = next(line for line in lines if line.startswith("| v |"))
    # chosen α 1.0 leaves 10% true ASR; α 1.5 would reach 1.5% keeping 0.983 of CA; α 2.0 falls under 0.95
    assert row.startswith("| v | tbar-unlearn-agnostic | 1.0 (10.0) | 0.983 (1.5) | 1.5 (1.5) | 0: 1.000 / 92.0,")
    assert not any(line.startswith("| w |") for line in lines)
    assert bench_results.true_curve_table([{"victim": "w", "defence": "decree"}]) == []


@pytest.mark.slow
@needs_data
def test_quick_zoo_smallest_slice_end_to_end(tmp_path: Path) -> None:
    args = ["run", "--quick", "--only", "cifar10-badnet", "--defences", "tbar-known", "decree"]
    assert bench_main([*args, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["defence"] for r in res["records"]} == {"tbar-known", "decree"}
    assert res["victims"][0]["name"] == "cifar10-badnet-t1-s0"


@needs_data
def test_from_cache_computes_nothing_and_lists_what_is_missing(
    tiny_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    _out, cache, res = tiny_run
    dropped = next((cache / "records").glob("mnist-badnet-t0-s0-cleanclip-*.json"))
    saved = dropped.read_bytes()
    dropped.unlink()
    try:
        before = sorted(p.name for p in (cache / "records").iterdir())
        args = ["run", "--zoo", str(TINY), "--out", str(tmp_path / "o"), "--cache", str(cache), "--from-cache"]
        assert bench_main(args) == 0
        assert sorted(p.name for p in (cache / "records").iterdir()) == before  # nothing was computed
        partial = json.loads((tmp_path / "o" / "results.json").read_text())
        assert partial["missing"] == ["mnist-badnet-t0-s0 x cleanclip"]
        assert len(partial["records"]) == len(res["records"]) - 1
        assert "## Not run" in (tmp_path / "o" / "RESULTS.md").read_text()
    finally:
        dropped.write_bytes(saved)
    with pytest.raises(FileNotFoundError, match="no cached foundation"):
        bench_main(
            ["run", "--zoo", str(TINY), "--out", str(tmp_path / "e"), "--cache", str(tmp_path / "c"), "--from-cache"]
        )


def test_the_default_gate_defence_spells_out_the_product_default() -> None:
    """`tbar-unlearn-agnostic` is the gate as the product runs it by default; its options are spelled
    out (they are part of its record key), so they must be the product's defaults."""
    from bench.runner import AGNOSTIC_EXTRA
    from tbar_guard.policy import Policy, policy_from_dict

    spelled = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic"])
    assert spelled.detect.differential == Policy().detect.differential
    assert spelled.sanitize.unlearn == Policy().sanitize.unlearn
    assert spelled.sanitize.alpha == Policy().sanitize.alpha
    assert spelled.accept == Policy().accept
    # the opt-in verdict ceiling at the reference's rate: the default gate but for that one option
    refceil = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-refceil"])
    assert refceil.accept.reference_rate_ceiling and not Policy().accept.reference_rate_ceiling
    # the variants measured before session 19 keep the inverted-trigger probe at 1x (the default is 2x since)
    assert spelled.sanitize.alpha.inverted_probe_strength == 2.0
    before_19 = spelled.sanitize.model_copy(
        update={"alpha": spelled.sanitize.alpha.model_copy(update={"inverted_probe_strength": 1.0})}
    )
    assert refceil.sanitize == before_19
    # session 14's relative rule is the default; the variants measured before it spell it off, and the
    # session-13 gate differs from the default by that one option
    assert spelled.detect.differential.additive.relative_ratio == 0.2
    assert refceil.detect.differential.additive.relative_ratio is None
    s13 = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-s13"])
    assert s13.detect.differential.additive.relative_ratio is None and s13.sanitize == before_19
    s13_additive = s13.detect.differential.additive.model_dump() | {"relative_ratio": 0.2}
    assert s13_additive == spelled.detect.differential.additive.model_dump()
    relative = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-relative"])
    assert (relative.detect, relative.sanitize) == (spelled.detect, spelled.sanitize)
    previous = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-s18"])
    assert (previous.detect, previous.sanitize) == (spelled.detect, before_19)
    probe2 = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-probe2"])
    assert (probe2.detect, probe2.sanitize) == (spelled.detect, spelled.sanitize)
    older = policy_from_dict(AGNOSTIC_EXTRA["tbar-unlearn-agnostic-signal"])
    assert older.detect.differential != Policy().detect.differential  # session 6's rule: not the default


def test_scan_table_rereads_the_mask_family_under_the_ratio_rule() -> None:
    """The session-7 row re-reads a recorded mask family as "< ratio x the median" (z off), with the
    transfer check, and judges the target by the class the trigger hits."""
    fam = {"flagged": True, "area_flagged": True, "target": 8, "target_correct": False, "ratio": 0.55}
    victim = {"attack": "blended", "target": 5, "families": {"mask": {**fam, "hit_class": 5, "transfer_ratio": 0.1}}}
    assert bench_results._decision(victim, "mask", True, 0.6)[:2] == (True, True)
    assert bench_results._decision(victim, "mask", True)[:2] == (True, False)  # as recorded: the searched class
    assert bench_results._decision(victim, "mask", True, 0.5)[0] is False
    moves_reference = {
        "attack": None,
        "target": None,
        "families": {"mask": {**fam, "hit_class": 2, "transfer_ratio": 0.6}},
    }
    assert bench_results._decision(moves_reference, "mask", True, 0.6)[0] is False
    assert bench_results._decision(moves_reference, "mask", False, 0.6)[0] is True


def test_true_curve_rebuilds_the_removal_direction_from_the_shipped_model(
    badnet_victim: ClipBundle, clean_twin: ClipBundle, test_images: ImageSet, badnet_trigger: Trigger
) -> None:
    """The audit curve walks θ_b + (α / α*)(θ_s − θ_b): at α = 0 it is the victim, at α* the shipped
    model (here the "shipped" model is the clean twin, as if shipped at α* = 2)."""
    images = test_images.subset(torch.arange(0, 300))
    curve = bench_runner.true_curve(badnet_victim, clean_twin, 2.0, [0.0, 1.0, 2.0], images, badnet_trigger, 0, 0)
    victim = evaluate(classifier_for(badnet_victim), images, badnet_trigger, 0)
    shipped = evaluate(classifier_for(clean_twin), images, badnet_trigger, 0)
    assert [p["alpha"] for p in curve] == [0.0, 1.0, 2.0]
    assert curve[0]["attack_success_rate"] == pytest.approx(victim.attack_success_rate, abs=1e-6)
    assert curve[2]["attack_success_rate"] == pytest.approx(shipped.attack_success_rate, abs=0.01)
    assert curve[2]["clean_accuracy"] == pytest.approx(shipped.clean_accuracy, abs=0.01)
    assert victim.attack_success_rate is not None and shipped.attack_success_rate is not None
    assert victim.attack_success_rate > 0.8 > shipped.attack_success_rate + 0.5  # the two ends differ


def test_floor_gap_compares_validation_and_test_kept_at_the_chosen_alpha() -> None:
    def record(victim: str, verdict: str, alpha: float, val_ca: float, test_kept: float) -> dict[str, object]:
        sweep = [{"alpha": 0.0, "clean_accuracy": 0.6}, {"alpha": alpha, "clean_accuracy": val_ca}]
        return {"victim": victim, "defence": "tbar-unlearn-known", "verdict": verdict, "alpha": alpha,
                "alpha_sweep": sweep, "ca_kept": test_kept}  # fmt: skip

    results = {
        "records": [
            record("a", "removed", 2.0, 0.576, 0.90),  # validation 0.96 passes the floor, test 0.90 does not
            record("b", "removed", 1.0, 0.594, 1.00),  # validation 0.99, test 1.00
            record("c", "unremoved", 1.0, 0.3, 0.5),  # shipped nothing: not counted
            {"victim": "d", "defence": "decree", "verdict": "removed"},  # no sweep: not a TBAR record
        ]
    }
    rows = floor_gap.gaps(results)
    assert [r["victim"] for r in rows] == ["a", "b"]
    assert rows[0]["val_kept"] == pytest.approx(0.96) and rows[0]["gap"] == pytest.approx(0.06)
    assert rows[1]["gap"] == pytest.approx(-0.01)
    md = floor_gap.markdown(rows, 0.95)
    assert md.startswith("2 shipped TBAR records") and "while validation passed it: 1" in md
    assert md.index("| a |") < md.index("| b |")  # largest gap first
    assert floor_gap.markdown([], 0.95).startswith("no shipped")


def test_promoted_reference_is_another_clean_control_of_the_task_and_part_of_the_key(tmp_path: Path) -> None:
    """scan-default-promoted stands a clean fine-tune of the task in for the promoted version: the first
    clean control of the victim's task, the second for that control itself; which one is part of the
    record key, and the base-model scans' keys do not depend on it."""
    zoo = load_zoo(Path(__file__).parents[1] / "bench" / "zoo.yaml")
    by_name = {v.name: v for v in zoo.victims}
    pick = bench_runner.promoted_reference
    ref = pick(zoo, by_name["cifar10-sig-t1-s0"])
    assert ref is not None and ref.name == "cifar10-clean-s0"
    first = pick(zoo, by_name["cifar10-clean-s0"])
    assert first is not None and first.name == "cifar10-clean-s1"
    gtsrb = pick(zoo, by_name["gtsrb-badnet-t1-s0"])
    assert gtsrb is not None and gtsrb.name == "gtsrb-clean-s0"
    path = bench_runner.record_path(tmp_path, zoo, by_name["cifar10-sig-t1-s0"], "scan-default-promoted")
    other = dataclasses.replace(zoo, victims=tuple(v for v in zoo.victims if v.name != "cifar10-clean-s0"))
    assert bench_runner.record_path(tmp_path, other, by_name["cifar10-sig-t1-s0"], "scan-default-promoted") != path
    base = "scan-differential-separable-ee"
    assert bench_runner.record_path(tmp_path, other, by_name["cifar10-sig-t1-s0"], base) == bench_runner.record_path(
        tmp_path, zoo, by_name["cifar10-sig-t1-s0"], base
    )
    assert bench_runner.PROMOTED_SCANS["scan-default-promoted"]["detect"]["differential"] == bench_runner.DEFAULT_DETECT
    assert "scan-default-promoted" in bench_runner.SCAN_ONLY


def test_sigterm_during_a_parallel_run_terminates_its_workers() -> None:
    """``run_parallel``'s pool sits inside ``_sigterm_interrupts``: a SIGTERM to the main process becomes
    KeyboardInterrupt, the pool's ``with`` terminates its workers, and the previous handler is back after."""
    import multiprocessing
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(KeyboardInterrupt, match="signal"), bench_runner._sigterm_interrupts(), ctx.Pool(2) as pool:
        pending = pool.map_async(time.sleep, [30.0, 30.0])
        workers = list(multiprocessing.active_children())
        assert len(workers) == 2
        os.kill(os.getpid(), signal.SIGTERM)
        pending.wait(30)  # interrupted by the handler long before
    assert signal.getsignal(signal.SIGTERM) is before
    for w in workers:
        w.join(10)
        assert not w.is_alive(), w
