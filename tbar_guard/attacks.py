"""Backdoor triggers in pixel space: BadNet, Blended, WaNet, SIG and a user-supplied image + mask.

Each trigger is described by a small serialisable spec (the same object appears in the policy
and in reports) and built for one image size into a :class:`Trigger`, whose ``apply`` maps float
pixels [N,3,H,W] in [0,1] to stamped pixels, quantised to 1/255 steps like a real uint8 image.
Parameters follow algorithms.md §5 (BackdoorBench defaults). Everything random is drawn from the
spec's ``seed``, so the same spec gives the same trigger.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from tbar_guard.errors import UsageError

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center", "random"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BadNetSpec(_Spec):
    """A solid (or checkerboard) square patch; 3×3 white at the bottom-right by default."""

    kind: Literal["badnet"] = "badnet"
    size: int = Field(3, ge=1, description="patch side in pixels at the model's image size")
    location: Corner | tuple[int, int] = "bottom-right"
    color: Literal["white", "black", "checkerboard"] | tuple[float, float, float] = "white"
    seed: int = 0


class BlendedSpec(_Spec):
    """``x' = (1-alpha)·x + alpha·T`` with T an image file or seeded uniform noise."""

    kind: Literal["blended"] = "blended"
    alpha: float = Field(0.2, gt=0, le=1)
    image: str | None = Field(None, description="path of the blend image; seeded uniform noise if unset")
    seed: int = 0


class WaNetSpec(_Spec):
    """Smooth warping field (BackdoorBench defaults k=4, s=0.5, grid_rescale=1)."""

    kind: Literal["wanet"] = "wanet"
    k: int = Field(4, ge=2)
    s: float = Field(0.5, ge=0)
    grid_rescale: float = Field(1.0, gt=0)
    seed: int = 0


class SigSpec(_Spec):
    """Horizontal sinusoid ``x' = clip(x + delta·sin(2π·j·f/W))`` with delta in 0..255 units."""

    kind: Literal["sig"] = "sig"
    delta: float = Field(40.0, gt=0, le=255)
    f: float = Field(6.0, gt=0)


class CustomSpec(_Spec):
    """A user-supplied pattern image and mask: ``x' = (1-m)·x + m·p``."""

    kind: Literal["custom"] = "custom"
    pattern: str = Field(description="path of the pattern image (RGB)")
    mask: str = Field(description="path of the mask image (grayscale; white = trigger)")


TriggerSpec = Annotated[BadNetSpec | BlendedSpec | WaNetSpec | SigSpec | CustomSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TriggerSpec)
KINDS = ("badnet", "blended", "wanet", "sig", "custom")


def spec_from_dict(raw: Any, where: str = "trigger") -> TriggerSpec:
    try:
        spec: TriggerSpec = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{where}.{'.'.join(str(p) for p in err['loc'][1:]) or 'kind'}: {err['msg']}" for err in exc.errors()
        )
        raise UsageError(f"invalid trigger spec: {problems}", hint=f"kind is one of {', '.join(KINDS)}") from None
    return spec


def _coerce(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (``location=[5,7],size=3``)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_trigger(text: str) -> TriggerSpec:
    """Parse ``kind[:key=value,...]``, inline JSON, or a path to a YAML/JSON file.

    Examples: ``badnet``, ``badnet:size=4,location=top-left``, ``blended:alpha=0.2,seed=3``,
    ``'{"kind": "sig", "delta": 20}'``, ``trigger.yaml``.
    """
    text = text.strip()
    if not text:
        raise UsageError("empty trigger spec", hint=f"e.g. badnet:size=3 (kinds: {', '.join(KINDS)})")
    if text.startswith("{"):
        try:
            return spec_from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UsageError(f"trigger spec {text!r} is not valid JSON: {exc}") from None
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise UsageError(f"trigger spec file {path} does not exist")
        try:
            raw_file = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError(f"trigger spec file {path} is not valid YAML/JSON: {exc}") from None
        return spec_from_dict(raw_file)
    kind, _, rest = text.partition(":")
    raw: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (p.strip() for p in _split_top_level(rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(
                f"trigger spec item {item!r} is not key=value", hint="e.g. badnet:size=3,location=top-left"
            )
        raw[key.strip()] = _coerce(value.strip())
    if isinstance(raw.get("location"), list):
        raw["location"] = tuple(raw["location"])
    return spec_from_dict(raw)


def spec_to_dict(spec: TriggerSpec) -> dict[str, Any]:
    out: dict[str, Any] = spec.model_dump(mode="json")
    return out


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255) / 255


def _load_image(path: str, size: int, mode: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"trigger image {p} does not exist", hint="give an existing image path in the trigger spec")
    with Image.open(p) as img:
        arr = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    t = torch.from_numpy(arr / 255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


@dataclass(frozen=True)
class Trigger:
    """A trigger built for one image size. ``mask``/``pattern`` are set for mask-type triggers.

    ``spec`` is None for a trigger that was not described by a spec (an inverted one)."""

    spec: TriggerSpec | None
    image_size: int
    mask: torch.Tensor | None = None  # [1,H,W] in [0,1]; [K,1,H,W] for a set of K triggers (see ``from_masks``)
    pattern: torch.Tensor | None = None  # [3,H,W] in [0,1]; [K,3,H,W] for a set
    grid: torch.Tensor | None = None  # WaNet sampling grid [1,H,W,2]
    additive: torch.Tensor | None = None  # SIG additive pattern [1,1,H,W] or [3,H,W]
    members: tuple[Trigger, ...] = ()  # a set of triggers of mixed kinds (see ``set_of``)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, pattern: torch.Tensor) -> Trigger:
        """A mask+pattern trigger, e.g. one recovered by trigger inversion (mask [H,W], pattern [3,H,W])."""
        size = int(mask.shape[-1])
        m = mask.detach().float().cpu().reshape(1, size, size).clamp(0, 1)
        return cls(None, size, mask=m, pattern=pattern.detach().float().cpu().clamp(0, 1))

    @classmethod
    def from_masks(cls, triggers: list[Trigger]) -> Trigger:
        """A set of mask + pattern triggers that acts as one: image i of a batch gets trigger i mod K
        (so a forget set stamped with it holds every trigger, and an ASR measured with it is their mean)."""
        if not triggers or any(t.mask is None or t.pattern is None for t in triggers):
            raise UsageError(
                f"a trigger set needs at least one mask + pattern trigger, got {len(triggers)} triggers",
                hint="build the members with Trigger.from_mask",
            )
        if len(triggers) == 1:
            return triggers[0]
        size = triggers[0].image_size
        if any(t.image_size != size for t in triggers):
            raise UsageError(
                f"trigger set members have image sizes {[t.image_size for t in triggers]}",
                hint="build every member for the model's image size",
            )
        masks = torch.stack([t.mask.reshape(1, size, size) for t in triggers if t.mask is not None])
        patterns = torch.stack([t.pattern.reshape(3, size, size) for t in triggers if t.pattern is not None])
        return cls(None, size, mask=masks, pattern=patterns)

    @classmethod
    def set_of(cls, triggers: list[Trigger]) -> Trigger:
        """A set of single triggers of any kinds (mask + pattern, additive, warp) that acts as one, as
        ``from_masks`` does: image i of a batch gets trigger i mod K. Mask + pattern members only: the
        stacked set of ``from_masks``."""
        if not triggers:
            raise UsageError("a trigger set needs at least one trigger, got none", hint="pass the triggers found")
        if any(t.count != 1 for t in triggers):
            raise UsageError(
                f"a trigger set's members must be single triggers, got sets of {[t.count for t in triggers]}",
                hint="pass the members of each set, not the sets",
            )
        if len(triggers) == 1:
            return triggers[0]
        if all(t.mask is not None and t.pattern is not None for t in triggers):
            return cls.from_masks(triggers)
        size = triggers[0].image_size
        if any(t.image_size != size for t in triggers):
            raise UsageError(
                f"trigger set members have image sizes {[t.image_size for t in triggers]}",
                hint="build every member for the model's image size",
            )
        return cls(None, size, members=tuple(triggers))

    def scaled(self, factor: float) -> Trigger:
        """The same trigger at ``factor`` x its strength: a mask's opacity (clamped to [0, 1]), an
        additive signal's amplitude, a warp's displacement; a set scales every member. A random-position
        patch has no strength to scale (its pattern is pasted), so it is refused."""
        if factor <= 0:
            raise UsageError(f"a trigger strength factor must be > 0, got {factor}", hint="use e.g. 0.5 or 1.0")
        if factor == 1.0:
            return self
        if self.members:
            return replace(self, members=tuple(m.scaled(factor) for m in self.members))
        if isinstance(self.spec, BadNetSpec) and self.spec.location == "random":
            raise UsageError(
                "a random-position BadNet patch cannot be scaled", hint="leave the forget-set strengths at [1.0]"
            )
        if self.grid is not None:
            identity = _identity_grid(self.image_size).to(self.grid.device)
            return replace(self, grid=(identity + factor * (self.grid - identity)).clamp(-1, 1))
        if self.additive is not None:
            return replace(self, additive=self.additive * factor)
        assert self.mask is not None
        return replace(self, mask=(self.mask * factor).clamp(0, 1))

    @property
    def count(self) -> int:
        """How many triggers this is (a set made by ``from_masks`` or ``set_of`` holds several)."""
        if self.members:
            return len(self.members)
        return int(self.mask.shape[0]) if self.mask is not None and self.mask.ndim == 4 else 1

    def apply(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stamp float pixels [N,3,H,W] in [0,1]; returns a new tensor on the same device."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-1] != self.image_size:
            raise UsageError(
                f"trigger built for {self.image_size}px images got a batch of shape {tuple(pixels.shape)}",
                hint="build the trigger with the model's image size",
            )
        dev = pixels.device
        if self.members:  # a mixed set: image i gets member i mod K
            out = pixels.clone()
            k = len(self.members)
            for j, member in enumerate(self.members):
                if j < pixels.shape[0]:
                    out[j::k] = member.apply(pixels[j::k], generator)
            return out
        if isinstance(self.spec, BadNetSpec) and self.spec.location == "random":
            return _quantise(self._random_patch(pixels, generator))
        if self.grid is not None:
            grid = self.grid.to(dev).expand(pixels.shape[0], -1, -1, -1)
            return _quantise(F.grid_sample(pixels, grid, align_corners=True))
        if self.additive is not None:
            return _quantise(pixels + self.additive.to(dev))
        assert self.mask is not None and self.pattern is not None
        m, p = self.mask.to(dev), self.pattern.to(dev)
        if m.ndim == 4:  # a set: image i gets trigger i mod K
            pick = torch.arange(pixels.shape[0], device=dev) % m.shape[0]
            m, p = m[pick], p[pick]
        return _quantise((1 - m) * pixels + m * p)

    def _random_patch(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        assert isinstance(self.spec, BadNetSpec) and self.pattern is not None
        gen = generator or torch.Generator().manual_seed(self.spec.seed)
        n, size, side = pixels.shape[0], self.image_size, self.spec.size
        rows = torch.randint(0, size - side + 1, (n,), generator=gen)
        cols = torch.randint(0, size - side + 1, (n,), generator=gen)
        out = pixels.clone()
        patch = self.pattern[:, :side, :side].to(pixels.device)
        for i in range(n):
            r, c = int(rows[i]), int(cols[i])
            out[i, :, r : r + side, c : c + side] = patch
        return out


def _patch_pattern(spec: BadNetSpec, side: int) -> torch.Tensor:
    if spec.color == "white":
        return torch.ones(3, side, side)
    if spec.color == "black":
        return torch.zeros(3, side, side)
    if spec.color == "checkerboard":
        board = torch.zeros(3, side, side)
        board[:, ::2, ::2] = 1
        board[:, 1::2, 1::2] = 1
        return board
    return torch.tensor(spec.color, dtype=torch.float32).view(3, 1, 1).expand(3, side, side).clone()


def _badnet(spec: BadNetSpec, size: int) -> Trigger:
    side = spec.size
    if side > size:
        raise UsageError(f"badnet patch size {side} exceeds the image size {size}", hint="use a smaller size")
    patch = _patch_pattern(spec, side)
    if spec.location == "random":
        return Trigger(spec, size, pattern=patch)
    corners = {
        "bottom-right": (size - side, size - side),
        "bottom-left": (size - side, 0),
        "top-right": (0, size - side),
        "top-left": (0, 0),
        "center": ((size - side) // 2, (size - side) // 2),
    }
    if isinstance(spec.location, tuple):
        row, col = spec.location
        if not (0 <= row <= size - side and 0 <= col <= size - side):
            raise UsageError(f"badnet location {spec.location} puts the patch outside a {size}px image")
    else:
        row, col = corners[spec.location]
    mask = torch.zeros(1, size, size)
    pattern = torch.zeros(3, size, size)
    mask[:, row : row + side, col : col + side] = 1
    pattern[:, row : row + side, col : col + side] = patch
    return Trigger(spec, size, mask=mask, pattern=pattern)


def _blended(spec: BlendedSpec, size: int) -> Trigger:
    if spec.image:
        target = _load_image(spec.image, size, "RGB")
    else:
        target = torch.rand(3, size, size, generator=torch.Generator().manual_seed(spec.seed))
    return Trigger(spec, size, mask=torch.full((1, size, size), spec.alpha), pattern=target)


def _identity_grid(size: int) -> torch.Tensor:
    """The sampling grid that leaves an image unchanged, [1,H,W,2] in grid_sample's (x, y) order."""
    axis = torch.linspace(-1, 1, size)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack((yy, xx), dim=2)[None]


def _wanet(spec: WaNetSpec, size: int) -> Trigger:
    gen = torch.Generator().manual_seed(spec.seed)
    ins = torch.rand(1, 2, spec.k, spec.k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    noise_grid = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = torch.clamp((_identity_grid(size) + spec.s * noise_grid / size) * spec.grid_rescale, -1, 1)
    return Trigger(spec, size, grid=grid)


def _sig(spec: SigSpec, size: int) -> Trigger:
    cols = torch.arange(size, dtype=torch.float32)
    wave = (spec.delta / 255.0) * torch.sin(2 * math.pi * cols * spec.f / size)
    return Trigger(spec, size, additive=wave.view(1, 1, 1, size).expand(1, 1, size, size).clone())


def _custom(spec: CustomSpec, size: int) -> Trigger:
    return Trigger(spec, size, mask=_load_image(spec.mask, size, "L"), pattern=_load_image(spec.pattern, size, "RGB"))


def build_trigger(spec: TriggerSpec, image_size: int) -> Trigger:
    """Build ``spec`` for square images of side ``image_size``."""
    if isinstance(spec, BadNetSpec):
        return _badnet(spec, image_size)
    if isinstance(spec, BlendedSpec):
        return _blended(spec, image_size)
    if isinstance(spec, WaNetSpec):
        return _wanet(spec, image_size)
    if isinstance(spec, SigSpec):
        return _sig(spec, image_size)
    return _custom(spec, image_size)


def describe(spec: TriggerSpec) -> str:
    """One line for reports, e.g. ``badnet(size=3, location=bottom-right, color=white, seed=0)``."""
    fields = {k: v for k, v in spec_to_dict(spec).items() if k != "kind"}
    return f"{spec.kind}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
