"""The import graph of evolora's package: every `evolora.*` import (top-level or inside a function), the import
loops (strongly connected components of more than one module) and the imports that point up the pipeline.

    python scripts/import_graph.py            # the graph as text, then loops, upward imports, largest files
    python scripts/import_graph.py --dot      # Graphviz DOT (render with `dot -Tpng`)

The pipeline, lowest first: a module may import only modules of its own layer or below."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    ("base", ["evolora", "evolora.errors", "evolora.atomic", "evolora.tiny_tokenizer"]),
    ("config", ["evolora.config"]),
    ("data", ["evolora.data"]),
    ("models", ["evolora.models", "evolora.runfolder"]),
    ("evaluation", ["evolora.evaluation", "evolora.metrics", "evolora.report"]),
    ("methods", ["evolora.methods"]),
    ("engine", ["evolora.engine"]),
    ("recipes", ["evolora.reload", "evolora.bench", "evolora.export", "evolora.api"]),
    ("cli", ["evolora.cli", "evolora.__main__"]),
]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "evolora" and module.startswith(prefix + "."))
            if matches and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best is None:
        raise SystemExit(f"{module}: not in any layer of scripts/import_graph.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The evolora modules a file imports (`from evolora.x import y` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    edges = {m: imports_of(p, modules) - {m} for m, p in files.items()}
    # a package's __init__ is imported on the way to any of its modules; it is not an edge of its own
    return {m: {t for t in targets if not (m.startswith(t + ".") and t != m)} for m, targets in edges.items()}


def loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in edges.items() for t in targets if layer_of(t) > layer_of(m))


def largest_files(n: int = 5) -> list[tuple[int, str]]:
    sizes = [(len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(SRC))) for p in SRC.rglob("*.py")]
    return sorted(sizes, reverse=True)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT")
    args = parser.parse_args()
    edges = graph()
    if args.dot:
        print("digraph evolora {\n  rankdir=BT;")
        for index, (name, _) in enumerate(LAYERS):
            members = sorted(m for m in edges if layer_of(m) == index)
            print(f'  subgraph cluster_{index} {{ label="{name}"; ' + " ".join(f'"{m}";' for m in members) + " }")
        for m, targets in sorted(edges.items()):
            for t in sorted(targets):
                print(f'  "{m}" -> "{t}";')
        print("}")
        return
    for index, (name, _) in enumerate(LAYERS):
        for m in sorted(x for x in edges if layer_of(x) == index):
            print(f"[{name}] {m} -> {', '.join(sorted(edges[m])) or '-'}")
    found, up = loops(edges), upward(edges)
    print(f"\n{sum(len(t) for t in edges.values())} imports between {len(edges)} modules; "
          f"{len(found)} loop(s); {len(up)} upward import(s)")
    for component in found:
        print("loop: " + " <-> ".join(component))
    for m, t in up:
        print(f"upward: {m} -> {t}")
    print("largest files: " + ", ".join(f"{path} {lines}" for lines, path in largest_files()))
    sys.exit(1 if found or up else 0)


if __name__ == "__main__":
    main()
