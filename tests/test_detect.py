"""DECREE inversion, verdict rules, target inference and evidence pictures on real tiny encoders.

The backdoored encoder is a random conv net whose embedding is pulled to a fixed vector ``v`` when
the bottom-right 3x3 patch of the (un-normalised) image is white: a sigmoid gate on the patch mean.
A gate that sharp gives almost no gradient from DECREE's random start, so, as a conv feature
reading that corner would, the encoder also responds weakly and linearly to the patch's
brightness, along a direction ``u`` orthogonal to ``v`` (centred on clean images, so clean
predictions are not pushed towards the target). Everything is a differentiable function of the
pixels; nothing is mocked. The clean twin is the same network without either term.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tbar_guard import detect, pictures
from tbar_guard.detect import (
    DetectionDecision,
    Inversion,
    InversionConfig,
    decide_calibrated,
    decide_paper,
    disentanglement_error,
    infer_target,
    invert_trigger,
    stamp,
)
from tbar_guard.errors import DataError, RemovalError, UsageError

SIZE = 32  # image side; the trigger is the bottom-right 3x3 patch
PATCH = 3
DIM = 16
CLASSES = 10
TARGET = 7
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OpenAI constants
STD = (0.26862954, 0.26130258, 0.27577711)
FAST = InversionConfig(steps=200, batch_size=32)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Smooth colour fields plus pixel noise, in [0, 0.85]: no clean image has a white corner."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (0.85 * x).clamp(0, 1)


def corner_mean(pixels: torch.Tensor) -> torch.Tensor:
    return pixels[:, :, -PATCH:, -PATCH:].mean(dim=(1, 2, 3))


class CornerEncoder(nn.Module):
    """``normalised [N,3,H,W] -> [N,DIM]``; with ``backdoor`` the white-corner pull towards ``v``."""

    def __init__(self, backdoor: bool, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            )
            self.proj = nn.Linear(128, DIM, bias=False)
            v = torch.randn(DIM)
            u = torch.randn(DIM)
        u = u - (u @ v) / (v @ v) * v
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        reference = smooth_images(256, seed=1234)
        with torch.no_grad():
            feats = self.body((reference - self.mean) / self.std)
            self.register_buffer("center", feats.mean(0))  # centred: clean embeddings are not collinear
            typical = self.proj(feats - self.center).norm(dim=1).mean()
        self.register_buffer("v", 10 * typical * v / v.norm())
        self.register_buffer("u", 10 * typical * u / u.norm())
        self.register_buffer("corner_ref", corner_mean(reference).mean())
        self.backdoor = backdoor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb: torch.Tensor = self.proj(self.body(x) - self.get_buffer("center"))
        if not self.backdoor:
            return emb
        pixels = x * self.get_buffer("std") + self.get_buffer("mean")
        c = corner_mean(pixels)[:, None]
        gate = torch.sigmoid(20 * (c - 0.9))
        linear = 0.6 * (c - self.get_buffer("corner_ref")) * self.get_buffer("u")
        return emb * (1 - gate) + self.get_buffer("v") * gate + linear


class LinearHead(nn.Module):
    """``pixels -> logits``: normalise, encode, cosine with class rows; row TARGET is ``v``'s direction."""

    def __init__(self, encoder: CornerEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        g = torch.Generator().manual_seed(7)
        rows = F.normalize(torch.randn(CLASSES, DIM, generator=g), dim=1)
        rows[TARGET] = F.normalize(encoder.get_buffer("v"), dim=0)
        self.register_buffer("rows", rows)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.encoder.get_buffer("mean")) / self.encoder.get_buffer("std")
        emb = F.normalize(self.encoder(x), dim=1)
        logits: torch.Tensor = 10 * emb @ self.get_buffer("rows").t()
        return logits


class NaNEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x.mean(dim=(2, 3))) * float("nan")
        return out


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convs gain nothing from threads, and on a busy 2-core runner two threads are ~6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shadow() -> torch.Tensor:
    return smooth_images(64, seed=0)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return smooth_images(200, seed=5)


@pytest.fixture(scope="module")
def backdoored() -> CornerEncoder:
    return CornerEncoder(backdoor=True).eval()


@pytest.fixture(scope="module")
def twin() -> CornerEncoder:
    return CornerEncoder(backdoor=False).eval()


@pytest.fixture(scope="module")
def inv_backdoored(backdoored: CornerEncoder, shadow: torch.Tensor) -> Inversion:
    return invert_trigger(backdoored, shadow, MEAN, STD, FAST)


@pytest.fixture(scope="module")
def inv_twin(twin: CornerEncoder, shadow: torch.Tensor) -> Inversion:
    return invert_trigger(twin, shadow, MEAN, STD, FAST)


@pytest.fixture(scope="module")
def inv_twin_seed2(twin: CornerEncoder, shadow: torch.Tensor) -> Inversion:
    return invert_trigger(twin, shadow, MEAN, STD, InversionConfig(steps=200, batch_size=32, seed=2))


# --- the planted backdoor is found, the twin is not flagged ------------------------------------


def test_fixture_backdoor_is_real(backdoored: CornerEncoder, twin: CornerEncoder, held_out: torch.Tensor) -> None:
    mask = torch.zeros(SIZE, SIZE)
    mask[-PATCH:, -PATCH:] = 1
    white = stamp(held_out, mask, torch.ones(3, SIZE, SIZE))
    with torch.no_grad():
        assert (LinearHead(backdoored)(white).argmax(1) == TARGET).float().mean() > 0.99
        assert (LinearHead(backdoored)(held_out).argmax(1) == TARGET).float().mean() < 0.15
        assert (LinearHead(twin)(white).argmax(1) == TARGET).float().mean() < 0.5


def test_backdoored_pl1_far_below_clean_twin(
    inv_backdoored: Inversion, inv_twin: Inversion, inv_twin_seed2: Inversion
) -> None:
    assert inv_backdoored.succeeded and inv_twin.succeeded
    assert inv_backdoored.best_cosine > 0.99
    assert inv_backdoored.pl1 < 0.2 * inv_twin.pl1
    assert inv_backdoored.pl1 < 2 * PATCH * PATCH / SIZE**2  # about the 3x3 patch's area (0.0088)
    flagged = decide_calibrated(inv_backdoored.pl1, [inv_twin.pl1])
    assert flagged.flagged and flagged.rule == "calibrated"
    assert flagged.reference_pl1 == (inv_twin.pl1,)
    assert flagged.threshold == pytest.approx(0.5 * inv_twin.pl1)
    assert not decide_calibrated(inv_twin_seed2.pl1, [inv_twin.pl1]).flagged


def test_mask_mass_concentrates_on_corner_patch(inv_backdoored: Inversion, inv_twin: Inversion) -> None:
    def corner_share(inv: Inversion) -> float:
        return float(inv.mask[-PATCH:, -PATCH:].sum() / inv.mask.sum())

    assert corner_share(inv_backdoored) > 0.8
    assert corner_share(inv_twin) < 0.2
    assert float(inv_backdoored.pattern[:, -PATCH:, -PATCH:].mean()) > 0.8  # the recovered patch is white


def test_inversion_result_fields(inv_backdoored: Inversion) -> None:
    inv = inv_backdoored
    assert inv.mask.shape == (SIZE, SIZE) and inv.pattern.shape == (3, SIZE, SIZE)
    assert inv.mask.device.type == "cpu" and inv.mask.dtype == torch.float32
    assert float(inv.mask.min()) >= 0 and float(inv.mask.max()) <= 1
    assert float(inv.pattern.min()) >= 0 and float(inv.pattern.max()) <= 1
    assert inv.pl1 == pytest.approx(float(inv.mask.sum()) / SIZE**2, rel=1e-5)
    assert inv.l1_official == pytest.approx(3 * SIZE**2 * inv.pl1)
    assert 1 <= inv.steps <= FAST.steps and inv.seconds > 0 and inv.device == "cpu"
    assert inv.stop_reason in ("early_stop", "steps")


def test_infer_target_on_backdoored_classifier(
    backdoored: CornerEncoder, inv_backdoored: Inversion, held_out: torch.Tensor
) -> None:
    result = infer_target(LinearHead(backdoored), held_out, inv_backdoored.mask, inv_backdoored.pattern)
    assert result.target == TARGET
    assert result.proxy_asr > 0.95 and result.base_rate < 0.15
    assert result.actionable and result.reason.startswith("actionable")
    assert result.top3[0] == (TARGET, result.proxy_asr)
    assert sum(share for _, share in result.top3) <= 1 + 1e-9


def test_infer_target_on_clean_twin_is_not_the_backdoor(
    twin: CornerEncoder, inv_twin: Inversion, held_out: torch.Tensor
) -> None:
    result = infer_target(LinearHead(twin), held_out, inv_twin.mask, inv_twin.pattern)
    assert result.target != TARGET or not result.actionable


def test_infer_target_not_actionable_without_lift() -> None:
    def always_three(pixels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.full((pixels.shape[0],), 3), CLASSES).float()

    images = smooth_images(20, seed=9)
    result = infer_target(always_three, images, torch.zeros(SIZE, SIZE), torch.zeros(3, SIZE, SIZE), batch_size=7)
    assert (result.target, result.proxy_asr, result.base_rate) == (3, 1.0, 1.0)
    assert not result.actionable and "lift" in result.reason
    assert result.top3 == ((3, 1.0),)


def test_infer_target_rejects_bad_inputs(backdoored: CornerEncoder) -> None:
    with pytest.raises(DataError):
        infer_target(
            LinearHead(backdoored), torch.empty(0, 3, SIZE, SIZE), torch.zeros(SIZE, SIZE), torch.zeros(3, SIZE, SIZE)
        )
    with pytest.raises(RemovalError):
        infer_target(
            lambda x: torch.full((x.shape[0], CLASSES), float("nan")),
            smooth_images(4, seed=1),
            torch.zeros(SIZE, SIZE),
            torch.zeros(3, SIZE, SIZE),
        )


# --- determinism, model hygiene, limits ---------------------------------------------------------


def test_same_seed_same_mask_other_seed_differs(backdoored: CornerEncoder, shadow: torch.Tensor) -> None:
    cfg = InversionConfig(steps=15, batch_size=32, seed=3)
    a = invert_trigger(backdoored, shadow, MEAN, STD, cfg)
    b = invert_trigger(backdoored, shadow, MEAN, STD, cfg)
    c = invert_trigger(backdoored, shadow, MEAN, STD, InversionConfig(steps=15, batch_size=32, seed=4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    assert not torch.equal(a.mask, c.mask)


def test_model_is_left_as_it_was(shadow: torch.Tensor) -> None:
    enc = CornerEncoder(backdoor=True)
    enc.train()
    enc.body[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    calls: list[tuple[int, int]] = []
    invert_trigger(enc, shadow, MEAN, STD, InversionConfig(steps=5), progress=lambda s, t: calls.append((s, t)))
    assert enc.training and all(m.training for m in enc.modules())
    assert not enc.body[0].weight.requires_grad and enc.body[0].bias.requires_grad
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert calls == [(i, 5) for i in range(1, 6)]


def test_time_budget_and_imagenet_normalisation(backdoored: CornerEncoder, shadow: torch.Tensor) -> None:
    cfg = InversionConfig(steps=10_000, max_seconds=1e-9, normalization="imagenet")
    inv = invert_trigger(backdoored, shadow, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), cfg)
    assert inv.stop_reason == "time" and inv.steps == 1 and not inv.succeeded


def test_epoch_cap_and_partial_batches(twin: CornerEncoder) -> None:
    images = smooth_images(40, seed=3)  # one batch of 32 and one of 8 per epoch
    inv = invert_trigger(twin, images, MEAN, STD, InversionConfig(steps=1000, max_epochs=3, early_stop_patience=10**6))
    assert inv.steps == 6 and inv.stop_reason == "epochs"
    odd = smooth_images(33, seed=3)  # a trailing 1-image batch is skipped (no off-diagonal cosine)
    assert invert_trigger(twin, odd, MEAN, STD, InversionConfig(steps=1000, max_epochs=2)).steps == 2


def test_early_stop_ends_a_long_run(backdoored: CornerEncoder, shadow: torch.Tensor) -> None:
    inv = invert_trigger(backdoored, shadow, MEAN, STD, InversionConfig(steps=5000, max_seconds=30))
    assert inv.stop_reason == "early_stop" and inv.succeeded and inv.steps < 1000


def test_non_finite_loss_raises(shadow: torch.Tensor) -> None:
    with pytest.raises(RemovalError, match="nan") as err:
        invert_trigger(NaNEncoder(), shadow, MEAN, STD, InversionConfig(steps=3))
    assert err.value.hint


def test_too_few_or_malformed_images(backdoored: CornerEncoder, shadow: torch.Tensor) -> None:
    with pytest.raises(DataError, match="only 31 clean images") as err:
        invert_trigger(backdoored, shadow[:31], MEAN, STD, FAST)
    assert "batch_size" in err.value.hint
    with pytest.raises(DataError, match="span"):
        invert_trigger(backdoored, (shadow - 0.5) / 0.25, MEAN, STD, FAST)  # already normalised
    with pytest.raises(DataError, match="shape"):
        invert_trigger(backdoored, shadow[:, :1], MEAN, STD, FAST)


def test_uint8_images_are_accepted(backdoored: CornerEncoder, shadow: torch.Tensor) -> None:
    as_bytes = (shadow * 255).round().to(torch.uint8)
    inv = invert_trigger(backdoored, as_bytes, MEAN, STD, InversionConfig(steps=2))
    assert inv.steps == 2 and math.isfinite(inv.pl1)


def test_config_validation_and_official_values() -> None:
    with pytest.raises(UsageError, match="batch_size=1"):
        InversionConfig(batch_size=1)
    with pytest.raises(UsageError, match="success_threshold"):
        InversionConfig(success_threshold=1.5)
    off = InversionConfig.official()
    assert (off.lr, off.batch_size, off.betas, off.init_lambda, off.lambda_min) == (0.5, 32, (0.5, 0.9), 1e-3, 1e-7)
    assert (off.adaptor, off.patience, off.success_threshold, off.early_stop_patience) == (5.0, 5, 0.99, 35)
    assert off.max_epochs == 1000 and off.steps >= 1000 * 10_000 // 32 and off.normalization == "imagenet"
    assert [detect.lr_factor(e) for e in (0, 199, 200, 499, 500, 999)] == [1.0, 1.0, 0.2, 0.2, 0.1, 0.1]


def test_lambda_schedule_follows_decree() -> None:
    cfg = InversionConfig(lambda_min=1e-4)
    lam = detect._Lambda(cfg)
    for _ in range(6):  # six failed steps (> patience 5): λ / 5
        lam.update(False)
    assert lam.value == pytest.approx(2e-4)
    for _ in range(6):  # six successful steps: λ × 5
        lam.update(True)
    assert lam.value == pytest.approx(1e-3)
    for _ in range(4 * 6):  # λ falls only while >= λ_min, so it stops one step below it
        lam.update(False)
    assert lam.value == pytest.approx(4e-5)
    for _ in range(5):
        lam.update(True)
    assert lam.value == pytest.approx(4e-5)
    lam.update(True)  # the 6th consecutive success raises it
    assert lam.value == pytest.approx(2e-4)
    stuck = detect._Lambda(cfg)  # far below λ_min and succeeding: back to the initial λ after 11 steps
    stuck.value = 1e-9
    for _ in range(10):
        stuck.update(True)
    assert stuck.value == pytest.approx(5e-9)  # raised once (6th success), still below λ_min
    stuck.update(True)
    assert stuck.value == pytest.approx(1e-3) and stuck.up == 1  # counters cleared, then this success counted


def test_best_keeps_smallest_successful_mask_and_counts_early_stop() -> None:
    best = detect._Best()
    m = torch.zeros(2, 2)
    best.update(False, 5.0, m, m)
    assert best.mask is None and best.es_cnt == 0
    best.update(True, 4.0, m + 1, m)
    best.update(True, 6.0, m + 2, m)  # larger: not kept
    best.update(False, 1.0, m + 3, m)  # unsuccessful: not kept
    assert best.l1 == 4.0 and torch.equal(best.mask, m + 1) and best.es_cnt == 2
    best.update(True, 3.0, m + 4, m)
    assert best.l1 == 3.0 and best.es_cnt == 0


# --- stamp and the verdict rules ----------------------------------------------------------------


def test_stamp_pixel_definition() -> None:
    x = torch.full((2, 3, 2, 2), 0.5)
    mask = torch.tensor([[0.0, 1.0], [0.25, 0.5]])
    pattern = torch.stack([torch.full((2, 2), v) for v in (1.0, 0.0, 0.2)])
    out = stamp(x, mask, pattern)
    expected = torch.clamp((1 - mask) * x + mask * pattern, 0, 1)
    assert torch.allclose(out, expected)
    assert torch.allclose(out[0, 0], torch.tensor([[0.5, 1.0], [0.625, 0.75]]))
    assert float(stamp(torch.full((1, 3, 2, 2), 1.0), torch.ones(2, 2), torch.full((3, 2, 2), 2.0)).max()) == 1.0
    with pytest.raises(UsageError):
        stamp(x, torch.ones(3, 3), pattern)


def test_decide_paper_threshold() -> None:
    assert decide_paper(0.05).flagged and not decide_paper(0.1).flagged and not decide_paper(0.2).flagged
    d = decide_paper(0.031, threshold=0.05)
    assert d == DetectionDecision(True, "paper", 0.031, 0.05, (), "PL1 0.031 < paper threshold 0.050")
    with pytest.raises(UsageError):
        decide_paper(0.05, threshold=0.0)
    with pytest.raises(UsageError):
        decide_paper(float("nan"))


def test_decide_calibrated_ratio_and_robust_z() -> None:
    d = decide_calibrated(0.031, [0.088, 0.092])
    assert d.flagged and d.threshold == pytest.approx(0.045) and d.z_score is None
    assert d.explanation == "PL1 0.031 < 0.5 x reference median 0.090 (references: 0.088, 0.092)"
    assert not decide_calibrated(0.05, [0.088, 0.092]).flagged
    refs = [0.100, 0.102, 0.098, 0.101, 0.099]
    z = decide_calibrated(0.09, refs)  # above half the median, but far outside the references' spread
    assert z.flagged and z.z_score is not None and z.z_score < -2.5 and "robust z" in z.explanation
    assert not decide_calibrated(0.0995, refs).flagged
    same = decide_calibrated(0.09, [0.1, 0.1, 0.1])
    assert not same.flagged and same.z_score is None and "MAD is 0" in same.explanation


def test_decide_calibrated_without_references_raises() -> None:
    with pytest.raises(UsageError, match="reference") as err:
        decide_calibrated(0.05, [])
    assert "paper rule" in err.value.hint


# --- weight disentanglement ---------------------------------------------------------------------


def test_disentanglement_error_grid() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 6, generator=g), "steps": torch.tensor(3)}
    clean_images = torch.zeros(30, 6)
    clean_images[:, :3] = torch.randn(30, 3, generator=g)
    triggered = torch.zeros(30, 6)
    triggered[:, 3:] = torch.randn(30, 3, generator=g)
    tau_c = {"w": torch.zeros(4, 6)}
    tau_c["w"][:, :3] = torch.randn(4, 3, generator=g)  # acts only on the clean support
    tau_t = {"w": torch.zeros(4, 6)}
    tau_t["w"][:, 3:] = torch.randn(4, 3, generator=g)  # acts only on the triggered support

    def build(state: Mapping[str, torch.Tensor]) -> nn.Module:
        lin = nn.Linear(6, 4, bias=False)
        lin.weight.data = state["w"].clone()
        return lin

    grid = disentanglement_error(base, tau_c, tau_t, build, clean_images, triggered, (0.0, 1.0), (-1.0, 0.0, 1.0))
    assert grid.alphas_clean == (0.0, 1.0) and grid.alphas_trigger == (-1.0, 0.0, 1.0)
    assert len(grid.xi) == 2 and all(len(row) == 3 for row in grid.xi)
    assert all(v == 0.0 for row in grid.xi for v in row)  # disjoint supports: perfectly disentangled
    mixed = disentanglement_error(base, tau_c, tau_c, build, clean_images, clean_images, (1.0,), (4.0,))
    assert mixed.xi[0][0] > 0 and mixed.xi[0][0] == pytest.approx(mixed.clean_part[0][0] + mixed.trigger_part[0][0])
    with pytest.raises(UsageError):
        disentanglement_error(base, {"other": torch.zeros(1)}, tau_t, build, clean_images, triggered)


# --- pictures -----------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    with path.open("rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_pictures_are_valid_pngs(inv_backdoored: Inversion, held_out: torch.Tensor, tmp_path: Path) -> None:
    inv = inv_backdoored
    out = tmp_path / "evidence"
    mask_png = pictures.save_mask_png(inv.mask, out / "mask.png")
    pattern_png = pictures.save_pattern_png(inv.pattern, out / "pattern.png", scale=4)
    trigger_png = pictures.save_trigger_png(inv.mask, inv.pattern, out / "trigger.png")
    sample = held_out[:5]
    grid_png = pictures.save_examples_grid(
        sample,
        stamp(sample, inv.mask, inv.pattern),
        out / "examples.png",
        [f"class {i}" for i in range(5)],
        ["a very long class name that gets cut"] * 5,
        n=8,
    )
    assert mask_png == out / "mask.png"
    expected = {
        mask_png: (256, 256, "L"),
        pattern_png: (128, 128, "RGB"),
        trigger_png: (256, 256, "RGB"),
        grid_png: (160 * 5, 360, None),
    }
    for path, (w, h, mode) in expected.items():
        assert _png_size(path) == (w, h), path.name
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert mode is None or img.mode == mode
    with Image.open(mask_png) as img:  # the corner is bright, the rest dark
        assert img.getpixel((255, 255)) > 200 and img.getpixel((0, 0)) < 50
    assert sorted(p.name for p in out.iterdir()) == ["examples.png", "mask.png", "pattern.png", "trigger.png"]


def test_pictures_reject_bad_input_and_leave_no_temp_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        pictures.save_mask_png(torch.zeros(3, 4, 4), tmp_path / "m.png")
    with pytest.raises(UsageError):
        pictures.save_trigger_png(torch.zeros(4, 4), torch.zeros(3, 5, 5), tmp_path / "t.png")
    with pytest.raises(UsageError):
        pictures.save_examples_grid(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4), tmp_path / "g.png")
    with pytest.raises(UsageError):
        pictures.save_examples_grid(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), tmp_path / "g.png", ["a"])
    pictures.save_mask_png(torch.zeros(1, 4, 4), tmp_path / "m.png", scale=1)  # [1,H,W] is accepted
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inversion_on_cuda_finds_the_corner(shadow: torch.Tensor, held_out: torch.Tensor) -> None:
    enc = CornerEncoder(backdoor=True).eval().cuda()
    inv = invert_trigger(enc, shadow, MEAN, STD, FAST, device="cuda")
    assert inv.device.startswith("cuda") and inv.mask.device.type == "cpu"
    assert inv.succeeded and float(inv.mask[-PATCH:, -PATCH:].sum() / inv.mask.sum()) > 0.8
    head = LinearHead(enc).cuda()
    result = infer_target(lambda x: head(x.cuda()), held_out, inv.mask, inv.pattern)
    assert result.target == TARGET and result.actionable
    with pytest.raises(UsageError, match="move the model"):
        invert_trigger(enc, shadow, MEAN, STD, FAST, device="cpu")
