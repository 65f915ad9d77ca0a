"""Fused shifted-window attention in token order, forward and backward (Triton).

``window_attention(qkv, *, grid, window, shift=(0, 0), num_heads, tau=None, bias=None,
mask_value=-100.0) -> [B, L, C]``

Computes the math of ``kernels.reference.window_attention.window_attention_reference``
(AudioMAE's Swin-v2 decoder attention: cyclic roll, window partition, attention, window reverse,
roll back) without moving a token: every program gathers the rows of its windows straight from the
token-order ``qkv`` and writes its output rows back in token order. No attention matrix reaches HBM.

Contract
- ``qkv`` [B, L, 3*C], any strides, token ``t * F + f`` on ``grid=(T, F)``, the last axis laid out
  ``[3, num_heads, head_dim]`` (q, k, v) as the official ``view(..., 3, heads, head_dim)``.
- ``window=(wt, wf)``: sides dividing the grid's, at most 256 tokens per window (2x2 to 16x16 are
  the tested range; a side of 1 also works). ``shift=(st, sf)`` with ``0 <= s < w`` on each axis.
- The token at ``(t, f)`` sits at ``(x, y) = ((t - st) mod T, (f - sf) mod F)`` of the rolled
  grid: window ``(x // wt, y // wf)``, position ``(x % wt) * wf + y % wf`` inside it (the index
  into ``bias``). Its shift-mask region on each axis is ``(x >= T - wt) + (x >= T - st)``, which
  equals the official ``img_mask`` slices; pairs of different regions get ``mask_value`` added.
- With ``tau`` [heads]: logits ``q.k / max(|q| |k|, 1e-6) / max(tau, 0.01)``; without, ``q.k *
  head_dim ** -0.5``. ``bias`` [heads, N, N], N = wt * wf, is added to the logits.
- head_dim 16 to 128 (padded to a power of two inside), any number of heads; float16, bfloat16,
  float32. Logits, softmax and accumulation are fp32; float32 inputs get IEEE fp32 dots (not
  TF32), 16-bit inputs dots in their dtype and a TF32 sum for the bias gradient. ``tau`` and
  ``bias`` may have their own float dtype; their gradients come back in it. Under autocast a
  float32 ``qkv`` is cast to the autocast dtype first, as the reference's matmuls take it.
- Backward: gradients of ``qkv``, ``tau`` (zero where ``tau < 0.01``, as the official clamp) and
  ``bias``. It recomputes the logits from the saved per-row logsumexp. Where each window fits one
  tile, the softmax correction ``dout . out`` is the row sum of ``p * dp`` over the tile, so the
  output is neither kept for the backward nor read by it. The bias and tau gradients
  are per-program partial sums reduced afterwards in a fixed order by one more launch
  (``_window_attention_bwd_finish``), so they are deterministic; a backward program
  takes several batch elements in turn (``default_batch_per_program``) so that the partials stay
  small beside qkv.
- ``overwrite_qkv=True``: the backward writes dqkv over qkv's memory (see ``window_attention``).

Tiling: a tile is ``BLOCK`` rows (``default_tiling``: per dtype and head dim, from the H100 sweep
of ``benches/bench_window_tiling.py`` for 16-bit inputs and the sm_90 register use that
``benches/sm90_compile.py`` reports for float32). Windows of at most ``BLOCK`` tokens
are packed several to a tile and kept apart by a block-diagonal mask (this also serves windows under
the 16 rows ``tl.dot`` needs). One consequence: a NaN or Inf in ``v`` (or in the incoming gradient)
reaches the windows that share its tile, since their zero probabilities still multiply it
(0 * NaN), where the reference keeps it in its own window; the step is NaN either way, and a NaN
or Inf in ``q`` or ``k`` stays in its window. Larger windows are split into ``BLOCK``-row chunks: the forward runs
an online softmax over key chunks, and the backward program for chunk ``c`` owns ``dq`` of query
chunk ``c`` (one pass over the key chunks) and then ``dk, dv`` of key chunk ``c`` (a second pass
over the query chunks).

Dispatch: CUDA tensors run the kernels; CPU tensors run the eager reference unless
``TRITON_INTERPRET=1`` (then the kernels, through the interpreter). Registered as
``audiomae::window_attention`` with its backward ``audiomae::window_attention_backward``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import (first_order_only, interpreting, needs_custom_op, on_tensors_device, reject_autodiff_transforms,
                        reject_forward_tangents, require_triton, use_triton)
from .gather_tokens import cdiv, next_power_of_2
from .reference.window_attention import as_pairs, check_window_attention_args, plain_int, window_attention_reference

# Logit of a pair that shares no window; finite so that padded rows never make NaNs.
_NO_PAIR = tl.constexpr(-1.0e30)


@triton.jit
def _program_coordinates(num_heads, num_groups, NUM_CHUNKS: tl.constexpr):
    """(batch, window group, chunk, head) of this program. Heads vary fastest, so that neighbouring
    programs read neighbouring columns of the same qkv rows."""
    pid = tl.program_id(0)
    h = pid % num_heads
    chunk = (pid // num_heads) % NUM_CHUNKS
    group = (pid // (num_heads * NUM_CHUNKS)) % num_groups
    b = pid // (num_heads * NUM_CHUNKS * num_groups)
    return b, group, chunk, h


@triton.jit
def _qkv_pointers(qkv_ptr, b, h, stride_b, stride_c, C, HEAD_DIM: tl.constexpr):
    q_ptr = qkv_ptr + b.to(tl.int64) * stride_b + h * HEAD_DIM * stride_c
    return q_ptr, q_ptr + C * stride_c, q_ptr + 2 * C * stride_c


@triton.jit
def _inverse_tau(tau_ptr, h, HAS_TAU: tl.constexpr):
    if HAS_TAU:
        return 1.0 / tl.maximum(tl.load(tau_ptr + h).to(tl.float32), 0.01)
    else:
        return 1.0


@triton.jit
def _window_rows(group, v, T, F, shift_t, shift_f, num_windows,
                 WT: tl.constexpr, WF: tl.constexpr, WINDOWS_PER_GROUP: tl.constexpr):
    """Token row, window, position in window, validity and shift-mask region of the ``v``-th
    token of a window group (the group's windows laid end to end)."""
    window = group * WINDOWS_PER_GROUP + v // (WT * WF)
    pos = v % (WT * WF)
    valid = (v < WINDOWS_PER_GROUP * WT * WF) & (window < num_windows)
    windows_per_row = F // WF
    x = (window // windows_per_row) * WT + pos // WF
    y = (window % windows_per_row) * WF + pos % WF
    t = x + shift_t
    t = tl.where(t >= T, t - T, t)
    f = y + shift_f
    f = tl.where(f >= F, f - F, f)
    region = ((x >= T - WT).to(tl.int32) + (x >= T - shift_t)) * 3 + (y >= F - WF) + (y >= F - shift_f)
    return t * F + f, window, pos, valid, region


@triton.jit
def _load_rows(ptr, rows, valid, stride_row, cols, col_mask):
    mask = valid[:, None] & col_mask[None, :]
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _row_norm(x, HAS_TAU: tl.constexpr):
    if HAS_TAU:
        xf = x.to(tl.float32)
        return tl.sqrt(tl.sum(xf * xf, axis=1))
    else:
        return tl.zeros([x.shape[0]], tl.float32)


@triton.jit
def _logits(q, k, q_norm, k_norm, q_win, q_pos, q_valid, q_region, k_win, k_pos, k_valid, k_region,
            bias_ptr, inv_tau, scale, mask_value,
            N: tl.constexpr, HAS_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Logits [BLOCK_Q, BLOCK_K] of a query block against a key block, ``_NO_PAIR`` where the two
    tokens share no window; also the logit before its 1/tau or head_dim**-0.5 factor."""
    dot = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_TAU:
        unscaled = dot / tl.maximum(q_norm[:, None] * k_norm[None, :], 1e-6)
        s = unscaled * inv_tau
    else:
        unscaled = dot
        s = dot * scale
    pair = (q_win[:, None] == k_win[None, :]) & q_valid[:, None] & k_valid[None, :]
    if HAS_BIAS:
        s += tl.load(bias_ptr + q_pos[:, None] * N + k_pos[None, :], mask=pair, other=0.0).to(tl.float32)
    if SHIFTED:
        s += tl.where(q_region[:, None] != k_region[None, :], mask_value, 0.0)
    return tl.where(pair, s, _NO_PAIR), unscaled


@triton.jit
def _window_attention_fwd(
    qkv_ptr, tau_ptr, bias_ptr, out_ptr, lse_ptr,
    stride_b, stride_l, stride_c,
    seq_len, T, F, shift_t, shift_f, num_heads, num_groups, num_windows, scale, mask_value,
    WT: tl.constexpr, WF: tl.constexpr, WINDOWS_PER_GROUP: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    HAS_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, group, chunk, h = _program_coordinates(num_heads, num_groups, NUM_CHUNKS)
    C = num_heads * HEAD_DIM

    offs = tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q_ptr, k_ptr, v_ptr = _qkv_pointers(qkv_ptr, b, h, stride_b, stride_c, C, HEAD_DIM)
    cols_in = cols * stride_c
    inv_tau = _inverse_tau(tau_ptr, h, HAS_TAU)
    if HAS_BIAS:
        bias_ptr += h * WT * WF * WT * WF

    q_row, q_win, q_pos, q_valid, q_region = _window_rows(
        group, chunk * BLOCK + offs, T, F, shift_t, shift_f, num_windows, WT, WF, WINDOWS_PER_GROUP)
    q = _load_rows(q_ptr, q_row, q_valid, stride_l, cols_in, col_mask)
    q_norm = _row_norm(q, HAS_TAU)

    m_i = tl.full([BLOCK], _NO_PAIR, tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], tl.float32)
    for key_chunk in range(NUM_CHUNKS):
        k_row, k_win, k_pos, k_valid, k_region = _window_rows(
            group, key_chunk * BLOCK + offs, T, F, shift_t, shift_f, num_windows, WT, WF, WINDOWS_PER_GROUP)
        k = _load_rows(k_ptr, k_row, k_valid, stride_l, cols_in, col_mask)
        v = _load_rows(v_ptr, k_row, k_valid, stride_l, cols_in, col_mask)
        s, _ = _logits(q, k, q_norm, _row_norm(k, HAS_TAU), q_win, q_pos, q_valid, q_region,
                       k_win, k_pos, k_valid, k_region, bias_ptr, inv_tau, scale, mask_value,
                       WT * WF, HAS_TAU, HAS_BIAS, SHIFTED, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_rows = out_ptr + b.to(tl.int64) * seq_len * C + h * HEAD_DIM
    tl.store(out_rows + q_row[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_valid[:, None] & col_mask[None, :])
    tl.store(lse_ptr + (b * num_heads + h).to(tl.int64) * seq_len + q_row, m_i + tl.log(l_i), mask=q_valid)


@triton.jit
def _pair_grads(q, k, v, do, lse, delta, q_norm, k_norm, q_win, q_pos, q_valid, q_region,
                k_win, k_pos, k_valid, k_region, bias_ptr, inv_tau, scale, mask_value,
                N: tl.constexpr, HAS_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DELTA_FROM_TILE: tl.constexpr):
    """For a query block against a key block: probabilities ``p``, the logit gradient ``ds``, the
    unscaled logit, the gradient of the raw ``q.k`` and the gradient of the norm product ``|q||k|``
    (zero where the 1e-6 clamp holds, and without tau). ``DELTA_FROM_TILE``: the key block holds
    every key of each query's window, so the softmax correction ``delta`` is the row sum of
    ``p * dp`` (``dout . out``, without reading out) and the ``delta`` argument is ignored."""
    s, unscaled = _logits(q, k, q_norm, k_norm, q_win, q_pos, q_valid, q_region, k_win, k_pos, k_valid,
                          k_region, bias_ptr, inv_tau, scale, mask_value, N, HAS_TAU, HAS_BIAS, SHIFTED,
                          DOT_PRECISION)
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DELTA_FROM_TILE:
        delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])
    if HAS_TAU:
        d_unscaled = ds * inv_tau
        norm_product = q_norm[:, None] * k_norm[None, :]
        denom = tl.maximum(norm_product, 1e-6)
        d_dot = d_unscaled / denom
        d_norm_product = tl.where(norm_product >= 1e-6, -d_unscaled * unscaled / denom, 0.0)
    else:
        d_dot = ds * scale
        d_norm_product = tl.zeros_like(ds)
    return p, ds, unscaled, d_dot, d_norm_product


@triton.jit
def _add_norm_grad(grad, x, x_norm, d_norm):
    """``grad`` plus the gradient reaching ``x`` through its row norm: d|x|/dx = x / |x|, and a zero
    row has zero gradient, as in torch.norm's backward."""
    return grad + x.to(tl.float32) * (d_norm / tl.where(x_norm > 0, x_norm, 1.0))[:, None]


@triton.jit
def _query_side(q_ptr, do_ptr, o_ptr, lse_ptr, rows, valid, stride_l, stride_dout_l, C, cols_in, cols_do, cols,
                col_mask, HAS_TAU: tl.constexpr, READ_DELTA: tl.constexpr):
    """What the backward needs of a block of query rows: q, dout, the saved logsumexp, delta (the
    row's dout . out, the softmax backward's correction; zeros without ``READ_DELTA``, where the
    caller takes it from the tile and ``o_ptr`` may be None) and |q|."""
    q = _load_rows(q_ptr, rows, valid, stride_l, cols_in, col_mask)
    do = _load_rows(do_ptr, rows, valid, stride_dout_l, cols_do, col_mask)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    if READ_DELTA:
        o = _load_rows(o_ptr, rows, valid, C, cols, col_mask)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    else:
        delta = tl.zeros([q.shape[0]], tl.float32)
    return q, do, lse, delta, _row_norm(q, HAS_TAU)


@triton.jit
def _key_side(k_ptr, v_ptr, rows, valid, stride_l, cols_in, col_mask, HAS_TAU: tl.constexpr):
    """k, v and |k| of a block of key rows."""
    k = _load_rows(k_ptr, rows, valid, stride_l, cols_in, col_mask)
    return k, _load_rows(v_ptr, rows, valid, stride_l, cols_in, col_mask), _row_norm(k, HAS_TAU)


@triton.jit
def _fold_bias_grad(ds, q_pos, q_valid, k_pos, k_valid, q_base, k_base,
                    POS_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``ds`` summed over the windows in the block onto bias positions: the [POS_BLOCK, POS_BLOCK]
    tile at (q_base, k_base) of the [N, N] bias gradient. The sum over windows is a product with
    one-hot position matrices."""
    positions = tl.arange(0, POS_BLOCK)
    q_onehot = (((q_pos - q_base)[:, None] == positions[None, :]) & q_valid[:, None]).to(tl.float32)
    k_onehot = (((k_pos - k_base)[:, None] == positions[None, :]) & k_valid[:, None]).to(tl.float32)
    per_key = tl.dot(ds, k_onehot, input_precision=DOT_PRECISION)
    return tl.dot(tl.trans(q_onehot), per_key, input_precision=DOT_PRECISION)


@triton.jit
def _store_bias_grad(part_ptr, folded, q_base, k_base, accumulate,
                     N: tl.constexpr, POS_BLOCK: tl.constexpr):
    """Store (or with ``accumulate``, add) a folded tile into this program's [N, N] partial sum;
    the partial belongs to this program alone, so the read-modify-write is race-free and ordered."""
    positions = tl.arange(0, POS_BLOCK)
    q_at = q_base + positions
    k_at = k_base + positions
    at = part_ptr + q_at[:, None] * N + k_at[None, :]
    in_table = (q_at < N)[:, None] & (k_at < N)[None, :]
    if accumulate:
        folded += tl.load(at, mask=in_table, other=0.0)
    tl.store(at, folded, mask=in_table)


@triton.jit
def _window_attention_bwd(
    qkv_ptr, tau_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, dqkv_ptr, dbias_part_ptr, dtau_part_ptr,
    stride_b, stride_l, stride_c, stride_dout_b, stride_dout_l, stride_dout_c,
    batch, seq_len, T, F, shift_t, shift_f, num_heads, num_groups, num_windows, scale, mask_value,
    WT: tl.constexpr, WF: tl.constexpr, WINDOWS_PER_GROUP: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr, POS_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BATCH_PER_PROGRAM: tl.constexpr,
    HAS_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TAU_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    # TAU_GRAD / BIAS_GRAD: whether tau's and bias's gradients are wanted (a frozen table skips
    # its partial sums, their stores and the finish launch). They imply HAS_TAU / HAS_BIAS.
    # A program takes one (window group, chunk, head) in BATCH_PER_PROGRAM consecutive batch
    # elements, one after the other, and sums their bias and tau gradients into one partial: the
    # partials then take 1/BATCH_PER_PROGRAM of the memory (and of the reduction's reads).
    batch_block, group, chunk, h = _program_coordinates(num_heads, num_groups, NUM_CHUNKS)
    C = num_heads * HEAD_DIM
    N: tl.constexpr = WT * WF

    offs = tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    cols_in = cols * stride_c
    cols_do = cols * stride_dout_c
    inv_tau = _inverse_tau(tau_ptr, h, HAS_TAU)
    if HAS_BIAS:
        bias_ptr += h * N * N
    if BIAS_GRAD:
        part_ptr = dbias_part_ptr + ((batch_block * num_groups + group) * num_heads + h).to(tl.int64) * N * N
    row, win, pos, valid_any, region = _window_rows(
        group, chunk * BLOCK + offs, T, F, shift_t, shift_f, num_windows, WT, WF, WINDOWS_PER_GROUP)
    elem = dqkv_ptr.dtype.element_ty
    dtau_sum = 0.0
    if NUM_CHUNKS == 1 and BIAS_GRAD:
        dbias_sum = tl.zeros([POS_BLOCK, POS_BLOCK], tl.float32)
    # One element after another, not pipelined: prefetching the next element doubled the registers
    # (sm_90: 112 -> 231 a thread at the decoder shape), and other programs hide the latency.
    for i in tl.range(0, BATCH_PER_PROGRAM, num_stages=1):
        b = batch_block * BATCH_PER_PROGRAM + i
        # Past the batch (its last block), every row is invalid: loads give zeros, ds is zero.
        valid = valid_any & (b < batch)
        q_ptr, k_ptr, v_ptr = _qkv_pointers(qkv_ptr, b, h, stride_b, stride_c, C, HEAD_DIM)
        do_ptr = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM * stride_dout_c
        lse_rows = lse_ptr + (b * num_heads + h).to(tl.int64) * seq_len
        dq_ptr = dqkv_ptr + b.to(tl.int64) * seq_len * 3 * C + h * HEAD_DIM + row[:, None] * 3 * C + cols[None, :]
        mask = valid[:, None] & col_mask[None, :]
        if NUM_CHUNKS == 1:
            # The whole window group in one tile: one pass over its pairs gives dq, dk and dv. Every
            # store depends on every load of this tile, so dqkv may be qkv itself (in place). Each
            # row's softmax correction comes from the tile too, so out is not read (nor kept).
            q, do, lse, delta, q_norm = _query_side(q_ptr, do_ptr, None, lse_rows, row, valid, stride_l,
                                                    stride_dout_l, C, cols_in, cols_do, cols, col_mask, HAS_TAU,
                                                    False)
            k, v, k_norm = _key_side(k_ptr, v_ptr, row, valid, stride_l, cols_in, col_mask, HAS_TAU)
            p, ds, unscaled, d_dot, d_norm_product = _pair_grads(
                q, k, v, do, lse, delta, q_norm, k_norm, win, pos, valid, region, win, pos, valid, region,
                bias_ptr, inv_tau, scale, mask_value, N, HAS_TAU, HAS_BIAS, SHIFTED, DOT_PRECISION, True)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            dk = tl.dot(tl.trans(d_dot).to(q.dtype), q, input_precision=DOT_PRECISION)
            dq = tl.dot(d_dot.to(k.dtype), k, input_precision=DOT_PRECISION)
            if HAS_TAU:
                dq = _add_norm_grad(dq, q, q_norm, tl.sum(d_norm_product * k_norm[None, :], axis=1))
                dk = _add_norm_grad(dk, k, k_norm, tl.sum(d_norm_product * q_norm[:, None], axis=0))
                if TAU_GRAD:
                    dtau_sum += tl.sum(tl.sum(ds * unscaled, axis=1), axis=0)
            if BIAS_GRAD:
                dbias_sum += _fold_bias_grad(ds, pos, valid, pos, valid, 0, 0, POS_BLOCK, DOT_PRECISION)
            tl.store(dq_ptr, dq.to(elem), mask=mask)
            tl.store(dq_ptr + C, dk.to(elem), mask=mask)
            tl.store(dq_ptr + 2 * C, dv.to(elem), mask=mask)
        else:
            # A window split into chunks. Two passes, so that each holds only one side's tiles (one
            # pass holding both spilled registers on sm_90 at every block size):
            # 1. this chunk's queries against every key chunk: dq, and the tau and bias gradients of
            #    each pair (every pair has exactly one query chunk, so each is counted once);
            o_ptr = out_ptr + b.to(tl.int64) * seq_len * C + h * HEAD_DIM
            q, do, lse, delta, q_norm = _query_side(q_ptr, do_ptr, o_ptr, lse_rows, row, valid, stride_l,
                                                    stride_dout_l, C, cols_in, cols_do, cols, col_mask, HAS_TAU,
                                                    True)
            dq = tl.zeros([BLOCK, D_PAD], tl.float32)
            dq_norm = tl.zeros([BLOCK], tl.float32)
            for key_chunk in range(NUM_CHUNKS):
                k_row, k_win, k_pos, k_valid, k_region = _window_rows(
                    group, key_chunk * BLOCK + offs, T, F, shift_t, shift_f, num_windows, WT, WF, WINDOWS_PER_GROUP)
                k_valid = k_valid & (b < batch)
                k, v, k_norm = _key_side(k_ptr, v_ptr, k_row, k_valid, stride_l, cols_in, col_mask, HAS_TAU)
                _, ds, unscaled, d_dot, d_norm_product = _pair_grads(
                    q, k, v, do, lse, delta, q_norm, k_norm, win, pos, valid, region, k_win, k_pos, k_valid,
                    k_region, bias_ptr, inv_tau, scale, mask_value, N, HAS_TAU, HAS_BIAS, SHIFTED, DOT_PRECISION,
                    False)
                dq += tl.dot(d_dot.to(k.dtype), k, input_precision=DOT_PRECISION)
                dq_norm += tl.sum(d_norm_product * k_norm[None, :], axis=1)
                if TAU_GRAD:
                    dtau_sum += tl.sum(tl.sum(ds * unscaled, axis=1), axis=0)
                if BIAS_GRAD:
                    folded = _fold_bias_grad(ds, pos, valid, k_pos, k_valid, chunk * BLOCK, key_chunk * BLOCK,
                                             POS_BLOCK, DOT_PRECISION)
                    _store_bias_grad(part_ptr, folded, chunk * BLOCK, key_chunk * BLOCK, i > 0, N, POS_BLOCK)
            if HAS_TAU:
                dq = _add_norm_grad(dq, q, q_norm, dq_norm)
            tl.store(dq_ptr, dq.to(elem), mask=mask)

            # 2. this chunk's keys against every query chunk: dk and dv.
            k, v, k_norm = _key_side(k_ptr, v_ptr, row, valid, stride_l, cols_in, col_mask, HAS_TAU)
            dk = tl.zeros([BLOCK, D_PAD], tl.float32)
            dv = tl.zeros([BLOCK, D_PAD], tl.float32)
            dk_norm = tl.zeros([BLOCK], tl.float32)
            for query_chunk in range(NUM_CHUNKS):
                q_row, q_win, q_pos, q_valid, q_region = _window_rows(
                    group, query_chunk * BLOCK + offs, T, F, shift_t, shift_f, num_windows, WT, WF, WINDOWS_PER_GROUP)
                q_valid = q_valid & (b < batch)
                q_other, do_other, lse_other, delta_other, q_other_norm = _query_side(
                    q_ptr, do_ptr, o_ptr, lse_rows, q_row, q_valid, stride_l, stride_dout_l, C, cols_in, cols_do,
                    cols, col_mask, HAS_TAU, True)
                p, _, _, d_dot, d_norm_product = _pair_grads(
                    q_other, k, v, do_other, lse_other, delta_other, q_other_norm, k_norm,
                    q_win, q_pos, q_valid, q_region, win, pos, valid, region, bias_ptr, inv_tau, scale,
                    mask_value, N, HAS_TAU, HAS_BIAS, SHIFTED, DOT_PRECISION, False)
                dv += tl.dot(tl.trans(p).to(do_other.dtype), do_other, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(d_dot).to(q_other.dtype), q_other, input_precision=DOT_PRECISION)
                dk_norm += tl.sum(d_norm_product * q_other_norm[:, None], axis=0)
            if HAS_TAU:
                dk = _add_norm_grad(dk, k, k_norm, dk_norm)
            tl.store(dq_ptr + C, dk.to(elem), mask=mask)
            tl.store(dq_ptr + 2 * C, dv.to(elem), mask=mask)
    if TAU_GRAD:
        tl.store(dtau_part_ptr + tl.program_id(0), dtau_sum)
    if NUM_CHUNKS == 1:
        if BIAS_GRAD:
            _store_bias_grad(part_ptr, dbias_sum, 0, 0, False, N, POS_BLOCK)


@triton.jit
def _sum_rows(part_ptr, rows, cols, c, col_mask, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Column sums over ``rows`` rows of the row-major fp32 [rows, cols] partials, for the columns
    ``c``, in a fixed order (so the gradients are deterministic)."""
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    for start in range(0, rows, BLOCK_ROWS):
        r = start + tl.arange(0, BLOCK_ROWS)
        mask = (r < rows)[:, None] & col_mask[None, :]
        acc += tl.load(part_ptr + r.to(tl.int64)[:, None] * cols + c[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _window_attention_bwd_finish(dbias_part_ptr, dtau_part_ptr, tau_ptr, dbias_ptr, dtau_ptr, bias_rows, bias_cols,
                                 tau_rows, num_heads, HAS_TAU: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The backward's partials summed into the bias and tau gradients, in one launch where torch
    took up to eleven small ones (tiny kernels in the replayed backward, host time in the eager
    one; by estimate a tenth of the backward, not yet timed): programs ``0 ..`` sum
    ``BLOCK_COLS`` columns of the bias partials each; the last sums the tau partials and applies
    the clamp's derivative."""
    pid = tl.program_id(0)
    bias_programs = tl.cdiv(bias_cols, BLOCK_COLS) if HAS_BIAS else 0
    c = tl.arange(0, BLOCK_COLS)
    if HAS_BIAS:
        if pid < bias_programs:
            col = pid * BLOCK_COLS + c
            total = _sum_rows(dbias_part_ptr, bias_rows, bias_cols, col, col < bias_cols, BLOCK_ROWS, BLOCK_COLS)
            tl.store(dbias_ptr + col, total.to(dbias_ptr.dtype.element_ty), mask=col < bias_cols)
    if HAS_TAU:
        if pid == bias_programs:
            heads = c < num_heads
            total = _sum_rows(dtau_part_ptr, tau_rows, num_heads, c, heads, BLOCK_ROWS, BLOCK_COLS)
            tau = tl.load(tau_ptr + c, mask=heads, other=1.0).to(tl.float32)
            # logits = unscaled / max(tau, 0.01): d/dtau = -unscaled / tau^2 where the clamp passes,
            # 0 where it holds (a where, not a product: tau = 0 would make that inf * 0 = NaN).
            clamped = tl.maximum(tau, 0.01)
            dtau = tl.where(tau >= 0.01, -total / (clamped * clamped), 0.0)
            tl.store(dtau_ptr + c, dtau.to(dtau_ptr.dtype.element_ty), mask=heads)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the launch tiles a window group: ``rows`` per tile (a power of two, at least 16 for
    ``tl.dot``) and ``num_warps``; for the backward, ``batch_per_program`` batch elements that one
    program takes in turn (``None``: ``default_batch_per_program``)."""
    rows: int
    num_warps: int
    batch_per_program: int | None = None


def default_batch_per_program(batch: int, programs_per_element: int, partial_bytes: int, qkv_bytes: int) -> int:
    """Batch elements per backward program. Each program writes a private [N, N] fp32 partial of
    the bias gradient (``partial_bytes``) for the window group whose qkv slice is ``qkv_bytes``.
    At the decoder's shape (4x4 windows, head dim 32, bf16) the partials are a third of qkv's size
    and one element a program stays (the layout the GPU has timed); 16x16 windows of head dim 32
    would make them five times qkv's size. Programs that take elements in turn and sum them keep
    the partials no larger than qkv, while leaving at least 2048 programs where the batch allows.
    (Looping costs registers: 112 -> 192 a thread at the decoder's shape on sm_90, by
    ``benches.sm90_compile``; the tiling sweep times looped candidates there.)"""
    wanted = next_power_of_2(cdiv(partial_bytes, qkv_bytes))
    parallel = 1
    while parallel * 2 <= batch and batch * programs_per_element // (parallel * 2) >= 2048:
        parallel *= 2
    return max(1, min(wanted, parallel))


def default_tiling(area: int, d_pad: int, fp32: bool, backward: bool) -> Tiling:
    """The tile for windows of ``area`` tokens. 16-bit inputs take one window to a tile (windows
    under the 16 rows ``tl.dot`` needs are packed to 16; larger ones are chunked at 64 rows, 32 in
    the backward) and one warp for 16-row tiles of head dims up to 32 (other shapes keep four: not
    yet timed). On an H100, at the decoder's shape (bf16, 4x4 windows, head dim 32), the
    graph-replayed sweeps of ``benches/bench_window_tiling.py`` (2026-11-27, two runs) read,
    forward and forward + backward: 16 rows and 1 warp 0.060 and 0.246 ms; 16 rows and 2 warps
    0.077 and 0.310 ms; 32 rows and 2 warps 0.072 and 0.340; 16 rows and 4 warps 0.120 and 0.455;
    64 packed rows and 4 warps (the earlier default) 0.115 and 0.440 ms. Small programs without the
    packed tiles' block-diagonal waste keep more loads in flight. (One warp compiles for sm_90 to 62
    and 118 registers a thread, no spills; the interpreter ignores warps, so the GPU tests,
    ``test_gpu_candidate_tilings`` among them, are what check it against the reference.) The backward of
    head dims over 64 keeps to 16 rows, and that of windows over 64 tokens (chunked) to 32 rows,
    which they need to stay near their registers (``python -m benches.sm90_compile``: no spills at
    the decoder's shape; 64-row chunks of 16x16 windows spilled 440 bytes a thread, 1.2 KB when
    their programs loop over batch elements, 32-row ones 72 bytes). float32 keeps the tiles chosen from
    register use alone, not yet timed: 32 rows of head dims up to 32 and 16 rows of larger ones
    (IEEE fp32 dots run on the FMA units with operands replicated per thread, and larger tiles
    spilled kilobytes of stack per thread)."""
    if fp32:
        packed = max(16, min(64, next_power_of_2(4 * area)))  # about four windows a tile
        rows = min(packed, 32 if d_pad <= 32 else 16)
    elif backward and d_pad > 64:
        rows = 16
    elif backward and area > 64:
        rows = 32  # chunked windows: 64-row backward tiles spilled (440 B a thread, 16x16 windows of 32)
    else:
        rows = max(16, min(64, next_power_of_2(area)))  # one window a tile
    if not fp32 and rows == 16 and d_pad <= 32:
        return Tiling(rows, 1)
    return Tiling(rows, 8 if not backward and rows * d_pad >= 64 * 128 else 4)


# None: default_tiling. Set through forced_tiling, by the tiling sweep of
# benches/bench_window_tiling.py and the tests that run every tiling against the reference.
TILING_OVERRIDE: Tiling | None = None


@contextlib.contextmanager
def forced_tiling(rows: int, num_warps: int, batch_per_program: int | None = None):
    """Launch forward and backward with this tiling inside the block (for measuring tilings; a
    process-wide setting, not for concurrent use). ``batch_per_program`` applies to the backward."""
    global TILING_OVERRIDE
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two of at least 16 (tl.dot), got {rows}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    if batch_per_program is not None and (not isinstance(batch_per_program, int) or batch_per_program < 1):
        raise ValueError(f"batch_per_program must be a positive int or None, got {batch_per_program!r}")
    previous, TILING_OVERRIDE = TILING_OVERRIDE, Tiling(rows, num_warps, batch_per_program)
    try:
        yield
    finally:
        TILING_OVERRIDE = previous


@contextlib.contextmanager
def _tiling_of_forward(tiling: Tiling | None):
    """The backward launches with the tiling its forward ran under: the forward decided from it
    whether to keep ``out`` (``_backward_reads_out``), and ``forced_tiling`` may have been entered
    or left in between. Without such a change (every call outside a tiling sweep) nothing is set."""
    global TILING_OVERRIDE
    if tiling == TILING_OVERRIDE:
        yield
        return
    previous, TILING_OVERRIDE = TILING_OVERRIDE, tiling
    try:
        yield
    finally:
        TILING_OVERRIDE = previous


def _tiling(c3: int, fp32: bool, grid, window, num_heads: int, backward: bool) -> tuple[int, int, int, Tiling]:
    """(BLOCK, windows per group, chunks per window, tiling) for qkv's last axis ``c3``. Windows of
    up to ``rows`` tokens are packed as many to a tile as fit; larger ones are split into
    ``rows``-row chunks."""
    (T, F), (wt, wf) = grid, window
    num_windows, area = (T // wt) * (F // wf), wt * wf
    d_pad = max(16, next_power_of_2(c3 // (3 * num_heads)))
    tiling = TILING_OVERRIDE or default_tiling(area, d_pad, fp32, backward)
    if area > tiling.rows:
        return tiling.rows, 1, cdiv(area, tiling.rows), tiling
    windows_per_group = min(tiling.rows // area, num_windows)
    return max(16, next_power_of_2(windows_per_group * area)), windows_per_group, 1, tiling


def _launch_args(qkv, grid, window, shift, num_heads, tau, bias, backward, bias_grad=True):
    """(runtime arguments, compile-time arguments, number of programs) of a launch; read-only
    dicts, shared between calls with the same shapes. ``bias_grad`` False (a frozen bias): the
    backward has no bias partials, so nothing to shrink by taking several batch elements a program."""
    return _launch_plan(qkv.shape[0], qkv.shape[-1], qkv.dtype == torch.float32, qkv.dtype.itemsize, grid, window,
                        shift, num_heads, tau is not None, bias is not None, backward, TILING_OVERRIDE,
                        bias is not None and bias_grad)


# Cached: working the plan out costs about as much host time as launching the kernel, and a
# decoder calls the same shapes 16 times a step.
@functools.lru_cache(maxsize=256)
def _launch_plan(batch, c3, fp32, itemsize, grid, window, shift, num_heads, has_tau, has_bias, backward,
                 tiling_override, bias_partials):
    head_dim = c3 // (3 * num_heads)
    (T, F), (wt, wf) = grid, window
    num_windows = (T // wt) * (F // wf)
    d_pad = max(16, next_power_of_2(head_dim))
    block, windows_per_group, num_chunks, tiling = _tiling(c3, fp32, grid, window, num_heads, backward)
    num_groups = cdiv(num_windows, windows_per_group)
    batch_per_program = 1
    if backward and bias_partials:  # without them nothing to shrink (tau's are a float a program)
        batch_per_program = tiling.batch_per_program or default_batch_per_program(
            batch, num_groups * num_chunks * num_heads, partial_bytes=4 * (wt * wf) ** 2,
            qkv_bytes=windows_per_group * wt * wf * 3 * head_dim * itemsize)
    runtime = dict(seq_len=T * F, T=T, F=F, shift_t=shift[0], shift_f=shift[1], num_heads=num_heads,
                   num_groups=num_groups, num_windows=num_windows, scale=head_dim**-0.5)
    meta = dict(WT=wt, WF=wf, WINDOWS_PER_GROUP=windows_per_group, NUM_CHUNKS=num_chunks, BLOCK=block,
                HEAD_DIM=head_dim, D_PAD=d_pad, HAS_TAU=has_tau, HAS_BIAS=has_bias,
                SHIFTED=any(shift), DOT_PRECISION="ieee" if fp32 else "tf32", num_warps=tiling.num_warps,
                num_stages=2)
    if backward:
        runtime["batch"] = batch
        meta["BATCH_PER_PROGRAM"] = batch_per_program
    num_programs = cdiv(batch, batch_per_program) * num_groups * num_chunks * num_heads
    return runtime, meta, num_programs


@on_tensors_device
def _forward(qkv, tau, bias, grid, window, shift, num_heads, mask_value):
    B, L, C3 = qkv.shape
    out = torch.empty(B, L, C3 // 3, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, L, device=qkv.device, dtype=torch.float32)
    runtime, meta, num_programs = _launch_args(qkv, grid, window, shift, num_heads, tau, bias, backward=False)
    _window_attention_fwd[(num_programs,)](
        qkv, tau, bias, out, lse, *qkv.stride(), mask_value=mask_value, **runtime, **meta)
    return out, lse


@on_tensors_device
def _backward(dout, qkv, tau, bias, out, lse, grid, window, shift, num_heads, mask_value, dqkv=None,
              tau_grad=True, bias_grad=True):
    """(dqkv, dtau, dbias). ``out``: the forward's output, read only where a window spans several
    tiles (``_backward_reads_out``; None elsewhere). ``dqkv``: the contiguous buffer to write qkv's
    gradient into (qkv itself for ``overwrite_qkv``; the caller checks that the launch allows it);
    by default a new one. ``tau_grad`` / ``bias_grad`` False: that gradient is not computed (a
    frozen tau or bias) and comes back empty, as for an absent one."""
    tau_grad, bias_grad = tau is not None and tau_grad, bias is not None and bias_grad
    area = window[0] * window[1]
    runtime, meta, num_programs = _launch_args(qkv, grid, window, shift, num_heads, tau, bias, backward=True,
                                               bias_grad=bias_grad)
    reads_out = meta["NUM_CHUNKS"] > 1
    if reads_out and out is None:
        raise ValueError("window_attention backward: out (the forward's output) is needed where a window spans "
                         f"several tiles ({window[0]}x{window[1]} windows here), got None")
    if dqkv is None:
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    num_groups, num_chunks = runtime["num_groups"], meta["NUM_CHUNKS"]
    batch_blocks = cdiv(qkv.shape[0], meta["BATCH_PER_PROGRAM"])
    dbias_part = torch.empty(batch_blocks, num_groups, num_heads, area, area, device=qkv.device,
                             dtype=torch.float32) if bias_grad else None
    dtau_part = torch.empty(batch_blocks, num_groups * num_chunks, num_heads, device=qkv.device,
                            dtype=torch.float32) if tau_grad else None
    pos_block = max(16, min(next_power_of_2(area), meta["BLOCK"]))
    _window_attention_bwd[(num_programs,)](
        qkv, tau, bias, out if reads_out else None, dout, lse, dqkv, dbias_part, dtau_part, *qkv.stride(),
        *dout.stride(), mask_value=mask_value, POS_BLOCK=pos_block, TAU_GRAD=tau_grad, BIAS_GRAD=bias_grad,
        **runtime, **meta)
    dtau = torch.empty(tau.shape, device=tau.device, dtype=tau.dtype) if tau_grad else qkv.new_empty(0)
    dbias = torch.empty(bias.shape, device=bias.device, dtype=bias.dtype) if bias_grad else qkv.new_empty(0)
    if tau_grad or bias_grad:
        # One column block serves every head's tau; 64 bias columns a program spread the bias
        # partials' reads over many SMs. At most 4096 fp32 accumulators a program (more only
        # where one block must hold over 4096 heads' tau).
        bias_cols = num_heads * area * area if bias_grad else 0
        block_cols = max(16, next_power_of_2(num_heads), 64 if bias_grad else 16)
        _window_attention_bwd_finish[(cdiv(bias_cols, block_cols) + int(tau_grad),)](
            dbias_part, dtau_part, tau if tau_grad else None, dbias, dtau, batch_blocks * num_groups, bias_cols,
            batch_blocks * num_groups * num_chunks, num_heads, HAS_TAU=tau_grad, HAS_BIAS=bias_grad,
            BLOCK_ROWS=max(1, 4096 // block_cols), BLOCK_COLS=block_cols)
    return dqkv, dtau, dbias


def _owns_its_memory(qkv: torch.Tensor) -> bool:
    """qkv made by an op (neither a leaf nor a view of one: a parameter's values must survive) and
    spanning its whole storage (a slice of a larger buffer shares it, and its version counter,
    with other slices)."""
    root = qkv._base if qkv._base is not None else qkv
    return (not root.is_leaf and qkv.is_contiguous() and qkv.storage_offset() == 0
            and qkv.untyped_storage().nbytes() == qkv.numel() * qkv.element_size())


def _backward_reads_out(qkv, grid, window, num_heads) -> bool:
    """Whether the backward reads the forward's output: only where a window spans several tiles.
    Where each fits one tile, the softmax correction ``dout . out`` is the row sum of ``p * dp``
    over the tile, so the output need not be kept for the backward (in the decoder it is then freed
    once the output projection's backward has run, a [B, L, C] tensor less at the backward's peak).
    The same tiling as the launch's (``_launch_plan``), without the batch, which may be symbolic
    under torch.compile."""
    _, _, num_chunks, _ = _tiling(qkv.shape[-1], qkv.dtype == torch.float32, grid, window, num_heads, backward=True)
    return num_chunks > 1


def _can_overwrite(qkv, grid, window, shift, num_heads, tau, bias) -> bool:
    """Whether the backward may write dqkv over qkv: qkv owns its memory (``_owns_its_memory``;
    the kernel writes dqkv contiguous), every window fits one tile (a chunked window's programs
    read rows that others write), and the graph is not kept for another backward (which would
    read qkv again)."""
    if not _owns_its_memory(qkv) or torch._C._autograd._get_current_graph_task_keep_graph():
        return False
    _, meta, _ = _launch_args(qkv, grid, window, shift, num_heads, tau, bias, backward=True)
    return meta["NUM_CHUNKS"] == 1


def _check_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value) -> None:
    """The op's arguments, checked: ``check_window_attention_args`` and the kernel's head dims."""
    head_dim, _ = check_window_attention_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value)
    if not 16 <= head_dim <= 128:  # the kernel's tiles; the reference itself takes any head_dim
        raise ValueError(f"head_dim must be in [16, 128], got {head_dim} (qkv last axis {qkv.shape[-1]}, "
                         f"{num_heads} heads)")


def _check_kernel_dtype(qkv: torch.Tensor) -> None:
    if qkv.dtype == torch.float64:
        raise TypeError("the Triton kernel takes float16, bfloat16 or float32 qkv, got float64")
    if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and interpreting():
        # Triton 3.6's interpreter multiplies bfloat16 tl.dot operands wrongly (errors of 1e8 seen):
        # an error rather than silently wrong numbers; the GPU computes it right.
        raise NotImplementedError("window_attention: Triton's interpreter computes bfloat16 tl.dot wrongly; on the "
                                  "CPU use float32 or float16 qkv (under CPU autocast, whose dtype is bfloat16 unless "
                                  "given, a float32 qkv is cast to it: autocast with dtype=torch.float16), or no "
                                  "TRITON_INTERPRET for the eager reference")


def _autocast_input(qkv: torch.Tensor) -> torch.Tensor:
    """qkv in the autocast dtype where autocast is on for its device and qkv is float32: the
    reference's matmuls take it so under autocast, and return that dtype (the decoder's qkv comes
    from a Linear, already in it)."""
    device_type = qkv.device.type
    if qkv.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return qkv.to(torch.get_autocast_dtype(device_type))
    return qkv


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index tau [H] and bias [H, A, A] as contiguous arrays (qkv and dout by strides)."""
    return t.contiguous() if t is not None else None


@torch.library.custom_op("audiomae::window_attention", mutates_args=())
def _window_attention_op(qkv: torch.Tensor, tau: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         grid: Sequence[int], window: Sequence[int], shift: Sequence[int], num_heads: int,
                         mask_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, C], logsumexp of each row's logits [B, heads, L] fp32, for the backward).

    Called directly (``torch.ops.audiomae.window_attention``) it checks its arguments as
    ``window_attention`` does and takes tau and bias of any strides."""
    grid, window, shift = as_pairs(grid, window, shift)
    _check_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value)
    _check_kernel_dtype(qkv)
    require_triton("window_attention", qkv)
    return _forward(qkv, _contiguous(tau), _contiguous(bias), grid, window, shift, num_heads, mask_value)


@_window_attention_op.register_fake
def _(qkv, tau, bias, grid, window, shift, num_heads, mask_value):
    B, L, C3 = qkv.shape
    return qkv.new_empty(B, L, C3 // 3), qkv.new_empty(B, num_heads, L, dtype=torch.float32)


@torch.library.custom_op("audiomae::window_attention_backward", mutates_args=())
def _window_attention_backward_op(
    dout: torch.Tensor, qkv: torch.Tensor, tau: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    out: Optional[torch.Tensor], lse: torch.Tensor, grid: Sequence[int], window: Sequence[int], shift: Sequence[int],
    num_heads: int, mask_value: float, tau_grad: bool = True, bias_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dtau, dbias); dtau and dbias are empty when tau or bias is None or its gradient is not
    asked for (``tau_grad`` / ``bias_grad`` False: a frozen table; ops cannot return None).

    ``out`` (the forward's output) may be None where every window fits one tile
    (``_backward_reads_out``): the autograd rule keeps it only where the backward reads it.
    Called directly it checks its arguments (those of the forward, and ``dout``, ``out``, ``lse``
    as the forward makes them) and takes ``dout`` in any float dtype and layout."""
    grid, window, shift = as_pairs(grid, window, shift)
    _check_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value)
    _check_kernel_dtype(qkv)
    B, L, C3 = qkv.shape
    checked = [("dout", dout, (B, L, C3 // 3), None), ("lse", lse, (B, num_heads, L), torch.float32)]
    if out is not None or _backward_reads_out(qkv, grid, window, num_heads):
        checked.append(("out", out, (B, L, C3 // 3), qkv.dtype))
    for name, t, shape, dtype in checked:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.device != qkv.device:
            raise ValueError(f"{name} must be a {list(shape)} tensor on {qkv.device}, got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype} (as the forward makes it), got {t.dtype}")
    require_triton("window_attention_backward", qkv)
    # The kernel reads out and lse as the forward wrote them (contiguous), dout by its strides.
    return _backward(dout.to(qkv.dtype), qkv, _contiguous(tau), _contiguous(bias),
                     out.contiguous() if out is not None else None, lse.contiguous(), grid, window, shift, num_heads,
                     mask_value, tau_grad=tau_grad, bias_grad=bias_grad)


@_window_attention_backward_op.register_fake
def _(dout, qkv, tau, bias, out, lse, grid, window, shift, num_heads, mask_value, tau_grad=True, bias_grad=True):
    # Contiguous whatever the strides of tau and bias, as the op returns them.
    dtau = tau.new_empty(tau.shape) if tau is not None and tau_grad else qkv.new_empty(0)
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_grad else qkv.new_empty(0)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), dtau, dbias


def _setup_context(ctx, inputs, output):
    qkv, tau, bias, grid, window, shift, num_heads, mask_value = inputs
    out, lse = output
    kept_out = out if _backward_reads_out(qkv, tuple(grid), tuple(window), num_heads) else None
    ctx.save_for_backward(qkv, tau, bias, kept_out, lse)
    ctx.args = (grid, window, shift, num_heads, mask_value)
    ctx.tiling = TILING_OVERRIDE
    ctx.mark_non_differentiable(lse)


@first_order_only("window_attention")
def _backward_rule(ctx, dout, _dlse):
    qkv, tau, bias, out, lse = ctx.saved_tensors
    tau_grad, bias_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    with _tiling_of_forward(ctx.tiling):
        dqkv, dtau, dbias = _window_attention_backward_op(dout, qkv, tau, bias, out, lse, *ctx.args, tau_grad, bias_grad)
    return (dqkv, dtau if tau is not None and tau_grad else None, dbias if bias is not None and bias_grad else None,
            None, None, None, None, None)


_window_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)


class _WindowAttentionFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the dispatcher's per-call cost
    (tens of microseconds, as much as the kernel itself at the decoder's shape). ``torch.compile``
    traces the custom ops instead."""

    @staticmethod
    def forward(ctx, qkv, tau, bias, grid, window, shift, num_heads, mask_value, overwrite_qkv):
        out, lse = _forward(qkv, tau, bias, grid, window, shift, num_heads, mask_value)
        kept_out = out if _backward_reads_out(qkv, grid, window, num_heads) else None
        ctx.save_for_backward(qkv, tau, bias, kept_out, lse)
        ctx.args = (grid, window, shift, num_heads, mask_value)
        ctx.tiling = TILING_OVERRIDE
        ctx.overwrite_qkv = overwrite_qkv
        return out

    @staticmethod
    @first_order_only("window_attention")  # double backward is an error, as for the op
    def backward(ctx, dout):
        qkv, tau, bias, out, lse = ctx.saved_tensors
        with _tiling_of_forward(ctx.tiling):
            if needs_custom_op():  # compiled autograd traces this backward: there it takes the op too
                dqkv, dtau, dbias = _window_attention_backward_op(dout, qkv, tau, bias, out, lse, *ctx.args,
                                                                  ctx.needs_input_grad[1], ctx.needs_input_grad[2])
            else:
                overwrite = (ctx.overwrite_qkv and ctx.needs_input_grad[0]
                             and _can_overwrite(qkv, *ctx.args[:4], tau, bias))
                dqkv, dtau, dbias = _backward(dout, qkv, tau, bias, out, lse, *ctx.args,
                                              dqkv=qkv.detach() if overwrite else None,
                                              tau_grad=ctx.needs_input_grad[1], bias_grad=ctx.needs_input_grad[2])
                if overwrite:
                    # Any other node that saved qkv and runs later now fails loudly (modified in
                    # place) instead of reading the gradient as qkv.
                    torch.autograd.graph.increment_version(qkv)
        return (dqkv, dtau if tau is not None and ctx.needs_input_grad[1] else None,
                dbias if bias is not None and ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


def window_attention(
    qkv: torch.Tensor,
    *,
    grid: Sequence[int],
    window: Sequence[int],
    shift: Sequence[int] = (0, 0),
    num_heads: int,
    tau: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask_value: float = -100.0,
    overwrite_qkv: bool = False,
) -> torch.Tensor:
    """qkv [B, L, 3*C] in token order on ``grid`` -> [B, L, C]; the contract is the module docstring.

    ``overwrite_qkv=True`` lets the backward write qkv's gradient over qkv's memory instead of a
    new qkv-sized buffer (the decoder's qkv projection output, read by nothing else, saves that
    much at the backward's peak). It is the caller's promise that nothing reads qkv after the
    backward. Another autograd node that saved qkv and runs later fails with PyTorch's in-place
    modification error, except where saved-tensor hooks hold it (non-reentrant checkpointing,
    offloading), which PyTorch does not version-check. It takes effect on the eager CUDA or
    interpreter path when qkv was made by an op (not a leaf or a view of one) and spans its whole
    contiguous storage, each window fits one tile and the graph is not retained; otherwise, and
    under ``torch.compile``, the gradient gets its own buffer (the same values either way)."""
    grid, window, shift = as_pairs(grid, window, shift)
    num_heads = plain_int(num_heads)
    _check_args(qkv, grid, window, shift, num_heads, tau, bias, mask_value)
    if not isinstance(overwrite_qkv, bool):
        raise TypeError(f"overwrite_qkv must be a bool, got {type(overwrite_qkv).__name__}")
    if not use_triton(qkv):
        return window_attention_reference(qkv, grid=grid, window=window, shift=shift, num_heads=num_heads,
                                          tau=tau, bias=bias, mask_value=mask_value)
    qkv = _autocast_input(qkv)
    _check_kernel_dtype(qkv)
    reject_autodiff_transforms("window_attention")
    reject_forward_tangents("window_attention", qkv, tau, bias)
    tau, bias = _contiguous(tau), _contiguous(bias)
    if needs_custom_op():
        out, _ = _window_attention_op(qkv, tau, bias, grid, window, shift, num_heads, float(mask_value))
        return out
    return _WindowAttentionFunction.apply(qkv, tau, bias, grid, window, shift, num_heads, float(mask_value),
                                          overwrite_qkv)
