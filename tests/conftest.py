import pytest
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


def explicit_jacobians(model, x, t, **kw):
    """Per-sample Jacobians [B, d, d] of model(x, t) w.r.t. x by torch.autograd.functional.jacobian."""
    out = []
    for i in range(x.shape[0]):
        kw_i = {k: v[i:i + 1] for k, v in kw.items()}

        def f(xi, t_i=t[i:i + 1], kw_i=kw_i):
            y = model(xi, t_i, **kw_i)
            y = y.sample if hasattr(y, "sample") else y
            return y[:, : xi.shape[1]]

        d = x[i].numel()
        out.append(torch.autograd.functional.jacobian(f, x[i:i + 1]).reshape(d, d))
    return torch.stack(out)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
