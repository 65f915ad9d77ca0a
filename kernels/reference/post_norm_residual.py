"""Eager reference for ``kernels.post_norm_residual``.

The residual branch of a post-norm (Swin-V2) block as the official decoder writes it:
``x = x + norm(branch)``, with ``norm`` an ``nn.LayerNorm`` over the last axis.
"""
import torch
import torch.nn.functional as F


def post_norm_residual(
    x: torch.Tensor,
    branch: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``x + layer_norm(branch)`` over the last axis, both [..., C]; ``weight``, ``bias`` [C]."""
    return x + F.layer_norm(branch, (branch.shape[-1],), weight, bias, eps)
