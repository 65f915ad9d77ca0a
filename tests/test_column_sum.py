"""kernels.column_sum: column sums (a Linear's bias gradient) against float64, and ``linear``
against ``F.linear`` (through the interpreter on the CPU, and on the GPU when present)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels.column_sum import column_sum, launch_plan, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest: unwritten outputs read NaN
# A sum rounded once to the output dtype, of terms each exact in the input dtype: off from the
# float64 sum by the output's rounding plus float32's accumulation over R terms.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def module():
    return sys.modules["kernels.column_sum"]


def check(x, dtype=None):
    got = column_sum(x, dtype)
    want = x.double().reshape(-1, x.shape[-1]).sum(0)
    assert got.dtype == (dtype or x.dtype) and got.shape == (x.shape[-1],) and got.device == x.device
    assert torch.isfinite(got).all()
    # relative to the sum of magnitudes: cancellation leaves the rounding of the terms' scale
    scale = x.double().abs().reshape(-1, x.shape[-1]).sum(0).clamp(min=1)
    err = ((got.double() - want).abs() / scale).max().item() if got.numel() else 0.0
    assert err < TOLERANCE[got.dtype], err
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 300), (1000, 5), (7,), (2, 3, 4, 257)])
def test_matches_float64(seed, dtype, shape):
    check(torch.randn(shape, device=DEVICE).to(dtype))


def test_many_splits_and_partials_past_one_finish_block(seed, monkeypatch):
    # More row runs than the finish kernel's 32-row block, runs that end mid-tile, two column blocks.
    monkeypatch.setattr(module(), "PROGRAMS", 160)
    R, C = 40 * 16 + 5, 300
    block_r, block_c, splits, per_split = launch_plan(R, C)
    assert (block_r, block_c) == (16, 256) and splits > 32 and per_split % block_r == 0
    assert (splits - 1) * per_split < R <= splits * per_split
    check(torch.randn(R, C, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_pipeline_depth_gives_the_same_bits(seed, monkeypatch, record_launches, dtype):
    # Runs of several tiles (so a deeper pipeline has loads to issue ahead), the last run short
    # and ending mid-tile, two column blocks; the benchmark times the depths against each other.
    monkeypatch.setattr(module(), "PROGRAMS", 8)
    x = torch.randn(16 * 13 + 7, 300, device=DEVICE).to(dtype)
    rows = module()._as_rows(x)
    # the interpreter ignores num_stages: check that each depth reaches the launch
    launches = record_launches(module(), "_column_partials_kernel")
    depths = [module()._column_sum_launch(rows, dtype, stages) for stages in (1, 2, 3, 4)]
    assert all(torch.equal(d, depths[0]) for d in depths[1:])
    assert [kwargs["STAGES"] for _, _, kwargs in launches] == [1, 2, 3, 4]
    assert torch.equal(check(x), depths[0])


def test_launch_plan_covers_every_row():
    for R in (1, 15, 16, 17, 1000, 32768, 32768 + 3):
        for C in (1, 5, 256, 300, 512, 2048):
            block_r, block_c, splits, per_split = launch_plan(R, C)
            assert per_split % block_r == 0 and splits * per_split >= R > (splits - 1) * per_split
            assert splits * -(-C // block_c) <= max(module().PROGRAMS, -(-C // block_c))


def test_output_dtype_and_accumulation(seed):
    # 2**24 + 1 in float32 rounds away the 1: a float64 result is summed in float64, as torch.sum's.
    x = torch.tensor([[2.0**24], [1.0], [1.0]], device=DEVICE)
    assert column_sum(x, torch.float64).item() == 2.0**24 + 2
    # bfloat16 terms summed in float32, rounded once: 256 ones and a 256 give 512 exactly
    x = torch.ones(257, 3, device=DEVICE, dtype=torch.bfloat16)
    x[0] = 256
    assert torch.equal(column_sum(x), torch.full((3,), 512.0, device=DEVICE, dtype=torch.bfloat16))
    check(torch.randn(64, 9, device=DEVICE).bfloat16(), torch.float32)


def test_empty_and_zero_rows():
    assert column_sum(torch.randn(5, 0, device=DEVICE)).shape == (0,)
    assert torch.equal(column_sum(torch.randn(0, 7, device=DEVICE)), torch.zeros(7, device=DEVICE))
    assert torch.equal(column_sum(torch.randn(2, 0, 7, device=DEVICE)), torch.zeros(7, device=DEVICE))


def test_strided_inputs(seed):
    x = torch.randn(6, 10, 40, device=DEVICE)
    check(x[2:])  # a row slice: read in place
    check(x[:, ::3])  # rows that no single stride spans: copied
    check(x[..., ::2])  # strided columns: read in place
    check(x.transpose(0, 1))
    check(torch.randn(40, 30, device=DEVICE).t())  # column-major


def test_deterministic(seed):
    x = torch.randn(3000, 70, device=DEVICE)
    assert torch.equal(column_sum(x), column_sum(x))


def test_bad_input_is_refused_before_any_kernel():
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        column_sum(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="0-dim"):
        column_sum(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="dtype must be"):
        column_sum(torch.ones(3, 4, device=DEVICE), torch.int32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        column_sum([1.0, 2.0])
    too_wide = torch.zeros(1, device=DEVICE).expand(2, 65535 * 256 + 1)  # no memory behind it
    with pytest.raises(ValueError, match="at most 16776960 columns"):
        column_sum(too_wide)


def test_gradient_through_the_op(seed):
    x = torch.randn(4, 5, 6, device=DEVICE, requires_grad=True)
    g = torch.randn(6, device=DEVICE, dtype=torch.float64)
    (got,) = torch.autograd.grad(column_sum(x, torch.float64), x, g)
    assert got.dtype == x.dtype and torch.equal(got, g.float().expand(4, 5, 6))


def test_opcheck():
    x = torch.randn(12, 7, device=DEVICE)
    torch.library.opcheck(torch.ops.audiomae.column_sum, (x, torch.float32))
    torch.library.opcheck(torch.ops.audiomae.column_sum, (x.bfloat16().requires_grad_(), torch.float32))


def test_traced_with_an_input_that_needs_a_copy(seed):
    # A view that no [R, C] view spans goes through reshape, which tracers follow.
    x = torch.randn(6, 10, 40, device=DEVICE)[:, ::3]
    compiled = torch.compile(lambda t: column_sum(t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * x.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_the_op_takes_rows_and_columns_only():
    with pytest.raises(ValueError, match=r"\[R, C\] tensor, got shape \(2, 3, 4\)"):
        torch.ops.audiomae.column_sum(torch.ones(2, 3, 4, device=DEVICE), torch.float32)


# ------------------------------------------------------------------------------------- linear
def routes_bias_gradient(out: torch.Tensor) -> bool:
    """Whether ``out``'s graph holds the Function that gives the bias its gradient by column_sum
    (behind the view back to [..., C_out])."""
    fn = out.grad_fn
    seen = []
    while fn is not None and len(seen) < 3:
        seen.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return any("BiasGradient" in name for name in seen)


def linear_grads(fn, x, weight, bias, grad):
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    out = fn(x, weight, bias)
    return out, torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_equals_f_linear(seed, dtype):
    x = torch.randn(3, 11, 20, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(30, 20, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(30, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 11, 30, device=DEVICE, dtype=dtype)
    out, (gx, gw, gb) = linear_grads(linear, x, weight, bias, grad)
    want, (wx, ww, wb) = linear_grads(F.linear, x, weight, bias, grad)
    assert torch.equal(out, want) and torch.equal(gx, wx) and torch.equal(gw, ww)
    assert routes_bias_gradient(out)
    torch.testing.assert_close(gb, grad.sum((0, 1)), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 10)


def test_linear_under_autocast_gives_autocasts_dtypes(seed):
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    lin = torch.nn.Linear(16, 24).to(DEVICE)
    grad = torch.randn(4, 9, 24, device=DEVICE).bfloat16()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out, (gx, gw, gb) = linear_grads(linear, x, lin.weight, lin.bias, grad)
        want, (wx, ww, wb) = linear_grads(F.linear, x, lin.weight, lin.bias, grad)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    assert gb.dtype == torch.float32 and torch.equal(gx, wx) and torch.equal(gw, ww)
    # the bias gradient rounded to bfloat16 (the output's dtype) as autocast's path rounds it
    assert torch.equal(gb, gb.bfloat16().float())
    torch.testing.assert_close(gb, grad.double().sum((0, 1)).float(), rtol=8e-3, atol=8e-3)


def test_linear_takes_f_linear_where_nothing_is_gained(seed):
    x = torch.randn(2, 5, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    frozen = torch.randn(3, device=DEVICE)
    for bias in (None, frozen):
        out = linear(x, weight, bias)
        assert torch.equal(out, F.linear(x, weight, bias)) and not routes_bias_gradient(out)
    with torch.no_grad():
        out = linear(x, weight, frozen.requires_grad_())
    assert out.grad_fn is None


def test_linear_takes_the_biases_and_errors_of_f_linear(seed):
    # F.linear also takes a [1, C_out] or 0-dim bias: their gradients keep the bias's shape.
    x = torch.randn(4, 3, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(5, 3, device=DEVICE, dtype=torch.float64)
    for shape in ((1, 5), ()):
        bias = torch.randn(shape, device=DEVICE, dtype=torch.float64, requires_grad=True)
        linear(x, weight, bias).sum().backward()
        assert bias.grad.shape == shape and torch.all(bias.grad == 4 * 5 / bias.numel())
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    for args in ((torch.tensor(1.0, device=DEVICE), weight.float(), bias), (x.tolist(), weight.float(), bias),
                 (x.float(), weight.float(), 1.0)):
        with pytest.raises((TypeError, RuntimeError)) as ours:
            linear(*args)
        with pytest.raises((TypeError, RuntimeError)) as torchs:
            F.linear(*args)
        assert type(ours.value) is type(torchs.value)


def test_linear_output_may_be_modified_in_place(seed):
    x = torch.randn(3, 4, 8, device=DEVICE, requires_grad=True)
    lin = torch.nn.Linear(8, 5).to(DEVICE)
    grads = {}
    for name, fn in (("linear", linear), ("f_linear", F.linear)):
        out = fn(x, lin.weight, lin.bias).relu_()
        grads[name] = torch.autograd.grad(out.sum(), (x, lin.weight, lin.bias))
    for got, want in zip(grads["linear"], grads["f_linear"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_linear_leaves_complex_tensors_to_f_linear():
    x = torch.randn(2, 3, dtype=torch.complex64, device=DEVICE)
    weight = torch.randn(4, 3, dtype=torch.complex64, device=DEVICE)
    bias = torch.randn(4, dtype=torch.complex64, device=DEVICE, requires_grad=True)
    out = linear(x, weight, bias)
    assert not routes_bias_gradient(out)
    out.abs().sum().backward()
    assert bias.grad is not None


def test_linear_double_backward_uses_torchs_sum(seed):
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(linear, (x, weight, bias))
    torch.autograd.gradgradcheck(linear, (x, weight, bias))


def test_linear_output_feeds_an_in_place_overwrite_of_its_gradient(seed):
    # The decoder's window attention writes qkv's gradient over qkv itself (overwrite_qkv): the
    # identity's output is a view, and the bias gradient reads the gradient it receives.
    from kernels.window_attention import window_attention

    x = torch.randn(2, 16, 8, device=DEVICE, requires_grad=True)
    lin = torch.nn.Linear(8, 96).to(DEVICE)  # two heads of 16
    args = dict(grid=(4, 4), window=(2, 2), shift=(1, 0), num_heads=2)
    for frozen in (False, True):  # frozen: x and the weight fixed, the bias alone trained (BitFit)
        x.requires_grad_(not frozen)
        lin.weight.requires_grad_(not frozen)
        inputs = (lin.bias,) if frozen else (x, lin.weight, lin.bias)
        grads = {}
        for name, fn in (("linear", linear), ("f_linear", F.linear)):
            qkv = fn(x, lin.weight, lin.bias)
            out = window_attention(qkv, overwrite_qkv=True, **args)
            version = qkv._version
            grads[name] = torch.autograd.grad(out.square().sum(), inputs)
            assert qkv._version > version, (name, frozen)  # the gradient was written over qkv
        for got, want in zip(grads["linear"], grads["f_linear"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64 * 512, 512), (64 * 512, 1536), (64 * 513, 2048), (64 * 103, 768)])
def test_gpu_target_shapes(seed, dtype, shape):
    check(torch.randn(shape, device="cuda").to(dtype))


@pytest.mark.gpu
def test_gpu_scratch_is_the_partials_alone(seed):
    # The property that makes it worth having: no staging buffer beside the input (torch's
    # sum(0) of this bf16 input allocated 128 MiB on the H200, 2026-11-27).
    x = torch.randn(64 * 512, 512, device="cuda").bfloat16()
    column_sum(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    column_sum(x)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 2 * 2**20  # partials (1 MiB) and the output


def test_forward_mode_and_func_transforms_take_torch_sum():
    """A tangent would be dropped by the launcher and the op's gradient is reverse-mode only:
    jvp, jacfwd, dual tensors, vjp and grad get torch.sum's (exact) derivatives instead."""
    from torch.autograd import forward_ad as fwAD

    x = torch.randn(5, 3, device=DEVICE, dtype=torch.float64)
    tangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(column_sum, (x,), (tangent,))[1], tangent.sum(0))
    torch.testing.assert_close(torch.func.jacfwd(column_sum)(x), torch.func.jacfwd(lambda a: a.sum(0))(x))
    torch.testing.assert_close(torch.func.vjp(column_sum, x)[1](torch.ones(3, device=DEVICE, dtype=x.dtype))[0],
                               torch.ones_like(x))
    torch.testing.assert_close(torch.func.grad(lambda a: (column_sum(a) ** 2).sum())(x),
                               2 * x.sum(0).expand_as(x))
    with fwAD.dual_level():
        out = column_sum(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tangent.sum(0))
        weight = torch.randn(4, 3, device=DEVICE, dtype=x.dtype)
        bias = torch.randn(4, device=DEVICE, dtype=x.dtype, requires_grad=True)
        y = linear(fwAD.make_dual(x, tangent), weight, bias)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, tangent @ weight.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float64_rows_to_a_16_bit_sum(dtype):
    """Rounded once from the float64 sum, as torch.sum(dtype=...) of float64 rows (the interpreter
    cannot convert float64 to 16 bits itself: torch rounds)."""
    x = torch.randn(37, 5, device=DEVICE, dtype=torch.float64) * 100
    torch.testing.assert_close(column_sum(x, dtype), x.sum(0).to(dtype), rtol=0, atol=0)
