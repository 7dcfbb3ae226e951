"""The benchmark run: build the zoo, defend every victim with every defence, write the tables.

One record per victim × defence, cached as JSON under ``CACHE/records`` keyed by the victim's and
the defence's configuration, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import datasets, defences
from bench.zoo import VictimSpec, Zoo, ZooSpec, key_of, load_zoo
from tbar_guard import __version__, detect
from tbar_guard.attacks import Trigger, build_trigger, spec_to_dict
from tbar_guard.bundle import ClipBundle, load_bundle
from tbar_guard.clip import classifier_for, visual_state
from tbar_guard.data import ImageSet, Splits, split
from tbar_guard.evaluate import evaluate
from tbar_guard.gate import gate, scan
from tbar_guard.pipeline import sanitize
from tbar_guard.policy import Policy, policy_from_dict
from tbar_guard.reemerge import ReemergenceConfig, measure_reemergence
from tbar_guard.task_vector import TaskVector

Log = Callable[[str], None]

# removal defences -> the policy's sanitize.method they run (names are cache keys: never re-map one)
KNOWN_METHODS = {
    "tbar-known": "anchored",
    "tbar-plain-known": "tbar",
    "tbar-unlearn-known": "unlearn",
    "tbar-unlearn-known-extend": "unlearn",
    "tbar-unlearn-known-strengths": "unlearn",
    "tbar-unlearn-known-10ep": "unlearn",
    "tbar-unlearn-known-lr3": "unlearn",
    "tbar-unlearn-known-strict": "unlearn",
    "tbar-unlearn-known-10ep-strict": "unlearn",
    "tbar-unlearn-known-s15": "unlearn",
}
# Known-trigger defences: what differs from the zoo policy, spelled out (part of their record key, so a
# change of the product defaults never passes a cached record off as the new default's).
# The known trigger's removal of sessions 1-15: unlearning for finetune.epochs (5), α within asr_tolerance (0.01)
# of the lowest validation ASR. Every variant measured before session 16 ran on it.
KNOWN_S15: dict[str, Any] = {"sanitize": {"unlearn": {"known_epochs": None}, "alpha": {"known_asr_tolerance": None}}}
# Since session 16 (chosen on the development zoo: bench/results/strict-s16/dev): unlearning 10 epochs and the
# strict lowest validation ASR within the CA floor (measured as tbar-unlearn-known-10ep-strict, which also ran
# the disentanglement evidence's clean vector for 10 epochs; the α choice is the same computation).
KNOWN_ALPHA: dict[str, Any] = {"known_asr_tolerance": 0.0}
KNOWN_DEFAULT: dict[str, Any] = {"sanitize": {"unlearn": {"known_epochs": 10}, "alpha": KNOWN_ALPHA}}


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


KNOWN_EXTRA: dict[str, dict[str, Any]] = {
    "tbar-unlearn-known": KNOWN_DEFAULT,
    # the anchored and plain methods follow the product's known-trigger α choice (known_epochs is unlearn's only)
    "tbar-known": {"sanitize": {"alpha": KNOWN_ALPHA}},
    "tbar-plain-known": {"sanitize": {"alpha": KNOWN_ALPHA}},
    "tbar-unlearn-known-s15": KNOWN_S15,
    # Session 15, measurement: the α of the known trigger's ASR floor extended as the gate's is
    # (sanitize.alpha.extend_known: larger α while validation CA stays within one standard error).
    "tbar-unlearn-known-extend": _deep_update(
        KNOWN_S15, {"sanitize": {"alpha": {"extend_known": True, "extend_past_zero": True}}}
    ),
    # session 15, measurement: the forget set's stamped images at 0.5, 1 and 1.5 x the trigger's strength
    # (sanitize.unlearn.known_strengths), so that unlearning reaches the backdoor's response to weaker and
    # stronger versions of its trigger, not only the one it was handed
    "tbar-unlearn-known-strengths": _deep_update(
        KNOWN_S15, {"sanitize": {"unlearn": {"known_strengths": [0.5, 1.0, 1.5]}}}
    ),
    # session 15, measurement: the unlearning fine-tune run longer / harder (the default: lr 1e-4, 5 epochs),
    # so that theta_u itself, not an extrapolation past it, reaches the ASR floor
    "tbar-unlearn-known-10ep": _deep_update(KNOWN_S15, {"sanitize": {"finetune": {"epochs": 10}}}),
    "tbar-unlearn-known-lr3": _deep_update(KNOWN_S15, {"sanitize": {"finetune": {"lr": 0.0003}}}),
    # session 16, measurement: α by the strict lowest validation ASR within the CA floor (asr_tolerance 0; the
    # default took the highest-CA α within 0.01 of it), alone and with 10 epochs: a known trigger's removal kept
    # CA kept near 1.0 while the test ASR sat at 2-3%, so the tolerance spent the ASR target on CA
    # the policy does not ask for. -10ep-strict became the default (KNOWN_DEFAULT).
    "tbar-unlearn-known-strict": _deep_update(KNOWN_S15, {"sanitize": {"alpha": {"asr_tolerance": 0.0}}}),
    "tbar-unlearn-known-10ep-strict": _deep_update(
        KNOWN_S15, {"sanitize": {"finetune": {"epochs": 10}, "alpha": {"asr_tolerance": 0.0}}}
    ),
}
AGNOSTIC_METHODS = {
    "tbar-agnostic": "anchored",
    "tbar-unlearn-agnostic": "unlearn",
    "tbar-unlearn-agnostic-mask": "unlearn",
    "tbar-unlearn-agnostic-signal": "unlearn",
    "tbar-unlearn-agnostic-s7": "unlearn",
    "tbar-unlearn-agnostic-refceil": "unlearn",
    "tbar-unlearn-agnostic-blend099": "unlearn",
    "tbar-unlearn-agnostic-trial099": "unlearn",
    "tbar-unlearn-agnostic-additive": "unlearn",
    "tbar-unlearn-agnostic-signal-first": "unlearn",
    "tbar-unlearn-agnostic-signal-first-hardened": "unlearn",
    "tbar-unlearn-agnostic-relative": "unlearn",
    "tbar-unlearn-agnostic-s13": "unlearn",
    "tbar-unlearn-agnostic-10ep": "unlearn",
    "tbar-unlearn-agnostic-probe2": "unlearn",
    "tbar-unlearn-agnostic-s18": "unlearn",
}
# the separable additive family scored at equal effect (the amplitude at which the optimised signal sends
# 90% of held-out images to the class); rule fixed on the development zoo (bench/zoo-dev.yaml): smallest
# amplitude < 0.45 x the median. Spelled out (not left to the product defaults): part of the record keys.
# The relative rule (session 14) is spelled off here: the variants that name this family were measured before it.
SIGNAL_FAMILY: dict[str, Any] = {
    "shape": "separable",
    "equal_effect": 0.9,
    "z_threshold": None,
    "ratio": 0.45,
    "relative_ratio": None,
}
# The detection rule of the default policy in sessions 7-13 (families [mask, additive], mask family:
# smallest mask < 0.6 x the median, z off), and the one before it (mask only, z < -2.5 or < 0.5 x).
SESSION13_DETECT: dict[str, Any] = {
    "families": ["mask", "additive"],
    "search_all": False,
    "z_threshold": None,
    "area_ratio": 0.6,
    "max_transfer": 0.25,
    "additive": SIGNAL_FAMILY,
}
SESSION5_MASK_RULE: dict[str, Any] = {"z_threshold": -2.5, "area_ratio": 0.5, "max_transfer": 0.25}
# Since session 14 the additive family's relative rule too (detect.differential.additive.relative_ratio): where
# the plain rule did not fire, a class whose amplitude on the candidate over the amplitude the same search needs
# on the reference itself is below this x the median quotient is flagged. Fixed on the development zoo
# (bench/results/relative-s14/dev-scores.md). Sessions 7-13 ran SESSION13_DETECT.
RELATIVE_RATIO = 0.2
DEFAULT_DETECT: dict[str, Any] = {
    **SESSION13_DETECT,
    "additive": {**SIGNAL_FAMILY, "relative_ratio": RELATIVE_RATIO},
}
RELATIVE_DETECT = DEFAULT_DETECT  # the name the rule was measured under on the development zoo
# Agnostic defences: what differs from the zoo policy, spelled out (part of their record key, so a
# change of the product defaults never passes a cached record off as the new default's).
# The default gate's re-inversion rounds' own rule (sessions 7 and 8).
REINVERT_RULE: dict[str, Any] = {"reinvert_z_threshold": -2.5, "reinvert_area_ratio": 0.5}
# Gates built before session 8 chose α without extending it along the inverted trigger's plateau.
BEFORE_EXTEND: dict[str, Any] = {"alpha": {"extend_inverted": False, "inverted_probe_strength": 1.0}}
# The default gate's removal in sessions 8-11 (the refceil and blend099 measurements ran on it): the
# rounds' own rule, α extended along the plateau.
SESSION11_GATE_SANITIZE: dict[str, Any] = {
    "unlearn": REINVERT_RULE,
    "alpha": {"extend_inverted": True, "inverted_probe_strength": 1.0},  # probe 1x: every gate before session 19
}
# Since session 12 also a companion blend below 0.99 x the median joins on trial (dropped when the removal
# with it misses the policy).
SESSION12_GATE_SANITIZE: dict[str, Any] = {
    **SESSION11_GATE_SANITIZE,
    "unlearn": {**REINVERT_RULE, "companion_trial_ratio": 0.99},
}
# Since session 13 the α search goes on past a zero-ASR α while the extension could take the next one
# (sanitize.alpha.extend_past_zero; before, the coarse search stopped there). The variants above and below
# that name SESSION11/SESSION12 settings were measured before the option existed (their records: stopped).
# Until session 18 the gate measured ASR with the inverted trigger as inverted (inverted_probe_strength 1);
# the variants measured then keep it, spelled out, since the policy's default moved to 2 in session 19.
SESSION18_GATE_SANITIZE: dict[str, Any] = {
    **SESSION12_GATE_SANITIZE,
    "alpha": {"extend_inverted": True, "extend_past_zero": True, "inverted_probe_strength": 1.0},
}
DEFAULT_GATE_SANITIZE: dict[str, Any] = _deep_update(
    SESSION18_GATE_SANITIZE, {"alpha": {"inverted_probe_strength": 2.0}}
)
# Session 13, opt-in: a scan decided by the additive family is hardened too (its signal and the companion blend).
ADDITIVE_HARDENED: dict[str, Any] = {
    **SESSION12_GATE_SANITIZE,
    "unlearn": {**SESSION12_GATE_SANITIZE["unlearn"], "harden_families": ["mask", "additive"]},
}
# The default detection with the additive family searched first: it decides wherever it fires (on the
# development zoo's Blended victims, which the mask family decides by default) - a measurement device.
SIGNAL_FIRST_DETECT: dict[str, Any] = {**SESSION13_DETECT, "families": ["additive", "mask"]}
AGNOSTIC_EXTRA: dict[str, dict[str, Any]] = {
    # the first agnostic gate (anchored TBAR on the scan's trigger), with session 5's detection rule
    "tbar-agnostic": {
        "detect": {"differential": {"families": ["mask"], **SESSION5_MASK_RULE}},
        "sanitize": BEFORE_EXTEND,
    },
    # the gate as the product runs it by default
    "tbar-unlearn-agnostic": {
        "detect": {"differential": DEFAULT_DETECT},
        "sanitize": DEFAULT_GATE_SANITIZE,
    },
    # the gate before companion triggers: the scan's mask trigger and the re-inversion rounds only
    # (session 5's detection rule)
    "tbar-unlearn-agnostic-mask": {
        "detect": {"differential": {"families": ["mask"], **SESSION5_MASK_RULE}},
        "sanitize": {"unlearn": {"companions": []}, **BEFORE_EXTEND},
    },
    # session 6: the separable additive family after the mask family with session 5's mask rule
    # (every family searched, as the code of then did)
    "tbar-unlearn-agnostic-signal": {
        "detect": {
            "differential": {
                "families": ["mask", "additive"],
                "search_all": True,
                **SESSION5_MASK_RULE,
                "additive": SIGNAL_FAMILY,
            }
        },
        "sanitize": BEFORE_EXTEND,
    },
    # the default gate before α was extended (session 7's removal; the scan stops at the first family
    # that fired, which changes neither verdict nor trigger)
    "tbar-unlearn-agnostic-s7": {
        "detect": {"differential": SESSION13_DETECT},
        "sanitize": {"unlearn": REINVERT_RULE, **BEFORE_EXTEND},
    },
    # session 9, opt-in: the default gate whose verdict's ASR ceiling is raised to the clean reference
    # model's rate under the same inverted trigger (accept.reference_rate_ceiling)
    "tbar-unlearn-agnostic-refceil": {
        "detect": {"differential": SESSION13_DETECT},
        "sanitize": SESSION11_GATE_SANITIZE,
        "accept": {"reference_rate_ceiling": True},
    },
    # session 11, measurement: the default gate whose companion blend joins whenever it is cheaper than
    # 0.99 x the sampled classes' median strength (default 0.7 x; the scan is the default's, since
    # detect.differential.blend is read only by the companion when the blend family is not searched)
    "tbar-unlearn-agnostic-blend099": {
        "detect": {"differential": {**SESSION13_DETECT, "blend": {"ratio": 0.99}}},
        "sanitize": SESSION11_GATE_SANITIZE,
    },
    # session 12, measured on the development zoo then adopted: the gate whose companion blend joins on
    # trial below 0.99 x the median (outright below 0.7 x); when the removal with it misses the policy, the
    # gate removes without it. Its settings are the default gate's since (bench/results/trial099-s12).
    "tbar-unlearn-agnostic-trial099": {
        "detect": {"differential": SESSION13_DETECT},
        "sanitize": SESSION12_GATE_SANITIZE,
    },
    # session 13, measured, not adopted: the default gate that also hardens a scan decided by the additive
    # family (sanitize.unlearn.harden_families [mask, additive]: the scan's signal and the companion blend);
    # better on the development zoo's Blended victims, worse on the test zoo's GTSRB SIG victims
    # (bench/results/additive-s13, README "hardening an additive scan")
    "tbar-unlearn-agnostic-additive": {
        "detect": {"differential": SESSION13_DETECT},
        "sanitize": ADDITIVE_HARDENED,
    },
    # session 13, measurement pair: the additive family searched first, without and with its hardening
    "tbar-unlearn-agnostic-signal-first": {
        "detect": {"differential": SIGNAL_FIRST_DETECT},
        "sanitize": SESSION12_GATE_SANITIZE,
    },
    "tbar-unlearn-agnostic-signal-first-hardened": {
        "detect": {"differential": SIGNAL_FIRST_DETECT},
        "sanitize": ADDITIVE_HARDENED,
    },
    # session 14, measured on the development zoo then adopted: the default gate with the additive family's
    # relative rule (RELATIVE_DETECT: the default since, so this is the default gate under its measurement name)
    "tbar-unlearn-agnostic-relative": {
        "detect": {"differential": RELATIVE_DETECT},
        "sanitize": DEFAULT_GATE_SANITIZE,
    },
    # the default gate of session 13 (no relative rule), to pair with the default on the same zoo
    "tbar-unlearn-agnostic-s13": {
        "detect": {"differential": SESSION13_DETECT},
        "sanitize": SESSION18_GATE_SANITIZE,
    },
    # session 17, measurement: the default gate whose unlearning fine-tune (every one: the first removal and
    # each re-inversion round's) runs 10 epochs instead of finetune.epochs' 5 - the known trigger's session-16
    # lever, on the inverted trigger (the disentanglement evidence's clean vector runs 10 epochs as well).
    # Adoption rule, written before any run: on the development zoo's working attacked victims, adopted when
    # more victims reach true test ASR <= 2% with CA kept >= 0.95 than under tbar-unlearn-agnostic,
    # re-emergence <= 10% on at least as many, and no gate (scan + removal) over 300 s.
    "tbar-unlearn-agnostic-10ep": {
        "detect": {"differential": DEFAULT_DETECT},
        "sanitize": _deep_update(SESSION18_GATE_SANITIZE, {"finetune": {"epochs": 10}}),
    },
    # session 18, measurement: the default gate whose alpha search and verdict measure ASR with the inverted
    # trigger at 2x its strength (sanitize.alpha.inverted_probe_strength 2; the forget set keeps 1x): session
    # 17 saw the inverted trigger's validation ASR floor at a smaller alpha than the real trigger's. Adoption
    # rule, written before any run: the same as -10ep's (more development-zoo working attacked victims at true
    # test ASR <= 2% with CA kept >= 0.95 than tbar-unlearn-agnostic, re-emergence <= 10% on at least as
    # many, no gate over 300 s).
    "tbar-unlearn-agnostic-probe2": {
        "detect": {"differential": DEFAULT_DETECT},
        "sanitize": DEFAULT_GATE_SANITIZE,  # the default since session 19: this is its measurement name
    },
    # the default gate of sessions 14-18 (probe 1x): adopted in session 19 after the timing rerun, so
    # tbar-unlearn-agnostic is -probe2 since and this keeps the previous default measurable
    "tbar-unlearn-agnostic-s18": {
        "detect": {"differential": DEFAULT_DETECT},
        "sanitize": SESSION18_GATE_SANITIZE,
    },
}
KNOWN = tuple(KNOWN_METHODS)
BASELINES = ("clean-ft-1x", "clean-ft-10x", "grad-ascent", "cleanclip")
# Scan-only detector configurations: defence name -> the policy additions of its scan (reference =
# the task's base model). A record keeps every family's own decision, so one scan with the families
# [mask, blend] also gives the mask-only and blend-only rules (each family is computed from its own
# seeded generator, identically whether or not the other family runs).
# The rules are spelled out (not left to the product defaults) so that the record key changes with them.
SCANS: dict[str, dict[str, Any]] = {
    # the mask family alone with session 5's rule (the default until session 7): its per-class
    # evidence, to fix a rule on the development zoo
    "scan-differential-mask": {"detect": {"differential": {"families": ["mask"], **SESSION5_MASK_RULE}}},
    "scan-differential-blend": {
        "detect": {
            "differential": {
                "families": ["mask", "blend"],
                "z_threshold": -2.5,
                "area_ratio": 0.5,
                "blend": {"pattern_cells": 0, "strength_weight": 5.0, "z_threshold": None, "ratio": 0.7},
            }
        }
    },
    # the additive family alone, as first built: any full-resolution signal, scored by the optimiser's
    # penalised amplitude (the mask family's evidence comes with every gate record)
    "scan-differential-additive": {
        "detect": {
            "differential": {
                "families": ["additive"],
                "additive": {
                    "shape": "full",
                    "equal_effect": None,
                    "z_threshold": None,
                    "ratio": 0.7,
                    "relative_ratio": None,
                },
            }
        }
    },
    # the same, restricted to separable signals (a profile across + a profile down the image)
    "scan-differential-separable": {
        "detect": {
            "differential": {
                "families": ["additive"],
                "additive": {
                    "shape": "separable",
                    "equal_effect": None,
                    "z_threshold": None,
                    "ratio": 0.7,
                    "relative_ratio": None,
                },
            }
        }
    },
    # the same family as the -signal gate (SIGNAL_FAMILY), scan only; transfer check as the default
    "scan-differential-separable-ee": {
        "detect": {
            "differential": {
                "families": ["additive"],
                "additive": SIGNAL_FAMILY,
            }
        }
    },
}
# Scan-only configurations whose reference is not the base model but "the promoted version": a clean
# fine-tune of the same task (the zoo's first clean control of the task; for that control itself, the
# second), as a registry's currently promoted model would be. Session 15, measurement: the default
# detector (the gate's scan, which stops at the first family that fired) with that reference.
PROMOTED_SCANS: dict[str, dict[str, Any]] = {
    "scan-default-promoted": {"detect": {"differential": DEFAULT_DETECT}},
}
SCANS.update(PROMOTED_SCANS)
SCAN_ONLY = ("decree", *SCANS)  # detectors that only scan (no removal): run on failed attacks too
DETECTORS = (*AGNOSTIC_METHODS, *SCAN_ONLY)
ALL_DEFENCES = KNOWN + DETECTORS + BASELINES


@dataclass
class TaskContext:
    name: str
    base_dir: Path
    data_npz: Path
    defender: ImageSet
    splits: Splits
    extra: ImageSet
    base_ca: float
    base_pl1: float | None = None


class Runner:
    def __init__(
        self, spec: ZooSpec, out: Path, cache: Path, shared: Path, log: Log, defences_: tuple[str, ...] | None = None
    ) -> None:
        self.spec, self.out, self.cache, self.log = spec, out, cache, log
        self.zoo = Zoo(spec, cache, shared, log)
        self.defences = defences_ or spec.defences
        unknown = sorted(set(self.defences) - set(ALL_DEFENCES))
        if unknown:
            raise ValueError(f"unknown defence(s) {unknown}; known: {list(ALL_DEFENCES)}")
        self.tasks: dict[str, TaskContext] = {}
        self.records: list[dict[str, Any]] = []
        self.victims: list[dict[str, Any]] = []
        self.missing: list[str] = []  # victims / victim x defence with no cached result (from_cache runs)
        self.skipped: list[str] = []  # failed attack x removal defence, under failed_attacks: detect-only
        self.from_cache = False
        self.commit = "unknown"

    # --- policy -------------------------------------------------------------------------------
    def policy(self, extra: dict[str, Any] | None = None) -> Policy:
        return policy_from_dict(_deep_update(self.spec.policy, extra or {}), f"zoo {self.spec.name} policy")

    # --- tasks --------------------------------------------------------------------------------
    def task(self, name: str) -> TaskContext:
        if name in self.tasks:
            return self.tasks[name]
        t = self.spec.tasks[name]
        defender = self.zoo.images(t.defender)
        npz = datasets.save_npz(
            defender, self.cache / "data" / f"defender-{name}-{key_of(self.spec.raw['tasks'][name])}.npz"
        )
        policy = self.policy()
        fractions = (policy.data.forget_fraction, policy.data.val_fraction, policy.data.test_fraction)
        splits = split(defender, fractions, policy.seed)  # the same function and seed the product uses
        base_dir = self.zoo.base_for(name)
        base_ca = evaluate(classifier_for(load_bundle(base_dir)), splits.test).clean_accuracy
        ctx = TaskContext(name, base_dir, npz, defender, splits, self.zoo.images(t.extra_clean), base_ca)
        self.tasks[name] = ctx
        return ctx

    def base_pl1(self, ctx: TaskContext) -> float:
        """DECREE PL1 of the clean base model of a task: the calibrated rule's reference."""
        if ctx.base_pl1 is None:
            policy = self.decree_policy()
            key = key_of([self.spec.foundation_key(), ctx.name, policy.sha256()])
            cached = self.cache / "records" / f"base-decree-{ctx.name}-{key}.json"
            if cached.exists():
                ctx.base_pl1 = float(json.loads(cached.read_text())["pl1"])
            else:
                out = self._fresh_dir(f"base-decree-{ctx.name}-{key}")
                result = scan(ctx.base_dir, ctx.data_npz, policy, out)
                ctx.base_pl1 = float(result.report["detection"]["pl1"])
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps({"pl1": ctx.base_pl1}), encoding="utf-8")
        return ctx.base_pl1

    def clean_control_asr(self, v: VictimSpec) -> float | None:
        """Mean ASR of ``v``'s trigger and target on the task's clean controls (no backdoor), on the
        defender's test split: the rate a model without the backdoor already shows, so the floor any
        removal is read against. ``None`` when the zoo has no clean control for the task (or, from the
        cache, none built)."""
        assert v.attack is not None
        controls = [c for c in self.spec.victims if c.task == v.task and c.attack is None]
        if self.from_cache:  # train nothing: only the controls already built
            controls = [c for c in controls if self.zoo.victim_cached(c)]
        if not controls:
            return None
        key = key_of([[self.spec.victim_key(c) for c in controls], self.spec.attacks[v.attack], v.target])
        cached = self.cache / "records" / f"clean-control-asr-{v.task}-{v.attack}-t{v.target}-{key}.json"
        if cached.exists():
            return float(json.loads(cached.read_text())["asr"])
        trigger = build_trigger(self.spec.trigger(v.attack), self.spec.preprocess.image_size)
        test = self.task(v.task).splits.test
        rates = []
        for c in controls:
            cdir, _ = self.zoo.victim(c)  # built here if the zoo lists it after the victim
            m = evaluate(classifier_for(load_bundle(cdir)), test, trigger, v.target)
            assert m.attack_success_rate is not None
            rates.append(m.attack_success_rate)
        asr = sum(rates) / len(rates)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"asr": asr, "controls": [c.name for c in controls]}), encoding="utf-8")
        return asr

    def decree_policy(self) -> Policy:
        return self.policy({"detect": {"method": "decree", "decree": {"rule": "paper"}}})

    def _fresh_dir(self, name: str) -> Path:
        out = self.cache / "runs" / name
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    # --- one victim ---------------------------------------------------------------------------
    def run_victim(self, v: VictimSpec) -> None:
        if self.from_cache and not self.zoo.victim_cached(v):
            self.missing.append(f"{v.name} (victim not built)")
            return
        ctx = self.task(v.task)
        vdir, meta = self.zoo.victim(v)
        meta = dict(meta)
        meta["base_test_ca"] = ctx.base_ca
        if v.attack is not None:
            meta["clean_control_asr"] = self.clean_control_asr(v)
        self.victims.append(meta)
        tag = "FAILED ATTACK " if meta["failed_attack"] else ""
        asr = meta["attack_success_rate"]
        self.log(
            f"{v.name}: {tag}victim CA {100 * meta['clean_accuracy']:.1f}%"
            + (f", ASR {100 * asr:.1f}%" if asr is not None else "")
        )
        for defence in self.defences:
            if v.attack is None and defence not in DETECTORS:
                continue
            if meta["failed_attack"] and self.spec.failed_attacks == "detect-only" and defence not in SCAN_ONLY:
                self.skipped.append(f"{v.name} x {defence}")
                continue
            cached = record_path(self.cache, self.spec, v, defence)
            key = cached.stem.rsplit("-", 1)[1]
            if cached.exists():
                rec = json.loads(cached.read_text())
            elif self.from_cache:
                self.missing.append(f"{v.name} x {defence}")
                continue
            else:
                t0 = time.perf_counter()
                rec = self.defend(v, vdir, ctx, defence, key)
                rec["seconds"] = time.perf_counter() - t0
                rec["commit"] = self.commit  # the code that computed this record
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(rec, indent=2), encoding="utf-8")
            if not self.from_cache and self.wants_true_curve(defence, rec):  # new or cached before the curve
                self.add_true_curve(v, vdir, ctx, rec, self.cache / "runs" / cached.stem, cached)
            rec = {
                "victim": v.name,
                "task": v.task,
                "attack": v.attack,
                "target": v.target,
                "seed": v.seed,
                "defence": defence,
                **rec,
            }
            self.records.append(rec)
            self.log(f"  {defence}: {_brief(rec)}")

    @staticmethod
    def wants_true_curve(defence: str, rec: dict[str, Any]) -> bool:
        return (
            defence in AGNOSTIC_METHODS
            and rec.get("verdict") == "removed"
            and bool(rec.get("alpha"))
            and "true_curve" not in rec
        )

    def add_true_curve(
        self, v: VictimSpec, vdir: Path, ctx: TaskContext, rec: dict[str, Any], run_dir: Path, cached: Path
    ) -> None:
        """An agnostic gate's α chosen on the validation split under its *inverted* trigger: the
        whole α sweep read again under the *true* trigger on the test split (an audit; it chooses
        nothing). The removal direction is rebuilt from the shipped model: θ(α) = θ_b + (α / α*)(θ_s − θ_b).
        Stored into the record (``true_curve``); the record's key is unchanged (the same run, read again).
        Skipped when the run folder's model is gone."""
        model = run_dir / "model"
        if v.attack is None or not (model / "open_clip_model.safetensors").is_file():
            return
        trigger = build_trigger(self.spec.trigger(v.attack), self.spec.preprocess.image_size)
        alphas = [p["alpha"] for p in rec.get("alpha_sweep") or []]
        curve = true_curve(
            load_bundle(vdir),
            load_bundle(model),
            rec["alpha"],
            alphas,
            ctx.splits.test,
            trigger,
            v.target,
            self.policy().seed,
        )
        rec["true_curve"] = curve
        cached.write_text(json.dumps(rec, indent=2), encoding="utf-8")

    def defend(self, v: VictimSpec, vdir: Path, ctx: TaskContext, defence: str, key: str) -> dict[str, Any]:
        out = self._fresh_dir(f"{v.name}-{defence}-{key}")
        if defence in KNOWN:
            assert v.attack is not None
            method = KNOWN_METHODS[defence]
            # ξ costs a second fine-tune: measured for one victim per attack (the first seed), non-plain methods
            first = v.seed == min(x.seed for x in self.spec.victims if x.attack == v.attack)
            xi = defence != "tbar-plain-known" and first
            extra = {"sanitize": {"method": method, "disentanglement": {"enabled": xi}}}
            policy = self.policy(_deep_update(extra, KNOWN_EXTRA.get(defence, {})))
            r = sanitize(vdir, ctx.data_npz, policy, self.spec.trigger(v.attack), str(v.target), out).report
            return _removal_record(r, r["before"], r["after"])
        if defence in AGNOSTIC_METHODS:
            extra: dict[str, Any] = {
                "detect": {"reference_models": [str(ctx.base_dir)]},
                "sanitize": {"method": AGNOSTIC_METHODS[defence], "disentanglement": {"enabled": False}},
            }
            if v.attack is not None:
                extra.update({"trigger": spec_to_dict(self.spec.trigger(v.attack)), "target": str(v.target)})
            extra = _deep_update(extra, AGNOSTIC_EXTRA.get(defence, {}))
            r = gate(vdir, ctx.data_npz, self.policy(extra), out).report
            det = r["detection"]
            rec: dict[str, Any] = {
                "verdict": r["verdict"],
                "flagged": bool(det["flagged"]),
                "detected_target": det["target_index"],
                "target_correct": det["target_index"] == v.target if v.attack else None,
                "proxy_asr": det["proxy_asr"],
                "score": det.get("z_score"),
                "area": det["pl1"],
                "families": _families_record(det, v),
                "scan_seconds": det["seconds"],
            }
            true = r.get("true_trigger") or {}
            if r.get("alpha_sweep"):
                rec.update(_removal_record(r, true.get("before") or r["before"], true.get("after") or r["after"]))
                rec["asr_inverted_before"] = r["before"]["attack_success_rate"]
                rec["asr_inverted_after"] = r["after"]["attack_success_rate"]
                rec["asr_ceilings"] = r.get("asr_ceilings")  # the reference's rate under the inverted trigger
                rec["verdict"] = r["verdict"]
            return rec
        if defence in SCANS:
            return self.scan_record(v, vdir, ctx, defence, out)
        if defence == "decree":
            r = scan(vdir, ctx.data_npz, self.decree_policy(), out).report
            det = r["detection"]
            pl1 = float(det["pl1"])
            d = self.decree_policy().detect.decree
            ref = self.base_pl1(ctx)
            paper = detect.decide_paper(pl1, d.paper_threshold)
            calibrated = detect.decide_calibrated(pl1, [ref], d.calibrated_ratio, d.z_threshold)
            return {
                "pl1": pl1,
                "l1_official": det.get("l1_official"),
                "reference_pl1": ref,
                "flagged_paper": paper.flagged,
                "flagged_calibrated": calibrated.flagged,
                "detected_target": det["target_index"],
                "target_correct": det["target_index"] == v.target if v.attack else None,
                "proxy_asr": det["proxy_asr"],
                "scan_seconds": det["seconds"],
            }
        return self.baseline(v, vdir, ctx, defence)

    def scan_record(self, v: VictimSpec, vdir: Path, ctx: TaskContext, defence: str, out: Path) -> dict[str, Any]:
        """Scan only (no removal) with one detector configuration of ``SCANS``; reference = the base model
        (``PROMOTED_SCANS``: a clean control, :func:`promoted_reference`)."""
        # every family of the configuration is searched even after one fired: the per-family evidence is
        # what a scan-only record is for. Not part of the record key: records made before the option
        # existed were made by code that always searched every family. PROMOTED_SCANS run as the gate's
        # scan does (stopping at the first family that fired).
        if defence in PROMOTED_SCANS:
            ref = promoted_reference(self.spec, v)
            assert ref is not None, f"{v.task} has too few clean controls for a promoted reference"
            always: dict[str, Any] = {"detect": {"reference_models": [str(self.zoo.victim(ref)[0])]}}
        else:
            always = {"detect": {"reference_models": [str(ctx.base_dir)], "differential": {"search_all": True}}}
        extra = _deep_update(always, SCANS[defence])
        r = scan(vdir, ctx.data_npz, self.policy(extra), out).report
        det = r["detection"]
        return {
            "flagged": bool(det["flagged"]),
            "family": det.get("family"),
            "detected_target": det["target_index"],
            "target_correct": det["target_index"] == v.target if v.attack else None,
            "proxy_asr": det["proxy_asr"],
            "score": det.get("z_score"),
            "area": det["pl1"],
            "families": _families_record(det, v),
            "scan_seconds": det["seconds"],
        }

    def baseline(self, v: VictimSpec, vdir: Path, ctx: TaskContext, defence: str) -> dict[str, Any]:
        assert v.attack is not None
        policy = self.policy()
        cfg = self.spec.baselines.get(defence, {})
        trigger = build_trigger(self.spec.trigger(v.attack), self.spec.preprocess.image_size)
        clf = classifier_for(load_bundle(vdir))
        before = evaluate(clf, ctx.splits.test, trigger, v.target, seed=policy.seed)
        forget = policy.sanitize.forget_size
        if defence in ("clean-ft-1x", "clean-ft-10x"):
            n = forget * (1 if defence == "clean-ft-1x" else 10)
            d = defences.clean_finetune(
                clf, ctx.extra, n, int(cfg.get("epochs", 5)), float(cfg.get("lr", 1e-4)), v.seed
            )
        elif defence == "grad-ascent":
            d = defences.gradient_ascent(
                clf,
                ctx.splits,
                trigger,
                v.target,
                forget,
                float(cfg.get("lr", 1e-5)),
                int(cfg.get("max_steps", 80)),
                int(cfg.get("eval_every", 4)),
                policy.accept.ca_floor,
                v.seed,
            )
        else:
            d = defences.cleanclip(
                clf,
                ctx.extra,
                int(cfg.get("images", 10 * forget)),
                int(cfg.get("epochs", 2)),
                float(cfg.get("lr", 1e-4)),
                float(cfg.get("inmodal_weight", 1.0)),
                v.seed,
            )
        clf.visual.load_state_dict(d.visual)
        after = evaluate(clf, ctx.splits.test, trigger, v.target, seed=policy.seed)
        re = self.reemergence(clf, d.visual, ctx, trigger, v.target)
        kept = after.clean_accuracy / max(before.clean_accuracy, 1e-12)
        return {
            "verdict": _verdict(kept, after.attack_success_rate, policy),
            "ca_before": before.clean_accuracy,
            "asr_before": before.attack_success_rate,
            "ca_after": after.clean_accuracy,
            "asr_after": after.attack_success_rate,
            "ca_kept": kept,
            "reemergence_asr": re,
            "data_used": d.data_used,
            "train_seconds": d.seconds,
            "note": d.note,
        }

    def reemergence(
        self, clf: Any, visual: dict[str, torch.Tensor], ctx: TaskContext, trigger: Any, target: int
    ) -> float:
        policy = self.policy()
        r = policy.sanitize.reemergence  # the policy's recipe, so every defence is measured alike
        config = ReemergenceConfig(images=r.images, lr=r.lr, epochs=r.epochs, batch_size=r.batch_size, seed=policy.seed)
        repair = ctx.splits.forget
        return measure_reemergence(clf, visual, repair, ctx.splits.test, trigger, target, config).attack_success_rate

    # --- whole run ----------------------------------------------------------------------------
    def run(
        self, only: tuple[str, ...] | None = None, limit: int | None = None, from_cache: bool = False
    ) -> dict[str, Any]:
        """Run (with ``from_cache``: only collect) every victim x defence; what is missing is listed."""
        t0 = time.perf_counter()
        host = machine()  # at the start: the code that produced the records, whatever is edited later
        self.commit, self.from_cache = host["commit"], from_cache
        if from_cache and not self.zoo.foundation_cached():
            raise FileNotFoundError(f"no cached foundation under {self.cache}; run without --from-cache first")
        self.zoo.foundation()
        victims = [v for v in self.spec.victims if only is None or any(o in v.name for o in only)]
        if limit is not None:
            victims = victims[:limit]
        for v in victims:
            self.run_victim(v)
        wall = time.perf_counter() - t0
        return {
            "zoo": self.spec.name,
            "zoo_spec": self.spec.raw,
            "machine": host,
            "foundation": {
                **self.zoo.foundation_meta(),
                "zero_shot_ca": {name: ctx.base_ca for name, ctx in self.tasks.items()},
                "reference_pl1": {name: ctx.base_pl1 for name, ctx in self.tasks.items()},
            },
            "policy": self.policy().to_json(),
            "victims": self.victims,
            "records": self.records,
            "missing": self.missing,
            "skipped_failed_attacks": self.skipped,
            "from_cache": from_cache,
            "wall_seconds": wall,
        }


def _verdict(kept: float, asr: float | None, policy: Policy) -> str:
    ok = kept >= policy.accept.ca_floor and asr is not None and asr <= policy.accept.asr_ceiling
    return "removed" if ok else "unremoved"


def _families_record(det: dict[str, Any], v: VictimSpec) -> dict[str, Any]:
    """Each differential family's decision and evidence from a report's ``detection`` section."""
    return {
        name: {
            "flagged": bool(f["flagged"]),
            "area_flagged": bool(f["area_rule_fired"]),
            "target": f["target"],
            "target_correct": f["target"] == v.target if v.attack else None,
            "z": f["z_score"],
            "score": f["score"],
            "median_score": f["median_score"],
            "ratio": f["ratio"],
            "target_asr": f["target_asr"],
            "target_reference_asr": f["target_reference_asr"],
            "transfer_ratio": f.get("transfer_ratio"),
            "hit_class": f.get("hit_class"),
            "hit_asr": f.get("hit_asr"),
            "hit_reference_asr": f.get("hit_reference_asr"),
            "seconds": f["seconds"],
            # the additive family's relative rule (absent/None when off, without a reference, or not evaluated)
            "relative": None
            if not f.get("relative")
            else {k: f["relative"][k] for k in ("flagged", "ratio_rule_fired", "target", "ratio", "seconds")},
        }
        for name, f in det.get("families", {}).items()
    }


def _removal_record(r: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """CA/ASR under the *true* trigger (the benchmark's measure) from a sanitize or gate report."""
    removed = r["verdict"] == "removed"
    re = r.get("reemergence") or {}
    re_true = re.get("audit") or re
    return {
        "verdict": r["verdict"],
        "alpha": r.get("alpha"),
        "ca_before": before["clean_accuracy"],
        "asr_before": before["attack_success_rate"],
        # an unremoved verdict ships nothing: the user keeps the victim
        "ca_after": after["clean_accuracy"] if removed else before["clean_accuracy"],
        "asr_after": after["attack_success_rate"] if removed else before["attack_success_rate"],
        "ca_after_chosen_alpha": after["clean_accuracy"],
        "asr_after_chosen_alpha": after["attack_success_rate"],
        "ca_kept": after["clean_accuracy"] / max(before["clean_accuracy"], 1e-12),
        "reemergence_asr": re_true.get("attack_success_rate") if removed else None,
        "data_used": r.get("forget_size"),
        "alpha_sweep": r.get("alpha_sweep"),
        "disentanglement": r.get("disentanglement"),
    }


def _brief(rec: dict[str, Any]) -> str:
    parts = []
    for k in ("verdict", "flagged", "flagged_paper", "flagged_calibrated", "detected_target", "alpha"):
        if rec.get(k) is not None:
            parts.append(f"{k}={rec[k]}")
    for k in ("ca_after", "asr_after", "reemergence_asr", "pl1"):
        if rec.get(k) is not None:
            parts.append(f"{k}={100 * rec[k]:.1f}" if k != "pl1" else f"pl1={rec[k]:.3f}")
    parts.append(f"{rec.get('seconds', 0):.0f}s")
    return " ".join(parts)


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    import open_clip

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "tbar_guard": __version__,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def true_curve(
    victim: ClipBundle,
    shipped: ClipBundle,
    chosen: float,
    alphas: list[float],
    images: ImageSet,
    trigger: Trigger,
    target: int,
    seed: int,
) -> list[dict[str, Any]]:
    """CA and ASR (``trigger`` → ``target``) on ``images`` at each α along the removal that shipped
    ``shipped`` from ``victim`` at α = ``chosen``: θ(α) = θ_b + (α / chosen)(θ_s − θ_b) (image tower)."""
    clf = classifier_for(victim)
    theta_b = visual_state(clf)
    step = TaskVector.between(theta_b, visual_state(classifier_for(shipped)))
    out = []
    for a in alphas:
        clf.visual.load_state_dict(step.apply_to(theta_b, a / chosen))
        m = evaluate(clf, images, trigger, target, seed=seed)
        out.append({"alpha": a, "clean_accuracy": m.clean_accuracy, "attack_success_rate": m.attack_success_rate})
    return out


def promoted_reference(spec: ZooSpec, v: VictimSpec) -> VictimSpec | None:
    """The clean control that stands for ``v``'s promoted version (``PROMOTED_SCANS``): the task's first
    clean control, or its second when ``v`` is the first; None when the task has too few."""
    controls = [c for c in spec.victims if c.task == v.task and c.attack is None and c.name != v.name]
    return controls[0] if controls else None


def record_path(cache: Path, spec: ZooSpec, v: VictimSpec, defence: str) -> Path:
    """Where the record of ``v`` x ``defence`` is cached: keyed by everything that decides it."""
    extra = spec.baselines.get(defence) or SCANS.get(defence) or AGNOSTIC_EXTRA.get(defence) or KNOWN_EXTRA.get(defence)
    parts: list[Any] = [spec.victim_key(v), defence, spec.policy, extra]
    if defence in PROMOTED_SCANS:
        ref = promoted_reference(spec, v)
        parts.append(spec.victim_key(ref) if ref is not None else None)
    key = key_of(parts)
    return cache / "records" / f"{v.name}-{defence}-{key}.json"


def load_and_run(
    zoo_path: Path,
    out: Path,
    cache: Path,
    shared: Path,
    log: Log,
    only: tuple[str, ...] | None = None,
    limit: int | None = None,
    defences_: tuple[str, ...] | None = None,
    from_cache: bool = False,
    jobs: int = 1,
    worker_threads: int = 1,
) -> dict[str, Any]:
    spec = load_zoo(zoo_path)
    if jobs > 1 and not from_cache:
        return run_parallel(zoo_path, out, cache, shared, log, only, limit, defences_, jobs, worker_threads)
    runner = Runner(spec, out, cache, shared, log, defences_)
    return runner.run(only, limit, from_cache)


# --- parallel runs ------------------------------------------------------------------------------
# ``--jobs N``: this process trains the foundation and prepares what the victims share (decoded data,
# the tasks' base models); N worker processes, each with its own torch thread count, then build the
# victims, one at a time from a queue; this process prepares the defences' shared pieces (task .npz
# files, the base DECREE PL1, the clean-control rates); the workers take one victim at a time again,
# with all its defences, and cache its records; the tables are written from the cache. Every model and
# record is the one a one-process run with the workers' thread count computes.


@dataclass(frozen=True)
class _Job:
    zoo: Path
    out: Path
    cache: Path
    shared: Path
    defences: tuple[str, ...] | None
    victim: str
    commit: str


_WORKER: dict[str, Runner] = {}  # one Runner per worker process, reused across its victims


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_runner(job: _Job) -> Runner:
    key = f"{job.zoo}|{job.cache}|{job.defences}"
    runner = _WORKER.get(key)
    if runner is None:
        runner = _WORKER[key] = Runner(load_zoo(job.zoo), job.out, job.cache, job.shared, print, job.defences)
    return runner


def _job_log(job: _Job, t0: float) -> Log:
    def log(msg: str) -> None:
        print(f"[{job.victim} {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    return log


def _build_one(job: _Job) -> tuple[str, float, dict[str, Any]]:
    """Build (or read) one victim, in a worker process; returns (victim, seconds, its build record)."""
    t0 = time.perf_counter()
    runner = _worker_runner(job)
    runner.zoo.log = _job_log(job, t0)
    v = next(x for x in runner.spec.victims if x.name == job.victim)
    _, meta = runner.zoo.victim(v)
    return job.victim, time.perf_counter() - t0, meta


def _defend_one(job: _Job) -> tuple[str, float]:
    """Every defence of one victim, in a worker process (its progress printed as it goes)."""
    t0 = time.perf_counter()
    runner = _worker_runner(job)
    runner.log = runner.zoo.log = _job_log(job, t0)
    runner.commit = job.commit
    v = next(x for x in runner.spec.victims if x.name == job.victim)
    runner.run_victim(v)
    return job.victim, time.perf_counter() - t0


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here (main thread only), so that a ``with Pool`` inside terminates
    its workers: killed by the default signal, the main process used to leave them running (session 15:
    an orphan went on writing records and a run directory that a new run's worker then collided with)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_parallel(
    zoo_path: Path,
    out: Path,
    cache: Path,
    shared: Path,
    log: Log,
    only: tuple[str, ...] | None,
    limit: int | None,
    defences_: tuple[str, ...] | None,
    jobs: int,
    worker_threads: int,
) -> dict[str, Any]:
    """The run of :meth:`Runner.run` shared among ``jobs`` worker processes (see above)."""
    import multiprocessing

    t0 = time.perf_counter()
    spec = load_zoo(zoo_path)
    prep = Runner(spec, out, cache, shared, log, defences_)
    host = machine()
    prep.commit = host["commit"]
    prep.zoo.foundation()
    victims = [v for v in spec.victims if only is None or any(o in v.name for o in only)]
    if limit is not None:
        victims = victims[:limit]
    names = sorted({v.task for v in victims})
    for name in names:  # shared by the victims: built once, here, before the workers read them
        prep.zoo.base_for(name)
        t = spec.tasks[name]
        for s in (t.victim_train, t.defender, t.extra_clean):
            prep.zoo.images(s)
    work = [_Job(zoo_path, out, cache, shared, defences_, v.name, host["commit"]) for v in victims]
    # the clean controls an attacked victim's clean-control ASR reads, when a slice (--only, --limit) left
    # them out: built by the workers too, not one after another in this process
    attacked = {v.task for v in victims if v.attack is not None}
    controls = [c for c in spec.victims if c.attack is None and c.task in attacked and c not in victims]
    build = work + [_Job(zoo_path, out, cache, shared, defences_, c.name, host["commit"]) for c in controls]
    ctx_mp = multiprocessing.get_context("spawn")
    with _sigterm_interrupts(), ctx_mp.Pool(jobs, initializer=_worker_init, initargs=(worker_threads,)) as pool:
        for name, seconds, meta in pool.imap_unordered(_build_one, build):
            asr = meta["attack_success_rate"]
            log(
                f"{name}: victim ready in {seconds:.0f} s, CA {100 * meta['clean_accuracy']:.1f}%"
                + (f", ASR {100 * asr:.1f}%" if asr is not None else "")
            )
        for name in names:
            ctx = prep.task(name)
            if "decree" in prep.defences:
                prep.base_pl1(ctx)
        for v in victims:
            if v.attack is not None:
                prep.clean_control_asr(v)
        build_seconds = time.perf_counter() - t0
        log(f"zoo ready in {build_seconds:.0f} s; defending {len(victims)} victims on {jobs} workers")
        for name, seconds in pool.imap_unordered(_defend_one, work):
            log(f"{name}: every defence done in {seconds:.0f} s")
    res = Runner(spec, out, cache, shared, log, defences_).run(only, limit, from_cache=True)
    res.update(
        machine=host,
        from_cache=False,
        wall_seconds=time.perf_counter() - t0,
        parallel={"jobs": jobs, "worker_threads": worker_threads, "build_seconds": build_seconds},
    )
    return res
