"""Deployment: ONNX export and parity, the input contract, the benchmark, TensorRT (GPU only), and
the export/ scripts run as a user would, in a subprocess. onnx is imported in the tests that use it:
every pytest worker collects this module, and the quick loop runs none of it."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import BUILDERS

from nni_2ndmatch import prune_diffusers, save_pruned
from nni_2ndmatch.deploy import (
    DeployError,
    ExportError,
    MissingBackendError,
    export_onnx,
    input_specs,
    load_model,
)
from nni_2ndmatch.deploy.artefact import sidecar_path
from nni_2ndmatch.deploy.bench import (
    BenchResults,
    BenchRow,
    BenchSetup,
    LatencyStats,
    Setup,
    run_benchmark,
    write_reports,
)
from nni_2ndmatch.deploy.model_io import random_inputs
from nni_2ndmatch.deploy.onnx_export import ort_session
from nni_2ndmatch.deploy.tensorrt import check_compatible, parse_batches, require_tensorrt
from nni_2ndmatch.models import save_diffusers_model
from nni_2ndmatch.pruning import default_example_inputs

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # subprocesses and launchers


def script(name, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "export" / name), *map(str, args)], capture_output=True,
                          check=False, text=True, timeout=300, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})


def _prune(teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    return student.eval()


@pytest.fixture(scope="module")
def families():
    """kind -> (teacher, pruned student) for each tiny family."""
    out = {}
    for kind, build in BUILDERS.items():
        torch.manual_seed(0)
        teacher = build().eval()
        out[kind] = (teacher, _prune(teacher))
    return out


class _Exports(dict):
    """kind -> (student, ONNX path, report): a pruned student exported (default exporter) the first
    time a test of this process asks for it; the pytest workers share the tests of a kind out."""

    def __init__(self, families, folder):
        super().__init__()
        self.families, self.folder = families, folder

    def __missing__(self, kind):
        student, path = self.families[kind][1], self.folder / f"{kind}.onnx"
        self[kind] = (student, path, export_onnx(student, path, seq_len=5, simplify=False))  # onnxslim: own test
        return self[kind]


@pytest.fixture(scope="module")
def exported(families, tmp_path_factory):
    return _Exports(families, tmp_path_factory.mktemp("onnx"))


def _fresh_inputs(model, batch, seed):
    """Inputs made here, independently of the package: (x, t, kwargs, feeds)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    kw = {}
    if type(model).__name__ == "UNet2DConditionModel":
        kw["encoder_hidden_states"] = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    if type(model).__name__ == "DiTTransformer2DModel":
        kw["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)
        kw["class_labels"][-1] = cfg.num_embeds_ada_norm  # the null class that guidance feeds
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), **{k: v.numpy() for k, v in kw.items()}}
    return x, t, kw, feeds


def _torch_out(model, x, t, kw):
    first = "hidden_states" if type(model).__name__ == "DiTTransformer2DModel" else "sample"
    with torch.no_grad():
        return model(**{first: x}, timestep=t, **kw).sample.numpy()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_pruned_student_round_trips_through_onnx_and_matches_pytorch(kind, exported):
    import onnx
    student, path, report = exported[kind]
    onnx.checker.check_model(str(path))
    session = ort_session(path)
    for batch in (1, 3):
        x, t, kw, feeds = _fresh_inputs(student, batch, seed=100 + batch)
        got = session.run(["out"], feeds)[0]
        want = _torch_out(student, x, t, kw)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    saved = json.loads(sidecar_path(path).read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["parity"]["batches"]) == {"1", "3"} and saved["parity"]["passed"]
    assert 0 < saved["parity"]["max_rel_error"] <= 1e-4 and saved["precision"] == "fp32" and saved["opset"] == 20


def test_a_dits_checks_feed_its_null_class():
    dit = BUILDERS["dit"]().eval()
    (labels,) = [s for s in input_specs(dit) if s.name == "class_labels"]
    assert labels.high == dit.config.num_embeds_ada_norm + 1  # the table's extra row, for guidance
    for batch in (2, 3):
        assert random_inputs(input_specs(dit), batch, seed=batch)[-1][-1] == dit.config.num_embeds_ada_norm
    labels = {int(random_inputs(input_specs(dit), 1, seed=seed)[-1]) for seed in range(20)}
    assert labels - {dit.config.num_embeds_ada_norm}  # batch 1: a random label, not always the null one


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_timestep_is_a_float32_batch_input_that_changes_the_output(kind, exported):
    import onnx
    student, path, _ = exported[kind]
    graph = onnx.load(str(path)).graph
    inputs = {i.name: i for i in graph.input}
    assert list(inputs) == [s.name for s in input_specs(student, 5)]
    timestep = inputs["timestep"].type.tensor_type
    assert timestep.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in timestep.shape.dim] == ["batch"]
    assert inputs["sample"].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort_session(path)
    _, _, _, feeds = _fresh_inputs(student, 3, seed=7)
    early = session.run(["out"], {**feeds, "timestep": np.full(3, 10, np.float32)})[0]
    late = session.run(["out"], {**feeds, "timestep": np.full(3, 900, np.float32)})[0]
    assert np.abs(early - late).max() > 1e-4  # a timestep baked in as a constant would not matter


def test_fp16_export_keeps_float32_io_and_runs_in_onnxruntime(families, tmp_path):
    import onnx
    _, student = families["dit"]
    path = tmp_path / "fp16.onnx"
    report = export_onnx(student, path, fp16=True)
    model = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types == {"sample": onnx.TensorProto.FLOAT, "timestep": onnx.TensorProto.FLOAT,
                        "class_labels": onnx.TensorProto.INT64, "out": onnx.TensorProto.FLOAT}
    x, t, kw, feeds = _fresh_inputs(student, 3, seed=5)
    got, want = ort_session(path).run(["out"], feeds)[0], _torch_out(student, x, t, kw)
    assert got.dtype == np.float32
    error = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < error < 1e-2  # fp16 rounding: not exact, but close
    assert report["precision"] == "fp16" and 0 < report["parity"]["max_rel_error"] <= 1e-2


def _scaled_output(model):
    """The graph with its output multiplied by 1.001: a "simplification" that changes the outputs."""
    import onnx
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        node.output[:] = ["out_before" if o == "out" else o for o in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.001, np.float32), "scale"))
    model.graph.node.append(onnx.helper.make_node("Mul", ["out_before", "scale"], ["out"]))
    return model


def test_graph_is_kept_as_exported_unless_simplifying_leaves_outputs_identical(families, tmp_path, monkeypatch):
    import onnx
    fake = type(sys)("onnxslim")
    fake.slim = _scaled_output
    monkeypatch.setitem(sys.modules, "onnxslim", fake)
    _, student = families["dit"]
    report = export_onnx(student, tmp_path / "s.onnx", exporter="torchscript")
    assert not report["simplified"] and report["parity"]["passed"]
    assert "changed the outputs" in report["simplify_note"]
    assert "out_before" not in {o for n in onnx.load(str(tmp_path / "s.onnx")).graph.node for o in n.output}
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # a required package missing: an error, nothing written
    with pytest.raises(ExportError, match="onnxslim, a dependency of nni-2ndmatch, is not installed"):
        export_onnx(student, tmp_path / "t.onnx", exporter="torchscript")
    assert not (tmp_path / "t.onnx").exists()


def test_external_data_export_loads_and_matches(families, tmp_path, monkeypatch):
    from nni_2ndmatch.deploy import onnx_export

    _, student = families["dit"]
    path = tmp_path / "big.onnx"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were over 2 GB
    report = export_onnx(student, path, exporter="torchscript")  # (the legacy exporter, faster; saving is the same)
    assert report["external_data"] == "big.onnx.data" and (tmp_path / "big.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.json"]
    x, t, kw, feeds = _fresh_inputs(student, 2, seed=3)
    got = ort_session(path).run(["out"], feeds)[0]
    np.testing.assert_allclose(got, _torch_out(student, x, t, kw), rtol=1e-4, atol=1e-5)


def test_bad_export_options_name_the_field(families, tmp_path):
    _, student = families["dit"]
    with pytest.raises(DeployError, match="opset=9"):
        export_onnx(student, tmp_path / "a.onnx", opset=9)
    with pytest.raises(DeployError, match="exporter='jit'.*dynamo, torchscript"):
        export_onnx(student, tmp_path / "a.onnx", exporter="jit")
    with pytest.raises(DeployError, match="opset=17 is not allowed with the dynamo exporter.*14 to 17 with the "
                                          "torchscript exporter"):
        export_onnx(student, tmp_path / "a.onnx", opset=17)


def test_the_pipeline_export_refuses_what_it_would_not_apply(tmp_path, capsys):
    """Options of --model only, and an opset the exporter cannot write, are refused with exit 2
    before the pipeline is loaded; nothing is written."""
    (tmp_path / "pipe").mkdir()
    for args, expected in ((("--exporter", "torchscript", "--no-simplify"), "--exporter, --no-simplify: an option of "
                            "--model only"), (("--seq-len", "8"), "--seq-len: an option of --model only"),
                           (("--opset", "17"), "opset=17 is not allowed with the dynamo exporter")):
        assert _script_here("to_onnx.py", "--pipeline", tmp_path / "pipe", "--out", tmp_path / "onnx", *args) == 2
        err = capsys.readouterr().err
        assert expected in err and "torchscript exporter" not in err  # it offers no option --pipeline refuses
    assert not (tmp_path / "onnx").exists()
    run = tmp_path / "run"  # e.g. the run folder given as --out by a slip: it used to be replaced whole
    (run / "student").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    assert _script_here("to_onnx.py", "--pipeline", tmp_path / "pipe", "--out", run) == 2
    assert f"{str(run)!r} holds other files (student, summary.json) and no export.json" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["student", "summary.json"]


# the keys nni_2ndmatch.deploy.bench documents (its TypedDicts; the environment's in environment())
TOP_KEYS, SETUP_KEYS = set(BenchResults.__annotations__), set(BenchSetup.__annotations__)
ROW_KEYS, STAT_KEYS = set(BenchRow.__annotations__), set(LatencyStats.__annotations__)
MODEL_KEYS = {"class", "macs", "params"}
ENV_KEYS = {"python", "platform", "cpu", "cpu_count", "device", "gpu", "threads", "torch", "onnx", "onnxruntime",
            "tensorrt", "onnxruntime_providers", "load_average_before", "load_average_after"}


def test_benchmark_writes_every_documented_key(families, tmp_path):
    teacher, student = families["dit"]
    results = run_benchmark(teacher, student, backends=["torch", "onnxruntime", "tensorrt"], batches=[1, 2],
                            device="cpu", repeats=3, warmup=1, exporter="torchscript")  # the faster exporter
    assert TOP_KEYS <= set(results) and SETUP_KEYS <= set(results["setup"])
    assert ENV_KEYS <= set(results["environment"]) and results["environment"]["threads"] == 1
    for role in ("teacher", "student"):
        assert MODEL_KEYS <= set(results["models"][role])
    assert results["models"]["student"]["macs"] < results["models"]["teacher"]["macs"]
    assert results["macs_ratio"] == pytest.approx(results["models"]["student"]["macs"] /
                                                  results["models"]["teacher"]["macs"])
    assert {(r["variant"], r["batch"]) for r in results["results"]} == \
        {(v, b) for v in ("torch-cpu-fp32", "onnxruntime-cpu") for b in (1, 2)}
    for row in results["results"]:
        assert ROW_KEYS <= set(row)
        for role in ("teacher", "student"):
            stats = row[role]
            assert STAT_KEYS <= set(stats) and stats["runs"] == 3
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
            assert stats["samples_per_s"] == pytest.approx(row["batch"] / stats["median_ms"] * 1e3)
        assert row["latency_ratio"] == pytest.approx(row["student"]["median_ms"] / row["teacher"]["median_ms"])
        assert row["speedup_vs_macs"] == pytest.approx(row["speedup"] * row["macs_ratio"])
    ort_row = next(r for r in results["results"] if r["variant"] == "onnxruntime-cpu")
    assert ort_row["providers"] == ["CPUExecutionProvider"]
    try:
        require_tensorrt()
    except MissingBackendError:
        assert [s["variant"] for s in results["skipped"]] == ["tensorrt-fp16"]

    paths = write_reports(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    table = (tmp_path / "r.md").read_text()
    assert "| onnxruntime-cpu | 2 |" in table and "| torch-cpu-fp32 | 1 |" in table
    assert paths == [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_refuses_bad_options(families):
    teacher, student = families["unet2d"]
    with pytest.raises(DeployError, match="backends='tvm'"):
        run_benchmark(teacher, student, backends=["tvm"])
    with pytest.raises(DeployError, match="threads=0"):
        run_benchmark(teacher, student, threads=0)
    with pytest.raises(DeployError, match="warmup=0 is not allowed; it must be an integer >= 1"):  # compile in timing
        run_benchmark(teacher, student, warmup=0)
    with pytest.raises(DeployError, match="different inputs"):
        run_benchmark(teacher, families["dit"][1], repeats=1)
    with pytest.raises(DeployError, match="give a Setup or its fields, not both"):
        run_benchmark(teacher, student, Setup(), repeats=1)


# --- TensorRT ------------------------------------------------------------------------------------

def test_to_trt_exits_3_with_its_message_when_tensorrt_cannot_be_imported(tmp_path):
    blocked = tmp_path / "blocked" / "tensorrt"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    (tmp_path / "m").mkdir()
    start = time.monotonic()
    r = script("to_trt.py", "--model", tmp_path / "m", "--out", tmp_path / "s.plan",
               env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 3, r.stderr
    assert "TensorRT is not available" in r.stderr and "install TensorRT 10" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s.plan").exists()
    assert time.monotonic() - start < 60  # no model is loaded before the check


def test_to_trt_refuses_a_corrupted_onnx_file_before_looking_for_tensorrt(tmp_path):
    bad = tmp_path / "student.onnx"
    bad.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    r = script("to_trt.py", "--onnx", bad, "--out", tmp_path / "s.plan")
    assert r.returncode == 2 and "is not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.plan").exists()
    r = script("to_trt.py", "--onnx", bad, "--out", tmp_path / "s.onnx")  # the engine over an ONNX file: refused
    assert r.returncode == 2 and "ends in .onnx; give the engine file" in r.stderr, r.stderr
    for flags, message in ((["--workspace-gib", "0"], "--workspace-gib=0.0 is not allowed: it must be > 0"),
                           (["--seq-len", "77"], "--seq-len applies with --model only")):
        r = script("to_trt.py", "--onnx", bad, "--out", tmp_path / "s.plan", *flags)  # (it used to ignore them)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(("version", "message"), [("8.6.1", "too old"), ("10.9.0", "no CUDA GPU")])
def test_old_tensorrt_or_no_gpu_is_a_missing_backend(version, message, monkeypatch):
    if message == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    fake = type(sys)("tensorrt")
    fake.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(MissingBackendError, match=message):
        require_tensorrt()


def test_batch_profile_and_engine_compatibility_rules():
    assert parse_batches("1,16,64") == (1, 16, 64)
    assert parse_batches("16,1") == (1, 16, 16) and parse_batches("8") == (8, 8, 8)
    for bad in ("0,4", "a,b", "1,2,3,4", ""):
        with pytest.raises(DeployError, match="batch="):
            parse_batches(bad)
    built = {"tensorrt_version": "10.9.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_compatible(built, "10.9.0", "NVIDIA H100", "9.0")
    with pytest.raises(DeployError, match="TensorRT 10.9.0 on NVIDIA H100.*TensorRT 10.13.0.*rebuild"):
        check_compatible(built, "10.13.0", "NVIDIA H100", "9.0")
    with pytest.raises(DeployError, match="NVIDIA L4"):
        check_compatible(built, "10.9.0", "NVIDIA L4", "8.9")


def test_a_fixed_batch_onnx_is_refused_a_batch_range_by_name(families, monkeypatch, tmp_path):
    from helpers import fake_tensorrt

    from nni_2ndmatch.deploy.tensorrt import build_engine

    _, student = families["unet2d"]
    fixed = tmp_path / "fixed.onnx"
    export_onnx(student, fixed, batch_dynamic=False, exporter="torchscript")
    fake_tensorrt.install(monkeypatch)
    with pytest.raises(DeployError, match=r"input sample of fixed.onnx has a fixed batch of 1 .*batch=1,16,64 cannot "
                                          r"be built: give --batch 1, or export the ONNX with a dynamic batch"):
        build_engine(fixed, tmp_path / "s.plan", precision="fp32", batches=(1, 16, 64))
    assert not (tmp_path / "s.plan").exists() and fake_tensorrt._Builder.built == []
    meta = build_engine(fixed, tmp_path / "s.plan", precision="fp32", batches=(1, 1, 1))
    assert meta["inputs"]["sample"] == {"dtype": "float", "min": [1, 1, 8, 8], "opt": [1, 1, 8, 8],
                                        "max": [1, 1, 8, 8]}


def test_the_benchmark_builds_one_engine_per_batch_and_skips_a_graph_tensorrt_cannot_parse(
        families, monkeypatch, tmp_path):
    from helpers import fake_tensorrt

    from nni_2ndmatch.deploy.bench import variants

    teacher, student = families["unet2d"]
    onnx_files = {}
    for role, model in (("teacher", teacher), ("student", student)):
        onnx_files[role] = tmp_path / f"{role}.onnx"
        export_onnx(model, onnx_files[role], exporter="torchscript")
    trt = fake_tensorrt.install(monkeypatch)
    trt.OnnxParser.fail_with = "Unsupported operator Foo"
    results = run_benchmark(teacher, student, backends=["torch", "tensorrt"], batches=[1], device="cpu", repeats=1,
                            warmup=1, trt_precision="fp32", onnx_files=onnx_files)
    assert [r["variant"] for r in results["results"]] == ["torch-cpu-fp32"]  # it used to abort the whole run
    assert results["skipped"] == [{"variant": "tensorrt-fp32",
                                   "reason": "TensorRT 10.9.0 cannot parse teacher.onnx: Unsupported operator Foo"}]

    trt.OnnxParser.fail_with = None  # each batch its own engine: TensorRT tunes its kernels for the opt shape
    monkeypatch.setattr(variants, "load_engine", lambda plan: plan)
    monkeypatch.setattr(variants, "random_inputs", lambda specs, batch, seed, device: [])
    prepare = variants._tensorrt("fp32", tmp_path, None)
    subject = variants.Subject("student", student, input_specs(student), files={"onnx": onnx_files["student"]})
    for batch in (1, 4):
        prepare(subject, batch)
    assert [built[0]["sample"] for built in trt.Builder.built] == [([b, 1, 8, 8],) * 3 for b in (1, 4)]


@pytest.fixture
def trt_gpu():
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_pytorch_and_refuses_another_gpu(precision, trt_gpu, families, tmp_path):
    from nni_2ndmatch.deploy.tensorrt import build_engine, load_engine, needs_fp16_onnx

    _, student = families["unet2d"]
    onnx_path = tmp_path / "s.onnx"
    export_onnx(student, onnx_path, fp16=needs_fp16_onnx(precision))
    plan, cache = tmp_path / "s.plan", tmp_path / "timing.cache"
    meta = build_engine(onnx_path, plan, precision=precision, batches=(1, 2, 4), timing_cache=cache)
    assert cache.stat().st_size > 0 and meta["precision"] == precision
    assert meta["inputs"]["sample"]["max"] == [4, 1, 8, 8] and meta["gpu"] == torch.cuda.get_device_name()
    runner = load_engine(plan)
    x, t, kw, _ = _fresh_inputs(student, 3, seed=11)
    got = runner([x.cuda(), t.cuda()]).float().cpu().numpy()
    want = _torch_out(student, x, t, kw)
    assert np.abs(got - want).max() / np.abs(want).max() < (1e-3 if precision == "fp32" else 2e-2)
    assert build_engine(onnx_path, plan, precision=precision, batches=(1, 2, 4),
                        timing_cache=cache)["timing_cache_reused"]
    meta_file = sidecar_path(plan)
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "gpu": "Some Other GPU"}))
    with pytest.raises(DeployError, match="Some Other GPU.*rebuild"):
        load_engine(plan)
    export_onnx(student, onnx_path, fp16=needs_fp16_onnx(precision), batch_dynamic=False)
    with pytest.raises(DeployError, match="has a fixed batch of 1"):  # before TensorRT's own, less clear, error
        build_engine(onnx_path, plan, precision=precision, batches=(1, 2, 4))


# --- AOTInductor packages ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def aoti_dit(families, tmp_path_factory):
    """The pruned DiT compiled once by the script, as a user runs it: (folder, completed process)."""
    folder = tmp_path_factory.mktemp("aoti")
    save_pruned(families["dit"][1], folder / "student")
    return folder, script("to_aoti.py", "--model", folder / "student", "--out", folder / "s.pt2", "--batch", "1,70")


def test_aoti_package_runs_without_the_model_code_at_any_batch_in_its_range(families, aoti_dit):
    folder, r = aoti_dit
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["s.pt2", "s.pt2.json", "student"]
    student = families["dit"][1]
    package = torch._inductor.aoti_load_package(str(folder / "s.pt2"))
    for batch in (1, 5, 66):  # none of them the batches checked at export
        x, t, kw, _ = _fresh_inputs(student, batch, seed=200 + batch)
        with torch.inference_mode():
            got = package(x, t, kw["class_labels"]).numpy()
        want = _torch_out(student, x, t, kw)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    report = json.loads((folder / "s.pt2.json").read_text())
    assert report["batch_range"] == [1, 70] and report["device"] == "cpu" and report["precision"] == "fp32"
    assert set(report["parity"]["batches"]) == {"1", "70"} and report["parity"]["passed"]
    assert [i["name"] for i in report["inputs"]] == ["sample", "timestep", "class_labels"]
    assert report["outputs"][0]["shape"] == ["batch", 4, 4, 4] and report["versions"]["torch"] == torch.__version__
    assert "aoti_load_package('s.pt2')(sample, timestep, class_labels)" in r.stdout


def test_diffusers_upsampling_does_not_split_the_traced_batch_axis_at_64(families):
    from nni_2ndmatch.deploy.aoti import batch_independent
    from nni_2ndmatch.deploy.model_io import wrap

    student = families["unet2d"][1]  # its Upsample2D branches on batch >= 64
    specs = input_specs(student)
    wrapper = wrap(student, specs)
    batch = torch.export.Dim("batch", min=1, max=128)
    args, shapes = tuple(random_inputs(specs, 2)), tuple({0: batch} for _ in specs)
    with pytest.raises(Exception, match="batch"):  # noqa: B017 - torch.export's own error type
        torch.export.export(wrapper, args, dynamic_shapes=shapes)
    with batch_independent(student), torch.no_grad():
        program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
        replaced = {n: wrapper(*random_inputs(specs, n, seed=3)) for n in (63, 70)}
    assert [(r.lower, r.upper) for r in program.range_constraints.values()] == [(1, 128)]
    with torch.no_grad():
        for n, out in replaced.items():
            inputs = random_inputs(specs, n, seed=3)
            assert torch.equal(program.module()(*inputs), out)
            own = wrapper(*inputs)  # diffusers' own forward: from 64 on, its conv runs on a contiguous copy
            if n < 64:
                assert torch.equal(own, out)
            else:  # which moves the values by float rounding at most (the export's parity check allows it)
                torch.testing.assert_close(own, out, rtol=1e-5, atol=1e-6)


def test_aoti_package_above_tolerance_is_not_written(families, tmp_path, monkeypatch):
    from nni_2ndmatch.deploy import ParityError, aoti, export_aoti

    # no compile (a real package's parity: the test above): the package is a stand-in whose check fails
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, **kw: Path(package_path).write_bytes(b"stand-in"))
    monkeypatch.setattr(aoti, "_parity", lambda *args: {"passed": False, "max_rel_error": 2e-3, "tolerance": 1e-4,
                                                        "max_abs_error": 0.01})
    with pytest.raises(ParityError, match="does not match PyTorch: max relative error 0.002 > tolerance 0.0001.*"
                                          "nothing was written"):
        export_aoti(families["dit"][1], tmp_path / "s.pt2", batches=[2])
    assert list(tmp_path.iterdir()) == []


def test_aoti_bad_options_are_clear_errors_and_exit_2(families, tmp_path):
    from nni_2ndmatch.deploy import export_aoti

    student = families["dit"][1]
    with pytest.raises(DeployError, match="fp16=True is not allowed with device='cpu'"):
        export_aoti(student, tmp_path / "s.pt2", fp16=True)
    with pytest.raises(DeployError, match="device='tpu' is unknown; allowed: cpu, cuda"):
        export_aoti(student, tmp_path / "s.pt2", device="tpu")
    with pytest.raises(DeployError, match=r"batches=\[0\] is not allowed"):
        export_aoti(student, tmp_path / "s.pt2", batches=[0])
    if not torch.cuda.is_available():
        with pytest.raises(MissingBackendError, match="no CUDA GPU is visible"):
            export_aoti(student, tmp_path / "s.pt2", device="cuda")
    save_pruned(student, tmp_path / "student")
    r = script("to_aoti.py", "--model", tmp_path / "student", "--out", tmp_path / "s.pt2", "--fp16")
    assert r.returncode == 2 and "fp16=True is not allowed" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


# --- the scripts, as a user runs them ------------------------------------------------------------

def test_to_onnx_missing_model_folder_is_a_clear_error(tmp_path):
    r = script("to_onnx.py", "--model", tmp_path / "nope", "--out", tmp_path / "s.onnx")
    assert r.returncode == 2
    assert "error: model folder" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_to_onnx_script_fails_above_tolerance_and_writes_nothing(families, tmp_path):
    save_pruned(families["dit"][1], tmp_path / "student")
    r = script("to_onnx.py", "--model", tmp_path / "student", "--out", tmp_path / "s.onnx", "--tolerance", "1e-12",
               "--exporter", "torchscript")  # the faster exporter: the failure path is the same
    assert r.returncode == 1 and "does not match PyTorch" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_folders_are_detected_and_the_legacy_exporter_works_too(families, tmp_path):
    teacher, student = families["dit"]
    save_pruned(student, tmp_path / "student")
    save_diffusers_model(teacher, tmp_path / "teacher")
    loaded, info = load_model(tmp_path / "student")
    assert info["kind"] == "pruned" and sum(p.numel() for p in loaded.parameters()) == \
        sum(p.numel() for p in student.parameters())
    loaded, info = load_model(tmp_path / "teacher")
    assert info == {"source": str(tmp_path / "teacher"), "kind": "diffusers", "class": "DiTTransformer2DModel"}
    report = export_onnx(loaded, tmp_path / "t.onnx", exporter="torchscript", source=info)
    assert report["exporter"] == "torchscript" and report["parity"]["passed"] and report["model"]["kind"] == "diffusers"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "Pickle"}')
    with pytest.raises(DeployError, match="_class_name='Pickle' is not supported"):
        load_model(tmp_path / "bad")


def test_bench_script_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    r = script("bench.py", "--teacher", empty, "--student", empty, "--out", tmp_path / "r.json")
    assert r.returncode == 2 and "has no config.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_bench_script_refuses_options_it_would_not_apply_and_bad_settings_before_loading(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"  # not a model: a refusal that names it came after the settings' checks
    for flags, message in ((["--repeats", "0"], "repeats=0 is not allowed"),
                           (["--trt-precision", "fp32"], "--trt-precision fp32 applies to the tensorrt backend(s) "
                                                         "only, which --backends torch,onnxruntime leaves out"),
                           (["--backends", "torch", "--exporter", "torchscript"], "--exporter torchscript applies to "
                                                                                  "the onnxruntime and tensorrt")):
        assert _script_here("bench.py", "--teacher", empty, "--student", empty, "--out", tmp_path / "r.json",
                            *flags) == 2
        err = capsys.readouterr().err
        assert message in err and "config.json" not in err, err
    save_diffusers_model(BUILDERS["unet2d"]().eval(), tmp_path / "unet")
    assert _script_here("bench.py", "--teacher", tmp_path / "unet", "--student", tmp_path / "unet", "--seq-len", "77",
                        "--out", tmp_path / "r.json") == 2
    assert "takes no encoder_hidden_states (text)" in capsys.readouterr().err  # (it used to ignore it)
    assert not (tmp_path / "r.json").exists()


def _script_here(name, *args):
    """export/NAME ARGS in this process (so that a test may patch the package): its exit code."""
    import runpy

    from nni_2ndmatch.deploy.script import run_main

    module = runpy.run_path(str(ROOT / "export" / name))
    arguments = module["parse_args"]([str(a) for a in args])
    return run_main(lambda: module["main"](arguments))


def test_a_pruned_text_to_image_pipeline_runs_in_diffusers_onnx_pipeline_as_in_torch(tmp_path, monkeypatch):
    """export/to_onnx.py --pipeline on a pruned pipeline; its U-Net as over ONNX's 2 GB limit (any
    fp32 SD U-Net): saved as model.onnx + model.onnx.data, both in the pipeline's unet/, which then
    runs from wherever the folder is moved."""
    import numpy as np
    from diffusers import DiffusionPipeline, OnnxStableDiffusionPipeline

    from nni_2ndmatch import load_pipeline, prune_diffusers
    from nni_2ndmatch.deploy import onnx_export
    from nni_2ndmatch.models import write_tiny_sd
    from nni_2ndmatch.pruning.component import save_pipeline

    teacher = write_tiny_sd(tmp_path / "teacher")
    unet = DiffusionPipeline.from_pretrained(teacher, use_safetensors=True).unet
    student, _ = prune_diffusers(unet, "magnitude", 0.3, round_to=None)
    save_pipeline(student, teacher, tmp_path / "pipeline")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # the tiny U-Net's weights go to the data file
    assert _script_here("to_onnx.py", "--pipeline", tmp_path / "pipeline", "--out", tmp_path / "onnx") == 0
    assert {p.name for p in (tmp_path / "onnx").iterdir()} >= {"text_encoder", "unet", "vae_encoder", "vae_decoder",
                                                                 "tokenizer", "scheduler", "model_index.json"}
    assert sorted(p.name for p in (tmp_path / "onnx" / "unet").iterdir()) == ["model.onnx", "model.onnx.data"]
    tokenizer = sorted(p.name for p in (tmp_path / "pipeline" / "tokenizer").iterdir())
    assert "vocab.json" in tokenizer and "merges.txt" in tokenizer  # what transformers 4's CLIPTokenizer reads
    assert sorted(p.name for p in (tmp_path / "onnx" / "tokenizer").iterdir()) == tokenizer
    report = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert all(part["parity"]["passed"] and part["parity"]["max_rel_error"] < 1e-4 for part in report["parts"].values())
    (tmp_path / "onnx").rename(tmp_path / "moved")
    torch_pipe = load_pipeline(tmp_path / "pipeline")
    onnx_pipe = OnnxStableDiffusionPipeline.from_pretrained(tmp_path / "moved")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten digit 3", "a handwritten digit 7"]
    want = torch_pipe(prompts, num_inference_steps=3, guidance_scale=1.0, latents=latents, output_type="np",
                      height=16, width=16).images
    # the ONNX pipeline reads the latent size as height / 8 (SD's VAE); the tiny VAE upsamples 2x
    got = onnx_pipe(prompts, num_inference_steps=3, guidance_scale=1.0, latents=latents.numpy(), output_type="np",
                    height=64, width=64).images
    assert got.shape == want.shape == (2, 16, 16, 3) and np.abs(got - want).max() < 1e-4
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the prompts and latents matter: the comparison can fail


def test_a_pruned_sdxl_unet_exports_with_its_added_conditions(tmp_path):
    """SDXL's U-Net takes the pooled text embedding and the six size/crop ids beside the text: they
    become inputs text_embeds and time_ids, and the graph matches PyTorch at fresh inputs."""
    import numpy as np
    from diffusers import UNet2DConditionModel

    from nni_2ndmatch.models import write_tiny_sdxl

    write_tiny_sdxl(tmp_path / "sdxl")
    student = _prune(UNet2DConditionModel.from_pretrained(tmp_path / "sdxl" / "unet"))
    report = export_onnx(student, tmp_path / "u.onnx")
    assert report["parity"]["passed"]
    assert [i["name"] for i in report["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                     "time_ids"]
    g, cfg = torch.Generator().manual_seed(5), student.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x, t = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g), torch.tensor([5., 500, 990])
    text, embeds = torch.randn(3, 77, cfg.cross_attention_dim, generator=g), torch.randn(3, pooled, generator=g)
    ids = torch.tensor([[16., 16, 0, 0, 16, 16]] * 3)
    with torch.no_grad():
        want = student(x, t, encoder_hidden_states=text,
                       added_cond_kwargs={"text_embeds": embeds, "time_ids": ids}).sample.numpy()
    got = ort_session(tmp_path / "u.onnx").run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                         "encoder_hidden_states": text.numpy(),
                                                         "text_embeds": embeds.numpy(), "time_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_text_length_defaults_to_what_the_models_pipeline_feeds():
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    text = {m: next(s for s in input_specs(m) if s.name == "encoder_hidden_states")
            for m in (sd3, BUILDERS["unet2d_condition"]())}
    assert [s.shape[0] for s in text.values()] == [77 + 256, 77]  # SD3: CLIP's 77 tokens then T5's 256; SD: CLIP's
    assert next(s for s in input_specs(sd3, 12) if s.name == "encoder_hidden_states").shape[0] == 12
