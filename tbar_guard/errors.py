"""Errors that carry the offending value, a hint, and the exit code the CLI ends with."""

from __future__ import annotations

from tbar_guard.exit_codes import ExitCode


class TbarGuardError(Exception):
    """Base error. ``message`` names the bad value; ``hint`` says what to do about it."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ModelFormatError(TbarGuardError):
    """The model artifact is missing, unsafe (pickle), corrupt or inconsistent with its config."""


class DataError(TbarGuardError):
    """The clean image data cannot be used (empty, unreadable, labels not in the class list)."""


class RegistryError(TbarGuardError):
    """MLflow could not be reached, or a model URI does not resolve."""


class OutputError(TbarGuardError):
    """Writing the outputs failed (disk full, file too large, out of memory); nothing was left."""


class RemovalError(TbarGuardError):
    """Detection or removal failed numerically (non-finite loss, diverged weights)."""


class UsageError(TbarGuardError):
    """Bad arguments: a malformed trigger spec, an unknown target class, an output that exists."""

    exit_code = ExitCode.USAGE


class PolicyError(UsageError):
    """The YAML policy is invalid. ``problems`` lists every bad key path with its message."""

    def __init__(self, message: str, problems: tuple[str, ...] = (), hint: str = "") -> None:
        super().__init__(message, hint)
        self.problems = problems

    def __str__(self) -> str:
        lines = [self.message, *(f"  - {p}" for p in self.problems)]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)
