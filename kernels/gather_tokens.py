"""Masked-token gather: keep the listed tokens of each sequence, with their positional embedding.

``gather_tokens(x, ids_keep, pos_embed=None)``
    ``x`` [B, L, C], ``ids_keep`` [B, K] int64, ``pos_embed`` [L, C] or [1, L, C] (optional).
    Returns [B, K, C] with ``out[b, j] = x[b, ids_keep[b, j]] + pos_embed[ids_keep[b, j]]``: the
    official ``torch.gather(x + pos_embed, 1, ids_keep[..., None].repeat(1, 1, C))`` without
    adding the embedding to the tokens that are thrown away and without the [B, K, C] index.

``gather_tokens_2d(x, ids_keep_t, ids_keep_f, grid, pos_embed=None)``
    AudioMAE fine-tuning's structured mask. ``x`` [B, T*F, C] holds token (t, f) at row t*F + f of
    ``grid = (T, F)``; ``ids_keep_t`` [B, Kt] and ``ids_keep_f`` [B, Kf] int64 list the time rows
    and frequency columns to keep. Returns [B, Kt*Kf, C] with
    ``out[b, i*Kf + j] = x[b, ids_keep_t[b, i]*F + ids_keep_f[b, j]]`` plus that token's embedding.

Supported: float16, bfloat16, float32 (``x`` and ``pos_embed`` may differ and promote as in
torch; the sum is taken in float32), and float64 when every float input is float64 (sum in
float64). Any sizes, including zero; any strides (nothing is copied to make inputs contiguous).
The output is a new contiguous tensor.

Gradients: ``x`` gets ``grad_out`` at the kept rows and zeros elsewhere; ``pos_embed`` gets the
same summed over the batch. With ``x``'s gradient alone (the models' fixed ``pos_embed``) and more
rows than kept ones, the backward scatters each kept row once and stores zeros to the rows no
position reads, in one launch; otherwise one kernel writes every row, zeros included, from a scan
of the index row (``scatters_owned_rows`` says why; both give the same bits). An index listed
twice in one sequence is correct: its gradients are summed in list order, so the result is
deterministic; each repeat costs the backward one more scan of the index row. No atomics
anywhere. Double backward is not supported.

Index checks: a wrong index dtype or shape is a TypeError / ValueError before anything runs.
Values outside [0, L) are a ValueError too, which costs one min/max reduction and one host sync
per call; ``check_indices=False`` skips it (for callers that build the indices themselves, such
as the models' mask generation). Compiled code checks too, when the graph runs (``range_checked``);
only fake tensors and CUDA-graph capture, which have no values to read, go unchecked. Unchecked out-of-range indices give unspecified values but
the kernels never touch memory outside their inputs.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run ``kernels.reference`` unless
``TRITON_INTERPRET=1``. The kernels are ``torch.library`` custom ops (``audiomae::gather_tokens``
and its backward) with fake implementations, so ``torch.compile(fullgraph=True)`` traces them;
eager calls reach the same launchers through a plain ``torch.autograd.Function`` instead, because
the custom-op dispatcher costs more host time than the kernels take (``needs_custom_op``).

This module also holds what ``kernels.unshuffle_tokens`` shares: input checks and
``gather_rows_backward``, the adjoint of a row gather.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import gather_tokens as reference
from kernels._dispatch import (check_same_device, first_order_only, needs_custom_op, on_tensors_device,
                              reject_autodiff_transforms, reject_forward_tangents, require_triton, use_triton)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Programs to launch when a kernel must reduce over the batch: about two per H100 SM. More
# programs keep more bytes in flight but write more fp32 partial sums to add up afterwards.
REDUCING_PROGRAMS = 256


# ----------------------------------------------------------------------------------------------
# Input checks shared with unshuffle_tokens
# ----------------------------------------------------------------------------------------------
def check_floats(**tensors: torch.Tensor | None) -> torch.dtype:
    """The promoted dtype of the named float tensors; float64 only when all are float64."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    dtypes = {t.dtype for t in present.values()}
    if torch.float64 in dtypes and len(dtypes) > 1:
        found = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise TypeError(f"float64 does not mix with other dtypes here ({found})")
    out = None
    for dtype in dtypes:
        out = dtype if out is None else torch.promote_types(out, dtype)
    return out


def check_index(ids: torch.Tensor, name: str, batch: int) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name} must be [B={batch}, N], got shape {tuple(ids.shape)}")


def check_rows_backward_args(grad: torch.Tensor, ids: torch.Tensor, name: str, num_rows: int) -> None:
    """A backward op's ``grad`` [B, N, C] and its ``ids`` [B, N] (int64), for direct calls: the
    kernels take B and N from ``grad`` and read ``ids`` there."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 3:
        raise ValueError(f"grad must be a [B, N, C] tensor, got {getattr(grad, 'shape', type(grad).__name__)}")
    check_floats(grad=grad)
    check_index(ids, name, grad.shape[0])
    if ids.shape[1] != grad.shape[1]:
        raise ValueError(f"{name} {tuple(ids.shape)} does not match grad {tuple(grad.shape)}: one index per row of grad")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"the number of rows must be an int >= 0, got {num_rows!r}")
    check_same_device(grad=grad, **{name: ids})


def as_table(t: torch.Tensor | None, name: str, rows: int, channels: int) -> torch.Tensor | None:
    """``t`` [rows, C] or [1, rows, C] as a [rows, C] view (no copy)."""
    if t is None:
        return None
    if tuple(t.shape) not in ((rows, channels), (1, rows, channels)):
        raise ValueError(f"{name} must be [{rows}, {channels}] or [1, {rows}, {channels}], got {tuple(t.shape)}")
    return t if t.dim() == 2 else t.reshape(rows, channels)


def _values_readable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if torch._subclasses.fake_tensor.is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_index_range(*checks: tuple[torch.Tensor, int, str]) -> None:
    """Every ``(ids, upper, name)`` must hold values in [0, upper).

    One min/max reduction per index tensor and a single host sync for all of them; skipped where
    values cannot be read without breaking a trace or a graph capture.
    """
    checks = [c for c in checks if c[0].numel() > 0 and _values_readable(c[0])]
    if not checks:
        return
    bounds = torch.stack([v for ids, _, _ in checks for v in torch.aminmax(ids)]).tolist()
    for i, (_, upper, name) in enumerate(checks):
        lo, hi = bounds[2 * i], bounds[2 * i + 1]
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} holds values in [{lo}, {hi}]; they must lie in [0, {upper})")


@torch.library.custom_op("audiomae::check_index_range", mutates_args=())
def _checked_index_op(ids: torch.Tensor, upper: int, name: str) -> torch.Tensor:
    check_index_range((ids, upper, name))
    return ids.clone()  # an op's output may not alias its input; [B, K] int64 is small


@_checked_index_op.register_fake
def _(ids, upper, name):
    return torch.empty_like(ids)


def range_checked(*checks: tuple[torch.Tensor, int, str]) -> list[torch.Tensor]:
    """``check_index_range`` that also holds in compiled code: the index tensors to use from here on.

    Eagerly the check runs now and the indices come back as they are. While ``torch.compile``
    traces, each index goes through ``audiomae::check_index_range``, an identity op whose body
    checks the real values when the compiled graph runs (the kernels consume its output, so no
    pass can drop it); so under torch.func transforms (vmap, functionalize), whose wrapped tensors
    have no values to read here. Fake tensors and CUDA-graph capture have no values to check.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return [torch.ops.audiomae.check_index_range(ids, upper, name) for ids, upper, name in checks]
    check_index_range(*checks)
    return [ids for ids, _, _ in checks]


# ----------------------------------------------------------------------------------------------
# Launch parameters shared with unshuffle_tokens
# ----------------------------------------------------------------------------------------------
def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums and partial sums are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


# Plain-Python twins of triton.cdiv and triton.next_power_of_2: those are constexpr functions,
# about 1.5 us per host call, and a forward plus backward makes up to a dozen of them.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def row_tile(channels: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a streaming row kernel: 4096-element tiles, up to 256 channels
    wide so a bf16 row segment is 512 contiguous bytes, 16-byte vectors per thread."""
    block_c = min(256, next_power_of_2(channels))
    return max(1, min(64, 4096 // block_c)), block_c


def batch_splits(batch: int, tiles_per_batch: int, target_programs: int | None) -> tuple[int, int]:
    """(splits, sequences per split) for a kernel launching ``tiles_per_batch`` programs per split.

    Without a target every program takes one sequence. A kernel that sums over the batch writes
    one partial sum per split, so it gets as few splits as give about ``target_programs``
    programs, each looping over its run of sequences.
    """
    if target_programs is None:
        return batch, 1
    per_split = cdiv(batch, min(batch, max(1, cdiv(target_programs, tiles_per_batch))))
    return cdiv(batch, per_split), per_split


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def tile_rows(num_rows, per_batch, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a streaming row kernel over the flattened [B * per_batch, C] output:
    row and channel indices, their bounds masks, and each row's batch and position in its batch."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols, rows < num_rows, cols < C, rows // per_batch, rows % per_batch


@triton.jit
def _gather_kernel(
    x_ptr, ids_ptr, pos_ptr, out_ptr,
    num_rows, K, L, C,
    stride_xb, stride_xl, stride_xc,
    stride_ib, stride_ik,
    stride_pl, stride_pc,
    HAS_POS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (BLOCK_R output rows of the flattened [B*K], BLOCK_C channels).
    rows, cols, row_ok, col_ok, b, j = tile_rows(num_rows, K, C, BLOCK_R, BLOCK_C)
    src = tl.load(ids_ptr + b * stride_ib + j * stride_ik, mask=row_ok, other=-1)
    src_ok = row_ok & (src >= 0) & (src < L)
    load_mask = src_ok[:, None] & col_ok[None, :]
    val = tl.load(
        x_ptr + b[:, None] * stride_xb + src[:, None] * stride_xl + cols[None, :] * stride_xc,
        mask=load_mask, other=0.0,
    ).to(ACC_DTYPE)
    if HAS_POS:
        val += tl.load(pos_ptr + src[:, None] * stride_pl + cols[None, :] * stride_pc, mask=load_mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _next_match(ids_ptr, stride_in, N, table_rows, after, BLOCK_N: tl.constexpr):
    """For each table row, the first list position n > after with ids[n] == row (N when there is
    none), and how many such positions there are."""
    first = tl.zeros_like(after) + N
    count = tl.zeros_like(after)
    # A while loop, not range(0, N, ...): Triton 3.6's interpreter cannot take a runtime bound
    # with numpy >= 2.4.
    n0 = tl.full([], 0, tl.int32)
    while n0 < N:
        n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + n.to(tl.int64) * stride_in, mask=n < N, other=-1)
        hit = (ids[None, :] == table_rows[:, None]) & (n[None, :] > after[:, None])
        first = tl.minimum(first, tl.min(tl.where(hit, n[None, :], N), axis=1))
        count += tl.sum(hit.to(tl.int32), axis=1)
        n0 += BLOCK_N
    return first, count


@triton.jit
def _sum_in_list_order(grad_rows, stride_gn, ids_row, stride_in, N, keys, first, count, take, col_ok,
                       ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """For each key, the gradient rows of every list position whose index equals it, added in
    list order (deterministic): ``first`` and ``count`` are ``_next_match``'s (the first such
    position and how many there are); rows where ``take`` is False give zeros."""
    n = first
    acc = tl.load(grad_rows + n[:, None].to(tl.int64) * stride_gn, mask=(take & (n < N))[:, None] & col_ok[None, :],
                  other=0.0).to(ACC_DTYPE)
    repeats = tl.max(tl.where(take, count, 1), axis=0) - 1
    while repeats > 0:
        n, count = _next_match(ids_row, stride_in, N, keys, n, BLOCK_N)
        acc += tl.load(grad_rows + n[:, None].to(tl.int64) * stride_gn,
                       mask=(take & (n < N))[:, None] & col_ok[None, :], other=0.0).to(ACC_DTYPE)
        repeats -= 1
    return acc


@triton.jit
def _gather_backward_kernel(
    grad_ptr, ids_ptr, grad_table_ptr, row_sum_ptr,
    B, N, M, C, batches_per_split, num_row_blocks,
    stride_gb, stride_gn, stride_gc,
    stride_ib, stride_in,
    WRITE_TABLE: tl.constexpr, WRITE_ROW_SUM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (BLOCK_M table rows, BLOCK_C channels, run of sequences). Each table row
    # finds the list positions that read it by scanning its sequence's index row (short: K or
    # L int64s, L2-resident, shared by every channel block), so every output row is written
    # exactly once, zeros included, without atomics or an inverse map.
    pid = tl.program_id(0)
    split = pid // num_row_blocks
    table_rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    out_mask = (table_rows < M)[:, None] & col_ok[None, :]
    out_offsets = table_rows[:, None] * C + cols[None, :]
    row_sum = tl.zeros([BLOCK_M, BLOCK_C], ACC_DTYPE)
    no_match = tl.full([BLOCK_M], -1, tl.int32)
    b = split * batches_per_split
    b_end = tl.minimum(b + batches_per_split, B)
    while b < b_end:
        ids_row = ids_ptr + b.to(tl.int64) * stride_ib
        grad_rows = grad_ptr + b.to(tl.int64) * stride_gb + cols[None, :] * stride_gc
        first, count = _next_match(ids_row, stride_in, N, table_rows, no_match, BLOCK_N)
        acc = _sum_in_list_order(grad_rows, stride_gn, ids_row, stride_in, N, table_rows, first, count,
                                 table_rows < M, col_ok, ACC_DTYPE, BLOCK_N)
        if WRITE_TABLE:
            tl.store(grad_table_ptr + b.to(tl.int64) * M * C + out_offsets, acc.to(grad_table_ptr.dtype.element_ty), mask=out_mask)
        if WRITE_ROW_SUM:
            row_sum += acc
        b += 1
    if WRITE_ROW_SUM:
        tl.store(row_sum_ptr + split.to(tl.int64) * M * C + out_offsets, row_sum.to(row_sum_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _scatter_owned_rows_kernel(
    grad_ptr, ids_ptr, table_ptr,
    N, M, C, list_blocks, zero_blocks,
    stride_gb, stride_gn, stride_gc,
    stride_ib, stride_in,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per (sequence, block, BLOCK_C channels); a sequence's first list_blocks blocks
    # are BLOCK_R list positions each, the next zero_blocks BLOCK_Z table rows each. Every table
    # row is written once, in one launch, with no fill beforehand:
    # - a list position writes its table row only if it is the first position that reads it, and
    #   writes there every reading position's gradient summed in list order: the sums of
    #   _gather_backward_kernel, in its order, so both give the same bits;
    # - a table row that no position reads gets zeros from its row block's program.
    pid = tl.program_id(0)
    blocks = list_blocks + zero_blocks
    b = (pid // blocks).to(tl.int64)
    block = pid % blocks
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ids_row = ids_ptr + b * stride_ib
    if block < list_blocks:
        n_own = block * BLOCK_R + tl.arange(0, BLOCK_R)
        key = tl.load(ids_row + n_own.to(tl.int64) * stride_in, mask=n_own < N, other=-1)
        valid = (n_own < N) & (key >= 0) & (key < M)
        # Positions past N and out-of-range indices own nothing (whatever they match is never used).
        first, count = _next_match(ids_row, stride_in, N, key, tl.full([BLOCK_R], -1, tl.int32), BLOCK_N)
        owner = valid & (first == n_own)
        grad_rows = grad_ptr + b * stride_gb + cols[None, :] * stride_gc
        acc = _sum_in_list_order(grad_rows, stride_gn, ids_row, stride_in, N, key, first, count, owner, col_ok,
                                 ACC_DTYPE, BLOCK_N)
        out_rows = b * M + tl.where(owner, key, 0)
        tl.store(table_ptr + out_rows[:, None] * C + cols[None, :], acc.to(table_ptr.dtype.element_ty),
                 mask=owner[:, None] & col_ok[None, :])
    else:
        rows = (block - list_blocks) * BLOCK_Z + tl.arange(0, BLOCK_Z)
        _, readers = _next_match(ids_row, stride_in, N, rows, tl.full([BLOCK_Z], -1, tl.int32), BLOCK_N)
        unread = (rows < M) & (readers == 0)
        zeros = tl.zeros([BLOCK_Z, BLOCK_C], table_ptr.dtype.element_ty)
        tl.store(table_ptr + (b * M + rows)[:, None] * C + cols[None, :], zeros, mask=unread[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# The forward's tile candidates (rows, channels, warps a program) that benches/bench_tokens.py times
# (replayed) beside the default, ``row_tile`` with 4 warps ((16, 256, 4) at the C = 768):
# its forward read 8.3 us back to back on the H200 (2026-11-28), 59 % of copy bandwidth.
GATHER_TILING_CANDIDATES = ((16, 256, 4), (32, 256, 4), (8, 256, 4), (32, 256, 8), (64, 256, 8), (16, 128, 4))


@on_tensors_device
def _gather_forward(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None,
                    tiling: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The gather's launch; ``tiling``: (rows, channels, warps) a program, the benchmark's
    candidates (channels capped at C's power of two); every tiling gives the same bits."""
    B, L, C = x.shape
    K = ids_keep.shape[1]
    out_dtype = check_floats(x=x, pos_embed=pos_embed)
    out = torch.empty((B, K, C), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_c = row_tile(C)
    num_warps = 4
    if tiling is not None:
        block_r, block_c, num_warps = tiling[0], min(tiling[1], next_power_of_2(C)), tiling[2]
    pos = pos_embed if pos_embed is not None else x
    pos_strides = pos_embed.stride() if pos_embed is not None else (0, 0)
    grid = (cdiv(B * K, block_r), cdiv(C, block_c))
    _gather_kernel[grid](
        x, ids_keep, pos, out,
        B * K, K, L, C,
        *x.stride(), *ids_keep.stride(), *pos_strides,
        HAS_POS=pos_embed is not None, ACC_DTYPE=TL_DTYPES[accumulate_dtype(out_dtype)],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def scatters_owned_rows(num_rows: int, list_len: int) -> bool:
    """Whether ``gather_rows_backward`` scatters the listed rows into the table and writes zeros to
    the rest (``_scatter_owned_rows``) rather than writing every table row from a scan of its
    sequence's index row (``_gather_backward_kernel``). Taken when the table has more rows than the
    list, as in the encoder's gather (512 rows, 102 listed): most of its rows are zeros, which a
    program stores as soon as one read of the index row says nobody reads them, while the scan
    puts the gradient's load between that read and every row's store. The scan stays for short
    tables (the decoder's kept rows, read from a 512-long list) and whenever the batch sum is
    wanted, which must visit every table row anyway."""
    return num_rows > list_len


# The scatter's tiles: list positions and zero rows a program, channels a program, warps.
# benches/bench_tokens.py times every candidate at the shape (``kernel_scatter_<tiling>_graph``).
# On the H200 (2026-11-28, gather forward and backward replayed) (8, 16, 256, 4) read 33.7 us, the
# old default (16, 32, 256, 4) 35.5, (16, 16, 256, 4) 38.1, (8, 16, 128, 2) 38.2, (16, 32, 256, 8)
# 47.6, (16, 32, 128, 4) 50.7 and (4, 8, 64, 1) 55.3: fewer rows a program at 256 channels and 4
# warps paid, so the candidates now probe around the new default (the three slowest dropped).
SCATTER_TILING = (8, 16, 256, 4)
SCATTER_TILING_CANDIDATES = ((8, 16, 256, 4), (16, 32, 256, 4), (4, 16, 256, 4), (8, 8, 256, 4),
                             (4, 8, 256, 4), (8, 16, 256, 2), (4, 8, 256, 2))


def _scatter_owned_rows(grad: torch.Tensor, ids: torch.Tensor, num_rows: int, table_dtype: torch.dtype,
                        fill_first: bool = False, tiling: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``gather_rows_backward``'s ``grad_table`` by scatter and zeros: see ``scatters_owned_rows``.
    ``fill_first`` is the strategy this one replaced, kept for the benchmark's comparison: the
    table zero-filled by torch first, then the scatter alone. ``tiling``: (list positions, zero
    rows, channels, warps) a program, default ``SCATTER_TILING`` (channels capped at C's power of
    two); the benchmark's candidates. Every tiling gives the same bits."""
    B, N, C = grad.shape
    M = num_rows
    empty = torch.zeros if fill_first else torch.empty
    grad_table = empty((B, M, C), dtype=table_dtype, device=grad.device)
    if B * M * C == 0 or (fill_first and N == 0):
        return grad_table
    block_r, block_z, block_c, num_warps = tiling or SCATTER_TILING
    block_n = min(128, next_power_of_2(max(N, 1)))  # the encoder's 102 kept positions in one pass
    block_c = min(block_c, next_power_of_2(C))
    list_blocks, zero_blocks = cdiv(N, block_r), 0 if fill_first else cdiv(M, block_z)
    _scatter_owned_rows_kernel[(B * (list_blocks + zero_blocks), cdiv(C, block_c))](
        grad, ids, grad_table,
        N, M, C, list_blocks, zero_blocks,
        *grad.stride(), *ids.stride(),
        ACC_DTYPE=TL_DTYPES[accumulate_dtype(grad.dtype)],
        BLOCK_R=block_r, BLOCK_Z=block_z, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_table


@on_tensors_device
def gather_rows_backward(
    grad: torch.Tensor,
    ids: torch.Tensor,
    num_rows: int,
    table_dtype: torch.dtype | None,
    sum_dtype: torch.dtype | None,
    *,
    scatter: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The adjoint of ``out[b, n] = table[b, ids[b, n]]`` for table rows [0, num_rows).

    ``grad`` [B, N, C], ``ids`` [B, N]. Returns ``grad_table`` [B, num_rows, C] in
    ``table_dtype`` with ``grad_table[b, m] = sum of grad[b, n] over n with ids[b, n] == m``
    (zeros when none; indices outside [0, num_rows) feed nothing), and its sum over the batch,
    [num_rows, C] in ``sum_dtype``; either is skipped (None) when its dtype is None.
    ``scatter`` picks the strategy (see ``scatters_owned_rows``, the default); both give the same
    bits. The scatter gives the table's gradient alone: the batch sum always takes the scan.
    """
    B, N, C = grad.shape
    M = num_rows
    device = grad.device
    if scatter is None:
        scatter = scatters_owned_rows(M, N) and table_dtype is not None and sum_dtype is None
    elif scatter and (table_dtype is None or sum_dtype is not None):
        raise ValueError("scatter=True gives the table's gradient alone: table_dtype set, sum_dtype None")
    if scatter:
        return _scatter_owned_rows(grad, ids, M, table_dtype), None
    grad_table = torch.empty((B, M, C), dtype=table_dtype, device=device) if table_dtype is not None else None
    row_sum = None
    if sum_dtype is not None:
        row_sum = torch.zeros((M, C), dtype=sum_dtype, device=device) if B == 0 else torch.empty((M, C), dtype=sum_dtype, device=device)
    if B * M * C == 0 or (grad_table is None and row_sum is None):
        return grad_table, row_sum
    block_m, block_n = 32, 64
    block_c = min(256, next_power_of_2(C))
    row_blocks, col_blocks = cdiv(M, block_m), cdiv(C, block_c)
    splits, per_split = batch_splits(B, row_blocks * col_blocks, REDUCING_PROGRAMS if row_sum is not None else None)
    acc_dtype = accumulate_dtype(grad.dtype)
    partials = row_sum
    if row_sum is not None and splits > 1:
        partials = torch.empty((splits, M, C), dtype=acc_dtype, device=device)
    _gather_backward_kernel[(row_blocks * splits, col_blocks)](
        grad, ids, grad_table if grad_table is not None else grad, partials if partials is not None else grad,
        B, N, M, C, per_split, row_blocks,
        *grad.stride(), *ids.stride(),
        WRITE_TABLE=grad_table is not None, WRITE_ROW_SUM=row_sum is not None, ACC_DTYPE=TL_DTYPES[acc_dtype],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=8 if block_c >= 256 else 4,
    )
    if partials is not row_sum:
        row_sum = partials.sum(0).to(sum_dtype)
    return grad_table, row_sum


# ----------------------------------------------------------------------------------------------
# Registration: a torch.library op for tracers, an autograd.Function for eager calls
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("audiomae::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    # Called directly (torch.ops.audiomae.gather_tokens) the op takes gather_tokens' argument forms
    # and shape checks, not its index range check (one host sync; out-of-range ids read out of bounds).
    pos = _checked_gather_args(x, ids_keep, pos_embed)
    require_triton("gather_tokens", x)
    return _gather_forward(x, ids_keep, pos)


@_gather_tokens_op.register_fake
def _(x, ids_keep, pos_embed):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]), dtype=check_floats(x=x, pos_embed=pos_embed))


@torch.library.custom_op("audiomae::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(
    grad: torch.Tensor, ids_keep: torch.Tensor, num_rows: int, x_dtype: torch.dtype | None, pos_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_rows_backward_args(grad, ids_keep, "ids_keep", num_rows)
    require_triton("gather_tokens_backward", grad)
    # A custom op cannot return None: a gradient nobody asked for comes back empty.
    grad_x, grad_pos = gather_rows_backward(grad, ids_keep, num_rows, x_dtype, pos_dtype)
    return tuple(g if g is not None else grad.new_empty(0) for g in (grad_x, grad_pos))


@_gather_tokens_backward_op.register_fake
def _(grad, ids_keep, num_rows, x_dtype, pos_dtype):
    B, _, C = grad.shape
    grad_x = grad.new_empty((B, num_rows, C), dtype=x_dtype) if x_dtype is not None else grad.new_empty(0)
    grad_pos = grad.new_empty((num_rows, C), dtype=pos_dtype) if pos_dtype is not None else grad.new_empty(0)
    return grad_x, grad_pos


def _setup_context(ctx, inputs, output):
    x, ids_keep, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.num_rows = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None
    ctx.pos_shape = pos_embed.shape if pos_embed is not None else None


def _input_grads(ctx, grad, rows_backward):
    """Gradients of (x, ids_keep, pos_embed) from ``rows_backward``: ``gather_rows_backward`` or its op."""
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_pos = ctx.needs_input_grad
    grad_x, grad_pos = rows_backward(
        grad, ids_keep, ctx.num_rows, ctx.x_dtype if need_x else None, ctx.pos_dtype if need_pos else None
    )
    # [L, C] from the kernel; a direct op call may have passed pos_embed as [1, L, C].
    return (grad_x if need_x else None), None, (grad_pos.reshape(ctx.pos_shape) if need_pos else None)


@first_order_only("gather_tokens")
def _backward(ctx, grad):
    return _input_grads(ctx, grad, torch.ops.audiomae.gather_tokens_backward)


_gather_tokens_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_backward(ctx, grad):
    # Compiled autograd traces the Function's backward: there it takes the op too.
    rows_backward = torch.ops.audiomae.gather_tokens_backward if needs_custom_op() else gather_rows_backward
    return _input_grads(ctx, grad, rows_backward)


class _GatherTokens(torch.autograd.Function):
    """``audiomae::gather_tokens`` for eager calls: the same launchers, context and gradients."""

    # forward takes ctx itself: with a separate setup_context, Function.apply binds the arguments
    # through inspect.signature on every call, which adds ~24 us to a ~7 us apply (dev CPU).
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed):
        _setup_context(ctx, (x, ids_keep, pos_embed), None)
        return _gather_forward(x, ids_keep, pos_embed)

    # double backward is an error, as for the op
    backward = staticmethod(first_order_only("gather_tokens")(_eager_backward))


class _GatherTokens2d(_GatherTokens):
    """``_GatherTokens`` for ``gather_tokens_2d``: its refusals name the public op."""

    backward = staticmethod(first_order_only("gather_tokens_2d")(_eager_backward))


def _gather(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None, name: str = "gather_tokens") -> torch.Tensor:
    """The Triton gather on checked inputs, ``pos`` [L, C] or None; ``name``: the public op, for errors."""
    reject_autodiff_transforms(name)
    reject_forward_tangents(name, x, pos)
    if needs_custom_op():
        return torch.ops.audiomae.gather_tokens(x, ids_keep, pos)
    return (_GatherTokens if name == "gather_tokens" else _GatherTokens2d).apply(x, ids_keep, pos)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_tokens(x: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):  # check_floats skips None: optional inputs may be
        raise TypeError(f"x must be a tensor [B, L, C], got {type(x).__name__}")
    check_floats(x=x, pos_embed=pos_embed)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got shape {tuple(x.shape)}")
    return as_table(pos_embed, "pos_embed", x.shape[1], x.shape[2])


def _checked_gather_args(x, ids_keep, pos_embed) -> torch.Tensor | None:
    """Shape, dtype and device checks of a gather (not the indices' range); ``pos_embed`` as [L, C]."""
    pos = _check_tokens(x, pos_embed)
    check_index(ids_keep, "ids_keep", x.shape[0])
    check_same_device(x=x, ids_keep=ids_keep, pos_embed=pos_embed)
    return pos


def gather_tokens(
    x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None, *, check_indices: bool = True
) -> torch.Tensor:
    """``x`` [B, L, C], ``ids_keep`` [B, K] int64, ``pos_embed`` [L, C] or [1, L, C] -> [B, K, C]
    with ``out[b, j] = x[b, ids_keep[b, j]] + pos_embed[ids_keep[b, j]]``. See the module doc."""
    pos = _checked_gather_args(x, ids_keep, pos_embed)
    if check_indices:
        (ids_keep,) = range_checked((ids_keep, x.shape[1], "ids_keep"))
    if not use_triton(x):
        return reference.gather_tokens(x, ids_keep, pos_embed)
    return _gather(x, ids_keep, pos)


def gather_tokens_2d(
    x: torch.Tensor,
    ids_keep_t: torch.Tensor,
    ids_keep_f: torch.Tensor,
    grid: tuple[int, int],
    pos_embed: torch.Tensor | None = None,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """``x`` [B, T*F, C] on ``grid = (T, F)``, ``ids_keep_t`` [B, Kt], ``ids_keep_f`` [B, Kf] int64
    -> [B, Kt*Kf, C] with ``out[b, i*Kf + j] = x[b, ids_keep_t[b, i]*F + ids_keep_f[b, j]]`` (+ that
    token's ``pos_embed``). See the module doc."""
    pos = _check_tokens(x, pos_embed)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(n, bool) or not hasattr(type(n), "__index__") for n in grid)):  # ints, SymInts
        raise TypeError(f"grid must be two ints (T, F), got {grid!r}")
    T, F = grid
    if T < 0 or F < 0:
        raise ValueError(f"grid must be (T, F) with T, F >= 0, got {tuple(grid)}")
    if T * F != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} holds {T * F} tokens but x has {x.shape[1]}")
    check_index(ids_keep_t, "ids_keep_t", x.shape[0])
    check_index(ids_keep_f, "ids_keep_f", x.shape[0])
    check_same_device(x=x, ids_keep_t=ids_keep_t, ids_keep_f=ids_keep_f, pos_embed=pos_embed)
    if check_indices:
        ids_keep_t, ids_keep_f = range_checked((ids_keep_t, T, "ids_keep_t"), (ids_keep_f, F, "ids_keep_f"))
    if not use_triton(x):
        return reference.gather_tokens_2d(x, ids_keep_t, ids_keep_f, (T, F), pos_embed)
    # The kept tokens of a sequence are the product of its kept rows and columns: one small
    # [B, Kt*Kf] index, then the same gather (and the same duplicate-safe backward).
    kept = ids_keep_t.shape[1] * ids_keep_f.shape[1]  # explicit: -1 cannot be inferred for B = 0
    ids_keep = (ids_keep_t[:, :, None] * F + ids_keep_f[:, None, :]).reshape(x.shape[0], kept)
    return _gather(x, ids_keep, pos, "gather_tokens_2d")
