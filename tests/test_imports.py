"""Imports point one way: tools -> kis_megatron -> kis_kernels, with no cycle inside.

Statically (the import statements of every file, at any depth, lazy ones included) and at
run time (every module imported on its own, in a process whose project modules are cleared
before each one, so no module works only because another was imported first)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from _corpus import ROOT

PACKAGES = ("kis_megatron", "kis_kernels")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> list[str]:
    return [module_name(p) for p in sorted((ROOT / package).rglob("*.py"))]


def imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b`` gives ``a``
    and ``a.b``: b may be a submodule), wherever the statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    known = {m for p in PACKAGES for m in modules(p)}
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            graph[name] = {m for m in imports(path) if m in known and m != name}
    return graph


def test_nothing_imports_the_trainer_and_dependencies_point_one_way():
    for name, deps in project_graph().items():
        assert "kis_megatron.train" not in deps, f"{name} imports kis_megatron.train"
        if name.startswith("kis_kernels"):
            assert not any(d.startswith("kis_megatron") for d in deps), f"{name} imports {deps}"
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            bad = {m for m in imports(path) if m.split(".")[0] in ("tools", "tests", "benchmarks")}
            assert not bad, f"{path} imports {bad}"


def test_the_project_import_graph_has_no_cycle():
    graph = project_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if dep.startswith(name + "."):  # a package's __init__ importing its own submodule
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


_CHILD = """
import importlib, json, sys, traceback
results = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("kis_megatron", "kis_kernels")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = "kis_megatron.train" in sys.modules and name != "kis_megatron.train"
    except Exception:
        results[name] = traceback.format_exc()
print(json.dumps(results))
"""


def test_every_module_imports_on_its_own():
    """Each module in a process whose project modules were all removed from sys.modules
    just before (third-party modules such as torch stay loaded: they are not what is tested);
    and none but the trainer itself loads kis_megatron.train."""
    names = [m for p in PACKAGES for m in modules(p)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(names)
    failed = {n: r for n, r in results.items() if isinstance(r, str)}
    assert not failed, "\n".join(f"{n}:\n{r}" for n, r in failed.items())
    assert not [n for n, r in results.items() if r is True], "these load kis_megatron.train"


def test_the_model_knows_nothing_of_parallelism():
    for name, deps in project_graph().items():
        if name.startswith("kis_megatron.model"):
            bad = {d for d in deps if d.startswith("kis_megatron.parallel")}
            assert not bad, f"{name} imports {bad}"


def test_the_sweep_imports_no_torch():
    code = ("import sys, kis_megatron.sweep, kis_megatron.sweep.refine, kis_megatron.sweep.validate; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_each_run_and_law_file_has_one_owner():
    """The file names as literals appear only in the module that opens them: run.json and
    config.yaml in run_dir.py, law.json in law/lawfile.py."""
    import re

    owners = {"run.json": "kis_megatron/run_dir.py", "config.yaml": "kis_megatron/run_dir.py",
              "law.json": "kis_megatron/law/lawfile.py"}
    found = []
    for top in ("kis_megatron", "tools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            for name, owner in owners.items():
                if rel != owner and re.search(r"[\"']" + re.escape(name) + r"[\"']", text):
                    found.append(f"{rel}: {name}")
    assert not found, found
