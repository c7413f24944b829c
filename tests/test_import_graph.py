"""No import circle in ldmkit, counting function-local imports and `python -m` main blocks too (they hid
circles: pipeline -> eval.runner -> eval.txt2img_cli -> eval.runner; data.export_shards <-> cli.export_shards),
and every module imports on its own, with no other ldmkit module loaded."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "ldmkit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """ldmkit modules `name` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # `if __name__ == "__main__":` blocks count too: a library module whose main block imports ldmkit.cli, which
    # imports the module back, runs as two copies of itself (`__main__` and its real name). Runnable library
    # paths are packages with a `__main__.py` shim instead (ldmkit.data.export_shards, ldmkit.data.latent_cache).
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "ldmkit.eval.sampled_sets" in graph["ldmkit.pipeline"]  # imported inside evaluate() only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_main_blocks(tmp_path):
    """A `python -m` shim in a library module's main block is an edge like any other (it closed three circles:
    data.export_shards, data.latent_cache and eval.attributes each <-> their ldmkit.cli command)."""
    module = tmp_path / "shim.py"
    module.write_text('import os\n\nif __name__ == "__main__":\n    from ldmkit.cli.judge import main\n    main()\n')
    modules = {**module_files(), "ldmkit.shim": module}
    assert imported_modules("ldmkit.shim", module, modules) == {"ldmkit.cli.judge"}
    assert "ldmkit.cli.export_shards" in import_graph()["ldmkit.data.export_shards.__main__"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_evaluation_code_knows_no_dataset():
    """Datasets tell eval and CLIP validation what they can judge through hooks (zero_shot_task,
    attribute_task); the metrics and the run never import a dataset module."""
    graph = import_graph()
    for name in ("ldmkit.eval.plan", "ldmkit.eval.sampled_sets", "ldmkit.eval.metrics.prompt_accuracy"):
        assert not {m for m in graph[name] if m.startswith("ldmkit.data.")}, name


# Each module is imported in a process that has no ldmkit module loaded: one interpreter imports the heavy
# third-party packages once (torch, Lightning, ...; a fresh interpreter per module spent ~20 minutes of CI on
# importing torch ~140 times), then forks a child per module that imports only that module. An ldmkit import
# that works only after another ldmkit module was imported first fails in its child as it would alone.
_FORK_IMPORTS = r"""
import importlib, os, sys, traceback
for name in ("torch", "torchvision", "lightning", "hydra", "omegaconf", "numpy", "PIL.Image", "safetensors.torch"):
    importlib.import_module(name)
assert not [m for m in sys.modules if m == "ldmkit" or m.startswith("ldmkit.")]
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            sys.stdout.write(module + "\t" + traceback.format_exc().replace("\n", "\x1f") + "\n")
            sys.stdout.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(module + "\t" + ("ok" if status == 0 else f"the child exited with status {status}") + "\n")
    sys.stdout.flush()
"""
_MODULES = sorted(m for m in module_files() if not m.endswith(".__main__"))  # __main__ shims are scripts: they run


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, str]:
    """module -> "ok" or the traceback of importing it in a process with no other ldmkit module loaded."""
    result = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, *_MODULES], capture_output=True, text=True, timeout=900)
    outcome: dict[str, str] = {}
    for line in result.stdout.splitlines():
        module, _, text = line.partition("\t")
        outcome.setdefault(module, text.replace("\x1f", "\n"))  # a failing child's traceback comes first
    assert result.returncode == 0, result.stderr[-2000:]
    return outcome


@pytest.mark.parametrize("module", _MODULES)
def test_module_imports_alone(module, imported_alone):
    assert imported_alone.get(module) == "ok", imported_alone.get(module, "no result (the child died?)")[-2000:]


def test_a_module_that_needs_another_imported_first_fails_alone(tmp_path):
    """The forked check really starts each module without ldmkit loaded: a module that only works when another
    ldmkit module was imported before it fails."""
    (tmp_path / "needs_first.py").write_text("import sys\nassert 'ldmkit.images' in sys.modules, 'imported alone'\n")
    (tmp_path / "loads_ldmkit.py").write_text("import ldmkit.images\n")
    result = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, "loads_ldmkit", "needs_first"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{SRC}"})
    lines: dict[str, str] = {}
    for line in result.stdout.splitlines():
        lines.setdefault(*line.split("\t", 1))
    assert lines["loads_ldmkit"] == "ok"
    assert "imported alone" in lines["needs_first"].replace("\x1f", "\n")
