"""Eager reference for ``kernels.gelu_mlp``: timm's ``Mlp`` without dropout, op for op."""
import torch
import torch.nn.functional as F


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str = "none",
) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x`` [..., C], ``fc1_weight`` [H, C], ``fc2_weight`` [C_out, H]."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
