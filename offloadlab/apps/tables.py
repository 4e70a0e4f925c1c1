"""Tables of result rows (a list of dicts) as text and CSV, without pandas.

A short command (``offloadlab run``, ``paper``) prints a handful of rows; pandas' import alone takes
longer than the simulation (0.4-0.6 s on the development machine), so these write what
``DataFrame.to_string(index=False)`` and ``DataFrame.to_csv(index=False)`` would, for the rows they have.
A caller holding a DataFrame passes ``df.to_dict("records")``.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Callable, Iterable, Mapping, Sequence


def columns_of(rows: Sequence[Mapping]) -> list[str]:
    """Every key of ``rows``, in the order first seen (a DataFrame's columns from the same records)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def as_lists(rows: Sequence[Mapping], columns: Iterable[str] | None = None) -> dict[str, list]:
    """``{column: [value per row]}`` (``DataFrame.to_dict("list")``); a row without the key gives None."""
    return {c: [r.get(c) for r in rows] for c in (columns_of(rows) if columns is None else columns)}


def records(columns: Mapping[str, Sequence]) -> list[dict]:
    """``{column: values}`` (equal lengths) as one dict per row (``DataFrame(columns).to_dict("records")``)."""
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _plain(v):
    """A numpy scalar as its Python value (its text and CSV cell are then Python's); anything else as is."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def missing(v) -> bool:
    """None or NaN: an empty CSV cell, "NaN" in a table."""
    v = _plain(v)
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(v, float_format: Callable[[float], str] | None) -> str:
    v = _plain(v)
    if missing(v):
        return "NaN"
    if isinstance(v, float) and float_format is not None:
        return float_format(v)
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Mapping[str, str] | Sequence[str] | None = None, *,
                 float_format: Callable[[float], str] | None = None) -> str:
    """The rows as a text table, one line per row under a header, every column right-aligned to its widest
    cell and columns two spaces apart. ``columns``: which keys, in order (a mapping: key -> header; absent
    keys are left out); ``float_format`` writes floats (missing values are "NaN")."""
    if columns is None:
        columns = columns_of(rows)
    if not isinstance(columns, Mapping):
        columns = {c: c for c in columns}
    present = set(columns_of(rows))
    keys = [k for k in columns if k in present]
    cells = [[str(columns[k]) for k in keys]]
    for r in rows:
        cells.append([_cell(r.get(k), float_format) for k in keys])
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def csv_text(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """The rows as CSV text with a header (``columns``, default every key in first-seen order); missing
    values (None, NaN) are empty cells and floats are written in full (repr), as pandas' ``to_csv`` does."""
    columns = columns_of(rows) if columns is None else list(columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if missing(v := _plain(r.get(c))) else v for c in columns])
    return buf.getvalue()
