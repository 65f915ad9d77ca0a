"""The MLP's GELU inside the matmuls around it: fc1 with GELU, and GELU's backward with its inputs.

The step ledger (``benches/step_ledger.py``) puts the MLP's elementwise passes among the largest
items of the AudioMAE pretraining step: at batch 64 the decoder's hidden width is 134 MB a block
in bfloat16, and each pass over it costs 45 us on an H100 at the copy bandwidth. Done with
cuBLAS, the MLP writes fc1's output, reads it for GELU, writes GELU's output (forward), and in
the backward writes fc1's output again (recomputed), writes the gradient reaching GELU, and reads
both for GELU's backward (``kernels.gelu_grad``). Here:

``linear_gelu(x, weight, bias, approximate)``
    ``gelu(x @ weight.T + bias)`` in one matmul whose epilogue applies GELU: fc1's output never
    reaches memory (the MLP's forward when the backward recomputes fc1).
``linear_gelu_backward(x, weight, bias, grad, weight2, approximate, bias_grad, hidden=None)``
    For each tile of the hidden width, both fc1's output ``x @ weight.T + bias`` (or ``hidden``
    when it was kept) and the gradient reaching GELU's output ``grad @ weight2`` (two matmuls
    into two accumulators), then GELU and GELU's backward in the epilogue: writes GELU's output
    (for fc2's weight gradient), the gradient of fc1's output, and fp32 column partials of it
    (fc1's bias gradient): ``(act, grad_hidden, grad_bias or None)``.

Arithmetic: fp32 accumulators; fc1's output (with its bias) and the gradient reaching GELU are
rounded to the storage dtype where cuBLAS would store them, then GELU and its backward follow
``kernels.gelu_grad`` (PyTorch's formulas in fp32, results rounded once). So results equal the
cuBLAS path's up to the order of the matmuls' sums (a 16-bit result may differ by its last bit).
float32 dots are IEEE (as torch's default matmul, not TF32 even where
``torch.set_float32_matmul_precision`` allows it); float64 and CPU tensors (without
``TRITON_INTERPRET=1``) take the references, PyTorch's own ops.

Opt-in (``gelu_mlp(..., fused_matmul=True)``, ``Mlp.fused_matmul``): these replace cuBLAS
matmuls, and only a GPU can say whether the passes they save outweigh what the matmuls may lose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import interpreting, on_tensors_device, use_triton
from .gelu_grad import _gelu_and_slope, gelu_and_grad_reference


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), GROUP_M row tiles at a time for L2 reuse."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, rm, rn, K, stride_am, stride_ak, stride_bk, stride_bn,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc += A[rm, :] @ B[:, rn]`` over K in BLOCK_K steps (rm, rn already wrapped into range)."""
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am  # int64: M * K may pass 2**31
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + rk
        a = tl.load(a_rows + kk.to(tl.int64)[None, :] * stride_ak, mask=kk[None, :] < K, other=0.0)  # column-major too
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=kk[:, None] < K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_gelu_kernel(
    x_ptr, w_ptr, b_ptr, act_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge read the matrix's own (wrapped) rows: no masks in the K loop;
    # the stores below skip them.
    acc = _accumulate(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), x_ptr, w_ptr, rows % M, cols % N, K,
                      stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols % N).to(tl.float32)[None, :]
    hidden = acc.to(act_ptr.dtype.element_ty).to(tl.float32)  # where cuBLAS would store fc1's output
    act, _ = _gelu_and_slope(hidden, TANH)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_gelu_backward_kernel(
    x_ptr, w_ptr, b_ptr, hidden_ptr, g_ptr, w2_ptr, act_ptr, grad_ptr, partial_ptr, M, N, K1, K2,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_gm, stride_gk, stride_w2k, stride_w2n,
    RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    at = rows.to(tl.int64)[:, None] * N + cols[None, :]
    dtype = act_ptr.dtype.element_ty
    if RECOMPUTE:  # fc1's output again, rounded where cuBLAS would store it
        h = _accumulate(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), x_ptr, w_ptr, rows % M, cols % N, K1,
                        stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, DOT_PRECISION)
        if HAS_BIAS:
            h += tl.load(b_ptr + cols % N).to(tl.float32)[None, :]
        h = h.to(dtype).to(tl.float32)
    else:
        h = tl.load(hidden_ptr + at, mask=ok, other=0.0).to(tl.float32)
    # The gradient reaching GELU's output, grad @ fc2's weight, rounded as cuBLAS would store it.
    dy = _accumulate(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), g_ptr, w2_ptr, rows % M, cols % N, K2,
                     stride_gm, stride_gk, stride_w2k, stride_w2n, BLOCK_K, DOT_PRECISION)
    dy = dy.to(dtype).to(tl.float32)
    act, slope = _gelu_and_slope(h, TANH)
    dx = (dy * slope).to(dtype)
    tl.store(act_ptr + at, act.to(dtype), mask=ok)
    tl.store(grad_ptr + at, dx, mask=ok)
    if BIAS_GRAD:  # rows past the edge hold the wrapped rows' values: leave them out of the sum
        partial = tl.sum(tl.where(ok, dx.to(tl.float32), 0.0), axis=0)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, partial, mask=cols < N)


# ----------------------------------------------------------------------------------------------
# Launchers and references
# ----------------------------------------------------------------------------------------------
# Tiles (not yet timed on a GPU): for 16-bit inputs 128 x 128 x 64 and 8 warps forward (the usual
# shape for wgmma on an H100), and half as wide backward, whose two accumulators and GELU epilogue
# spilled 440 to 2000 bytes a thread at 128 x 128 on sm_90 (``python -m benches.sm90_compile``);
# IEEE float32 dots run on the FMA units and take smaller tiles.
CONFIGS = {
    ("forward", True): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    ("backward", True): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    ("forward", False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
    ("backward", False): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
}


def _config(dtype: torch.dtype, kernel: str) -> dict:
    return CONFIGS[kernel, dtype != torch.float32]


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only names the default for 16-bit inputs


def _check_like_x(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} must share x's dtype and device ({x.dtype} on {x.device}), got {t.dtype} on "
                            f"{t.device}")


def _check_no_grad(name: str, **tensors: torch.Tensor | None) -> None:
    """These are the MLP's building blocks, not differentiable ops: ``kernels.gelu_mlp`` is the op
    with a backward. A kernel's result carries no graph, so a caller that wants one gets an error
    rather than a silently detached result."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values()):
        raise RuntimeError(f"{name} has no autograd (it is kernels.gelu_mlp's building block): call it under "
                           "torch.no_grad() or on tensors that do not require grad, or use kernels.gelu_mlp")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_like_x(x, weight=weight, bias=bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def _runs_kernel(x: torch.Tensor) -> bool:
    runs = use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.numel() > 0
    if runs and x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreting():
        # Triton 3.6's interpreter multiplies bfloat16 tl.dot operands wrongly (errors of 1e11
        # seen): an error rather than silently wrong numbers; the GPU computes it right.
        raise NotImplementedError("gelu_matmul (gelu_mlp's fused_matmul=True): Triton's interpreter computes "
                                  "bfloat16 tl.dot wrongly; on the CPU use float32 or float16, or fused_matmul=False")
    return runs


def linear_gelu_reference(x, weight, bias, approximate: str) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


@on_tensors_device
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` for ``x`` [M, K], ``weight`` [N, K], ``bias`` [N] or None (one
    dtype and device) -> [M, N]. Forward only (``kernels.gelu_mlp`` differentiates). See the module doc."""
    _check_no_grad("linear_gelu", x=x, weight=weight, bias=bias)
    _check(x, weight, bias, approximate)
    if not _runs_kernel(x) or weight.shape[0] == 0:
        return linear_gelu_reference(x, weight, bias, approximate)
    M, K = x.shape
    N = weight.shape[0]
    act = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = _config(x.dtype, "forward")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _linear_gelu_kernel[grid](
        x, weight, bias.contiguous() if bias is not None else weight, act, M, N, K, *x.stride(), *weight.stride(),
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    return act


def linear_gelu_backward_reference(x, weight, bias, grad, weight2, approximate: str, bias_grad: bool, hidden=None):
    hidden = F.linear(x, weight, bias) if hidden is None else hidden
    return gelu_and_grad_reference(hidden, grad @ weight2, approximate, bias_grad)


@on_tensors_device
def linear_gelu_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
                         weight2: torch.Tensor, approximate: str, bias_grad: bool, hidden: torch.Tensor | None = None):
    """(GELU's output, the gradient of fc1's output, fc1's bias gradient or None) of an MLP
    ``fc2(gelu(fc1(x)))`` from fc1's input ``x`` [M, K] (or its output ``hidden`` [M, N] when
    kept), fc1's ``weight`` [N, K] and ``bias``, the gradient of fc2's output ``grad`` [M, J] and
    fc2's ``weight2`` [J, N]. Not itself differentiable. See the module doc."""
    _check_no_grad("linear_gelu_backward", x=x, weight=weight, bias=bias, grad=grad, weight2=weight2, hidden=hidden)
    _check(x, weight, bias, approximate)
    M, N = x.shape[0], weight.shape[0]
    J = weight2.shape[0] if weight2.dim() == 2 else -1
    if grad.shape != (M, J) or weight2.shape != (J, N):
        raise ValueError(f"grad must be [{M}, J] and weight2 [J, {N}], got {tuple(grad.shape)} and "
                         f"{tuple(weight2.shape)}")
    if hidden is not None and hidden.shape != (M, N):
        raise ValueError(f"hidden must be [{M}, {N}], got {tuple(hidden.shape)}")
    _check_like_x(x, grad=grad, weight2=weight2, hidden=hidden)
    if not _runs_kernel(x) or N == 0:
        return linear_gelu_backward_reference(x, weight, bias, grad, weight2, approximate, bias_grad, hidden)
    cfg = _config(x.dtype, "backward")
    act = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grad_hidden = torch.empty_like(act)
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    partial = torch.empty((tiles_m, N), dtype=torch.float32, device=x.device) if bias_grad else None
    hidden_arg = hidden.contiguous() if hidden is not None else act
    _linear_gelu_backward_kernel[(tiles_m * triton.cdiv(N, cfg["BLOCK_N"]),)](
        x, weight, bias.contiguous() if bias is not None else weight, hidden_arg, grad, weight2, act, grad_hidden,
        partial if partial is not None else act, M, N, x.shape[1], J,
        *x.stride(), *weight.stride(), *grad.stride(), *weight2.stride(),
        RECOMPUTE=hidden is None, HAS_BIAS=bias is not None, TANH=approximate == "tanh", BIAS_GRAD=bias_grad,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    return act, grad_hidden, partial.sum(0).to(x.dtype) if bias_grad else None
