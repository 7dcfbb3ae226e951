"""Weight-disentanglement evidence for a removal: ξ between the trigger vector and a clean vector.

The clean vector τ_c = θ_c − θ_b comes from a short fine-tune of θ_b on clean, correctly labelled
images; the trigger vector τ_t is the removal's. ξ(α_c, α_t) (:func:`detect.disentanglement_error`,
algorithms.md §3.4) is evaluated on held-out clean images and the same images stamped with the
trigger, on a grid whose α_t values are fractions of the chosen −α, so it speaks to the removal
that was actually made: low ξ means negating τ_t leaves clean predictions alone and adding clean
behaviour leaves the sanitized model's triggered predictions alone.

Pure model work: no file I/O, no printing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tbar_guard.attacks import Trigger
from tbar_guard.clip import ZeroShotClassifier, visual_state
from tbar_guard.detect import DisentanglementGrid, disentanglement_error
from tbar_guard.errors import DataError, UsageError
from tbar_guard.task_vector import TaskVector
from tbar_guard.train import FinetuneConfig, finetune_visual


@dataclass(frozen=True)
class Disentanglement:
    """ξ on the grid ``alphas_clean × alphas_trigger`` (α_t = −fraction · chosen α)."""

    grid: DisentanglementGrid
    chosen_alpha: float
    images: int  # held-out clean images (each also evaluated stamped)
    clean_images: int  # images the clean vector was fine-tuned on
    clean_vector_norm: float
    seconds: float

    @property
    def mean_xi(self) -> float:
        cells = [v for row in self.grid.xi for v in row]
        return sum(cells) / len(cells)

    def chosen_column(self) -> int | None:
        """Index of α_t = −chosen α in the grid (None when the grid lacks it)."""
        for j, a in enumerate(self.grid.alphas_trigger):
            if abs(a + self.chosen_alpha) <= 1e-9 * max(1.0, self.chosen_alpha):
                return j
        return None

    def to_json(self) -> dict[str, Any]:
        g = self.grid
        j = self.chosen_column()
        at_chosen: dict[str, Any] | None = None
        if j is not None:
            column = [row[j] for row in g.xi]
            at_chosen = {
                "alpha_trigger": g.alphas_trigger[j],
                "xi": column,
                "clean_part": [row[j] for row in g.clean_part],
                "trigger_part": [row[j] for row in g.trigger_part],
                "max_xi": max(column),
            }
        return {
            "alphas_clean": list(g.alphas_clean),
            "alphas_trigger": list(g.alphas_trigger),
            "xi": [list(row) for row in g.xi],
            "clean_part": [list(row) for row in g.clean_part],
            "trigger_part": [list(row) for row in g.trigger_part],
            "mean_xi": self.mean_xi,
            "at_chosen_alpha": at_chosen,
            "images": self.images,
            "clean_images": self.clean_images,
            "clean_vector_norm": self.clean_vector_norm,
            "seconds": self.seconds,
        }


def trigger_alphas(chosen_alpha: float, fractions: Sequence[float]) -> tuple[float, ...]:
    """α_t = −f · chosen α for each fraction (0 stays +0.0)."""
    return tuple(0.0 if f == 0 else -float(f) * chosen_alpha for f in fractions)


def measure_disentanglement(
    clf: ZeroShotClassifier,
    trigger_vector: Mapping[str, torch.Tensor],
    clean_pixels: torch.Tensor,
    clean_labels: torch.Tensor,
    eval_pixels: torch.Tensor,
    trigger: Trigger,
    chosen_alpha: float,
    alphas_clean: Sequence[float],
    trigger_fractions: Sequence[float],
    finetune: FinetuneConfig,
    seed: int = 0,
) -> Disentanglement:
    """ξ of ``trigger_vector`` against a clean vector learned here from ``clf``'s current image tower.

    ``clean_pixels``/``clean_labels``: the clean fine-tune (its recipe is ``finetune``).
    ``eval_pixels``: held-out clean images; they are also stamped with ``trigger`` (seeded).
    ``clf.visual`` is restored to its entry state (θ_b) before returning, also on error.
    """
    if clean_pixels.shape[0] == 0:
        raise DataError(
            "the clean vector needs clean training images, got none",
            hint="provide more clean images, or set sanitize.disentanglement.enabled: false in the policy",
        )
    if eval_pixels.shape[0] == 0:
        raise DataError(
            "ξ needs held-out clean images, got none",
            hint="provide more clean images, or set sanitize.disentanglement.enabled: false in the policy",
        )
    if not alphas_clean or not trigger_fractions:
        raise UsageError(
            f"empty disentanglement grid (alphas_clean {list(alphas_clean)}, trigger_fractions "
            f"{list(trigger_fractions)})",
            hint="give at least one value for each",
        )
    theta_b = visual_state(clf)
    was_training = clf.training
    device = next(clf.parameters()).device
    t0 = time.perf_counter()
    try:
        finetune_visual(clf, clean_pixels, clean_labels, finetune)
        clean_vector = TaskVector.between(theta_b, visual_state(clf))
        clf.visual.load_state_dict(theta_b)
        stamped = trigger.apply(eval_pixels, generator=torch.Generator().manual_seed(seed))

        def build(state: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            clf.visual.load_state_dict(dict(state))

            def classify(pixels: torch.Tensor) -> torch.Tensor:
                out: torch.Tensor = clf(pixels.to(device))
                return out

            return classify

        clf.eval()
        grid = disentanglement_error(
            theta_b,
            clean_vector.vector,
            trigger_vector,
            build,
            eval_pixels,
            stamped,
            tuple(float(a) for a in alphas_clean),
            trigger_alphas(chosen_alpha, trigger_fractions),
        )
    finally:
        clf.visual.load_state_dict(theta_b)
        clf.train(was_training)
    return Disentanglement(
        grid,
        float(chosen_alpha),
        int(eval_pixels.shape[0]),
        int(clean_pixels.shape[0]),
        clean_vector.norm(),
        time.perf_counter() - t0,
    )
