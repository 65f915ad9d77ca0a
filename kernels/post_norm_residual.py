"""Post-norm residual: ``x + layer_norm(branch)`` in one pass, forward and backward.

The decoder's Swin-V2 blocks close each branch with ``x = x + norm(branch)``. Eagerly that is a
layer norm that writes its output and an add that reads it back; under CUDA autocast the norm
first casts the bfloat16 branch to a float32 copy, which it also keeps for the backward. Here one
kernel reads ``x`` and ``branch`` and writes the sum, and the backward keeps the branch in its
own dtype (half the bytes of that copy) and two numbers per row (mean and 1/std).

``post_norm_residual(x, branch, weight=None, bias=None, eps=1e-5, *, copy_dtype=None)``
    ``x``, ``branch`` [..., C] of one shape; ``weight``, ``bias`` [C] or None. Returns
    ``x + F.layer_norm(branch, (C,), weight, bias, eps)`` in the dtypes eager torch gives: the
    norm's output is float32 under CUDA autocast for a float16/bfloat16 branch (autocast runs
    layer_norm in float32), the branch's dtype otherwise (a float32 ``weight``/``bias`` may serve
    a float16/bfloat16 branch, as in torch); it is rounded to that dtype before the add, and the
    sum takes the promoted dtype of ``x`` and the norm. C from 1 to 16384 (float64 rows wider
    than 8192 spill registers on the H100: exact, slower); any leading shape and strides (inputs
    that cannot be viewed as [rows, C], or whose channels lie 2**31 elements apart, are copied first).
    With ``copy_dtype``, returns ``(out, out.to(copy_dtype))``, the copy written by the same pass.

Why the copy: under autocast the decoder's residual stream is float32 and each of its values
feeds a Linear, which casts it to bfloat16 (a pass that reads the float32 stream again), and in
the backward autograd casts that Linear's input gradient back to float32 and adds it to the
residual's (two more passes). With the copy the block hands the Linear the kernel's bfloat16
copy (the same values autocast would make) and the backward adds the two gradients in its own
pass: the same numbers, about 200 MB less traffic per norm at the decoder's size.

Statistics are float32 (float64 for a float64 branch), of the row shifted by its first element
(held in registers: two passes, the mean, then the biased variance about it), so a row with a
large offset and little or no spread keeps its exact zeros. Eager references run on CPU tensors
unless ``TRITON_INTERPRET=1``.

Gradients: ``x`` gets ``grad_out`` cast to its dtype (no kernel; with a copy's gradient, the sum
the kernel writes), ``branch`` the layer-norm
backward, ``weight`` and ``bias`` row sums of fixed-order per-program partials added by
``torch.sum`` (deterministic, no atomics). Double backward is not supported. Registered as
``audiomae::post_norm_residual`` (and its backward) for tracers; eager calls take an
autograd.Function over the same launchers (see ``kernels._dispatch.needs_custom_op``).
"""
import torch
import triton
import triton.language as tl

from kernels._dispatch import (check_same_device, first_order_only, needs_custom_op, on_tensors_device,
                              reject_autodiff_transforms, reject_forward_tangents, require_triton, use_triton)
from kernels.gather_tokens import FLOAT_DTYPES, REDUCING_PROGRAMS, cdiv, next_power_of_2
from kernels.reference import post_norm_residual as reference

MAX_CHANNELS = 16384
LOW_PRECISION = (torch.float16, torch.bfloat16)
TL_FLOATS = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _forward_kernel(
    x_ptr, branch_ptr, weight_ptr, bias_ptr, out_ptr, copy_ptr, mean_ptr, rstd_ptr,
    M, C, eps: tl.float64,  # compiled Triton would type a Python float fp32, and float64 rows need eps whole
    stride_xm, stride_xc, stride_bm, stride_bc, stride_w, stride_bias,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_COPY: tl.constexpr,
    STAT_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr, SUM_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per BLOCK_M whole rows: the statistics need the row, and C fits in registers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    v = tl.load(branch_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bc, mask=ok, other=0.0).to(STAT_DTYPE)
    # Statistics of the row shifted by its first element: a row with a large offset and a small
    # spread (or none) keeps its exact zeros, where a plain float32 sum / C would round the mean
    # and eps-scale the rounding into the output. ``mean`` is saved as the shifted mean.
    pivot = tl.load(branch_ptr + rows * stride_bm, mask=row_ok, other=0.0).to(STAT_DTYPE)
    shifted = tl.where(ok, v - pivot[:, None], 0.0)
    mean = tl.sum(shifted, axis=1) / C
    centred = tl.where(ok, shifted - mean[:, None], 0.0)
    rstd = (1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)).to(STAT_DTYPE)  # one value a row
    norm = centred * rstd[:, None]
    if HAS_WEIGHT:
        norm *= tl.load(weight_ptr + cols * stride_w, mask=col_ok, other=0.0).to(STAT_DTYPE)[None, :]
    if HAS_BIAS:
        norm += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(STAT_DTYPE)[None, :]
    # Eagerly the norm's output is a tensor of its own dtype before the add: round to it.
    norm = norm.to(NORM_DTYPE).to(SUM_DTYPE)
    res = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=ok, other=0.0).to(SUM_DTYPE)
    out = (res + norm).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out, mask=ok)
    if WRITE_COPY:  # out.to(copy dtype), rounded from out as torch rounds it
        tl.store(copy_ptr + rows[:, None] * C + cols[None, :], out.to(tl.float32).to(copy_ptr.dtype.element_ty),
                 mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(
    grad_ptr, grad_copy_ptr, branch_ptr, weight_ptr, mean_ptr, rstd_ptr,
    grad_x_ptr, grad_branch_ptr, weight_partial_ptr, bias_partial_ptr,
    M, C, tiles_per_program,
    stride_gm, stride_gc, stride_cm, stride_cc, stride_bm, stride_bc, stride_w,
    HAS_GRAD: tl.constexpr, HAS_COPY_GRAD: tl.constexpr, OUT_DTYPE: tl.constexpr, WRITE_X: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, WRITE_BRANCH: tl.constexpr, WRITE_WEIGHT: tl.constexpr, WRITE_BIAS: tl.constexpr,
    STAT_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per run of ``tiles_per_program`` tiles of BLOCK_M rows. Each program sums the
    # weight and bias gradients of its own rows into registers and writes one partial row each.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols * stride_w, mask=col_ok, other=0.0).to(STAT_DTYPE)
    weight_sum = tl.zeros([BLOCK_M, BLOCK_C], STAT_DTYPE)
    bias_sum = tl.zeros([BLOCK_M, BLOCK_C], STAT_DTYPE)
    tile = pid * tiles_per_program
    tile_end = tile + tiles_per_program
    while tile < tile_end:
        rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_COPY_GRAD:
            # The output's gradient is what autograd would add up for it: the copy's gradient
            # cast to the output's dtype, plus the output's own, one rounding in that dtype.
            g = tl.load(grad_copy_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cc, mask=ok, other=0.0)
            g = g.to(tl.float32).to(OUT_DTYPE).to(tl.float32)
            if HAS_GRAD:
                g += tl.load(grad_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gc, mask=ok,
                             other=0.0).to(tl.float32)
            g = g.to(OUT_DTYPE)
            if WRITE_X:
                tl.store(grad_x_ptr + rows[:, None] * C + cols[None, :], g.to(grad_x_ptr.dtype.element_ty), mask=ok)
        else:
            g = tl.load(grad_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gc, mask=ok, other=0.0)
        # The add's backward hands the norm its gradient in the norm's dtype.
        g = g.to(NORM_DTYPE).to(STAT_DTYPE)
        v = tl.load(branch_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bc, mask=ok, other=0.0).to(STAT_DTYPE)
        pivot = tl.load(branch_ptr + rows * stride_bm, mask=row_ok, other=0.0).to(STAT_DTYPE)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)  # of the row shifted by its pivot
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, ((v - pivot[:, None]) - mean[:, None]) * rstd[:, None], 0.0)
        if WRITE_BRANCH:
            if HAS_WEIGHT:
                wg = g * w[None, :]
            else:
                wg = g
            mean_wg = tl.sum(wg, axis=1) / C
            mean_wg_xhat = tl.sum(wg * xhat, axis=1) / C
            dx = (wg - mean_wg[:, None] - xhat * mean_wg_xhat[:, None]) * rstd[:, None]
            tl.store(grad_branch_ptr + rows[:, None] * C + cols[None, :], dx.to(grad_branch_ptr.dtype.element_ty), mask=ok)
        if WRITE_WEIGHT:
            weight_sum += g * xhat
        if WRITE_BIAS:
            bias_sum += g
        tile += 1
    if WRITE_WEIGHT:
        tl.store(weight_partial_ptr + pid.to(tl.int64) * C + cols, tl.sum(weight_sum, axis=0), mask=col_ok)
    if WRITE_BIAS:
        tl.store(bias_partial_ptr + pid.to(tl.int64) * C + cols, tl.sum(bias_sum, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _tile(channels: int, wide: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps): whole rows, about 4096 elements a tile; ``wide`` (float64
    statistics) doubles the warps so that the widest rows still fit in registers."""
    block_c = next_power_of_2(channels)
    block_m = max(1, min(32, 4096 // block_c))
    elements = block_m * block_c * (2 if wide else 1)
    return block_m, block_c, 4 if elements <= 2048 else 8 if elements <= 8192 else 16 if elements <= 16384 else 32


def _int32_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` [rows, C], copied if its channel offsets would overflow int32 (rows are int64 in the kernels)."""
    return t.contiguous() if t.stride(1) * t.shape[1] >= 2**31 else t


def _stride(param: torch.Tensor | None) -> int:
    return param.stride(0) if param is not None else 0


def stat_dtype(branch_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if branch_dtype == torch.float64 else torch.float32


@on_tensors_device
def _forward(x, branch, weight, bias, eps: float, norm_dtype: torch.dtype, copy_dtype: torch.dtype | None = None):
    """x, branch [M, C] -> (out [M, C], copy [M, C] (``out.to(copy_dtype)``; [0] when not asked
    for), mean [M], rstd [M])."""
    M, C = branch.shape
    stats = stat_dtype(branch.dtype)
    out_dtype = torch.promote_types(x.dtype, norm_dtype)
    out = torch.empty((M, C), dtype=out_dtype, device=x.device)
    # Float64 outputs are copied by torch: the interpreter cannot convert float64 to 16 bits.
    fused_copy = copy_dtype is not None and out_dtype != torch.float64
    copy = torch.empty((M, C) if fused_copy else (0,), dtype=copy_dtype or out_dtype, device=x.device)
    mean = torch.empty((M,), dtype=stats, device=x.device)
    rstd = torch.empty((M,), dtype=stats, device=x.device)
    if M > 0:
        block_m, block_c, warps = _tile(C, stats == torch.float64)
        _forward_kernel[(cdiv(M, block_m),)](
            x, branch, weight if weight is not None else branch, bias if bias is not None else branch, out,
            copy if fused_copy else out, mean, rstd,
            M, C, eps,
            *x.stride(), *branch.stride(), _stride(weight), _stride(bias),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, WRITE_COPY=fused_copy,
            STAT_DTYPE=TL_FLOATS[stats], NORM_DTYPE=TL_FLOATS[norm_dtype],
            SUM_DTYPE=TL_FLOATS[stat_dtype(out_dtype)],
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )
    if copy_dtype is not None and not fused_copy:
        copy = out.to(copy_dtype, copy=True)
    return out, copy, mean, rstd


def _backward(grad, grad_copy, branch, weight, mean, rstd, norm_dtype, out_dtype, x_dtype, need_branch, weight_dtype,
              bias_dtype):
    """Gradients of (x, branch, weight, bias), each None when not wanted (``x_dtype``,
    ``weight_dtype``, ``bias_dtype`` None; ``need_branch`` False). ``grad`` is the output's
    gradient and ``grad_copy`` the copy's, either None when it has none. Without a copy gradient x
    takes ``grad`` cast (no kernel); with one, the kernel adds the two as autograd would (the
    copy's cast to ``out_dtype``, one rounding in it) and writes the sum for x."""
    if grad_copy is not None and (out_dtype == torch.float64 or (grad is not None and grad.dtype != out_dtype)):
        # Float64 sums (the interpreter cannot convert them to 16 bits), and a gradient of another
        # dtype than the output's, are added by torch, as autograd would add them (into a new
        # tensor: an op's outputs may not alias its inputs).
        total = grad_copy.to(out_dtype, memory_format=torch.contiguous_format, copy=True)
        grad, grad_copy = (total if grad is None else grad.to(out_dtype) + total), None
    if grad_copy is None:
        grad_x = grad.to(x_dtype) if x_dtype is not None else None
        return (grad_x, *_norm_backward(grad, None, branch, weight, mean, rstd, norm_dtype, out_dtype, need_branch,
                                        weight_dtype, bias_dtype, None))
    M, C = branch.shape
    grad_x = torch.empty((M, C), dtype=x_dtype, device=branch.device) if x_dtype is not None else None
    return (grad_x, *_norm_backward(grad, grad_copy, branch, weight, mean, rstd, norm_dtype, out_dtype, need_branch,
                                    weight_dtype, bias_dtype, grad_x))


@on_tensors_device
def _norm_backward(grad, grad_copy, branch, weight, mean, rstd, norm_dtype, out_dtype, need_branch, weight_dtype,
                   bias_dtype, grad_x):
    """(grad_branch, grad_weight, grad_bias); with ``grad_copy`` the kernel also sums the incoming
    gradients and writes their sum into ``grad_x`` (when given)."""
    M, C = branch.shape
    device = branch.device
    stats = stat_dtype(branch.dtype)
    grad_branch = torch.empty((M, C), dtype=branch.dtype, device=device) if need_branch else None
    write_weight, write_bias = weight_dtype is not None, bias_dtype is not None
    if M == 0 or not (need_branch or write_weight or write_bias or grad_x is not None):
        zeros = lambda dtype: torch.zeros((C,), dtype=dtype, device=device) if dtype is not None else None  # noqa: E731
        return grad_branch, zeros(weight_dtype), zeros(bias_dtype)
    if grad is not None:
        grad = _int32_columns(grad)
        if grad.dtype == torch.float64 and norm_dtype != torch.float64:
            # The add's backward hands the norm a gradient of its own dtype; Triton's interpreter
            # cannot convert float64 to bfloat16, so do it here (the same rounding).
            grad = grad.to(norm_dtype)
    if grad_copy is not None:
        grad_copy = _int32_columns(grad_copy)
    block_m, block_c, warps = _tile(C, stats == torch.float64)
    tiles = cdiv(M, block_m)
    # Without weight or bias gradients every tile is its own program; with them, programs loop
    # over runs of tiles so that few partial rows are left to add up.
    per_program = cdiv(tiles, REDUCING_PROGRAMS) if (write_weight or write_bias) else 1
    programs = cdiv(tiles, per_program)
    partial = lambda write: torch.empty((programs, C), dtype=stats, device=device) if write else None  # noqa: E731
    weight_partials, bias_partials = partial(write_weight), partial(write_bias)
    some = grad if grad is not None else grad_copy  # stands in for pointers a launch does not read
    _backward_kernel[(programs,)](
        some, grad_copy if grad_copy is not None else some, branch, weight if weight is not None else branch,
        mean, rstd,
        grad_x if grad_x is not None else some,
        grad_branch if grad_branch is not None else some,
        weight_partials if weight_partials is not None else some,
        bias_partials if bias_partials is not None else some,
        M, C, per_program,
        *some.stride(), *(grad_copy if grad_copy is not None else some).stride(), *branch.stride(), _stride(weight),
        HAS_GRAD=grad is not None, HAS_COPY_GRAD=grad_copy is not None,
        OUT_DTYPE=TL_FLOATS[out_dtype], WRITE_X=grad_x is not None,
        HAS_WEIGHT=weight is not None, WRITE_BRANCH=need_branch, WRITE_WEIGHT=write_weight, WRITE_BIAS=write_bias,
        STAT_DTYPE=TL_FLOATS[stats], NORM_DTYPE=TL_FLOATS[norm_dtype],
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )
    grad_weight = weight_partials.sum(0).to(weight_dtype) if write_weight else None
    grad_bias = bias_partials.sum(0).to(bias_dtype) if write_bias else None
    return grad_branch, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# Registration: a torch.library op for tracers, an autograd.Function for eager calls
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("audiomae::post_norm_residual", mutates_args=())
def _post_norm_residual_op(
    x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    norm_dtype: torch.dtype, copy_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Called directly (torch.ops.audiomae.post_norm_residual) the op checks its own contract:
    # x, branch [M, C] (post_norm_residual flattens [..., C] to it), weight and bias [C].
    _check_op_rows(x=x, branch=branch)
    _check_inputs(x, branch, weight, bias)
    _check_dtypes(norm_dtype=norm_dtype, copy_dtype=copy_dtype)
    require_triton("post_norm_residual", x)
    return _forward(x, branch, weight, bias, eps, norm_dtype, copy_dtype)


def _check_op_rows(**rows: torch.Tensor | None) -> None:
    """The ops take [M, C] matrices (post_norm_residual flattens [..., C] to them)."""
    for name, t in rows.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2):
            raise ValueError(f"{name} must be an [M, C] tensor here, got {getattr(t, 'shape', type(t).__name__)}")


def _check_dtypes(**dtypes: torch.dtype | None) -> None:
    for name, dtype in dtypes.items():
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be one of float16, bfloat16, float32, float64, got {dtype!r}")


@_post_norm_residual_op.register_fake
def _(x, branch, weight, bias, eps, norm_dtype, copy_dtype):
    M, C = branch.shape
    stats = stat_dtype(branch.dtype)
    out_dtype = torch.promote_types(x.dtype, norm_dtype)
    out = branch.new_empty((M, C), dtype=out_dtype)
    copy = branch.new_empty((M, C) if copy_dtype is not None else (0,), dtype=copy_dtype or out_dtype)
    return out, copy, branch.new_empty((M,), dtype=stats), branch.new_empty((M,), dtype=stats)


@torch.library.custom_op("audiomae::post_norm_residual_backward", mutates_args=())
def _post_norm_residual_backward_op(
    grad: torch.Tensor | None, grad_copy: torch.Tensor | None, branch: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, norm_dtype: torch.dtype, out_dtype: torch.dtype,
    x_dtype: torch.dtype | None, need_branch: bool, weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Called directly, the op checks what the forward would have made: grad, grad_copy, branch
    # [M, C], weight [C], mean and rstd [M] (read as contiguous arrays, so made so here).
    _check_op_rows(grad=grad, grad_copy=grad_copy, branch=branch)
    if grad is None and grad_copy is None:
        raise ValueError("post_norm_residual_backward needs grad or grad_copy")
    for name, t in (("grad", grad), ("grad_copy", grad_copy)):
        if t is not None:
            _check_inputs(t, branch, weight, None)
    _check_dtypes(norm_dtype=norm_dtype, out_dtype=out_dtype, x_dtype=x_dtype, weight_dtype=weight_dtype,
                  bias_dtype=bias_dtype)
    stats = stat_dtype(branch.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (branch.shape[0],) or t.dtype != stats:
            raise ValueError(f"{name} must be [{branch.shape[0]}] {stats} (as the forward makes it), got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
        check_same_device(branch=branch, **{name: t})
    mean, rstd = mean.contiguous(), rstd.contiguous()
    require_triton("post_norm_residual_backward", branch)
    grads = _backward(grad, grad_copy, branch, weight, mean, rstd, norm_dtype, out_dtype, x_dtype, need_branch,
                      weight_dtype, bias_dtype)
    # A custom op cannot return None, nor an input, and its outputs have the strides its fake
    # says (contiguous): a gradient nobody asked for comes back empty, x's gradient contiguous and
    # never one of the incoming ones.
    grad_x = grads[0]
    if grad_x is not None:
        grad_x = grad_x.contiguous()
        if grad_x is grad or grad_x is grad_copy:
            grad_x = grad_x.clone()
    return tuple(g if g is not None else branch.new_empty(0) for g in (grad_x, *grads[1:]))


@_post_norm_residual_backward_op.register_fake
def _(grad, grad_copy, branch, weight, mean, rstd, norm_dtype, out_dtype, x_dtype, need_branch, weight_dtype,
      bias_dtype):
    C = branch.shape[1]
    return (
        branch.new_empty(branch.shape, dtype=x_dtype) if x_dtype is not None else branch.new_empty(0),
        branch.new_empty(branch.shape) if need_branch else branch.new_empty(0),
        branch.new_empty((C,), dtype=weight_dtype) if weight_dtype is not None else branch.new_empty(0),
        branch.new_empty((C,), dtype=bias_dtype) if bias_dtype is not None else branch.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, branch, weight, bias, eps, norm_dtype, copy_dtype = inputs
    out, _, mean, rstd = output
    ctx.save_for_backward(branch, weight, mean, rstd)
    ctx.norm_dtype = norm_dtype
    ctx.out_dtype = out.dtype
    ctx.dtypes = (x.dtype, weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _input_grads(ctx, grad, grad_copy, backward):
    """Gradients of (x, branch, weight, bias) from ``backward``: ``_backward`` or its op."""
    branch, weight, mean, rstd = ctx.saved_tensors
    need_x, need_branch, need_weight, need_bias = ctx.needs_input_grad[:4]
    x_dtype, weight_dtype, bias_dtype = ctx.dtypes
    if grad is None and grad_copy is None:
        return None, None, None, None
    # Without a copy's gradient x takes the incoming gradient cast, here, as it always did (no
    # kernel, no copy); with one, the kernel writes the sum.
    grad_x = grad.to(x_dtype) if need_x and grad_copy is None else None
    if grad_copy is None and not (need_branch or need_weight or need_bias):
        return grad_x, None, None, None
    grads = backward(grad, grad_copy, branch, weight, mean, rstd, ctx.norm_dtype, ctx.out_dtype,
                     x_dtype if need_x and grad_copy is not None else None, need_branch,
                     weight_dtype if need_weight else None, bias_dtype if need_bias else None)
    grads = (grad_x if grad_copy is None else grads[0], *grads[1:])
    return tuple(g if need else None for g, need in zip(grads, (need_x, need_branch, need_weight, need_bias)))


@first_order_only("post_norm_residual")
def _op_backward(ctx, grad, grad_copy, _grad_mean, _grad_rstd):
    # Without a copy the op's second output is an empty placeholder: its gradient is nothing.
    grad_copy = grad_copy if ctx.has_copy else None
    return (*_input_grads(ctx, grad, grad_copy, torch.ops.audiomae.post_norm_residual_backward), None, None, None)


def _op_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.has_copy = inputs[6] is not None
    # The row statistics are the backward's, not results to differentiate (nor is the empty
    # placeholder standing for an absent copy): their gradients would be dropped silently.
    _, copy, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd, *([] if ctx.has_copy else [copy]))
    # An unused output's gradient stays None, as in the eager Function: added as zeros it would
    # turn a -0.0 gradient into +0.0 there and not here.
    ctx.set_materialize_grads(False)


_post_norm_residual_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _PostNormResidual(torch.autograd.Function):
    """``audiomae::post_norm_residual`` for eager calls: the same launchers and gradients. Returns
    ``out``, and ``(out, copy)`` when a copy dtype is given."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, norm_dtype, copy_dtype):
        out, copy, mean, rstd = _forward(x, branch, weight, bias, eps, norm_dtype, copy_dtype)
        _setup_context(ctx, (x, branch, weight, bias, eps, norm_dtype, copy_dtype), (out, copy, mean, rstd))
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros to add
        return (out, copy) if copy_dtype is not None else out

    @staticmethod
    @first_order_only("post_norm_residual")  # double backward is an error, as for the op
    def backward(ctx, grad, grad_copy=None):
        backward = torch.ops.audiomae.post_norm_residual_backward if needs_custom_op() else _backward
        return (*_input_grads(ctx, grad, grad_copy, backward), None, None, None)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def norm_output_dtype(branch: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype eager ``F.layer_norm(branch, ..., weight, bias)`` returns here, or a TypeError
    for the parameter dtypes torch refuses. CUDA autocast runs layer_norm in float32 (casting
    float16/bfloat16 inputs and parameters); CPU autocast leaves it alone."""
    autocast = branch.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    cast = (lambda dtype: torch.float32 if dtype in LOW_PRECISION else dtype) if autocast else (lambda dtype: dtype)
    dtype = cast(branch.dtype)
    given = [(name, param) for name, param in (("weight", weight), ("bias", bias)) if param is not None]
    # torch's mixed-dtype layer_norm: float32 parameters for a float16/bfloat16 branch, all of them
    mixed = dtype in LOW_PRECISION and all(cast(param.dtype) == torch.float32 for _, param in given)
    for name, param in given:
        if cast(param.dtype) != (torch.float32 if mixed else dtype):
            raise TypeError(
                f"{name} is {param.dtype} but branch is {branch.dtype}"
                + "".join(f" and {n} is {p.dtype}" for n, p in given if n != name) + ": layer_norm takes "
                "parameters of the branch's dtype, or (for a float16/bfloat16 branch) float32 ones, all alike"
            )
    return dtype


def _check_inputs(x, branch, weight, bias) -> int:
    for name, t in (("x", x), ("branch", branch), ("weight", weight), ("bias", bias)):
        if t is None and name in ("weight", "bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if branch.dim() == 0 or x.dim() == 0:
        raise ValueError("x and branch must have at least one dimension, the normalised one")
    if x.shape != branch.shape:
        raise ValueError(f"x and branch must share one shape [..., C], got {tuple(x.shape)} and {tuple(branch.shape)}")
    C = branch.shape[-1]
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"the normalised axis has C={C} channels (shape {tuple(branch.shape)}); supported: 1 to {MAX_CHANNELS}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (C,):
            raise ValueError(f"{name} must be [{C}], got shape {tuple(param.shape)}")
    check_same_device(x=x, branch=branch, weight=weight, bias=bias)
    return C


def post_norm_residual(
    x: torch.Tensor,
    branch: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    copy_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x + F.layer_norm(branch, (C,), weight, bias, eps)`` for ``x``, ``branch`` [..., C]. See the module doc.

    ``copy_dtype``: also return ``out.to(copy_dtype)``, written by the same pass, as ``(out, copy)``;
    gradients reaching both are added as autograd adds them, in the backward's pass."""
    C = _check_inputs(x, branch, weight, bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if copy_dtype is not None and (not isinstance(copy_dtype, torch.dtype) or copy_dtype not in FLOAT_DTYPES):
        raise TypeError(f"copy_dtype must be None or one of float16, bfloat16, float32, float64, got {copy_dtype!r}")
    if not use_triton(x):
        out = reference.post_norm_residual(x, branch, weight, bias, eps)
        return out if copy_dtype is None else (out, out.to(copy_dtype, copy=True))
    reject_autodiff_transforms("post_norm_residual")
    reject_forward_tangents("post_norm_residual", x, branch, weight, bias)
    norm_dtype = norm_output_dtype(branch, weight, bias)
    shape = branch.shape
    # Channel offsets are int32 in the kernels: a view whose channels lie 2**31 elements apart is copied.
    x2, branch2 = (_int32_columns(t.reshape(-1, C)) for t in (x, branch))
    eps = float(eps)
    if needs_custom_op():
        out, copy = torch.ops.audiomae.post_norm_residual(x2, branch2, weight, bias, eps, norm_dtype, copy_dtype)[:2]
    elif copy_dtype is None:
        out, copy = _PostNormResidual.apply(x2, branch2, weight, bias, eps, norm_dtype, None), None
    else:
        out, copy = _PostNormResidual.apply(x2, branch2, weight, bias, eps, norm_dtype, copy_dtype)
    return out.view(shape) if copy_dtype is None else (out.view(shape), copy.view(shape))
