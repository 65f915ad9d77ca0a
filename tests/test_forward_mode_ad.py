"""Forward-mode AD and direct op calls across the Triton ops.

The kernels carry reverse-mode rules only. A dual tensor (``torch.autograd.forward_ad``) gets a
clear error from the ops that refuse torch.func's transforms, and its exact tangent from
``gelu_mlp`` (which serves them), with or without a dispatch mode active (a mode sends the public
functions to the ``torch.library`` op, whose autograd kernel a tangent alone never reaches): the
tangent used to come back None. Also here: the ops called directly where no kernel can run,
the post-norm op's statistics, and window attention under autocast.
"""
import contextlib

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

import kernels
from kernels._dispatch import use_triton
from kernels.reference import gather_tokens as gather_ref
from kernels.reference import post_norm_residual as post_norm_ref
from kernels.reference import unshuffle_tokens as unshuffle_ref
from kernels.reference.gelu_mlp import gelu_mlp as gelu_mlp_ref


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    ids_keep = torch.tensor([[0, 3, 5], [1, 2, 11]])
    ids_restore = torch.stack([torch.randperm(7, generator=g) for _ in range(2)])
    qkv_tau_bias = (r(2, 16, 3 * 2 * 16), r(2).abs() + 0.5, r(2, 4, 4))
    mlp = (r(2, 5, 16), r(32, 16) * 0.2, r(32), r(16, 32) * 0.2, r(16))
    return {
        "gather_tokens": (lambda x, p: kernels.gather_tokens(x, ids_keep, p),
                          lambda x, p: gather_ref.gather_tokens(x, ids_keep, p), (r(2, 12, 8), r(12, 8))),
        "gather_tokens_2d": (lambda x, p: kernels.gather_tokens_2d(x, ids_keep[:, :2] % 3, ids_keep[:, 1:] % 4, (3, 4), p),
                             lambda x, p: gather_ref.gather_tokens_2d(x, ids_keep[:, :2] % 3, ids_keep[:, 1:] % 4, (3, 4), p),
                             (r(2, 12, 8), r(12, 8))),
        "unshuffle_tokens": (lambda x, m, p: kernels.unshuffle_tokens(x, ids_restore, m, p),
                             lambda x, m, p: unshuffle_ref.unshuffle_tokens(x, ids_restore, m, p),
                             (r(2, 3, 8), r(8), r(7, 8))),
        "post_norm_residual": (kernels.post_norm_residual, post_norm_ref.post_norm_residual, (r(4, 8), r(4, 8), r(8), r(8))),
        "gelu_mlp": (kernels.gelu_mlp, gelu_mlp_ref, mlp),
        "window_attention": (
            lambda qkv, tau, bias: kernels.window_attention(qkv, grid=(4, 4), window=(2, 2), shift=(1, 0), num_heads=2,
                                                            tau=tau, bias=bias),
            lambda qkv, tau, bias: kernels.window_attention_reference(qkv, grid=(4, 4), window=(2, 2), shift=(1, 0),
                                                                      num_heads=2, tau=tau, bias=bias),
            qkv_tau_bias),
    }


CASES = _cases()


def _tangent(fn, primals, tangents, mode):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        with mode:
            out = fn(*duals)
        return fwAD.unpack_dual(out).primal, fwAD.unpack_dual(out).tangent


# The ops whose kernels refuse autodiff transforms refuse dual tensors the same way; gelu_mlp
# (torch operations) serves both with its unfused ops.
REFUSING = {"gather_tokens", "gather_tokens_2d", "unshuffle_tokens", "post_norm_residual", "window_attention"}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("with_mode", [False, True])
def test_dual_tensors_get_exact_tangents_or_a_clear_error(name, with_mode):
    ours, reference, primals = CASES[name]
    tangents = [torch.randn_like(p) for p in primals]
    mode = FlopCounterMode(display=False) if with_mode else contextlib.nullcontext()
    if name in REFUSING and use_triton(primals[0]):
        with pytest.raises(NotImplementedError, match=f"kernels.{name} has no forward-mode AD rule"):
            _tangent(ours, primals, tangents, mode)
        return
    out, tangent = _tangent(ours, primals, tangents, mode)
    expected_out, expected = _tangent(reference, primals, tangents, contextlib.nullcontext())
    assert tangent is not None, f"{name}: the tangent was dropped"
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,args", [
    ("gather_tokens", lambda: (torch.randn(2, 6, 8), torch.zeros(2, 3, dtype=torch.long), None)),
    ("unshuffle_tokens", lambda: (torch.randn(2, 3, 8), torch.stack([torch.randperm(6)] * 2), torch.randn(8), None)),
    ("column_sum", lambda: (torch.randn(5, 8), torch.float32)),
    ("post_norm_residual", lambda: (torch.randn(4, 8), torch.randn(4, 8), None, None, 1e-5, torch.float32, None)),
    ("window_attention", lambda: (torch.randn(1, 16, 96), None, None, (4, 4), (2, 2), (0, 0), 2, -100.0)),
])
def test_ops_called_directly_where_no_kernel_runs_say_so(monkeypatch, op, args):
    # CPU tensors without the interpreter: the launch failed inside Triton ("0 active drivers").
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=rf"torch.ops.audiomae.{op} launches a Triton kernel.*TRITON_INTERPRET=1"):
        getattr(torch.ops.audiomae, op)(*args())


def test_post_norm_op_statistics_are_not_differentiable():
    x, branch = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    out, copy, mean, rstd = torch.ops.audiomae.post_norm_residual(x, branch, None, None, 1e-5, torch.float32, None)
    assert out.requires_grad and not (copy.requires_grad or mean.requires_grad or rstd.requires_grad)
    out, copy, _, _ = torch.ops.audiomae.post_norm_residual(x, branch, None, None, 1e-5, torch.float32, torch.float16)
    assert copy.requires_grad  # a real copy carries gradients


def test_window_attention_follows_autocast():
    # The reference's matmuls take float32 qkv in the autocast dtype and return it: so does the op.
    qkv, tau, bias = (t.clone().requires_grad_() for t in CASES["window_attention"][2])
    kwargs = dict(grid=(4, 4), window=(2, 2), shift=(1, 0), num_heads=2, tau=tau, bias=bias)
    with torch.autocast("cpu", dtype=torch.float16):
        out = kernels.window_attention(qkv, **kwargs)
        expected = kernels.window_attention_reference(qkv, **kwargs)
    assert out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and torch.isfinite(qkv.grad).all()


def test_fused_gelu_matmul_refuses_bf16_in_the_interpreter():
    from kernels._dispatch import interpreting

    if not interpreting():
        pytest.skip("the interpreter's bf16 tl.dot is what is refused")
    x, w1, b1, w2, b2 = (t.bfloat16() for t in CASES["gelu_mlp"][2])
    with pytest.raises(NotImplementedError, match="bfloat16 tl.dot"):
        kernels.gelu_mlp(x, w1, b1, w2, b2, fused_matmul=True)


def test_gather_tokens_2d_refusals_name_it():
    x = torch.randn(2, 12, 8, requires_grad=True)
    ids_t, ids_f = torch.tensor([[0, 2], [1, 2]]), torch.tensor([[1], [3]])
    fn = lambda x: kernels.gather_tokens_2d(x, ids_t, ids_f, (3, 4)).sum()  # noqa: E731
    if not use_triton(x):
        pytest.skip("the reference serves CPU tensors without the interpreter")
    with pytest.raises(NotImplementedError, match="kernels.gather_tokens_2d does not support"):
        torch.func.grad(fn)(x)
    out = kernels.gather_tokens_2d(x, ids_t, ids_f, (3, 4))
    with pytest.raises(RuntimeError, match="kernels.gather_tokens_2d cannot differentiate twice"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
