"""Nothing unsafe is ever loaded: a static scan of every shipped Python file."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for d in ("nni_2ndmatch", "export", "benchmarks", "examples") for p in (ROOT / d).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}


def _call_name(node: ast.Call) -> str:
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if isinstance(node, ast.Call):
            name = _call_name(node)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("load") and name.split(".")[0] == "torch":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"line {node.lineno}: {name} without weights_only=True")
            if "trust_remote_code" in keywords:
                value = keywords["trust_remote_code"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"line {node.lineno}: {name} with trust_remote_code")
            tokenizer = name.split(".")[-2].lower().endswith(("tokenizer", "tokenizerfast", "processor")) \
                if "." in name else False
            # (a tokenizer or processor reads its vocabulary and settings as JSON and text; there are no weights)
            if name.endswith("from_pretrained") and keywords.get("use_safetensors") is None and not tokenizer:
                problems.append(f"line {node.lineno}: {name} without use_safetensors=True")
    return problems


def test_the_scan_catches_what_it_looks_for():
    bad = ("import pickle\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
           "M.from_pretrained('x')\nM.from_pretrained('x', use_safetensors=True, trust_remote_code=True)\n")
    assert len(_problems(bad)) == 5
    good = "import torch\ntorch.load('x', weights_only=True)\nM.from_pretrained('x', use_safetensors=True)\n"
    assert _problems(good) == []


def test_no_shipped_module_loads_pickles_or_remote_code():
    assert len(SHIPPED) > 10
    found = {str(p.relative_to(ROOT)): _problems(p.read_text()) for p in SHIPPED}
    assert {k: v for k, v in found.items() if v} == {}
