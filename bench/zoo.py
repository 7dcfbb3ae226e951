"""The benchmark zoo: a small CLIP foundation pretrained here on real images, and victims
fine-tuned from it (poisoned or clean), each cached on disk keyed by its configuration.

Everything is described by a YAML file (``bench/zoo.yaml``); see :class:`ZooSpec`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import datasets
from tbar_guard.attacks import TriggerSpec, build_trigger, parse_trigger
from tbar_guard.bundle import ClipBundle, Preprocess, ZeroShotTask, build_model, load_bundle, save_bundle, sha256_state
from tbar_guard.clip import classifier_for
from tbar_guard.data import ImageSet
from tbar_guard.evaluate import evaluate
from tbar_guard.train import FinetuneConfig, pretrain_clip
from tbar_guard.zoo import finetune_victim

Log = Callable[[str], None]


def key_of(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Slice:
    dataset: str  # cifar10 | gtsrb | mnist
    split: str  # train | test
    start: int
    stop: int

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Slice:
        return cls(str(raw["dataset"]), str(raw["split"]), int(raw["range"][0]), int(raw["range"][1]))

    def load(self, shared: Path, cache: Path) -> ImageSet:
        images = datasets.load(self.dataset, self.split, shared, cache)
        stop = min(self.stop, len(images))
        return images.subset(torch.arange(self.start, stop))


@dataclass(frozen=True)
class TaskSpec:
    name: str  # cifar10 | gtsrb | mnist (its class names come from bench.datasets)
    victim_train: Slice  # what the victim is fine-tuned on
    defender: Slice  # the clean data the defender holds (the policy's --data: forget/val/test)
    extra_clean: Slice  # a further clean pool for the data-hungry baselines (clean FT 10x, CleanCLIP)

    @property
    def classnames(self) -> tuple[str, ...]:
        return datasets.CLASSES[self.name]


@dataclass(frozen=True)
class VictimSpec:
    task: str
    attack: str | None  # a name in ZooSpec.attacks; None = clean control
    target: int
    seed: int

    @property
    def name(self) -> str:
        kind = self.attack or "clean"
        return f"{self.task}-{kind}-t{self.target}-s{self.seed}" if self.attack else f"{self.task}-clean-s{self.seed}"


@dataclass(frozen=True)
class ZooSpec:
    name: str
    model_cfg: dict[str, Any]
    preprocess: Preprocess
    templates: tuple[str, ...]
    foundation_data: tuple[Slice, ...]
    foundation_train: dict[str, Any]
    tasks: dict[str, TaskSpec]
    attacks: dict[str, str]  # name -> trigger spec string
    victim_train: dict[str, Any]
    victims: tuple[VictimSpec, ...]
    policy: dict[str, Any]  # overrides of the default policy used by every defence
    defences: tuple[str, ...]
    baselines: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    # "defend": every defence runs on a failed attack (victim ASR < 90%) too; "detect-only": only the
    # scan-only detectors do (there is no working backdoor to remove; the victim is still reported)
    failed_attacks: str = "defend"

    def trigger(self, attack: str) -> TriggerSpec:
        return parse_trigger(self.attacks[attack])

    def foundation_key(self) -> str:
        return key_of({k: self.raw[k] for k in ("model", "preprocess", "templates", "foundation")})

    def victim_key(self, v: VictimSpec) -> str:
        spec = self.attacks[v.attack] if v.attack else None
        task = self.raw["tasks"][v.task]
        return key_of([self.foundation_key(), task["victim_train"], spec, v.target, v.seed, self.victim_train])


def load_zoo(path: Path) -> ZooSpec:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    pre = raw["preprocess"]
    tasks = {
        name: TaskSpec(
            name,
            Slice.parse(t["victim_train"]),
            Slice.parse(t["defender"]),
            Slice.parse(t["extra_clean"]),
        )
        for name, t in raw["tasks"].items()
    }
    victims: list[VictimSpec] = []
    for block in raw["victims"]:
        for task in block["tasks"]:
            for attack in block.get("attacks", [None]):
                for st in block["seeds"]:
                    victims.append(VictimSpec(task, attack, int(st.get("target", 0)), int(st["seed"])))
    for v in victims:
        if v.attack is not None and v.attack not in raw["attacks"]:
            raise ValueError(f"{path}: victim attack {v.attack!r} is not in attacks: {sorted(raw['attacks'])}")
        if v.task not in tasks:
            raise ValueError(f"{path}: victim task {v.task!r} is not in tasks: {sorted(tasks)}")
    return ZooSpec(
        name=str(raw["name"]),
        model_cfg=raw["model"],
        preprocess=Preprocess(int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"])),  # type: ignore[arg-type]
        templates=tuple(raw["templates"]),
        foundation_data=tuple(Slice.parse(s) for s in raw["foundation"]["data"]),
        foundation_train=dict(raw["foundation"]["train"]),
        tasks=tasks,
        attacks=dict(raw["attacks"]),
        victim_train=dict(raw["victim_train"]),
        victims=tuple(victims),
        policy=dict(raw.get("policy") or {}),
        defences=tuple(raw["defences"]),
        baselines=dict(raw.get("baselines") or {}),
        raw=raw,
        failed_attacks=_failed_attacks(path, raw.get("failed_attacks", "defend")),
    )


def _failed_attacks(path: Path, value: Any) -> str:
    if value not in ("defend", "detect-only"):
        raise ValueError(f"{path}: failed_attacks must be 'defend' or 'detect-only', got {value!r}")
    return str(value)


def task_of(zoo: ZooSpec, task: str) -> ZeroShotTask:
    return ZeroShotTask(zoo.tasks[task].classnames, zoo.templates)


def _union(zoo: ZooSpec) -> tuple[ZeroShotTask, dict[str, int]]:
    """All classes of all datasets the foundation sees, with each dataset's label offset."""
    names: list[str] = []
    offsets: dict[str, int] = {}
    for s in zoo.foundation_data:
        if s.dataset not in offsets:
            offsets[s.dataset] = len(names)
            names.extend(datasets.CLASSES[s.dataset])
    return ZeroShotTask(tuple(names), zoo.templates), offsets


def with_task(bundle: ClipBundle, task: ZeroShotTask) -> ClipBundle:
    return ClipBundle(bundle.model, bundle.model_cfg, bundle.preprocess, task, bundle.weights_sha256, bundle.source)


class Zoo:
    """Builds (or reads from ``cache``) the foundation and the victims of a zoo."""

    def __init__(self, spec: ZooSpec, cache: Path, shared: Path, log: Log) -> None:
        self.spec, self.cache, self.shared, self.log = spec, cache, shared, log
        self.data_cache = cache / "data"
        self.timings: dict[str, float] = {}

    def images(self, s: Slice) -> ImageSet:
        return s.load(self.shared, self.data_cache)

    def foundation_dir(self) -> Path:
        return self.cache / "models" / f"foundation-{self.spec.foundation_key()}"

    def foundation_cached(self) -> bool:
        return (self.foundation_dir() / "open_clip_model.safetensors").exists()

    def victim_dir(self, v: VictimSpec) -> Path:
        return self.cache / "models" / f"victim-{v.name}-{self.spec.victim_key(v)}"

    def victim_cached(self, v: VictimSpec) -> bool:
        out = self.victim_dir(v)
        return (out / "open_clip_model.safetensors").exists() and (out.parent / f"{out.name}.json").exists()

    def foundation(self) -> Path:
        """Bundle directory of the foundation (union task); trained once, then cached."""
        out = self.foundation_dir()
        if (out / "open_clip_model.safetensors").exists():
            return out
        union, offsets = _union(self.spec)
        parts = [self.images(s) for s in self.spec.foundation_data]
        images = torch.cat([p.images for p in parts])
        labels = torch.cat(
            [p.labels + offsets[s.dataset] for p, s in zip(parts, self.spec.foundation_data, strict=True)]
        )
        t = self.spec.foundation_train
        seed = int(t.get("seed", 0))
        torch.manual_seed(seed)
        model = build_model(self.spec.model_cfg)
        config = FinetuneConfig(
            lr=float(t["lr"]),
            epochs=int(t["epochs"]),
            batch_size=int(t["batch_size"]),
            weight_decay=float(t.get("weight_decay", 0.05)),
            warmup_fraction=float(t.get("warmup_fraction", 0.03)),
            seed=seed,
        )
        self.log(
            f"foundation: training on {len(labels)} images ({union.classnames.__len__()} classes), {config.epochs} epochs"
        )
        t0 = time.perf_counter()
        last = [0.0]

        def progress(step: int, total: int) -> None:
            if time.perf_counter() - last[0] > 30 or step == total:
                last[0] = time.perf_counter()
                self.log(f"  foundation step {step}/{total} ({last[0] - t0:.0f} s)")

        pixels = images.float() / 255.0
        pretrain_clip(
            model, union, pixels, labels, self.spec.preprocess.mean, self.spec.preprocess.std, config, progress
        )
        self.timings["foundation_train_s"] = time.perf_counter() - t0
        if out.exists():
            shutil.rmtree(out)
        save_bundle(out, model.state_dict(), self.spec.model_cfg, self.spec.preprocess, union)
        meta = {"train_seconds": self.timings["foundation_train_s"], "images": int(len(labels))}
        (out.parent / f"{out.name}.json").write_text(json.dumps(meta), encoding="utf-8")
        return out

    def foundation_meta(self) -> dict[str, Any]:
        meta_file = self.foundation_dir().parent / f"{self.foundation_dir().name}.json"
        return json.loads(meta_file.read_text()) if meta_file.exists() else {}

    def base_for(self, task: str) -> Path:
        """The foundation as a bundle for one downstream task (the gate's clean reference)."""
        out = self.cache / "models" / f"base-{self.spec.foundation_key()}-{task}"
        if not (out / "open_clip_model.safetensors").exists():
            bundle = with_task(load_bundle(self.foundation()), task_of(self.spec, task))
            if out.exists():
                shutil.rmtree(out)
            save_bundle(out, bundle.model.state_dict(), bundle.model_cfg, bundle.preprocess, bundle.task)
        return out

    def victim(self, v: VictimSpec) -> tuple[Path, dict[str, Any]]:
        """Bundle directory of a victim and its build record (CA/ASR on the defender's data)."""
        out = self.victim_dir(v)
        meta_file = out.parent / f"{out.name}.json"
        if self.victim_cached(v):
            return out, json.loads(meta_file.read_text())
        task = self.spec.tasks[v.task]
        base = load_bundle(self.base_for(v.task))
        trigger = build_trigger(self.spec.trigger(v.attack), self.spec.preprocess.image_size) if v.attack else None
        vt = self.spec.victim_train
        t0 = time.perf_counter()
        victim = finetune_victim(
            base,
            self.images(task.victim_train),
            trigger,
            v.target,
            poison_rate=float(vt["poison_rate"]),
            epochs=int(vt["epochs"]),
            lr=float(vt["lr"]),
            seed=v.seed,
        )
        seconds = time.perf_counter() - t0
        clf = classifier_for(victim)
        defender = self.images(task.defender)
        base_ca = evaluate(classifier_for(base), defender).clean_accuracy
        m = evaluate(clf, defender, trigger, v.target) if trigger else evaluate(clf, defender)
        asr = m.attack_success_rate if trigger is not None else None  # None for a clean control
        meta = {
            "name": v.name,
            "task": v.task,
            "attack": v.attack,
            "trigger": self.spec.attacks[v.attack] if v.attack else None,
            "target": v.target,
            "seed": v.seed,
            "foundation_zero_shot_ca": base_ca,
            "clean_accuracy": m.clean_accuracy,
            "attack_success_rate": asr,
            "failed_attack": bool(asr is not None and asr < 0.9),
            "train_seconds": seconds,
            "sha256": sha256_state(victim.model.state_dict()),
        }
        if out.exists():
            shutil.rmtree(out)
        save_bundle(out, victim.model.state_dict(), victim.model_cfg, victim.preprocess, victim.task)
        meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out, meta
