"""Error types a user can read.

Every user mistake (bad path, bad config, bad data, broken checkpoint) raises one of these; the CLI
prints ``str(error)`` on one line and exits non-zero, without a stack trace.
"""

from __future__ import annotations


class FeatherError(Exception):
    """Base class of featherlm's user-facing errors."""


class ConfigError(FeatherError):
    """A configuration value or key is wrong (unknown key, bad type, inconsistent sizes)."""


class CheckpointError(FeatherError):
    """A model file or folder is missing, truncated, or of an unsupported kind."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(FeatherError):
    """A data file has a bad row; names the file and line so the user can fix it."""

    def __init__(self, path: object, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class GenerationError(FeatherError):
    """A generation request cannot be served (prompt longer than the context, bad sampling values)."""
