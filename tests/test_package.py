import subprocess
import sys

import pytest


@pytest.mark.slow
def test_core_imports_without_nni_or_gpu_only_packages():
    code = ("import sys, nni_2ndmatch, nni_2ndmatch.training, nni_2ndmatch.cli; "
            "bad = [m for m in ('nni', 'tensorrt', 'torch_pruning') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

#: The layers of docs/development.md, lowest first: a module imports only from its own layer or
#: those below (without a cycle), never from above.
LAYERS = [
    ("files", "utils", "errors", "scoped", "compat", "layout"),
    ("method",),
    ("data", "models"),
    ("finetuners",),
    ("pruning",),
    ("training",),
    ("nni",),
    ("evaluation", "deploy"),
    ("config", "pipeline", "report", "cli", "job"),
]


def _imports():
    """module -> the package modules it imports (at module level or inside functions), by ast."""
    import ast

    package = ROOT / "nni_2ndmatch"
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[:len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                targets |= {name} if node.module else {f"{name}.{a.name}" for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                targets |= {n for n in names if n and n.startswith("nni_2ndmatch.")}
        found[module] = {t for t in targets if t != module}
    return found


def _layer(module):
    top = module.split(".")[1] if module.count(".") else ""
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_every_module_imports_only_from_its_layer_or_below_and_there_is_no_cycle():
    imports = _imports()
    modules = [m for m in imports if m != "nni_2ndmatch"]
    assert all(_layer(m) is not None for m in modules), [m for m in modules if _layer(m) is None]
    upward = [(m, t) for m in modules for t in imports[m] if _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []
    # a cycle between modules (a package counts as its __init__ only)
    graph = {m: {t for t in imports[m] if t in imports} for m in modules}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in modules:
        if m not in state:
            visit(m, [m])
