"""Typed errors raised at the project's boundaries (config load, CLI, API entry).

Every message names the field, the value and what was expected, so the CLI can print it as one
line and exit non-zero without a traceback.
"""
from __future__ import annotations


class OffloadLabError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(OffloadLabError, ValueError):
    """A field of a spec, policy, workload or config file has a bad value."""

    def __init__(self, field: str, value: object, expected: str, *, source: str | None = None):
        self.field, self.value, self.expected, self.source = field, value, expected, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}={value!r}: expected {expected}")


class UnknownNameError(OffloadLabError, KeyError):
    """A model or GPU name that is not in the catalog."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class DoesNotFitError(OffloadLabError):
    """A placement that does not fit in GPU or host memory."""
