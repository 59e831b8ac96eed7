"""References for the Jacobian estimators: explicit Jacobians' products, and relative errors."""

import torch
from conftest import explicit_jacobians


def rel_error(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


def reference_products(model, x, t, v, **kw):
    """(||J v||^2, ||J^T v||^2, J) per sample from explicit Jacobians."""
    J = explicit_jacobians(model, x, t, **kw)  # [B, d, d], J[b] = d out_b / d x_b
    vf = v.flatten(1)
    jv = torch.einsum("bij,bj->bi", J, vf)
    jtv = torch.einsum("bji,bj->bi", J, vf)
    return jv.pow(2).sum(1), jtv.pow(2).sum(1), J
