"""GELU's backward in one pass, with the GELU it recomputes and the bias gradient before it.

``gelu_mlp``'s backward (fc1's output ``hidden`` recomputed or kept, ``grad_act`` the gradient
reaching GELU's output) needs three things of the hidden width: GELU's output again (fc2's weight
gradient), the gradient of ``hidden`` and its column sums (fc1's bias gradient). Eagerly that is
three passes over the widest tensors of the MLP (``F.gelu``, ``gelu_backward``, ``sum(0)``: in the
AudioMAE decoder at batch 64, 134 MB each in bfloat16, 16 blocks a step). ``gelu_and_grad`` reads
``hidden`` and ``grad_act`` once and writes GELU's output and the gradient, the latter over
``grad_act`` (a buffer the caller owns), plus one fp32 partial column sum per row block.

Arithmetic as PyTorch's: fp32 inside whatever the storage dtype, exact GELU through erf or the
tanh approximation (tanh written with exp), results rounded to the input dtype, the bias
gradient summed over the rounded gradient in fp32 and rounded once. So ``act`` and the gradient
equal ``F.gelu`` and ``aten.gelu_backward`` up to the last bit of erf, exp and tanh, and the bias
gradient equals ``grad.sum(0)`` up to the order of the fp32 sum.

CUDA tensors take the Triton kernel, CPU tensors the torch reference unless ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import on_tensors_device, use_triton

_SQRT_HALF = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TANH_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu_and_slope(x, TANH: tl.constexpr):
    """GELU(x) and its derivative in fp32, by PyTorch's formulas (tanh written with exp)."""
    if TANH:
        inner = _TANH_SCALE * (x + _TANH_CUBIC * x * x * x)
        # tanh and 1 - tanh^2 from e = exp(-2|inner|), without the cancellation of 1 - t * t
        e = tl.exp(-2.0 * tl.abs(inner))
        t = tl.where(inner < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
        sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
        act = 0.5 * x * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * x * sech2 * _TANH_SCALE * (1.0 + 3.0 * _TANH_CUBIC * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
        act = x * cdf
        slope = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return act, slope


@triton.jit
def _gelu_grad_tile(hidden_ptr, grad_ptr, act_ptr, r, c, col_ok, rows, cols, TANH: tl.constexpr):
    """One tile of rows ``r`` and columns ``c``: GELU(hidden) stored to act, the gradient of hidden
    stored over grad (each element read here by this program only); returns that gradient."""
    mask = (r < rows)[:, None] & col_ok[None, :]
    at = r.to(tl.int64)[:, None] * cols + c[None, :]
    x = tl.load(hidden_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
    act, slope = _gelu_and_slope(x, TANH)
    dx = (dy * slope).to(grad_ptr.dtype.element_ty)
    tl.store(act_ptr + at, act.to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_ptr + at, dx, mask=mask)
    return dx


@triton.jit
def _gelu_grad_kernel(hidden_ptr, grad_ptr, act_ptr, partial_ptr, rows, cols,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, BIAS: tl.constexpr):
    pid_m = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = c < cols
    dx = _gelu_grad_tile(hidden_ptr, grad_ptr, act_ptr, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), c, col_ok, rows,
                         cols, TANH)
    if BIAS:
        tl.store(partial_ptr + pid_m.to(tl.int64) * cols + c, tl.sum(dx.to(tl.float32), axis=0), mask=col_ok)


@triton.jit
def _gelu_grad_loop_kernel(hidden_ptr, grad_ptr, act_ptr, partial_ptr, rows, cols, tiles_per_program,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, BIAS: tl.constexpr,
                           STAGES: tl.constexpr):
    # _gelu_grad_kernel over a run of tiles_per_program row tiles a program: a counted loop that
    # Triton pipelines (the next tiles' loads in flight while one is computed and stored) and one
    # partial row a program, the run's rows added elementwise in fp32, then across the tile.
    pid_m = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = c < cols
    bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid_m * tiles_per_program
    for i in tl.range(0, tiles_per_program, num_stages=STAGES):
        dx = _gelu_grad_tile(hidden_ptr, grad_ptr, act_ptr, (first + i) * BLOCK_M + tl.arange(0, BLOCK_M), c,
                             col_ok, rows, cols, TANH)
        if BIAS:
            bias += dx.to(tl.float32)
    if BIAS:
        tl.store(partial_ptr + pid_m.to(tl.int64) * cols + c, tl.sum(bias, axis=0), mask=col_ok)


def gelu_and_grad_reference(hidden: torch.Tensor, grad_act: torch.Tensor, approximate: str, bias_grad: bool):
    """(GELU(hidden), the gradient of hidden, its column sums or None) by PyTorch's own ops."""
    act = F.gelu(hidden, approximate=approximate)
    grad = torch.ops.aten.gelu_backward(grad_act, hidden, approximate=approximate)
    return act, grad, grad.sum(0) if bias_grad else None


@on_tensors_device
def gelu_and_grad(hidden: torch.Tensor, grad_act: torch.Tensor, approximate: str, bias_grad: bool,
                  tiles_per_program: int = 1):
    """``hidden`` and ``grad_act`` [M, H] of one floating dtype and device -> (GELU(hidden) [M, H],
    the gradient of ``hidden`` [M, H] written over ``grad_act`` on the kernel path, its column sums
    [H] or None). Internal to ``gelu_mlp``'s backward: ``grad_act`` must be the caller's own.
    ``tiles_per_program`` > 1 takes ``_gelu_grad_loop_kernel`` with that many row tiles a program
    (the same act and gradient bits; the column sums in another order): a candidate that
    ``benches/bench_gelu_grad.py`` times against the default of one tile a program."""
    if hidden.shape != grad_act.shape or hidden.dim() != 2:
        raise ValueError(f"hidden and grad_act must be [M, H] of one shape, got {tuple(hidden.shape)} and "
                         f"{tuple(grad_act.shape)}")
    if hidden.dtype != grad_act.dtype or hidden.device != grad_act.device:
        raise TypeError(f"hidden and grad_act must share dtype and device, got {hidden.dtype} on {hidden.device} "
                        f"and {grad_act.dtype} on {grad_act.device}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if isinstance(tiles_per_program, bool) or not isinstance(tiles_per_program, int) or tiles_per_program < 1:
        raise ValueError(f"tiles_per_program must be an int >= 1, got {tiles_per_program!r}")
    if not use_triton(hidden) or hidden.dtype == torch.float64 or hidden.numel() == 0:
        return gelu_and_grad_reference(hidden, grad_act, approximate, bias_grad)
    hidden, grad = hidden.contiguous(), grad_act.contiguous()
    rows, cols = hidden.shape
    act = torch.empty_like(hidden)
    # 32 x 128 tiles, 16 elements a thread over 8 warps (64-row tiles took 183 to 255 registers on
    # sm_90 and spilled with tanh); a 32-row fp32 partial is 1/16 of a 16-bit tensor's bytes
    block_m, block_n = 32, min(128, triton.next_power_of_2(cols))
    grid = (triton.cdiv(triton.cdiv(rows, block_m), tiles_per_program), triton.cdiv(cols, block_n))
    partial = torch.empty(grid[0], cols, device=hidden.device, dtype=torch.float32) if bias_grad else None
    if tiles_per_program > 1:
        _gelu_grad_loop_kernel[grid](hidden, grad, act, partial, rows, cols, tiles_per_program, BLOCK_M=block_m,
                                     BLOCK_N=block_n, TANH=approximate == "tanh", BIAS=bias_grad, STAGES=3,
                                     num_warps=8)
    else:
        _gelu_grad_kernel[grid](hidden, grad, act, partial, rows, cols, BLOCK_M=block_m, BLOCK_N=block_n,
                                TANH=approximate == "tanh", BIAS=bias_grad, num_warps=8)
    return act, grad, partial.sum(0).to(hidden.dtype) if bias_grad else None
