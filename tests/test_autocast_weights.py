"""One cast for a block's Linear weights under autocast (``audiomae.autocast_weights``): the same
numbers as autocast's per-op casts, fewer cast nodes, the parameters untouched, and no effect
wherever autocast's own casts should run."""
import threading
from functools import partial

import pytest
import torch
import torch.nn as nn

import audiomae
import audiomae.autocast_weights as autocast_weights
from audiomae.layers import Attention, Block, Mlp
from audiomae.swin import SwinTransformerBlock, run_blocks
from kernels import _dispatch

from autograd_support import autograd_node_counts


interpreter_only = pytest.mark.skipif(
    not _dispatch.interpreting(), reason="CPU tensors take the kernels only through the interpreter")


def _run(module, x, grad, fused, device="cpu", dtype=torch.float16, call=None):
    """(output, gradients of x and every parameter, autograd node counts) with the fused cast on or off."""
    for block in module.modules():
        if hasattr(block, "cast_weights_together"):
            block.cast_weights_together = fused
    torch.manual_seed(1)  # the meta-MLPs' dropout draws the same either way
    with torch.autocast(device, dtype=dtype):
        out = (call or module)(x)
    counts = autograd_node_counts(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad, allow_unused=True)
    return out, grads, counts


def _tiny_mae():
    return audiomae.MaskedAutoencoderViT(
        img_size=(128, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256, decoder_depth=2,
        decoder_num_heads=16, mlp_ratio=2.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), decoder_mode=1,
        norm_pix_loss=True, backend="triton")


def _encoder_block(backend="triton"):
    return Block(32, 2, mlp_ratio=2.0, backend=backend)


def _swin_stack(depth=2):
    return nn.ModuleList([SwinTransformerBlock(32, 2, feat_size=(8, 4), window_size=(4, 4),
                                               shift_size=(0, 0) if n % 2 == 0 else (2, 0), backend="triton")
                          for n in range(depth)])


@interpreter_only
@pytest.mark.parametrize("which", ["encoder", "swin"])
def test_one_cast_per_block_changes_no_number(which):
    torch.manual_seed(0)
    if which == "encoder":
        module = _encoder_block()
        call, blocks = None, [module]
        x = torch.randn(2, 6, 32, requires_grad=True)
    else:
        module = _swin_stack()
        call, blocks = (lambda x: run_blocks(module, x)), list(module)
        x = torch.randn(2, 32, 32, requires_grad=True)
    g = torch.randn(x.shape)
    out_f, grads_f, counts_f = _run(module, x, g, True, call=call)
    out_p, grads_p, counts_p = _run(module, x, g, False, call=call)
    assert torch.equal(out_f, out_p)
    for a, b in zip(grads_f, grads_p, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    # One cast node a block instead of one for each weight and bias that autocast casts through a
    # node: the encoder's qkv and proj weights and biases; in a Swin block the qkv and proj weights
    # (column_sum.linear casts their biases inside its own Function) and the meta-MLP's four. The
    # MLP's op casts its four inside itself, without nodes.
    assert counts_f["_CastParametersBackward"] == len(blocks)
    assert counts_p["_CastParametersBackward"] == 0
    per_block = 4 if which == "encoder" else 6
    assert counts_p["ToCopyBackward0"] - counts_f["ToCopyBackward0"] == per_block * len(blocks), (counts_p, counts_f)


@interpreter_only
def test_parameters_stay_in_place_and_get_float32_gradients():
    """The casts reach this project's modules through a context variable: the block's parameters,
    its state dict and another thread see the float32 Parameters throughout."""
    torch.manual_seed(0)
    block = _encoder_block()
    x = torch.randn(2, 6, 32, requires_grad=True)
    weight = block.attn.qkv.weight
    seen = {}
    with torch.autocast("cpu", dtype=torch.float16), autocast_weights.linear_weights_cast(block, x):
        seen["cast"] = autocast_weights.cast_of(weight)
        seen["slot"] = block.attn.qkv.weight
        seen["state"] = block.state_dict()["attn.qkv.weight"]
        thread = threading.Thread(target=lambda: seen.setdefault("thread", autocast_weights.cast_of(weight)))
        thread.start()
        thread.join()
    assert seen["cast"].dtype == torch.float16 and torch.equal(seen["cast"], weight.detach().half())
    assert seen["slot"] is weight and seen["thread"] is weight and seen["state"].dtype == torch.float32
    assert autocast_weights.cast_of(weight) is weight  # gone with the ``with``
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x)
    assert autograd_node_counts(out)["_CastParametersBackward"] == 1
    out.float().sum().backward()
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in block.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == p.shape
               for p in block.parameters())


@interpreter_only
def test_the_casts_end_when_the_block_raises(monkeypatch):
    block = _encoder_block()
    weight = block.mlp.fc1.weight

    def fail(self, x):
        assert autocast_weights.cast_of(weight).dtype == torch.float16  # the casts serve the block meanwhile
        raise RuntimeError("boom")

    monkeypatch.setattr(Mlp, "forward", fail)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="boom"):
        block(torch.randn(2, 6, 32))
    assert autocast_weights._CASTS.get() is None and autocast_weights.cast_of(weight) is weight


@interpreter_only
def test_frozen_weights_get_no_gradient():
    """A frozen Linear (linear probing, partial fine-tuning) is cast with the others and gets no
    gradient; the rest get autocast's."""
    torch.manual_seed(0)
    block = _encoder_block()
    block.attn.qkv.weight.requires_grad_(False)
    x = torch.randn(2, 6, 32, requires_grad=True)
    g = torch.randn(x.shape)
    params = [p for p in block.parameters() if p.requires_grad]

    def grads(fused):
        block.cast_weights_together = fused
        with torch.autocast("cpu", dtype=torch.float16):
            out = block(x)
        return torch.autograd.grad(out, [x, *params], g)

    for a, b in zip(grads(True), grads(False), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def count_casts(monkeypatch):
    """``count_casts(block, x, **autocast)``: how many fused casts one call of ``block`` makes."""
    calls = []
    apply = autocast_weights._CastParameters.apply

    def counted(*args):
        calls.append(args)
        return apply(*args)

    monkeypatch.setattr(autocast_weights._CastParameters, "apply", counted)

    def count(block, x, **autocast):
        calls.clear()
        with torch.autocast("cpu", **autocast):
            block(x)
        return len(calls)

    count(_encoder_block(), torch.randn(2, 6, 32), dtype=torch.float16)
    assert len(calls) == 1, "the counter does not see the casts"

    return count


def _non_stock_blocks():
    """Blocks whose Linears something other than this project's stock modules may use."""

    class MyLinear(nn.Linear):
        pass

    class MyAttention(Attention):
        pass

    subclassed_linear, subclassed_attention, patched, silu, hooked = (_encoder_block() for _ in range(5))
    subclassed_linear.attn.proj = MyLinear(32, 32)
    subclassed_attention.attn = MyAttention(32, 2, backend="triton")
    patched.attn.forward = patched.attn.forward  # an instance-level forward, as a patch leaves it
    silu.mlp = Mlp(32, 64, act_layer=nn.SiLU, backend="triton")
    hooked.attn.qkv.register_forward_hook(lambda module, args, out: None)
    return dict(subclassed_linear=subclassed_linear, subclassed_attention=subclassed_attention, patched=patched,
                silu=silu, hooked=hooked)


@interpreter_only
def test_steps_aside_where_autocast_should_cast(count_casts):
    x = torch.randn(2, 6, 32)
    block = _encoder_block()
    assert count_casts(block, x, dtype=torch.float16) == 1
    assert count_casts(block, x, enabled=False) == 0  # no autocast: nothing to cast
    with torch.no_grad():  # inference: autocast's cast cache serves it
        assert count_casts(block, x, dtype=torch.float16) == 0
    assert count_casts(_encoder_block(backend="reference"), x, dtype=torch.float16) == 0  # the official path
    opted_out = _encoder_block()
    opted_out.cast_weights_together = False
    assert count_casts(opted_out, x, dtype=torch.float16) == 0
    for name, other in _non_stock_blocks().items():
        assert count_casts(other, x, dtype=torch.float16) == 0, name
    halved = _encoder_block().half()  # already in the autocast dtype: autocast casts nothing either
    assert count_casts(halved, x.half(), dtype=torch.float16) == 0
    transposed = _encoder_block()
    transposed.attn.proj.weight = nn.Parameter(transposed.attn.proj.weight.detach().t().contiguous().t())
    assert count_casts(transposed, x, dtype=torch.float16) == 0  # autocast's copy keeps its strides
    parametrized = _encoder_block()
    nn.utils.parametrizations.weight_norm(parametrized.mlp.fc1)
    assert count_casts(parametrized, x, dtype=torch.float16) == 0


@interpreter_only
def test_steps_aside_under_tracing_and_transforms(count_casts):
    """torch.compile, torch.jit.trace, torch.func's vmap and forward-mode AD run autocast's own
    casts (the compiler fuses them; the Function has no vmap or forward rule)."""
    torch.manual_seed(0)
    block = _encoder_block()
    x = torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        eager = block(x)
    assert count_casts(torch.compile(block, fullgraph=True, backend="aot_eager"), x, dtype=torch.float16) == 0
    with torch.autocast("cpu", dtype=torch.float16):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        assert count_casts(torch.jit.trace(block, x, check_trace=False), x, dtype=torch.float16) == 0
        # (vmap runs the MLP and attention through their unfused references: float16 rounding apart)
        batched = torch.func.vmap(block)(x[None])
        torch.testing.assert_close(batched[0], eager, rtol=1e-2, atol=2e-3)
    assert count_casts(lambda v: torch.func.vmap(block)(v[None]), x, dtype=torch.float16) == 0
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_weights.casts_linear_weights(block, x) == torch.float16
        with torch.autograd.forward_ad.dual_level():  # (SDPA has no forward AD: the block itself cannot run)
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            assert autocast_weights.casts_linear_weights(block, dual) is None


def test_the_cast_function_aligns_and_takes_a_double_backward():
    """``_CastParameters`` alone: odd sizes start at 256-byte offsets of the one buffer, and with
    ``create_graph=True`` its backward is differentiable (per-tensor casts), as autocast's is."""
    torch.manual_seed(0)
    params = [torch.randn(n, requires_grad=True) for n in (20, 3, 16)]
    casts = autocast_weights._CastParameters.apply(torch.float16, *params)
    base = casts[0].untyped_storage().data_ptr()
    assert [c.data_ptr() - base for c in casts] == [0, 256, 512]  # each at 256 bytes, as cuBLASLt looks
    grads = torch.autograd.grad(sum(c.float().sum() for c in casts), params)
    assert [g.data_ptr() - grads[0].untyped_storage().data_ptr() for g in grads] == [0, 256, 512]
    for c, p in zip(casts, params):
        assert c.dtype == torch.float16 and torch.equal(c, p.detach().half())
    loss = sum((c.float() ** 3).sum() for c in casts)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), params)
    plain = [p.half() for p in params]
    loss_p = sum((c.float() ** 3).sum() for c in plain)
    grads_p = torch.autograd.grad(loss_p, params, create_graph=True)
    second_p = torch.autograd.grad(sum(g.sum() for g in grads_p), params)
    for a, b in zip((*grads, *second), (*grads_p, *second_p), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_one_cast_per_block_changes_no_number(dtype):
    """The whole model under CUDA autocast: loss and every gradient the same to the bit with and
    without the fused weight casts, with one cast node a block."""
    torch.manual_seed(0)
    model = _tiny_mae().cuda()
    imgs, noise = torch.randn(2, 1, 128, 64, device="cuda"), torch.rand(2, 32, device="cuda")
    results = {}
    for fused in (True, False):
        for block in (*model.blocks, *model.decoder_blocks):
            block.cast_weights_together = fused
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=dtype):
            loss = model(imgs, noise=noise)[0]
        counts = autograd_node_counts(loss)
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}, counts)
    (loss_f, grads_f, counts_f), (loss_p, grads_p, counts_p) = results[True], results[False]
    assert counts_f["_CastParametersBackward"] == len(model.blocks) + len(model.decoder_blocks)
    assert counts_f["ToCopyBackward0"] < counts_p["ToCopyBackward0"]
    assert torch.equal(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys()
    for name, g in grads_p.items():
        assert grads_f[name].dtype == torch.float32
        assert torch.equal(grads_f[name], g), name
