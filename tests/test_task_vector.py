"""Task-vector algebra: the laws TBAR relies on, and the errors that name the bad tensor."""

from __future__ import annotations

import math

import pytest
import torch

from tbar_guard.task_vector import TaskVector, sum_vectors


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(4, generator=gen),
        "ln.weight": torch.randn(8, generator=gen).double(),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "index": torch.arange(5, dtype=torch.int32) + seed,
        "mask": torch.tensor([True, False, seed % 2 == 0]),
    }


def _vec(seed: int) -> TaskVector:
    return TaskVector.between(_state(100), _state(seed))


def assert_vec_equal(a: TaskVector, b: TaskVector, exact: bool = True) -> None:
    assert set(a.vector) == set(b.vector)
    for key, value in a.vector.items():
        if exact:
            assert torch.equal(value, b.vector[key]), key
        else:
            torch.testing.assert_close(value, b.vector[key], msg=key)


def test_between_keeps_only_float_tensors() -> None:
    v = _vec(1)
    assert set(v.vector) == {"conv.weight", "conv.bias", "ln.weight"}
    assert v.vector["ln.weight"].dtype == torch.float64
    base, tuned = _state(100), _state(1)
    assert torch.equal(v.vector["conv.bias"], tuned["conv.bias"] - base["conv.bias"])


def test_between_does_not_alias_its_inputs() -> None:
    base, tuned = _state(100), _state(1)
    v = TaskVector.between(base, tuned)
    before = v.vector["conv.bias"].clone()
    tuned["conv.bias"].add_(1.0)
    base["conv.bias"].add_(5.0)
    assert torch.equal(v.vector["conv.bias"], before)


def test_double_negation_is_identity() -> None:
    v = _vec(1)
    negated = -v
    assert_vec_equal(-negated, v)
    assert not torch.equal(negated.vector["conv.bias"], v.vector["conv.bias"])


def test_vector_plus_its_negation_is_zero() -> None:
    v = _vec(1)
    zero = v + (-v)
    for key, value in zero.vector.items():
        assert torch.count_nonzero(value) == 0, key


def test_builtin_sum_equals_chained_addition() -> None:
    a, b, c = _vec(1), _vec(2), _vec(3)
    assert_vec_equal(sum([a, b, c]), a + b + c)  # type: ignore[arg-type]
    assert_vec_equal(sum_vectors([a, b, c]), a + b + c)
    assert_vec_equal(sum_vectors([a]), a)


def test_addition_commutes_and_associates() -> None:
    a, b, c = _vec(1), _vec(2), _vec(3)
    assert_vec_equal(a + b, b + a)
    assert_vec_equal((a + b) + c, a + (b + c), exact=False)


def test_sum_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no task vectors"):
        sum_vectors([])


def test_radd_rejects_non_zero_numbers() -> None:
    with pytest.raises(TypeError):
        _ = 1 + _vec(1)  # type: ignore[operator]


def test_scale() -> None:
    v = _vec(1)
    assert_vec_equal(v.scale(1.0), v)
    assert_vec_equal(v.scale(-1.0), -v)
    assert_vec_equal(v.scale(2.0), v + v, exact=False)
    assert math.isclose(v.scale(3.0).norm(), 3 * v.norm(), rel_tol=1e-6)


def test_apply_with_zero_coefficient_is_the_base() -> None:
    base = _state(100)
    out = _vec(1).apply_to(base, 0.0)
    assert set(out) == set(base)
    for key, value in base.items():
        assert torch.equal(out[key], value), key
        assert out[key].dtype == value.dtype, key


def test_apply_then_between_recovers_the_vector() -> None:
    base, v = _state(7), _vec(1)
    assert_vec_equal(TaskVector.between(base, v.apply_to(base, 1.0)), v, exact=False)
    assert_vec_equal(TaskVector.between(base, v.apply_to(base, -2.5)), v.scale(-2.5), exact=False)


def test_apply_copies_int_and_bool_buffers_unchanged() -> None:
    base = _state(7)
    out = _vec(1).apply_to(base, 3.0)
    for key in ("bn.num_batches_tracked", "index", "mask"):
        assert torch.equal(out[key], base[key]), key
        assert out[key].dtype == base[key].dtype, key
        assert out[key].data_ptr() != base[key].data_ptr(), f"{key} must be a copy"


def test_apply_does_not_modify_the_base() -> None:
    base = _state(7)
    snapshot = {k: v.clone() for k, v in base.items()}
    _vec(1).apply_to(base, 2.0)
    for key, value in base.items():
        assert torch.equal(value, snapshot[key]), key


def test_apply_keeps_the_state_dtype() -> None:
    base = _state(7)
    base["conv.bias"] = base["conv.bias"].half()
    vec = TaskVector.between(_state(100), _state(1))
    out = vec.apply_to(base, 1.0)
    assert out["conv.bias"].dtype == torch.float16


def test_between_key_mismatch_names_the_tensor() -> None:
    base, tuned = _state(1), _state(2)
    tuned["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"extra\.weight"):
        TaskVector.between(base, tuned)
    del tuned["extra.weight"]
    del tuned["conv.bias"]
    with pytest.raises(ValueError, match=r"conv\.bias"):
        TaskVector.between(base, tuned)


def test_between_shape_mismatch_names_the_tensor() -> None:
    base, tuned = _state(1), _state(2)
    tuned["conv.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"conv\.bias.*\(4,\).*\(5,\)"):
        TaskVector.between(base, tuned)


def test_between_shape_mismatch_of_int_buffer_is_also_refused() -> None:
    base, tuned = _state(1), _state(2)
    tuned["index"] = torch.arange(6, dtype=torch.int32)
    with pytest.raises(ValueError, match="index"):
        TaskVector.between(base, tuned)


def test_add_and_dot_mismatch_name_the_tensor() -> None:
    a = _vec(1)
    other = TaskVector({**a.vector, "conv.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"conv\.bias"):
        _ = a + other
    with pytest.raises(ValueError, match=r"conv\.bias"):
        a.dot(other)
    fewer = TaskVector({k: v for k, v in a.vector.items() if k != "ln.weight"})
    with pytest.raises(ValueError, match=r"ln\.weight"):
        _ = a + fewer


def test_apply_mismatch_names_the_tensor() -> None:
    v = _vec(1)
    missing = {k: t for k, t in _state(7).items() if k != "conv.weight"}
    with pytest.raises(ValueError, match=r"conv\.weight"):
        v.apply_to(missing)
    wrong_shape = {**_state(7), "conv.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"conv\.bias"):
        v.apply_to(wrong_shape)
    extra_float = {**_state(7), "head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"head\.weight"):
        v.apply_to(extra_float)


def test_dot_and_norm() -> None:
    a = TaskVector({"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[4.0]])})
    b = TaskVector({"w": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([[0.25]])})
    assert a.dot(b) == pytest.approx(0.5 - 2.0 + 6.0 + 1.0)
    assert a.dot(b) == pytest.approx(b.dot(a))
    assert a.norm() == pytest.approx(math.sqrt(1 + 4 + 9 + 16))
    assert (a + (-a)).norm() == 0.0
    assert a.dot(-a) == pytest.approx(-(a.norm() ** 2))


def test_norm_is_accumulated_in_double_precision() -> None:
    # in float32, 1e16 + 1000 rounds to 1e16; the dot product must not lose the small tensor
    v = TaskVector({"big": torch.tensor([1e8], dtype=torch.float32), "tiny": torch.ones(1000)})
    assert v.dot(v) == 1e16 + 1000


def test_task_vectors_compare_with_eq() -> None:
    v = _vec(1)
    negated = -v
    assert -negated == v
