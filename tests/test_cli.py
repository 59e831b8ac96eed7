"""The command line and the config file, run as a user would: in a subprocess."""

import json
import math
import re

import pytest
import torch
import yaml
from helpers.cli import ROOT, cli, cli_here, write_config

from nni_2ndmatch.config import validate_config

#: Examples with an end-to-end test of their own, which checks more than this file's (not run twice).
OWN_TESTS = {"tiny_sdxl.yaml": "tests/test_sdxl.py", "tiny_sd3.yaml": "tests/test_sd3.py"}
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name not in OWN_TESTS)


@pytest.mark.slow
@pytest.mark.parametrize("example", [p.name for p in EXAMPLES])
def test_each_example_runs_prune_then_finetune_for_two_steps(example, tmp_path):
    """Every example config, as shipped, with only its length and output folder changed."""
    from nni_2ndmatch import load_pruned
    from nni_2ndmatch.config import validate_config
    from nni_2ndmatch.job.run import run_job

    raw = yaml.safe_load((ROOT / "examples" / example).read_text())
    raw["finetune"].update(steps=2, batch_size=4, checkpoint_every=2, log_every=1)
    raw["output_dir"] = str(tmp_path / "run")
    if "evaluate" in raw:
        raw["evaluate"].update(samples=20, ddim_steps=3)
    if "export" in raw:
        raw["export"].update(batch=[2], repeats=3)
    summary = run_job(validate_config(raw), "run", progress=False)
    assert summary["steps"] == 2 and all(map(math.isfinite, summary["final"].values()))
    if "evaluate" in raw or "export" in raw:
        report = tmp_path / "run" / "report"
        results = json.loads((report / "results.json").read_text())
        assert (report / "report.md").is_file() and (report / "loss_curves.png").is_file()
        if "evaluate" in raw:
            assert results["quality"]["fidelity"] > 0 and (report / "samples_student.png").is_file()
        if "export" in raw:
            assert (tmp_path / "run" / "onnx" / "student.onnx").is_file() and (report / "latency.png").is_file()
            assert results["latency"]["macs_ratio"] < 1
    student = load_pruned(tmp_path / "run" / "student")
    assert summary["student_params"] == sum(p.numel() for p in student.parameters()) < summary["teacher_params"]


def _ddpm_pipeline(folder):
    from diffusers import DDPMPipeline, DDPMScheduler
    from helpers.tiny_models import tiny_unet2d

    DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return {"version": 1, "model": {"teacher": {"path": str(folder)}}, "data": {"builtin": "digits", "resolution": 8},
            "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3},
            "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4}, "output_dir": str(folder.parent / "run")}


@pytest.mark.slow
def test_grids_and_evaluation_of_a_pixel_pipeline_sample_on_its_own_schedule(tmp_path):
    """A cosine v_prediction DDPM pipeline: the teacher's grid and evaluation samples are those of
    diffusers' DDIMPipeline on the pipeline's own schedule, from the same seeded noise (they were
    drawn on the reference schedule, or refused)."""
    import numpy as np
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from PIL import Image

    from nni_2ndmatch.job.run import run_job

    raw = _ddpm_pipeline(tmp_path / "teacher")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(
        tmp_path / "teacher" / "scheduler")
    raw["finetune"].update(validation_every=2, validation_images=2)
    raw["evaluate"] = {"samples": 2, "ddim_steps": 5}
    run_job(validate_config(raw), "run", progress=False)
    folder = tmp_path / "teacher"
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(folder / "unet"),
                        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                  output_type="np").images  # the evaluator's seed 0, its noise drawn the same way
    grid = np.asarray(Image.open(tmp_path / "run" / "report" / "samples_teacher.png").convert("L"), dtype=float)
    want = (np.clip(images[..., 0], 0, 1) * 255).round()  # the grid's first cell (scale 4, a 1-pixel border)
    got = grid[4:4 + 4 * want.shape[1]:4, 4:4 + 4 * want.shape[2]:4]
    assert np.abs(got - want[0]).max() <= 1 and (tmp_path / "run" / "samples" / "teacher.png").is_file()


@pytest.mark.slow
def test_a_pipeline_teacher_gives_its_pipeline_with_the_student_in_it(tmp_path):
    from diffusers import DiffusionPipeline

    from nni_2ndmatch import load_pruned
    from nni_2ndmatch.job.run import run_job

    raw = _ddpm_pipeline(tmp_path / "teacher")
    summary = run_job(validate_config(raw), "run", progress=False)
    out = tmp_path / "run" / summary["pipeline_dir"]
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["nni_2ndmatch", "PrunedUNet2DModel"]
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == \
        (tmp_path / "teacher" / "scheduler" / "scheduler_config.json").read_bytes()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # the class from unet/nni_2ndmatch.py
    assert type(pipe.unet).__module__.startswith("diffusers_modules")
    student = load_pruned(tmp_path / "run" / "student")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 700])
    assert torch.equal(pipe.unet(x, t).sample, student(x, t).sample)
    assert summary["student_params"] == sum(p.numel() for p in pipe.unet.parameters()) < summary["teacher_params"]
    images = pipe(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1)
    card = (out / "README.md").read_text()  # the model card, with the pipeline's loading code
    assert card.startswith("---\nlibrary_name: diffusers\n") and "a local folder (`teacher`)" in card
    assert 'DiffusionPipeline.from_pretrained("pipeline", trust_remote_code=True)' in card
    assert 'pipe = load_pipeline("pipeline")' in card


@pytest.mark.parametrize("edit, expected", [
    (lambda p: _edit_json(p / "model_index.json", vae=["diffusers", "VQModel"]),
     r"model_index.json: vae is VQModel; allowed: AutoencoderKL"),
    (lambda p: _edit_json(p / "model_index.json", tokenizer=["transformers", "CLIPTokenizer"]),
     r"model_index.json: a text_encoder needs its tokenizer and a tokenizer its text_encoder"),
    (lambda p: _edit_json(p / "scheduler" / "scheduler_config.json", beta_schedule="cubic"),
     r"scheduler_config.json: not a schedule DDPM training can use: cubic"),
    (lambda p: _edit_json(p / "model_index.json", unet=[None, None]),
     r"model_index.json: no denoiser component; expected one of unet, transformer"),
])
def test_a_pipeline_the_finetuning_cannot_train_yet_is_one_clear_error(edit, expected, tmp_path):
    raw = _ddpm_pipeline(tmp_path / "teacher")
    edit(tmp_path / "teacher")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(r"model\.teacher: .*" + expected, r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.slow
def test_run_end_to_end_then_refuse_then_resume(tmp_path):
    cfg = write_config(tmp_path)
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["finetuner"] == "2ndmatch"
    assert summary["student_params"] < summary["teacher_params"]
    assert {"dsm", "kd", "jac", "loss"} <= set(summary["final"])
    assert summary["loss_weights"] == {"dsm": 1.0, "kd": 1.0, "jac": 1.0}  # the finetuner's own (write_config's)
    from nni_2ndmatch import load_pruned

    student = load_pruned(out / "student")
    report = json.loads((out / "pruning_report.json").read_text())
    assert sum(p.numel() for p in student.parameters()) == report["params_after"] == summary["student_params"]
    assert report["macs_after"] < 0.7 * report["macs_before"]
    # the rest in this process: the start-up was tested above
    again = cli_here("run", cfg, "--no-progress")
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    longer = write_config(tmp_path, lambda raw: raw["finetune"].update(steps=5), name="longer.yaml")
    resumed = cli_here("finetune", longer, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    assert cli_here("run", cfg, "--overwrite", "--no-progress").returncode == 0


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["finetune"].update(lamda_jac=0.1), "finetune.lamda_jac: unknown key.*did you mean 'lambda_jac'"),
    (lambda r: r["finetune"].update(finetuner="2ndmach"), "finetune.finetuner: value '2ndmach'.*2ndmatch, dsm, kd"),
    (lambda r: r["finetune"].update(lr=-1), "finetune.lr: value -1 is not allowed"),
    (lambda r: r["finetune"].update(finetuner="2ndmatch", jac_match="log", jac_weighting="x0"),
     "finetune: jac_weighting='x0' is not allowed with jac_match='log'"),
    (lambda r: r["finetune"].update(steps="many"), "finetune.steps: value 'many'"),
    (lambda r: r["finetune"].update(mode="hvp"),
     "finetune.mode: value 'hvp' is not allowed: Input should be 'auto', 'vjp', 'jvp' or 'fd'"),
    (lambda r: r["model"].update(studnet={"builtin": "tiny-unet"}),
     "model.studnet: unknown key; did you mean 'student'"),
    (lambda r: r["model"].update(student={"builtin": "tiny-unet"}), "give exactly one of 'model.student'"),
    (lambda r: r["pruning"].update(pruner="L3NormPruner"),
     "pruner='L3NormPruner' is unknown; allowed: magnitude, taylor, diff-pruning, L1NormPruner"),
    (lambda r: r["pruning"].update(sparse_ratio=1.0), "pruning.sparse_ratio: value 1.0 is not allowed"),
    (lambda r: r["model"]["teacher"].update(builtin="huge"), "builtin='huge' is unknown"),
    (lambda r: r["model"].update(teacher={"path": "/nonexistent/model"}),
     "model.teacher.path: value '/nonexistent/model' is not allowed: no such file or folder; allowed: a model"),
    (lambda r: r["data"].update(builtin=None, path="/nonexistent/images"),
     "data.path: value '/nonexistent/images' is not allowed: no such file or folder; allowed: an image folder"),
    (lambda r: r["data"].update(channels=3), "data: channels=3: the digits are greyscale"),
    (lambda r: (r.pop("pruning"), r["model"].update(student={"builtin": "ddpm-cifar10", "width": 0.25})),
     r"model.student does not accept the data's images of shape \(1, 1, 16, 16\)"),
    (lambda r: r.update(output_dir=str(ROOT / "README.md" / "run")), r"output_dir '.*README.md/run' is not writable"),
])
def test_bad_input_is_one_clear_message_exit_2_nothing_written(tmp_path, edit, expected):
    r = cli_here("run", write_config(tmp_path, edit), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr

    assert re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["finetune"].update(device="cuda:99"),
     r"finetune.device: value 'cuda:99' is not allowed: this machine's torch \(.*\) has no such device; "
     r"allowed here: cpu"),
    (lambda r: r["data"].update(cache_dtype="float16"),
     r"data.cache_dtype: value 'float16' is not allowed: it sets the encoded latent cache, and this teacher trains on "
     r"pixels"),
    (lambda r: r["finetune"].update(jac_min_timestep=1000),
     r"finetune.jac_min_timestep: value 1000 is not allowed: .* allowed: 0 to 999"),
    (lambda r: (r["model"].update(teacher={"builtin": "tiny-dit"}), r["finetune"].update(dropout=0.1)),
     r"finetune: dropout=0.1 is not allowed for this student: it has no residual-block dropout"),
])
def test_an_option_the_run_cannot_honour_is_refused_before_anything_is_written(tmp_path, edit, expected):
    r = cli_here("run", write_config(tmp_path, edit), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    r = cli_here("run", bad)
    assert r.returncode == 2 and "malformed YAML" in r.stderr and "Traceback" not in r.stderr
    r = cli_here("finetune", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli_here("finetune", tmp_path)
    assert r.returncode == 2 and "is a folder, not a YAML file" in r.stderr
    twice = tmp_path / "twice.yaml"  # PyYAML keeps the last; the user meant one of them
    twice.write_text("model: {teacher: {builtin: tiny-unet}}\nfinetune:\n  steps: 500\n  lr: 1.0e-3\n  steps: 2\n"
                     "output_dir: out\n")
    r = cli_here("run", twice)
    assert r.returncode == 2 and "key 'steps' is given twice, on lines 3 and 5; keep one" in r.stderr, r.stderr
    merged = tmp_path / "merged.yaml"  # a YAML merge key overridden by its mapping is not a key given twice
    merged.write_text("base: &b {steps: 2, lr: 1.0e-3}\nfinetune: {<<: *b, steps: 3}\n")
    from nni_2ndmatch.config import _YamlLoader

    assert yaml.load(merged.read_text(), Loader=_YamlLoader)["finetune"] == {"steps": 3, "lr": 1e-3}


@pytest.mark.slow
def test_a_hub_model_that_cannot_be_downloaded_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path, lambda raw: raw["model"].update(teacher={"hub": "google/ddpm-cifar10-32"}))
    r = cli("run", cfg, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "hub='google/ddpm-cifar10-32': could not download it from the Hugging Face Hub" in r.stderr
    assert "hf download google/ddpm-cifar10-32 --local-dir" in r.stderr
    assert not (tmp_path / "run" / "pruned").exists()


@pytest.mark.slow
def test_prune_then_finetune_as_separate_commands(tmp_path, caplog):
    cfg = write_config(tmp_path)
    early = cli_here("finetune", cfg, "--no-progress")
    assert early.returncode == 2 and "run 'nni-2ndmatch prune'" in early.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written (or a data cache encoded)
    pruned = cli_here("prune", cfg, "--no-progress")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruning_plan" in json.loads((tmp_path / "run" / "pruned" / "config.json").read_text())
    assert not (tmp_path / "run" / "checkpoints").exists()
    again = cli_here("prune", cfg, "--resume", "--no-progress")  # as docs/cli.md says: pruned, nothing to do
    assert again.returncode == 0 and json.loads(again.stdout)["pruning"]["pruner"] == "L1NormPruner", again.stderr
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    twice = cli_here("prune", cfg, "--no-progress")  # a second pruning, without a flag, would replace the first
    assert twice.returncode == 2 and "already holds a pruned student (pruned/); pass --resume to keep it or " \
        "--overwrite to prune again" in twice.stderr, twice.stderr
    other = write_config(tmp_path, lambda raw: raw["pruning"].update(sparse_ratio=0.6), name="other.yaml")
    refused = cli_here("finetune", other, "--no-progress")  # pruned/ was made at another ratio
    assert refused.returncode == 2 and re.search(r"differs from the one that pruned .* in pruning.sparse_ratio "
                                                 r"\(0.3 -> 0.6\)", refused.stderr), refused.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
    with_export = write_config(tmp_path, lambda raw: raw.update(export={}), name="export.yaml")
    with caplog.at_level("WARNING", logger="nni_2ndmatch"):
        assert cli_here("finetune", with_export, "--no-progress").returncode == 0
    assert "the config's export section runs after 'nni-2ndmatch run' only; this 'finetune' leaves it out" \
        in caplog.text
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "config.yaml"}
    again = cli_here("prune", cfg, "--resume", "--no-progress")  # pruned already: nothing to do, no finetune
    assert again.returncode == 0 and json.loads(again.stdout)["pruning"]["pruner"] == "L1NormPruner", again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_a_given_students_card_does_not_describe_an_earlier_pruning_in_the_same_folder(tmp_path):
    assert cli_here("prune", write_config(tmp_path), "--no-progress").returncode == 0
    given = write_config(tmp_path, lambda raw: (raw.pop("pruning"), raw["model"].update(
        student={"builtin": "tiny-unet", "width": 0.5})), name="given.yaml")
    r = cli_here("finetune", given, "--no-progress")
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert "(a given student)" in card and "## Size" not in card and "L1NormPruner" not in card


@pytest.mark.slow
def test_list_finetuners():
    r = cli("finetuners")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line[:1].isalnum()] == ["2ndmatch", "dsm", "kd"]


def test_the_finetuner_listing_gives_every_option_with_its_default_and_allowed_values(capsys):
    from nni_2ndmatch.cli import main
    from nni_2ndmatch.finetuners import KDOptions

    assert main(["finetuners", "kd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kd: DSM plus output distillation") and "2ndmatch" not in out
    options = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert options == list(KDOptions.model_fields)
    assert "  kd_perturb: none  [none | noise]  none: the kd term at x_t" in out
    assert main(["finetuners", "2ndmatch"]) == 0
    out = capsys.readouterr().out
    assert "  jac_reference_dims: null  [int | null, >= 1]" in out and "  mode: auto  [auto | vjp | jvp | fd]" in out
    assert "  jac_fraction: 1.0  [float, > 0, <= 1]  share of the batch" in out  # the limits are the model's
    assert main(["finetuners", "kdd"]) == 2
    assert "'kdd' is not a registered finetuner; allowed: 2ndmatch, dsm, kd" in capsys.readouterr().err


def test_a_plugin_strategys_options_are_listed_as_its_config_would_write_them(capsys, monkeypatch):
    from pydantic import Field

    from nni_2ndmatch import finetuners as F
    from nni_2ndmatch.cli import main

    class PluginOptions(F.TeacherOptions):
        steps_at: list[int] = Field(default_factory=lambda: [10, 20], description="when")
        on: bool = False

    class Plugin(F.KD):
        """A plugin's strategy."""
        Options = PluginOptions

    monkeypatch.setitem(F._REGISTRY, "plugin", Plugin)
    assert main(["finetuners", "plugin"]) == 0
    out = capsys.readouterr().out
    assert "  steps_at: [10, 20]  [list[int]]  when\n  on: false  [bool]\n" in out  # not PydanticUndefined, False


def test_no_code_path_loads_a_pickle():
    sources = "\n".join(p.read_text() for p in (ROOT / "nni_2ndmatch").rglob("*.py"))
    assert "import pickle" not in sources and "pickle.load" not in sources
    assert "torch.load(" not in sources


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["truncated pruned weights", "truncated diffusers weights", "not a model folder",
                                  "empty image folder", "conditional teacher with an image folder",
                                  "a model folder with a flow-matching schedule"])
def test_broken_model_or_data_folders_are_one_clear_message(case, tmp_path):
    from nni_2ndmatch import prune_diffusers, save_pruned
    from nni_2ndmatch.models import build_builtin, save_diffusers_model
    from nni_2ndmatch.pruning import default_example_inputs

    teacher = build_builtin("tiny-unet")
    folder = tmp_path / "model"
    edit_data = None
    if case == "truncated pruned weights":
        student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
        save_pruned(student, folder)
        _truncate(folder / "diffusion_pytorch_model.safetensors")
        expected = "model.student: .*is not a complete safetensors file"
    elif case == "truncated diffusers weights":
        save_diffusers_model(teacher, folder)
        _truncate(next(folder.glob("*.safetensors")))
        expected = "model.student: Unable to load weights"
    elif case == "not a model folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        expected = "model.student: model path .* has no config.json; expected a diffusers model folder"
    elif case == "a model folder with a flow-matching schedule":
        from diffusers import FlowMatchEulerDiscreteScheduler

        save_diffusers_model(teacher, folder)
        FlowMatchEulerDiscreteScheduler().save_config(folder)
        expected = (r"model.student: .*scheduler_config.json gives the model its own schedule "
                    r"\(FlowMatchEulerDiscreteScheduler\), which a model folder's run does not train on")
    elif case == "empty image folder":
        save_diffusers_model(teacher, folder)
        (tmp_path / "images").mkdir()
        edit_data = {"path": str(tmp_path / "images"), "resolution": 16, "channels": 1}
        expected = "data: data path .* holds no usable images"
    else:
        from PIL import Image

        save_diffusers_model(build_builtin("tiny-dit"), folder)
        (tmp_path / "images").mkdir()
        Image.new("L", (16, 16)).save(tmp_path / "images" / "a.png")
        edit_data = {"path": str(tmp_path / "images"), "resolution": 16, "channels": 1}
        teacher_dir = tmp_path / "dit-teacher"
        save_diffusers_model(build_builtin("tiny-dit"), teacher_dir)
        expected = ("data: path=.*an image folder carries no class_labels, "
                    "which the teacher .DiTTransformer2DModel. needs")

    def edit(raw):
        raw.pop("pruning")
        raw["model"]["student"] = {"path": str(folder)}
        if edit_data:
            raw["data"] = edit_data
        if case == "conditional teacher with an image folder":
            raw["model"]["teacher"] = {"path": str(tmp_path / "dit-teacher")}

    r = cli_here("run", write_config(tmp_path, edit), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_student_gets_a_model_card_with_the_runs_figures(tmp_path):
    def evaluate(raw):
        raw["evaluate"] = {"samples": 8, "ddim_steps": 2}

    result = cli_here("run", write_config(tmp_path, evaluate), "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    text = (out / "student" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["library_name"] == "diffusers" and {"pruned", "distillation", "2ndmatch"} <= set(front["tags"])
    assert "base_model" not in front  # the teacher is not from the Hub
    pruning = json.loads((out / "pruning_report.json").read_text())
    quality = json.loads((out / "report" / "results.json").read_text())["quality"]
    assert f"| parameters | {pruning['params_before']:,} | {pruning['params_after']:,} |" in body
    assert f"| digits-FID | {quality['digits_fid_teacher']:.3f} | {quality['digits_fid_student']:.3f} |" in body
    assert '"jac_match": "vector"' in body and "3 steps of batch 4" in body
    assert 'load_pruned("student")' in body and not (out / "pipeline").exists()


@pytest.mark.slow
def test_a_run_whose_report_fails_leaves_its_student_with_a_card(tmp_path, monkeypatch):
    from nni_2ndmatch.errors import RunError
    from nni_2ndmatch.job import run

    def fail(*args, **kwargs):
        raise RunError("the export's parity check failed")

    monkeypatch.setattr(run, "report_stages", fail)
    raw = {"model": {"teacher": {"builtin": "tiny-unet", "seed": 0}}, "data": {"builtin": "digits", "resolution": 16},
           "pruning": {"pruner": "magnitude"}, "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4},
           "evaluate": {"samples": 4}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(RunError, match="parity"):
        run.run_job(validate_config(raw), "run", progress=False)
    card = (tmp_path / "run" / "student" / "README.md").read_text()  # there was none
    assert 'load_pruned("student")' in card and "digits-FID" not in card


@pytest.mark.slow
@pytest.mark.parametrize("case", ["NNI config_list", "a given unpruned student"])
def test_the_cards_loading_code_loads_the_student_with_diffusers_alone(case, tmp_path, monkeypatch):
    """The card's diffusers-only snippet, run as written in output_dir, loads the student; a
    config_list pruning (no single sparse ratio) is described, not a crash at the run's end."""
    from diffusers import UNet2DModel

    from nni_2ndmatch.job.run import run_job

    raw = {"model": {"teacher": {"builtin": "tiny-unet", "seed": 0}}, "data": {"builtin": "digits", "resolution": 16},
           "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4}, "output_dir": str(tmp_path / "run")}
    if case == "NNI config_list":
        raw["pruning"] = {"pruner": "L1NormPruner", "config_list": [
            {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "exclude_op_names": ["conv_out"]}]}
    else:
        raw["model"]["student"] = {"builtin": "tiny-unet", "width": 0.5}
    run_job(validate_config(raw), "run", progress=False)
    text = (tmp_path / "run" / "student" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert ("by `L1NormPruner` with the config_list of 1 entry(ies)" in text) == (case == "NNI config_list")
    pruned = case == "NNI config_list"  # else an ordinary diffusers model: no remote code, no nni_2ndmatch.py
    assert len(blocks) == (2 if pruned else 1) and ("trust_remote_code=True" in text) == pruned
    monkeypatch.chdir(tmp_path / "run")
    scope = {}
    exec(blocks[-1], scope)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert isinstance(scope["student"], UNet2DModel)
    assert sum(p.numel() for p in scope["student"].parameters()) == summary["student_params"]


def test_a_hub_teachers_card_names_it_as_the_base_model(tmp_path):
    from nni_2ndmatch.config import validate_config
    from nni_2ndmatch.job.card import model_card
    from nni_2ndmatch.job.results import RunSummary

    config = validate_config({"model": {"teacher": {"hub": "google/ddpm-cifar10-32"}}, "output_dir": str(tmp_path),
                              "pruning": {"pruner": "magnitude"}, "finetune": {"finetuner": "dsm"}})
    summary = RunSummary(finetuner="dsm", finetuner_options={"lambda_dsm": 1.0},
                         train_config=config.finetune.train_config().model_dump(), steps=5, seconds=1.0, final={},
                         teacher_params=10, student_params=5, processes=1)
    front = yaml.safe_load(model_card(config, summary, None, None, pipeline=False).split("---\n")[1])
    assert front == {"library_name": "diffusers", "base_model": "google/ddpm-cifar10-32",
                     "tags": ["nni-2ndmatch", "pruned", "dsm"]}
