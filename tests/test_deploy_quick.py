"""The deployment path's logic that needs no compiler run: what happens when the AOTInductor
runtime crashes, and which benchmark variants exist where (the quick loop; test_export.py runs
the exporters themselves)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_dit

ROOT = Path(__file__).resolve().parent.parent

CRASHING_CHILD = """
import sys
from nni_2ndmatch.deploy import aoti
aoti.CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
aoti._export = lambda *args, **kwargs: None  # no compile: a stand-in package
aoti._compile = lambda program, path, metadata: path.write_bytes(b"a package")
sys.path.insert(0, sys.argv.pop(1))
import to_aoti
from nni_2ndmatch.deploy.script import run_main
sys.exit(run_main(lambda: to_aoti.main(to_aoti.parse_args(sys.argv[1:]))))
"""


@pytest.mark.slow  # a subprocess that starts another
def test_a_crash_of_the_aoti_runtime_is_one_line_and_exit_1_and_nothing_is_written(tmp_path):
    tiny_dit(seed=1).save_pretrained(tmp_path / "student")
    r = subprocess.run([sys.executable, "-c", CRASHING_CHILD, str(ROOT / "export"), "--model",
                        str(tmp_path / "student"), "--out", str(tmp_path / "out" / "s.pt2"), "--batch", "1,2"],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert re.fullmatch(r"error: the AOTInductor runtime crashed \(SIGSEGV\) loading or running the package "
                        rf"\(torch {re.escape(torch.__version__)}, device cpu\); nothing was written", lines[-1])
    assert "Traceback" not in r.stderr and list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_the_child_runs_the_package_on_every_batch_and_a_failure_names_its_error(tmp_path, monkeypatch):
    from nni_2ndmatch.deploy import ExportError, aoti

    runner = tmp_path / "runner.py"  # stands in for the package: output = 2 x the first input
    runner.write_text("import sys\nfrom nni_2ndmatch.files import load_tensors, save_tensors\n"
                      "_, package, inputs, outputs, device = sys.argv\nt = load_tensors(inputs)\n"
                      "save_tensors(outputs, {b: 2 * t[b + '.0'] for b in {k.split('.')[0] for k in t}})\n")
    monkeypatch.setattr(aoti, "CHILD", [sys.executable, str(runner)])
    inputs = {1: [torch.ones(1, 3)], 4: [torch.arange(12.0).view(4, 3), torch.zeros(4)]}
    out = aoti.run_in_child(tmp_path / "p.pt2", inputs, "cpu")
    assert set(out) == {1, 4} and torch.equal(out[4], 2 * inputs[4][0])
    monkeypatch.setattr(aoti, "CHILD", [sys.executable, "-c", "raise SystemExit('RuntimeError: no kernel for sm_90')"])
    with pytest.raises(ExportError, match=r"failed loading or running the package \(torch .*, device cpu\): "
                                          r"RuntimeError: no kernel for sm_90; nothing was written"):
        aoti.run_in_child(tmp_path / "p.pt2", inputs, "cpu")


def test_the_benchmark_records_a_crashing_aoti_package_as_skipped(monkeypatch):
    from nni_2ndmatch.deploy import aoti
    from nni_2ndmatch.deploy.bench import run_benchmark

    monkeypatch.setattr(aoti, "CHILD", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 11)"])
    monkeypatch.setattr(aoti, "_export", lambda *args, **kwargs: None)
    monkeypatch.setattr(aoti, "_compile", lambda program, path, metadata: path.write_bytes(b"a package"))
    results = run_benchmark(tiny_dit(seed=2), tiny_dit(seed=1), backends=["torch", "aoti"], batches=[1], device="cpu",
                            repeats=3, warmup=1)
    assert [r["variant"] for r in results["results"]] == ["torch-cpu-fp32"]
    assert [s["variant"] for s in results["skipped"]] == ["aoti-cpu-fp32"]
    assert "crashed (SIGSEGV)" in results["skipped"][0]["reason"]
    # the JSON has the typed shape, key for key
    from nni_2ndmatch.deploy.bench import BenchResults, BenchRow, BenchSetup, LatencyStats, Skipped

    assert results.keys() == BenchResults.__annotations__.keys()
    assert results["setup"].keys() == BenchSetup.__annotations__.keys()
    row, = results["results"]
    assert row.keys() == BenchRow.__annotations__.keys()
    assert results["skipped"][0].keys() == Skipped.__annotations__.keys()
    assert row["teacher"].keys() == row["student"].keys() == LatencyStats.__annotations__.keys()


def test_variants_come_from_one_registry_and_a_missing_provider_is_a_reason(monkeypatch, tmp_path):
    import onnxruntime as ort

    from nni_2ndmatch.deploy import bench

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    variants, skipped = bench.select(bench.Setup(backends=["onnxruntime", "torch"], batches=[1], device="cuda",
                                                 seq_len=5).on("cuda", tmp_path))
    assert [v.name for v, _ in variants] == ["torch-cuda-fp32", "torch-cuda-fp16-cudagraph", "onnxruntime-cuda",
                                          "onnxruntime-cuda-fp16"]
    assert [s["variant"] for s in skipped] == ["onnxruntime-tensorrt"]
    assert "install onnxruntime-gpu" in skipped[0]["reason"]
    assert bench.backends_on("cpu") == ["torch", "torch-compile", "aoti", "onnxruntime"]
    with pytest.raises(ValueError, match="'onnxruntime-cpu' is already registered"):
        bench.register_variant(bench.VARIANTS["onnxruntime-cpu"])


def test_the_fp16_onnxruntime_variant_runs_the_fp16_export_in_a_cuda_graph(monkeypatch, tmp_path):
    from nni_2ndmatch.deploy import bench
    from nni_2ndmatch.deploy.model_io import input_specs

    exported, opened = [], []
    monkeypatch.setattr(bench.variants, "export_onnx",
                        lambda model, path, fp16, **kw: exported.append((path.name, fp16)))

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]  # as onnxruntime does when it cannot start CUDA

    monkeypatch.setattr(bench.variants, "ort_session",
                        lambda path, threads, providers: opened.append(providers) or Session())
    model = tiny_dit(seed=1).eval()
    prepare = bench.VARIANTS["onnxruntime-cuda-fp16"].make(bench.Setup(batches=[1], seq_len=5, workdir=tmp_path))
    with pytest.raises(bench.Unavailable, match="did not obtain CUDAExecutionProvider"):
        prepare(bench.Subject("student", model, input_specs(model, 5)), 1)
    assert exported == [("student-fp16.onnx", True)]
    assert opened == [[("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]]


def test_the_reports_export_section_takes_the_backends_that_run_on_the_cpu():
    from nni_2ndmatch.config import ExportSection

    assert ExportSection(backends=["torch", "aoti"]).backends == ["torch", "aoti"]
    with pytest.raises(ValueError, match=r"'tensorrt' is not a backend that runs on the CPU \(allowed: torch, "
                                         r"torch-compile, aoti, onnxruntime\)"):
        ExportSection(backends=["tensorrt"])


def test_a_graph_onnxruntime_cannot_run_is_one_export_error():
    """Split with num_outputs (an opset-18 attribute) in an opset-17 graph, which the dynamo exporter
    writes below 18: onnxruntime refuses it, and that is an ExportError (exit 1), not its own type."""
    from onnx import TensorProto, helper

    from nni_2ndmatch.deploy import ExportError
    from nni_2ndmatch.deploy.onnx_export import ort_session

    def tensor(name, size):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [size])

    split = helper.make_node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2)
    graph = helper.make_graph([split], "g", [tensor("x", 4)], [tensor("a", 2), tensor("b", 2)])
    for opset, runs in ((18, True), (17, False)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()
        if runs:
            assert [o.name for o in ort_session(model).get_outputs()] == ["a", "b"]
        else:
            with pytest.raises(ExportError, match="onnxruntime cannot run the graph: .*num_outputs"):
                ort_session(model)


def test_the_benchmark_refuses_a_tensorrt_precision_or_exporter_it_does_not_know():
    from nni_2ndmatch.deploy import DeployError, bench

    with pytest.raises(DeployError, match=r"trt_precision='int8' is not allowed; allowed: fp16, fp32"):
        bench.Setup(backends=["torch"], trt_precision="int8")
    with pytest.raises(DeployError, match=r"exporter='foo' is unknown; allowed: dynamo, torchscript"):
        bench.Setup(backends=["torch", "onnxruntime"], exporter="foo")


@pytest.mark.slow
def test_torch_compile_rows_are_compiled_at_every_batch_and_a_compiler_failure_skips_the_variant(monkeypatch):
    """Teacher and student at 5 batch sizes make 10 graphs of one function, over dynamo's limit of 8:
    the later rows would run eager under the compiled label; each batch starts afresh instead. A
    compiler that fails is a skipped variant with its reason, and the other rows stay."""
    from nni_2ndmatch.deploy import bench

    compile_, graphs = torch.compile, []

    def counting(gm, example_inputs):  # a backend that runs the traced graph as it is, and counts the graphs
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(bench.variants.torch, "compile", lambda fn, **kw: compile_(fn, backend=counting, dynamic=False))
    from nni_2ndmatch import prune_diffusers

    teacher = tiny_dit(seed=1).eval()
    student, _ = prune_diffusers(teacher, "magnitude", 0.3)  # other shapes: graphs of its own
    results = bench.run_benchmark(teacher, student, backends=["torch-compile"], batches=[1, 2, 3, 4, 5],
                                  device="cpu", repeats=3, warmup=1, seq_len=5)
    assert [r["batch"] for r in results["results"]] == [1, 2, 3, 4, 5]
    assert len(graphs) >= 10  # each model at each batch compiled (past dynamo's limit, 8, it would run eager)

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(bench.variants.torch, "compile", broken)
    results = bench.run_benchmark(teacher, student, backends=["torch", "torch-compile"], batches=[1], device="cpu",
                                  repeats=3, warmup=1, seq_len=5)
    assert [r["variant"] for r in results["results"]] == ["torch-cpu-fp32"]
    assert results["skipped"] == [{"variant": "torch-compile-cpu-fp32", "reason": "torch.compile failed: "
                                   "RuntimeError: InvalidCxxCompiler: no working C++ compiler found"}]


def test_an_out_path_that_cannot_become_a_file_is_refused_before_the_export(tmp_path):
    from nni_2ndmatch.deploy import DeployError, export_aoti, export_onnx

    model = tiny_dit(seed=1).eval()
    for export in (export_onnx, export_aoti):
        with pytest.raises(DeployError, match=r"out='.*' is a folder; give the path of the file to write"):
            export(model, tmp_path)


def test_a_text_length_for_a_model_without_text_is_refused():
    from nni_2ndmatch.deploy import DeployError
    from nni_2ndmatch.deploy.model_io import check_seq_len

    check_seq_len(tiny_dit(seed=1), None)
    with pytest.raises(DeployError, match=r"seq_len=5 is not allowed: DiTTransformer2DModel takes no "
                                          r"encoder_hidden_states"):
        check_seq_len(tiny_dit(seed=1), 5)


@pytest.mark.parametrize("script, argv, expected", [
    ("to_onnx", ["--opset", "7"], r"opset=7 is not allowed; it must be an integer in \[14, "),
    ("to_onnx", ["--exporter", "tensorrt"], r"exporter='tensorrt' is unknown; allowed: dynamo, torchscript"),
    ("to_onnx", ["--tolerance", "0"], r"tolerance=0.0 is not allowed; it must be a number > 0"),
    ("to_aoti", ["--device", "tpu"], r"device='tpu' is unknown; allowed: cpu, cuda"),
    ("to_aoti", ["--fp16"], r"fp16=True is not allowed with device='cpu'"),
])
def test_the_export_scripts_check_their_options_before_loading_the_model(tmp_path, monkeypatch, script, argv,
                                                                         expected):
    """A bad option is named before the model loads (here a folder that holds none: loading first
    would report the folder instead)."""
    import importlib

    from nni_2ndmatch.deploy import DeployError

    monkeypatch.syspath_prepend(str(ROOT / "export"))
    module = importlib.import_module(script)
    args = module.parse_args(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "m.out"), *argv])
    with pytest.raises(DeployError, match=expected):
        module.main(args)
