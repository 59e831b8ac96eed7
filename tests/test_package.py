import subprocess
import sys

import pytest


@pytest.mark.slow
def test_core_imports_without_nni_or_gpu_only_packages_and_the_cli_starts_without_torch(tmp_path):
    """--version, --help and a data loader worker's start import no torch; a bad config file, and a
    folder that is no model given to an export script, are refused without the diffusers models
    (about 3 s of a 10 s start); the core needs no NNI or GPU-only
    package; every public name still resolves."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: {teacher: {builtin: digits-teacher}}\noutput_dir: out\nfinetune: {stpes: 3}\n")
    code = f"""
import sys, nni_2ndmatch, nni_2ndmatch.cli, nni_2ndmatch.deploy.errors
assert 'torch' not in sys.modules
from nni_2ndmatch.cli import main
assert main(['run', {str(bad)!r}]) == 2
from nni_2ndmatch.deploy import DeployError, load_model
try:
    load_model({str(tmp_path)!r})
    raise AssertionError('loaded a folder without a model')
except DeployError as e:
    assert 'no config.json' in str(e)
assert 'diffusers' not in sys.modules
import nni_2ndmatch.training
bad = [m for m in ('nni', 'tensorrt', 'torch_pruning') if m in sys.modules]
assert not bad, bad
import nni_2ndmatch.deploy as d, nni_2ndmatch.nni as n, nni_2ndmatch.pruning as p
missing = [(m.__name__, a) for m in (nni_2ndmatch, d, n, p) for a in m.__all__ if getattr(m, a, None) is None]
assert not missing, missing
assert {{'get_finetuner', 'SecondMatchDistiller', 'load_pipeline'}} <= set(nni_2ndmatch.__all__), nni_2ndmatch.__all__
assert 'export_onnx' in d.__all__ and 'PRUNERS' in n.__all__ and 'save_pruned' in p.__all__
assert 'load_pruned' in dir(nni_2ndmatch)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

#: The layers of docs/development.md, lowest first: a module imports only from its own layer or
#: those below (without a cycle), never from above.
LAYERS = [
    ("files", "utils", "errors", "scoped", "compat", "layout", "lazy"),
    ("method",),
    ("data", "models"),
    ("finetuners",),
    ("pruning",),
    ("training",),
    ("nni",),
    ("evaluation", "deploy"),
    ("config", "cli", "job"),
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


def test_each_private_internal_in_compat_exists_and_behaves_as_it_relies_on():
    """compat.py names the internals it uses; an upgrade that removes or changes one fails here."""
    import torch
    from diffusers import UNet2DModel
    from diffusers.models.upsampling import Upsample2D

    from nni_2ndmatch import compat

    assert isinstance(compat.current_sdpa_backends(), list)

    called = []
    x = torch.ones(3, requires_grad=True)
    x.register_hook(lambda grad: compat.at_end_of_backward(lambda: called.append(grad.sum().item())) or grad)
    (2 * x).sum().backward()
    assert called == [6.0]

    tensors, ends = [torch.zeros(2), torch.ones(3)], [torch.full((2,), 4.0), torch.full((3,), 3.0)]
    compat.lerp_all_(tensors, ends, 0.25)
    assert torch.equal(tensors[0], torch.full((2,), 1.0)) and torch.equal(tensors[1], torch.full((3,), 1.5))

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    assert compat.supports_gradient_checkpointing(unet)
    stored = compat.registered_config(unet)
    unet.register_to_config(sample_size=16)
    assert unet.config.sample_size == 16
    compat.restore_registered_config(unet, stored)
    assert unet.config.sample_size == 8

    class Sub(UNet2DModel):
        pass

    compat.retype(unet, Sub)
    assert type(unet) is Sub

    generator = torch.Generator().manual_seed(0)
    for layer in (Upsample2D(4, use_conv=True), Upsample2D(4, use_conv_transpose=True),
                  Upsample2D(4, use_conv=True, norm_type="rms_norm", eps=1e-6, elementwise_affine=True)):
        holder = torch.nn.Sequential(layer)
        x = torch.randn(2, 4, 5, 5, generator=generator)
        for size in (None, (11, 11)):
            want = layer(x, size)
            with compat.batch_independent(holder):
                assert "forward" in vars(layer)  # its copy of the forward is in place
                got = layer(x, size)
            assert "forward" not in vars(layer) and torch.equal(got, want)


@pytest.mark.slow  # a subprocess that imports torch
def test_the_lazy_names_come_from_the_type_checking_block_and_load_from_a_zip(tmp_path):
    """What the block imports, aliases and submodules included, is what the package exports; read
    through the package's loader, so a zipped package works (a file path would not)."""
    import zipfile

    from nni_2ndmatch.lazy import type_checking_imports

    source = "import typing\nif typing.TYPE_CHECKING:\n    from .a import x as y, z\n    from . import sub\n"
    assert type_checking_imports(source) == {"y": (".a", "x"), "z": (".a", "z"), "sub": (".sub", None)}
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (ROOT / "nni_2ndmatch").rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, path.relative_to(ROOT))
    code = (f"import sys; sys.path.insert(0, {str(archive)!r}); import nni_2ndmatch, nni_2ndmatch.pruning as p; "
            "assert '.zip' in nni_2ndmatch.__file__; print(nni_2ndmatch.TrainConfig.__name__, len(p.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split()[0] == "TrainConfig" and int(r.stdout.split()[1]) > 10, r.stderr
