"""The floors of the package (README "Where things live"): each imports only the floors below it.

Read from the sources (every import statement, function-level ones included), so a lazy import that
climbs a floor fails here too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (its import name, the project packages it may import besides itself)
FLOORS = {
    "offloadlab": ("offloadlab", set()),  # the vocabulary (its own modules and catalog/)
    "sim": ("offloadlab.sim", {"offloadlab"}),
    "runtime": ("offloadlab.runtime", {"offloadlab"}),
    "validation": ("offloadlab.validation", {"offloadlab", "offloadlab.sim"}),
    "offloadlab/apps": ("offloadlab.apps", {"offloadlab", "offloadlab.sim", "offloadlab.runtime",
                                            "offloadlab.validation"}),
}
SUBPACKAGES = ("offloadlab.sim", "offloadlab.runtime", "offloadlab.validation", "offloadlab.apps")


def _package_of(module: str) -> str:
    """The floor a project module belongs to: its subpackage, else the vocabulary."""
    return next((p for p in SUBPACKAGES if module == p or module.startswith(p + ".")), "offloadlab")


def _imports(path: Path, package: str) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in ``path``; relative ones resolved against ``package``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
            else:
                names = [node.module or ""]
            out += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def _files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).glob("*.py"))
    return files + (sorted((ROOT / folder / "catalog").glob("*.py")) if folder == "offloadlab" else [])


@pytest.mark.parametrize("folder", list(FLOORS))
def test_each_floor_imports_only_the_floors_below_it(folder):
    own, allowed = FLOORS[folder]
    bad = []
    for f in _files(folder):
        package = own + (".catalog" if f.parent.name == "catalog" else "")
        for mod, line in _imports(f, package):
            if mod == "offloadlab" or mod.startswith("offloadlab."):
                floor = _package_of(mod)
                if floor != own and floor not in allowed:
                    bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["offloadlab", "sim", "validation"])
def test_no_torch_below_the_runtime(folder):
    bad = [f"{f.relative_to(ROOT)}:{line}" for f in _files(folder) for mod, line in _imports(f, "x")
           if mod.split(".")[0] == "torch"]
    assert not bad, bad


def test_the_check_sees_a_climbing_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..apps.sweep import sweep\n")
    assert _imports(f, "offloadlab.sim") == [("offloadlab.apps.sweep", 2)]
    assert _package_of("offloadlab.apps.sweep") == "offloadlab.apps"
