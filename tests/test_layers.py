"""The package layers and their import rules, read from every module's imports (function-local too).

Bottom to top:

    mlpruning.core (and mlpruning's own __init__)      errors, atomic writes, JSON, the contract
    pipeline | graph_passes                              side by side, neither imports the other
    deploy                                               verify, bench, report, serve, engines
    mlpruning.cli                                        the CLI and the run orchestrator

A module may import its own layer or a lower one. No import cycle may exist between modules,
counting imports inside functions: an import moved into a function to dodge a cycle is a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlpruning", "pipeline", "graph_passes", "deploy")
RANKS = {"core": 0, "pipeline": 1, "graph_passes": 1, "deploy": 2, "cli": 3}


def layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "mlpruning":
        return "cli" if module == "mlpruning.cli" or module.startswith("mlpruning.cli.") else "core"
    return top


def modules_under(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """First-party modules ``path`` imports anywhere in it (``from a import b`` is a.b if a module)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        out |= {n for n in names if layer_of(n) is not None and n != module}
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = modules_under(root)
    known = set(modules)
    return {m: imports_of(p, m, known) for m, p in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imported in sorted(graph.items()):
        mine = layer_of(module)
        for other in sorted(imported):
            theirs = layer_of(other)
            if theirs == mine:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                bad.append(f"{module} ({mine}) imports {other} ({theirs})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports_only_its_own_layer_or_lower():
    graph = import_graph(ROOT)
    assert len(graph) > 60 and {layer_of(m) for m in graph} == set(RANKS)
    assert layer_violations(graph) == []


def test_no_import_cycle_anywhere():
    assert cycles(import_graph(ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checks_catch_a_bad_import_and_a_hidden_cycle(tmp_path):
    tree = _write(
        tmp_path,
        {
            "mlpruning/__init__.py": "",
            "mlpruning/core/__init__.py": "",
            "mlpruning/core/errors.py": "from deploy.report import write\n",  # floor imports a higher floor
            "pipeline/__init__.py": "",
            "pipeline/models.py": "from graph_passes import detect\n",  # side by side: forbidden
            "graph_passes/__init__.py": "",
            "graph_passes/detect.py": "",
            "deploy/__init__.py": "",
            "deploy/report.py": "from deploy.batcher import run\ndef write():\n    pass\n",
            "deploy/batcher.py": "def run():\n    from deploy import report  # moved into a function\n",
        },
    )
    graph = import_graph(tree)
    assert layer_violations(graph) == [
        "mlpruning.core.errors (core) imports deploy.report (deploy)",
        "pipeline.models (pipeline) imports graph_passes.detect (graph_passes)",
    ]
    assert cycles(graph) == [["deploy.batcher", "deploy.report"]]


BLOCK_TORCH = """
import importlib, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
print("ok")
"""
# deploy modules whose work needs the PyTorch reference: they import pipeline's torch code
TORCH_SIDE = {"deploy.verify", "deploy.random_parity"}


# pipeline modules that serve and verify's runtime side use: tasks and their kinds
PIPELINE_TORCH_FREE = ["pipeline.tasks", "pipeline.task_kind", "pipeline.kinds", "pipeline.metrics"]


@pytest.mark.parametrize("package", ["graph_passes", "deploy", "mlpruning.core", "pipeline"])
def test_torch_free_modules_import_without_torch(package):
    if package == "pipeline":
        names = PIPELINE_TORCH_FREE + [m for m in modules_under(ROOT) if m.startswith("pipeline.kinds.")]
    else:
        names = [m for m in modules_under(ROOT) if m.startswith(package + ".") and m not in TORCH_SIDE]
    assert len(names) >= 5
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *names], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
