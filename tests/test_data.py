"""Clean image data: folders of class sub-folders and .npz files, validation, deterministic splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbar_guard.bundle import ZeroShotTask
from tbar_guard.data import ImageSet, load_images, split
from tbar_guard.errors import DataError
from tbar_guard.exit_codes import ExitCode

TASK = ZeroShotTask(("cat", "dog", "bird"))
SIZE = 28


def _rgb(value: int, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _folder(root: Path) -> Path:
    """cat: 2 RGB PNGs; dog: a grayscale PNG, an RGBA PNG, and a 56×40 JPEG; plus files to skip."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(_rgb(10)).save(root / "cat" / "a.png")
    Image.fromarray(_rgb(20)).save(root / "cat" / "b.png")
    Image.fromarray(np.full((SIZE, SIZE), 200, dtype=np.uint8), mode="L").save(root / "dog" / "gray.png")
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(_rgb(90, 1).repeat(56, 0).repeat(40, 1)).save(root / "dog" / "big.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    return root


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


# --- folders ------------------------------------------------------------------------------------


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    images = load_images(_folder(tmp_path / "data"), TASK, SIZE)
    assert isinstance(images, ImageSet)
    assert len(images) == 5
    assert images.images.dtype == torch.uint8
    assert images.images.shape == (5, 3, SIZE, SIZE)
    assert images.labels.dtype == torch.int64
    assert images.labels.tolist() == [0, 0, 1, 1, 1]  # sorted folders, sorted files
    cat_a, cat_b, big, gray, rgba = images.images
    assert torch.all(cat_a == 10) and torch.all(cat_b == 20)
    assert torch.all(gray == 200), "grayscale is replicated to three channels"
    assert rgba[0].float().mean() == 255 and torch.all(rgba[1:] == 0), "RGBA drops the alpha channel"
    assert big.shape == (3, SIZE, SIZE), "other sizes are resized"
    assert torch.all((big.int() - 90).abs() <= 1)


def test_folder_names_can_be_class_indices(tmp_path: Path) -> None:
    for name in ("0", "2"):
        (tmp_path / name).mkdir()
        Image.fromarray(_rgb(1)).save(tmp_path / name / "x.png")
    assert load_images(tmp_path, TASK, SIZE).labels.tolist() == [0, 2]


def test_images_are_resized_to_the_model_size(tmp_path: Path) -> None:
    images = load_images(_folder(tmp_path / "data"), TASK, 14)
    assert images.images.shape == (5, 3, 14, 14)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken\.png") as info:
        load_images(root, TASK, SIZE)
    assert info.value.exit_code == ExitCode.ERROR == 2


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cat" / "full.png")
    data = (root / "cat" / "full.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_images(root, TASK, SIZE)


def test_unknown_class_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "horse").mkdir()
    with pytest.raises(DataError, match="horse"):
        load_images(root, TASK, SIZE)


def test_out_of_range_index_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "3").mkdir()
    with pytest.raises(DataError, match="3"):
        load_images(root, TASK, SIZE)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_images(tmp_path, TASK, SIZE)


def test_class_folders_without_images(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.md").write_text("nothing")
    with pytest.raises(DataError, match="no images"):
        load_images(tmp_path, TASK, SIZE)


def test_folder_with_a_single_class(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    for i in range(3):
        Image.fromarray(_rgb(i)).save(tmp_path / "cat" / f"{i}.png")
    with pytest.raises(DataError, match="same label"):
        load_images(tmp_path, TASK, SIZE)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nope", TASK, SIZE)


# --- npz ----------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    images = load_images(_npz(tmp_path / "d.npz", x, y), TASK, SIZE)
    assert torch.equal(images.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert images.labels.tolist() == y.tolist()
    assert torch.allclose(images.pixels(), images.images.float() / 255)


@pytest.mark.parametrize("shape", [(4, SIZE, SIZE), (4, SIZE, SIZE, 1), (4, SIZE, SIZE, 4)])
def test_npz_grayscale_and_rgba(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x = np.full(shape, 7, dtype=np.uint8)
    images = load_images(_npz(tmp_path / "d.npz", x, np.array([0, 1, 0, 1])), TASK, SIZE)
    assert images.images.shape == (4, 3, SIZE, SIZE)
    assert torch.all(images.images == 7)


def test_npz_other_size_is_resized(tmp_path: Path) -> None:
    x = np.full((3, 40, 40, 3), 50, dtype=np.uint8)
    images = load_images(_npz(tmp_path / "d.npz", x, np.array([0, 1, 2])), TASK, SIZE)
    assert images.images.shape == (3, 3, SIZE, SIZE)
    assert torch.all(images.images == 50)


@pytest.mark.parametrize("labels", [[0, 1, 3], [0, 1, -1]])
def test_npz_out_of_range_labels(tmp_path: Path, labels: list[int]) -> None:
    x = np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=f"label {labels[-1]}"):
        load_images(_npz(tmp_path / "d.npz", x, np.array(labels)), TASK, SIZE)


def test_npz_single_class(tmp_path: Path) -> None:
    x = np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="same label"):
        load_images(_npz(tmp_path / "d.npz", x, np.array([1, 1, 1])), TASK, SIZE)


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (np.zeros((3, SIZE, SIZE, 3), dtype=np.float32), np.array([0, 1, 2]), "dtype float32"),
        (np.zeros((3, SIZE, SIZE, 2), dtype=np.uint8), np.array([0, 1, 2]), "shape"),
        (np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8), np.array([0, 1]), "2,"),
        (np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8), np.array([0.0, 1.0, 2.0]), "float64"),
        (np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64), "no images"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, x: np.ndarray, y: np.ndarray, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_images(_npz(tmp_path / "d.npz", x, y), TASK, SIZE)


def test_npz_missing_arrays_and_garbage(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", images=np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_images(tmp_path / "a.npz", TASK, SIZE)
    (tmp_path / "b.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_images(tmp_path / "b.npz", TASK, SIZE)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path: Path) -> None:
    x = np.empty(2, dtype=object)
    x[0], x[1] = np.zeros((SIZE, SIZE, 3)), np.zeros((SIZE, SIZE, 3))
    np.savez(tmp_path / "o.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(DataError, match="cannot read"):
        load_images(tmp_path / "o.npz", TASK, SIZE)


# --- splits -------------------------------------------------------------------------------------


def _numbered(n: int) -> ImageSet:
    """Image i has every pixel equal to i % 256 and label i % 3, so indices can be recovered."""
    ids = torch.arange(n)
    return ImageSet(ids.remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), ids % 3)


def _ids(part: ImageSet) -> list[int]:
    return part.images[:, 0, 0, 0].tolist()


def test_splits_are_disjoint_and_sized() -> None:
    images = _numbered(200)
    s = split(images, (0.4, 0.3, 0.3), seed=0)
    forget, val, test = _ids(s.forget), _ids(s.val), _ids(s.test)
    assert (len(forget), len(val), len(test)) == (80, 60, 60)
    assert not (set(forget) & set(val)) and not (set(forget) & set(test)) and not (set(val) & set(test))
    assert len(set(forget) | set(val) | set(test)) == 200
    for part in (s.forget, s.val, s.test):
        assert torch.equal(part.labels, torch.tensor(_ids(part)) % 3), "labels travel with their images"


def test_splits_are_deterministic_under_a_seed() -> None:
    images = _numbered(200)
    a, b = split(images, (0.4, 0.3, 0.3), seed=5), split(images, (0.4, 0.3, 0.3), seed=5)
    for pa, pb in ((a.forget, b.forget), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(pa.images, pb.images) and torch.equal(pa.labels, pb.labels)
    c = split(images, (0.4, 0.3, 0.3), seed=6)
    assert _ids(a.test) != _ids(c.test)


def test_splits_do_not_consume_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    split(_numbered(50), (0.4, 0.3, 0.3), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_fractions_under_one_leave_images_out() -> None:
    s = split(_numbered(100), (0.2, 0.2, 0.2), seed=0)
    assert (len(s.forget), len(s.val), len(s.test)) == (20, 20, 20)


def test_too_few_images_to_split() -> None:
    with pytest.raises(DataError, match="too few"):
        split(_numbered(2), (0.4, 0.3, 0.3), seed=0)
