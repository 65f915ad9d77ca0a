"""kernels.gelu_matmul (fc1 with GELU; GELU's backward with the matmuls that feed it) against
float64 references, and gelu_mlp(fused_matmul=True) against the cuBLAS path.

On the CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1) in
float32 and float16 (its bfloat16 dots are wrong); the ``gpu`` tests repeat them in bfloat16 at
the decoder's size. Outputs come from a poisoned ``torch.empty`` (NaN): an unwritten element shows.
"""
import pytest
import torch

from kernels.gelu_matmul import (linear_gelu, linear_gelu_backward, linear_gelu_backward_reference,
                                 linear_gelu_reference)
from kernels.gelu_mlp import gelu_mlp
from kernels.reference.gelu_mlp import gelu_mlp as mlp_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative to the largest reference value: 16-bit storage rounds fc1's output and the gradient.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

pytestmark = pytest.mark.usefixtures("poisoned_empty")


def close(actual, expected64, dtype, what):
    assert actual.dtype == dtype and actual.shape == expected64.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (an unwritten element)"
    scale = max(expected64.abs().max().item(), 1.0) if expected64.numel() else 1.0
    err = (actual.double() - expected64).abs().max().item() if expected64.numel() else 0.0
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOLERANCE[dtype] * scale:.3g}"


def operands(M, K, N, J, dtype, bias=True):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    make = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)  # noqa: E731
    return (make(M, K), make(N, K, scale=K**-0.5), make(N) if bias else None, make(M, J), make(J, N, scale=J**-0.5))


SHAPES = [(37, 24, 50, 20), (1, 16, 16, 16), (130, 72, 136, 40), (64, 64, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,J", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu(dtype, M, K, N, J, approximate):
    x, w, b, _, _ = operands(M, K, N, J, dtype)
    close(linear_gelu(x, w, b, approximate), linear_gelu_reference(x.double(), w.double(), b.double(), approximate),
          dtype, "act")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,J", SHAPES)
@pytest.mark.parametrize("given_hidden", [False, True])
def test_linear_gelu_backward(dtype, M, K, N, J, given_hidden):
    x, w, b, g, w2 = operands(M, K, N, J, dtype)
    hidden = torch.nn.functional.linear(x, w, b) if given_hidden else None
    act, grad_hidden, grad_bias = linear_gelu_backward(x, w, b, g, w2, "none", True, hidden=hidden)
    ref = linear_gelu_backward_reference(x.double(), w.double(), b.double(), g.double(), w2.double(), "none", True,
                                         hidden=hidden.double() if given_hidden else None)
    for name, actual, expected in zip(("act", "grad_hidden", "grad_bias"), (act, grad_hidden, grad_bias), ref):
        close(actual, expected, dtype, name)


def test_without_bias_non_contiguous_and_tanh():
    x, w, _, g, w2 = operands(40, 32, 48, 24, torch.float32, bias=False)
    xt = x.t().contiguous().t()  # column-major
    wt = w.t().contiguous().t()
    w2s = torch.randn(24, 96, device=DEVICE)[:, ::2]  # strided columns
    act, grad_hidden, grad_bias = linear_gelu_backward(xt, wt, None, g, w2s, "tanh", False)
    ref = linear_gelu_backward_reference(x.double(), w.double(), None, g.double(), w2s.double(), "tanh", False)
    assert grad_bias is None and ref[2] is None
    close(act, ref[0], torch.float32, "act")
    close(grad_hidden, ref[1], torch.float32, "grad_hidden")
    close(linear_gelu(xt, wt, None, "tanh"), linear_gelu_reference(x.double(), w.double(), None, "tanh"),
          torch.float32, "forward")


def test_bad_input_is_named():
    x, w, b, g, w2 = operands(8, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_gelu(x, w[:, :8], b, "none")
    with pytest.raises(ValueError, match="bias"):
        linear_gelu(x, w, b[:3], "none")
    with pytest.raises(TypeError, match="weight"):
        linear_gelu(x, w.half(), b, "none")
    with pytest.raises(ValueError, match="approximate"):
        linear_gelu(x, w, b, "exact")
    with pytest.raises(ValueError, match="grad"):
        linear_gelu_backward(x, w, b, g[:3], w2, "none", True)
    with pytest.raises(ValueError, match="hidden"):
        linear_gelu_backward(x, w, b, g, w2, "none", True, hidden=x[:, :8])
    with pytest.raises(ValueError, match="weight2"):
        linear_gelu_backward(x, w, b, g, w2[0, 0], "none", True)  # a 0-d weight2: no bare IndexError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernel path and the reference
def test_building_blocks_refuse_inputs_that_need_a_gradient(dtype):
    """Neither function records a graph: a result silently detached from x would drop its share of
    x's gradient, so asking for one is an error on every path, and no_grad calls still work."""
    x, w, b, g, w2 = (t.to(dtype) for t in operands(8, 16, 16, 16, torch.float32))
    with pytest.raises(RuntimeError, match="linear_gelu has no autograd"):
        linear_gelu(x.requires_grad_(), w, b, "none")
    with pytest.raises(RuntimeError, match="linear_gelu_backward has no autograd"):
        linear_gelu_backward(x, w, b, g, w2.requires_grad_(), "none", True)
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu(x, w, b, "none"), linear_gelu_reference(x, w, b, "none"))
        linear_gelu_backward(x, w, b, g, w2, "none", True)


# ------------------------------------------------------------------------------------------------
# gelu_mlp(fused_matmul=True): the same MLP as the cuBLAS path, forward and every gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save", ["input", "hidden"])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_fused_matches_float64(dtype, save, bias):
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)  # noqa: E731
    x = rand(2, 19, 32)
    params = [rand(48, 32, scale=32**-0.5), rand(48) if bias else None, rand(24, 48, scale=48**-0.5),
              rand(24) if bias else None]
    leaves = [t.requires_grad_() for t in (x, *params) if t is not None]
    out = gelu_mlp(x, *params, save=save, fused_matmul=True)
    high = [t.detach().double().requires_grad_() if t is not None else None for t in (x, *params)]
    want = mlp_reference(*high)
    close(out, want.detach(), dtype, "out")
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(want, [t for t in high if t is not None], grad.double())
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        close(a, e, dtype, f"grad {i}")


def test_gelu_mlp_fused_under_autocast_and_compile():
    """CPU autocast (float16 compute) and the custom-op path that torch.compile traces."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 32, generator=g).to(DEVICE).requires_grad_()
    params = [torch.randn(64, 32, generator=g).to(DEVICE) / 6, torch.randn(64, generator=g).to(DEVICE),
              torch.randn(32, 64, generator=g).to(DEVICE) / 8, torch.randn(32, generator=g).to(DEVICE)]
    params = [p.requires_grad_() for p in params]

    def run(fused, compiled=False):
        fn = lambda *a: gelu_mlp(*a, fused_matmul=fused)  # noqa: E731
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = fn(x, *params)
        return out, torch.autograd.grad(out.float().square().sum(), [x, *params])

    plain, fused, traced = run(False), run(True), run(True, compiled=True)
    assert fused[0].dtype == plain[0].dtype == torch.float16
    torch.testing.assert_close(fused[0], plain[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(traced[0], fused[0], rtol=0, atol=0)
    for a, b, c in zip(fused[1], plain[1], traced[1], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
        torch.testing.assert_close(c, a, rtol=1e-2, atol=1e-2 * a.abs().max().item())


def test_gelu_mlp_fused_matmul_must_be_a_bool():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(TypeError, match="fused_matmul"):
        gelu_mlp(x, torch.randn(16, 8, device=DEVICE), None, torch.randn(8, 16, device=DEVICE), None, fused_matmul=1)


# ------------------------------------------------------------------------------------------------
# GPU: bfloat16 at the decoder's size
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_decoder_size(approximate):
    x, w, b, g, w2 = operands(64 * 512, 512, 2048, 512, torch.bfloat16)
    close(linear_gelu(x, w, b, approximate), linear_gelu_reference(x.double(), w.double(), b.double(), approximate),
          torch.bfloat16, "act")
    got = linear_gelu_backward(x, w, b, g, w2, approximate, True)
    ref = linear_gelu_backward_reference(x.double(), w.double(), b.double(), g.double(), w2.double(), approximate, True)
    for name, actual, expected in zip(("act", "grad_hidden", "grad_bias"), got, ref):
        close(actual, expected, torch.bfloat16, name)
    # against the cuBLAS path in the same dtype: at most a last-bit difference in most elements
    plain = linear_gelu_backward_reference(x, w, b, g, w2, approximate, True)
    for actual, expected in zip(got[:2], plain[:2]):
        differ = (actual != expected).float().mean().item()
        assert differ < 0.05, differ


def test_strided_bias_and_expanded_gradient():
    x, w, _, g, w2 = operands(20, 16, 24, 16, torch.float32)
    b = torch.randn(48, device=DEVICE)[::2]  # a strided bias
    g = torch.randn(1, 16, device=DEVICE).expand(20, 16)  # stride 0 rows, as a sum's backward hands one
    close(linear_gelu(x, w, b, "none"), linear_gelu_reference(x.double(), w.double(), b.double(), "none"),
          torch.float32, "forward")
    got = linear_gelu_backward(x, w, b, g, w2, "none", True)
    ref = linear_gelu_backward_reference(x.double(), w.double(), b.double(), g.double(), w2.double(), "none", True)
    for name, actual, expected in zip(("act", "grad_hidden", "grad_bias"), got, ref):
        close(actual, expected, torch.float32, name)


def test_mlp_module_switch():
    from audiomae.layers import Mlp

    with pytest.raises(TypeError, match="fused_matmul"):
        Mlp(16, 32, backend="triton", fused_matmul="False")
    torch.manual_seed(0)
    plain = Mlp(16, 32, backend="triton").to(DEVICE)
    fused = Mlp(16, 32, backend="triton", fused_matmul=True).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 16, device=DEVICE)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
