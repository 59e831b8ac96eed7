"""References for the Jacobian estimators: explicit Jacobians' products, and relative errors."""

import torch


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


def rel_error(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


def reference_products(model, x, t, v, **kw):
    """(||J v||^2, ||J^T v||^2, J) per sample from explicit Jacobians."""
    J = explicit_jacobians(model, x, t, **kw)  # [B, d, d], J[b] = d out_b / d x_b
    vf = v.flatten(1)
    jv = torch.einsum("bij,bj->bi", J, vf)
    jtv = torch.einsum("bji,bj->bi", J, vf)
    return jv.pow(2).sum(1), jtv.pow(2).sum(1), J
