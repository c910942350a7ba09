"""The shape of the code: no import cycle in pdv, the planner imports at the top and writes no
communication formula (pdv.cost.comm is their one home)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PDV = ROOT / "pdv"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """pdv modules a file imports, at the top or inside functions (both run at some point)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pdv.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdv"):
            for a in node.names:  # `from pdv.plan import baselines` imports the submodule
                sub = f"{node.module}.{a.name}"
                found.add(sub if _exists(sub) else node.module)
    return {m for m in found if m != "pdv"}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(PDV.rglob("*.py"))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_pdv() -> None:
    graph = _graph()
    assert "pdv.plan.search" in graph and "pdv.cost.terms" in graph["pdv.plan.objective"]
    assert _cycles(graph) == []


def test_the_planner_imports_at_the_top() -> None:
    """Imports inside functions in pdv.plan would hide an import cycle or a slow import."""
    for path in sorted((PDV / "plan").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
                assert not inner, f"{path.name}:{node.name} imports inside a function"


def test_the_planner_writes_no_communication_formula() -> None:
    """Ring volume factors ((n − 1)/n), bytes over β, and link matrices stay out of pdv.plan.

    groups.py reads the bandwidth matrix to find islands and baselines.py rebuilds the matrices
    a baseline believes; neither prices a transfer.
    """
    formulas = [re.compile(r"\((\w+) - 1\) / \1\b"), re.compile(r"/ *(\w+\.)?(beta|b[12])\b")]
    assert formulas[0].search("2 * (n - 1) / n * nbytes") and formulas[1].search("s / ring.beta")
    for path in sorted((PDV / "plan").glob("*.py")):
        text = path.read_text()
        for f in formulas:
            assert not f.search(text), f"{path.name} writes a communication formula"
        if path.name not in ("groups.py", "baselines.py"):
            for matrix in ("latency_s", "bandwidth_Bps", "collective_"):
                assert matrix not in text, f"{path.name} reads links.{matrix} itself"
