"""Checks the shape of the code: layering, import circles, module and function sizes.

    python scripts/check_layout.py          # prints every problem; exit 1 if there is one
    python scripts/check_layout.py --graph  # also prints the import graph, one module a line

Rules (README, "Layout"):
  - protocol <- peer <- swarm: protocol imports neither peer nor swarm; peer never imports swarm;
  - inside swarm: decode/ never imports client/, bench/ or the face; client/ never imports decode/,
    bench/ or the face; bench/ never imports the face (cli, chat, flags);
  - the WAN delay proxy (swarm/bench/wan/proxy.py) imports only the standard library;
  - no import circles among modules (every import counts, also those inside functions, except
    `if TYPE_CHECKING:` blocks);
  - no module in protocol/, peer/, swarm/ over 400 lines; no function over 90 lines.
Reads the source with `ast`; imports nothing of the project.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "peer", "swarm")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 90
FACE = ("swarm.cli", "swarm.commands", "swarm.chat", "swarm.console", "swarm.flags")
FORBIDDEN = [  # (importer prefix, imported prefixes it must not use, why)
    ("protocol", ("peer", "swarm"), "protocol knows neither peers nor the swarm"),
    ("peer", ("swarm",), "peers never import the swarm"),
    ("swarm.decode", ("swarm.client", "swarm.bench") + FACE, "decoding knows no peers, routes or tools"),
    ("swarm.client", ("swarm.decode", "swarm.bench") + FACE, "the client stack knows no sampling, drafts or tools"),
    ("swarm.bench", FACE, "measuring tools do not import the command line"),
]
STDLIB_ONLY = ("swarm.bench.wan.proxy",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules imported, top-level names of everything imported) by one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, tops = set(), set()

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    tops.add(alias.name.split(".")[0])
                    found.add(_resolve(alias.name, known))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                tops.add(base.split(".")[0])
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else _resolve(base, known))
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}, tops


def _resolve(dotted: str, known: dict[str, Path]) -> str:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def sizes(name: str, path: Path) -> list[str]:
    text = path.read_text()
    problems = []
    lines = text.count("\n") + (not text.endswith("\n"))
    if lines > MAX_MODULE_LINES:
        problems.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: function {node.name} has {n} lines "
                                f"(at most {MAX_FUNCTION_LINES})")
    return problems


def check() -> tuple[list[str], dict[str, set[str]]]:
    known = modules()
    graph, problems = {}, []
    for name, path in known.items():
        graph[name], tops = imports_of(name, path, known)
        problems += sizes(name, path)
        for importer, banned, why in FORBIDDEN:
            if name == importer or name.startswith(importer + "."):
                for target in sorted(graph[name]):
                    if any(target == b or target.startswith(b + ".") for b in banned):
                        problems.append(f"{name} imports {target}: {why}")
        if name in STDLIB_ONLY:
            extra = sorted(t for t in tops if t and t not in sys.stdlib_module_names and t != "__future__")
            if extra:
                problems.append(f"{name} must import only the standard library, imports {', '.join(extra)}")
    for comp in circles(graph):
        problems.append("import circle: " + " <-> ".join(comp))
    return problems, graph


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graph", action="store_true", help="print every module with the project modules it imports")
    args = ap.parse_args(argv)
    problems, graph = check()
    if args.graph:
        for name in sorted(graph):
            print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    for p in problems:
        print(p)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
