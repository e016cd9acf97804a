"""The package's layout rule, read from every import with `ast` at any depth (inside functions and
under TYPE_CHECKING too, where import cycles like to hide):

- no import cycles among the package's modules;
- `ops/` (pure math) imports nothing of the project but `ops/`;
- nothing imports `loops/` (launch/train.py reaches a driver through the method table, by name),
  so no driver imports another either;
- `rlhf_overopt/` never imports `analysis/` or `launch/`;
- no re-export facades: no module `__getattr__`, no `__all__` naming what the module imported;
- `ls rlhf_overopt/` shows at most 20 entries, each on the package docstring's map.

The checker runs on this checkout and on planted packages in tmp_path that break one rule each, so a
rule that stopped catching its violation fails here too.
"""

from __future__ import annotations

import ast
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "rlhf_overopt"
MAX_ENTRIES = 20


def _modules(root: Path, pkg: str) -> dict[str, Path]:
    mods = {}
    for f in sorted((root / pkg).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imported(f: Path, module: str, is_pkg: bool) -> list[tuple[str, int]]:
    """Every (dotted name, line) an import statement of `f` names, at any depth: for `from a import b`
    both `a` and `a.b` (b may be a submodule)."""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = base[: len(base) - node.level + 1]
                mod = ".".join(head + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(mod, node.lineno)] + [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def import_graph(root: Path, pkg: str = PKG) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """(edges between the package's modules, every external-or-internal name each module imports)."""
    mods = _modules(root, pkg)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    raw: dict[str, list[tuple[str, int]]] = {}
    for m, f in mods.items():
        raw[m] = _imported(f, m, f.name == "__init__.py")
        for name, _ in raw[m]:
            t = name
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != m and t != pkg and not m.startswith(t + "."):
                edges[m].add(t)
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def violations(root: Path, pkg: str = PKG) -> list[str]:
    """Every broken rule of the module docstring, one line each (empty when the layout holds)."""
    edges, raw = import_graph(root, pkg)
    found = [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            if m.startswith(f"{pkg}.ops.") and not (t.startswith(f"{pkg}.ops.") or t == f"{pkg}.ops"):
                found.append(f"{m} (ops/, pure math) imports {t}")
            if t.startswith(f"{pkg}.loops.") and t != f"{pkg}.loops":
                found.append(f"{m} imports the driver {t} (drivers are reached through the method table)")
    for m, names in sorted(raw.items()):
        for name, line in names:
            if name.split(".")[0] in ("analysis", "launch"):
                found.append(f"{m}:{line} imports {name} ({pkg}/ never imports analysis/ or launch/)")
    for m, f in _modules(root, pkg).items():
        tree = ast.parse(f.read_text(), str(f))
        imported = {a.asname or a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                found.append(f"{m}: a module __getattr__ (a facade: import names from where they live)")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names = {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
                if names & imported:
                    found.append(f"{m}: __all__ re-exports {sorted(names & imported)} (a facade)")
    return found


def _tracked_entries(root: Path, pkg: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", pkg], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted({line.split("/")[1] for line in out.splitlines() if line.count("/") >= 1})


def test_the_package_keeps_its_layout_rule():
    assert violations(ROOT) == []


def test_the_package_has_few_entries_each_on_the_docstring_map():
    entries = _tracked_entries(ROOT, PKG)
    assert len(entries) <= MAX_ENTRIES, entries
    doc = ast.get_docstring(ast.parse((ROOT / PKG / "__init__.py").read_text()))
    missing = [e for e in entries if e != "__init__.py" and e.removesuffix(".py") not in doc]
    assert missing == [], f"entries not on the package docstring's map: {missing}"


def test_no_driver_imports_another_and_nothing_imports_a_driver_anywhere():
    """Also outside the package: launch/, analysis/, bench/ reach drivers only by the method table."""
    for folder in ("launch", "analysis", "bench"):
        for f in (ROOT / folder).rglob("*.py"):
            for name, line in _imported(f, f"{folder}.{f.stem}", False):
                assert not name.startswith(f"{PKG}.loops."), f"{f.relative_to(ROOT)}:{line} imports {name}"


# --- planted violations: the checker must catch each -------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", "pkg/ops/__init__.py": "", "pkg/loops/__init__.py": "", **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def test_a_clean_planted_package_passes(tmp_path):
    root = _plant(tmp_path, {"pkg/ops/math.py": "import torch\n", "pkg/stage.py": "from pkg.ops.math import torch\n"})
    assert violations(root, "pkg") == []


def test_a_cycle_through_a_function_local_import_fails(tmp_path):
    root = _plant(tmp_path, {
        "pkg/config.py": "def load():\n    from pkg.validate import check\n    return check\n",
        "pkg/validate.py": "from pkg.config import load\n\ndef check():\n    return load\n",
    })
    assert violations(root, "pkg") == ["import cycle: pkg.config -> pkg.validate"]


def test_a_cycle_under_type_checking_fails(tmp_path):
    root = _plant(tmp_path, {
        "pkg/ensemble.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.training import Pairs\n",
        "pkg/training.py": "from pkg.ensemble import TYPE_CHECKING\n",
    })
    assert violations(root, "pkg") == ["import cycle: pkg.ensemble -> pkg.training"]


def test_an_ops_module_importing_a_stage_fails(tmp_path):
    root = _plant(tmp_path, {"pkg/rollout.py": "X = 1\n", "pkg/ops/losses.py": "def f():\n    from pkg import rollout\n"})
    assert violations(root, "pkg") == ["pkg.ops.losses (ops/, pure math) imports pkg.rollout"]


def test_importing_a_driver_fails(tmp_path):
    root = _plant(tmp_path, {"pkg/loops/ppo.py": "def run(ctx):\n    pass\n",
                             "pkg/loops/grpo.py": "from pkg.loops.ppo import run\n"})
    assert violations(root, "pkg") == ["pkg.loops.grpo imports the driver pkg.loops.ppo (drivers are reached "
                                       "through the method table)"]


@pytest.mark.parametrize("text, expected", [
    ("def __getattr__(name):\n    raise AttributeError(name)\n", "pkg.facade: a module __getattr__"),
    ("from pkg.ops.math import f\n__all__ = ['f']\n", "pkg.facade: __all__ re-exports ['f']"),
])
def test_facades_fail(tmp_path, text, expected):
    root = _plant(tmp_path, {"pkg/ops/math.py": "def f():\n    pass\n", "pkg/facade.py": text})
    assert [v for v in violations(root, "pkg") if v.startswith(expected)], violations(root, "pkg")


def test_importing_analysis_fails(tmp_path):
    root = _plant(tmp_path, {"pkg/report.py": "def f():\n    import analysis.results\n"})
    assert violations(root, "pkg") == ["pkg.report:2 imports analysis.results (pkg/ never imports analysis/ or launch/)"]


def test_every_module_is_on_its_folders_map():
    """Each folder's __init__ docstring maps its modules (the architecture page is generated from it)."""
    for init in sorted((ROOT / PKG).glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if init.parent.name == "loops":  # the drivers are listed from their own docstrings
            continue
        missing = [f.name for f in sorted(init.parent.glob("*.py"))
                   if f.name not in ("__init__.py", "__main__.py") and f.name not in doc]
        assert missing == [], f"{init.parent.name}/ modules not on its docstring's map: {missing}"
