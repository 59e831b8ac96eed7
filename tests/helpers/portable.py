"""A pipeline the package wrote, sampled by diffusers in another process where the package is missing."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

SAMPLE = """
import sys
sys.modules["nni_2ndmatch"] = None  # the package is missing
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, **{extra})
images = pipe(["a handwritten digit 3"] * 2, height=16, width=16, num_inference_steps=3, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
save_file({{"images": torch.from_numpy(images)}}, sys.argv[2])
"""


def text_to_image_samples(pipe):
    """What SAMPLE draws, drawn by ``pipe`` here."""
    return torch.from_numpy(pipe(["a handwritten digit 3"] * 2, height=16, width=16, num_inference_steps=3,
                                 output_type="np", generator=torch.Generator().manual_seed(0)).images)


def samples_without_the_package(pipeline, tmp_path, **from_pretrained):
    """SAMPLE's images from the pipeline folder, by diffusers alone (``from_pretrained``'s extra
    arguments as Python literals, e.g. ``text_encoder_3="None"``)."""
    extra = "{" + ", ".join(f"{k!r}: {v}" for k, v in from_pretrained.items()) + "}"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", SAMPLE.format(extra=extra), str(pipeline), str(tmp_path / "images.st")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    return load_file(tmp_path / "images.st")["images"]
