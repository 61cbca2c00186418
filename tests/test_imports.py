"""The package's imports form a DAG: module-level and function-level imports, read from the source.

The graph is built from the AST of every module of ``dpolicy``, the way Python runs imports:

* ``import a.b.c`` and ``from a.b.c import x`` depend on the module ``a.b.c`` and on the *bodies* of
  the packages ``a`` and ``a.b`` that Python initialises on the way (their module-level statements,
  not their functions: a lazy ``__getattr__`` runs only when one of its names is asked for). A
  module's own enclosing packages are being initialised already and are not counted;
* ``from pkg import name`` depends on the submodule ``pkg.name`` when there is one; else, when
  ``pkg/__init__`` binds ``name`` at module level, on the body of ``pkg`` and on the module it
  re-exports ``name`` from; else (a name only a lazy ``__getattr__`` provides) on all of ``pkg``,
  functions included;
* relative imports are resolved against the importing module; ``importlib.import_module`` with a
  string literal, or with a table of literal ``dpolicy`` module names (a lazy re-export table), or
  of ``f"{__name__}.…"`` (a package importing its own modules), counts like an import statement.

Every such edge, at module or function level, must keep the graph acyclic.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "dpolicy"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p, is_pkg)
    return out


def body(name: str) -> str:
    """The node standing for a package's module-level statements only."""
    return f"{name} [body]"


class _Module:
    def __init__(self, name: str, path: Path, is_pkg: bool, mods: dict):
        self.name, self.is_pkg, self.mods = name, is_pkg, mods
        self.tree = ast.parse(path.read_text(), str(path))
        self.package = name if is_pkg else name.rpartition(".")[0]
        # names bound at module level: name -> the module it is re-exported from (None: defined here)
        self.bound: dict[str, str | None] = {}
        for node in self.tree.body:
            for stmt in self._flatten(node):
                if isinstance(stmt, ast.ImportFrom):
                    src = self.absolute(stmt)
                    for a in stmt.names:
                        self.bound[a.asname or a.name] = f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src
                elif isinstance(stmt, ast.Import):
                    for a in stmt.names:
                        self.bound[a.asname or a.name.partition(".")[0]] = None
                elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self.bound[stmt.name] = None
                elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    for t in targets:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name):
                                self.bound[n.id] = None

    @staticmethod
    def _flatten(node):
        """A module-level statement and the statements of the ``if`` / ``try`` / ``with`` blocks in it."""
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.ExceptHandler)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, None) or []:
                    yield from _Module._flatten(child)

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def module_level(self):
        for node in self.tree.body:
            yield from self._flatten(node)


def build_graph() -> dict[str, set[str]]:
    mods = _modules()
    info = {name: _Module(name, p, is_pkg, mods) for name, (p, is_pkg) in mods.items()}
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, m in info.items():
        if m.is_pkg:
            graph[body(name)] = set()

    def target(importer: str, module: str) -> set[str]:
        """Depending on ``module`` (an imported module): it and the bodies of the packages above it."""
        out = {module}
        parts = module.split(".")
        for i in range(1, len(parts)):
            anc = ".".join(parts[:i])
            if anc in info and not (importer == anc or importer.startswith(anc + ".")):
                out.add(body(anc))
        return out

    def from_import(importer: str, src: str, name: str) -> set[str]:
        sub = f"{src}.{name}"
        if sub in info:
            return target(importer, sub)
        if src not in info:
            return set()
        m = info[src]
        if not m.is_pkg:
            return target(importer, src)
        out = target(importer, src) - {src}
        out.add(body(src))
        if name in m.bound:
            if m.bound[name] is not None and m.bound[name] in info:
                out |= target(importer, m.bound[name])
            return out
        out.add(src)  # provided lazily: the package's functions run
        return out

    def edges_of(m: _Module, node) -> set[str]:
        out: set[str] = set()
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    mod = a.name
                    while mod not in info:
                        mod = mod.rpartition(".")[0]
                    out |= target(m.name, mod)
        elif isinstance(node, ast.ImportFrom):
            src = m.absolute(node)
            if src == PKG or src.startswith(PKG + "."):
                for a in node.names:
                    out |= from_import(m.name, src, a.name)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in info:
                out |= target(m.name, arg.value)
            elif isinstance(arg, ast.JoinedStr) and m.is_pkg:  # f"{__name__}.{...}": the package's own modules
                out |= {sub for sub in info if sub.rpartition(".")[0] == m.name}
            else:  # a lazy table: every literal dpolicy module name in the module
                out |= {t for s in ast.walk(m.tree) if isinstance(s, ast.Constant) and isinstance(s.value, str)
                        and s.value in info for t in target(m.name, s.value)}
        return out

    for name, m in info.items():
        top = list(m.module_level())
        top_ids = {id(s) for s in top}
        for stmt in top:  # module level (the body of a package)
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                graph[body(name) if m.is_pkg else name] |= edges_of(m, stmt)
            elif not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for n in ast.walk(stmt):  # calls made while the module runs
                    if isinstance(n, ast.Call):
                        graph[body(name) if m.is_pkg else name] |= edges_of(m, n)
        for n in ast.walk(m.tree):  # everything else: function and class level
            if id(n) in top_ids:
                continue
            graph[name] |= edges_of(m, n)
        if m.is_pkg:
            graph[name].add(body(name))  # all of a package includes its body
        for k in list(graph):
            graph[k].discard(k)
    return graph


def _is_import_module(func) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of nodes (first == last), or None."""
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_graph_sees_lazy_and_function_level_imports():
    g = build_graph()
    assert "dpolicy.kinds" in g["dpolicy.policy"]  # the lazy load_policy re-export
    assert "dpolicy.kinds" not in g[body("dpolicy.policy")]  # ... which the package's body never runs
    assert "dpolicy.rl.steered" in g["dpolicy.kinds"] and "dpolicy.compose.composed" in g["dpolicy.kinds"]
    assert body("dpolicy.compose") in g["dpolicy.kinds"]  # importing a submodule runs its package's body
    assert "dpolicy.process.diffusion" in g["dpolicy.process"]  # the process registry imports its own modules
    assert "dpolicy.policy" in g["dpolicy"]  # the top-level lazy table
    # a cycle is found and printed when there is one
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_form_a_dag():
    cycle = find_cycle(build_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
