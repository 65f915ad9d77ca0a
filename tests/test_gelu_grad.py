"""kernels.gelu_grad: GELU, its gradient and the bias gradient in one pass, against PyTorch's ops
in float64 (through the interpreter on the CPU, and on the GPU when present)."""
import pytest
import torch

from kernels.gelu_grad import gelu_and_grad, gelu_and_grad_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest: unwritten outputs read NaN
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(rows, cols, dtype, approximate, bias_grad=True, device=DEVICE, tiles_per_program=1):
    hidden64 = torch.randn(rows, cols, dtype=torch.float64, device=device) * 3
    grad64 = torch.randn(rows, cols, dtype=torch.float64, device=device)
    hidden, grad = hidden64.to(dtype), grad64.to(dtype)
    # the reference sees the kernel's (rounded) inputs, in float64
    want_act, want_grad, want_bias = gelu_and_grad_reference(hidden.double(), grad.double(), approximate, True)
    grad_buffer = torch.full_like(grad, float("nan"))  # poisoned except where the input sits
    grad_buffer.copy_(grad)
    act, got_grad, got_bias = gelu_and_grad(hidden, grad_buffer, approximate, bias_grad, tiles_per_program)
    assert act.dtype == got_grad.dtype == dtype and act.shape == (rows, cols)
    tol = TOLERANCE[dtype]
    for got, want in ((act, want_act), (got_grad, want_grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if bias_grad:
        # the sum of rounded gradients: off from float64 by the rounding of each term, at most
        assert got_bias.dtype == dtype
        scale = want_grad.abs().sum(0).clamp(min=1)
        assert ((got_bias.double() - want_bias).abs() / scale).max() < 2 * tol
    else:
        assert got_bias is None
    return got_grad, grad_buffer


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (65, 130), (3, 2048), (130, 33)])
def test_matches_pytorch_float64(rows, cols, dtype, approximate):
    check(rows, cols, dtype, approximate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles_per_program", [2, 3, 7])
def test_loop_kernel_gives_the_default_bits(dtype, tiles_per_program):
    # 150 rows: 5 row tiles of 32, the last short, so some programs run past the last row; two
    # column blocks, the second short. Act and gradient bits equal the one-tile kernel's; the
    # column sums (added in another order) are checked against float64 in check().
    torch.manual_seed(tiles_per_program)
    check(150, 200, dtype, "none", tiles_per_program=tiles_per_program)
    hidden = torch.randn(150, 200, device=DEVICE).to(dtype) * 3
    grad = torch.randn(150, 200, device=DEVICE).to(dtype)
    act, dx, _ = gelu_and_grad(hidden, grad.clone(), "tanh", True)
    loop_act, loop_dx, _ = gelu_and_grad(hidden, grad.clone(), "tanh", True, tiles_per_program)
    assert torch.equal(act, loop_act) and torch.equal(dx, loop_dx)


def test_loop_kernel_takes_its_runs_of_tiles(record_launches):
    import sys

    module = sys.modules["kernels.gelu_grad"]
    if not module.use_triton(torch.zeros(1, device=DEVICE)):
        pytest.skip("the Triton kernel runs on CUDA or under TRITON_INTERPRET=1")
    launches = record_launches(module, "_gelu_grad_loop_kernel")
    hidden = torch.randn(150, 200, device=DEVICE)
    for tiles in (2, 3, 7):
        gelu_and_grad(hidden, torch.randn_like(hidden), "none", True, tiles)
        # 5 row tiles of 32 in runs of `tiles`; 2 column blocks of 128
        grid, args, _ = launches[-1]
        assert (grid, args[6]) == ((-(-5 // tiles), 2), tiles)  # args[6]: tiles_per_program
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tiles_per_program"):
            gelu_and_grad(hidden, torch.randn_like(hidden), "none", True, bad)


def test_without_bias_gradient():
    check(70, 40, torch.float32, "none", bias_grad=False)


def test_gradient_takes_grad_act_memory_on_the_kernel_path(monkeypatch):
    from kernels import _dispatch

    got, buffer = check(64, 64, torch.float32, "none")
    kernel_path = _dispatch.use_triton(buffer)
    assert (got.data_ptr() == buffer.data_ptr()) == kernel_path


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_float32_as_close_to_float64_as_pytorch_is(approximate):
    """In float32 the kernel's largest miss of the float64 values is within twice PyTorch's own
    float32 ops' (1 + erf(x) cancels for negative x in both), up to a few ulps of the result."""
    hidden, grad = torch.randn(33, 77, device=DEVICE) * 3, torch.randn(33, 77, device=DEVICE)
    exact = gelu_and_grad_reference(hidden.double(), grad.double(), approximate, True)
    torch_fp32 = gelu_and_grad_reference(hidden, grad, approximate, True)
    kernel = gelu_and_grad(hidden, grad.clone(), approximate, True)
    eps = torch.finfo(torch.float32).eps
    # the bias gradient sums 33 rounded terms in another order: their rounding, at most
    summing = [0, 0, hidden.shape[0] * eps * exact[1].abs().sum(0)]
    for ours, theirs, want, extra in zip(kernel, torch_fp32, exact, summing):
        ours_error = ((ours.double() - want).abs() - extra).max()
        allowed = 2 * (theirs.double() - want).abs().max() + 4 * eps * want.abs().max()
        assert ours_error <= allowed, (ours_error, allowed)


@pytest.mark.parametrize("call,error,match", [
    (lambda: gelu_and_grad(torch.zeros(2, 3), torch.zeros(3, 2), "none", True), ValueError, "shape"),
    (lambda: gelu_and_grad(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), "none", True), TypeError,
     "dtype"),
    (lambda: gelu_and_grad(torch.zeros(2, 3), torch.zeros(2, 3), "erf", True), ValueError, "approximate"),
    (lambda: gelu_and_grad(torch.zeros(6), torch.zeros(6), "none", True), ValueError, "M, H"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decoder_width(dtype):
    check(4097, 2048, dtype, "none")
