"""Exit codes: the CI contract. Every command of the CLI ends with one of these."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    CLEAN = 0  # no small-mask trigger found (scan/gate; not proof of clean), or the known trigger does not work
    BACKDOOR_REMOVED = 1  # a backdoor was found and removed under the policy
    ERROR = 2  # something failed (bad model file, unreadable data, crash); nothing was registered
    UNREMOVED = 3  # a backdoor was found but no alpha satisfies the policy; nothing passed
    USAGE = 4  # bad command-line arguments or an invalid policy
