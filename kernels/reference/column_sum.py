"""Column sums: ``x`` [..., C] summed over every leading dim, as a Linear's bias gradient is."""
from __future__ import annotations

import math

import torch


def column_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[C]: ``x`` summed over all but its last dim, accumulated in float32 (float64 where ``x`` or
    ``dtype`` is float64) and rounded once to ``dtype`` (default ``x.dtype``)."""
    dtype = dtype or x.dtype
    acc = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).sum(0, dtype=acc).to(dtype)
