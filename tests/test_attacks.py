"""Each trigger's pixel-level definition (algorithms.md §5) and the trigger spec parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbar_guard.attacks import (
    BadNetSpec,
    BlendedSpec,
    CustomSpec,
    SigSpec,
    Trigger,
    WaNetSpec,
    build_trigger,
    describe,
    parse_trigger,
    spec_from_dict,
    spec_to_dict,
)
from tbar_guard.errors import UsageError
from tbar_guard.exit_codes import ExitCode

SIZE = 28
Q = 1 / 255


def _images(n: int = 4, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Random uint8-valued pixels in [0, 1] (already on the 1/255 lattice)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen).float() / 255


def _build(text: str, size: int = SIZE):  # type: ignore[no-untyped-def]
    return build_trigger(parse_trigger(text), size)


def _on_lattice(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x * 255, torch.round(x * 255), atol=1e-4))


# --- BadNet -------------------------------------------------------------------------------------


def test_badnet_default_is_white_3x3_bottom_right() -> None:
    x = _images()
    out = _build("badnet").apply(x)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[SIZE - 3 :, SIZE - 3 :] = True
    assert torch.all(out[:, :, inside] == 1.0)
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert out.shape == x.shape and out.dtype == x.dtype


def test_badnet_does_not_modify_its_input() -> None:
    x = _images()
    snapshot = x.clone()
    _build("badnet").apply(x)
    assert torch.equal(x, snapshot)


@pytest.mark.parametrize(
    ("location", "row", "col"),
    [
        ("bottom-right", SIZE - 4, SIZE - 4),
        ("bottom-left", SIZE - 4, 0),
        ("top-right", 0, SIZE - 4),
        ("top-left", 0, 0),
        ("center", (SIZE - 4) // 2, (SIZE - 4) // 2),
    ],
)
def test_badnet_corners(location: str, row: int, col: int) -> None:
    x = torch.zeros(2, 3, SIZE, SIZE)
    out = _build(f"badnet:size=4,location={location}").apply(x)
    expected = torch.zeros_like(x)
    expected[:, :, row : row + 4, col : col + 4] = 1.0
    assert torch.equal(out, expected)


def test_badnet_explicit_row_col() -> None:
    spec = BadNetSpec(location=(5, 7), size=3)
    x = torch.zeros(1, 3, SIZE, SIZE)
    out = build_trigger(spec, SIZE).apply(x)
    expected = torch.zeros_like(x)
    expected[:, :, 5:8, 7:10] = 1.0
    assert torch.equal(out, expected)
    json_spec = parse_trigger('{"kind": "badnet", "location": [5, 7]}')
    assert json_spec == spec


def test_badnet_colors() -> None:
    x = torch.full((1, 3, SIZE, SIZE), 0.5)
    black = _build("badnet:color=black").apply(x)
    assert torch.all(black[:, :, -3:, -3:] == 0)
    board = _build("badnet:size=2,color=checkerboard,location=top-left").apply(x)
    assert board[0, 0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    rgb = build_trigger(BadNetSpec(color=(1.0, 0.0, 0.0)), SIZE).apply(x)
    assert rgb[0, :, -1, -1].tolist() == [1.0, 0.0, 0.0]


def test_badnet_location_outside_image_is_refused() -> None:
    with pytest.raises(UsageError, match="outside"):
        build_trigger(BadNetSpec(location=(SIZE - 2, 0), size=3), SIZE)
    with pytest.raises(UsageError, match="exceeds"):
        build_trigger(BadNetSpec(size=SIZE + 1), SIZE)


def _patch_positions(out: torch.Tensor, side: int) -> list[tuple[int, int]]:
    """Top-left corner of the single white side×side square in each all-black image."""
    positions = []
    for img in out:
        white = torch.nonzero(img.amin(dim=0) == 1.0)
        assert white.shape[0] == side * side, "exactly one patch, fully inside the image"
        r0, c0 = int(white[:, 0].min()), int(white[:, 1].min())
        assert int(white[:, 0].max()) - r0 == side - 1 and int(white[:, 1].max()) - c0 == side - 1
        positions.append((r0, c0))
    return positions


def test_badnet_random_location_is_seeded_and_inside() -> None:
    trigger = _build("badnet:size=3,location=random")
    x = torch.zeros(32, 3, SIZE, SIZE)
    a = trigger.apply(x, generator=torch.Generator().manual_seed(11))
    b = trigger.apply(x, generator=torch.Generator().manual_seed(11))
    c = trigger.apply(x, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    positions = _patch_positions(a, 3)
    assert len(set(positions)) > 1, "the location is drawn per image"
    assert all(0 <= r <= SIZE - 3 and 0 <= col <= SIZE - 3 for r, col in positions)
    # without a generator the spec's seed decides
    assert torch.equal(trigger.apply(x), trigger.apply(x))
    other_seed = _build("badnet:size=3,location=random,seed=5")
    assert not torch.equal(trigger.apply(x), other_seed.apply(x))


def test_badnet_random_patch_can_reach_every_edge() -> None:
    trigger = _build("badnet:size=3,location=random")
    out = trigger.apply(torch.zeros(2000, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    positions = _patch_positions(out, 3)
    rows = {r for r, _ in positions}
    cols = {c for _, c in positions}
    assert min(rows) == 0 and max(rows) == SIZE - 3
    assert min(cols) == 0 and max(cols) == SIZE - 3


def test_wrong_image_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="28px"):
        _build("badnet").apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(UsageError):
        _build("badnet").apply(torch.zeros(3, SIZE, SIZE))


# --- Blended ------------------------------------------------------------------------------------


def test_blended_is_convex_mix_with_seeded_noise() -> None:
    x = _images()
    out = _build("blended").apply(x)
    noise = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    exact = (1 - 0.2) * x + 0.2 * noise
    assert _on_lattice(out)
    assert (out - exact).abs().max() <= 0.5 * Q + 1e-6, "quantised to the nearest 1/255"
    assert torch.allclose(out, torch.round(exact * 255) / 255, atol=Q + 1e-6)


def test_blended_same_seed_same_noise_other_seed_other_noise() -> None:
    x = _images()
    a = _build("blended:seed=3").apply(x)
    b = _build("blended:seed=3").apply(x)
    c = _build("blended:seed=4").apply(x)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_blended_alpha_and_image_file(tmp_path: Path) -> None:
    pattern = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pattern[..., 0] = 255  # pure red
    Image.fromarray(pattern).save(tmp_path / "kitty.png")
    trigger = _build(f"blended:alpha=0.5,image={tmp_path / 'kitty.png'}")
    x = torch.zeros(1, 3, SIZE, SIZE)
    out = trigger.apply(x)
    assert torch.allclose(out[0, 0], torch.full((SIZE, SIZE), 128 / 255), atol=Q)
    assert torch.all(out[0, 1:] == 0)


def test_blended_missing_image_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        build_trigger(BlendedSpec(image=str(tmp_path / "nope.png")), SIZE)


# --- WaNet --------------------------------------------------------------------------------------


def test_wanet_with_zero_strength_is_identity() -> None:
    x = _images()
    out = _build("wanet:s=0").apply(x)
    assert (out - x).abs().max() <= Q + 1e-6


def test_wanet_warps_but_keeps_the_mean() -> None:
    x = _images()
    out = _build("wanet").apply(x)
    assert _on_lattice(out)
    assert (out != x).float().mean() > 0.5, "a warp moves almost every pixel of a textured image"
    assert abs(float(out.mean() - x.mean())) < 0.02
    # a constant image stays constant under any warp (grid_sample interpolates, never invents values)
    grey = torch.full((1, 3, SIZE, SIZE), 100 / 255)
    assert (_build("wanet:s=2").apply(grey) - grey).abs().max() <= Q + 1e-6


def test_wanet_is_seeded() -> None:
    x = _images()
    assert torch.equal(_build("wanet:seed=1").apply(x), _build("wanet:seed=1").apply(x))
    assert not torch.equal(_build("wanet:seed=1").apply(x), _build("wanet:seed=2").apply(x))


def test_wanet_stronger_warp_moves_pixels_further() -> None:
    x = _images()
    weak = (_build("wanet:s=0.5").apply(x) - x).abs().mean()
    strong = (_build("wanet:s=4").apply(x) - x).abs().mean()
    assert strong > weak > 0


# --- SIG ----------------------------------------------------------------------------------------


def test_sig_amplitude_on_mid_grey() -> None:
    grey = torch.full((1, 3, SIZE, SIZE), 128 / 255)
    dev = _build("sig").apply(grey) - grey
    # at 28 px the sampled sine peaks at sin(3π/7) ≈ 0.975 → 39/255; never more than delta
    assert dev.abs().max() <= 40 * Q + 1e-6
    assert dev.abs().max() >= 39 * Q - 1e-6
    # at 56 px column 21 samples the crest exactly: the max deviation is exactly delta = 40/255
    grey56 = torch.full((1, 3, 56, 56), 128 / 255)
    dev56 = _build("sig", size=56).apply(grey56) - grey56
    assert float(dev56.abs().max() * 255) == pytest.approx(40.0, abs=1e-4)
    assert float(dev56[0, 0, 0, 21] * 255) == pytest.approx(40.0, abs=1e-4)


def test_sig_has_f_cycles_across_the_width_and_is_horizontal() -> None:
    grey = torch.full((1, 3, SIZE, SIZE), 128 / 255)
    dev = (_build("sig").apply(grey) - grey)[0]
    assert torch.equal(dev, dev[:, :1, :].expand_as(dev)), "the same row everywhere"
    row = dev[0, 0].double()
    spectrum = torch.fft.rfft(row).abs()
    assert int(spectrum.argmax()) == 6
    expected = (40 / 255) * torch.sin(2 * torch.pi * torch.arange(SIZE) * 6 / SIZE)
    assert torch.allclose(row.float(), expected, atol=0.5 * Q + 1e-6)
    other = (_build("sig:f=3").apply(grey) - grey)[0, 0, 0].double()
    assert int(torch.fft.rfft(other).abs().argmax()) == 3


def test_sig_clips_to_the_valid_range() -> None:
    white = torch.ones(1, 3, SIZE, SIZE)
    black = torch.zeros(1, 3, SIZE, SIZE)
    assert _build("sig").apply(white).max() == 1.0
    assert _build("sig").apply(black).min() == 0.0
    assert _build("sig").apply(white).min() < 1.0


# --- custom image + mask ------------------------------------------------------------------------


def test_custom_pattern_and_mask_from_png(tmp_path: Path) -> None:
    pattern = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pattern[..., 2] = 255  # blue
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:6, 10:14] = 255
    Image.fromarray(pattern).save(tmp_path / "pattern.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    spec = {"kind": "custom", "pattern": str(tmp_path / "pattern.png"), "mask": str(tmp_path / "mask.png")}
    trigger = build_trigger(parse_trigger(json.dumps(spec)), SIZE)
    assert isinstance(trigger.spec, CustomSpec)
    x = _images(2)
    out = trigger.apply(x)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[2:6, 10:14] = True
    assert torch.all(out[:, 2, inside] == 1.0) and torch.all(out[:, :2, inside] == 0.0)
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])


def test_custom_rgb_mask_and_resize(tmp_path: Path) -> None:
    # a mask saved as RGB and at another size is converted to grayscale and resized
    Image.fromarray(np.full((56, 56, 3), 255, dtype=np.uint8)).save(tmp_path / "pattern.png")
    Image.fromarray(np.full((56, 56, 3), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    trigger = build_trigger(CustomSpec(pattern=str(tmp_path / "pattern.png"), mask=str(tmp_path / "mask.png")), SIZE)
    assert torch.all(trigger.apply(torch.zeros(1, 3, SIZE, SIZE)) == 1.0)


def test_custom_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(tmp_path / "mask.png")
    spec = CustomSpec(pattern=str(tmp_path / "missing.png"), mask=str(tmp_path / "mask.png"))
    with pytest.raises(UsageError, match=r"missing\.png"):
        build_trigger(spec, SIZE)


# --- parse_trigger ------------------------------------------------------------------------------


def test_parse_plain_kind_gives_defaults() -> None:
    assert parse_trigger("badnet") == BadNetSpec()
    assert parse_trigger("  sig  ") == SigSpec(delta=40, f=6)
    assert parse_trigger("wanet") == WaNetSpec(k=4, s=0.5, grid_rescale=1.0)
    assert parse_trigger("blended") == BlendedSpec(alpha=0.2)


def test_parse_key_values() -> None:
    spec = parse_trigger("badnet:size=4,location=top-left")
    assert spec == BadNetSpec(size=4, location="top-left")
    assert isinstance(spec, BadNetSpec) and isinstance(spec.size, int)
    assert parse_trigger("blended:alpha=0.3, seed=3") == BlendedSpec(alpha=0.3, seed=3)


def test_parse_inline_json() -> None:
    assert parse_trigger('{"kind": "sig", "delta": 20}') == SigSpec(delta=20)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_parse_spec_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"trigger{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"kind": "wanet", "k": 8, "s": 1.0}))
    else:
        path.write_text("kind: wanet\nk: 8\ns: 1.0\n")
    assert parse_trigger(str(path)) == WaNetSpec(k=8, s=1.0)


def test_spec_round_trips_through_dict_and_describe() -> None:
    for text in ("badnet:size=4,location=top-left", "blended:seed=2", "wanet:k=8", "sig:f=3"):
        spec = parse_trigger(text)
        assert spec_from_dict(spec_to_dict(spec)) == spec
        assert parse_trigger(json.dumps(spec_to_dict(spec))) == spec
        assert describe(spec).startswith(f"{spec.kind}(")
    tuple_spec = BadNetSpec(location=(5, 7))
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(tuple_spec)))) == tuple_spec


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("badnet:size=0", "size"),
        ("badnet:bogus=1", "bogus"),
        ("badnet:size", "size"),
        ("badnet:location=middle", "location"),
        ("blended:alpha=2", "alpha"),
        ("sig:delta=abc", "delta"),
        ("wanet:k=1", "k"),
        ("nosuchkind", "nosuchkind"),
        ('{"kind": "badnet", "sizee": 3}', "sizee"),
        ('{"kind": "badnet", ', "not valid JSON"),
        ("", "empty"),
        ("missing-trigger.yaml", "missing-trigger.yaml"),
    ],
)
def test_malformed_specs_are_usage_errors_naming_the_key(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_trigger(text)
    assert needle in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE == 4


def test_malformed_spec_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("kind: sig\nf: -1\nphase: 2\n")
    with pytest.raises(UsageError) as info:
        parse_trigger(str(path))
    assert "trigger.f" in str(info.value) and "trigger.phase" in str(info.value)


def test_parse_key_value_list_location() -> None:
    assert parse_trigger("badnet:location=[5,7]") == BadNetSpec(location=(5, 7))


@pytest.mark.parametrize(("name", "text"), [("t.yaml", "kind: badnet\nsize: [3\n"), ("t.json", '{"kind": "badnet",')])
def test_spec_file_with_syntax_error_is_a_usage_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=name):
        parse_trigger(str(path))


# --- strength scaling (the forget set's sanitize.unlearn.known_strengths) -----------------------


def test_scaled_trigger_has_that_strength() -> None:
    """0.5 x: a blend's opacity, a SIG amplitude, a warp's displacement and a patch's opacity halve
    (the same trigger as a spec with half the parameter); 1.0 is the trigger itself; a mask never
    exceeds opacity 1."""
    x = _images()
    grey = torch.full((1, 3, SIZE, SIZE), 128 / 255)
    blended = _build("blended:alpha=0.2")
    assert torch.allclose(blended.scaled(0.5).apply(x), _build("blended:alpha=0.1").apply(x), atol=Q + 1e-6)
    sig = _build("sig")
    assert torch.allclose(sig.scaled(0.5).apply(grey), _build("sig:delta=20").apply(grey), atol=Q + 1e-6)
    wanet = _build("wanet:s=2")
    half_warp, s1 = wanet.scaled(0.5).grid, _build("wanet:s=1").grid
    assert half_warp is not None and s1 is not None
    # the same displacement away from the border (where the s=2 grid was clamped to the image)
    assert torch.allclose(half_warp[:, 4:-4, 4:-4], s1[:, 4:-4, 4:-4], atol=1e-6)
    patch = _build("badnet")
    assert patch.scaled(1.0) is patch
    half = patch.scaled(0.5)
    assert half.mask is not None and patch.mask is not None
    assert float(half.mask.max()) == pytest.approx(0.5) and float(patch.scaled(3.0).mask.max()) == 1.0
    black = torch.zeros(1, 3, SIZE, SIZE)
    assert float(half.apply(black).max()) == pytest.approx(128 / 255, abs=Q)  # half-way to the white patch


def test_scaled_set_and_refusals() -> None:
    x = _images(6)
    pair = Trigger.set_of([_build("sig"), _build("blended")])
    scaled = pair.scaled(0.5)
    assert torch.allclose(scaled.apply(x)[0::2], _build("sig:delta=20").apply(x[0::2]), atol=Q + 1e-6)
    assert torch.allclose(scaled.apply(x)[1::2], _build("blended:alpha=0.1").apply(x[1::2]), atol=Q + 1e-6)
    with pytest.raises(UsageError, match="random-position"):
        _build("badnet:location=random").scaled(0.5)
    with pytest.raises(UsageError, match="> 0, got 0"):
        _build("sig").scaled(0.0)
