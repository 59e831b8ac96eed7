"""Small networks with known Jacobians for the estimator tests."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small non-linear noise predictor on [B, C, H, W] with a timestep embedding.

    Its Jacobian w.r.t. the input is not symmetric (two different weight matrices).
    """

    def __init__(self, shape=(1, 2, 3), hidden=7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(shape).prod())
        self.shape = shape
        self.w1 = nn.Parameter(torch.randn(hidden, d, generator=g) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(d, hidden, generator=g) / hidden**0.5)
        self.temb = nn.Parameter(torch.randn(hidden, generator=g) * 0.1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x, t, class_labels=None):
        h = torch.tanh(x.flatten(1) @ self.w1.T + torch.sin(t.to(x.dtype) / 100.0)[:, None] * self.temb)
        if class_labels is not None:
            h = h + class_labels.to(x.dtype)[:, None] * 0.1
        return (self.drop(h) @ self.w2.T).reshape(-1, *self.shape)


class SymmetricNet(nn.Module):
    """f(x) = W^T tanh(W x): the gradient of a potential, so its Jacobian is symmetric."""

    def __init__(self, shape=(1, 2, 3), hidden=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(shape).prod())
        self.shape = shape
        self.w = nn.Parameter(torch.randn(hidden, d, generator=g) / d**0.5)

    def forward(self, x, t):
        return (torch.tanh(x.flatten(1) @ self.w.T) @ self.w).reshape(-1, *self.shape)
