"""The package's import graph, read with ``ast`` (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "sfr_export"
ROOT = Path(__file__).resolve().parents[2]
# where each area's source lives (package-dir mapping in pyproject.toml)
AREA_DIRS = {"kernels": ROOT / "kernels" / "src", "calibration": ROOT / "calibration"}

# Lower layers never import higher ones. Areas in one layer may import each other only without a cycle.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "choice", "_optional", "jsonl", "resources", "calibration", "worker", "vectors"),
    ("artifact", "spec"),
    ("pooling", "tokenization", "kernels"),
    ("models",),
    ("runtime",),
    ("quant", "eval", "corpus"),
    ("tensorrt",),
    ("stages", "finetune"),
    ("pipeline", "serve", "bench"),
    ("commands",),
    ("cli", "__init__", "__main__"),
]


def module_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in (ROOT / PKG).rglob("*.py"):
        rel = path.relative_to(ROOT / PKG).with_suffix("")
        out[".".join((PKG, *rel.parts)).removesuffix(".__init__")] = path
    for area, d in AREA_DIRS.items():
        for path in d.rglob("*.py"):
            rel = path.relative_to(d).with_suffix("")
            out[".".join((PKG, area, *rel.parts)).removesuffix(".__init__")] = path
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_pkg else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" for a in node.names] + [base]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, is_pkg, node)
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith(PKG + ".") and n != module:
                found.add(n)
    return found


def dangling_imports() -> list[str]:
    """``from .x import y`` / ``from sfr_export.x import y`` (in the package, the tests, benchmarks and scripts) whose
    module ``x`` does not exist in the package."""
    files = module_files()
    known = set(files)
    bad = []
    for module, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = _resolve(module, is_pkg, node)[-1]
                if base.startswith(PKG) and base not in known:
                    bad.append(f"{module}: from {'.' * node.level}{node.module} ({base})")
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PKG + "."):
                if node.module not in known:
                    bad.append(f"{path.relative_to(ROOT)}: from {node.module}")
    return sorted(bad)


def module_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def area_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(area(m), set()).update(area(d) for d in deps if area(d) != area(m))
    return out


def layer_of(a: str) -> int:
    for i, layer in enumerate(LAYERS):
        if a in layer:
            return i
    raise KeyError(f"area {a!r} is in no layer of tests/architecture/importgraph.py")


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if area(m) != area(d) and layer_of(area(d)) > layer_of(area(m)):
                bad.append(f"{m} -> {d}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def report() -> str:
    g = module_graph()
    ag = area_graph(g)
    lines = ["layers (lowest first):"]
    for i, layer in enumerate(LAYERS):
        lines.append(f"  {i}: " + ", ".join(f"{a} -> {{{', '.join(sorted(ag.get(a, ())))}}}" for a in layer if a in ag))
    lines.append(f"upward edges: {upward_edges(g) or 'none'}")
    lines.append(f"module cycles: {cycles(g) or 'none'}")
    lines.append(f"area cycles: {cycles(ag) or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
