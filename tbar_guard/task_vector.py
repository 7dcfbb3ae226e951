"""Task vectors: arithmetic over state dicts (Ilharco et al. 2023). No I/O inside.

Integer and bool tensors (step counters, index buffers) are not part of a vector. Key or shape
mismatches raise :class:`ValueError` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch


def _is_arith(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@dataclass(frozen=True, eq=False)
class TaskVector:
    """``vector[k] = tuned[k] - base[k]`` for every floating-point tensor."""

    vector: Mapping[str, torch.Tensor]

    @classmethod
    def between(cls, base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> TaskVector:
        if set(base) != set(tuned):
            diff = sorted(set(base) ^ set(tuned))
            raise ValueError(f"state dicts differ in key {diff[0]!r} ({len(diff)} keys differ)")
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, b in base.items():
                t = tuned[key]
                if b.shape != t.shape:
                    raise ValueError(f"tensor {key!r}: shape {tuple(b.shape)} vs {tuple(t.shape)}")
                if _is_arith(b):
                    out[key] = (t.detach().to(b.device) - b.detach()).clone()
        return cls(MappingProxyType(out))

    def _check(self, other: TaskVector) -> None:
        if set(self.vector) != set(other.vector):
            diff = sorted(set(self.vector) ^ set(other.vector))
            raise ValueError(f"task vectors differ in key {diff[0]!r}")
        for key, v in self.vector.items():
            if v.shape != other.vector[key].shape:
                raise ValueError(f"tensor {key!r}: shape {tuple(v.shape)} vs {tuple(other.vector[key].shape)}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskVector) or set(self.vector) != set(other.vector):
            return False
        return all(torch.equal(v, other.vector[k]) for k, v in self.vector.items())

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside: not hashable

    def __neg__(self) -> TaskVector:
        return TaskVector(MappingProxyType({k: -v for k, v in self.vector.items()}))

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return TaskVector(MappingProxyType({k: v + other.vector[k] for k, v in self.vector.items()}))

    def __radd__(self, other: object) -> TaskVector:
        if other == 0 or other is None:  # sum([...]) starts from 0
            return self
        if isinstance(other, TaskVector):
            return other + self
        return NotImplemented

    def scale(self, coef: float) -> TaskVector:
        return TaskVector(MappingProxyType({k: coef * v for k, v in self.vector.items()}))

    def dot(self, other: TaskVector) -> float:
        self._check(other)
        return float(sum(float((v.double() * other.vector[k].double()).sum()) for k, v in self.vector.items()))

    def norm(self) -> float:
        return float(self.dot(self) ** 0.5)

    def apply_to(self, state: Mapping[str, torch.Tensor], coef: float = 1.0) -> dict[str, torch.Tensor]:
        """``state + coef · vector`` as a new dict; non-float tensors are copied unchanged."""
        missing = sorted(set(self.vector) - set(state))
        if missing:
            raise ValueError(f"state dict lacks tensor {missing[0]!r} of the task vector")
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, value in state.items():
                if key in self.vector:
                    delta = self.vector[key]
                    if delta.shape != value.shape:
                        raise ValueError(f"tensor {key!r}: shape {tuple(value.shape)} vs {tuple(delta.shape)}")
                    out[key] = value + coef * delta.to(value.device, value.dtype)
                elif _is_arith(value):
                    raise ValueError(f"task vector lacks float tensor {key!r} of the state dict")
                else:
                    out[key] = value.clone()
        return out


def sum_vectors(vectors: Iterable[TaskVector]) -> TaskVector:
    total: TaskVector | None = None
    for v in vectors:
        total = v if total is None else total + v
    if total is None:
        raise ValueError("sum of no task vectors")
    return total
