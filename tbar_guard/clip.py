"""The open_clip boundary: zero-shot head and a pixel-space classifier around the image tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tbar_guard.bundle import ClipBundle, Preprocess, ZeroShotTask


def tokenizer_for(model: nn.Module) -> object:
    """The open_clip BPE tokenizer (shipped in the package, nothing downloaded)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


@torch.no_grad()
def zero_shot_head(model: nn.Module, task: ZeroShotTask, device: str | torch.device = "cpu") -> torch.Tensor:
    """Class weights ``W[c] = normalize(mean_t normalize(E_text(template_t(class_c))))``, shape [C, D].

    This is the task-arithmetic head (algorithms.md §3.3) without the logit scale, which
    :class:`ZeroShotClassifier` applies.
    """
    tokenizer = tokenizer_for(model)
    was_training = model.training
    model.eval()
    rows = []
    for name in task.classnames:
        tokens = tokenizer([t.format(name) for t in task.templates])  # type: ignore[operator]
        emb = F.normalize(model.encode_text(tokens.to(device)), dim=-1)  # type: ignore[operator]
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    model.train(was_training)
    return torch.stack(rows).detach()


class ZeroShotClassifier(nn.Module):
    """``pixels [N,3,H,W] in [0,1] -> logits [N,C]`` through the image tower and a frozen head.

    Normalisation lives inside, so attacks and inversion work in pixel space. Only
    ``self.visual`` has trainable parameters; the head is a buffer.
    """

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float, preprocess: Preprocess) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1))
        self.logit_scale = float(logit_scale)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = self.get_buffer("mean")
        std = self.get_buffer("std")
        return (pixels - mean) / std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.visual(self.normalize(pixels))
        return out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.embed(pixels), dim=-1)
        head = self.get_buffer("head")
        return self.logit_scale * emb @ head.t()


def classifier_for(bundle: ClipBundle, device: str | torch.device = "cpu") -> ZeroShotClassifier:
    """A classifier over a *copy* of the bundle's image tower (the bundle is never modified)."""
    import copy

    model = bundle.model.to(device)
    head = zero_shot_head(model, bundle.task, device)
    scale = float(model.logit_scale.exp().item())  # type: ignore[operator]
    visual: nn.Module = copy.deepcopy(model.get_submodule("visual"))
    clf = ZeroShotClassifier(visual, head, scale, bundle.preprocess).to(device)
    clf.eval()
    return clf


def visual_state(clf: ZeroShotClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clf.visual.state_dict().items()}


def full_state(bundle: ClipBundle, visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bundle's full CLIP state dict with the image tower replaced by ``visual``."""
    state = {k: v.detach().to("cpu").clone() for k, v in bundle.model.state_dict().items()}
    for key, value in visual.items():
        state[f"visual.{key}"] = value.detach().to("cpu").clone()
    return state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from tbar_guard.errors import UsageError

        raise UsageError(f"device {name!r} requested but CUDA is not available", hint="use device: auto or cpu")
    return torch.device(name)


def class_names(task: ZeroShotTask, indices: Sequence[int]) -> list[str]:
    return [task.classnames[i] for i in indices]
