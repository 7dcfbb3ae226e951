"""A removal without the optional evidence, for tests that check a gate's plumbing (exit codes,
registration, faults) rather than its evidence: no re-inversion rounds or companion triggers, no
re-emergence fine-tune, no disentanglement error. tests/test_gate.py runs the default removal."""

from __future__ import annotations

import yaml

FAST_REMOVAL: dict[str, object] = {
    "unlearn": {"reinvert_rounds": 0, "companions": []},
    "reemergence": {"enabled": False},
    "disentanglement": {"enabled": False},
}

# the same as a policy file's ``sanitize:`` section (one YAML document, to append to a policy file)
FAST_REMOVAL_YAML = yaml.safe_dump({"sanitize": FAST_REMOVAL}, sort_keys=False)
