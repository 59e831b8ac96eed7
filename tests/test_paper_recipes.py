"""examples/paper/: each recipe is a valid config as shipped, and runs two steps with its hub or
downloaded models replaced by tiny local ones of the same families."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import captioned_images, tiny_sd_pipeline, tiny_unet2d_condition

from nni_2ndmatch.config import validate_config
from nni_2ndmatch.models import write_tiny_sdxl

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "examples" / "paper").glob("*.yaml"))


def test_there_is_a_recipe_per_setting_of_the_paper_and_each_is_valid(tmp_path, monkeypatch):
    assert [p.stem for p in RECIPES] == ["cifar10_ddpm", "lsun_church_ddpm", "sd_bk_sdm_coco", "sdxl_ssd1b_style"]
    monkeypatch.chdir(tmp_path)  # where the user has put the recipe's downloads: its folders exist
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        assert raw["finetune"]["finetuner"] == "2ndmatch" and raw["finetune"]["lambda_jac"] == 0.1
        for spec in (raw["model"]["teacher"], raw["model"].get("student") or {}, raw["data"]):
            if "path" in spec:
                Path(spec["path"]).mkdir(parents=True, exist_ok=True)
        validate_config(raw)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [p.name for p in RECIPES])
def test_each_recipe_runs_two_steps_on_tiny_models_of_its_families(recipe, tmp_path):
    from diffusers import UNet2DModel

    from nni_2ndmatch.job.run import run_job

    raw = yaml.safe_load((ROOT / "examples" / "paper" / recipe).read_text())
    if "sdxl" in recipe:  # SDXL with a given student of its U-Net's family
        raw["model"]["teacher"] = {"path": str(write_tiny_sdxl(tmp_path / "sdxl", resolution=8))}
        raw["model"]["student"] = {"path": str(write_tiny_sdxl(tmp_path / "student", seed=1, resolution=8) / "unet")}
    elif "student" in raw["model"]:  # Stable Diffusion with a given UNet2DConditionModel student
        raw["model"]["teacher"] = {"path": str(tiny_sd_pipeline(tmp_path / "sd"))}
        tiny_unet2d_condition(seed=1).save_pretrained(tmp_path / "student")
        raw["model"]["student"] = {"path": str(tmp_path / "student")}
    else:  # a pixel-space DDPM UNet2DModel
        torch.manual_seed(0)
        UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                    norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).save_pretrained(
                        tmp_path / "teacher")
        raw["model"]["teacher"] = {"path": str(tmp_path / "teacher")}
    images = captioned_images(tmp_path / "images")
    if "caption_column" in raw["data"]:  # a table with the recipe's columns, as parquet
        datasets = pytest.importorskip("datasets")
        rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
        table = datasets.Dataset.from_dict({
            raw["data"]["image_column"]: [{"bytes": (images / r["file_name"]).read_bytes(), "path": None}
                                          for r in rows],
            raw["data"]["caption_column"]: [r["text"] for r in rows]})
        table.cast_column(raw["data"]["image_column"], datasets.Image()).to_parquet(str(tmp_path / "pairs.parquet"))
        images = tmp_path / "pairs.parquet"
    raw["data"].update(path=str(images), resolution=8)
    raw["finetune"].update(steps=2, batch_size=2, gradient_accumulation_steps=1, checkpoint_every=2, log_every=1)
    raw["output_dir"] = str(tmp_path / "run")
    summary = run_job(validate_config(raw), "run", progress=False)
    assert summary["steps"] == 2 and all(map(math.isfinite, summary["final"].values()))
    assert ("pipeline_dir" in summary) == ("student" in raw["model"])
    # every setting of the recipe is the run's, as its resolved config and summary record them
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "examples" / "paper" / recipe).read_text())
    replaced = {"steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every"}
    used = {**summary["train_config"], **summary["finetuner_options"]}
    for key, value in recipe["finetune"].items():
        if key not in replaced:
            assert resolved["finetune"][key] == value, key
            assert used.get(key, value) == value, key
    for key, value in recipe.get("pruning", {}).items():
        assert resolved["pruning"][key] == value, key
    for key, value in recipe["data"].items():
        if key not in ("path", "resolution"):
            assert resolved["data"][key] == value, key
