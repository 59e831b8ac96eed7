"""A small finetune on random images, for the loop's tests."""

import torch

from helpers.tiny_models import tiny_unet2d
from nni_2ndmatch import TrainConfig, finetune, get_finetuner
from nni_2ndmatch.training import Watch


class Images(torch.utils.data.Dataset):
    def __init__(self, n=24):
        self.x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def run_tiny(tmp_path, steps, resume=False, finetuner="2ndmatch", options=None, **cfg):
    """A tiny U-Net student finetuned against a wider one on ``Images`` (``options``: the
    finetuner's); (result, teacher)."""
    student, teacher = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2)
    config = TrainConfig(steps=steps, batch_size=4, checkpoint_every=3, log_every=1, seed=11, hflip=True, **cfg)
    res = finetune(student, teacher, get_finetuner(finetuner, **(options or {})), Images(), config, tmp_path,
                   resume=resume, watch=Watch(progress=False))
    return res, teacher
