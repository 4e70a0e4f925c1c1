"""Typed errors raised at the project's boundaries (config load, CLI, API entry).

Every message names the field, the value and what was expected, so the CLI can print it as one
line and exit non-zero without a traceback.
"""
from __future__ import annotations


class OffloadLabError(Exception):
    """Base class of every error this project raises on purpose.

    A subclass's ``args`` are its constructor's arguments, so ``type(e)(*e.args)`` makes the same error:
    pickle does that (an error raised in a worker process), and so does SimPy when a process fails
    (simpy/core.py ``Environment.step`` raises a copy built that way). The message is ``str(e)``."""


class ConfigError(OffloadLabError, ValueError):
    """A field of a spec, policy, workload or config file has a bad value."""

    def __init__(self, field: str, value: object, expected: str, source: str | None = None):
        self.field, self.value, self.expected, self.source = field, value, expected, source
        super().__init__(field, value, expected, source)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.field}={self.value!r}: expected {self.expected}"


class UnknownNameError(OffloadLabError, KeyError):
    """A model or GPU name that is not in the catalog."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(kind, name, known)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return f"unknown {self.kind} {self.name!r}; known: {', '.join(self.known)}"


class DoesNotFitError(OffloadLabError):
    """A placement that does not fit in GPU or host memory."""


_TYPE_WORDS = {"int": "an integer", "float": "a number", "_finite": "a finite number"}


def from_argparse(message: str, prefix: str = "") -> ConfigError:
    """argparse's error message ("argument --requests: invalid int value: '1e30'") as a ConfigError naming
    the option, the value and what was expected (``prefix`` before the option: e.g. "--vllm ")."""
    import re

    m = re.match(r"argument ([^:]+): (.*)", message)
    if not m:  # e.g. "unrecognized arguments: --x", "the following arguments are required: cmd"
        what, _, rest = message.partition(": ")
        if what.startswith("unrecognized"):
            return ConfigError(f"{prefix}option", rest, "an option this command takes (see --help)")
        if what.startswith("the following arguments are required"):
            return ConfigError(f"{prefix}{rest}", None, "a value (it is required; see --help)")
        return ConfigError(f"{prefix}arguments", rest or message, what)
    flag, what = prefix + m.group(1).split("/")[0], m.group(2)
    if what.startswith("expected one argument"):
        return ConfigError(flag, None, f"a value after it (write {m.group(1).split('/')[0]}=VALUE for a value "
                           "that starts with '-')")
    bad = re.match(r"invalid (\w+) value: '(.*)'$", what)
    if bad:
        return ConfigError(flag, bad.group(2), _TYPE_WORDS.get(bad.group(1), bad.group(1)))
    bad = re.match(r"invalid choice: '(.*)' \(choose from (.*)\)$", what)
    if bad:
        return ConfigError(flag, bad.group(1), f"one of {bad.group(2)}")
    return ConfigError(flag, None, what.replace("expected ", "", 1))
