"""The YAML policy: defaults, the shipped default file, and errors that list every bad key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tbar_guard.attacks import BadNetSpec
from tbar_guard.cli import app
from tbar_guard.errors import PolicyError, UsageError
from tbar_guard.exit_codes import ExitCode
from tbar_guard.policy import DEFAULT_POLICY_YAML, Policy, load_policy, policy_from_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "policies" / "default.yaml"
runner = CliRunner()


def _problems(raw: object) -> tuple[str, ...]:
    with pytest.raises(PolicyError) as info:
        policy_from_dict(raw)
    return info.value.problems


def _paths(problems: tuple[str, ...]) -> list[str]:
    return [p.split(":", 1)[0] for p in problems]


# --- defaults -----------------------------------------------------------------------------------


def test_defaults() -> None:
    p = Policy()
    assert p.version == 1 and p.seed == 0 and p.device == "auto"
    assert (p.data.forget_fraction, p.data.val_fraction, p.data.test_fraction) == (0.4, 0.3, 0.3)
    assert p.data.path is None
    assert p.sanitize.method == "unlearn" and p.sanitize.unlearn.anchor_weight == 3.0 and p.sanitize.unlearn.clean_twins
    assert p.sanitize.alpha.select == "lowest-asr" and p.sanitize.alpha.asr_tolerance == 0.01
    assert p.sanitize.forget_size == 1000
    assert p.sanitize.finetune.lr == 1e-4 and p.sanitize.finetune.epochs == 5
    assert (p.sanitize.alpha.min, p.sanitize.alpha.max) == (0.0, 6.0)
    assert (p.sanitize.alpha.coarse_step, p.sanitize.alpha.fine_step) == (0.5, 0.1)
    assert p.accept.ca_floor == 0.95 and p.accept.asr_ceiling == 0.05
    assert p.detect.reference_models == ()
    assert p.trigger is None and p.target is None
    assert policy_from_dict(None) == p
    assert policy_from_dict({}) == p


def test_policy_is_frozen() -> None:
    p = Policy()
    with pytest.raises(Exception, match="frozen"):
        p.seed = 3  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        p.accept.ca_floor = 0.5  # type: ignore[misc]


def test_load_policy_none_gives_defaults() -> None:
    assert load_policy(None) == Policy()


def test_default_file_matches_init_policy_byte_for_byte() -> None:
    result = runner.invoke(app, ["init-policy"])
    assert result.exit_code == 0, result.output
    assert result.stdout == DEFAULT_FILE.read_text(encoding="utf-8")
    assert result.stdout.encode() == DEFAULT_FILE.read_bytes()
    assert DEFAULT_POLICY_YAML.encode() == DEFAULT_FILE.read_bytes()


def test_default_file_parses_to_defaults() -> None:
    assert policy_from_dict(yaml.safe_load(DEFAULT_FILE.read_text(encoding="utf-8"))) == Policy()
    assert load_policy(DEFAULT_FILE) == Policy()


def test_default_file_lists_every_key() -> None:
    """Every field of the policy appears in the commented default (nothing hidden)."""
    raw = yaml.safe_load(DEFAULT_FILE.read_text(encoding="utf-8"))

    def keys(d: dict[str, object], prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
        return out

    assert keys(raw) == keys(Policy().to_json())


def test_init_policy_writes_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    assert runner.invoke(app, ["init-policy", str(out)]).exit_code == 0
    assert out.read_bytes() == DEFAULT_FILE.read_bytes()
    out.write_text("seed: 3\n")
    again = runner.invoke(app, ["init-policy", str(out)])
    assert again.exit_code == ExitCode.USAGE
    assert out.read_text() == "seed: 3\n"
    assert runner.invoke(app, ["init-policy", str(out), "--force"]).exit_code == 0
    assert out.read_bytes() == DEFAULT_FILE.read_bytes()


# --- validation ---------------------------------------------------------------------------------


def test_unknown_key() -> None:
    assert _paths(_problems({"accept": {"ca_flor": 0.9}})) == ["accept.ca_flor"]
    assert _paths(_problems({"sanitise": {}})) == ["sanitise"]


def test_wrong_type() -> None:
    problems = _problems({"seed": "abc", "sanitize": {"finetune": {"epochs": "many"}}})
    assert _paths(problems) == ["seed", "sanitize.finetune.epochs"]
    assert "'abc'" in problems[0], "the bad value is shown"


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2])
def test_ca_floor_outside_unit_interval(value: float) -> None:
    assert _paths(_problems({"accept": {"ca_floor": value}})) == ["accept.ca_floor"]


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-6])
def test_ca_floor_inside_unit_interval(value: float) -> None:
    assert policy_from_dict({"accept": {"ca_floor": value}}).accept.ca_floor == value


def test_negative_or_zero_forget_size() -> None:
    assert _paths(_problems({"sanitize": {"forget_size": -5}})) == ["sanitize.forget_size"]
    assert _paths(_problems({"sanitize": {"forget_size": 0}})) == ["sanitize.forget_size"]


@pytest.mark.parametrize(
    "alpha", [{"min": 2.0, "max": 1.0}, {"min": 1.0, "max": 1.0}, {"fine_step": 1.0, "coarse_step": 0.5}]
)
def test_empty_alpha_range_or_bad_steps(alpha: dict[str, float]) -> None:
    problems = _problems({"sanitize": {"alpha": alpha}})
    assert _paths(problems) == ["sanitize.alpha"]


def test_evidence_defaults_and_ranges() -> None:
    p = Policy()
    r, d = p.sanitize.reemergence, p.sanitize.disentanglement
    assert (r.enabled, r.images, r.lr, r.epochs, r.batch_size) == (True, 1000, 1e-4, 5, 64)
    assert (d.enabled, d.images, d.alphas_clean, d.trigger_fractions) == (True, 512, (0.0, 0.5, 1.0), (1.0, 0.5, 0.0))
    assert p.accept.max_reemergence_asr is None
    bad = {
        "sanitize": {
            "reemergence": {"images": 0, "lr": 0, "epochs": 0, "batch_size": 0, "enabled": "sometimes"},
            "disentanglement": {"images": 0, "alphas_clean": [], "trigger_fractions": [1.0, 3.0]},
        },
        "accept": {"max_reemergence_asr": 1.5},
    }
    assert sorted(_paths(_problems(bad))) == sorted(
        [
            "accept.max_reemergence_asr",
            "sanitize.disentanglement.alphas_clean",
            "sanitize.disentanglement.images",
            "sanitize.disentanglement.trigger_fractions.1",
            "sanitize.reemergence.batch_size",
            "sanitize.reemergence.enabled",
            "sanitize.reemergence.epochs",
            "sanitize.reemergence.images",
            "sanitize.reemergence.lr",
        ]
    )
    ok = policy_from_dict({"accept": {"max_reemergence_asr": 0.2}, "sanitize": {"reemergence": {"images": 50}}})
    assert ok.accept.max_reemergence_asr == 0.2 and ok.sanitize.reemergence.images == 50


def test_disentanglement_grid_must_include_the_chosen_alpha() -> None:
    problems = _problems({"sanitize": {"disentanglement": {"trigger_fractions": [0.5, 0.0]}}})
    assert _paths(problems) == ["sanitize.disentanglement"] and "lack 1.0" in problems[0]


def test_reemergence_limit_needs_the_measurement() -> None:
    problems = _problems({"accept": {"max_reemergence_asr": 0.1}, "sanitize": {"reemergence": {"enabled": False}}})
    assert _paths(problems) == ["(top level)"] and "would not be measured" in problems[0]
    assert not policy_from_dict({"sanitize": {"reemergence": {"enabled": False}}}).sanitize.reemergence.enabled


def test_fractions_summing_over_one() -> None:
    problems = _problems({"data": {"forget_fraction": 0.5, "val_fraction": 0.4, "test_fraction": 0.3}})
    assert _paths(problems) == ["data"]
    assert "exceeds 1" in problems[0]
    ok = policy_from_dict({"data": {"forget_fraction": 0.5, "val_fraction": 0.25, "test_fraction": 0.25}})
    assert ok.data.forget_fraction == 0.5


def test_every_bad_key_path_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "seed: abc\naccept:\n  ca_floor: 1.5\nsanitize:\n  forget_size: -1\n  unknown_option: true\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert sorted(_paths(err.problems)) == sorted(
        ["seed", "accept.ca_floor", "sanitize.forget_size", "sanitize.unknown_option"]
    )
    text = str(err)
    for key_path in ("seed", "accept.ca_floor", "sanitize.forget_size", "sanitize.unknown_option"):
        assert key_path in text
    assert str(path) in err.message
    assert "4 problem" in err.message
    assert err.exit_code == ExitCode.USAGE == 4
    assert isinstance(err, UsageError)


def test_errors_in_nested_sections_and_trigger_are_listed_together() -> None:
    problems = _problems(
        {
            "device": "tpu",
            "data": {"forget_fraction": 0.6, "val_fraction": 0.3, "test_fraction": 0.3},
            "sanitize": {"alpha": {"min": 3, "max": 1}, "method": "magic"},
            "trigger": {"kind": "badnet", "size": 0},
        }
    )
    assert set(_paths(problems)) == {"device", "data", "sanitize.alpha", "sanitize.method", "trigger.badnet.size"}


def test_trigger_and_target_in_policy() -> None:
    p = policy_from_dict({"trigger": {"kind": "badnet", "size": 4}, "target": "the digit zero"})
    assert p.trigger == BadNetSpec(size=4)
    assert p.target == "the digit zero"


def test_non_mapping_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="mapping"):
        policy_from_dict(["seed", 1])
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="mapping"):
        load_policy(path)


def test_unreadable_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)


def test_empty_policy_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_policy(path) == Policy()


def test_relative_data_path_resolves_against_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.yaml"
    path.write_text("data:\n  path: ../images\n")
    assert load_policy(path).data.path == str((tmp_path / "images").resolve())
    path.write_text(f"data:\n  path: {tmp_path / 'abs'}\n")
    assert load_policy(path).data.path == str(tmp_path / "abs")


# --- sha256 -------------------------------------------------------------------------------------


def test_sha256_is_stable() -> None:
    a = Policy().sha256()
    assert a == Policy().sha256() == load_policy(DEFAULT_FILE).sha256()
    assert len(a) == 64 and int(a, 16) >= 0
    # key order in the YAML does not matter
    one = policy_from_dict({"seed": 1, "accept": {"asr_ceiling": 0.1, "ca_floor": 0.9}})
    two = policy_from_dict({"accept": {"ca_floor": 0.9, "asr_ceiling": 0.1}, "seed": 1})
    assert one.sha256() == two.sha256()
    # spelling out a default does not change the hash
    assert policy_from_dict({"accept": {"ca_floor": 0.95}}).sha256() == a


def test_sha256_is_stable_across_processes() -> None:
    code = "from tbar_guard.policy import Policy; print(Policy().sha256())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == Policy().sha256()


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"accept": {"ca_floor": 0.9}},
        {"sanitize": {"alpha": {"max": 5.0}}},
        {"sanitize": {"method": "tbar"}},
        {"sanitize": {"unlearn": {"anchor_weight": 1.0}}},
        {"sanitize": {"unlearn": {"clean_twins": False}}},
        {"sanitize": {"alpha": {"asr_tolerance": 0.0}}},
        {"sanitize": {"reemergence": {"epochs": 2}}},
        {"sanitize": {"disentanglement": {"enabled": False}}},
        {"accept": {"max_reemergence_asr": 0.1}},
        {"trigger": {"kind": "badnet"}},
        {"target": "0"},
    ],
)
def test_sha256_changes_when_a_value_changes(change: dict[str, object]) -> None:
    assert policy_from_dict(change).sha256() != Policy().sha256()


def test_default_families_and_mask_rule() -> None:
    d = Policy().detect.differential
    assert d.families == ("mask", "additive")
    assert d.search_all is False  # the families after the first that fired are not run
    assert (d.z_threshold, d.area_ratio) == (None, 0.6)
    assert (d.additive.shape, d.additive.equal_effect, d.additive.ratio) == ("separable", 0.9, 0.45)
    u = Policy().sanitize.unlearn  # the re-inversion rounds test one class chosen beforehand: z stays on
    assert (u.reinvert_z_threshold, u.reinvert_area_ratio) == (-2.5, 0.5)


def test_mask_family_needs_some_rule() -> None:
    problems = _problems({"detect": {"differential": {"z_threshold": None, "area_ratio": 0}}})
    assert any("mask family could never flag" in p for p in problems), problems
    ok = policy_from_dict({"detect": {"differential": {"z_threshold": -2.5, "area_ratio": 0}}})
    assert ok.detect.differential.z_threshold == -2.5


def test_mask_only_policy_is_the_default_less_the_additive_family() -> None:
    p = load_policy(REPO / "policies" / "mask-only.yaml")
    assert p.detect.differential.families == ("mask",)
    changed = p.model_copy(update={"detect": Policy().detect})
    assert changed == Policy()  # nothing else differs from the default
