"""Shape figures of the code (issue 15): largest module and class, import cycles, hasattr/getattr count.

    .venv/bin/python bench/architecture.py [--json OUT]

Counted over the three packages (evomerge, populations, fitness; after issue 15 the last two install as
evomerge.populations / evomerge.fitness, and are counted the same way from their folders).
- module size: lines of each .py file; class size: lines from `class` to its last statement (ast);
- import cycles: strongly connected components of more than one module in the module import graph
  (grimp, the graph import-linter checks), and the same between the units directly under evomerge (its
  modules and sub-packages; fitness and populations count as two of them);
- `grep -c "hasattr\\|getattr("`: lines matching, summed over the files.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("evomerge", "populations", "fitness")


def files() -> list[Path]:
    return sorted(p for d in FOLDERS for p in (ROOT / d).rglob("*.py"))


def sizes():
    mods, classes = [], []
    for p in files():
        text = p.read_text()
        rel = str(p.relative_to(ROOT))
        mods.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    return sorted(mods, reverse=True), sorted(classes, reverse=True)


def grep_count() -> int:
    pat = re.compile(r"hasattr|getattr\(")
    return sum(1 for p in files() for line in p.read_text().splitlines() if pat.search(line))


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)

    for root in graph:
        if root in index:
            continue
        visit(root)
        work = [(root, iter(graph[root]))]
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    visit(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
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


def import_graph() -> dict[str, set[str]]:
    """The module graph as installed: since issue 15 fitness/ and populations/ install inside evomerge (a
    staged copy in that layout is read); before, they were top-level packages beside it."""
    import shutil
    import tempfile

    import grimp

    nested = "evomerge.fitness" in (ROOT / "evomerge" / "config.py").read_text()
    if not nested:
        sys.path.insert(0, str(ROOT))
        return _graph(grimp.build_graph(*FOLDERS, cache_dir=None))
    with tempfile.TemporaryDirectory() as stage:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "evomerge", Path(stage) / "evomerge", ignore=ignore)
        for name in ("fitness", "populations"):
            shutil.copytree(ROOT / name, Path(stage) / "evomerge" / name, ignore=ignore)
        sys.path.insert(0, stage)
        sys.modules.pop("evomerge", None)
        return _graph(grimp.build_graph("evomerge", cache_dir=None))


def _graph(g) -> dict[str, set[str]]:
    graph = {m: set() for m in g.modules}
    for m in g.modules:
        for other in g.find_modules_directly_imported_by(m):
            if other in graph:
                graph[m].add(other)
    return graph


def package_of(module: str) -> str:
    """The unit a module belongs to: a module or sub-package directly under evomerge (fitness and populations
    count as evomerge.fitness / evomerge.populations in either layout); cycles between these units are what
    import-linter's acyclic_siblings contract forbids at the top."""
    parts = module.split(".")
    if parts[0] != "evomerge":
        return f"evomerge.{parts[0]}"
    return ".".join(parts[:2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    mods, classes = sizes()
    graph = import_graph()
    # a package imported by a module's __init__ only to re-export is still an edge: cycles count as written
    cycles = _sccs(graph)
    pkg: dict[str, set[str]] = {}
    for m, deps in graph.items():
        pkg.setdefault(package_of(m), set()).update(package_of(d) for d in deps if package_of(d) != package_of(m))
    for v in list(pkg.values()):
        for d in v:
            pkg.setdefault(d, set())
    pkg_cycles = _sccs(pkg)
    out = {"modules": len(mods), "lines": sum(n for n, _ in mods),
           "largest_modules": mods[:5], "largest_classes": classes[:5],
           "modules_over_400": [m for m in mods if m[0] > 400], "classes_over_250": [c for c in classes if c[0] > 250],
           "module_cycles": cycles, "unit_cycles": pkg_cycles, "hasattr_getattr_lines": grep_count()}
    print(f"{out['modules']} modules, {out['lines']} lines")
    print("largest modules: " + ", ".join(f"{p} {n}" for n, p in mods[:5]))
    print("largest classes: " + ", ".join(f"{p} {n}" for n, p in classes[:5]))
    print(f"modules over 400 lines: {len(out['modules_over_400'])}; "
          f"classes over 250 lines: {len(out['classes_over_250'])}")
    print(f"import cycles (modules): {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles))
    print(f"import cycles (units under evomerge): {len(pkg_cycles)}"
          + "".join(f"\n  {' <-> '.join(c)}" for c in pkg_cycles))
    print(f'grep -c "hasattr\\|getattr(" lines: {out["hasattr_getattr_lines"]}')
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
