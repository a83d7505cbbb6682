"""The package's layering, read from its source with ``ast`` (imports inside functions count too).

Print the layers with ``python tests/architecture/importgraph.py``."""

from __future__ import annotations

import ast
import subprocess
import sys

from importgraph import ROOT, area_graph, cycles, dangling_imports, module_graph, upward_edges

MAX_FUNCTION_LINES = 60
# Functions allowed past the limit, each with its reason (keep this list short).
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def test_arrows_point_down() -> None:
    assert upward_edges(module_graph()) == []


def test_every_import_names_a_module_that_exists() -> None:
    assert dangling_imports() == []


def test_no_import_cycles() -> None:
    g = module_graph()
    assert cycles(g) == [], "module-level import cycles"
    assert cycles(area_graph(g)) == [], "area-level import cycles"


def test_runtime_never_imports_stages_eval_serve_or_finetune() -> None:
    bad = [f"{m} -> {d}" for m, deps in module_graph().items() if m.startswith("sfr_export.runtime")
           for d in deps if d.split(".")[1] in ("stages", "eval", "serve", "finetune", "pipeline", "commands", "cli")]
    assert bad == []


def test_serving_imports_no_torch() -> None:
    """What a service needs (artifact, runtime, serve, the ORT runner) imports neither torch nor transformers."""
    code = ("import sys, sfr_export, sfr_export.artifact, sfr_export.spec, sfr_export.tokenization, "
            "sfr_export.runtime, sfr_export.runtime.ort_runner, sfr_export.serve; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_repo_root_shadows_no_installed_package(tmp_path) -> None:
    """Run from a checkout, the root is on sys.path: a folder there that is a package by the name of an installed one
    (``kernels``: Hugging Face's, which transformers imports) would be imported in its place."""
    ours = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "sfr_export")
    code = f"import importlib.util; print([n for n in {ours!r} if importlib.util.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
    load = "from transformers import MistralModel; import sfr_export.kernels"
    subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True, cwd=ROOT)


def long_functions() -> list[tuple[int, str]]:
    out = []
    for path in (ROOT / "sfr_export").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                name = f"{path.relative_to(ROOT)}:{node.name}"
                if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED:
                    out.append((n, name))
    return sorted(out, reverse=True)


def test_functions_are_short() -> None:
    assert long_functions() == []
