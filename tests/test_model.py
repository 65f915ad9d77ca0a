"""The AudioMAE models against independent oracles (timm's blocks, explicit float64 math) and
across backends."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn

import audiomae
from audiomae.backends import BackendUnavailableError
from audiomae.layers import Block
from audiomae.swin import SwinTransformerBlock, relative_coordinates_log
from kernels import _dispatch

from autograd_support import autograd_node_counts

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_swin = pytest.importorskip("timm.models.swin_transformer_v2_cr")

LN = partial(nn.LayerNorm, eps=1e-6)


def tiny_mae(decoder_mode=1, img_size=(128, 64), **kw):
    config = dict(img_size=img_size, patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                  decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=16, mlp_ratio=2.0, norm_layer=LN,
                  decoder_mode=decoder_mode)
    config.update(kw)
    return audiomae.MaskedAutoencoderViT(**config)


def tiny_vit(**kw):
    config = dict(img_size=(128, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    config.update(kw)
    return audiomae.VisionTransformer(**config)


def test_encoder_block_matches_timm():
    ours = Block(64, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN).double()
    theirs = timm_vit.Block(64, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 17, 64, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid,shift", [((8, 8), (0, 0)), ((8, 8), (2, 0)), ((8, 8), (2, 2)), ((16, 4), (2, 0))])
def test_swin_block_matches_timm_v2cr(grid, shift):
    ours = SwinTransformerBlock(64, 8, feat_size=grid, window_size=(4, 4), shift_size=shift, norm_layer=LN).double()
    theirs = timm_swin.SwinTransformerV2CrBlock(64, 8, feat_size=grid, window_size=(4, 4), shift_size=shift,
                                                 norm_layer=LN).double()
    # timm resets any non-zero shift to half the window on both axes; AudioMAE shifts (2, 0)
    theirs.shift_size = shift
    theirs.attn_mask = theirs.get_attn_mask(dtype=torch.float64)
    with torch.no_grad():
        ours.attn.tau.uniform_(0.005, 2.0)  # some below the 0.01 clamp
        for p in ours.parameters():
            if p.dim() == 1 and p is not ours.attn.tau:
                p.normal_(0, 0.1)
    state = {k: v for k, v in ours.state_dict().items() if k != "attn.tau"}
    state["attn.logit_scale"] = torch.log(1.0 / ours.attn.tau.detach())
    theirs.load_state_dict(state)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(theirs.attn.relative_coordinates_log.double(),
                               relative_coordinates_log((4, 4)).double())
    x = torch.randn(2, grid[0] * grid[1], 64, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x.view(2, *grid, 64)).reshape(2, -1, 64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("img_size", [(1024, 128), (512, 128), (128, 128)])
@pytest.mark.parametrize("decoder_mode", [0, 1])
def test_mae_forward_backward_any_grid(img_size, decoder_mode):
    model = tiny_mae(decoder_mode=decoder_mode, img_size=img_size, decoder_depth=1)
    T, F = img_size[0] // 16, img_size[1] // 16
    imgs = torch.randn(2, 1, *img_size)
    loss, pred, mask, loss_contrastive = model(imgs, mask_ratio=0.8)
    assert pred.shape == (2, T * F, 256)
    assert mask.shape == (2, T * F) and torch.equal(mask.sum(1), torch.full((2,), float(T * F - int(T * F * 0.2))))
    assert loss_contrastive.shape == (1,) and loss_contrastive.item() == 0.0
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_mae_official_defaults_and_preset():
    model = audiomae.mae_vit_base_patch16(decoder_mode=1)
    assert model.grid == (64, 8)
    assert len(model.decoder_blocks) == 16
    assert [blk.shift_size for blk in model.decoder_blocks[:4]] == [(0, 0), (2, 0), (0, 0), (2, 0)]
    assert all(blk.attn.num_heads == 16 and blk.window_size == (4, 4) for blk in model.decoder_blocks)
    assert model.blocks[0].norm1.eps == 1e-6
    assert not model.pos_embed.requires_grad
    assert audiomae.mae_vit_base_patch16(no_shift=True).decoder_blocks[1].attn.num_heads == 16
    assert all(b.shift_size == (0, 0) for b in audiomae.mae_vit_base_patch16(decoder_mode=1, no_shift=True).decoder_blocks)


def test_forward_loss_matches_float64_formula():
    model = tiny_mae(decoder_mode=0).double()
    imgs = torch.randn(2, 1, 128, 64, dtype=torch.float64)
    pred = torch.randn(2, 32, 256, dtype=torch.float64)
    mask = (torch.rand(2, 32) > 0.5).double()
    target = imgs.reshape(2, 8, 16, 4, 16).permute(0, 1, 3, 2, 4).reshape(2, 32, 256)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    for norm_pix, t in ((False, target), (True, (target - mean) / std)):
        expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
        torch.testing.assert_close(model.forward_loss(imgs, pred, mask, norm_pix_loss=norm_pix), expected)
    torch.testing.assert_close(model.unpatchify(model.patchify(imgs)), imgs)


def test_noise_makes_masking_reproducible():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 1, 128, 64)
    noise = torch.rand(2, 32)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    torch.manual_seed(3)
    c = model(imgs)
    torch.manual_seed(3)
    d = model(imgs)
    torch.testing.assert_close(c[1], d[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(imgs, noise=torch.rand(2, 31))


def test_mask_2d_pretraining_uses_model_grid():
    model = tiny_mae(mask_2d=True, mask_t_prob=0.5, mask_f_prob=0.5)
    imgs = torch.randn(2, 1, 128, 64)
    noise = (torch.rand(2, 8), torch.rand(2, 4))
    latent, mask, ids_restore, _ = model.forward_encoder(imgs, 0.8, mask_2d=True, noise=noise)
    assert latent.shape == (2, 1 + 4 * 2, 64)
    assert torch.equal(mask.sum(1), torch.full((2,), 32.0 - 8))
    loss, pred, mask2, _ = model(imgs, noise=noise)
    assert torch.equal(mask, mask2) and torch.isfinite(loss)


def test_forward_encoder_no_mask():
    model = tiny_mae(depth=4, contextual_depth=1)
    x = torch.randn(2, 1, 128, 64)
    out = model.forward_encoder_no_mask(x)
    assert out.shape == (2, 33, 64)
    with pytest.raises(ValueError, match="contextual_depth"):
        tiny_mae(depth=2, contextual_depth=8).forward_encoder_no_mask(x)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 1, 128, 64\]"):
        tiny_mae()(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny_mae(img_size=(100, 64))
    with pytest.raises(ValueError, match="not tiled by window"):
        tiny_mae(img_size=(96, 64))  # 6 x 4 grid, 4 x 4 windows


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        tiny_mae(backend="flash")
    model = tiny_mae()
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("nope")
    available, reason = audiomae.backend_status("xformers")
    if not available:
        with pytest.raises(BackendUnavailableError, match="xformers"):
            model.set_backend("xformers")
        assert model.backend == "reference"  # a refused switch changes nothing


def _backends():
    return [b for b in audiomae.BACKENDS if audiomae.backend_status(b)[0]]


@pytest.mark.parametrize("decoder_mode,mask_2d", [(0, False), (1, False), (1, True)])
def test_backends_agree_forward_and_backward(decoder_mode, mask_2d):
    torch.manual_seed(0)
    model = tiny_mae(decoder_mode=decoder_mode, mask_2d=mask_2d).eval()
    imgs = torch.randn(2, 1, 128, 64)
    noise = (torch.rand(2, 8), torch.rand(2, 4)) if mask_2d else torch.rand(2, 32)
    results = {}
    for backend in _backends():
        model.set_backend(backend)
        model.zero_grad()
        loss, pred, mask, _ = model(imgs, noise=noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss.detach(), pred.detach(), mask, grads)
    ref = results.pop("reference")
    for backend, (loss, pred, mask, grads) in results.items():
        assert torch.equal(mask, ref[2]), backend
        torch.testing.assert_close(pred, ref[1], rtol=1e-4, atol=1e-4, msg=backend)
        torch.testing.assert_close(loss, ref[0], rtol=1e-4, atol=1e-5, msg=backend)
        for name, g in ref[3].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4, msg=f"{backend} {name}")


def test_triton_decoder_takes_the_fused_kernels():
    # The "triton" backend must not run eager math where a kernel exists: one gather, one
    # unshuffle, per decoder block one window attention, two post-norm residuals and two Linears
    # with column_sum's bias gradient (qkv, proj), and per block (encoder and decoder) one
    # activation-saving MLP.
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run the kernels through the interpreter
    model = tiny_mae(decoder_mode=1).set_backend("triton").to(device)
    imgs, noise = torch.randn(2, 1, 128, 64, device=device), torch.rand(2, 32, device=device)
    import audiomae.mae

    calls = []
    run_blocks = audiomae.mae.run_blocks
    spy = lambda blocks, x: calls.append(len(blocks)) or run_blocks(blocks, x)  # noqa: E731
    audiomae.mae.run_blocks = spy  # the decoder runs its blocks through run_blocks (the stream copy's loop)
    try:
        counts = autograd_node_counts(model(imgs, noise=noise)[0])
    finally:
        audiomae.mae.run_blocks = run_blocks
    assert calls == [len(model.decoder_blocks)]
    fused = {name.removesuffix("Backward"): n for name, n in counts.items() if name.startswith("_")}
    blocks = len(model.decoder_blocks)  # 16 in decoder mode 1, as the official code builds it
    assert fused == {"_GatherTokens": 1, "_UnshuffleTokens": 1, "_WindowAttentionFunction": blocks,
                     "_PostNormResidual": 2 * blocks, "_GeluMlp": blocks + len(model.blocks),
                     "_BiasGradient": 2 * blocks}, counts


def test_vit_forward_and_structured_masking_match_explicit_math():
    torch.manual_seed(0)
    model = tiny_vit().eval().double()
    x = torch.randn(2, 1, 128, 64, dtype=torch.float64)
    assert model(x).shape == (2, 5)
    noise = (torch.rand(2, 8), torch.rand(2, 4))
    out = model(x, mask_t_prob=0.5, mask_f_prob=0.25, noise=noise)
    tokens = (model.patch_embed(x) + model.pos_embed[:, 1:]).view(2, 8, 4, 64)
    keep_t = torch.argsort(noise[0], 1)[:, :4]
    keep_f = torch.argsort(noise[1], 1)[:, :3]
    kept = torch.stack([tokens[b][keep_t[b]][:, keep_f[b]].reshape(-1, 64) for b in range(2)])
    expected = model.head(model._encode(kept))
    torch.testing.assert_close(out, expected)
    for backend in _backends():
        model.set_backend(backend)
        torch.testing.assert_close(model(x.float().double(), mask_t_prob=0.5, mask_f_prob=0.25, noise=noise), expected,
                                   rtol=1e-5, atol=1e-6, msg=backend)
        model.set_backend("reference")


def test_vit_matches_timm_vit_without_masking():
    ours = tiny_vit(global_pool=False).double().eval()
    theirs = timm_vit.VisionTransformer(img_size=(128, 64), patch_size=16, in_chans=1, num_classes=5, embed_dim=64,
                                         depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN,
                                         class_token=True, global_pool="token").double().eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("norm" not in k for k in missing) or not missing
    x = torch.randn(2, 1, 128, 64, dtype=torch.float64)
    # timm adds pos_embed to cls and patches alike, as the official forward_features does
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    assert math.isclose(ours.blocks[0].norm1.eps, 1e-6)


def test_triton_backend_compiles_as_one_graph():
    """The kernels are torch.library ops: the whole model traces with no graph break, same loss and grads."""
    torch.manual_seed(0)
    model = tiny_mae(depth=1, decoder_mode=1, norm_pix_loss=True, backend="triton").eval()
    imgs, noise = torch.randn(2, 1, 128, 64), torch.rand(2, 32)
    eager = model(imgs, noise=noise)[0]
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(imgs, noise=noise)[0]
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6, msg=name)


def _swin_stack(depth=3):
    return nn.ModuleList([SwinTransformerBlock(32, 2, feat_size=(8, 4), window_size=(4, 4),
                                               shift_size=(0, 0) if n % 2 == 0 else (2, 0), backend="triton")
                          for n in range(depth)])


@pytest.mark.skipif(not _dispatch.interpreting(), reason="CPU tensors take the kernels only through the interpreter "
                    "(the GPU test below runs the whole model)")
def test_swin_blocks_stream_copy_changes_no_number(monkeypatch):
    """Under autocast ``run_blocks`` hands each Swin block's Linears the post-norm kernels' 16-bit
    copy of the float32 stream (``SwinTransformerBlock.forward_with_copy``): outputs and every
    gradient equal those of the plain blocks, where autocast makes the copies; and it traces as one
    graph. (float16 on the CPU: Triton's interpreter computes bfloat16 dots wrongly; the GPU test
    runs the whole model in both.)"""
    from audiomae.swin import run_blocks

    torch.manual_seed(0)
    blocks = _swin_stack()
    x = torch.randn(2, 32, 32, requires_grad=True)
    g = torch.randn(2, 32, 32)

    def grads(run, plain=False):
        if plain:
            monkeypatch.setattr(SwinTransformerBlock, "stream_copy_dtype", lambda self, x: None)
        torch.manual_seed(1)  # the meta-MLPs' dropout draws the same on every run
        with torch.autocast("cpu", dtype=torch.float16):
            out = run(blocks, x)
        counts = autograd_node_counts(out)
        result = torch.autograd.grad(out, [x, *blocks.parameters()], g)
        monkeypatch.undo()
        return out, result, counts

    out_c, grads_c, counts_c = grads(run_blocks)
    out_p, grads_p, counts_p = grads(run_blocks, plain=True)
    # Autocast casts the stream before each block's qkv Linear on the plain path (the MLP's op casts
    # inside itself); with the copy, only before the first block's.
    assert counts_p["ToCopyBackward0"] - counts_c["ToCopyBackward0"] == len(blocks) - 1, (counts_p, counts_c)
    assert torch.equal(out_c, out_p)
    for a, b in zip(grads_c, grads_p, strict=True):
        assert torch.equal(a, b)
    # Traced (fullgraph: no break), the copy path runs the kernels' ops; the backward's float16
    # sums may meet in another order there, so gradients agree to float16 rounding.
    compiled = torch.compile(run_blocks, fullgraph=True, backend="aot_eager")
    out_k, grads_k, _ = grads(compiled)
    torch.testing.assert_close(out_k, out_c, rtol=0, atol=0)
    for a, b in zip(grads_k, grads_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=4e-3 * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decoder_stream_copy_changes_no_number(monkeypatch, dtype):
    """The whole model under CUDA autocast: loss and every gradient the same to the bit with and
    without the decoder's stream copy."""
    torch.manual_seed(0)
    model = tiny_mae(decoder_mode=1, norm_pix_loss=True).set_backend("triton").cuda()
    imgs, noise = torch.randn(2, 1, 128, 64, device="cuda"), torch.rand(2, 32, device="cuda")
    results = {}
    for path in ("copy", "plain"):
        if path == "plain":
            monkeypatch.setattr(SwinTransformerBlock, "stream_copy_dtype", lambda self, x: None)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=dtype):
            loss = model(imgs, noise=noise)[0]
        casts = autograd_node_counts(loss)["ToCopyBackward0"]
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}, casts)
    (loss_c, grads_c, casts_c), (loss_p, grads_p, casts_p) = results["copy"], results["plain"]
    assert casts_p - casts_c == len(model.decoder_blocks) - 1
    assert torch.equal(loss_c, loss_p)
    for name, g in grads_p.items():
        assert torch.equal(grads_c[name], g), name


def test_swin_blocks_stream_copy_respects_hooks():
    """A forward hook on a block's submodule sees what it would see without the copy (float32)."""
    from audiomae.swin import run_blocks

    torch.manual_seed(0)
    blocks = _swin_stack()
    seen = []
    blocks[1].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        run_blocks(blocks, torch.randn(2, 32, 32))
        assert blocks[0].stream_copy_dtype(torch.zeros(1)) == torch.float16
    assert seen == [torch.float32]
    assert blocks[0].stream_copy_dtype(torch.zeros(1)) is None  # no autocast here


def test_stream_copy_only_for_stock_blocks():
    """The copy stands in for autocast's cast only where a block is the stock one, its attention
    and MLP feed x straight into one Linear each, and nobody replaced a forward."""
    from functools import partial

    import torch.utils.checkpoint

    from audiomae.layers import Mlp
    from audiomae.swin import run_blocks

    torch.manual_seed(0)
    make = lambda: SwinTransformerBlock(32, 2, feat_size=(8, 4), window_size=(4, 4), shift_size=(2, 0),  # noqa: E731
                                        backend="triton")
    x = torch.randn(2, 32, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert make().stream_copy_dtype(x) == torch.float16
        replaced = make()
        replaced.mlp = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
        wrapped = make()
        wrapped.attn.qkv = nn.Sequential(wrapped.attn.qkv)
        patched = make()
        patched.mlp.forward = partial(Mlp.forward, patched.mlp)
        for blk in (replaced, wrapped, patched):
            assert blk.stream_copy_dtype(x) is None

        class Halved(SwinTransformerBlock):
            def forward(self, x):
                return super().forward(x) * 0.5

        halved = Halved(32, 2, feat_size=(8, 4), window_size=(4, 4), backend="triton")
        checkpointed = make()
        checkpointed.forward = partial(torch.utils.checkpoint.checkpoint, checkpointed.forward, use_reentrant=False)
        blocks = nn.ModuleList([make(), halved, checkpointed, make()])
        calls = []
        original = Halved.forward
        Halved.forward = lambda self, x: calls.append("halved") or original(self, x)
        try:
            torch.manual_seed(1)  # the meta-MLPs' dropout draws the same on both runs
            got = run_blocks(blocks, x)
            torch.manual_seed(1)
            want = x
            for blk in blocks:
                want = blk(want)
        finally:
            Halved.forward = original
    assert calls == ["halved", "halved"]  # once through run_blocks, once for the plain loop
    assert torch.equal(got, want)


def test_a_float64_default_dtype_builds_a_float64_swin_decoder():
    """The meta-MLP's coordinate table takes the default dtype, as the parameters beside it do."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_mae(decoder_mode=1)
        loss, pred, _, _ = model(torch.randn(2, 1, 128, 64), mask_ratio=0.75)
    finally:
        torch.set_default_dtype(previous)
    assert pred.dtype == torch.float64 and torch.isfinite(loss)
    assert tiny_mae(decoder_mode=1).decoder_blocks[0].attn.relative_coordinates_log.dtype == torch.float32


def test_structured_masking_checks_the_token_count_against_the_grid():
    # The 2-D masks are drawn on the model's grid: other token counts were silently cut (30 tokens
    # on a 15-token grid) or failed deep in an index.
    mae, vit = tiny_mae(), tiny_vit()  # grid (8, 4)
    for model in (mae, vit):
        for tokens in (30, 8):
            with pytest.raises(ValueError, match=r"x must be patch tokens \[B, T\*F=32, D\] of the model's grid"):
                model.random_masking_2d(torch.randn(2, tokens, 64), 0.5, 0.5)


def test_vit_masking_probabilities_are_checked_before_use():
    vit = tiny_vit().eval()
    x = torch.randn(2, 1, 128, 64)
    with pytest.raises(ValueError, match="mask_t_prob must lie in"):
        vit(x, mask_t_prob=-0.5)  # was silently no masking (the > 0 gate came first)
    with pytest.raises(TypeError, match="mask_f_prob must be a number"):
        vit(x, mask_f_prob="0.5")
    with pytest.raises(ValueError, match="keep no token"):
        vit(x, mask_t_prob=1.0)  # the mean over no tokens: NaN logits in the official model
    mae = tiny_mae()
    with pytest.raises(TypeError, match="mask_ratio must be a number"):
        mae.random_masking(torch.randn(2, 32, 64), None)
    # 0-d tensors count as their value, as before the checks
    assert mae.random_masking(torch.randn(2, 32, 64), torch.tensor(0.75))[0].shape == (2, 8, 64)
    assert vit(x, mask_t_prob=torch.tensor(0.25)).shape == (2, 5)
