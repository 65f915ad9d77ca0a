"""gather_tokens, gather_tokens_2d and unshuffle_tokens against their float64 eager references.

On the CPU the Triton kernels run through the interpreter (conftest sets TRITON_INTERPRET=1), so
shapes stay small and odd; the ``gpu`` tests repeat the checks at the issue's sizes on CUDA.
Every kernel output is allocated by a poisoned ``torch.empty`` (NaN-filled), so a row a kernel
forgets to write shows up as NaN instead of as lucky zeros.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels.gather_tokens import gather_tokens, gather_tokens_2d
from kernels.reference import gather_tokens as gather_reference
from kernels.reference import unshuffle_tokens as unshuffle_reference
from kernels.unshuffle_tokens import unshuffle_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected64, rtol=tol, atol=tol)


def leaves(*tensors, dtype):
    """The inputs in ``dtype`` and, separately, the same values in float64, all requiring grad."""
    low = [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]
    high = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    return low, high


def grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, wanted, grad_out)


def random_ids(B, L, K, generator=None):
    return torch.stack([torch.randperm(L, generator=generator)[:K] for _ in range(B)]).to(DEVICE)


def check_gather(x, ids_keep, pos_embed, dtype, **kw):
    (xl, pl), (xh, ph) = leaves(x, pos_embed, dtype=dtype)
    out = gather_tokens(xl, ids_keep, pl, **kw)
    ref = gather_reference.gather_tokens(xh, ids_keep, ph)
    assert_matches(out, ref, dtype)
    g = torch.randn(out.shape, device=DEVICE).to(dtype)
    for got, want in zip(grads(out, (xl, pl), g), grads(ref, (xh, ph), g.double())):
        assert_matches(got, want, dtype)


def check_unshuffle(x, ids_restore, mask_token, pos_embed, dtype):
    (xl, ml, pl), (xh, mh, ph) = leaves(x, mask_token, pos_embed, dtype=dtype)
    out = unshuffle_tokens(xl, ids_restore, ml, pl)
    ref = unshuffle_reference.unshuffle_tokens(xh, ids_restore, mh, ph)
    assert_matches(out, ref, dtype)
    g = torch.randn(out.shape, device=DEVICE).to(dtype)
    for got, want in zip(grads(out, (xl, ml, pl), g), grads(ref, (xh, mh, ph), g.double())):
        assert_matches(got, want, dtype)


# ------------------------------------------------------------------------------------------------
# gather_tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L,K,C", [(1, 7, 3, 5), (2, 19, 6, 33), (3, 40, 9, 70), (2, 13, 13, 8)])
@pytest.mark.parametrize("pos_shape", [None, "LC", "1LC"])
def test_gather_float32(seed, B, L, K, C, pos_shape):
    x = torch.randn(B, L, C, device=DEVICE)
    pos = None if pos_shape is None else torch.randn((L, C) if pos_shape == "LC" else (1, L, C), device=DEVICE)
    check_gather(x, random_ids(B, L, K), pos, torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64])
def test_gather_dtypes(seed, dtype):
    B, L, K, C = 3, 21, 5, 37
    check_gather(torch.randn(B, L, C, device=DEVICE), random_ids(B, L, K), torch.randn(L, C, device=DEVICE), dtype)


def test_gather_repeated_indices_sum_their_gradients(seed):
    B, L, C = 3, 11, 9
    ids = torch.tensor([[4, 4, 4, 0, 10], [1, 2, 3, 2, 1], [7, 7, 7, 7, 7]], device=DEVICE)
    check_gather(torch.randn(B, L, C, device=DEVICE), ids, torch.randn(L, C, device=DEVICE), torch.float32)


@pytest.mark.parametrize("B,L,N,C", [(1, 9, 4, 5), (2, 40, 7, 33), (3, 300, 150, 20), (2, 6, 11, 3), (2, 70, 0, 4)])
def test_rows_backward_scatter_and_scan_give_the_same_bits(seed, B, L, N, C):
    # The two strategies of gather_rows_backward (scatter of owned rows with zeros for the rest,
    # and the scan of every table row) must sum the same gradients in the same order; so must the
    # scatter over a zero-filled table and at every tiling that the benchmark times beside them. Repeats,
    # out-of-range indices (check_indices=False: they feed nothing), a list longer than one scan
    # block (150), a table of several zero blocks (300, 70), a list longer than the table
    # (11 > 6) and an empty list included; every output starts poisoned.
    from kernels.gather_tokens import _scatter_owned_rows, gather_rows_backward

    ids = torch.randint(-2, L + 2, (B, N), device=DEVICE)
    ids[:, N // 2:] = ids[:, : N - N // 2].flip(1)  # every sequence repeats indices
    grad = torch.randn(B, N, C, device=DEVICE)
    results = {scatter: gather_rows_backward(grad, ids, L, torch.float32, None, scatter=scatter)[0]
               for scatter in (True, False)}
    assert torch.equal(results[True], results[False])
    assert torch.equal(_scatter_owned_rows(grad, ids, L, torch.float32, fill_first=True), results[True])
    for tiling in sys.modules["kernels.gather_tokens"].SCATTER_TILING_CANDIDATES:  # the benchmark's
        assert torch.equal(_scatter_owned_rows(grad, ids, L, torch.float32, tiling=tiling), results[True]), tiling
    with pytest.raises(ValueError, match="scatter=True"):
        gather_rows_backward(grad, ids, L, torch.float32, torch.float32, scatter=True)
    want = torch.zeros(B, L, C, dtype=torch.float64, device=DEVICE)
    for b in range(B):
        for n in range(N):
            if 0 <= ids[b, n] < L:
                want[b, ids[b, n]] += grad[b, n].double()
    torch.testing.assert_close(results[True].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,C", [(torch.float32, 300), (torch.bfloat16, 300), (torch.float32, 40)])
def test_every_forward_tiling_gives_the_same_bits(seed, record_launches, dtype, C):
    # The benchmark's candidate tiles: rows that end mid-tile (B * K = 3 * 13), channels past one
    # block and short of the next (C = 300) or short of every candidate's block (C = 40: capped
    # at 64), a strided index row and positions; every one equals the default launch and the
    # reference, and launches the tile it names.
    module = sys.modules["kernels.gather_tokens"]
    from kernels.gather_tokens import _gather_forward

    launches = record_launches(module, "_gather_kernel")
    B, L, K = 3, 40, 13
    x = torch.randn(B, L, C, device=DEVICE).to(dtype)
    pos = torch.randn(L, C, device=DEVICE).to(dtype)
    ids = torch.stack([torch.randperm(L, device=DEVICE)[:2 * K] for _ in range(B)])[:, ::2]
    assert not ids.is_contiguous()
    default = _gather_forward(x, ids, pos)
    torch.testing.assert_close(default.double(), (x.double() + pos.double()).gather(
        1, ids[:, :, None].expand(B, K, C)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    for rows, channels, warps in module.GATHER_TILING_CANDIDATES:
        assert torch.equal(_gather_forward(x, ids, pos, (rows, channels, warps)), default)
        grid, _, kwargs = launches[-1]
        block_c = min(channels, 64 if C == 40 else 512)
        assert (kwargs["BLOCK_R"], kwargs["BLOCK_C"], kwargs["num_warps"]) == (rows, block_c, warps)
        assert grid == (-(-B * K // rows), -(-C // block_c))


@pytest.mark.parametrize("scatter", [True, False])
def test_rows_backward_sums_repeats_in_list_order(seed, scatter):
    # Three readers of one row with magnitudes that make float32 addition order visible: in list
    # order (1e8 - 1e8) + 1 = 1, in any other (1 - 1e8) + 1e8 or (1e8 + 1) - 1e8 = 0. Two channel
    # blocks (C = 300), and an index row that is a strided view.
    from kernels.gather_tokens import gather_rows_backward

    B, L, N, C = 2, 9, 6, 300
    ids = torch.tensor([[5, 0, 5, 2, 5, 8], [1, 1, 3, 4, 7, 1]], device=DEVICE).repeat_interleave(2, 1)[:, ::2]
    assert not ids.is_contiguous()
    grad = torch.randn(B, N, C, device=DEVICE)
    grad[0, 0], grad[0, 2], grad[0, 4] = 1e8, -1e8, 1.0
    grad[1, 0], grad[1, 1], grad[1, 5] = -1e8, 1e8, 1.0
    got, _ = gather_rows_backward(grad, ids, L, torch.float32, None, scatter=scatter)
    torch.testing.assert_close(got[0, 5], torch.ones(C, device=DEVICE), rtol=0, atol=0)
    torch.testing.assert_close(got[1, 1], torch.ones(C, device=DEVICE), rtol=0, atol=0)
    assert torch.equal(got[0, 2], grad[0, 3]) and torch.equal(got[1, 7], grad[1, 4])
    untouched = [m for m in range(L) if m not in (5, 0, 2, 8)]
    assert not got[0, untouched].any()


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64])
def test_gather_backward_with_a_fixed_pos_embed(seed, dtype):
    # The models' case: pos_embed is a buffer, so only x needs a gradient and the backward takes
    # the scatter-and-zeros path (more table rows than kept ones), repeats included.
    B, L, C = 3, 23, 37
    ids = torch.stack([torch.randperm(L)[:8] for _ in range(B)]).to(DEVICE)
    ids[1, 5] = ids[1, 2]
    ids[2] = ids[2, 0]
    assert sys.modules["kernels.gather_tokens"].scatters_owned_rows(L, ids.shape[1])
    (xl,), (xh,) = leaves(torch.randn(B, L, C, device=DEVICE), dtype=dtype)
    pos = torch.randn(1, L, C, device=DEVICE)
    out = gather_tokens(xl, ids, pos.to(dtype))
    ref = gather_reference.gather_tokens(xh, ids, pos.to(dtype).double())
    assert_matches(out, ref, dtype)
    g = torch.randn(out.shape, device=DEVICE).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    assert not g.is_contiguous()
    assert_matches(torch.autograd.grad(out, xl, g)[0], torch.autograd.grad(ref, xh, g.double())[0], dtype)


def test_gather_non_contiguous_inputs(seed):
    B, L, K, C = 3, 17, 6, 23
    x = torch.randn(C, L, B, device=DEVICE).permute(2, 1, 0)  # channels not innermost
    ids = random_ids(B, L, K).repeat_interleave(2, 1)[:, ::2]  # strided index rows
    pos = torch.randn(L, 2 * C, device=DEVICE)[:, ::2]
    assert not (x.is_contiguous() or ids.is_contiguous() or pos.is_contiguous())
    (xl, pl), (xh, ph) = leaves(x, pos, dtype=torch.float32)
    out = gather_tokens(xl, ids, pl)
    ref = gather_reference.gather_tokens(xh, ids, ph)
    assert_matches(out, ref, torch.float32)
    # A transposed view makes the incoming gradient non-contiguous too.
    g = torch.randn(K, B, C, device=DEVICE)
    got = torch.autograd.grad(out.transpose(0, 1), (xl, pl), g)
    want = torch.autograd.grad(ref.transpose(0, 1), (xh, ph), g.double())
    for a, b in zip(got, want):
        assert_matches(a, b, torch.float32)


def test_gather_mixed_dtypes_promote(seed):
    B, L, K, C = 2, 9, 4, 12
    x = torch.randn(B, L, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(L, C, device=DEVICE, requires_grad=True)
    ids = random_ids(B, L, K)
    out = gather_tokens(x, ids, pos)
    ref = gather_reference.gather_tokens(x.detach().double(), ids, pos.detach().double())
    assert out.dtype == torch.float32
    assert_matches(out, ref, torch.float32)
    gx, gp = torch.autograd.grad(out, (x, pos), torch.ones_like(out))
    assert gx.dtype == torch.bfloat16 and gp.dtype == torch.float32


def test_gather_only_pos_embed_needs_grad(seed):
    B, L, K, C = 3, 15, 5, 10
    x = torch.randn(B, L, C, device=DEVICE)
    pos = torch.randn(1, L, C, device=DEVICE, requires_grad=True)
    ids = random_ids(B, L, K)
    out = gather_tokens(x, ids, pos)
    (gp,) = torch.autograd.grad(out, pos, torch.ones_like(out))
    ref = torch.zeros(L, device=DEVICE).index_add_(0, ids.flatten(), torch.ones(B * K, device=DEVICE))
    assert gp.shape == pos.shape
    torch.testing.assert_close(gp[0], ref[:, None].expand(L, C))


@pytest.mark.parametrize("B,L,K,C", [(2, 6, 0, 4), (0, 6, 3, 4), (2, 6, 3, 0)])
def test_gather_empty_sizes(B, L, K, C):
    x = torch.randn(B, L, C, device=DEVICE, requires_grad=True)
    pos = torch.randn(L, C, device=DEVICE, requires_grad=True)
    ids = torch.zeros(B, K, dtype=torch.int64, device=DEVICE)
    out = gather_tokens(x, ids, pos)
    assert out.shape == (B, K, C)
    gx, gp = torch.autograd.grad(out.sum() + 0 * (x.sum() + pos.sum()), (x, pos))
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gp, torch.zeros_like(pos))


# ------------------------------------------------------------------------------------------------
# gather_tokens_2d
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,T,F,Kt,Kf,C", [(1, 5, 3, 2, 2, 7), (2, 8, 5, 5, 3, 33)])
def test_gather_2d(seed, dtype, B, T, F, Kt, Kf, C):
    x = torch.randn(B, T * F, C, device=DEVICE)
    pos = torch.randn(1, T * F, C, device=DEVICE)
    ids_t, ids_f = random_ids(B, T, Kt), random_ids(B, F, Kf)
    (xl, pl), (xh, ph) = leaves(x, pos, dtype=dtype)
    out = gather_tokens_2d(xl, ids_t, ids_f, (T, F), pl)
    ref = gather_reference.gather_tokens_2d(xh, ids_t, ids_f, (T, F), ph)
    assert_matches(out, ref, dtype)
    # The formula, independently of the reference's two-step gather.
    i, j = 1 % Kt, Kf - 1
    token = ids_t[0, i] * F + ids_f[0, j]
    assert_matches(out[0, i * Kf + j], (xh[0, token] + ph[0, token]).detach(), dtype)
    g = torch.randn(out.shape, device=DEVICE).to(dtype)
    for got, want in zip(grads(out, (xl, pl), g), grads(ref, (xh, ph), g.double())):
        assert_matches(got, want, dtype)


def test_gather_2d_repeated_rows(seed):
    B, T, F, C = 2, 4, 3, 6
    ids_t = torch.tensor([[1, 1, 3], [0, 2, 0]], device=DEVICE)
    ids_f = torch.tensor([[2, 2], [0, 1]], device=DEVICE)
    (xl,), (xh,) = leaves(torch.randn(B, T * F, C, device=DEVICE), dtype=torch.float32)
    out = gather_tokens_2d(xl, ids_t, ids_f, (T, F))
    ref = gather_reference.gather_tokens_2d(xh, ids_t, ids_f, (T, F))
    g = torch.randn(out.shape, device=DEVICE)
    assert_matches(torch.autograd.grad(out, xl, g)[0], torch.autograd.grad(ref, xh, g.double())[0], torch.float32)


# ------------------------------------------------------------------------------------------------
# unshuffle_tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L,K,C", [(1, 7, 2, 5), (2, 19, 4, 33), (3, 40, 8, 70), (2, 9, 9, 6), (2, 9, 0, 6)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_unshuffle_float32(seed, B, L, K, C, with_pos):
    x = torch.randn(B, K, C, device=DEVICE)
    pos = torch.randn(1, L, C, device=DEVICE) if with_pos else None
    check_unshuffle(x, random_ids(B, L, L), torch.randn(C, device=DEVICE), pos, torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64])
def test_unshuffle_dtypes(seed, dtype):
    B, L, K, C = 3, 23, 5, 37
    x = torch.randn(B, K, C, device=DEVICE)
    check_unshuffle(x, random_ids(B, L, L), torch.randn(1, 1, C, device=DEVICE), torch.randn(L, C, device=DEVICE), dtype)


def test_unshuffle_index_that_is_not_a_permutation(seed):
    # Kept row 1 read three times, row 0 never, two positions take the mask token.
    B, L, K, C = 2, 6, 3, 7
    ids = torch.tensor([[1, 1, 5, 2, 1, 3], [0, 1, 2, 4, 4, 4]], device=DEVICE)
    check_unshuffle(torch.randn(B, K, C, device=DEVICE), ids, torch.randn(C, device=DEVICE), torch.randn(L, C, device=DEVICE), torch.float32)


def test_unshuffle_non_contiguous_inputs(seed):
    B, L, K, C = 3, 17, 5, 23
    x = torch.randn(C, K, B, device=DEVICE).permute(2, 1, 0)
    ids = random_ids(B, L, L).repeat_interleave(2, 1)[:, ::2]
    mask = torch.randn(2 * C, device=DEVICE)[::2]
    pos = torch.randn(L, 2 * C, device=DEVICE)[:, ::2]
    assert not any(t.is_contiguous() for t in (x, ids, mask, pos))
    (xl, ml, pl), (xh, mh, ph) = leaves(x, mask, pos, dtype=torch.float32)
    out = unshuffle_tokens(xl, ids, ml, pl)
    ref = unshuffle_reference.unshuffle_tokens(xh, ids, mh, ph)
    assert_matches(out, ref, torch.float32)
    g = torch.randn(L, B, C, device=DEVICE)
    got = torch.autograd.grad(out.transpose(0, 1), (xl, ml, pl), g)
    want = torch.autograd.grad(ref.transpose(0, 1), (xh, mh, ph), g.double())
    for a, b in zip(got, want):
        assert_matches(a, b, torch.float32)


def test_unshuffle_grad_of_mask_token_only(seed):
    B, L, K, C = 3, 12, 4, 9
    ids = random_ids(B, L, L)
    x = torch.randn(B, K, C, device=DEVICE)
    mask = torch.randn(1, 1, C, device=DEVICE, requires_grad=True)
    g = torch.randn(B, L, C, device=DEVICE)
    (got,) = torch.autograd.grad(unshuffle_tokens(x, ids, mask, torch.randn(L, C, device=DEVICE)), mask, g)
    want = (g * (ids >= K).unsqueeze(-1)).sum((0, 1))
    assert got.shape == mask.shape
    torch.testing.assert_close(got.flatten(), want)


def test_unshuffle_empty_batch():
    x = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    mask = torch.randn(4, device=DEVICE, requires_grad=True)
    pos = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    out = unshuffle_tokens(x, torch.zeros(0, 5, dtype=torch.int64, device=DEVICE), mask, pos)
    assert out.shape == (0, 5, 4)
    gm, gp = torch.autograd.grad(out.sum() + 0 * (mask.sum() + pos.sum()), (mask, pos))
    assert torch.equal(gm, torch.zeros_like(mask)) and torch.equal(gp, torch.zeros_like(pos))


def test_gather_2d_empty_batch(seed):
    x = torch.randn(0, 6, 4, device=DEVICE, requires_grad=True)
    t, f = torch.zeros(0, 1, dtype=torch.long, device=DEVICE), torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    out = gather_tokens_2d(x, t, f, (2, 3))
    assert out.shape == (0, 2, 4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


def test_vmap_and_functionalize_check_the_indices(seed):
    """Under torch.func transforms the indices are wrapped tensors with no values to read eagerly:
    the range check goes through its op, and still catches bad indices."""
    x = torch.randn(3, 2, 6, 4, device=DEVICE)
    ids = torch.stack([random_ids(2, 6, 3) for _ in range(3)])
    want = torch.stack([gather_reference.gather_tokens(x[i].double(), ids[i]) for i in range(3)])
    got = torch.func.vmap(lambda a, i: gather_tokens(a, i))(x, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ids_keep holds values"):
        torch.func.vmap(lambda a, i: gather_tokens(a, i))(x, ids + 6)
    got = torch.func.functionalize(lambda a, i: gather_tokens(a, i))(x[0], ids[0])
    torch.testing.assert_close(got.double(), want[0], rtol=1e-6, atol=1e-6)
    mask = torch.randn(4, device=DEVICE)
    restore = torch.stack([random_ids(2, 6, 6) for _ in range(3)])
    kept = x[:, :, :3]
    want = torch.stack([unshuffle_reference.unshuffle_tokens(kept[i].double(), restore[i], mask.double())
                        for i in range(3)])
    got = torch.func.vmap(lambda a, r: unshuffle_tokens(a, r, mask))(kept, restore)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_gather_rejects_bad_input():
    x = torch.randn(2, 8, 4, device=DEVICE)
    ids = torch.tensor([[0, 7], [3, 1]], device=DEVICE)
    with pytest.raises(TypeError, match="ids_keep must be int64"):
        gather_tokens(x, ids.int())
    with pytest.raises(ValueError, match=r"ids_keep holds values in \[1, 8\]; they must lie in \[0, 8\)"):
        gather_tokens(x, ids + 1)
    with pytest.raises(ValueError, match=r"ids_keep holds values in \[-1, 6\]"):
        gather_tokens(x, ids - 1)
    with pytest.raises(ValueError, match=r"ids_keep must be \[B=2, N\]"):
        gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="pos_embed must be"):
        gather_tokens(x, ids, torch.randn(7, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"x must be \[B, L, C\]"):
        gather_tokens(x[0], ids)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        gather_tokens(x.long(), ids)
    with pytest.raises(TypeError, match="float64 does not mix"):
        gather_tokens(x.double(), ids, torch.randn(8, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"grid \(3, 3\) holds 9 tokens"):
        gather_tokens_2d(x, ids, ids, (3, 3))
    with pytest.raises(ValueError, match=r"ids_keep_f holds values in \[0, 7\]; they must lie in \[0, 4\)"):
        gather_tokens_2d(x, ids % 2, ids, (2, 4))
    with pytest.raises(ValueError, match=r"grid must be \(T, F\) with T, F >= 0"):
        gather_tokens_2d(x, ids % 2, ids % 2, (-2, -4))
    for grid in [(2.0, 4.0), (2, 2, 2), 8]:
        with pytest.raises(TypeError, match="grid must be two ints"):
            gather_tokens_2d(x, ids % 2, ids % 2, grid)
    with pytest.raises(TypeError, match=r"x must be a tensor \[B, L, C\], got NoneType"):
        gather_tokens(None, ids)
    with pytest.raises(TypeError, match="x must be a tensor"):
        gather_tokens_2d(None, ids % 2, ids % 2, (2, 4))


def test_unshuffle_rejects_bad_input():
    x = torch.randn(2, 3, 4, device=DEVICE)
    ids = random_ids(2, 6, 6)
    with pytest.raises(TypeError, match=r"x must be a tensor \[B, K, C\], got NoneType"):
        unshuffle_tokens(None, ids, torch.zeros(4, device=DEVICE))
    mask = torch.randn(4, device=DEVICE)
    with pytest.raises(TypeError, match="ids_restore must be int64"):
        unshuffle_tokens(x, ids.float(), mask)
    with pytest.raises(ValueError, match=r"ids_restore holds values in \[1, 6\]"):
        unshuffle_tokens(x, torch.where(ids == 0, 6, ids), mask)
    with pytest.raises(ValueError, match="restores L=2 < K positions"):
        unshuffle_tokens(x, ids[:, :2], mask)
    with pytest.raises(ValueError, match=r"mask_token must be \[4\] or \[1, 1, 4\]"):
        unshuffle_tokens(x, ids, mask[:3])
    with pytest.raises(ValueError, match="pos_embed must be"):
        unshuffle_tokens(x, ids, mask, torch.randn(5, 4, device=DEVICE))
    with pytest.raises(TypeError, match="mask_token has dtype torch.int32"):
        unshuffle_tokens(x, ids, mask.int())
    with pytest.raises(TypeError, match="mask_token must be a tensor"):
        unshuffle_tokens(x, ids, None)


def test_unchecked_out_of_range_indices_stay_in_bounds():
    # check_indices=False promises only memory safety: out-of-range rows read nothing.
    x = torch.randn(2, 5, 3, device=DEVICE)
    ids = torch.tensor([[0, 99], [-7, 4]], device=DEVICE)
    assert torch.isfinite(gather_tokens(x, ids, check_indices=False)).all()
    restore = torch.tensor([[0, 1, 99, 3, 4], [-2, 1, 2, 3, 4]], device=DEVICE)
    assert torch.isfinite(unshuffle_tokens(x[:, :2], restore, torch.randn(3, device=DEVICE), check_indices=False)).all()


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    x = torch.randn(2, 8, 4)
    ids = torch.tensor([[0, 7], [3, 1]])
    torch.testing.assert_close(gather_tokens(x, ids), gather_reference.gather_tokens(x, ids))
    with pytest.raises(ValueError, match="ids_keep holds values"):
        gather_tokens(x, ids + 1)


def test_compiled_calls_check_index_range():
    """Under torch.compile the check runs when the graph runs (values unknown while tracing)."""
    backend = "aot_eager"
    x = torch.randn(2, 6, 4, device=DEVICE)
    gather = torch.compile(lambda x, ids: gather_tokens(x, ids), backend=backend, fullgraph=True)
    ids = torch.tensor([[0, 5], [1, 2]], device=DEVICE)
    torch.testing.assert_close(gather(x, ids), gather_reference.gather_tokens(x, ids))
    with pytest.raises(ValueError, match=r"ids_keep holds values in \[0, 6\]"):
        gather(x, torch.tensor([[0, 6], [1, 2]], device=DEVICE))
    unshuffle = torch.compile(lambda x, ids, m: unshuffle_tokens(x, ids, m), backend=backend, fullgraph=True)
    mask_token = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="ids_restore holds values"):
        unshuffle(x[:, :2], torch.tensor([[0, 1, 2, -1], [3, 2, 1, 0]], device=DEVICE), mask_token)
    gather_2d = torch.compile(lambda x, t, f: gather_tokens_2d(x, t, f, (3, 2)), backend=backend, fullgraph=True)
    rows = torch.tensor([[0, 2], [1, 2]], device=DEVICE)
    # Row 0, column 2 is token 2, inside [0, 6): only a per-axis check catches the column.
    with pytest.raises(ValueError, match="ids_keep_f holds values"):
        gather_2d(x, rows, torch.tensor([[2], [0]], device=DEVICE))


def test_interpreter_switched_on_after_import_is_a_clear_error():
    code = (
        "import os, torch, kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "kernels.gather_tokens(torch.randn(2, 6, 4), torch.tensor([[0, 5], [1, 2]]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "TRITON_INTERPRET=1 was set after `kernels` was imported" in done.stderr


# ------------------------------------------------------------------------------------------------
# Eager calls: the autograd.Function against the custom op
# ------------------------------------------------------------------------------------------------
TOKEN_MODULES = [sys.modules["kernels.gather_tokens"], sys.modules["kernels.unshuffle_tokens"]]


def run_both_paths(monkeypatch, op, inputs, grad_out):
    """``op(*inputs)`` and the gradients of its float inputs that require grad, once through the
    eager autograd.Function and once forced through the torch.library op."""
    results = []
    for through_op in (False, True):
        with monkeypatch.context() as m:
            for module in TOKEN_MODULES:
                m.setattr(module, "needs_custom_op", lambda: through_op)
            out = op(*inputs)
        # The path really taken: a Function's node is named after its class, the op's after the op.
        assert ("audiomae" in type(out.grad_fn).__name__) == through_op, type(out.grad_fn).__name__
        wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        results.append((out, torch.autograd.grad(out, wanted, grad_out)))
    return results


@pytest.mark.parametrize("needs_grad", ["x", "pos", "x+pos"])
def test_gather_eager_path_equals_custom_op(seed, monkeypatch, needs_grad):
    B, L, K, C = 3, 14, 9, 11
    x = torch.randn(B, L, C, device=DEVICE, dtype=torch.bfloat16, requires_grad="x" in needs_grad)
    pos = torch.randn(1, L, C, device=DEVICE, requires_grad="pos" in needs_grad)
    ids = torch.cat([random_ids(B, L, K - 2), random_ids(B, L, 2)], 1)  # may repeat rows
    ids_t, ids_f = random_ids(B, 7, 3), random_ids(B, 2, 1)
    cases = [
        (lambda x, pos: gather_tokens(x, ids, pos), (x, pos), (B, K, C)),
        (lambda x, pos: gather_tokens_2d(x, ids_t, ids_f, (7, 2), pos), (x, pos), (B, 3, C)),
    ]
    for op, inputs, shape in cases:
        (eager, eager_grads), (custom, custom_grads) = run_both_paths(monkeypatch, op, inputs, torch.randn(shape, device=DEVICE))
        assert eager.dtype == custom.dtype == torch.float32 and torch.equal(eager, custom)
        for a, b in zip(eager_grads, custom_grads, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("needs_grad", ["x", "mask", "x+mask+pos"])
@pytest.mark.parametrize("with_pos", [False, True])
def test_unshuffle_eager_path_equals_custom_op(seed, monkeypatch, needs_grad, with_pos):
    B, L, K, C = 2, 13, 4, 10
    x = torch.randn(C, K, B, device=DEVICE, requires_grad="x" in needs_grad).permute(2, 1, 0)  # non-contiguous
    mask = torch.randn(1, 1, C, device=DEVICE, dtype=torch.float16, requires_grad="mask" in needs_grad)
    pos = torch.randn(L, C, device=DEVICE, requires_grad="pos" in needs_grad) if with_pos else None
    ids = random_ids(B, L, L)
    g = torch.randn(B, L, C, device=DEVICE)
    (eager, eager_grads), (custom, custom_grads) = run_both_paths(monkeypatch, unshuffle_tokens, (x, ids, mask, pos), g)
    assert torch.equal(eager, custom)
    for a, b in zip(eager_grads, custom_grads, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_autodiff_transforms_are_a_clear_error():
    # A custom op has no forward-mode formula: under jvp it would give zero tangents silently.
    x = torch.randn(2, 6, 5, device=DEVICE)
    ids = random_ids(2, 6, 3)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(lambda t: gather_tokens(t, ids), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda t: unshuffle_tokens(t, random_ids(2, 6, 6), torch.zeros(5, device=DEVICE)).sum())(
            x[:, :2].contiguous())


@pytest.mark.parametrize("grad_requires_grad", [True, False])
def test_double_backward_is_an_error(grad_requires_grad):
    # Also with a plain incoming gradient (a gradient penalty on loss.sum()), where
    # once_differentiable alone would drop the second-order terms silently.
    x = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    ids = random_ids(2, 6, 6)
    for out in (gather_tokens(x, ids[:, :3]), unshuffle_tokens(x[:, :2], ids, torch.zeros(5, device=DEVICE))):
        g = torch.randn(out.shape, device=DEVICE, requires_grad=grad_requires_grad)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.grad(out, x, g, create_graph=True)


def test_fake_tensors_take_the_custom_op():
    # A Triton launch cannot run on fake tensors; the op's fake implementation answers instead.
    with FakeTensorMode():
        x = torch.empty(3, 10, 6, device=DEVICE, dtype=torch.bfloat16)
        pos = torch.empty(1, 10, 6, device=DEVICE)
        ids = torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)
        out = gather_tokens(x, ids, pos, check_indices=False)
        restored = unshuffle_tokens(out, torch.zeros(3, 10, dtype=torch.int64, device=DEVICE), torch.empty(6, device=DEVICE))
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    assert restored.shape == (3, 10, 6) and restored.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_pos", [False, True])
def test_opcheck_gather(seed, with_pos):
    x = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    pos = torch.randn(6, 5, device=DEVICE, requires_grad=True) if with_pos else None
    torch.library.opcheck(torch.ops.audiomae.gather_tokens.default, (x, random_ids(2, 6, 3), pos))
    g = torch.randn(2, 3, 5, device=DEVICE)
    args = (g, random_ids(2, 6, 3), 6, torch.float32, torch.float32 if with_pos else None)
    torch.library.opcheck(torch.ops.audiomae.gather_tokens_backward.default, args)


@pytest.mark.parametrize("with_pos", [False, True])
def test_opcheck_unshuffle(seed, with_pos):
    x = torch.randn(2, 2, 5, device=DEVICE, requires_grad=True)
    mask = torch.randn(5, device=DEVICE, requires_grad=True)
    pos = torch.randn(6, 5, device=DEVICE, requires_grad=True) if with_pos else None
    torch.library.opcheck(torch.ops.audiomae.unshuffle_tokens.default, (x, random_ids(2, 6, 6), mask, pos))
    args = (torch.randn(2, 6, 5, device=DEVICE), random_ids(2, 6, 6), 2, torch.float32, torch.float32, torch.float32 if with_pos else None)
    torch.library.opcheck(torch.ops.audiomae.unshuffle_tokens_backward.default, args)


def test_ops_called_directly_take_every_argument_form(seed):
    # torch.ops.audiomae.* called without the public functions: pos_embed [1, L, C], mask_token
    # [1, 1, C] and strided tables give the public functions' values and gradients, in the shapes
    # of the inputs; shapes the kernels cannot read are errors naming the argument.
    B, L, K, C = 2, 6, 3, 5
    x = torch.randn(B, L, C, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, L, 2 * C, device=DEVICE)[..., ::2].requires_grad_()  # strided too
    ids = random_ids(B, L, K)
    out = torch.ops.audiomae.gather_tokens(x, ids, pos)
    ref = gather_reference.gather_tokens(x.double(), ids, pos.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(out.shape, device=DEVICE)
    gx, gpos = torch.autograd.grad(out, (x, pos), g)
    x64, pos64 = x.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    rx, rpos = torch.autograd.grad(gather_reference.gather_tokens(x64, ids, pos64), (x64, pos64), g.double())
    assert gpos.shape == pos.shape
    torch.testing.assert_close(gx.double(), rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpos.double(), rpos, rtol=1e-6, atol=1e-6)

    kept = torch.randn(B, K, C, device=DEVICE, requires_grad=True)
    mask = torch.randn(1, 1, C, device=DEVICE, requires_grad=True)
    restore = random_ids(B, L, L)
    out = torch.ops.audiomae.unshuffle_tokens(kept, restore, mask, pos)
    leaves64 = [t.detach().double().requires_grad_() for t in (kept, mask, pos)]
    ref = unshuffle_reference.unshuffle_tokens(leaves64[0], restore, leaves64[1], leaves64[2])
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(out.shape, device=DEVICE)
    got = torch.autograd.grad(out, (kept, mask, pos), g)
    want = torch.autograd.grad(ref, leaves64, g.double())
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="mask_token must be"):
        torch.ops.audiomae.unshuffle_tokens(kept, restore, torch.randn(C + 1, device=DEVICE), None)
    with pytest.raises(ValueError, match="pos_embed must be"):
        torch.ops.audiomae.gather_tokens(x, ids, torch.randn(L + 1, C, device=DEVICE))
    with pytest.raises(TypeError, match="ids_keep must be int64"):
        torch.ops.audiomae.gather_tokens(x, ids.int(), None)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_gpu_that_is_not_current(seed):
    # Triton launches on the current device: the launchers make the tensors' GPU current.
    torch.cuda.set_device(0)
    x = torch.randn(2, 6, 5, device="cuda:1", requires_grad=True)
    ids = random_ids(2, 6, 3).to("cuda:1")
    out = gather_tokens(x, ids)
    torch.testing.assert_close(out, gather_reference.gather_tokens(x.detach(), ids, None))
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad.device == x.device and float(grad.sum()) == out.numel()


def test_batched_gradients_are_a_clear_error(seed):
    # torch.autograd.grad(..., is_grads_batched=True) vmaps the backward: the launchers need real
    # storage, so it is refused by name rather than failing inside Triton.
    x = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    out = gather_tokens(x, random_ids(2, 6, 3))
    with pytest.raises(NotImplementedError, match="gather_tokens cannot take batched gradients"):
        torch.autograd.grad(out, x, torch.randn(4, *out.shape, device=DEVICE), is_grads_batched=True)


def test_backward_ops_called_directly_check_their_indices(seed):
    # The kernels take B and N from grad and read ids there: ids of another shape are an error.
    grad = torch.randn(2, 4, 5, device=DEVICE)
    ids = random_ids(2, 6, 4)
    for bad, match in ((ids[:, :2], "does not match grad"), (ids[:1], r"ids_keep must be \[B=2, N\]")):
        with pytest.raises(ValueError, match=match):
            torch.ops.audiomae.gather_tokens_backward(grad, bad, 6, torch.float32, None)
    with pytest.raises(ValueError, match="does not match grad"):
        torch.ops.audiomae.unshuffle_tokens_backward(grad, ids[:, :2], 2, torch.float32, torch.float32, None)
    with pytest.raises(ValueError, match=r"grad must be a \[B, N, C\] tensor"):
        torch.ops.audiomae.gather_tokens_backward(grad[0], ids, 6, torch.float32, None)


def test_compiles_without_graph_breaks(seed):
    B, T, F, C = 2, 4, 3, 5
    x = torch.randn(B, T * F, C, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, T * F, C, device=DEVICE)
    mask = torch.randn(1, 1, C, device=DEVICE, requires_grad=True)
    ids_shuffle, ids_t, ids_f = random_ids(B, T * F, T * F), random_ids(B, T, 2), random_ids(B, F, 2)
    ids_keep, ids_restore = ids_shuffle[:, :4], torch.argsort(ids_shuffle, 1)

    def encoder_and_decoder(x, mask):
        kept = gather_tokens(x, ids_keep, pos)
        return unshuffle_tokens(kept, ids_restore, mask, pos).sum() + gather_tokens_2d(x, ids_t, ids_f, (T, F)).sum()

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # inductor on CPU needs a C++ toolchain
    traced = []

    def recording_backend(gm, example_inputs):
        traced.append([str(node.target).removesuffix(".default") for node in gm.graph.nodes if node.op == "call_function"])
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(encoder_and_decoder, fullgraph=True, backend=recording_backend)
    got = torch.autograd.grad(compiled(x, mask), (x, mask))
    want = torch.autograd.grad(encoder_and_decoder(x, mask), (x, mask))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # The public functions put the custom ops in the graph, not the eager autograd.Functions.
    assert len(traced) == 1
    assert traced[0].count("audiomae.gather_tokens") == 2 and traced[0].count("audiomae.unshuffle_tokens") == 1, traced


def test_compiled_autograd_traces_the_backward_op(seed):
    # Compiled autograd traces the backward of the eager autograd.Functions; a Triton launch in
    # it would break the graph, the backward ops do not.
    B, L, K, C = 2, 7, 3, 4
    x = torch.randn(B, L, C, device=DEVICE, requires_grad=True)
    mask = torch.randn(C, device=DEVICE, requires_grad=True)
    pos = torch.randn(L, C, device=DEVICE)
    ids_shuffle = random_ids(B, L, L)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, 1)

    def loss():
        kept = gather_tokens(x, ids_keep, pos, check_indices=False)
        return unshuffle_tokens(kept, ids_restore, mask, pos, check_indices=False).square().sum()

    want = torch.autograd.grad(loss(), (x, mask))
    compiler = torch.compile(backend="aot_eager", fullgraph=True)
    with torch._dynamo.compiled_autograd._enable(compiler):  # private, as in PyTorch's own tests
        loss().backward()
    torch.testing.assert_close(x.grad, want[0])
    torch.testing.assert_close(mask.grad, want[1])


# ------------------------------------------------------------------------------------------------
# GPU: the sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_gather_at_target_shape(seed, dtype):
    B, L, K, C = 8, 512, 102, 768
    check_gather(torch.randn(B, L, C, device=DEVICE), random_ids(B, L, K), torch.randn(1, L, C, device=DEVICE), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_gather_backward_strategies_at_target_shape(seed, dtype):
    # The models' fixed pos_embed: x's gradient by scatter and zeros, against the float64
    # reference and, bit for bit, against the scan of every row; repeats in one sequence.
    from kernels.gather_tokens import gather_rows_backward

    B, L, K, C = 8, 512, 102, 768
    ids = random_ids(B, L, K)
    ids[3, 50:60] = ids[3, 7]
    (xl,), (xh,) = leaves(torch.randn(B, L, C, device=DEVICE), dtype=dtype)
    pos = torch.randn(1, L, C, device=DEVICE).to(dtype)
    out = gather_tokens(xl, ids, pos)
    ref = gather_reference.gather_tokens(xh, ids, pos.double())
    g = torch.randn(out.shape, device=DEVICE).to(dtype)
    got = torch.autograd.grad(out, xl, g)[0]
    assert_matches(got, torch.autograd.grad(ref, xh, g.double())[0], dtype)
    scan, _ = gather_rows_backward(g, ids, L, dtype, None, scatter=False)
    assert torch.equal(got, scan)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_unshuffle_at_target_shape(seed, dtype):
    B, L, K, C = 8, 512, 102, 512
    check_unshuffle(torch.randn(B, K, C, device=DEVICE), random_ids(B, L, L), torch.randn(C, device=DEVICE), torch.randn(L, C, device=DEVICE), dtype)


@pytest.mark.gpu
def test_gpu_gather_2d_and_repeats(seed):
    B, T, F, C = 16, 64, 8, 768
    x = torch.randn(B, T * F, C, device=DEVICE)
    (xl,), (xh,) = leaves(x, dtype=torch.bfloat16)
    ids_t, ids_f = random_ids(B, T, 51), random_ids(B, F, 6)
    ids_t[:, 1] = ids_t[:, 0]
    out = gather_tokens_2d(xl, ids_t, ids_f, (T, F))
    ref = gather_reference.gather_tokens_2d(xh, ids_t, ids_f, (T, F))
    assert_matches(out, ref, torch.bfloat16)
    g = torch.randn(out.shape, device=DEVICE).bfloat16()
    assert_matches(torch.autograd.grad(out, xl, g)[0], torch.autograd.grad(ref, xh, g.double())[0], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    B, L, K, C = 64, 512, 102, 512
    x = torch.randn(B, K, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.randn(C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(L, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids = random_ids(B, L, L)
    g = torch.randn(B, L, C, device=DEVICE, dtype=torch.bfloat16)
    first = torch.autograd.grad(unshuffle_tokens(x, ids, mask, pos), (x, mask, pos), g)
    for _ in range(3):
        again = torch.autograd.grad(unshuffle_tokens(x, ids, mask, pos), (x, mask, pos), g)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
