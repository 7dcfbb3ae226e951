"""The YAML policy: validated once into a frozen object; every bad key path is reported at once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tbar_guard.attacks import TriggerSpec
from tbar_guard.errors import PolicyError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataPolicy(_Section):
    forget_fraction: float = Field(0.4, gt=0, lt=1)
    val_fraction: float = Field(0.3, gt=0, lt=1)
    test_fraction: float = Field(0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _fractions_fit(self) -> DataPolicy:
        total = self.forget_fraction + self.val_fraction + self.test_fraction
        if total > 1.0 + 1e-9:
            raise ValueError(f"forget_fraction + val_fraction + test_fraction = {total:.3f} exceeds 1")
        return self


class FinetunePolicy(_Section):
    lr: float = Field(1e-4, gt=0, le=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)


class AlphaPolicy(_Section):
    min: float = Field(0.0, ge=0)
    max: float = Field(6.0, gt=0)
    coarse_step: float = Field(0.5, gt=0)
    fine_step: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _range_not_empty(self) -> AlphaPolicy:
        if self.max <= self.min:
            raise ValueError(f"alpha range is empty: max {self.max} <= min {self.min}")
        if self.fine_step > self.coarse_step:
            raise ValueError(f"fine_step {self.fine_step} is larger than coarse_step {self.coarse_step}")
        return self


class AnchoredPolicy(_Section):
    temperature: float = Field(10.0, gt=0)
    anchor_weight: float = Field(3.0, gt=0)


class SanitizePolicy(_Section):
    method: Literal["anchored", "tbar"] = "anchored"
    forget_size: int = Field(1000, ge=1)
    finetune: FinetunePolicy = FinetunePolicy()
    anchored: AnchoredPolicy = AnchoredPolicy()
    alpha: AlphaPolicy = AlphaPolicy()


class AcceptPolicy(_Section):
    ca_floor: float = Field(0.95, gt=0, le=1)
    asr_ceiling: float = Field(0.05, ge=0, le=1)


class Policy(_Section):
    version: Literal[1] = 1
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    data: DataPolicy = DataPolicy()
    sanitize: SanitizePolicy = SanitizePolicy()
    accept: AcceptPolicy = AcceptPolicy()
    trigger: TriggerSpec | None = None

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.model_dump(mode="json")
        return out


DEFAULT_POLICY_YAML = """\
# tbar-guard policy. Every key is optional; this file lists the defaults.
# Validate with: tbar-guard sanitize --policy THIS_FILE ... (errors list every bad key path).
version: 1
seed: 0              # one seed for splits, forget set, fine-tuning and inversion
device: auto         # auto | cpu | cuda | cuda:N

data:                # how the clean images given with --data are split (disjoint, seeded)
  forget_fraction: 0.4   # pool the forget set is drawn from
  val_fraction: 0.3      # held-out split that chooses alpha
  test_fraction: 0.3     # split that reports before/after; never used to choose alpha

sanitize:
  # Both methods negate a trigger vector: theta = theta_b - alpha * (theta_{b+t} - theta_b).
  #   tbar:     theta_{b+t} = fine-tune on the forget set (stamped images -> target), as in the paper.
  #   anchored: same, plus a KL term that holds the model's predictions on the clean twins of the
  #             forget images in place, and softened logits; keeps clean accuracy far better.
  method: anchored       # anchored | tbar
  forget_size: 1000      # triggered images (labelled with the target) used to learn the trigger vector
  finetune:              # image tower only, cross-entropy through the frozen zero-shot head
    lr: 0.0001
    epochs: 5
    batch_size: 64
    weight_decay: 0.0
    warmup_fraction: 0.1   # linear warmup, then cosine decay
    grad_clip: 1.0
  anchored:              # options of method "anchored" (ignored by "tbar")
    temperature: 10.0    # logits / temperature in the forget cross-entropy
    anchor_weight: 3.0   # weight of KL(original predictions || current) on the clean twins
  alpha:                 # coarse-to-fine search; the backdoor may need alpha > 1
    min: 0.0
    max: 6.0
    coarse_step: 0.5
    fine_step: 0.1

accept:
  ca_floor: 0.95         # keep clean accuracy >= ca_floor x the original model's
  asr_ceiling: 0.05      # the backdoor counts as removed when attack success rate <= this

trigger: null            # known trigger for audits, e.g. {kind: badnet, size: 3, location: bottom-right}
"""


def _format_errors(exc: ValidationError) -> tuple[str, ...]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        problems.append(f"{loc}: {err['msg']}{shown}")
    return tuple(problems)


def policy_from_dict(raw: Any, source: str = "policy") -> Policy:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the policy must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(
            f"{source}: invalid policy ({exc.error_count()} problem(s))",
            problems=_format_errors(exc),
            hint="run `tbar-guard init-policy` for a commented default",
        ) from None


def load_policy(path: Path | None) -> Policy:
    """Read and validate a YAML policy; ``None`` gives the defaults."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy {path}: {exc.strerror or exc}", hint="check the --policy path"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return policy_from_dict(raw, str(path))
