"""The YAML policy: validated once into a frozen object; every bad key path is reported at once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tbar_guard.attacks import TriggerSpec
from tbar_guard.errors import PolicyError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataPolicy(_Section):
    path: str | None = Field(None, min_length=1)
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
    select: Literal["lowest-asr", "best-ca"] = "lowest-asr"
    asr_tolerance: float = Field(0.01, ge=0, le=1)
    extend_inverted: bool = True
    # with extend_inverted: the coarse search goes on past the first zero-ASR α while the extension could
    # take the next one (session 13: before, it stopped there and the extension had nothing to move to)
    extend_past_zero: bool = True
    # the same extension for a known trigger (sanitize with --trigger): its ASR is the real one, but the
    # backdoor left at the first α of the floor is the one a clean fine-tune brings back (session 15)
    extend_known: bool = False
    # a known trigger's asr_tolerance (None: asr_tolerance): 0 = the strict lowest validation ASR within the CA
    # floor. Default 0 since session 16, with unlearn.known_epochs 10: chosen on the development zoo (README
    # "Session 16"); an inverted trigger keeps asr_tolerance (its ASR floors before the real one's)
    known_asr_tolerance: float | None = Field(0.0, ge=0, le=1)
    # gate (inverted trigger) only: the α search and the verdict measure ASR with the inverted trigger at this
    # factor of its strength (Trigger.scaled: mask opacity, additive amplitude); the forget set keeps it at 1.
    # An inversion finds the *weakest* trigger that opens the backdoor, whose ASR floors at a smaller α than
    # the real trigger's (session 17); a stronger probe floors later. 1.0 = the trigger as inverted; 2.0 the
    # default since session 19 (measured on the development zoo: README "Sessions 18–19")
    inverted_probe_strength: float = Field(2.0, gt=0, le=4)

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


class UnlearnPolicy(_Section):
    anchor_weight: float = Field(3.0, ge=0)
    clean_twins: bool = True
    reinvert_rounds: int = Field(2, ge=0, le=5)
    reinvert_z_threshold: float | None = Field(-2.5, lt=0)
    reinvert_area_ratio: float = Field(0.5, ge=0, lt=1)
    companions: tuple[Literal["blend"], ...] = ("blend",)
    # a companion whose strength is at or above detect.differential.blend.ratio x the median but below this
    # joins on trial: when the removal with it misses the policy, the gate removes without it (None = off;
    # default 0.99 since session 12, chosen on the development zoo: README "the companion on trial")
    companion_trial_ratio: float | None = Field(0.99, gt=0, le=1)
    # the scan families whose deciding trigger the gate hardens: "mask" (re-inversion rounds, then the
    # companions), "additive" (the companions only: the rounds search masks against the scan's mask areas)
    harden_families: tuple[Literal["mask", "additive"], ...] = ("mask",)
    # known trigger only: the forget set's triggered images come at these strengths of the trigger, in
    # equal shares (a mask's opacity, an additive amplitude, a warp's displacement; [1.0] = as given)
    known_strengths: tuple[float, ...] = Field((1.0,), min_length=1, max_length=8)
    # known trigger only: the unlearning fine-tune's epochs (None: sanitize.finetune.epochs, as for every
    # other forget-set fine-tune); 10 since session 16, with alpha.known_asr_tolerance 0
    known_epochs: int | None = Field(10, ge=1, le=100)

    @field_validator("known_strengths")
    @classmethod
    def _strengths_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [v for v in value if not 0 < v <= 4]
        if bad:
            raise ValueError(f"known_strengths must each be in (0, 4], got {bad}")
        return value


class ReemergencePolicy(_Section):
    enabled: bool = True
    images: int = Field(1000, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)


_Coefficient = Annotated[float, Field(ge=0, le=2)]


class DisentanglementPolicy(_Section):
    enabled: bool = True
    images: int = Field(512, ge=1)
    alphas_clean: tuple[_Coefficient, ...] = Field((0.0, 0.5, 1.0), min_length=1, max_length=5)
    trigger_fractions: tuple[_Coefficient, ...] = Field((1.0, 0.5, 0.0), min_length=1, max_length=5)

    @model_validator(mode="after")
    def _speaks_to_the_removal(self) -> DisentanglementPolicy:
        if 1.0 not in self.trigger_fractions:
            raise ValueError(
                f"trigger_fractions {list(self.trigger_fractions)} lack 1.0 (alpha_t = -chosen alpha, the removal made)"
            )
        return self


class SanitizePolicy(_Section):
    method: Literal["unlearn", "anchored", "tbar"] = "unlearn"
    agnostic_method: Literal["unlearn", "anchored", "tbar"] | None = None
    forget_size: int = Field(1000, ge=1)
    finetune: FinetunePolicy = FinetunePolicy()
    anchored: AnchoredPolicy = AnchoredPolicy()
    unlearn: UnlearnPolicy = UnlearnPolicy()
    alpha: AlphaPolicy = AlphaPolicy()
    reemergence: ReemergencePolicy = ReemergencePolicy()
    disentanglement: DisentanglementPolicy = DisentanglementPolicy()


class AcceptPolicy(_Section):
    ca_floor: float = Field(0.95, gt=0, le=1)
    asr_ceiling: float = Field(0.05, ge=0, le=1)
    max_reemergence_asr: float | None = Field(None, ge=0, le=1)
    reference_rate_ceiling: bool = False


class DecreePolicy(_Section):
    steps: int = Field(300, ge=1)
    rule: Literal["calibrated", "paper"] = "calibrated"
    paper_threshold: float = Field(0.1, gt=0, le=1)
    calibrated_ratio: float = Field(0.5, gt=0, lt=1)
    z_threshold: float = Field(-2.5, lt=0)
    reference_pl1: tuple[float, ...] = ()
    normalization: Literal["model", "imagenet"] = "model"


DifferentialFamily = Literal["mask", "blend", "additive"]


class BlendFamilyPolicy(_Section):
    pattern_cells: int = Field(0, ge=0)
    strength_weight: float = Field(5.0, gt=0)
    z_threshold: float | None = Field(None, lt=0)
    ratio: float = Field(0.7, ge=0, lt=1)

    @model_validator(mode="after")
    def _some_rule(self) -> BlendFamilyPolicy:
        if self.z_threshold is None and self.ratio == 0:
            raise ValueError("z_threshold is null and ratio is 0: the blend family could never flag anything")
        return self


class AdditiveFamilyPolicy(_Section):
    pattern_cells: int = Field(0, ge=0)
    shape: Literal["full", "separable"] = "separable"
    equal_effect: float | None = Field(0.9, gt=0, le=1)
    amplitude_weight: float = Field(5.0, gt=0)
    max_amplitude: float = Field(0.5, gt=0, le=1)
    z_threshold: float | None = Field(None, lt=0)
    ratio: float = Field(0.45, ge=0, lt=1)
    relative_ratio: float | None = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _some_rule(self) -> AdditiveFamilyPolicy:
        if self.z_threshold is None and self.ratio == 0:
            raise ValueError("z_threshold is null and ratio is 0: the additive family could never flag anything")
        return self


class DifferentialPolicy(_Section):
    families: tuple[DifferentialFamily, ...] = Field(("mask", "additive"), min_length=1)
    search_all: bool = False
    steps: int = Field(100, ge=1)
    mask_cells: int = Field(7, ge=1)
    area_weight: float = Field(5.0, gt=0)
    reference_weight: float = Field(1.0, ge=0)
    z_threshold: float | None = Field(None, lt=0)
    area_ratio: float = Field(0.6, ge=0, lt=1)
    max_transfer: float | None = Field(0.25, gt=0, le=1)
    targets_per_chunk: int = Field(11, ge=1)
    blend: BlendFamilyPolicy = BlendFamilyPolicy()
    additive: AdditiveFamilyPolicy = AdditiveFamilyPolicy()

    @model_validator(mode="after")
    def _families_distinct(self) -> DifferentialPolicy:
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families {list(self.families)} name a family twice")
        if self.z_threshold is None and self.area_ratio == 0:
            raise ValueError("z_threshold is null and area_ratio is 0: the mask family could never flag anything")
        return self


class DetectPolicy(_Section):
    method: Literal["differential", "decree"] = "differential"
    reference_models: tuple[str, ...] = ()
    shadow_images: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=2)
    max_seconds: float | None = Field(None, gt=0)
    min_proxy_asr: float = Field(0.5, ge=0, le=1)
    min_lift: float = Field(0.3, ge=0, le=1)
    differential: DifferentialPolicy = DifferentialPolicy()
    decree: DecreePolicy = DecreePolicy()

    @model_validator(mode="after")
    def _batch_fits(self) -> DetectPolicy:
        if self.batch_size > self.shadow_images:
            raise ValueError(f"batch_size {self.batch_size} exceeds shadow_images {self.shadow_images}")
        return self


class RegistryPolicy(_Section):
    target_name: str | None = Field(None, min_length=1)
    alias: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    experiment: str = Field("tbar-guard", min_length=1)


class Policy(_Section):
    version: Literal[1] = 1
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    data: DataPolicy = DataPolicy()
    sanitize: SanitizePolicy = SanitizePolicy()
    accept: AcceptPolicy = AcceptPolicy()
    detect: DetectPolicy = DetectPolicy()
    registry: RegistryPolicy = RegistryPolicy()
    trigger: TriggerSpec | None = None
    target: str | None = None

    @model_validator(mode="after")
    def _reemergence_measured_when_judged(self) -> Policy:
        if self.accept.max_reemergence_asr is not None and not self.sanitize.reemergence.enabled:
            raise ValueError(
                f"accept.max_reemergence_asr is {self.accept.max_reemergence_asr} but "
                "sanitize.reemergence.enabled is false: the re-emergence ASR it judges would not be measured"
            )
        return self

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

data:                # the clean images and how they are split (disjoint, seeded)
  path: null             # folder of class sub-folders or .npz; --data overrides (relative to the policy file)
  forget_fraction: 0.4   # pool the forget set is drawn from
  val_fraction: 0.3      # held-out split that chooses alpha
  test_fraction: 0.3     # split that reports before/after; never used to choose alpha

sanitize:
  # Every method negates a trigger vector tau: theta = theta_b - alpha * tau.
  #   tbar:     tau = theta_{b+t} - theta_b, theta_{b+t} = fine-tune on the forget set (stamped images
  #             -> target), as in the paper.
  #   anchored: same, plus a KL term that holds the model's predictions on the clean twins of the
  #             forget images in place, and softened logits; keeps clean accuracy far better.
  #   unlearn:  tau = theta_b - theta_u, theta_u = fine-tune on the stamped images with their TRUE
  #             labels (plus the KL term on the clean twins): the vector that points from a model that
  #             ignores the trigger back to the backdoored one; alpha = 1 is theta_u itself.
  method: unlearn        # unlearn | anchored | tbar
  agnostic_method: null  # the method when the trigger is an inverted one (gate); null = method
  forget_size: 1000      # triggered images (labelled with the target) used to learn the trigger vector
  finetune:              # image tower only, cross-entropy through the frozen zero-shot head
    lr: 0.0001
    epochs: 5
    batch_size: 64
    weight_decay: 0.0
    warmup_fraction: 0.1   # linear warmup, then cosine decay
    grad_clip: 1.0
  anchored:              # options of method "anchored" (ignored by the others)
    temperature: 10.0    # logits / temperature in the forget cross-entropy
    anchor_weight: 3.0   # weight of KL(original predictions || current) on the clean twins
  unlearn:               # options of method "unlearn" (ignored by the others)
    anchor_weight: 3.0   # weight of KL(original predictions || current) on the clean twins (0 = off)
    clean_twins: true    # also train on the clean twins at their true labels (twice the fine-tuning steps)
    reinvert_rounds: 2   # gate only (inverted trigger, mask family): after unlearning, invert the target
                         # class again on the unlearned model; while that trigger is still anomalous, add it
                         # to the forget set and unlearn again; at most this many added triggers (0 = off)
    reinvert_z_threshold: -2.5  # "still anomalous": the re-inverted mask's robust z-score against the scan's
    reinvert_area_ratio: 0.5    # classes is below this (null = off), or its area is below this x their median.
                         # A test of one class chosen beforehand (not the smallest of many, as in detection),
                         # so a z-score criterion is sound here
    companions: [blend]  # gate only: after the rounds, invert the target class as a full-image blend on the
                         # unlearned model; it joins the forget set when its strength is below
                         # detect.differential.blend.ratio x the median of a sample of classes (one chunk),
                         # it works and it is specific (transfer check); [] = off
    companion_trial_ratio: 0.99  # gate only: a companion at or above that ratio but below this x the median
                         # joins on trial: when the removal with it misses the policy, the gate removes
                         # without it and says so (null = off)
    harden_families: [mask]  # gate only: the scan families whose inverted trigger gets the above (mask: the
                         # rounds, then the companions; additive: the companions, in a set with the scan's
                         # additive signal); [] = neither
    known_strengths: [1.0]   # known trigger (sanitize) only: the forget set's stamped images come at these
                         # strengths of the trigger, in equal shares (mask opacity, additive amplitude, warp
                         # displacement), e.g. [0.5, 1.0]; [1.0] = the trigger as given
    known_epochs: 10         # known trigger (sanitize) only: the unlearning fine-tune's epochs (null: finetune.epochs);
                             # 10 since session 16, with alpha.known_asr_tolerance 0 (README "Session 16")
  alpha:                 # coarse-to-fine search; the backdoor may need alpha > 1
    min: 0.0
    max: 6.0
    coarse_step: 0.5
    fine_step: 0.1
    select: lowest-asr   # lowest-asr: lowest ASR within the CA floor (ties: smaller alpha);
                         # best-ca: highest CA among alphas within the floor AND under the ASR ceiling
    asr_tolerance: 0.01  # lowest-asr only: take the highest-CA alpha whose ASR is within this of the
                         # lowest (never above the ceiling when the lowest is under it); 0 = strict
    extend_inverted: true  # gate (inverted trigger): then go on to larger alphas while validation CA stays
                           # within one standard error of the chosen alpha's (and ASR within the tolerance,
                           # under the ceiling): an inverted trigger's ASR floors before the real one's
    extend_past_zero: true # with extend_inverted: the coarse search goes on past the first alpha whose ASR is
                           # 0 while the extension could take the next one (false: it stops there)
    extend_known: false    # the same extension (and extend_past_zero) for a known trigger (sanitize): what
                           # is left of the backdoor at the first alpha of the ASR floor is what a clean
                           # fine-tune brings back (re-emergence); see README "How removal works"
    known_asr_tolerance: 0.0  # a known trigger's asr_tolerance (null: asr_tolerance); 0 = the strict lowest
                           # validation ASR within the CA floor (since session 16, with unlearn.known_epochs 10)
    inverted_probe_strength: 2.0  # gate only: the alpha search and the verdict measure ASR with the inverted
                           # trigger at this factor of its strength (the forget set keeps it at 1): an inversion
                           # finds the weakest trigger that works, whose ASR floors before the real one's
  reemergence:           # after a removal: fine-tune the sanitized model on clean images, measure ASR again
    enabled: true          # repair images: forget-split images the forget set did not use (test split never)
    images: 1000           # clean images (true labels), cross-entropy through the frozen zero-shot head
    lr: 0.0001
    epochs: 5
    batch_size: 64
  disentanglement:       # evidence: weight-disentanglement error xi of the trigger vector vs a clean vector
    enabled: true          # clean vector: forget-split images fine-tuned with their true labels (forget recipe)
    images: 512            # held-out validation images, evaluated clean and stamped with the trigger
    alphas_clean: [0.0, 0.5, 1.0]      # coefficients of the clean vector
    trigger_fractions: [1.0, 0.5, 0.0]  # alpha_t = -fraction x chosen alpha (must include 1.0)

accept:
  ca_floor: 0.95         # keep clean accuracy >= ca_floor x the original model's
  asr_ceiling: 0.05      # the backdoor counts as removed when attack success rate <= this
  max_reemergence_asr: null  # when set: "unremoved" if the ASR after the clean fine-tune exceeds this
  reference_rate_ceiling: false  # gate (inverted trigger) with a reference model: true = the ceiling is
                         # max(asr_ceiling, the share the same trigger sends to the target on the clean
                         # reference), on each split (a clean model's rate is not a backdoor); the alpha
                         # choice is unchanged. The reference's rate is reported either way

detect:                  # trigger inversion (scan, gate)
  # differential: per-class compact trigger search through the zero-shot head, penalised where it
  #               also moves a clean reference model; flags a class whose trigger is anomalously small.
  # decree:       faithful DECREE (embedding collapse, PL1), the paper's reference method.
  method: differential   # differential | decree
  reference_models: []   # clean references: bundle paths or models:/ URIs (base model, promoted version)
  shadow_images: 256     # clean images the inversion optimises over
  batch_size: 8          # images per optimisation step (the benchmark's setting: see README "Time")
  max_seconds: null      # wall-clock budget for one inversion
  min_proxy_asr: 0.5     # an inverted trigger is actionable when it sends >= this share to one class
  min_lift: 0.3          # ... and that share exceeds the class's share on clean images by this much
  differential:
    # Trigger families searched per class; flagged when any family's rule fires; the target and
    # the trigger handed to removal come from the first listed family whose rule fired.
    #   mask:  a compact mask + pattern (patches: BadNet; also finds most blends)
    #   blend: a full-image blend (1 - a) x + a p with one strength a per class (Blended, SIG);
    #          opt-in: on the benchmark zoo it found nothing the mask family missed, at twice the time
    #   additive: a faint full-image signal x + eps d with one amplitude eps per class (SIG: stripes,
    #          gratings); about doubles the scan time; [mask] alone: policies/mask-only.yaml
    families: [mask, additive]  # one or more of: mask, blend, additive
    search_all: false    # false: stop at the first family that fired (the verdict and trigger are the same;
                         # the later families' evidence is not computed); true: search every family
    steps: 100           # optimisation steps per chunk of classes (each family)
    mask_cells: 7        # the mask is a 7x7 grid upsampled to the image (no scattered pixels)
    area_weight: 5.0     # weight of the mask area in the loss
    reference_weight: 1.0  # weight of KL(reference on clean || reference on stamped) (both families)
    z_threshold: null    # flag when the smallest per-class mask has a robust z-score below this (null = off)
    area_ratio: 0.6      # ... or is smaller than this fraction of the median mask (0 = off); rule fixed on
                         # the development zoo bench/zoo-dev.yaml (README "Detection")
    max_transfer: 0.25   # with a reference model: flag only a trigger specific to the candidate, i.e. the
                         # share it sends to the class on the reference / on the candidate <= this (null = off)
    targets_per_chunk: 11  # classes optimised together (memory vs speed; both families; 43 classes: 4 chunks)
    blend:               # options of the blend family (rule fixed on the MNIST development zoo)
      pattern_cells: 0       # the pattern is a grid of this side upsampled to the image (0 = full resolution)
      strength_weight: 5.0   # weight of the blend strength a in the loss
      z_threshold: null      # flag when the smallest per-class strength has a robust z-score below this (null = off)
      ratio: 0.7             # ... or is smaller than this fraction of the median strength (0 = off)
    additive:            # options of the additive family (rule fixed on the development zoo bench/zoo-dev.yaml)
      pattern_cells: 0       # shape full: the signal is a grid of this side upsampled to the image (0 = full resolution)
      shape: separable       # separable: a profile across + a profile down the image per channel (stripes,
                             # gratings, ramps: far fewer universal adversarial perturbations); full: any signal
      equal_effect: 0.9      # score = the amplitude at which the class's optimised signal sends this share of
                             # held-out images to the class (null = the optimiser's penalised amplitude)
      amplitude_weight: 5.0  # weight of the amplitude eps in the loss
      max_amplitude: 0.5     # eps = max_amplitude * sigmoid(raw): the largest L-inf amplitude searched
      z_threshold: null      # flag when the smallest per-class amplitude has a robust z-score below this (null = off)
      ratio: 0.45            # ... or is smaller than this fraction of the median amplitude (0 = off)
      relative_ratio: 0.2    # with a reference model, where the rule above did not fire: also flag when the
                             # smallest quotient amplitude on the candidate / amplitude the same search needs
                             # on the reference itself is below this x the median quotient (one more search,
                             # on the reference; null = off); fixed on the development zoo (README "Detection")
  decree:
    steps: 300           # optimisation steps (batches); the paper runs up to 1000 epochs
    rule: calibrated     # calibrated: compare PL1 with the references; paper: PL1 < paper_threshold
    paper_threshold: 0.1
    calibrated_ratio: 0.5  # flag when PL1 < ratio x the reference median ...
    z_threshold: -2.5    # ... or (3+ references) when its robust z-score is below this
    reference_pl1: []    # a stored reference distribution of PL1 values
    normalization: model # model: the model's own mean/std; imagenet: as the official DECREE code

registry:                # gate with a models:/ URI
  target_name: null      # registered model for sanitized versions; null = "<source name>-sanitized"
  alias: null            # alias to move on pass (e.g. production); never moved on failure
  experiment: tbar-guard

trigger: null            # known trigger for audits, e.g. {kind: badnet, size: 3, location: bottom-right}
target: null             # its target class (name or index); gate then also reports ASR under it
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
        raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}", hint="check the --policy path") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    policy = policy_from_dict(raw, str(path))
    if policy.data.path is not None and not Path(policy.data.path).is_absolute():
        resolved = str((path.parent / policy.data.path).resolve())
        policy = policy.model_copy(update={"data": policy.data.model_copy(update={"path": resolved})})
    return policy
