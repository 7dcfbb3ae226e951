"""The model bundle: round trip, atomic writes, and refusing pickle payloads and corrupt weights."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from tbar_guard import pipeline
from tbar_guard.bundle import (
    CONFIG_FILE,
    TASK_FILE,
    WEIGHTS_FILE,
    ClipBundle,
    atomic_directory,
    build_model,
    load_bundle,
    load_checkpoint,
    read_weights,
    save_bundle,
    save_model,
    sha256_file,
    sha256_state,
    write_bundle_files,
)
from tbar_guard.errors import ModelFormatError, UsageError
from tbar_guard.exit_codes import ExitCode
from tbar_guard.zoo import DEMO_PREPROCESS, DEMO_TASK, tiny_config

ARCH = "tbar-tiny"


class Payload:
    """Unpickling this object creates ``marker``: the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny() -> ClipBundle:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    return ClipBundle(model, cfg, DEMO_PREPROCESS, DEMO_TASK, sha256_state(model.state_dict()), "test:tiny")


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the tiny config as an open_clip built-in architecture for this test."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, tiny_config())
    return ARCH


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(DEMO_TASK.to_json()))
    return path


def _state(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}


def _write(directory: Path, bundle: ClipBundle, state: dict[str, torch.Tensor]) -> Path:
    save_bundle(directory, state, bundle.model_cfg, bundle.preprocess, bundle.task)
    return directory


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
        assert sa[key].dtype == sb[key].dtype, key


# --- round trip ---------------------------------------------------------------------------------


def test_save_load_round_trip(tiny: ClipBundle, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    digest = save_model(out, tiny)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, TASK_FILE])
    assert digest == sha256_file(out / WEIGHTS_FILE)
    loaded = load_bundle(out)
    _assert_same_weights(loaded.model, tiny.model)
    assert loaded.weights_sha256 == digest
    assert dict(loaded.model_cfg) == dict(tiny.model_cfg)
    assert loaded.preprocess == tiny.preprocess
    assert loaded.task == tiny.task
    assert loaded.source == str(out)
    assert not loaded.model.training


def test_round_trip_of_trained_foundation(foundation: ClipBundle, tmp_path: Path) -> None:
    digest = save_model(tmp_path / "f", foundation)
    loaded = load_bundle(tmp_path / "f")
    _assert_same_weights(loaded.model, foundation.model)
    assert sha256_state(loaded.model.state_dict()) == sha256_state(foundation.model.state_dict())
    assert loaded.weights_sha256 == digest


def test_open_clip_can_read_the_bundle(tiny: ClipBundle, tmp_path: Path) -> None:
    """A bundle is an open_clip local-dir model: its config is what open_clip reads."""
    save_model(tmp_path / "b", tiny)
    assert open_clip.get_model_config(f"local-dir:{tmp_path / 'b'}") == json.loads(json.dumps(dict(tiny.model_cfg)))


def test_same_weights_same_tensors(tiny: ClipBundle, tmp_path: Path) -> None:
    save_model(tmp_path / "a", tiny)
    save_model(tmp_path / "b", tiny)
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert sha256_state(a) == sha256_state(b) == sha256_state(tiny.model.state_dict())


def test_same_weights_same_file_sha256(tiny: ClipBundle, tmp_path: Path) -> None:
    state = {"w": torch.arange(4, dtype=torch.float32)}
    digests = set()
    for i in range(16):
        (tmp_path / str(i)).mkdir()
        digests.add(write_bundle_files(tmp_path / str(i), state, tiny.model_cfg, tiny.preprocess, tiny.task))
    assert len(digests) == 1


def test_weights_are_safetensors_only(tiny: ClipBundle, tmp_path: Path) -> None:
    save_model(tmp_path / "b", tiny)
    tensors = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert set(tensors) == set(tiny.model.state_dict())


# --- atomic writes ------------------------------------------------------------------------------


def test_save_into_existing_directory_is_refused(tiny: ClipBundle, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(UsageError, match="already exists") as info:
        save_model(out, tiny)
    assert info.value.exit_code == ExitCode.USAGE
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_exception_inside_atomic_directory_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out) as tmp:
        (tmp / "half-written.bin").write_bytes(b"x" * 100)
        assert tmp.parent == tmp_path and tmp.name.endswith(".partial")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_inside_atomic_directory_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_publishes_on_success(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
        assert not out.exists()
    assert (out / "f").read_text() == "x"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_failed_save_leaves_nothing(tiny: ClipBundle, tmp_path: Path) -> None:
    state = _state(tiny)
    state["visual.proj"] = state["visual.proj"].t()  # non-contiguous is fine; a non-tensor is not
    state["bad"] = "not a tensor"  # type: ignore[assignment]
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises, nothing may remain
        save_bundle(tmp_path / "out", state, tiny.model_cfg, tiny.preprocess, tiny.task)
    assert list(tmp_path.iterdir()) == []


# --- security: pickle payloads are never executed -----------------------------------------------


def test_payload_really_executes_when_unpickled(tmp_path: Path) -> None:
    """Sanity check of the fixture: plain pickle.loads would run the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_checkpoint_with_payload_is_refused(tmp_path: Path, suffix: str, zipfile: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    obj = {"visual.proj": torch.zeros(2), "evil": Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ModelFormatError, match="refused") as info:
        read_weights(path)
    assert info.value.exit_code == ExitCode.ERROR
    with pytest.raises(ModelFormatError, match="--arch"):  # a bare weights file is not even opened
        pipeline.load_model(path)
    assert not marker.exists()


def test_torch_checkpoint_that_is_only_a_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "model.pt")
    with pytest.raises(ModelFormatError):
        read_weights(tmp_path / "model.pt")
    assert not marker.exists()


def test_payload_checkpoint_via_pipeline_with_arch_is_refused(tmp_path: Path, tiny_arch: str, classes: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload(marker)}, path)
    with pytest.raises(ModelFormatError, match="refused"):
        pipeline.load_model(path, arch=tiny_arch, classes=classes)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".joblib", ".dill"])
def test_raw_pickle_file_is_refused_without_opening(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    with path.open("wb") as handle:
        pickle.dump(Payload(marker), handle)
    with pytest.raises(ModelFormatError, match="pickle"):
        read_weights(path)
    with pytest.raises(ModelFormatError, match="pickle"):
        load_bundle(path)
    with pytest.raises(ModelFormatError, match="pickle"):
        pipeline.load_model(path)
    assert not marker.exists()


def test_raw_pickle_via_pipeline_with_arch_is_refused(tmp_path: Path, tiny_arch: str, classes: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelFormatError, match="pickle"):
        pipeline.load_model(path, arch=tiny_arch, classes=classes)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(tiny: ClipBundle, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = _write(tmp_path / "b", tiny, _state(tiny))
    (out / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_bundle(out)
    assert not marker.exists()


def test_torch_pickle_disguised_as_safetensors_is_refused(tiny: ClipBundle, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = _write(tmp_path / "b", tiny, _state(tiny))
    torch.save({"evil": Payload(marker)}, out / WEIGHTS_FILE)
    with pytest.raises(ModelFormatError):
        load_bundle(out)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["extra.pkl", "open_clip_model.pickle", "x.joblib"])
def test_pickle_file_inside_bundle_is_refused(tiny: ClipBundle, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    out = _write(tmp_path / "b", tiny, _state(tiny))
    (out / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelFormatError, match=name.replace(".", r"\.")):
        load_bundle(out)
    assert not marker.exists()


# --- corrupt or inconsistent weights ------------------------------------------------------------


@pytest.mark.parametrize("keep", ["half", 0, 4, 8, 20, "minus-one"])
def test_truncated_safetensors(tiny: ClipBundle, tmp_path: Path, keep: object) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    data = (out / WEIGHTS_FILE).read_bytes()
    cut = len(data) // 2 if keep == "half" else len(data) - 1 if keep == "minus-one" else int(keep)  # type: ignore[call-overload]
    (out / WEIGHTS_FILE).write_bytes(data[:cut])
    with pytest.raises(ModelFormatError, match=WEIGHTS_FILE.replace(".", r"\.")) as info:
        load_bundle(out)
    assert info.value.exit_code == ExitCode.ERROR


def test_missing_weights_file(tiny: ClipBundle, tmp_path: Path) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        load_bundle(out)


@pytest.mark.parametrize("name", [CONFIG_FILE, TASK_FILE])
def test_missing_or_broken_json(tiny: ClipBundle, tmp_path: Path, name: str) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    (out / name).unlink()
    with pytest.raises(ModelFormatError, match=f"{name.replace('.', '[.]')} is missing"):
        load_bundle(out)
    (out / name).write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_bundle(out)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_names_the_tensor(tiny: ClipBundle, tmp_path: Path, value: float) -> None:
    state = _state(tiny)
    state["visual.transformer.resblocks.0.mlp.c_fc.weight"][3, 5] = value
    out = _write(tmp_path / "b", tiny, state)
    with pytest.raises(ModelFormatError, match=r"visual\.transformer\.resblocks\.0\.mlp\.c_fc\.weight.*NaN or Inf"):
        load_bundle(out)


def test_missing_tensor_names_it(tiny: ClipBundle, tmp_path: Path) -> None:
    state = _state(tiny)
    del state["visual.ln_post.bias"]
    out = _write(tmp_path / "b", tiny, state)
    with pytest.raises(ModelFormatError, match=r"missing tensor 'visual\.ln_post\.bias'"):
        load_bundle(out)


def test_unexpected_tensor_names_it(tiny: ClipBundle, tmp_path: Path) -> None:
    state = _state(tiny)
    state["visual.backdoor.weight"] = torch.zeros(3)
    out = _write(tmp_path / "b", tiny, state)
    with pytest.raises(ModelFormatError, match=r"unexpected tensor 'visual\.backdoor\.weight'"):
        load_bundle(out)


def test_shape_mismatch_names_the_tensor(tiny: ClipBundle, tmp_path: Path) -> None:
    state = _state(tiny)
    state["visual.proj"] = torch.zeros(64, 32)
    out = _write(tmp_path / "b", tiny, state)
    with pytest.raises(ModelFormatError, match=r"'visual\.proj' has shape \(64, 32\)"):
        load_bundle(out)


def test_config_that_does_not_match_the_weights(tiny: ClipBundle, tmp_path: Path) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    config = json.loads((out / CONFIG_FILE).read_text())
    config["model_cfg"]["vision_cfg"]["layers"] = 3
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"missing tensor 'visual\.transformer\.resblocks\.2\."):
        load_bundle(out)


def test_integer_dtype_for_float_weight_names_the_tensor(tiny: ClipBundle, tmp_path: Path) -> None:
    state = _state(tiny)
    state["logit_scale"] = state["logit_scale"].to(torch.int32)
    out = _write(tmp_path / "b", tiny, state)
    with pytest.raises(ModelFormatError, match=r"'logit_scale' has dtype torch\.int32"):
        load_bundle(out)


def test_half_precision_weights_are_upcast(tiny: ClipBundle, tmp_path: Path) -> None:
    state = {k: v.half() for k, v in _state(tiny).items()}
    out = _write(tmp_path / "b", tiny, state)
    loaded = load_bundle(out)
    assert all(v.dtype == torch.float32 for v in loaded.model.state_dict().values())
    assert torch.equal(loaded.model.state_dict()["visual.proj"], state["visual.proj"].float())


def test_bad_config_values(tiny: ClipBundle, tmp_path: Path) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    good = json.loads((out / CONFIG_FILE).read_text())

    def with_config(mutate: Callable[[dict[str, object]], None]) -> None:
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        (out / CONFIG_FILE).write_text(json.dumps(cfg))

    with_config(lambda c: c["model_cfg"].pop("text_cfg"))  # type: ignore[attr-defined]
    with pytest.raises(ModelFormatError, match="text_cfg"):
        load_bundle(out)
    with_config(lambda c: c["model_cfg"]["text_cfg"].update(hf_model_name="bert"))  # type: ignore[index]
    with pytest.raises(ModelFormatError, match="Hugging Face"):
        load_bundle(out)
    with_config(lambda c: c["preprocess_cfg"].update(size=32))  # type: ignore[attr-defined]
    with pytest.raises(ModelFormatError, match="image_size"):
        load_bundle(out)
    with_config(lambda c: c["preprocess_cfg"].update(std=[0.5, 0.0, 0.5]))  # type: ignore[attr-defined]
    with pytest.raises(ModelFormatError, match="std"):
        load_bundle(out)


def test_bad_task_file(tiny: ClipBundle, tmp_path: Path) -> None:
    out = _write(tmp_path / "b", tiny, _state(tiny))
    for task, needle in [
        ({"classnames": []}, "classnames"),
        ({"classnames": ["a", "a"]}, "unique"),
        ({"classnames": ["a", "b"], "templates": ["no placeholder"]}, "placeholder"),
        (["a", "b"], "classnames"),
    ]:
        (out / TASK_FILE).write_text(json.dumps(task))
        with pytest.raises(ModelFormatError, match=needle):
            load_bundle(out)


def test_missing_path_and_bare_weights_file(tiny: ClipBundle, tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    out = _write(tmp_path / "b", tiny, _state(tiny))
    with pytest.raises(ModelFormatError, match="--arch"):
        load_bundle(out / WEIGHTS_FILE)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelFormatError, match="not a model bundle"):
        load_bundle(tmp_path / "readme.txt")


def test_unknown_weights_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ModelFormatError, match="unknown weights format"):
        read_weights(path)


# --- legacy checkpoints with an architecture name -----------------------------------------------


def test_plain_state_dict_checkpoint_loads_with_arch(
    tiny: ClipBundle, tmp_path: Path, tiny_arch: str, classes: Path
) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = pipeline.load_model(path, arch=tiny_arch, classes=classes)
    _assert_same_weights(loaded.model, tiny.model)
    assert loaded.task == DEMO_TASK
    assert loaded.preprocess.image_size == 28
    assert loaded.weights_sha256 == sha256_file(path)
    assert loaded.source == f"{tiny_arch}:{path}"


@pytest.mark.parametrize("wrap", ["state_dict", "module", "bin"])
def test_wrapped_checkpoints_load_with_arch(tiny: ClipBundle, tmp_path: Path, tiny_arch: str, wrap: str) -> None:
    state = tiny.model.state_dict()
    if wrap == "state_dict":
        path, obj = tmp_path / "model.pth", {"state_dict": state}
    elif wrap == "module":
        path, obj = tmp_path / "model.ckpt", {f"module.{k}": v for k, v in state.items()}
    else:
        path, obj = tmp_path / "pytorch_model.bin", state
    torch.save(obj, path)
    loaded = load_checkpoint(tiny_arch, path, DEMO_TASK)
    _assert_same_weights(loaded.model, tiny.model)


def test_safetensors_file_loads_with_arch(tiny: ClipBundle, tmp_path: Path, tiny_arch: str) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_checkpoint(tiny_arch, path, DEMO_TASK)
    _assert_same_weights(loaded.model, tiny.model)


def test_checkpoint_with_wrong_weights_for_arch(tiny: ClipBundle, tmp_path: Path, tiny_arch: str) -> None:
    state = dict(tiny.model.state_dict())
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelFormatError, match=r"visual\.proj"):
        load_checkpoint(tiny_arch, tmp_path / "nan.pt", DEMO_TASK)
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFormatError, match="missing tensor"):
        load_checkpoint(tiny_arch, tmp_path / "other.pt", DEMO_TASK)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelFormatError, match="flat dict of tensors"):
        load_checkpoint(tiny_arch, tmp_path / "list.pt", DEMO_TASK)


def test_unknown_arch_and_missing_classes(tmp_path: Path, classes: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "m.pt")
    with pytest.raises(UsageError, match="unknown open_clip architecture"):
        pipeline.load_model(tmp_path / "m.pt", arch="no-such-arch", classes=classes)
    with pytest.raises(UsageError, match="--classes"):
        pipeline.load_model(tmp_path / "m.pt", arch="no-such-arch")
    with pytest.raises(UsageError, match="classes file"):
        pipeline.load_model(tmp_path / "m.pt", arch="no-such-arch", classes=tmp_path / "none.json")


def test_missing_checkpoint_with_arch(tmp_path: Path, tiny_arch: str) -> None:
    with pytest.raises(ModelFormatError, match="missing"):
        load_checkpoint(tiny_arch, tmp_path / "nope.pt", DEMO_TASK)
