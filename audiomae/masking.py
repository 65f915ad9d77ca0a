"""Mask generation: which tokens the encoder keeps, and the permutation that puts them back.

Semantics follow the official code exactly (same noise -> same ``ids_keep``, ``ids_restore`` and
``mask``; for 2-D masking on grids of up to 999 tokens, see ``structured_masking_ids``), with fewer passes: the inverse permutation is one scatter instead of a second argsort,
the mask comes from ``ids_restore`` instead of a gather, and the 2-D mask is built from per-axis
counts instead of an ``[B, T*F]`` float index that the official code argsorts.

Conventions: ``mask`` is 1 for removed tokens and 0 for kept ones, in torch's default float dtype
whatever the noise's dtype (the official ``torch.ones`` mask); ``ids_restore[b, i]`` is the
position of token ``i`` in the kept-first order, so ``ids_restore[b, i] < len_keep`` iff token ``i``
is kept; ``ids_keep[b, j]`` is the token index of the ``j``-th kept token.
"""
from __future__ import annotations

import math
import numbers

import torch


def _check_noise(noise: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(noise).__name__}")
    if tuple(noise.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(noise.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {noise.dtype}")


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """[B, L] permutations -> their inverses (``argsort(perm)`` in one scatter)."""
    arange = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, arange)


def _check_count(count: int, size: int, name: str) -> None:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count <= size:
        raise ValueError(f"{name} must be an integer in [0, {size}], got {count!r}")


def check_tokens_on_grid(x: torch.Tensor, grid: tuple[int, int]) -> None:
    """``x`` must be the patch tokens [B, T*F, D] of the ``grid=(T, F)`` the masks are drawn on."""
    T, F = grid
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != T * F:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be patch tokens [B, T*F={T * F}, D] of the model's grid ({T}, {F}), got {got}")


def random_masking_ids(noise: torch.Tensor, len_keep: int):
    """Per-sample random masking from ``noise`` [B, L]: the ``len_keep`` smallest noise values are kept.

    Returns ``ids_keep`` [B, len_keep], ``ids_restore`` [B, L] (int64) and ``mask`` [B, L] (float).
    """
    _check_count(len_keep, noise.shape[1], "len_keep")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = inverse_permutation(ids_shuffle)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_shuffle[:, :len_keep], ids_restore, mask


def kept_along_axis(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n] noise -> (``keep`` [B, n] bool, True for the ``len_keep`` smallest values of each row;
    the kept positions [B, len_keep] in ascending order), from one argsort."""
    order = torch.argsort(noise, dim=1)
    return inverse_permutation(order) < len_keep, order[:, :len_keep].sort(dim=1).values


def structured_masking_ids(noise_t: torch.Tensor, noise_f: torch.Tensor, len_keep_t: int, len_keep_f: int):
    """2-D time x frequency masking of a ``(T, F)`` grid: a token is kept iff its time row and its
    frequency column are both kept. Kept tokens come first in token order, then the masked ones in
    token order, as in the official code. (The official code orders tokens by ``index + 999 * mask``,
    which puts the kept ones first only on grids of up to 999 tokens, every AudioMAE grid. Beyond
    that the orders interleave and the official ``ids_keep`` takes some masked tokens, so its
    encoder's tokens disagree with its own mask; here ``ids_keep`` is always the mask's kept tokens.)

    Returns ``ids_keep`` [B, Kt*Kf], ``ids_restore`` [B, T*F] (int64) and ``mask`` [B, T*F] (float).
    """
    B, T = noise_t.shape
    F = noise_f.shape[1]
    _check_count(len_keep_t, T, "len_keep_t")
    _check_count(len_keep_f, F, "len_keep_f")
    keep_t, rows = kept_along_axis(noise_t, len_keep_t)  # [B, T], [B, Kt]
    keep_f, cols = kept_along_axis(noise_f, len_keep_f)  # [B, F], [B, Kf]
    kept_rows_before = torch.cumsum(keep_t, 1) - keep_t.long()  # kept time rows above each row
    kept_cols_before = torch.cumsum(keep_f, 1) - keep_f.long()  # kept frequency columns left of each
    keep = keep_t[:, :, None] & keep_f[:, None, :]  # [B, T, F]
    kept_before = kept_rows_before[:, :, None] * len_keep_f + torch.where(
        keep_t[:, :, None], kept_cols_before[:, None, :], 0
    )
    token = torch.arange(T * F, device=noise_t.device).view(1, T, F)
    ids_restore = torch.where(keep, kept_before, len_keep_t * len_keep_f + token - kept_before).flatten(1)
    ids_keep = (rows[:, :, None] * F + cols[:, None, :]).flatten(1)
    mask = (~keep).flatten(1).to(torch.get_default_dtype())
    return ids_keep, ids_restore, mask


def as_real(value) -> float | None:
    """``value`` as a Python float (a numpy scalar and a 0-d floating tensor count as their value),
    or None where it is no real number (a bool, a string, None)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_probability(value: float, name: str) -> None:
    """``value`` must be a real number in [0, 1] (a bool or a string is a TypeError naming it); a
    0-d floating tensor counts as its value."""
    real = as_real(value)
    if real is None:
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not (math.isfinite(real) and 0.0 <= real <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {real}")


def num_kept(length: int, ratio: float, name: str) -> int:
    """``int(length * (1 - ratio))`` as the official code counts kept tokens, for a ratio in [0, 1]."""
    check_probability(ratio, name)
    return int(length * (1 - ratio))


def draw_noise(batch: int, length: int, device: torch.device, noise: torch.Tensor | None, name: str = "noise"):
    """``noise`` if given (checked), else a fresh ``torch.rand`` draw like the official code's."""
    if noise is None:
        return torch.rand(batch, length, device=device)
    _check_noise(noise, (batch, length), name)
    return noise.to(device)


def draw_noise_2d(batch: int, grid: tuple[int, int], device: torch.device, noise=None):
    """``(noise_t [B, T], noise_f [B, F])``: the given pair (checked), else time noise then frequency
    noise drawn in that order, as the official 2-D masking draws them."""
    if noise is None:
        noise = (None, None)
    elif not isinstance(noise, (tuple, list)) or len(noise) != 2:
        got = f"tensor of shape {list(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise TypeError(f"2-D masking takes noise=(noise_t [B, T], noise_f [B, F]), got a {got}")
    noise_t = draw_noise(batch, grid[0], device, noise[0], "noise[0] (time)")
    return noise_t, draw_noise(batch, grid[1], device, noise[1], "noise[1] (frequency)")
