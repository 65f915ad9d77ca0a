"""Shifted-window attention with the official AudioMAE / Swin-v2 math: roll, partition, attend, reverse.

This is what ``kernels.window_attention`` must equal, and the decoder's ``"reference"`` backend.
It follows AudioMAE's ``timm_patch/swin_transformer.py`` step by step: the token grid is rolled
by ``-shift``, cut into windows, each window attends within itself (scaled cosine attention with
``tau``, else dot-product attention scaled by ``head_dim ** -0.5``; plus ``bias``; plus the shift
mask), and the windows are put back and rolled by ``+shift``. The qkv projection is per token, so
rolling its output is the same as projecting the rolled input, as the official block does.
It runs in whatever dtype it is given, float64 included.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .._dispatch import check_same_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def plain_int(value):
    """A NumPy integer (or any other ``numbers.Integral`` but bool) as a Python int, as the other
    token ops take them; anything else stays as given for the check to refuse."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


def as_pairs(*pairs):
    """``grid``, ``window`` and ``shift`` as tuples of ints where they are sequences (hashable: the
    kernel caches launch plans on them); anything else stays as given for the check to refuse."""
    return tuple(tuple(plain_int(v) for v in p) if isinstance(p, (tuple, list)) else p for p in pairs)


def check_window_attention_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value) -> tuple[int, int]:
    """Raise ValueError/TypeError on anything the op does not define; return (head_dim, window_area)."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, L, 3*C], got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    for name, pair in (("grid", grid), ("window", window), ("shift", shift)):
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise TypeError(f"{name} must be two ints, got {pair!r}")
    (T, F), (wt, wf), (st, sf) = grid, window, shift
    if wt < 1 or wf < 1 or wt * wf > 256:
        raise ValueError(f"window must have positive sides and at most 256 tokens, got {tuple(window)}")
    if T < 1 or F < 1 or T % wt or F % wf:
        raise ValueError(f"grid {tuple(grid)} must have sides that are positive multiples of window {tuple(window)}")
    if not (0 <= st < wt and 0 <= sf < wf):
        raise ValueError(f"shift {tuple(shift)} must lie in [0, window) on each axis, window is {tuple(window)}")
    B, L, C3 = qkv.shape
    if L != T * F:
        raise ValueError(f"qkv has {L} tokens but grid {tuple(grid)} has {T * F}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool):
        # True == 1 would also share cached launch plans with num_heads=1 (lru_cache keys)
        raise TypeError(f"num_heads must be an int, got {num_heads!r}")
    if num_heads < 1 or C3 % (3 * num_heads):
        raise ValueError(f"qkv's last axis ({C3}) must be 3 * num_heads * head_dim, num_heads is {num_heads!r}")
    head_dim = C3 // (3 * num_heads)
    area = wt * wf
    for name, t, shape in (("tau", tau, (num_heads,)), ("bias", bias, (num_heads, area, area))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    check_same_device(qkv=qkv, tau=tau, bias=bias)
    if not isinstance(mask_value, numbers.Real) or isinstance(mask_value, bool) or mask_value != mask_value:
        raise TypeError(f"mask_value must be a real number, got {mask_value!r}")
    try:
        float(mask_value)
    except OverflowError:
        raise ValueError(f"mask_value must fit a float, got {mask_value!r}") from None
    return head_dim, area


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """[B, T, F, C] -> [B * windows, wt, wf, C], windows row-major over (T / wt, F / wf)."""
    B, T, F, C = x.shape
    wt, wf = window
    x = x.view(B, T // wt, wt, F // wf, wf, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, wt, wf, C)


def window_reverse(windows: torch.Tensor, window: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """[B * windows, wt, wf, C] -> [B, T, F, C], the inverse of ``window_partition``."""
    (T, F), (wt, wf) = grid, window
    C = windows.shape[-1]
    x = windows.view(-1, T // wt, F // wf, wt, wf, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, T, F, C)


def shift_window_mask(grid, window, shift, mask_value: float = -100.0, *, device=None, dtype=torch.float32):
    """The official shift mask, [windows, N, N]: ``mask_value`` where two tokens of a window come
    from different regions of the rolled grid, else 0.

    Regions come from the official slices ``(0, -w), (-w, -s), (-s, None)`` on each axis, so an
    axis with shift 0 is one region (its middle slice is empty and its last covers the axis).
    """
    (T, F), (wt, wf), (st, sf) = grid, window, shift
    labels = torch.zeros(1, T, F, 1, device=device)
    region = 0
    for rows in (slice(0, -wt), slice(-wt, -st), slice(-st, None)):
        for cols in (slice(0, -wf), slice(-wf, -sf), slice(-sf, None)):
            labels[:, rows, cols, :] = region
            region += 1
    labels = window_partition(labels, window).view(-1, wt * wf)
    differ = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, mask_value)


def attend_windows(qkv_windows: torch.Tensor, *, num_heads: int, tau=None, bias=None, mask=None) -> torch.Tensor:
    """The official per-window attention: qkv_windows [B * windows, N, 3*C] -> [B * windows, N, C].

    ``mask`` [windows, N, N] is added to every batch element's windows (the shift mask), or None.
    """
    Bw, area, C3 = qkv_windows.shape
    head_dim = C3 // (3 * num_heads)
    q, k, v = qkv_windows.view(Bw, area, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if tau is not None:
        denom = torch.norm(q, dim=-1, keepdim=True) @ torch.norm(k, dim=-1, keepdim=True).transpose(-2, -1)
        attn = q @ k.transpose(-2, -1) / denom.clamp(min=1e-6)
        attn = attn / tau.to(attn.dtype).clamp(min=0.01).reshape(1, num_heads, 1, 1)
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.to(attn.dtype).unsqueeze(0)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(-1, num_windows, num_heads, area, area) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, area, area)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(Bw, area, C3 // 3)


def window_attention_reference(
    qkv: torch.Tensor,
    *,
    grid: Sequence[int],
    window: Sequence[int],
    shift: Sequence[int] = (0, 0),
    num_heads: int,
    tau: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask_value: float = -100.0,
) -> torch.Tensor:
    """qkv [B, L, 3*C] in token order on ``grid`` -> [B, L, C]; see the module docstring."""
    grid, window, shift = as_pairs(grid, window, shift)
    num_heads = plain_int(num_heads)
    _, area = check_window_attention_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value)
    mask_value = float(mask_value)
    B, L, C3 = qkv.shape
    x = qkv.reshape(B, *grid, C3)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = window_partition(x, window).view(-1, area, C3)
    mask = None
    if any(shift):
        mask = shift_window_mask(grid, window, shift, mask_value, device=qkv.device, dtype=qkv.dtype)
    out = attend_windows(x, num_heads=num_heads, tau=tau, bias=bias, mask=mask)
    out = window_reverse(out.view(-1, *window, C3 // 3), window, grid)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out.reshape(B, L, C3 // 3)
