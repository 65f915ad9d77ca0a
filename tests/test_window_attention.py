"""window_attention against the official roll/partition/reverse math, run in float64.

On the CPU the Triton kernels run through the interpreter (tiny shapes; fp32 and fp16, since the
interpreter's bf16 tl.dot is wrong); bf16 and the decoder's shape run on the GPU.
"""
import contextlib
import sys

import pytest
import torch

from kernels import _dispatch
from kernels.reference.window_attention import shift_window_mask, window_attention_reference
from kernels.window_attention import window_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest: unwritten outputs read NaN
TOLERANCE = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# dtau sums ds * cosine over every pair of every window, terms that largely cancel: torch's own
# math in the same dtype misses float64 by a few times more there than on the other outputs.
DTAU_SLACK = 3


def make_inputs(B, grid, window, num_heads, head_dim, *, tau=True, bias=True, device=DEVICE):
    """float64 leaves: qkv [B, L, 3*C], tau [heads] in [0.3, 1] (the official init is 1; smaller
    tau sharpens the softmax and makes dtau ill-conditioned, see the tests that set it),
    bias [heads, N, N] of the meta-MLP's scale."""
    L, N = grid[0] * grid[1], window[0] * window[1]
    qkv = torch.randn(B, L, 3 * num_heads * head_dim, dtype=torch.float64, device=device)
    taus = torch.rand(num_heads, dtype=torch.float64, device=device) * 0.7 + 0.3 if tau else None
    biases = torch.randn(num_heads, N, N, dtype=torch.float64, device=device) if bias else None
    return qkv, taus, biases


def op_inputs(B, grid, window, shift, num_heads=2, head_dim=16):
    """float32 qkv, tau and bias, the ops' trailing arguments, the forward op's (out, lse) and a
    dout: the backward op's inputs, for the tests that call it directly."""
    qkv, tau, bias = (x.float() for x in make_inputs(B, grid, window, num_heads, head_dim))
    args = (list(grid), list(window), list(shift), num_heads, -100.0)
    out, lse = torch.ops.audiomae.window_attention(qkv, tau, bias, *args)
    return qkv, tau, bias, args, out, lse, torch.randn_like(out)


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def check_against_reference(qkv, tau, bias, dtype, *, grid, window, shift, num_heads, mask_value=-100.0,
                            make_view=lambda x: x):
    """Forward and every gradient of the kernel in ``dtype`` against the float64 reference."""
    args = dict(grid=grid, window=window, shift=shift, num_heads=num_heads, mask_value=mask_value)
    leaves = {"qkv": qkv, "tau": tau, "bias": bias}
    # Both see the same values: the reference gets the kernel's inputs after rounding to dtype.
    ker = {k: v.to(dtype).requires_grad_() for k, v in leaves.items() if v is not None}
    ref = {k: v.detach().double().requires_grad_() for k, v in ker.items()}
    expected = window_attention_reference(ref["qkv"], tau=ref.get("tau"), bias=ref.get("bias"), **args)
    actual = window_attention(make_view(ker["qkv"]), tau=ker.get("tau"), bias=ker.get("bias"), **args)
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert torch.isfinite(actual).all()
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad.to(dtype))
    tol = TOLERANCE[dtype]
    assert relative_error(actual, expected) < tol, "output"
    for name in ref:
        assert ker[name].grad is not None and ker[name].grad.dtype == dtype, name
        slack = DTAU_SLACK if name == "tau" else 1
        assert relative_error(ker[name].grad, ref[name].grad) < tol * slack, f"d{name}"
    return {name: t.grad for name, t in ker.items()}


@pytest.mark.parametrize(
    "B,grid,window,shift,num_heads,head_dim",
    [
        (2, (8, 8), (4, 4), (2, 0), 2, 16),   # the decoder's window and shift, small
        (1, (8, 8), (4, 4), (0, 2), 3, 16),   # shift on the frequency axis only
        (1, (8, 8), (4, 4), (2, 2), 1, 32),   # both axes
        (2, (8, 8), (4, 4), (0, 0), 2, 16),   # no shift: no mask
        (1, (8, 8), (2, 2), (1, 1), 3, 20),   # 4-token windows, 4 packed to a 16-row tile, odd head_dim
        (1, (4, 16), (2, 8), (1, 5), 2, 24),
        (1, (16, 4), (8, 4), (5, 3), 1, 16),
        (1, (16, 16), (16, 16), (5, 9), 1, 16),  # 256-token window: chunked, online softmax
        (1, (12, 24), (12, 12), (7, 0), 1, 16),  # 144 tokens: a partial last chunk
        (1, (8, 8), (8, 8), (3, 3), 1, 128),  # head_dim 128: chunked backward
        (1, (6, 6), (3, 3), (1, 2), 2, 16),   # window sides that are not powers of two
        (1, (4, 4), (4, 4), (2, 1), 2, 16),   # one window covers the grid
    ],
)
def test_matches_reference_fp32(B, grid, window, shift, num_heads, head_dim):
    qkv, tau, bias = make_inputs(B, grid, window, num_heads, head_dim)
    check_against_reference(qkv, tau, bias, torch.float32, grid=grid, window=window, shift=shift,
                            num_heads=num_heads)


@pytest.mark.parametrize("tau,bias", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("shift", [(0, 0), (2, 1)])
def test_optional_tau_and_bias(tau, bias, shift):
    qkv, taus, biases = make_inputs(2, (8, 4), (4, 2), 2, 16, tau=tau, bias=bias)
    check_against_reference(qkv, taus, biases, torch.float32, grid=(8, 4), window=(4, 2), shift=shift,
                            num_heads=2)


@pytest.mark.parametrize("window,shift", [((4, 4), (2, 0)), ((2, 2), (1, 1)), ((8, 8), (4, 3))])
def test_matches_reference_fp16(window, shift):
    qkv, tau, bias = make_inputs(2, (8, 8), window, 2, 24)
    check_against_reference(qkv, tau, bias, torch.float16, grid=(8, 8), window=window, shift=shift,
                            num_heads=2)


def test_fp16_qkv_with_fp32_tau_and_bias():
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    args = dict(grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2)
    tau32, bias32 = tau.float().requires_grad_(), bias.float().requires_grad_()
    out = window_attention(qkv.half(), tau=tau32, bias=bias32, **args)
    out.float().sum().backward()
    tau64, bias64 = tau32.detach().double().requires_grad_(), bias32.detach().double().requires_grad_()
    expected = window_attention_reference(qkv.half().double(), tau=tau64, bias=bias64, **args)
    expected.sum().backward()
    assert out.dtype == torch.float16 and tau32.grad.dtype == bias32.grad.dtype == torch.float32
    assert relative_error(out, expected) < 1e-2
    assert relative_error(tau32.grad, tau64.grad) < 1e-2
    assert relative_error(bias32.grad, bias64.grad) < 1e-2


def test_tau_below_clamp_gets_no_gradient():
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    tau[0] = 0.005
    grads = check_against_reference(qkv, tau, bias, torch.float32, grid=(8, 8), window=(4, 4), shift=(2, 0),
                                    num_heads=2)
    assert grads["tau"][0] == 0 and grads["tau"][1] != 0


@pytest.mark.parametrize("small", [0.0, -0.0, 1e-30, -0.3])
def test_tau_of_zero_or_below_gets_a_zero_gradient_not_nan(small):
    """Clamped heads get 0, also where tau squared is 0 (a product with the clamp's mask would be
    inf * 0 = NaN there)."""
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    tau[0] = small
    grads = check_against_reference(qkv, tau, bias, torch.float32, grid=(8, 8), window=(4, 4), shift=(2, 0),
                                    num_heads=2)
    assert grads["tau"][0] == 0 and grads["tau"].isfinite().all()


def test_tau_at_clamp_gets_gradient():
    """torch's clamp passes the gradient at tau == 0.01. Logits reach 100 there and dtau is a sum
    that cancels: torch's own fp32 misses float64 by up to ~1e-3, so the check is loose."""
    qkv, tau, _ = make_inputs(1, (8, 8), (4, 4), 2, 16, bias=False)
    tau[0] = 0.01
    args = dict(grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2)
    ref, ker = tau.clone().requires_grad_(), tau.float().requires_grad_()
    window_attention_reference(qkv, tau=ref, **args).pow(2).sum().backward()
    window_attention(qkv.float(), tau=ker, **args).pow(2).sum().backward()
    assert ker.grad[0] != 0 and relative_error(ker.grad, ref.grad) < 1e-2


def test_norm_product_below_clamp():
    """Tokens 0-3 share a window; with tiny q and k their |q||k| falls under the official 1e-6 clamp."""
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    C = 2 * 16
    qkv[0, :4, : 2 * C] *= 1e-4
    norms = qkv[0, :4, : 2 * C].reshape(4, 2, 2, 16).norm(dim=-1)  # [token, q/k, head]
    assert (norms[:, None, 0] * norms[None, :, 1] < 1e-6).all()
    check_against_reference(qkv, tau, bias, torch.float32, grid=(8, 8), window=(4, 4), shift=(2, 0),
                            num_heads=2)


def test_zero_query_row():
    """A zero q row: its logits are 0 / 1e-6 and its norm has no gradient, as torch.norm's backward."""
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    qkv[0, 9, :32] = 0.0
    args = dict(grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2)
    ref, ker = qkv.clone().requires_grad_(), qkv.float().requires_grad_()
    expected = window_attention_reference(ref, tau=tau, bias=bias, **args)
    actual = window_attention(ker, tau=tau.float(), bias=bias.float(), **args)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad.float())
    assert relative_error(actual, expected) < 5e-5
    # The zero row's dq is ~1e6 times the others (d logit / dq = k / 1e-6): compare it on its own.
    others = torch.arange(64) != 9
    assert relative_error(ker.grad[:, others], ref.grad[:, others]) < 5e-5
    assert relative_error(ker.grad[:, 9], ref.grad[:, 9]) < 5e-5


def test_custom_mask_value_and_large_logits():
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    tau[:] = 0.05  # cosine logits up to 20, bias up to about 40
    check_against_reference(qkv, tau, bias * 10, torch.float32, grid=(8, 8), window=(4, 4), shift=(3, 1),
                            num_heads=2, mask_value=-7.5)


@pytest.mark.parametrize("view", ["slice", "transpose"])
def test_non_contiguous_qkv(view):
    qkv, tau, bias = make_inputs(2, (8, 8), (4, 4), 2, 16)
    if view == "slice":  # qkv as part of a wider projection output
        def make_view(x):
            wide = torch.cat([x, torch.full_like(x[..., :7], float("nan"))], dim=-1)
            return wide[..., : x.shape[-1]]
    else:  # [L, B, 3C] storage seen as [B, L, 3C]
        def make_view(x):
            return x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not make_view(qkv).is_contiguous()
    check_against_reference(qkv, tau, bias, torch.float32, grid=(8, 8), window=(4, 4), shift=(2, 0),
                            num_heads=2, make_view=make_view)


def test_broadcast_output_gradient():
    """``out.sum().backward()`` hands the backward a zero-stride gradient."""
    qkv, tau, bias = make_inputs(1, (8, 8), (4, 4), 2, 16)
    ref, ker = qkv.clone().requires_grad_(), qkv.float().requires_grad_()
    args = dict(grid=(8, 8), window=(4, 4), shift=(2, 2), num_heads=2, tau=tau, bias=bias)
    window_attention_reference(ref, **args).sum().backward()
    window_attention(ker, **{**args, "tau": tau.float(), "bias": bias.float()}).sum().backward()
    assert relative_error(ker.grad, ref.grad) < 5e-5


def test_bias_and_tau_gradients_are_deterministic():
    qkv, tau, bias = (x.float() for x in make_inputs(2, (8, 8), (2, 2), 2, 16))
    grads = []
    for _ in range(2):
        t, b = tau.clone().requires_grad_(), bias.clone().requires_grad_()
        window_attention(qkv, tau=t, bias=b, grid=(8, 8), window=(2, 2), shift=(1, 0), num_heads=2).sum().backward()
        grads.append((t.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_shift_mask_follows_official_slices():
    mask = shift_window_mask((4, 4), (2, 2), (1, 0))
    # shift on the time axis only: the frequency axis is one region, the last window row splits in two
    assert mask.shape == (4, 4, 4)
    assert (mask[:2] == 0).all()
    rows = torch.tensor([0, 0, 1, 1])  # position p = 2 * row + col inside a 2x2 window
    expected = torch.where(rows[:, None] != rows[None, :], -100.0, 0.0)
    assert torch.equal(mask[2], expected) and torch.equal(mask[3], expected)
    assert (shift_window_mask((4, 4), (2, 2), (0, 0)) == 0).all()


def test_reference_without_interpreter_is_the_cpu_path(monkeypatch):
    qkv, tau, bias = (x.float() for x in make_inputs(1, (4, 4), (2, 2), 2, 16, device="cpu"))
    args = dict(grid=(4, 4), window=(2, 2), shift=(1, 1), num_heads=2, tau=tau, bias=bias)
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    assert torch.equal(window_attention(qkv, **args), window_attention_reference(qkv, **args))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(grid=(8, 6)), ValueError, "multiples of window"),
        (dict(grid=(4, 4)), ValueError, "tokens but grid"),
        (dict(shift=(4, 0)), ValueError, "shift"),
        (dict(shift=(0, -1)), ValueError, "shift"),
        (dict(window=(0, 4)), ValueError, "window"),
        (dict(window=(32, 16), grid=(32, 16)), ValueError, "window"),
        (dict(num_heads=5), ValueError, "num_heads"),
        (dict(num_heads=4), ValueError, "head_dim"),
        (dict(tau=torch.ones(3)), ValueError, "tau"),
        (dict(bias=torch.zeros(2, 16, 8)), ValueError, "bias"),
        (dict(grid=(8.0, 8)), TypeError, "grid"),
        (dict(mask_value=float("nan")), TypeError, "mask_value"),
        (dict(mask_value=10**400), ValueError, "mask_value"),
        (dict(num_heads=True), TypeError, "num_heads"),
        (dict(num_heads=2.0), TypeError, "num_heads"),
        (dict(grid=8), TypeError, "grid must be two ints"),
        (dict(window=4), TypeError, "window must be two ints"),
        (dict(shift=2), TypeError, "shift must be two ints"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(grid=(8, 8), window=(4, 4), shift=(0, 0), num_heads=2)
    args.update(kwargs)
    qkv = torch.randn(1, 64, 3 * 2 * 16, device=DEVICE)
    if args["grid"] == (32, 16):
        qkv = torch.randn(1, 512, 3 * 2 * 16, device=DEVICE)
    for name in ("tau", "bias"):
        if name in args:
            args[name] = args[name].to(DEVICE)
    with pytest.raises(error, match=match):
        window_attention(qkv, **args)


def test_numpy_mask_value_is_a_real_number():
    """np.float32 is a real number (numbers.Real) but not a float subclass, as np.float64 is."""
    np = pytest.importorskip("numpy")
    qkv = torch.randn(1, 16, 3 * 2 * 16, device=DEVICE)
    args = dict(grid=(4, 4), window=(2, 2), shift=(1, 1), num_heads=2)
    expected = window_attention(qkv, **args, mask_value=-7.0)
    assert torch.equal(window_attention(qkv, **args, mask_value=np.float32(-7.0)), expected)


def test_numpy_integers_for_the_geometry():
    """grid, window, shift and num_heads as NumPy integers (a config read with NumPy, say), as the
    token ops take them: the same result as Python ints, through the reference too."""
    np = pytest.importorskip("numpy")
    qkv = torch.randn(1, 16, 3 * 2 * 16, device=DEVICE)
    args = dict(grid=(4, 4), window=(2, 2), shift=(1, 0), num_heads=2)
    numpy_args = dict(grid=(np.int64(4), np.int64(4)), window=[np.int32(2), np.int32(2)],
                      shift=(np.int64(1), np.int16(0)), num_heads=np.int64(2))
    expected = window_attention(qkv, **args)
    assert torch.equal(window_attention(qkv, **numpy_args), expected)
    torch.testing.assert_close(window_attention_reference(qkv, **numpy_args), expected)


def test_bool_num_heads_does_not_reach_a_cached_plan():
    """True == 1 and hashes alike: refused before it could share num_heads=1's cached launch plan."""
    qkv = torch.randn(1, 16, 3 * 16, device=DEVICE)
    args = dict(grid=(4, 4), window=(2, 2), shift=(1, 0))
    with pytest.raises(TypeError, match="num_heads"):
        window_attention(qkv, **args, num_heads=True)
    assert window_attention(qkv, **args, num_heads=1).shape == (1, 16, 16)


def test_bad_tensors():
    args = dict(grid=(8, 8), window=(4, 4), num_heads=2)
    with pytest.raises(ValueError, match="qkv"):
        window_attention(torch.randn(64, 96, device=DEVICE), **args)
    with pytest.raises(TypeError, match="qkv"):
        window_attention(torch.zeros(1, 64, 96, dtype=torch.int32, device=DEVICE), **args)
    if _dispatch.use_triton(torch.empty(0, device=DEVICE)):
        with pytest.raises(TypeError, match="float64"):
            window_attention(torch.randn(1, 64, 96, dtype=torch.float64, device=DEVICE), **args)


def test_double_backward_is_an_error():
    qkv = torch.randn(1, 16, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    out = window_attention(qkv, grid=(4, 4), window=(2, 2), shift=(1, 1), num_heads=2)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(out.sum(), qkv, create_graph=True)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bfloat16 dot is a CPU matter")
def test_bfloat16_through_the_interpreter_is_an_error_not_wrong_numbers():
    qkv = torch.randn(1, 16, 3 * 2 * 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bfloat16 tl.dot"):
        window_attention(qkv, grid=(4, 4), window=(2, 2), num_heads=2)


def test_opcheck():
    qkv, tau, bias = (x.float() for x in make_inputs(1, (4, 4), (2, 2), 2, 16))
    out, lse = torch.ops.audiomae.window_attention(qkv, tau, bias, [4, 4], [2, 2], [1, 0], 2, -100.0)
    torch.library.opcheck(torch.ops.audiomae.window_attention.default,
                          (qkv.requires_grad_(), tau.requires_grad_(), bias, [4, 4], [2, 2], [1, 0], 2, -100.0))
    for kept_out in (out, None):  # None: every window fits one tile, so the backward does not read out
        torch.library.opcheck(torch.ops.audiomae.window_attention_backward.default,
                              (torch.randn_like(out), qkv.detach(), tau.detach(), bias, kept_out, lse, [4, 4],
                               [2, 2], [1, 0], 2, -100.0))


def test_op_called_directly_takes_strided_tau_and_bias_and_checks_its_arguments():
    # torch.ops.audiomae.window_attention without the public function: tau and bias of any strides
    # give the contiguous values and gradients; bad arguments are the public function's errors.
    qkv, tau, bias = (x.float() for x in make_inputs(1, (4, 4), (2, 2), 2, 16))
    tau_strided = torch.stack([tau, torch.full_like(tau, 1e-3)], -1)[:, 0]
    bias_strided = bias.transpose(1, 2).contiguous().transpose(1, 2)
    assert not tau_strided.is_contiguous() and not bias_strided.is_contiguous()
    args = ([4, 4], [2, 2], [1, 1], 2, -100.0)

    def run(t, b):
        leaves = [qkv.clone().requires_grad_(), t.detach().requires_grad_(), b.detach().requires_grad_()]
        out, _ = torch.ops.audiomae.window_attention(*leaves, *args)
        return [out, *torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))]

    for got, want in zip(run(tau_strided, bias_strided), run(tau, bias)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.audiomae.window_attention(qkv, tau, bias[:, :3], *args)
    with pytest.raises(ValueError, match="head_dim must be in"):
        torch.ops.audiomae.window_attention(qkv, None, None, [4, 4], [2, 2], [1, 1], 4, -100.0)


def test_backward_op_called_directly_reads_any_layout_and_checks_shapes():
    # out and lse as any strides, dout in another float dtype: the same gradients; shapes the
    # kernel would misread are errors naming the argument. Its fake returns contiguous dtau and
    # dbias whatever tau's and bias's strides, as the op does (inductor compares the two).
    qkv, tau, bias, args, out, lse, dout = op_inputs(2, (4, 4), (2, 2), (1, 1))
    want = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, out, lse, *args)
    out_t = out.transpose(0, 1).contiguous().transpose(0, 1)
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert not out_t.is_contiguous() and not lse_t.is_contiguous()
    got = torch.ops.audiomae.window_attention_backward(dout.half(), qkv, tau, bias, out_t, lse_t, *args)
    want_half = torch.ops.audiomae.window_attention_backward(dout.half().float(), qkv, tau, bias, out, lse, *args)
    for a, b in zip(got, want_half):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    got = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, out_t, lse_t, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name, bad in (("out", (dout, qkv, tau, bias, out[:1], lse)), ("lse", (dout, qkv, tau, bias, out, lse[:, :1])),
                      ("dout", (dout[..., :8], qkv, tau, bias, out, lse))):
        with pytest.raises(ValueError, match=f"{name} must be a"):
            torch.ops.audiomae.window_attention_backward(*bad, *args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    bias_t = bias.transpose(1, 2).contiguous().transpose(1, 2)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (dout, qkv, tau, bias_t, out, lse)]
        _, dtau, dbias = torch.ops.audiomae.window_attention_backward(*fake, *args)
    assert dtau.is_contiguous() and dbias.is_contiguous()


@pytest.mark.parametrize("window,grid,keeps_out", [((4, 4), (8, 8), False), ((12, 12), (12, 12), True)])
def test_backward_keeps_the_output_only_where_a_window_spans_several_tiles(window, grid, keeps_out):
    # One tile a window: the softmax correction comes from the tile, so the output is not saved
    # (in the decoder it is freed after the output projection's backward). A chunked window still
    # reads it. Counted with saved-tensor hooks, eagerly and through the custom op.
    qkv, tau, bias = (x.float() for x in make_inputs(1, grid, window, 2, 16))
    args = dict(grid=grid, window=window, shift=(1, 1), num_heads=2)
    out_shape = (1, grid[0] * grid[1], 2 * 16)
    for through_op in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            leaf = qkv.clone().requires_grad_()
            if through_op:
                out, _ = torch.ops.audiomae.window_attention(leaf, tau, bias, list(grid), list(window), [1, 1], 2,
                                                             -100.0)
            else:
                out = window_attention(leaf, tau=tau, bias=bias, **args)
        assert (out_shape in saved) == keeps_out, (through_op, saved)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("num_heads", [1, 80])
def test_bias_and_tau_gradients_are_summed_for_any_number_of_heads(num_heads):
    # The partials are summed by one launch: bias columns in blocks at least 64 wide and as wide
    # as the heads (80 heads of 2x2 windows: ten programs of 128 columns), every head's tau in one
    # more program, a clamped tau (< 0.01) getting zero; with only one of the two as well. (Part-
    # filled bias blocks: the 3x3 windows of test_matches_reference_fp32.)
    qkv, tau, bias = make_inputs(2, (4, 4), (2, 2), num_heads, 16)
    tau[0] = 0.005
    for t, b in ((tau, bias), (tau, None), (None, bias)):
        grads = check_against_reference(qkv, t, b, torch.float32, grid=(4, 4), window=(2, 2), shift=(1, 1),
                                        num_heads=num_heads)
        if t is not None:
            assert grads["tau"][0] == 0


@pytest.mark.parametrize("window,grid", [((2, 2), (4, 4)), ((16, 16), (16, 16))])  # one tile; chunked
@pytest.mark.parametrize("frozen", ["tau", "bias", "both"])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_a_frozen_tau_or_bias_gets_no_gradient_and_the_rest_are_unchanged(window, grid, frozen, path, monkeypatch):
    # A tau or bias that does not require grad is still applied, but its partial sums, their
    # stores and the finish launch are skipped: qkv's gradient must be the same bits as with both
    # learnable, and the learnable one the same bits too.
    import kernels.window_attention  # noqa: F401 - the module itself, for its dispatch helper

    module = sys.modules["kernels.window_attention"]
    if path == "op":  # the torch.library op, as traced under torch.compile
        monkeypatch.setattr(module, "needs_custom_op", lambda: True)
    qkv, tau, bias = (x.float() for x in make_inputs(2, grid, window, 2, 16))
    tau[0] = 0.005  # clamped: its gradient is zero, not skipped
    args = dict(grid=grid, window=window, shift=(1, 1), num_heads=2)
    grad = torch.randn(2, grid[0] * grid[1], 32)

    def grads(tau_grad, bias_grad):
        q, t, b = qkv.clone().requires_grad_(), tau.clone().requires_grad_(tau_grad), bias.clone().requires_grad_(bias_grad)
        window_attention(q, tau=t, bias=b, **args).backward(grad)
        return q.grad, t.grad, b.grad

    full = grads(True, True)
    if frozen == "both":  # nothing to finish: the launch that sums the partials must not happen

        class NoLaunch:
            def __getitem__(self, grid):
                raise AssertionError("the finish kernel ran for a frozen tau and bias")

        monkeypatch.setattr(module, "_window_attention_bwd_finish", NoLaunch())
    got = grads(frozen == "bias", frozen == "tau")
    assert torch.equal(got[0], full[0])
    for name, i in (("tau", 1), ("bias", 2)):
        if frozen in (name, "both"):
            assert got[i] is None, name
        else:
            assert torch.equal(got[i], full[i]), name


def test_backward_op_skips_the_gradients_it_is_told_to():
    qkv, tau, bias, args, _, lse, dout = op_inputs(1, (4, 4), (2, 2), (1, 0))
    full = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, None, lse, *args)
    for tau_grad, bias_grad in ((False, True), (True, False), (False, False)):
        dqkv, dtau, dbias = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, None, lse, *args,
                                                                        tau_grad, bias_grad)
        assert torch.equal(dqkv, full[0])
        assert torch.equal(dtau, full[1]) if tau_grad else dtau.numel() == 0
        assert torch.equal(dbias, full[2]) if bias_grad else dbias.numel() == 0
        torch.library.opcheck(torch.ops.audiomae.window_attention_backward.default,
                              (dout, qkv, tau, bias, None, lse, *args, tau_grad, bias_grad))


def test_backward_launches_with_the_tiling_of_its_forward():
    # The forward decides from its tiling whether to keep out; a backward run after forced_tiling
    # was entered or left (a 32-token window: one tile by default in fp32, chunked at 16 rows)
    # must launch as its forward did, and give the reference's gradients either way.
    module = sys.modules["kernels.window_attention"]
    qkv, tau, bias = (x.float() for x in make_inputs(1, (8, 8), (8, 4), 2, 16))
    args = dict(grid=(8, 8), window=(8, 4), shift=(3, 1), num_heads=2, mask_value=-100.0)
    ref = {k: v.detach().double().requires_grad_() for k, v in (("qkv", qkv), ("tau", tau), ("bias", bias))}
    grad = torch.randn(1, 64, 32, dtype=torch.float64, device=qkv.device)
    window_attention_reference(ref["qkv"], tau=ref["tau"], bias=ref["bias"], **args).backward(grad)
    for forward_rows, backward_rows in ((None, 16), (16, None)):
        leaves = [t.clone().requires_grad_() for t in (qkv, tau, bias)]
        with module.forced_tiling(forward_rows, 1) if forward_rows else contextlib.nullcontext():
            out = window_attention(leaves[0], tau=leaves[1], bias=leaves[2], **args)
        with module.forced_tiling(backward_rows, 1) if backward_rows else contextlib.nullcontext():
            out.backward(grad.float())
        for leaf, name in zip(leaves, ("qkv", "tau", "bias")):
            assert relative_error(leaf.grad, ref[name].grad) < TOLERANCE[torch.float32] * DTAU_SLACK, name
        assert module.TILING_OVERRIDE is None


def test_backward_op_takes_no_output_where_it_does_not_read_it():
    # out=None where each window fits one tile: the same gradients as with out; where a window
    # is chunked, None is an error naming out.
    qkv, tau, bias, args, out, lse, dout = op_inputs(2, (8, 8), (4, 4), (2, 1))
    with_out = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, out, lse, *args)
    without = torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, None, lse, *args)
    for a, b in zip(with_out, without):
        assert torch.equal(a, b)
    qkv, tau, bias, args, _, lse, dout = op_inputs(1, (12, 12), (12, 12), (0, 0))
    with pytest.raises(ValueError, match="out must be a"):
        torch.ops.audiomae.window_attention_backward(dout, qkv, tau, bias, None, lse, *args)


@pytest.mark.parametrize("learnable", [(True, True), (False, True), (True, False)])  # (tau, bias)
def test_compiles_without_graph_breaks(learnable):
    """The compiled graph runs the custom ops, eager runs the autograd.Function: same outputs and
    gradients, with tau or bias frozen too (the op then skips that gradient)."""
    qkv, tau, bias = (x.float() for x in make_inputs(1, (4, 4), (2, 2), 2, 16))

    def run(fn):
        leaves = [qkv.clone().requires_grad_()] + [t.clone().requires_grad_(g) for t, g in zip((tau, bias), learnable)]
        out = fn(leaves[0], leaves[1], leaves[2])
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        return [out] + [t.grad for t in leaves]

    def op(x, t, b):
        return window_attention(x, grid=(4, 4), window=(2, 2), shift=(1, 1), num_heads=2, tau=t, bias=b)

    compiled = run(torch.compile(op, fullgraph=True, backend="aot_eager"))
    eager = run(op)
    for a, b in zip(compiled, eager):
        if a is None or b is None:  # a frozen table's gradient
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("window,shift,head_dim",
                         [((4, 4), (2, 0), 32), ((2, 2), (1, 1), 16), ((16, 16), (8, 3), 64), ((8, 8), (4, 4), 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dtypes(window, shift, head_dim, dtype):
    grid = (32, 16)
    qkv, tau, bias = make_inputs(2, grid, window, 3, head_dim)
    check_against_reference(qkv, tau, bias, dtype, grid=grid, window=window, shift=shift, num_heads=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_candidate_tilings(dtype):
    """Every tiling the sweep of benches/bench_window_tiling.py times, compiled for the GPU and
    checked against the reference at the decoder's window and head dim (the interpreter ignores
    num_warps, so only a GPU proves a layout), before any can become the default."""
    from benches.bench_window_tiling import TILING_CANDIDATES

    module = sys.modules["kernels.window_attention"]
    qkv, tau, bias = make_inputs(5, (64, 8), (4, 4), 16, 32)  # 5: a part-empty last batch block
    for rows, num_warps, batch_per_program in TILING_CANDIDATES:
        with module.forced_tiling(rows, num_warps, batch_per_program):
            check_against_reference(qkv, tau, bias, dtype, grid=(64, 8), window=(4, 4), shift=(2, 0), num_heads=16)


@pytest.mark.gpu
def test_gpu_decoder_shape_bf16():
    """The decoder's attention: B=64, grid 64x8, 16 heads of 32, window 4x4, shift (2, 0)."""
    qkv, tau, bias = make_inputs(64, (64, 8), (4, 4), 16, 32)
    check_against_reference(qkv, tau, bias, torch.bfloat16, grid=(64, 8), window=(4, 4), shift=(2, 0),
                            num_heads=16)


@pytest.mark.gpu
@pytest.mark.parametrize("window,grid,head_dim", [((4, 4), (64, 8), 32), ((16, 16), (16, 16), 128)])
def test_gpu_frozen_tau_and_bias_leave_qkv_gradient_within_rounding(window, grid, head_dim):
    # The compiled bf16 kernels with and without the tau and bias gradients (the decoder's shape in
    # one tile, and a chunked window): dqkv against the reference, and the two within bf16
    # rounding of each other. Not the same bits: the flags compile different kernels, and on the
    # H200 (2026-11-27) the chunked window's fp32 accumulations rounded differently.
    qkv, tau, bias = make_inputs(4, grid, window, 2, head_dim)
    args = dict(grid=grid, window=window, shift=(window[0] // 2, 0), num_heads=2)
    q64 = qkv.clone().requires_grad_()
    expected = window_attention_reference(q64, tau=tau, bias=bias, **args)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    dqkv = {}
    for frozen in (False, True):
        q = qkv.bfloat16().requires_grad_()
        t, b = tau.float().requires_grad_(not frozen), bias.float().requires_grad_(not frozen)
        window_attention(q, tau=t, bias=b, **args).backward(grad.bfloat16())
        dqkv[frozen] = q.grad
    for frozen in (False, True):
        assert relative_error(dqkv[frozen], q64.grad) < TOLERANCE[torch.bfloat16], f"frozen={frozen}"
    # A rounding difference moves an element by an ulp or two (2**-8 to 2**-7 of it each), or by a little
    # of the largest gradient where a sum cancels; a wrong term moves far more.
    a, b = dqkv[True].double(), dqkv[False].double()
    diff = (a - b).abs()
    allowed = 2**-6 * torch.maximum(a.abs(), b.abs()) + 1e-3 * b.abs().max()
    assert (diff <= allowed).all(), f"max |difference| {diff.max():.3g}, at most {(diff / allowed).max():.3g}x the allowance"


@pytest.mark.gpu
def test_gpu_inputs_on_two_devices():
    qkv, tau, bias = (x.float() for x in make_inputs(1, (8, 8), (4, 4), 2, 16))
    with pytest.raises(ValueError, match="tau"):
        window_attention(qkv, tau=tau.cpu(), bias=bias, grid=(8, 8), window=(4, 4), num_heads=2)


@pytest.mark.gpu
def test_gpu_inductor_fullgraph():
    qkv, tau, bias = (x.to(torch.bfloat16) for x in make_inputs(2, (16, 8), (4, 4), 4, 32))
    args = dict(grid=(16, 8), window=(4, 4), shift=(2, 0), num_heads=4, tau=tau, bias=bias)
    compiled = torch.compile(lambda x: window_attention(x, **args) * 2, fullgraph=True)
    x, y = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    compiled(x).sum().backward()
    (window_attention(y, **args) * 2).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_fake_tensors_take_the_custom_op():
    """Under a dispatch mode (fake tensors, as export and compile use) the op's fake kernel serves."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 32, 3 * 2 * 16, device=DEVICE)
        tau, bias = torch.ones(2, device=DEVICE), torch.zeros(2, 16, 16, device=DEVICE)
        out = window_attention(qkv, grid=(8, 4), window=(4, 4), shift=(2, 0), num_heads=2, tau=tau, bias=bias)
    assert out.shape == (2, 32, 32)


@pytest.mark.parametrize("rows,num_warps", [(16, 1), (16, 2), (32, 4), (64, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_tiling_matches_reference(rows, num_warps, dtype):
    """The tiling changes how windows are packed or chunked, never the result: packed 2x2 windows,
    4x4 windows (one to a 16-row tile), 32-token windows (chunked at 16 rows, packed at 64) and
    a 144-token window with a partial last chunk."""
    module = sys.modules["kernels.window_attention"]
    cases = [((8, 8), (2, 2), (1, 1)), ((8, 8), (4, 4), (2, 0)), ((8, 8), (8, 4), (3, 1)),
             ((12, 12), (12, 12), (7, 5))]
    with module.forced_tiling(rows, num_warps):
        for grid, window, shift in cases:
            qkv, tau, bias = make_inputs(1, grid, window, 2, 16)
            check_against_reference(qkv, tau, bias, dtype, grid=grid, window=window, shift=shift, num_heads=2)
    assert module.TILING_OVERRIDE is None


@pytest.mark.parametrize("rows,num_warps,name", [(8, 4, "rows"), (48, 4, "rows"), (16, 3, "num_warps")])
def test_forced_tiling_rejects_what_the_kernels_cannot_take(rows, num_warps, name):
    with pytest.raises(ValueError, match=name):
        with sys.modules["kernels.window_attention"].forced_tiling(rows, num_warps):
            pass


def test_forced_tiling_nests():
    module = sys.modules["kernels.window_attention"]
    with module.forced_tiling(64, 4):
        with module.forced_tiling(16, 2):
            assert module.TILING_OVERRIDE == module.Tiling(16, 2)
        assert module.TILING_OVERRIDE == module.Tiling(64, 4)
    assert module.TILING_OVERRIDE is None


@pytest.mark.parametrize("batch_per_program", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_elements_per_program_match_reference(batch_per_program, dtype):
    """A backward program that takes several batch elements in turn (a last block part-empty with
    B=3) sums their bias and tau gradients right: packed 2x2 windows, one 4x4 window to a tile,
    and a 144-token window chunked at 64 rows (its partial summed in memory)."""
    module = sys.modules["kernels.window_attention"]
    cases = [((8, 8), (2, 2), (1, 1), 16), ((8, 8), (4, 4), (2, 0), 16), ((12, 12), (12, 12), (7, 5), 64)]
    for grid, window, shift, rows in cases:
        with module.forced_tiling(rows, 4, batch_per_program):
            qkv, tau, bias = make_inputs(3, grid, window, 2, 16)
            check_against_reference(qkv, tau, bias, dtype, grid=grid, window=window, shift=shift, num_heads=2)


def test_default_batch_per_program():
    rule = sys.modules["kernels.window_attention"].default_batch_per_program
    # the decoder (B=64, 32 windows of 4x4, 16 heads of 32, bf16): partials a third of qkv, kept
    assert rule(64, 32 * 16, partial_bytes=4 * 16**2, qkv_bytes=16 * 3 * 32 * 2) == 1
    # 16x16 windows of head dim 32: partials 5.3x qkv with one element a program; 8 elements keep
    # them under qkv's size, if the batch leaves enough programs
    assert rule(64, 4 * 16, partial_bytes=4 * 256**2, qkv_bytes=256 * 3 * 32 * 2) == 2
    assert rule(2048, 4 * 16, partial_bytes=4 * 256**2, qkv_bytes=256 * 3 * 32 * 2) == 8
    # a small launch keeps one element a program
    assert rule(2, 8, partial_bytes=4 * 256**2, qkv_bytes=256 * 3 * 16 * 4) == 1


def _projected_attention(x, weight, overwrite, **kwargs):
    qkv = torch.nn.functional.linear(x, weight)
    seen = []
    qkv.register_hook(lambda g: seen.append((g.data_ptr() == qkv.data_ptr(), g.clone())))
    return window_attention(qkv, overwrite_qkv=overwrite, **kwargs), seen


@pytest.mark.parametrize("window,shift,grid", [((4, 4), (2, 0), (8, 8)), ((12, 12), (7, 5), (12, 12))])
def test_overwrite_qkv_gives_the_same_gradients(window, shift, grid):
    """With overwrite_qkv the backward writes dqkv into qkv's own memory (a 4x4 window a tile) or,
    for a chunked window, into a new buffer; either way every gradient is the one without it."""
    qkv64, tau64, bias64 = make_inputs(2, grid, window, 2, 16)
    x0 = torch.randn(2, grid[0] * grid[1], 32, device=DEVICE)
    w0 = torch.randn(qkv64.shape[-1], 32, device=DEVICE) / 6
    args = dict(grid=grid, window=window, shift=shift, num_heads=2)
    results = []
    for overwrite in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        tau, bias = tau64.float().requires_grad_(), bias64.float().requires_grad_()
        out, seen = _projected_attention(x, w, overwrite, tau=tau, bias=bias, **args)
        out.backward(torch.ones_like(out))
        results.append((seen, [t.grad for t in (x, w, tau, bias)]))
    (seen_plain, plain), (seen_overwrite, overwritten) = results
    assert not seen_plain[0][0]
    assert seen_overwrite[0][0] == (window == (4, 4)), "in place exactly when every window fits a tile"
    torch.testing.assert_close(seen_overwrite[0][1], seen_plain[0][1], rtol=0, atol=0)
    for a, b in zip(overwritten, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_overwrite_qkv_keeps_qkv_for_a_retained_graph():
    qkv64, tau64, bias64 = make_inputs(1, (8, 8), (4, 4), 2, 16)
    x = torch.randn(1, 64, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(qkv64.shape[-1], 32, device=DEVICE, requires_grad=True)
    out, seen = _projected_attention(x, w, True, grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2,
                                     tau=tau64.float(), bias=bias64.float())
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    assert not seen[0][0], "a retained graph keeps qkv"
    assert seen[1][0], "the last backward may overwrite it"
    torch.testing.assert_close(x.grad, 2 * first)


def test_overwrite_qkv_makes_a_later_reader_of_qkv_fail_loudly():
    """Another node that saved qkv and runs after the attention's backward must not read dqkv."""
    qkv64, _, _ = make_inputs(1, (8, 8), (4, 4), 2, 16)
    x = torch.randn(1, 64, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(qkv64.shape[-1], 32, device=DEVICE, requires_grad=True)
    qkv = torch.nn.functional.linear(x, w)
    scale = torch.ones(qkv.shape[-1], device=DEVICE, requires_grad=True)
    other = (qkv * scale).sum()  # saves qkv; created first, so its backward runs after the attention's
    out = window_attention(qkv, grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2, overwrite_qkv=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (out.sum() + other).backward()


@pytest.mark.parametrize("make", ["leaf", "view_of_leaf", "slice_of_a_projection"])
def test_overwrite_qkv_never_writes_memory_it_does_not_own(make):
    """A leaf, a view of one (a parameter's values must survive) or a slice of a larger buffer
    (whose other slices share its memory and version counter) keeps its values: the gradient gets
    its own buffer, and two slices of one projection both backpropagate."""
    qkv64, tau64, bias64 = make_inputs(2, (8, 8), (4, 4), 2, 16)
    args = dict(grid=(8, 8), window=(4, 4), shift=(2, 0), num_heads=2, tau=tau64.float(), bias=bias64.float(),
                overwrite_qkv=True)
    leaf = qkv64.float().requires_grad_()
    if make == "leaf":
        parts = [leaf]
    elif make == "view_of_leaf":
        parts = [leaf.view(2, 64, 96)]
    else:
        parts = list((leaf * 1).split(1))
    before = leaf.detach().clone()
    sum(window_attention(p, **args).sum() for p in parts).backward()
    torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    plain = qkv64.float().requires_grad_()
    window_attention(plain, **{**args, "overwrite_qkv": False}).sum().backward()
    torch.testing.assert_close(leaf.grad, plain.grad, rtol=0, atol=0)


def test_overwrite_qkv_must_be_a_bool():
    qkv = torch.randn(1, 64, 96, device=DEVICE)
    with pytest.raises(TypeError, match="overwrite_qkv"):
        window_attention(qkv, grid=(8, 8), window=(4, 4), num_heads=2, overwrite_qkv=1)
