"""A command's output files: checked before any work, written all together or not at all.

    with OutputSet() as out:
        out.file("--json", "r.json")                   # checked now: not a directory, a writable place
        out.directory("--out", "results", ["a.csv"])   # a directory (made if absent) and the names in it
        ...                                            # the long work
        out.write_text("r.json", text)                 # staged: a temp file beside the target
    # leaving the block renames every staged file onto its target; an exception removes them instead

Each file is staged as a temp file in its target's directory (so the rename is atomic and cannot fail
for lack of room), with the mode ``open(path, "w")`` would give (0o666 less the umask). Directories
made for the outputs are removed again when the set is discarded, so a failed or interrupted command
leaves no new files. ``PipeSafeStdout`` keeps a closed pipe on stdout (``| head``) from losing them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..fileio import check_output_file, check_place, signals_held, temp_beside


class OutputSet:
    """The files one command writes (see module docstring)."""

    def __init__(self) -> None:
        self._flags: dict[Path, str] = {}  # target (absolute) -> the option that names it
        self._staged: list[tuple[str, Path]] = []  # (temp file, target), in order
        self._made: list[Path] = []  # directories made for the outputs, outermost first

    # ---- checks, before the work ----
    def file(self, flag: str, path: str | os.PathLike) -> Path:
        """Register an output file named by option ``flag``; a bad path is a ConfigError now."""
        text = os.fspath(path)
        p = check_output_file(flag, path)
        key = p.absolute()
        if key in self._flags and self._flags[key] != flag:
            raise ConfigError(flag, text, f"a path no other output uses (it is also {self._flags[key]}'s)")
        self._flags[key] = flag
        return p

    def directory(self, flag: str, path: str | os.PathLike, names: tuple[str, ...] | list[str] = ()) -> Path:
        """Register a directory named by ``flag`` (made when the first file is written) and ``names`` in it."""
        text = os.fspath(path)
        if not text.strip():
            raise ConfigError(flag, text, "a directory path (it is empty)")
        p = Path(text)
        if p.exists() and not p.is_dir():
            raise ConfigError(flag, text, "a directory (it is a file)")
        check_place(flag, text, p / "x")
        for n in names:
            self.file(flag, p / n)
        return p

    # ---- writing, after the work ----
    def _stage(self, path: str | os.PathLike) -> tuple[int, str, Path]:
        p = Path(path)
        if p.absolute() not in self._flags:
            self.file("output", p)
        missing = []
        q = p.absolute().parent
        while not q.exists():
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            d.mkdir()
            self._made.append(d)
        with signals_held():  # an interrupt arrives once the temp file is recorded (and so removed)
            try:
                fd, tmp = temp_beside(p)
            except OSError as e:  # named by its target, not by the temp file it could not make
                raise OSError(e.errno, e.strerror, str(p)) from None
            self._staged.append((tmp, p))
        return fd, tmp, p

    def write(self, path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> Path:
        """Stage ``path``: ``write(f)`` fills a temp file beside it, renamed onto it at commit."""
        fd, _, p = self._stage(path)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return p

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        return self.write(path, lambda f: f.write(text))

    def stage(self, path: str | os.PathLike) -> str:
        """The temp file's name, for writers that take a path (e.g. ``Trace.save_chrome(out.stage(p))``)."""
        fd, tmp, _ = self._stage(path)
        os.close(fd)
        return tmp

    def commit(self) -> None:
        """Rename every staged file onto its target."""
        staged, self._staged = self._staged, []
        for i, (tmp, target) in enumerate(staged):
            try:
                os.replace(tmp, target)
            except OSError as e:
                self._staged = staged[i:]
                self.discard()
                raise ConfigError(self._flags.get(target.absolute(), "output"), str(target),
                                  f"a path where files can be written ({e.strerror})") from None
        self._made = []

    def discard(self) -> None:
        """Remove every staged temp file, and the directories made for them."""
        staged, self._staged = self._staged, []
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        for d in reversed(self._made):
            try:
                d.rmdir()
            except OSError:  # not empty: something else wrote there meanwhile
                pass
        self._made = []

    @property
    def staged(self) -> list[Path]:
        return [t for _, t in self._staged]

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


class PipeSafeStdout:
    """stdout that outlives its reader: once a write meets a closed pipe (``| head``), later writes are
    dropped, so the command still finishes and writes its files. ``broken`` says whether that happened."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.broken = False

    def _closed_pipe(self) -> None:
        self.broken = True
        try:  # Python's documented recipe: point the descriptor at devnull, so the exit-time flush is quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
            pass

    def write(self, s: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(s)
            except BrokenPipeError:
                self._closed_pipe()
        return len(s)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed_pipe()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
