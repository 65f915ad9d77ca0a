"""post_norm_residual (``x + layer_norm(branch)``) against its float64 eager reference.

On the CPU the kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1); the
``gpu`` tests repeat the checks at the decoder's size and under CUDA autocast. Kernel outputs are
allocated by a poisoned ``torch.empty`` (NaN-filled): a value a kernel forgets to write is NaN.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import post_norm_residual
from kernels.reference.post_norm_residual import post_norm_residual as reference

# ``kernels.post_norm_residual`` is the function; the module holds the launchers and the dispatch.
MODULE = sys.modules["kernels.post_norm_residual"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative to the largest reference value: low precision rounds the sum and the norm.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest


def close(actual, expected64, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN (an unwritten output)"
    scale = expected64.abs().max().item() if expected64.numel() else 1.0
    tol = TOLERANCE[dtype] * max(scale, 1.0)
    err = (actual.double() - expected64).abs().max().item() if expected64.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def make_inputs(shape, dtype, *, weight=True, bias=True, x_dtype=None, param_dtype=None):
    C = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(x_dtype or dtype)
    # An offset and a scale of its own per row, as a projection's output has.
    branch = (torch.randn(shape, device=DEVICE) * (1 + 3 * torch.rand(*shape[:-1], 1, device=DEVICE))
              + torch.randn(*shape[:-1], 1, device=DEVICE)).to(dtype)
    w = torch.randn(C, device=DEVICE).to(param_dtype or dtype) if weight else None
    b = torch.randn(C, device=DEVICE).to(param_dtype or dtype) if bias else None
    return x, branch, w, b


def check(x, branch, w, b, eps=1e-5, dtype=None):
    """Forward and every gradient against float64, and against eager torch in the same dtypes."""
    dtype = dtype or branch.dtype
    low = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, branch, w, b)]
    high = [t.detach().double().requires_grad_() if t is not None else None for t in (x, branch, w, b)]
    out = post_norm_residual(*low, eps=eps)
    want = reference(*high, eps=eps)
    eager = reference(*[t.detach() if t is not None else None for t in (x, branch, w, b)], eps=eps)
    assert out.dtype == eager.dtype and out.shape == eager.shape and out.is_contiguous()
    close(out, want, dtype, "output")
    g = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    leaves_low = [t for t in low if t is not None]
    leaves_high = [t for t in high if t is not None]
    got = torch.autograd.grad(out, leaves_low, g)
    expected = torch.autograd.grad(want, leaves_high, g.double())
    for name, a, e, leaf in zip(("x", "branch", "weight", "bias"), got, expected, leaves_low):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        close(a, e, dtype, f"grad of {name}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 33), (2, 5, 512), (37, 100), (1, 3, 768), (4, 1000)])
def test_float32(seed, shape):
    check(*make_inputs(shape, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 9, 64)])
def test_dtypes(seed, dtype, shape):
    check(*make_inputs(shape, dtype))


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_without_weight_or_bias(seed, weight, bias):
    check(*make_inputs((5, 6, 24), torch.float32, weight=weight, bias=bias))


def test_eps_matters(seed):
    # Rows whose variance (about 1e-6) is of the order of eps: eps shapes the output.
    x, branch, w, b = make_inputs((3, 4, 16), torch.float32)
    branch = 1e-3 * torch.randn(branch.shape, device=DEVICE)
    check(x, branch, w, b, eps=1e-3)
    check(x, branch, w, b, eps=1e-6)


def test_mixed_dtypes_as_the_decoder_has_them(seed):
    # A float32 residual stream, a bfloat16 branch, float32 parameters: the norm is bfloat16
    # (rounded before the add, as eager torch does outside CUDA autocast) and the sum float32.
    x, branch, w, b = make_inputs((2, 8, 48), torch.bfloat16, x_dtype=torch.float32, param_dtype=torch.float32)
    out = post_norm_residual(x, branch, w, b)
    eager = reference(x, branch, w, b)
    assert out.dtype == torch.float32
    # Same rounding points as eager: one bfloat16 ulp of the norm at most.
    torch.testing.assert_close(out, eager, rtol=0, atol=2 * 2**-8 * eager.abs().max().item())
    check(x, branch, w, b, dtype=torch.bfloat16)


def test_non_contiguous_inputs(seed):
    x, branch, w, b = make_inputs((6, 5, 20), torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # a permuted view
    branch_t = torch.randn(5, 40, 6, device=DEVICE)[:, ::2].permute(2, 0, 1)  # strided channels too
    w_t = torch.randn(40, device=DEVICE)[::2]
    assert not (x_t.is_contiguous() or branch_t.is_contiguous() or w_t.is_contiguous())
    check(x_t, branch_t, w_t, b)


@pytest.mark.parametrize("wanted", ["x", "branch", "weight", "bias", "weight+bias"])
def test_only_some_inputs_need_grad(seed, wanted):
    x, branch, w, b = make_inputs((3, 5, 10), torch.float32)
    names = ("x", "branch", "weight", "bias")
    inputs = [t.requires_grad_(name in wanted.split("+")) for name, t in zip(names, (x, branch, w, b))]
    out = post_norm_residual(*inputs)
    g = torch.randn(out.shape, device=DEVICE)
    leaves = [t for t in inputs if t.requires_grad]
    high = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(reference(*high), [t for t in high if t.requires_grad], g.double())
    for a, e in zip(got, want, strict=True):
        close(a, e, torch.float32, wanted)


def test_no_grad_and_empty_rows(seed):
    x, branch, w, b = make_inputs((4, 3, 8), torch.float32)
    with torch.no_grad():
        close(post_norm_residual(x, branch, w, b), reference(x.double(), branch.double(), w.double(), b.double()),
              torch.float32, "no_grad output")
    x0, branch0 = x[:0].requires_grad_(), branch[:0].requires_grad_()
    w0 = w.clone().requires_grad_()
    out = post_norm_residual(x0, branch0, w0, b)
    assert out.shape == (0, 3, 8)
    grads = torch.autograd.grad(out, (x0, branch0, w0), torch.ones_like(out))
    assert grads[0].shape == (0, 3, 8) and grads[1].shape == (0, 3, 8)
    assert torch.equal(grads[2], torch.zeros_like(w0))


def test_weight_gradient_sums_over_many_programs(seed):
    # More row tiles than the backward launches programs: each program loops over a run of tiles.
    rows = MODULE.REDUCING_PROGRAMS * 3 + 5
    check(*make_inputs((rows, 32), torch.float32))


def test_rejects_bad_input(seed):
    x, branch, w, b = make_inputs((2, 3, 8), torch.float32)
    with pytest.raises(ValueError, match="share one shape"):
        post_norm_residual(x, branch[:, :2])
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        post_norm_residual(x, branch, w[:4])
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        post_norm_residual(x, branch, w, b[None])
    with pytest.raises(ValueError, match="C=0"):
        post_norm_residual(x[..., :0], branch[..., :0])
    with pytest.raises(ValueError, match="supported: 1 to 16384"):
        big = torch.zeros(1, MODULE.MAX_CHANNELS + 1, device=DEVICE)
        post_norm_residual(big, big)
    with pytest.raises(TypeError, match="branch has dtype torch.int64"):
        post_norm_residual(x, branch.long())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        post_norm_residual(x.tolist(), branch)
    with pytest.raises(ValueError, match="weight is on meta"):
        post_norm_residual(x, branch, w.to("meta"))


def test_parameter_dtypes_torch_refuses(seed):
    x, branch, w, b = make_inputs((2, 3, 8), torch.float32)
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but branch is torch.float32"):
        post_norm_residual(x, branch, w.bfloat16(), b)
    # A float32 weight on a bfloat16 branch is what torch allows, and so it is here.
    check(x, branch.bfloat16(), w, b.float(), dtype=torch.bfloat16)
    # ...with every parameter float32: torch's mixed-dtype layer_norm refuses a mix of the two
    for weight, bias in ((w.float(), b.bfloat16()), (w.bfloat16(), b.float())):
        with pytest.raises(TypeError, match="but branch is torch.bfloat16 and"):
            post_norm_residual(x, branch.bfloat16(), weight, bias)
        with pytest.raises(RuntimeError, match="scalar type"):  # the rule is torch's (CPU)
            torch.nn.functional.layer_norm(branch.bfloat16().cpu(), (8,), weight.cpu(), bias.cpu())


@pytest.mark.skipif(DEVICE == "cuda", reason="CUDA tensors always take the kernel")
def test_cpu_without_interpreter_uses_the_reference(seed, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, branch, w, b = make_inputs((2, 3, 8), torch.float32)
    out = post_norm_residual(x, branch, w, b)
    assert torch.equal(out, x + F.layer_norm(branch, (8,), w, b))


@pytest.mark.parametrize("needs", ["all", "branch"])
def test_eager_path_equals_custom_op(seed, monkeypatch, needs):
    x, branch, w, b = make_inputs((3, 4, 20), torch.bfloat16, x_dtype=torch.float32, param_dtype=torch.float32)
    for t, name in zip((x, branch, w, b), ("x", "branch", "weight", "bias")):
        t.requires_grad_(needs == "all" or name == needs)
    g = torch.randn(3, 4, 20, device=DEVICE)
    results = []
    for through_op in (False, True):
        monkeypatch.setattr(MODULE, "needs_custom_op", lambda: through_op)
        out = post_norm_residual(x, branch, w, b)
        assert ("audiomae" in type(out.grad_fn.next_functions[0][0]).__name__ or
                "audiomae" in type(out.grad_fn).__name__) == through_op
        wanted = [t for t in (x, branch, w, b) if t.requires_grad]
        results.append((out, torch.autograd.grad(out, wanted, g)))
    (eager, eager_grads), (custom, custom_grads) = results
    assert torch.equal(eager, custom)
    for a, c in zip(eager_grads, custom_grads, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# copy_dtype: (out, out.to(copy_dtype)) from one pass, gradients added as autograd adds them
# ------------------------------------------------------------------------------------------------
# (x dtype, branch dtype, parameter dtype, copy dtype): the decoder's case (a float32 stream, a
# 16-bit branch, float32 parameters, a 16-bit copy), same-dtype rows, a wider copy, float64 rows
# (copied and summed by torch).
COPY_CASES = [
    (torch.float32, torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.float32, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16, torch.float32),
    (torch.float32, torch.float32, torch.float32, torch.float16),
    (torch.float64, torch.float64, torch.float64, torch.float32),
]


def _copy_inputs(case, shape=(3, 7, 40)):
    x_dtype, branch_dtype, param_dtype, copy_dtype = case
    x, branch, w, b = make_inputs(shape, branch_dtype, x_dtype=x_dtype, param_dtype=param_dtype)
    return (x, branch, w, b), copy_dtype


def _same_or_one_ulp(actual, expected, what):
    """Equal; on the CPU a bfloat16 store may differ by one ulp (Triton's interpreter rounds it
    its own way), nowhere else."""
    if DEVICE == "cpu" and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=0, msg=what)
    else:
        assert torch.equal(actual, expected), what


@pytest.mark.parametrize("case", COPY_CASES, ids=lambda c: "-".join(str(d).removeprefix("torch.") for d in c))
def test_copy_is_the_output_cast(seed, case):
    inputs, copy_dtype = _copy_inputs(case)
    out, copy = post_norm_residual(*inputs, copy_dtype=copy_dtype)
    assert torch.equal(out, post_norm_residual(*inputs))
    assert copy.dtype == copy_dtype and copy.shape == out.shape and copy.data_ptr() != out.data_ptr()
    _same_or_one_ulp(copy, out.to(copy_dtype), "copy")


@pytest.mark.parametrize("case", COPY_CASES, ids=lambda c: "-".join(str(d).removeprefix("torch.") for d in c))
@pytest.mark.parametrize("used", ["both", "out", "copy"])
def test_copy_gradients_add_as_autograd_adds_them(seed, case, used):
    """The fused copy against the same kernel followed by torch's cast (autograd then adds the two
    gradients itself): the same gradients to the bit; and both against float64."""
    _check_copy_gradients(case, used, (3, 7, 40))


@pytest.mark.gpu
@pytest.mark.parametrize("used", ["both", "copy"])
def test_gpu_copy_at_the_decoder_size(seed, used):
    """The decoder's case (float32 stream, bfloat16 branch and copy, float32 parameters) at its size,
    also under CUDA autocast as the model runs it."""
    case = (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)
    _check_copy_gradients(case, used, (64, 512, 512))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check_copy_gradients(case, used, (64, 512, 512))


def _check_copy_gradients(case, used, shape):
    inputs, copy_dtype = _copy_inputs(case, shape)
    g_out = torch.randn(inputs[0].shape, device=DEVICE)
    g_copy = torch.randn(inputs[0].shape, device=DEVICE)

    def grads(fused, dtype=None, as_reference=False):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
        if as_reference:
            out = reference(*leaves)
            copy = out.to(copy_dtype)
        elif fused:
            out, copy = post_norm_residual(*leaves, copy_dtype=copy_dtype)
        else:
            out = post_norm_residual(*leaves)
            copy = out.to(copy_dtype)
        outputs, incoming = [], []
        if used in ("both", "out"):
            outputs.append(out)
            incoming.append(g_out.to(out.dtype))
        if used in ("both", "copy"):
            outputs.append(copy)
            incoming.append(g_copy.to(copy.dtype))
        return torch.autograd.grad(outputs, leaves, incoming)

    fused, separate = grads(True), grads(False)
    expected = grads(False, torch.float64, as_reference=True)
    for name, a, b_, e, leaf in zip(("x", "branch", "weight", "bias"), fused, separate, expected, inputs):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        if name == "x":
            assert torch.equal(a, b_), name  # the sum, one rounding in the output's dtype
        else:  # the norm's gradients see that sum: equal, but for the interpreter's bfloat16 rounding
            _same_or_one_ulp(a, b_, name)
        close(a, e, case[1], f"grad of {name}")


def test_copy_gradient_when_x_needs_none_or_only_x_does(seed):
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0])
    x, branch, w, b = inputs
    g = torch.randn(x.shape, device=DEVICE).to(copy_dtype)
    for needs in ("x", "branch", "weight"):
        leaves = [t.detach().requires_grad_(name == needs) for t, name in zip(inputs, ("x", "branch", "weight", "bias"))]
        _, copy = post_norm_residual(*leaves, copy_dtype=copy_dtype)
        (got,) = torch.autograd.grad(copy, [t for t in leaves if t.requires_grad], g)
        leaves2 = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
        (want,) = torch.autograd.grad(post_norm_residual(*leaves2).to(copy_dtype), [t for t in leaves2 if t.requires_grad], g)
        assert torch.equal(got, want), needs


def test_copy_without_grad_and_with_empty_rows(seed):
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0])
    with torch.no_grad():
        out, copy = post_norm_residual(*inputs, copy_dtype=copy_dtype)
    assert torch.equal(copy, out.to(copy_dtype))
    empty = [t[:0] if t.dim() == 3 else t for t in inputs]
    empty = [t.requires_grad_() for t in empty]
    out, copy = post_norm_residual(*empty, copy_dtype=copy_dtype)
    assert out.shape == copy.shape == (0, 7, 40) and copy.dtype == copy_dtype
    grads = torch.autograd.grad((out.sum() + copy.sum()), empty)
    assert [g.shape for g in grads] == [t.shape for t in empty]


def test_copy_through_the_custom_op_equals_eager(seed, monkeypatch):
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0])
    g_out, g_copy = torch.randn(inputs[0].shape, device=DEVICE), torch.randn(inputs[0].shape, device=DEVICE)
    results = []
    for through_op in (False, True):
        monkeypatch.setattr(MODULE, "needs_custom_op", lambda: through_op)
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, copy = post_norm_residual(*leaves, copy_dtype=copy_dtype)
        results.append((out, copy, torch.autograd.grad((out, copy), leaves, (g_out, g_copy.to(copy_dtype)))))
    (out_e, copy_e, grads_e), (out_c, copy_c, grads_c) = results
    assert torch.equal(out_e, out_c) and torch.equal(copy_e, copy_c)
    for a, c in zip(grads_e, grads_c, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c)


def test_copy_compiles_without_graph_breaks(seed):
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0], (2, 5, 16))
    leaves = [t.requires_grad_() for t in inputs]
    traced = []

    def recording_backend(gm, example_inputs):
        traced.append([str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"])
        return torch._dynamo.lookup_backend("inductor" if DEVICE == "cuda" else "aot_eager")(gm, example_inputs)

    def block(x, branch, w, b):
        out, copy = post_norm_residual(x, branch, w, b, copy_dtype=copy_dtype)
        return out.square().sum() + (copy * 3).float().sum()

    compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(block(*leaves), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert len(traced) == 1 and traced[0].count("audiomae.post_norm_residual") == 1, traced


@pytest.mark.skipif(DEVICE == "cuda", reason="CUDA tensors take the kernel, not the reference")
def test_copy_on_the_reference_path(seed, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0])
    out, copy = post_norm_residual(*inputs, copy_dtype=copy_dtype)
    assert torch.equal(out, reference(*inputs)) and torch.equal(copy, out.to(copy_dtype))


def test_backward_op_returns_what_its_fake_says(seed):
    """Contiguous gradients that alias no input, whatever the incoming gradient's strides (a
    transposed consumer hands one column-major; inductor checks real strides against the fake's)."""
    x, branch, w, b = make_inputs((6, 12), torch.float32)
    _, _, mean, rstd = torch.ops.audiomae.post_norm_residual(x, branch, w, b, 1e-5, torch.float32, None)
    column_major = torch.randn(12, 6, device=DEVICE).t()
    for grad, grad_copy in ((column_major, None), (column_major, column_major.half()), (None, column_major.half())):
        outputs = torch.ops.audiomae.post_norm_residual_backward(
            grad, grad_copy, branch, w, mean, rstd, torch.float32, torch.float32, torch.float32, True, torch.float32,
            torch.float32)
        for g in outputs:
            assert g.is_contiguous() and all(g.data_ptr() != t.data_ptr() for t in (grad, grad_copy) if t is not None)
    # float64 rows are summed by torch: a copy gradient alone must not come back as x's gradient itself
    x64, branch64 = (t.double() for t in (x, branch))
    _, _, mean, rstd = torch.ops.audiomae.post_norm_residual(x64, branch64, None, None, 1e-5, torch.float64,
                                                             torch.float64)
    grad_copy = torch.randn(6, 12, device=DEVICE, dtype=torch.float64)
    torch.library.opcheck(torch.ops.audiomae.post_norm_residual_backward.default,
                          (None, grad_copy, branch64, None, mean, rstd, torch.float64, torch.float64, torch.float64,
                           True, None, None))


def test_ops_called_directly_check_their_contract(seed):
    # torch.ops.audiomae.post_norm_residual(_backward) without the public function: shapes the
    # kernels would misread are errors naming the argument; strided statistics read right.
    x, branch, w, b = make_inputs((6, 8), torch.float32)
    op, backward = torch.ops.audiomae.post_norm_residual, torch.ops.audiomae.post_norm_residual_backward
    bad_forward = [
        ((x[:2], branch, w, b), ValueError, "share one shape"),
        ((x, branch, w.view(1, 8), b), ValueError, r"weight must be \[8\]"),
        ((x, branch, w[:5], b), ValueError, r"weight must be \[8\]"),
        ((x.view(2, 3, 8), branch.view(2, 3, 8), w, b), ValueError, r"x must be an \[M, C\] tensor"),
        ((x[:, :0], branch[:, :0], None, None), ValueError, "C=0 channels"),
    ]
    for args, error, match in bad_forward:
        with pytest.raises(error, match=match):
            op(*args, 1e-5, torch.float32, None)
    _, _, mean, rstd = op(x, branch, w, b, 1e-5, torch.float32, None)
    grad = torch.randn(6, 8, device=DEVICE)
    common = (torch.float32, torch.float32, torch.float32, True, torch.float32, torch.float32)
    want = backward(grad, None, branch, w, mean, rstd, *common)
    strided = [torch.stack([t, torch.full_like(t, 1e3)], -1)[:, 0] for t in (mean, rstd)]
    assert not strided[0].is_contiguous()
    for got, expected in zip(backward(grad, None, branch, w, *strided, *common), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"mean must be \[6\]"):
        backward(grad, None, branch, w, mean[:2], rstd, *common)
    with pytest.raises(ValueError, match="share one shape"):
        backward(grad.view(1, 6, 8).squeeze(0)[:3], None, branch, w, mean, rstd, *common)
    with pytest.raises(ValueError, match="needs grad or grad_copy"):
        backward(None, None, branch, w, mean, rstd, *common)


@pytest.mark.parametrize("used", ["out", "copy"])
def test_unused_output_leaves_signed_zeros_alone_on_both_paths(seed, monkeypatch, used):
    """-0.0 incoming gradients: neither path adds +0 zeros for the output nobody used."""
    inputs, copy_dtype = _copy_inputs(COPY_CASES[0])
    results = []
    for through_op in (False, True):
        monkeypatch.setattr(MODULE, "needs_custom_op", lambda: through_op)
        leaves = [t.detach().requires_grad_() for t in inputs[:2]]
        out, copy = post_norm_residual(*leaves, *inputs[2:], copy_dtype=copy_dtype)
        target = out if used == "out" else copy
        results.append(torch.autograd.grad(target, leaves, torch.full_like(target, -0.0)))
    for eager, op in zip(*results):
        assert torch.equal(eager, op) and torch.equal(torch.signbit(eager), torch.signbit(op))
    assert torch.signbit(results[0][0]).all()  # x's gradient: the -0.0 itself


def test_copy_dtype_must_be_a_float_dtype(seed):
    inputs, _ = _copy_inputs(COPY_CASES[0])
    for bad in (torch.int32, "bfloat16", torch.complex64):
        with pytest.raises(TypeError, match="copy_dtype"):
            post_norm_residual(*inputs, copy_dtype=bad)


def test_double_backward_is_an_error(seed):
    x, branch, w, b = (t.requires_grad_() for t in make_inputs((2, 3, 8), torch.float32))
    out = post_norm_residual(x, branch, w, b)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # a plain incoming gradient
        torch.autograd.grad(out.sum(), branch, create_graph=True)
    out = post_norm_residual(x, branch, w, b)
    g = torch.randn(out.shape, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(out, branch, g, create_graph=True)


def test_row_with_a_large_offset_and_no_spread_keeps_its_zeros(seed):
    # A float32 sum / C would round the mean of 12345.678 and eps would scale the rounding up.
    branch = torch.full((3, 768), 12345.678, device=DEVICE)
    branch[1] += 1e-3 * torch.randn(768, device=DEVICE)
    x = torch.zeros_like(branch)
    out = post_norm_residual(x, branch)
    assert torch.equal(out[0], torch.zeros(768, device=DEVICE)) and torch.equal(out[2], out[0])
    # The spread row (1e-3 on 12345, a few float32 ulps) against float64 on the same values.
    torch.testing.assert_close(out.double(), reference(x.double(), branch.double()), rtol=0, atol=1e-5)
    check(x, branch, torch.randn(768, device=DEVICE), None, eps=1e-5)


def test_float64_gradient_into_a_low_precision_norm(seed):
    x, branch, w, b = make_inputs((3, 5, 12), torch.bfloat16, x_dtype=torch.float64, param_dtype=torch.float32)
    check(x, branch, w, b, dtype=torch.bfloat16)


def test_autodiff_transforms_are_refused_and_vmap_works(seed):
    x, branch, w, b = make_inputs((4, 6), torch.float32)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda br: post_norm_residual(x, br, w, b).sum())(branch)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(lambda br: post_norm_residual(x, br, w, b), (branch,), (torch.ones_like(branch),))
    batched = torch.func.vmap(lambda br: post_norm_residual(x, br, w, b))(torch.stack([branch, 2 * branch]))
    torch.testing.assert_close(batched[1], reference(x, 2 * branch, w, b), rtol=1e-5, atol=1e-5)


def test_rejects_odd_arguments(seed):
    x, branch, w, b = make_inputs((2, 8), torch.float32)
    with pytest.raises(TypeError, match="eps must be a float"):
        post_norm_residual(x, branch, w, b, eps="1e-5")
    with pytest.raises(ValueError, match="at least one dimension"):
        post_norm_residual(x[0, 0], branch[0, 0])
    with pytest.raises(TypeError, match="dense"):
        post_norm_residual(x.to_sparse(), branch)


def test_opcheck(seed):
    x, branch, w, b = (t.requires_grad_() for t in make_inputs((6, 12), torch.float32))
    op, backward = torch.ops.audiomae.post_norm_residual.default, torch.ops.audiomae.post_norm_residual_backward.default
    torch.library.opcheck(op, (x, branch, w, b, 1e-5, torch.float32, None))
    torch.library.opcheck(op, (x, branch, None, None, 1e-6, torch.float32, None))
    torch.library.opcheck(op, (x, branch, w, b, 1e-5, torch.float32, torch.float16))
    _, _, mean, rstd = torch.ops.audiomae.post_norm_residual(x, branch, w, b, 1e-5, torch.float32, None)
    saved = (branch.detach(), w.detach(), mean.detach(), rstd.detach(), torch.float32, torch.float32)
    grad, grad_copy = torch.randn(6, 12, device=DEVICE), torch.randn(6, 12, device=DEVICE).half()
    for incoming, x_dtype in (((grad, None), torch.float32), ((grad, grad_copy), torch.float32),
                              ((None, grad_copy), torch.float32), ((grad, grad_copy), None), ((grad, None), None)):
        torch.library.opcheck(backward, (*incoming, *saved, x_dtype, True, torch.float32, torch.float32))


def test_compiles_without_graph_breaks(seed):
    x, branch, w, b = (t.requires_grad_() for t in make_inputs((2, 5, 16), torch.float32))
    traced = []

    def recording_backend(gm, example_inputs):
        traced.append([str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"])
        return torch._dynamo.lookup_backend("inductor" if DEVICE == "cuda" else "aot_eager")(gm, example_inputs)

    def block(x, branch, w, b):
        return post_norm_residual(x, branch * 2, w, b).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
    got = torch.autograd.grad(compiled(x, branch, w, b), (x, branch, w, b))
    want = torch.autograd.grad(block(x, branch, w, b), (x, branch, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert len(traced) == 1 and traced[0].count("audiomae.post_norm_residual") == 1, traced


# ------------------------------------------------------------------------------------------------
# GPU: the decoder's size, and CUDA autocast (layer_norm runs in float32 there)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_decoder_size(seed, dtype):
    check(*make_inputs((64, 512, 512), dtype))


@pytest.mark.gpu
def test_gpu_under_autocast_matches_eager(seed):
    x, branch, w, b = make_inputs((8, 512, 512), torch.bfloat16, x_dtype=torch.float32, param_dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, branch, w, b)]
    g = torch.randn(x.shape, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = post_norm_residual(*leaves)
        eager = reference(*leaves)
    assert out.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(eager, leaves, g)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2 * e.float().abs().max().item())


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    x, branch, w, b = (t.requires_grad_() for t in make_inputs((64, 512, 512), torch.bfloat16))
    g = torch.randn(x.shape, device=DEVICE, dtype=torch.bfloat16)
    first = torch.autograd.grad(post_norm_residual(x, branch, w, b), (branch, w, b), g)
    for _ in range(3):
        again = torch.autograd.grad(post_norm_residual(x, branch, w, b), (branch, w, b), g)
        assert all(torch.equal(a, e) for a, e in zip(first, again))


def test_channel_offsets_past_int32_are_copied_first():
    # The kernels index channels in int32: a view whose channels lie 2**31 elements apart is made
    # contiguous before launch (meta tensors: shapes and strides only, no memory).
    far = torch.empty_strided((2, 4), (1, 2**30), device="meta")
    near = torch.empty_strided((2, 4), (4, 1), device="meta")
    assert MODULE._int32_columns(far).stride() == (4, 1)
    assert MODULE._int32_columns(near) is near
