"""The import rules that keep the folder listing honest (docs/architecture.md states them).

Read from the source with ``ast``, not by importing, so a rule holds for every import in a file,
lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, absolute names (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offenders(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for f in files(folder):
        for name in sorted(imports_of(f)):
            if within(name, forbidden) and not within(name, allowed):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    return bad


RULES = [
    # the ring core is sans-IO: the daemon, the in-process pipeline and the simulator all drive it
    ("meshd/ring", ("asyncio", "aiohttp", "zeroconf", "meshd.serve", "meshd.lab", "meshd.client", "training")),
    # the daemon never depends on the measuring lab or on offline training
    ("meshd/serve", ("meshd.lab", "training", "meshd.client")),
    ("meshd/client", ("meshd.serve", "meshd.lab", "meshd.ring", "training", "torch", "models")),
    # tensors and weights know nothing of the daemon
    ("models", ("meshd", "training", "peers", "aiohttp", "asyncio")),
    # the mesh layer runs without the model (peers/codec.py imports torch only when a frame carries a tensor);
    # it shares one type with models: the layer range (models/ranges.py imports nothing)
    ("peers", ("meshd", "models", "training"), ("models.ranges",)),
    ("training", ("meshd",)),
]


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_import_rules(rule):
    folder, *limits = rule
    assert files(folder), f"{folder} has no Python files: the layout changed, update the rules and the doc"
    assert offenders(folder, *limits) == []


def test_the_shared_range_module_stays_free_of_imports():
    """peers may import models.ranges only because it needs nothing: no torch, no other module of models."""
    assert imports_of(ROOT / "models" / "ranges.py") <= {
        "__future__",
        "__future__.annotations",
        "collections.abc",
        "collections.abc.Iterator",
        "dataclasses",
        "dataclasses.dataclass",
    }


def test_rule_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text("def f():\n    import asyncio\n\nfrom . import sibling\nfrom ..other import thing\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    got = imports_of(f)
    assert {"asyncio", "pkg.sub", "pkg.sub.sibling", "pkg.other", "pkg.other.thing"} <= got
