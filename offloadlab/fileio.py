"""Reading config files (YAML/JSON), CSV tables and JSON-lines files with one-line errors, and writing
results atomically (temp file, then rename); the host's available memory (/proc/meminfo), which the
simulator and the runtime both check."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError


def read_csv_table(path: str | os.PathLike, pad: bool = True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A CSV file as (header, [(line number, cells)]): blank lines skipped, a short row's missing cells
    empty (``pad``; else the row as written, for a reader that requires every cell); a row longer than
    the header, a malformed file, no header or a repeated column name is a one-line ConfigError naming
    the file and line."""
    import csv
    import io

    file = Path(path)
    reader = csv.reader(io.StringIO(read_text(file, "CSV file"), newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for cells in reader:
            if not cells or cells == [""]:
                continue
            if header is None:
                header = cells
            elif len(cells) > len(header):
                raise ConfigError("row", ",".join(cells)[:60], f"at most {len(header)} cells (the header's)",
                                  source=f"{file}, line {reader.line_num}")
            else:
                rows.append((reader.line_num, cells + [""] * (len(header) - len(cells)) if pad else cells))
    except csv.Error as e:
        raise ConfigError("row", None, f"a CSV table ({e})", source=f"{file}, line {reader.line_num}") from None
    if header is None:
        raise ConfigError("columns", [], "a CSV table with a header", source=str(file))
    if len(set(header)) < len(header):
        dup = next(c for i, c in enumerate(header) if c in header[:i])
        raise ConfigError("columns", header, f"distinct names ({dup!r} twice)", source=str(file))
    return header, rows


def read_json_lines(path: str | os.PathLike, what: str = "JSON-lines file") -> Iterator[tuple[int, dict[str, Any]]]:
    """A JSON-lines file's objects, one a line, as (line number, object) in file order: blank lines skipped,
    a byte-order mark allowed. A line that is not a JSON object is a one-line ConfigError naming the file
    and line (``row``: the line, cut to 60 characters). Lazy: a caller checking each object in turn
    reports the first problem in file order, whichever check finds it."""
    file = Path(path)
    for n, line in enumerate(read_text(file, what, encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise ConfigError("row", shortened(line), f"a JSON object per line ({why})",
                              source=f"{file}, line {n}") from None
        if not isinstance(row, dict):
            raise ConfigError("row", shortened(line), "a JSON object per line", source=f"{file}, line {n}")
        yield n, row


def shortened(text: str, width: int = 60) -> str:
    """``text`` as an error shows a row of a file: at most ``width`` characters, "..." where cut."""
    return text if len(text) <= width else text[:width - 3] + "..."


def read_text(path: str | os.PathLike, what: str = "file", encoding: str = "utf-8") -> str:
    """The text of ``path``; a missing, unreadable or non-UTF-8 file is a one-line ConfigError naming it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise ConfigError("path", str(p), f"a {what}, not a directory") from None
    except OSError as e:
        raise ConfigError("path", str(p), f"a readable {what} ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError("file", str(p), f"UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is not: "
                          f"a binary file or another encoding?)") from None


def host_memory_available() -> int:
    """Bytes the host can still give a process: MemAvailable from /proc/meminfo (Linux), else physical
    pages times page size (``os.sysconf``'s errors propagate)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_json_object(path: str | os.PathLike, name: str, what: str = "JSON file",
                     expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file whose top level is an object; bad JSON (nested too deeply included) or another top level
    (``expected`` words what it should be) is a ConfigError naming the file as ``name`` (with the line),
    the path as its source."""
    p = Path(path)
    try:
        data = json.loads(read_text(p, what))
    except json.JSONDecodeError as e:
        raise ConfigError(name, f"line {e.lineno}", f"valid JSON ({e.msg})", source=str(p)) from None
    except RecursionError:
        raise ConfigError(name, "nested too deeply", "JSON nested less deeply (Python's parser stops near "
                          "1,000 levels)", source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(name, type(data).__name__, expected, source=str(p))
    return data


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Load a YAML or JSON file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("path", str(p), "an existing YAML or JSON file")
    text = read_text(p, "YAML or JSON file")
    import yaml  # here, not with the module: every command imports this one, few read YAML

    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("file", str(p), f"valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError("file", str(p), "a mapping at the top level", source=str(p))
    return data


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM wait and arrive when it ends (to the handlers in place before): around
    making a temp file and recording its name, so an interrupt cannot fall between the two and leave it
    behind. At the Python level (a signal mask is per thread, and another thread, a pool's or tqdm's,
    could take the signal): Python runs handlers in the main thread, so a no-op off it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(sig)
        if before is not None:  # None: installed outside Python, cannot be put back
            old[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in got:
            signal.raise_signal(sig)  # now, to the handler that was in place


def _nearest_existing(p: Path) -> Path:
    q = p.absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def check_place(flag: str, path: str, p: Path) -> None:
    """The nearest existing ancestor of ``p`` is a directory this process may create entries in (a ConfigError
    naming option ``flag`` and ``path`` if not), checked before long work whose result ``p`` will hold."""
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise ConfigError(flag, path, f"a path under a directory ({anc} is a file)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(flag, path, f"a path where files can be written ({anc}: permission denied)")
    # what access() cannot tell (root on a read-only or special file system, such as /proc): make a file there
    try:
        with signals_held():
            fd, tmp = temp_beside(anc / ".offloadlab-check")
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise ConfigError(flag, path, f"a path where files can be written ({anc}: {e.strerror})") from None


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` (named by option ``flag``) can become a regular file: not empty, not a directory, device or
    pipe, in a place files can be made (missing directories above it are made when it is written)."""
    text = os.fspath(path)
    if not text.strip():
        raise ConfigError(flag, text, "a file path (it is empty)")
    p = Path(text)
    if p.is_dir():
        raise ConfigError(flag, text, "a file path, not a directory")
    if p.exists() and not p.is_file():
        raise ConfigError(flag, text, "a regular file path (it is a device, pipe or socket)")
    check_place(flag, text, p)
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    A crash or an interrupt halfway leaves the old file (or none), never half a file nor the temp file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with signals_held():
            fd, tmp = temp_beside(p)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def umask() -> int:
    """This process's umask (read from /proc where it can be, so no other thread sees it change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in ``path``'s directory (so a rename onto ``path`` is atomic), with
    the mode a plain ``open(path, "w")`` would give: 0o666 less the umask (mkstemp's own 0o600 would
    survive the rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=False))
