"""Decoder unshuffle: put the kept tokens back in place, mask tokens elsewhere, add positions.

``unshuffle_tokens(x, ids_restore, mask_token, pos_embed=None)``
    ``x`` [B, K, C] the kept tokens in keep order (no cls token), ``ids_restore`` [B, L] int64,
    ``mask_token`` [C] or [1, 1, C], ``pos_embed`` [L, C] or [1, L, C] (optional). Returns
    [B, L, C] with ``out[b, i] = (x[b, r] if r < K else mask_token) + pos_embed[i]``,
    ``r = ids_restore[b, i]``: the official
    ``torch.gather(torch.cat([x, mask_token.repeat(B, L - K, 1)], 1), 1, ids_restore[..., None].repeat(1, 1, C))``
    in one pass, without the repeated mask tokens, the concatenation or the [B, L, C] index.
    Requires K <= L and ``ids_restore`` values in [0, L).

Supported: float16, bfloat16, float32 (inputs may differ and promote as in torch; the sum is
taken in float32), and float64 when every float input is float64. Any sizes, including zero; any
strides. The output is a new contiguous tensor.

Gradients: ``x`` gets, at each kept row r, the sum of ``grad_out[b, i]`` over the positions i
that read it (one position for a permutation; duplicates are summed in position order, and a row
no position reads gets zeros), every row written once by the backward kernel, through
``gather_rows_backward``. ``mask_token`` gets ``grad_out`` summed over every masked position and
``pos_embed`` gets it summed over the batch, both from one pass over ``grad_out`` that reads only
the masked rows unless ``pos_embed`` needs its gradient, and both deterministic: fixed-order
partial sums in fp32, added up by ``torch.sum``. No atomics. Double backward is not supported.

Index checks, dispatch and registration (``audiomae::unshuffle_tokens`` and its backward for
tracers, an autograd.Function over the same launchers for eager calls) follow
``kernels.gather_tokens``: values outside [0, L) are a ValueError at the cost of one reduction and
one host sync (in compiled code too, when the graph runs), skipped with ``check_indices=False``,
under fake tensors and during CUDA-graph capture.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import (check_same_device, first_order_only, needs_custom_op, on_tensors_device,
                              reject_autodiff_transforms, reject_forward_tangents, require_triton, use_triton)
from kernels.gather_tokens import (
    REDUCING_PROGRAMS,
    TL_DTYPES,
    accumulate_dtype,
    as_table,
    batch_splits,
    cdiv,
    check_floats,
    check_index,
    check_rows_backward_args,
    gather_rows_backward,
    range_checked,
    row_tile,
    tile_rows,
)
from kernels.reference import unshuffle_tokens as reference


@triton.jit
def _unshuffle_kernel(
    x_ptr, ids_ptr, mask_ptr, pos_ptr, out_ptr,
    num_rows, L, K, C,
    stride_xb, stride_xk, stride_xc,
    stride_ib, stride_il,
    stride_mc, stride_pl, stride_pc,
    HAS_POS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (BLOCK_R output rows of the flattened [B*L], BLOCK_C channels).
    rows, cols, row_ok, col_ok, b, i = tile_rows(num_rows, L, C, BLOCK_R, BLOCK_C)
    src = tl.load(ids_ptr + b * stride_ib + i * stride_il, mask=row_ok, other=-1)
    kept = row_ok & (src >= 0) & (src < K)
    masked = row_ok & (src >= K) & (src < L)
    val = tl.load(
        x_ptr + b[:, None] * stride_xb + src[:, None] * stride_xk + cols[None, :] * stride_xc,
        mask=kept[:, None] & col_ok[None, :], other=0.0,
    ).to(ACC_DTYPE)
    mask_token = tl.load(mask_ptr + cols * stride_mc, mask=col_ok, other=0.0).to(ACC_DTYPE)
    val = tl.where(masked[:, None], mask_token[None, :], val)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        val += tl.load(pos_ptr + i[:, None] * stride_pl + cols[None, :] * stride_pc, mask=out_mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _mask_pos_backward_kernel(
    grad_ptr, ids_ptr, mask_partial_ptr, pos_partial_ptr,
    B, L, K, C, batches_per_split, num_row_blocks,
    stride_gb, stride_gl, stride_gc,
    stride_ib, stride_il,
    WRITE_MASK: tl.constexpr, WRITE_POS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (BLOCK_R positions, BLOCK_C channels, run of sequences): sums grad_out over
    # its sequences, all rows for pos_embed, the masked rows for mask_token. Each program writes
    # its own partial sums; nothing is shared, so the result does not depend on scheduling.
    pid = tl.program_id(0)
    split = pid // num_row_blocks
    rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < L
    col_ok = cols < C
    mask_sum = tl.zeros([BLOCK_R, BLOCK_C], ACC_DTYPE)
    pos_sum = tl.zeros([BLOCK_R, BLOCK_C], ACC_DTYPE)
    b = split * batches_per_split
    b_end = tl.minimum(b + batches_per_split, B)
    while b < b_end:
        src = tl.load(ids_ptr + b.to(tl.int64) * stride_ib + rows * stride_il, mask=row_ok, other=-1)
        masked = row_ok & (src >= K) & (src < L)
        if WRITE_POS:
            load_rows = row_ok
        else:
            load_rows = masked  # kept rows belong to x's gradient: not read here
        g = tl.load(
            grad_ptr + b.to(tl.int64) * stride_gb + rows[:, None] * stride_gl + cols[None, :] * stride_gc,
            mask=load_rows[:, None] & col_ok[None, :], other=0.0,
        ).to(ACC_DTYPE)
        if WRITE_MASK:
            mask_sum += tl.where(masked[:, None], g, 0.0)
        if WRITE_POS:
            pos_sum += g
        b += 1
    if WRITE_MASK:
        tl.store(mask_partial_ptr + pid.to(tl.int64) * C + cols, tl.sum(mask_sum, axis=0), mask=col_ok)
    if WRITE_POS:
        tl.store(
            pos_partial_ptr + (split.to(tl.int64) * L + rows[:, None]) * C + cols[None, :],
            pos_sum.to(pos_partial_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :],
        )


@on_tensors_device
def _unshuffle_forward(x, ids_restore, mask_token, pos_embed):
    B, K, C = x.shape
    L = ids_restore.shape[1]
    out_dtype = check_floats(x=x, mask_token=mask_token, pos_embed=pos_embed)
    out = torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_c = row_tile(C)
    pos = pos_embed if pos_embed is not None else x
    pos_strides = pos_embed.stride() if pos_embed is not None else (0, 0)
    grid = (cdiv(B * L, block_r), cdiv(C, block_c))
    _unshuffle_kernel[grid](
        x, ids_restore, mask_token, pos, out,
        B * L, L, K, C,
        *x.stride(), *ids_restore.stride(), mask_token.stride(0), *pos_strides,
        HAS_POS=pos_embed is not None, ACC_DTYPE=TL_DTYPES[accumulate_dtype(out_dtype)],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


@on_tensors_device
def _mask_pos_backward(grad, ids_restore, num_kept, mask_dtype, pos_dtype):
    """(grad of mask_token [C] or None, grad of pos_embed [L, C] or None)."""
    B, L, C = grad.shape
    device = grad.device
    if mask_dtype is None and pos_dtype is None:
        return None, None
    if B * L * C == 0:
        zeros = lambda *shape, dtype: torch.zeros(shape, dtype=dtype, device=device) if dtype is not None else None  # noqa: E731
        return zeros(C, dtype=mask_dtype), zeros(L, C, dtype=pos_dtype)
    block_r, block_c = row_tile(C)
    row_blocks, col_blocks = cdiv(L, block_r), cdiv(C, block_c)
    # A pos_embed gradient needs an [L, C] partial sum per split; mask-token partials are one
    # [C] row per program, so without the former many more programs cost next to nothing.
    target = REDUCING_PROGRAMS if pos_dtype is not None else 4 * REDUCING_PROGRAMS
    splits, per_split = batch_splits(B, row_blocks * col_blocks, target)
    partial_dtype = accumulate_dtype(grad.dtype)
    mask_partials = torch.empty((splits * row_blocks, C), dtype=partial_dtype, device=device) if mask_dtype is not None else None
    grad_pos = pos_partials = None
    if pos_dtype is not None:
        grad_pos = torch.empty((L, C), dtype=pos_dtype, device=device)
        pos_partials = grad_pos if splits == 1 else torch.empty((splits, L, C), dtype=partial_dtype, device=device)
    _mask_pos_backward_kernel[(row_blocks * splits, col_blocks)](
        grad, ids_restore,
        mask_partials if mask_partials is not None else grad, pos_partials if pos_partials is not None else grad,
        B, L, num_kept, C, per_split, row_blocks,
        *grad.stride(), *ids_restore.stride(),
        WRITE_MASK=mask_dtype is not None, WRITE_POS=pos_dtype is not None, ACC_DTYPE=TL_DTYPES[partial_dtype],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    grad_mask = mask_partials.sum(0).to(mask_dtype) if mask_partials is not None else None
    if pos_partials is not grad_pos:
        grad_pos = pos_partials.sum(0).to(pos_dtype)
    return grad_mask, grad_pos


def _unshuffle_backward(grad, ids_restore, num_kept, x_dtype, mask_dtype, pos_dtype):
    """Gradients of x, mask_token and pos_embed, each None when its dtype is None."""
    grad_x, _ = gather_rows_backward(grad, ids_restore, num_kept, x_dtype, None)
    return (grad_x, *_mask_pos_backward(grad, ids_restore, num_kept, mask_dtype, pos_dtype))


@torch.library.custom_op("audiomae::unshuffle_tokens", mutates_args=())
def _unshuffle_tokens_op(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    # Called directly (torch.ops.audiomae.unshuffle_tokens) the op takes unshuffle_tokens' argument
    # forms and shape checks, not its index range check (one host sync; out-of-range ids read out
    # of bounds).
    forms = _checked_forms(x, ids_restore, mask_token, pos_embed)
    require_triton("unshuffle_tokens", x)
    return _unshuffle_forward(x, ids_restore, *forms)


@_unshuffle_tokens_op.register_fake
def _(x, ids_restore, mask_token, pos_embed):
    dtype = check_floats(x=x, mask_token=mask_token, pos_embed=pos_embed)
    return x.new_empty((x.shape[0], ids_restore.shape[1], x.shape[2]), dtype=dtype)


@torch.library.custom_op("audiomae::unshuffle_tokens_backward", mutates_args=())
def _unshuffle_tokens_backward_op(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    num_kept: int,
    x_dtype: torch.dtype | None,
    mask_dtype: torch.dtype | None,
    pos_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_rows_backward_args(grad, ids_restore, "ids_restore", num_kept)
    require_triton("unshuffle_tokens_backward", grad)
    grads = _unshuffle_backward(grad, ids_restore, num_kept, x_dtype, mask_dtype, pos_dtype)
    # A custom op cannot return None: a gradient nobody asked for comes back empty.
    return tuple(g if g is not None else grad.new_empty(0) for g in grads)


@_unshuffle_tokens_backward_op.register_fake
def _(grad, ids_restore, num_kept, x_dtype, mask_dtype, pos_dtype):
    B, L, C = grad.shape
    shaped = lambda dtype, *shape: grad.new_empty(shape, dtype=dtype) if dtype is not None else grad.new_empty(0)  # noqa: E731
    return shaped(x_dtype, B, num_kept, C), shaped(mask_dtype, C), shaped(pos_dtype, L, C)


def _setup_context(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_kept = x.shape[1]
    ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype if pos_embed is not None else None)
    ctx.shapes = (mask_token.shape, pos_embed.shape if pos_embed is not None else None)


def _input_grads(ctx, grad, backward):
    """Gradients of (x, ids_restore, mask_token, pos_embed) from ``backward``:
    ``_unshuffle_backward`` or its op."""
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_mask, need_pos = ctx.needs_input_grad
    wanted = [dtype if need else None for dtype, need in zip(ctx.dtypes, (need_x, need_mask, need_pos))]
    grad_x, grad_mask, grad_pos = backward(grad, ids_restore, ctx.num_kept, *wanted)
    # [C] and [L, C] from the kernels; a direct op call may have passed [1, 1, C] and [1, L, C].
    mask_shape, pos_shape = ctx.shapes
    return ((grad_x if need_x else None), None, (grad_mask.reshape(mask_shape) if need_mask else None),
            (grad_pos.reshape(pos_shape) if need_pos else None))


@first_order_only("unshuffle_tokens")
def _backward(ctx, grad):
    return _input_grads(ctx, grad, torch.ops.audiomae.unshuffle_tokens_backward)


_unshuffle_tokens_op.register_autograd(_backward, setup_context=_setup_context)


class _UnshuffleTokens(torch.autograd.Function):
    """``audiomae::unshuffle_tokens`` for eager calls (see ``needs_custom_op``): the same
    launchers, context and gradients."""

    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, pos_embed):
        _setup_context(ctx, (x, ids_restore, mask_token, pos_embed), None)
        return _unshuffle_forward(x, ids_restore, mask_token, pos_embed)

    @staticmethod
    @first_order_only("unshuffle_tokens")  # double backward is an error, as for the op
    def backward(ctx, grad):
        # Compiled autograd traces this backward: there it takes the op too.
        backward = torch.ops.audiomae.unshuffle_tokens_backward if needs_custom_op() else _unshuffle_backward
        return _input_grads(ctx, grad, backward)


def unshuffle_tokens(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """``x`` [B, K, C], ``ids_restore`` [B, L] int64, ``mask_token`` [C] or [1, 1, C], ``pos_embed``
    [L, C] or [1, L, C] -> [B, L, C] with ``out[b, i] = (x[b, r] if r < K else mask_token) +
    pos_embed[i]``, ``r = ids_restore[b, i]``. See the module doc."""
    mask, pos = _checked_forms(x, ids_restore, mask_token, pos_embed)
    if check_indices:
        (ids_restore,) = range_checked((ids_restore, ids_restore.shape[1], "ids_restore"))
    if not use_triton(x):
        return reference.unshuffle_tokens(x, ids_restore, mask_token, pos_embed)
    reject_autodiff_transforms("unshuffle_tokens")
    reject_forward_tangents("unshuffle_tokens", x, mask_token, pos_embed)
    op = torch.ops.audiomae.unshuffle_tokens if needs_custom_op() else _UnshuffleTokens.apply
    return op(x, ids_restore, mask, pos)


def _checked_forms(x, ids_restore, mask_token, pos_embed) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shape, dtype and device checks; ``mask_token`` as [C] and ``pos_embed`` as [L, C] views."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [B, K, C], got {type(x).__name__}")
    if not isinstance(mask_token, torch.Tensor):
        raise TypeError(f"mask_token must be a tensor [C] or [1, 1, C], got {type(mask_token).__name__}")
    check_floats(x=x, mask_token=mask_token, pos_embed=pos_embed)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, K, C], got shape {tuple(x.shape)}")
    B, K, C = x.shape
    check_index(ids_restore, "ids_restore", B)
    L = ids_restore.shape[1]
    if K > L:
        raise ValueError(f"x holds K={K} kept tokens but ids_restore restores L={L} < K positions")
    if tuple(mask_token.shape) not in ((C,), (1, 1, C)):
        raise ValueError(f"mask_token must be [{C}] or [1, 1, {C}], got {tuple(mask_token.shape)}")
    pos = as_table(pos_embed, "pos_embed", L, C)
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    return mask_token.reshape(C), pos
