"""The project's shape, for reviews: the import graph between its modules (layers, cycles) and its
longest functions.

    python -m scripts.codemap            # import graph, layer check, the 10 longest functions
    python -m scripts.codemap --top 20

Reads the source with `ast` (nothing is imported). Layers, top to bottom: pipelines -> components
-> the library (`neumo`); an import running back up, or a cycle, is listed as a problem and makes
the exit status 1.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pipelines": ROOT / "pipelines", "components": ROOT / "components", "neumo": ROOT / "shared" / "neumo"}
LAYER = {"pipelines": 2, "components": 1, "neumo": 0}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project module."""
    found = {}
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                if path.stat().st_size == 0 and parts[:-1]:
                    continue  # an empty package marker
                parts = parts[:-1]
            found[".".join((top, *parts))] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (at any depth: function-level imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from neumo import stages` imports neumo.stages; `from neumo.x import f` imports neumo.x
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def longest_functions(top: int) -> list[tuple[int, str]]:
    found = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name} ({path.relative_to(ROOT)}:{node.lineno})"))
    return sorted(found, reverse=True)[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = p.parse_args(argv)
    g = graph()
    problems = []
    print("# import graph (module -> project modules it imports)")
    for mod in sorted(g):
        print(f"{mod} -> {', '.join(sorted(g[mod])) or '-'}")
        for dep in g[mod]:
            if LAYER[dep.split('.')[0]] > LAYER[mod.split('.')[0]]:
                problems.append(f"upward import: {mod} -> {dep}")
    problems += [f"cycle: {' <-> '.join(c)}" for c in cycles(g)]
    edges = sum(len(v) for v in g.values())
    print(f"\n{len(g)} modules, {edges} imports; problems: {len(problems)}")
    for line in problems:
        print("  " + line)
    print(f"\n# the {args.top} longest functions (lines)")
    for n, name in longest_functions(args.top):
        print(f"{n:4d}  {name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
