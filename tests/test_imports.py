"""No import cycles: the import graph of each package, read from its sources.

Every ``import`` and ``from ... import`` counts, at any depth: module level, inside a
function, and under ``if TYPE_CHECKING:`` (a type-only cycle is still two modules that
each need the other). Relative imports are resolved, and ``from pkg import name`` is an
import of the submodule ``pkg.name`` where one exists, else of ``pkg`` itself. A package's
``__init__`` run on the way to a submodule is not counted (every submodule would otherwise
close a cycle through the package's own ``__init__``).
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("vcon_jax", "vcon_experiments")


def _modules() -> dict[str, pathlib.Path]:
  """``{dotted module name: source file}`` of every module of :data:`PACKAGES`."""
  found = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join(parts)] = path
  return found


def _imports(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, int]]:
  """``(imported module, line)`` for each import in ``path`` of a module in ``known``."""
  is_package = path.name == "__init__.py"
  edges = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, up level - 1 packages
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1]
                        + ([node.module] if node.module else []))
      else:
        base = node.module
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                 for alias in node.names]
    else:
      continue
    edges += [(t, node.lineno) for t in targets if t in known and t != name]
  return edges


def _graph() -> dict[str, dict[str, list[int]]]:
  """``{module: {imported module: [lines]}}`` over both packages."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    graph[name] = collections.defaultdict(list)
    for target, line in _imports(name, path, set(modules)):
      graph[name][target].append(line)
  return graph


def _cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
  """One shortest cycle through each module that lies on a cycle, without repeats."""
  cycles, seen = [], set()
  for start in sorted(graph):
    parent, queue = {start: None}, collections.deque([start])
    while queue:  # breadth first: the first way back to start is a shortest cycle
      node = queue.popleft()
      if start in graph[node]:
        cycle = [node]
        while parent[cycle[-1]] is not None:
          cycle.append(parent[cycle[-1]])
        cycle.reverse()
        key = frozenset(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        if key not in seen:
          seen.add(key)
          cycles.append(cycle)
        break
      for nxt in sorted(graph[node]):
        if nxt not in parent:
          parent[nxt] = node
          queue.append(nxt)
  return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, list[int]]]) -> str:
  steps = [f"{a} (line {', '.join(map(str, graph[a][b]))})"
           for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
  return " -> ".join(steps + [cycle[0]])


def test_the_graph_sees_relative_function_level_and_submodule_imports():
  graph = _graph()
  assert "vcon_jax._paths" in graph["vcon_jax._selection"]  # from vcon_jax import _paths
  assert "vcon_jax.export" in graph["vcon_jax"]  # from vcon_jax.export import (...)
  assert len(graph) > 40 and all(m.startswith(PACKAGES) for m in graph)


def test_relative_imports_resolve_from_modules_and_packages(tmp_path):
  known = {"p", "p.q", "p.q.a", "p.q.b", "p.c", "p.c.d"}
  (tmp_path / "a.py").write_text("from . import b\nfrom ..c import d, name\n"
                                 "def f():\n  from .b import x\n")
  assert sorted(_imports("p.q.a", tmp_path / "a.py", known)) == [
      ("p.c", 2), ("p.c.d", 2), ("p.q.b", 1), ("p.q.b", 4)]
  (tmp_path / "__init__.py").write_text("from . import b\nfrom .. import c\n")
  assert sorted(_imports("p.q", tmp_path / "__init__.py", known)) == [("p.c", 2), ("p.q.b", 1)]


@pytest.mark.parametrize("package", ["vcon_jax", "vcon_experiments"])
def test_no_import_cycles(package):
  graph = _graph()
  cycles = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
  assert not cycles, (f"{len(cycles)} import cycle(s) in {package} (module (line of the "
                      "import) -> the module it imports):\n"
                      + "\n".join(_describe(c, graph) for c in cycles))
