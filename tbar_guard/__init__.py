"""tbar-guard: a model-security gate for CLIP-family vision models."""

from __future__ import annotations

__version__ = "0.1.0"
