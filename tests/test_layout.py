"""The package layout, read statically from the source: offload/ imports nothing from k2local/, and the module-level
imports of k2local/, offload/ and quant/ form no circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2local", "offload", "quant")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module and package __init__ of PACKAGES."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _import_nodes(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of a module: all of them, or only those run when the module is imported (anything outside
    a function body: top level, if / try / with blocks, class bodies; `if TYPE_CHECKING:` blocks count too)."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            else:
                stack.append(child)
    return found


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The dotted names an import statement loads (absolute; relative imports resolved; each parent package too, as
    Python runs every package __init__ on the way)."""
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names]
    else:
        if node.level:
            package = name if _is_package(path) else name.rpartition(".")[0]
            parts = package.split(".")
            parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
            base = ".".join(p for p in [*parts, node.module or ""] if p)
        else:
            base = node.module or ""
        # `from pkg import sub` loads the submodule pkg.sub when there is one
        bases = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out: list[str] = []
    for b in bases:
        parts = b.split(".")
        out += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return out


def _graph(module_level: bool) -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    """module -> modules of PACKAGES it imports, and the line of the first import making each edge."""
    known = _modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    lines: dict[tuple[str, str], int] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree, module_level):
            for t in _targets(name, path, node, known):
                if t in known and t != name and not name.startswith(t + "."):  # a module's own parent packages
                    edges[name].add(t)                                         # are already being imported
                    lines.setdefault((name, t), node.lineno)
    return edges, lines


def _components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _cycle(comp: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One import cycle through the component's first module: [a, b, ..., a]."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]  # back from v to start along the search tree
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # pragma: no cover (a component always has a cycle)


def _describe(cycle: list[str], lines: dict[tuple[str, str], int], known: dict[str, Path]) -> str:
    hops = [f"{a} ({known[a].relative_to(ROOT)}:{lines[(a, b)]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(hops)


def test_offload_imports_nothing_from_k2local() -> None:
    """offload knows where routed-expert bytes live and how they are computed; the application hands it the rest."""
    known = _modules()
    bad = []
    for name, path in known.items():
        if name != "offload" and not name.startswith("offload."):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree, module_level=False):  # function-local imports too
            for t in _targets(name, path, node, known):
                if t == "k2local" or t.startswith("k2local."):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t}")
        for node in ast.walk(tree):  # importlib.import_module("k2local...") / __import__("k2local...")
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                fn = node.func
                fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                arg = node.args[0].value
                if fname in ("import_module", "__import__") and isinstance(arg, str) and \
                        (arg == "k2local" or arg.startswith("k2local.")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {arg}")
    assert not bad, "offload/ must not import k2local/:\n" + "\n".join(sorted(set(bad)))


def test_no_import_circles() -> None:
    """No circle among module-level imports of k2local/, offload/ and quant/."""
    known = _modules()
    edges, lines = _graph(module_level=True)
    found = []
    for comp in _components(edges):
        found.append(_describe(_cycle(comp, edges), lines, known) + f"  [component: {', '.join(comp)}]")
    assert not found, "import circle(s) among module-level imports:\n" + "\n".join(found)


def test_the_scan_sees_circles_and_relative_imports(tmp_path: Path) -> None:
    """The helpers themselves: a relative import is resolved, and a two-module circle is one component."""
    edges = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert _components(edges) == [["p.a", "p.b"]]
    assert _cycle(["p.a", "p.b"], edges) == ["p.a", "p.b", "p.a"]
    known = {"p": tmp_path / "p" / "__init__.py", "p.a": tmp_path / "p" / "a.py", "p.sub": tmp_path / "p" / "sub"
             / "__init__.py", "p.sub.b": tmp_path / "p" / "sub" / "b.py"}
    node = ast.parse("from ..a import x").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _targets("p.sub.b", known["p.sub.b"], node, known) == ["p", "p.a"]
    node = ast.parse("from . import b").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _targets("p.sub", known["p.sub"], node, known) == ["p", "p.sub", "p.sub.b"]
    tree = ast.parse("import os\ndef f():\n    import p.a\nif True:\n    from p import sub\n")
    assert [type(n).__name__ for n in _import_nodes(tree, module_level=True)] == ["Import", "ImportFrom"]
    assert len(_import_nodes(tree, module_level=False)) == 3


def test_every_module_imports_alone_in_a_fresh_process() -> None:
    """`python -c "import M"` works for every module: no module relies on another having been imported first."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    mods = sorted(m for m in _modules() if not m.endswith("__main__"))

    def try_import(m: str) -> str | None:
        p = subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True)
        return None if p.returncode == 0 else f"{m}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"

    with ThreadPoolExecutor(4) as pool:
        failed = [r for r in pool.map(try_import, mods) if r]
    assert not failed, "\n".join(failed)
