"""gelu_mlp against eager ``fc2(gelu(fc1(x)))``: the same values, and less kept for the backward."""
import pytest
import torch
import torch.nn as nn

from audiomae.layers import Mlp
from kernels.gelu_mlp import gelu_mlp
from kernels.reference.gelu_mlp import gelu_mlp as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see conftest: unwritten outputs read NaN


def make(shape=(3, 7, 24), hidden=40, out=24, dtype=torch.float32, bias=True):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w1 = torch.randn(hidden, shape[-1], device=DEVICE, dtype=dtype) / shape[-1] ** 0.5
    w2 = torch.randn(out, hidden, device=DEVICE, dtype=dtype) / hidden**0.5
    b1 = torch.randn(hidden, device=DEVICE, dtype=dtype) if bias else None
    b2 = torch.randn(out, device=DEVICE, dtype=dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]


def run(fn, inputs, grad, **kw):
    out = fn(*inputs, **kw)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("save", ["input", "hidden"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_eager_and_float64(seed, save, approximate, bias):
    inputs = make(bias=bias)
    grad = torch.randn(3, 7, 24, device=DEVICE)
    out, grads = run(gelu_mlp, inputs, grad, approximate=approximate, save=save)
    eager, eager_grads = run(reference, inputs, grad, approximate=approximate)
    high = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    want, want_grads = run(reference, high, grad.double(), approximate=approximate)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for a, e, w in zip(grads, eager_grads, want_grads, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(seed, dtype):
    inputs = make(dtype=dtype, shape=(2, 5, 16), hidden=32, out=8)
    grad = torch.randn(2, 5, 8, device=DEVICE, dtype=dtype)
    out, grads = run(gelu_mlp, inputs, grad)
    eager, eager_grads = run(reference, inputs, grad)
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol)
    for a, e in zip(grads, eager_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item())


def test_autocast_casts_as_eager_linear_does(seed):
    # float32 leaves under bfloat16 autocast: the matmuls run in bfloat16, the gradients come
    # back float32 (eager: bfloat16 matmuls, then the casts' backward).
    inputs = make(shape=(4, 6, 16), hidden=32, out=16)
    grad = torch.randn(4, 6, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads = run(gelu_mlp, inputs, grad)
        eager, eager_grads = run(reference, inputs, grad)
    assert out.dtype == eager.dtype == torch.bfloat16
    # The same ops in the same dtypes: bit-equal on the CPU; a bf16 ulp of slack where cuBLAS may
    # pick another algorithm.
    slack = 0.0 if DEVICE == "cpu" else 2**-7 * eager.abs().max().item()
    torch.testing.assert_close(out, eager, rtol=0, atol=slack)
    for a, e in zip(grads, eager_grads):
        assert a.dtype == e.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2 * e.abs().max().item())


def test_only_some_inputs_need_grad(seed):
    x, w1, b1, w2, b2 = make()
    x.requires_grad_(False)
    b2.requires_grad_(False)
    grad = torch.randn(3, 7, 24, device=DEVICE)
    _, grads = run(gelu_mlp, (x, w1, b1, w2, b2), grad)
    _, eager_grads = run(reference, (x, w1, b1, w2, b2), grad)
    assert len(grads) == 3
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def saved_bytes(fn, inputs, **kw) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward, inputs and weights excluded."""
    params = {t.data_ptr() for t in inputs if t is not None}
    kept = {}

    def pack(t):
        if t.data_ptr() not in params:
            kept[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs, **kw)
    return sum(kept.values())


def test_keeps_less_than_eager(seed):
    # Width 4x: eager keeps fc1's output and GELU's output (8 units a row of x, C=24 -> H=96),
    # save="hidden" fc1's output (4 units), save="input" nothing beyond x itself.
    inputs = make(shape=(2, 10, 24), hidden=96, out=24)
    row = 2 * 10 * 96 * 4
    assert saved_bytes(reference, inputs) == 2 * row
    assert saved_bytes(gelu_mlp, inputs, save="hidden") == row
    assert saved_bytes(gelu_mlp, inputs, save="input") == 0


def test_rejects_bad_input(seed):
    x, w1, b1, w2, b2 = make()
    with pytest.raises(ValueError, match="save must be one of"):
        gelu_mlp(x, w1, b1, w2, b2, save="all")
    with pytest.raises(ValueError, match="approximate must be"):
        gelu_mlp(x, w1, b1, w2, b2, approximate="sigmoid")
    with pytest.raises(ValueError, match=r"fc1_weight must be \[H, C\]"):
        gelu_mlp(x[..., :5], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must be \[C_out, 40\]"):
        gelu_mlp(x, w1, b1, w2[:, :7], b2)
    with pytest.raises(ValueError, match=r"fc1_bias must be \[40\]"):
        gelu_mlp(x, w1, b1[:3], w2, b2)
    with pytest.raises(TypeError, match="share one dtype"):
        gelu_mlp(x.double(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        gelu_mlp(x.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="share one device"):
        gelu_mlp(x, w1, b1, w2.to("meta"), b2)


def test_double_backward_is_an_error(seed):
    x, w1, b1, w2, b2 = make()
    out = gelu_mlp(x, w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # not silently first-order
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_zero_width_features(seed):
    for hidden, out_features, channels in ((0, 8, 6), (10, 0, 6), (10, 8, 0)):
        inputs = make(shape=(3, channels), hidden=hidden, out=out_features)
        grad = torch.randn(3, out_features, device=DEVICE)
        _, grads = run(gelu_mlp, inputs, grad)
        _, eager = run(reference, inputs, grad)
        for a, e in zip(grads, eager, strict=True):
            torch.testing.assert_close(a, e)


def test_exported_from_the_package():
    import kernels

    assert kernels.gelu_mlp is gelu_mlp


def test_compiles_without_graph_breaks(seed):
    inputs = make()
    grad = torch.randn(3, 7, 24, device=DEVICE)
    compiled = torch.compile(lambda *t: gelu_mlp(*t), fullgraph=True, backend="aot_eager")
    out, grads = run(compiled, inputs, grad)
    eager, eager_grads = run(reference, inputs, grad)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save,fused", [("input", False), ("hidden", False), ("input", True)])
def test_compiled_autograd_traces_the_backward_op(seed, save, fused):
    # Compiled autograd traces the eager autograd.Function's backward: a Triton launch there would
    # break its graph, the backward op does not.
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w1, b1 = (torch.randn(32, 16, device=DEVICE) * 0.2).requires_grad_(), torch.randn(32, device=DEVICE).requires_grad_()
    w2, b2 = (torch.randn(16, 32, device=DEVICE) * 0.2).requires_grad_(), torch.randn(16, device=DEVICE).requires_grad_()
    leaves = (x, w1, b1, w2, b2)

    def loss():
        return gelu_mlp(*leaves, save=save, fused_matmul=fused).square().sum()

    want = torch.autograd.grad(loss(), leaves)
    compiler = torch.compile(backend="aot_eager", fullgraph=True)
    with torch._dynamo.compiled_autograd._enable(compiler):  # private, as in PyTorch's own tests
        loss().backward()
    for leaf, expected in zip(leaves, want):
        torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize("training,drop", [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_module_takes_the_op_only_where_it_is_the_same(seed, training, drop):
    mlp = Mlp(24, 40, drop=drop).to(DEVICE).train(training)
    twin = Mlp(24, 40, drop=drop, backend="triton").to(DEVICE).train(training)
    twin.load_state_dict(mlp.state_dict())
    x = torch.randn(3, 5, 24, device=DEVICE)
    torch.manual_seed(1)
    a = mlp(x)
    torch.manual_seed(1)
    b = twin(x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    node = twin(x.requires_grad_()).grad_fn  # dropout, if any, is after it
    if type(node).__name__ == "ViewBackward0":  # [B, N, C] rows viewed back (gelu_mlp returns rows)
        node = node.next_functions[0][0]
    fused = "_GeluMlp" in type(node).__name__
    assert fused == twin._fusable() == (drop == 0.0 or not training)
    relu = Mlp(2, 8, out_features=4, act_layer=nn.ReLU, backend="triton")
    assert not relu._fusable()  # the meta-MLP keeps eager math


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_module_keeps_eager_math_for_replaced_layers(seed):
    # A subclass (or wrapper) may do more than its weights say: the fused path must not skip it.
    twin = Mlp(24, 40, backend="triton").to(DEVICE)
    reference_mlp = Mlp(24, 40).to(DEVICE)
    reference_mlp.load_state_dict(twin.state_dict())
    x = torch.randn(3, 24, device=DEVICE)
    for name in ("fc1", "fc2"):
        for mlp in (twin, reference_mlp):
            old = getattr(mlp, name)
            new = DoubledLinear(old.in_features, old.out_features).to(DEVICE)
            new.load_state_dict(old.state_dict())
            setattr(mlp, name, new)
        assert not twin._fusable()
        torch.testing.assert_close(twin(x), reference_mlp(x))
    plain = Mlp(24, 40, backend="triton").to(DEVICE)
    plain.drop1 = nn.Identity()
    assert plain._fusable() and plain(x).shape == (3, 24)
    with pytest.raises(ValueError, match="save must be"):
        Mlp(24, 40, save="everything")


@pytest.mark.gpu
def test_gpu_decoder_mlp_under_autocast(seed):
    x = torch.randn(16, 512, 512, device=DEVICE, requires_grad=True)
    mlp, twin = Mlp(512, 2048).to(DEVICE), Mlp(512, 2048, backend="triton").to(DEVICE)
    twin.load_state_dict(mlp.state_dict())
    g = torch.randn(16, 512, 512, device=DEVICE, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = mlp(x), twin(x)
    # The same cuBLAS calls in the same dtypes: equal up to the last bit (a bf16 ulp of slack for
    # a different algorithm choice).
    torch.testing.assert_close(a, b, rtol=0, atol=2**-7 * a.abs().max().item())
    ga = torch.autograd.grad(a, [x, *mlp.parameters()], g)
    gb = torch.autograd.grad(b, [x, *twin.parameters()], g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-2, atol=1e-2 * u.abs().max().item())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("save", ["input", "hidden"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, save, bias, dtype, fused):
    if fused and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 dots wrongly")
    x, w1, b1, w2, b2 = make(bias=bias)
    args = (x, w1, b1, w2, b2, dtype, save == "hidden", "none", fused)
    torch.library.opcheck(torch.ops.audiomae.gelu_mlp.default, args)
    out, xc, hidden, w1c, b1c, w2c = torch.ops.audiomae.gelu_mlp(*args)
    cast = dtype != x.dtype  # the op returns copies only of what it cast
    kept = [xc if cast else x, w1c if cast else w1, None if save == "hidden" or not bias else (b1c if cast else b1),
            w2c if cast else w2, hidden]
    assert all(t.numel() == 0 for t in ((xc, w1c, b1c, w2c) if not cast else ()))
    plain = [t.detach() if t is not None else None for t in kept]  # the backward has no backward
    needs = [True, True, bias, True, bias]
    torch.library.opcheck(torch.ops.audiomae.gelu_mlp_backward.default,
                          (torch.randn_like(out).detach(), *plain, save == "hidden", "none", needs, fused))


@pytest.mark.parametrize("save", ["input", "hidden"])
def test_compiled_keeps_what_eager_keeps(seed, save):
    """Traced through, the eager Function's recomputation would be merged away by the compiler
    (it kept both wide tensors); the op keeps only what the eager call keeps."""
    inputs = make(shape=(2, 10, 24), hidden=96, out=24)
    grad = torch.randn(2, 10, 24, device=DEVICE)
    compiled = torch.compile(lambda *t: gelu_mlp(*t, save=save), fullgraph=True)
    assert saved_bytes(compiled, inputs) == saved_bytes(gelu_mlp, inputs, save=save)
    out, grads = run(compiled, inputs, grad)
    eager, eager_grads = run(reference, inputs, grad)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save", ["input", "hidden"])
def test_compiled_under_autocast_with_a_transposed_input(seed, save):
    # The cast copy of x keeps x's strides: the op's fake implementation must say so, or the
    # compiled graph's stride check fails.
    x, w1, b1, w2, b2 = make(shape=(5, 3, 24))
    xt = x.detach().transpose(0, 1)
    grad = torch.randn(3, 5, 24, device=DEVICE)
    compiled = torch.compile(lambda *t: gelu_mlp(*t, save=save), fullgraph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads = run(compiled, [xt, w1, b1, w2, b2], grad)
        eager, eager_grads = run(gelu_mlp, [xt, w1, b1, w2, b2], grad, save=save)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for a, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_weights_may_change_in_place_before_the_backward_as_eagerly(seed):
    """Under autocast eager F.linear keeps bfloat16 copies of the weights, so an in-place update
    between forward and backward is allowed and the backward uses the forward's weights."""
    inputs = make(shape=(4, 24))
    grad = torch.randn(4, 24, device=DEVICE)
    results = []
    for fn in (gelu_mlp, reference):
        x, w1, b1, w2, b2 = (t.detach().clone().requires_grad_() for t in inputs)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fn(x, w1, b1, w2, b2)
        with torch.no_grad():
            w1.mul_(0.5)
            w2.mul_(0.5)
        results.append(torch.autograd.grad(out, (x, w1, b1, w2, b2), grad.to(out.dtype)))
    # equal up to bfloat16 rounding (the backward's fused GELU pass, kernels/gelu_grad.py); the
    # halved weights would be off by half
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=2**-7 * e.abs().max().item())


def test_op_path_equals_the_eager_path_under_autocast(seed, monkeypatch):
    """The op (what compiled code runs) computes what the eager Function computes, autocast included."""
    import sys

    inputs = make(shape=(4, 6, 24))
    grad = torch.randn(4, 6, 24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager, eager_grads = run(gelu_mlp, inputs, grad)
        monkeypatch.setattr(sys.modules["kernels.gelu_mlp"], "needs_custom_op", lambda: True)
        out, grads = run(gelu_mlp, inputs, grad)
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for a, e in zip(grads, eager_grads, strict=True):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 8), (2, 3, 2, 8), (5, 8)])
@pytest.mark.parametrize("save", ["input", "hidden"])
def test_output_may_be_modified_in_place_as_mlps(shape, save):
    """timm's Mlp output takes in-place ops (LayerScale(inplace=True), ``out += ...``); so does this
    one, whatever x's rank: the Function returns rows, viewed as [..., C_out] outside it."""
    torch.manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(*s, device=DEVICE, dtype=torch.float64, requires_grad=True)
                      for s in ((16, 8), (16,), (8, 16), (8,)))
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float64, requires_grad=True)
    out = gelu_mlp(x, w1, b1, w2, b2, save=save)
    assert out.shape == (*shape[:-1], 8)
    (out.mul_(0.5) ** 2).sum().backward()
    grads = [t.grad for t in (x, w1, b1, w2, b2)]
    for t in (x, w1, b1, w2, b2):
        t.grad = None
    (reference(x, w1, b1, w2, b2).mul(0.5) ** 2).sum().backward()
    for got, t in zip(grads, (x, w1, b1, w2, b2)):
        torch.testing.assert_close(got, t.grad)


def test_meta_tensors_give_shapes():
    """Shape inference on meta tensors, as F.linear gives it (meta has no autocast to query)."""
    w1, b1, w2, b2 = (torch.empty(*s, device="meta") for s in ((16, 8), (16,), (4, 16), (4,)))
    x = torch.empty(2, 3, 8, device="meta").requires_grad_()
    out = gelu_mlp(x, w1, b1, w2, b2)
    assert out.device.type == "meta" and out.shape == (2, 3, 4)
