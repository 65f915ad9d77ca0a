"""Column sums without a staging buffer: a Linear's bias gradient.

``column_sum(x, dtype=None)``
    ``x`` [..., C] (float16, bfloat16, float32 or float64; at least one dim). Returns [C]: ``x``
    summed over every leading dim, accumulated in float32 (float64 where ``x`` or ``dtype`` is
    float64, as ``torch.sum``) and rounded once to ``dtype`` (default ``x.dtype``; a float
    dtype). Equals ``x.sum(dims, dtype=dtype)`` up to the order of the additions; deterministic
    (a fixed order, no atomics).

Why: a Linear's bias gradient is the column sum of its output gradient, a tall [R, C] matrix
(R = batch x tokens). PyTorch's reduction splits each column over many blocks and stages their
partials in a buffer it allocates per call: on the H200 (2026-11-27) ``g.sum(0)`` of a
[32768, 512] bfloat16 ``g`` (32 MiB) allocated 128 MiB more, and that buffer set the peak of the
decoder block's backward (``benches.harness.peak_holders``: the autograd engine's ``_sum_to`` of
the projection's bias). Here each program adds a run of rows of BLOCK_C columns into float32
registers and writes one partial row; a second launch adds the partials in order. Scratch: the
partials, one row segment per program of the first launch (about PROGRAMS x 256 sums: 512 KiB
in float32, twice that in float64; a single row of C for the widest inputs).

Strides: any ``x`` viewable as [R, C] is read in place (a contiguous tensor, a row slice); others
are copied first (``reshape``). Widths up to 65535 x 256 columns (the launch grid's second
axis). CUDA tensors run the Triton kernels; CPU tensors ``kernels.reference`` unless
``TRITON_INTERPRET=1``. Registered as ``audiomae::column_sum`` (on a [R, C] tensor, with a fake
and a gradient: the incoming [C] gradient broadcast over ``x``'s shape) for tracers; eager calls
that need no gradient reach the launcher directly (``kernels._dispatch.needs_custom_op``).
Forward-mode AD (dual tensors, ``torch.func.jvp``/``jacfwd``) and ``torch.func``'s ``grad``/``vjp``
take ``torch.sum`` (the reference), which serves them; ``vmap`` runs the op.

``linear(x, weight, bias=None)``
    ``F.linear(x, weight, bias)`` whose bias gradient is ``column_sum`` of the output's gradient
    (rounded to the output's dtype, then cast to the bias's, as autocast's cast back does): the
    same values as ``F.linear``, forward and backward, up to the order of that sum. The forward is
    ``F.linear`` itself on ``x`` as [R, C_in] (the bias added in the matmul's epilogue, detached),
    whose [R, C_out] output an autograd.Function then claims as its own (``mark_dirty``: no copy,
    no view) so that the bias gets its gradient from it; the result is that output viewed as
    ``[..., C_out]``, which in-place ops may modify as they may ``F.linear``'s. Plain
    ``F.linear`` where nothing is gained or nothing may run eagerly: no bias or none that needs a
    gradient or a bias that is not 1-D, dtypes other than float16, bfloat16, float32 and float64,
    CPU tensors without the interpreter, forward-mode AD, and under tracers (``torch.compile``
    makes its own reductions); arguments that are not tensors get F.linear's own errors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import (_batched, autodiff_transforms_active, has_forward_tangent, needs_custom_op,
                              on_tensors_device, require_triton, use_triton)
from kernels.gather_tokens import FLOAT_DTYPES, TL_DTYPES, accumulate_dtype, cdiv, row_tile
from kernels.reference import column_sum as reference

# Programs of the first pass: about four per SM of an H100 or H200 (132 SMs), so that every SM
# streams rows; each writes one partial row, so more programs cost more partials to add.
PROGRAMS = 512
MAX_COLUMN_BLOCKS = 65535  # the launch grid's second axis
# The partials loop's pipeline depth (see _column_partials_kernel): at 3 two tiles' loads are in
# flight while one is added; a bf16 tile of 16 x 256 is 8 KiB, so 16 KiB of shared memory and 56
# registers a thread on sm_90 (benches/sm90_compile.py). Untimed against 2 and 4 as of 2026-11-28.
STAGES = 3


@triton.jit
def _column_partials_kernel(x_ptr, partial_ptr, R, C, rows_per_split, tiles_per_split, stride_r, stride_c,
                            ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            STAGES: tl.constexpr):
    # One program per (run of rows_per_split rows, BLOCK_C columns): its rows added in order.
    # A counted loop (tl.range), not a while loop: Triton pipelines only counted loops, so each
    # tile's load is issued STAGES - 1 tiles ahead (cp.async into shared memory on sm_90); a while
    # loop waited out the memory latency once a tile, which left the H200's bandwidth at 25 to 42 %
    # (bench_column_sum, 2026-11-28). A run-time trip count needs numpy < 2.4 under Triton 3.6's
    # interpreter (the CPU test path), which setup.py pins (gelu_matmul's loop needs it too).
    split = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], ACC_DTYPE)
    start = split.to(tl.int64) * rows_per_split
    for tile in tl.range(0, tiles_per_split, num_stages=STAGES):
        r = start + tile * BLOCK_R + tl.arange(0, BLOCK_R)  # within this run: rows_per_split is whole tiles
        mask = (r < R)[:, None] & col_ok[None, :]
        acc += tl.load(x_ptr + r[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(partial_ptr + split.to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _column_finish_kernel(partial_ptr, out_ptr, splits, C, ACC_DTYPE: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per BLOCK_C columns: the partial rows added in order, rounded once.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_S, BLOCK_C], ACC_DTYPE)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(partial_ptr + s.to(tl.int64)[:, None] * C + cols[None, :],
                       mask=(s < splits)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def launch_plan(rows: int, channels: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, splits, rows per split): the streaming tile of ``row_tile`` (up to 256
    columns, a bf16 row segment of 512 contiguous bytes), and as many row runs as give about
    PROGRAMS programs, each run a whole number of tiles."""
    block_r, block_c = row_tile(max(channels, 1))
    tiles = cdiv(rows, block_r)
    splits = max(1, min(tiles, PROGRAMS // cdiv(channels, block_c)))
    per_split = cdiv(tiles, splits) * block_r
    return block_r, block_c, cdiv(rows, per_split), per_split


@on_tensors_device
def _column_sum_launch(x2: torch.Tensor, dtype: torch.dtype, stages: int = STAGES) -> torch.Tensor:
    """``column_sum`` of a [R, C] view, by the two Triton launches; ``stages``: the partials loop's
    pipeline depth (``STAGES``; the benchmark times others). Every depth gives the same bits."""
    R, C = x2.shape
    acc = accumulate_dtype(torch.promote_types(x2.dtype, dtype))  # float64 when either is
    if acc == torch.float64 and dtype.itemsize == 2:
        # Float64 sums rounded to 16 bits by torch: Triton's interpreter cannot convert float64 to
        # 16 bits (it returned garbage); rare (float64 rows, a 16-bit sum), so one more tiny op.
        return _column_sum_launch(x2, torch.float64, stages).to(dtype)
    out = torch.empty(C, dtype=dtype, device=x2.device)
    if C == 0:
        return out
    if R == 0:
        return out.zero_()
    block_r, block_c, splits, per_split = launch_plan(R, C)
    partials = torch.empty((splits, C), dtype=acc, device=x2.device)
    _column_partials_kernel[(splits, cdiv(C, block_c))](
        x2, partials, R, C, per_split, per_split // block_r, *x2.stride(),
        ACC_DTYPE=TL_DTYPES[acc], BLOCK_R=block_r, BLOCK_C=block_c, STAGES=stages, num_warps=4)
    finish_c = min(128, block_c)
    _column_finish_kernel[(cdiv(C, finish_c),)](
        partials, out, splits, C, ACC_DTYPE=TL_DTYPES[acc], BLOCK_S=32, BLOCK_C=finish_c, num_warps=4)
    return out


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"audiomae::column_sum takes a [R, C] tensor, got shape {tuple(x.shape)}")


@torch.library.custom_op("audiomae::column_sum", mutates_args=())
def _column_sum_op(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_rows(x)
    require_triton("column_sum", x)
    return _column_sum_launch(x, dtype)


@_column_sum_op.register_fake
def _(x, dtype):
    _check_rows(x)
    return x.new_empty((x.shape[1],), dtype=dtype)


def _op_setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.shape, ctx.x_dtype = x.shape, x.dtype


def _op_backward(ctx, grad):
    return grad.to(ctx.x_dtype).expand(ctx.shape), None


_column_sum_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [R, C]: a view where its strides allow one, else a contiguous copy (``reshape``,
    which tracers follow, where a try of ``view`` would not trace)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def column_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[C]: ``x`` [..., C] summed over every leading dim (see the module docstring)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (its last holds the columns), got a 0-dim tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES):
        raise TypeError(f"dtype must be None or one of float16, bfloat16, float32, float64, got {dtype!r}")
    if cdiv(x.shape[-1], 256) > MAX_COLUMN_BLOCKS:
        raise ValueError(f"column_sum takes at most {MAX_COLUMN_BLOCKS * 256} columns, got {x.shape[-1]}")
    dtype = dtype or x.dtype
    # Forward-mode AD (dual tensors, torch.func.jvp/jacfwd) and torch.func's grad/vjp take torch's
    # own sum, which serves them: the op's gradient is a reverse-mode rule and a launcher would
    # drop a tangent. vmap stays on the op.
    if not use_triton(x) or has_forward_tangent(x) or autodiff_transforms_active():
        return reference.column_sum(x, dtype)
    x2 = _as_rows(x)
    if needs_custom_op() or (x.requires_grad and torch.is_grad_enabled()):
        return torch.ops.audiomae.column_sum(x2, dtype)
    return _column_sum_launch(x2, dtype)


class _BiasGradient(torch.autograd.Function):
    """Claims a Linear's [R, C_out] output ``y`` (made with the bias detached) as this Function's
    own and gives ``bias`` its gradient: ``column_sum`` of ``y``'s, in ``y``'s dtype, cast to
    ``bias``'s. ``mark_dirty`` rather than a view: the output stays ``y`` itself, so it still owns
    its memory (``window_attention(overwrite_qkv=True)`` may write the gradient over it) and in-place
    ops on it stay legal; nothing saved ``y`` (a matmul keeps its inputs, not its output)."""

    @staticmethod
    def forward(ctx, y, bias):
        ctx.bias_dtype = bias.dtype
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() or _batched(grad):  # create_graph=True or vmap: torch's own sum
            grad_bias = grad.sum(0)
        else:
            grad_bias = column_sum(grad)
        return grad, grad_bias.to(ctx.bias_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the bias gradient by ``column_sum`` (see the module docstring)."""
    # Anything but tensors, a 0-dim x or a bias that is not 1-D (F.linear also takes [1, C_out] and
    # 0-dim biases) goes to F.linear, which gives those their gradients or its own errors.
    if (not all(isinstance(t, torch.Tensor) for t in (x, weight, bias)) or x.dim() == 0 or bias.dim() != 1
            or not (bias.requires_grad and torch.is_grad_enabled()) or not use_triton(x)
            or needs_custom_op() or x.dtype not in FLOAT_DTYPES or bias.dtype not in FLOAT_DTYPES
            or has_forward_tangent(x, weight, bias)):  # forward-mode AD: F.linear's own rule
        return F.linear(x, weight, bias)
    # [R, C_in] so that the matmul's output is a tensor of its own, not a view (F.linear views a
    # 3-D input's product), which the Function can claim without autograd's copy-on-view machinery.
    rows = F.linear(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, bias.detach())
    return _BiasGradient.apply(rows, bias).view(*x.shape[:-1], rows.shape[-1])
