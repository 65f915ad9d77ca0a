import functools
import json
import math

import pytest
import torch

from audiomae.mae_ast import (
    MAEAST,
    MAEASTClassifier,
    chunk_masking_ids,
    info_nce,
    mae_ast_frame,
    mae_ast_patch,
    num_masked_tokens,
)
from audiomae.masking import random_masking_ids

TINY = dict(embed_dim=32, num_heads=2, encoder_depth=2, decoder_depth=1)


def tiny(**kwargs):
    return MAEAST(**{**TINY, **kwargs})


def masked_rows(x, mask):
    """[B, N, C] -> [B, M, C]: the masked tokens of each clip, in token order."""
    return x[mask.bool()].view(x.shape[0], -1, x.shape[-1])


# ---------------------------------------------------------------------------------------- masking
def loop_chunk_mask(noise, grid, num_masked, chunk_size):
    """The chunk scheme one chunk at a time, in Python, for one clip: [N] noise -> [N] bool mask."""
    T, F = grid
    lo, hi = chunk_size
    mask = torch.zeros(T * F, dtype=torch.bool)
    count = 0
    anchors = torch.argsort(noise, descending=True).tolist()  # random masking's order: highest noise first
    fine = math.modf(float(noise[anchors[0]]) * 4096)[0]
    c = min(lo + int(fine * (hi - lo + 1)), hi)  # one size for the clip, as SSAST's cur_clus
    ct, cf = min(c, T), min(c, F)
    for anchor in anchors:
        t, f = divmod(anchor, F)
        top = min(max(t - ct // 2, 0), T - ct)
        left = min(max(f - cf // 2, 0), F - cf)
        for i in range(ct):
            for j in range(cf):
                k = (top + i) * F + left + j
                if not mask[k] and count < num_masked:
                    mask[k] = True
                    count += 1
        if count == num_masked:
            return mask
    raise AssertionError("chunks ran out before the count was reached")


def check_permutation_ids(ids_keep, ids_restore, mask, num_masked):
    B, N = mask.shape
    assert torch.equal(mask.sum(1), torch.full((B,), float(num_masked)))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(N).expand(B, N))
    assert torch.equal((ids_restore >= N - num_masked).float(), mask)
    kept = torch.zeros(B, N).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)


@pytest.mark.parametrize(
    "grid,ratio,chunk_size",
    [((64, 8), 0.75, (3, 5)), ((7, 8), 0.5, (3, 5)), ((2, 8), 0.9, (3, 5)), ((64, 1), 0.75, (3, 5)),
     ((37, 1), 0.3, (1, 7)), ((5, 3), 0.6, (4, 4)), ((1, 8), 0.5, (3, 5))],
)
def test_chunk_mask_matches_one_chunk_at_a_time(grid, ratio, chunk_size):
    torch.manual_seed(0)
    B, N = 6, grid[0] * grid[1]
    noise = torch.rand(B, N)
    num_masked = num_masked_tokens(N, ratio)
    ids_keep, ids_restore, mask = chunk_masking_ids(noise, grid, num_masked, chunk_size)
    check_permutation_ids(ids_keep, ids_restore, mask, num_masked)
    for b in range(B):
        assert torch.equal(mask[b].bool(), loop_chunk_mask(noise[b], grid, num_masked, chunk_size))


def test_chunk_size_one_is_the_random_mask_and_sizes_are_per_clip():
    """The same noise masks the same tokens first in both schemes (chunks of one token are the
    random mask), and 16-bit noise or a bad chunk_size is refused."""
    torch.manual_seed(3)
    noise = torch.rand(64, 40)
    _, _, chunk_mask = chunk_masking_ids(noise, (40, 1), 13, (1, 1))
    _, _, random_mask = random_masking_ids(noise, 40 - 13)
    assert torch.equal(chunk_mask, random_mask.float())
    with pytest.raises(TypeError, match="float32 or float64"):
        chunk_masking_ids(noise.bfloat16(), (40, 1), 13, (3, 5))
    for bad in [(0, 3), (5, 3), 3, ("a", "b")]:
        with pytest.raises(ValueError, match="chunk_size"):
            chunk_masking_ids(noise, (40, 1), 13, bad)


def masked_squares(mask_grid, size):
    """[T, F] bool -> [T, F] bool: True where the cell lies in some all-masked size x size square."""
    T, F = mask_grid.shape
    covered = torch.zeros_like(mask_grid)
    for t in range(T - size + 1):
        for f in range(F - size + 1):
            if mask_grid[t:t + size, f:f + size].all():
                covered[t:t + size, f:f + size] = True
    return covered


def test_patch_chunks_are_blocks():
    torch.manual_seed(1)
    grid, lo, hi = (64, 8), 3, 5
    ids_keep, ids_restore, mask = chunk_masking_ids(torch.rand(8, 512), grid, 384, (lo, hi))
    for clip in mask.bool().view(8, *grid):
        # every masked token lies in a full lo x lo masked square, except the cut last chunk's
        outside = clip & ~masked_squares(clip, lo)
        assert outside.sum() < hi * hi
    # at a ratio where random masking rarely fills a square, chunk masking still mostly does
    noise = torch.rand(8, 512)
    _, _, chunk_mask = chunk_masking_ids(noise, grid, 200, (lo, hi))
    random_mask = torch.argsort(torch.argsort(noise, 1), 1) >= 512 - 200
    in_squares = lambda m: sum(int(masked_squares(c, lo).sum()) for c in m.bool().view(8, *grid))
    assert in_squares(chunk_mask) > 0.9 * 8 * 200 > 20 * in_squares(random_mask)


def run_lengths(mask_row):
    runs, length = [], 0
    for masked in mask_row + [False]:
        if masked:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_frame_chunks_are_runs():
    torch.manual_seed(2)
    lo = 3
    _, _, mask = chunk_masking_ids(torch.rand(16, 200), (200, 1), 150, (lo, 5))
    for clip in mask.bool().tolist():
        runs = run_lengths(clip)
        assert sum(runs) == 150
        assert sum(run < lo for run in runs) <= 1  # only the cut last chunk may stand alone, short


def test_chunks_keep_their_sizes_for_noise_outside_the_unit_interval():
    """A randn (or shifted) noise still draws chunk sizes in [min, max]."""
    torch.manual_seed(3)
    for noise in (torch.rand(16, 200) - 1, torch.randn(16, 200)):
        _, _, mask = chunk_masking_ids(noise, (200, 1), 20, (3, 5))
        for clip in mask.bool().tolist():
            runs = run_lengths(clip)
            assert sum(runs) == 20 and sum(run < 3 for run in runs) <= 1, runs


def test_chunk_sizes_are_one_per_clip_and_uniform_over_the_range():
    torch.manual_seed(3)
    # sparse enough that most chunks stand alone: their run lengths are the clip's drawn size
    _, _, mask = chunk_masking_ids(torch.rand(400, 400), (400, 1), 40, (2, 6))
    sizes = []
    for clip in mask.bool().tolist():
        runs = torch.tensor(run_lengths(clip))
        size = int(torch.mode(runs).values)
        # overlapping neighbours merge into longer runs; only the cut last chunk is shorter
        assert int((runs < size).sum()) <= 1, runs
        sizes.append(size)
    share = torch.bincount(torch.tensor(sizes), minlength=7).float() / len(sizes)
    assert share[:2].sum() == 0 and ((share[2:] > 0.14) & (share[2:] < 0.26)).all(), share


@pytest.mark.parametrize("masking", ["random", "chunk"])
@pytest.mark.parametrize("tokens,frames", [("patch", 64), ("patch", 70), ("frame", 38), ("frame", 7)])
@pytest.mark.parametrize("ratio", [0.75, 0.3, 0.95])
def test_model_masks_exact_count(masking, tokens, frames, ratio):
    model = tiny(tokens=tokens, masking=masking, mask_ratio=ratio)
    N = model.grid(frames)[0] * model.grid(frames)[1]
    ids_keep, ids_restore, mask = model.masking_ids(3, frames, "cpu")
    check_permutation_ids(ids_keep, ids_restore, mask, min(max(N - int(N * (1 - ratio)), 1), N - 1))


@pytest.mark.parametrize("num_tokens,ratio,expected", [
    (14, 0.75, 11), (6, 0.75, 5), (512, 0.75, 384), (10, 0.7, 7), (101, 0.8, 81), (4, 0.1, 1), (4, 0.99, 3),
])
def test_masked_count_follows_the_released_code(num_tokens, ratio, expected):
    """MAE-AST's released code keeps max(1, int((1 - r) * N)) tokens and masks the rest."""
    assert num_masked_tokens(num_tokens, ratio) == expected


@pytest.mark.parametrize("masking", ["random", "chunk"])
def test_noise_and_generator_make_masking_reproducible(masking):
    model = tiny(masking=masking)
    spec = torch.randn(2, 64, 128)
    noise = torch.rand(2, 32)
    a, b = model(spec, noise=noise), model(spec, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)
    c = model(spec, generator=torch.Generator().manual_seed(5))
    d = model(spec, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c.mask, d.mask)
    assert not torch.equal(model(spec, generator=torch.Generator().manual_seed(6)).mask, c.mask)


# ---------------------------------------------------------------------------------------- losses
def info_nce_float64(pred, target):
    pred, target = pred.double(), target.double()
    B, M, _ = pred.shape
    total = 0.0
    for b in range(B):
        for i in range(M):
            scores = torch.stack([pred[b, i] @ target[b, j] for j in range(M)])
            total = total - (scores[i] - torch.logsumexp(scores, 0))
    return total / (B * M)


@pytest.mark.parametrize("B,M,P", [(1, 1, 3), (2, 5, 7), (3, 9, 16)])
def test_info_nce_matches_float64(B, M, P):
    torch.manual_seed(B * M)
    pred = torch.randn(B, M, P, requires_grad=True)
    target = torch.randn(B, M, P, requires_grad=True)
    loss = info_nce(pred, target)
    pred64 = pred.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    expected = info_nce_float64(pred64, target64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(pred.grad.double(), pred64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.grad.double(), target64.grad, rtol=1e-5, atol=1e-6)


def test_info_nce_prefers_matching_pairs():
    target = torch.randn(2, 6, 64)
    assert info_nce(10 * target, target) < 1e-3 < info_nce(10 * target.flip(1), target)


def head_input(model):
    """Captures the features the heads read (decoder output in mae mode, encoder output in ssast)."""
    captured = {}
    norm = model.decoder_norm if model.mode == "mae" else model.norm
    norm.register_forward_hook(lambda module, args, out: captured.__setitem__("x", out))
    return captured


@pytest.mark.parametrize("mode", ["mae", "ssast"])
@pytest.mark.parametrize("tokens", ["patch", "frame"])
@pytest.mark.parametrize("masking", ["random", "chunk"])
def test_losses_match_float64_formulas(mode, tokens, masking):
    torch.manual_seed(4)
    model = tiny(mode=mode, tokens=tokens, masking=masking, recon_weight=2.0, nce_weight=3.0)
    captured = head_input(model)
    spec = torch.randn(3, 40, 128) * 0.5
    out = model(spec)
    x = captured["x"].detach().double()
    target = masked_rows(model.tokenize(spec).double(), out.mask)
    pred = x @ model.recon_head.weight.double().T + model.recon_head.bias.double()
    classes = masked_rows(x @ model.nce_head.weight.double().T + model.nce_head.bias.double(), out.mask)
    loss_recon = ((masked_rows(pred, out.mask) - target) ** 2).mean()
    loss_nce = info_nce_float64(classes, target)
    torch.testing.assert_close(out.loss_recon.double(), loss_recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_nce.double(), loss_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), 2 * loss_recon + 3 * loss_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred.double(), pred, rtol=1e-5, atol=1e-5)


def test_tokens_layout():
    spec = torch.randn(2, 40, 128)
    patches = tiny(tokens="patch").tokenize(spec)
    assert patches.shape == (2, 2 * 8, 256)
    for t in range(2):
        for f in range(8):
            patch = spec[:, 16 * t:16 * (t + 1), 16 * f:16 * (f + 1)]
            torch.testing.assert_close(patches[:, t * 8 + f], patch.flatten(1))
    frames = tiny(tokens="frame").tokenize(spec)
    assert frames.shape == (2, 20, 256)
    torch.testing.assert_close(frames[:, 7], spec[:, 14:16].flatten(1))


@pytest.mark.parametrize("mode", ["mae", "ssast"])
def test_masked_inputs_do_not_reach_the_predictions(mode):
    torch.manual_seed(5)
    model = tiny(mode=mode, tokens="frame")
    spec = torch.randn(2, 32, 128)
    noise = torch.rand(2, 16)
    out = model(spec, noise=noise)
    frame_mask = out.mask.bool().repeat_interleave(2, dim=1)  # [B, T]: frames of masked tokens
    changed = spec + 5.0 * frame_mask[..., None]
    torch.testing.assert_close(model(changed, noise=noise).pred, out.pred)
    kept_changed = spec + 5.0 * (~frame_mask)[..., None]
    assert not torch.allclose(model(kept_changed, noise=noise).pred, out.pred)


@pytest.mark.parametrize("recon_weight,nce_weight", [(1.0, 0.0), (0.0, 1.0)])
def test_switched_off_loss_is_not_computed(recon_weight, nce_weight):
    model = tiny(recon_weight=recon_weight, nce_weight=nce_weight)
    out = model(torch.randn(2, 32, 128))
    if recon_weight == 0:
        assert model.recon_head is None and out.pred is None and out.loss_recon == 0
        torch.testing.assert_close(out.loss, out.loss_nce)
    else:
        assert model.nce_head is None and out.loss_nce == 0
        torch.testing.assert_close(out.loss, out.loss_recon)
    assert all(p.grad is None for p in model.parameters())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "a built parameter gets no gradient"


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["mae", "ssast"])
@pytest.mark.parametrize("tokens", ["patch", "frame"])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 10.0)], ids=["gen", "disc", "both"])
def test_every_mode_trains(mode, tokens, weights):
    torch.manual_seed(6)
    model = tiny(mode=mode, tokens=tokens, masking="chunk" if tokens == "patch" else "random",
                 recon_weight=weights[0], nce_weight=weights[1])
    spec = torch.randn(4, 32, 128) * 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        loss = model(spec, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("mode", ["mae", "ssast"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree(mode, backend):
    torch.manual_seed(7)
    model = tiny(mode=mode, masking="chunk")
    spec = torch.randn(2, 48, 128) * 0.5
    noise = torch.rand(2, 24)
    results = []
    for name in ("reference", backend):
        model.set_backend(name)
        model.zero_grad()
        out = model(spec, noise=noise)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    assert torch.equal(ref.mask, out.mask)
    for field in ("loss", "loss_recon", "loss_nce", "pred"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("tokens,frames,num_tokens", [("patch", 64, 32), ("patch", 79, 32), ("patch", 1100, 68 * 8),
                                                      ("frame", 33, 16), ("frame", 4, 2)])
def test_variable_lengths(tokens, frames, num_tokens):
    model = tiny(tokens=tokens)
    spec = torch.randn(2, frames, 128)
    out = model(spec)
    assert out.pred.shape == (2, num_tokens, 256) and out.mask.shape == (2, num_tokens)
    features = model.forward_features(spec)
    assert features.shape == (2, num_tokens, 32)
    cropped = spec[:, : frames - frames % model.token_frames]
    torch.testing.assert_close(model.forward_features(cropped), features)


def test_one_token_clips_give_features_but_cannot_be_masked():
    model = MAEASTClassifier(num_classes=3, **TINY, tokens="frame")
    assert model(torch.randn(2, 3, 128)).shape == (2, 3)  # one frame token
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.backbone(torch.randn(2, 3, 128))
    with pytest.raises(ValueError, match="at least 1 token"):
        model(torch.randn(2, 1, 128))
    with pytest.raises(ValueError, match="at least 1 token"):
        MAEASTClassifier(num_classes=3, **TINY, tokens="patch")(torch.randn(2, 15, 128))


def test_positions_do_not_depend_on_length():
    torch.manual_seed(8)
    model = tiny(tokens="frame", encoder_depth=1)
    model.blocks = torch.nn.ModuleList()  # no attention: each token sees only itself and its position
    spec = torch.randn(1, 300, 128)
    torch.testing.assert_close(model.forward_features(spec)[:, :50], model.forward_features(spec[:, :100]))


def test_classifier_mean_pools_the_encoder():
    torch.manual_seed(9)
    backbone = tiny(tokens="frame")
    classifier = MAEASTClassifier(backbone, num_classes=5)
    spec = torch.randn(3, 20, 128)
    logits = classifier(spec)
    assert logits.shape == (3, 5)
    expected = classifier.head(backbone.forward_features(spec).mean(1))
    torch.testing.assert_close(logits, expected)
    fresh = MAEASTClassifier(num_classes=3, **TINY)
    assert fresh(spec[:, :16]).shape == (3, 3)
    with pytest.raises(ValueError, match="not both"):
        MAEASTClassifier(backbone, num_classes=3, embed_dim=32)


def rebuild(cls, config):
    """What a loader does with ``config()``: JSON round trip, ``norm_eps`` back into a norm layer."""
    config = json.loads(json.dumps(config))
    norm_layer = functools.partial(torch.nn.LayerNorm, eps=config.pop("norm_eps"))
    return cls(**config, norm_layer=norm_layer)


def test_config_rebuilds_the_model():
    model = tiny(tokens="frame", mode="ssast", masking="chunk", chunk_size=(2, 4), nce_weight=0.0, backend="sdpa",
                 norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5))
    rebuilt = rebuild(MAEAST, model.config())
    assert rebuilt.norm.eps == 1e-5 and rebuilt.config() == model.config()
    rebuilt.load_state_dict(model.state_dict())
    spec, noise = torch.randn(2, 32, 128), torch.rand(2, 16)
    torch.testing.assert_close(rebuilt(spec, noise=noise).loss, model(spec, noise=noise).loss)
    classifier = MAEASTClassifier(model, num_classes=4)
    assert rebuild(MAEASTClassifier, classifier.config()).head.out_features == 4


def test_presets_follow_the_paper():
    patch, frame = mae_ast_patch(), mae_ast_frame(encoder_depth=1)
    assert patch.tokens == "patch" and frame.tokens == "frame"
    assert len(patch.blocks) == 6 and len(patch.decoder_blocks) == 2 and len(frame.blocks) == 1
    assert patch.embed_dim == 768 and patch.blocks[0].attn.num_heads == 12
    assert isinstance(patch.decoder_embed, torch.nn.Identity)
    assert patch.mask_ratio == 0.75 and (patch.recon_weight, patch.nce_weight) == (1.0, 10.0)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(tokens="patches"), "tokens"), (dict(mode="mae_ast"), "mode"), (dict(masking="block"), "masking"),
     (dict(mask_ratio=1.0), "mask_ratio"), (dict(mask_ratio=0.0), "mask_ratio"),
     (dict(recon_weight=0.0, nce_weight=0.0), "not both 0"), (dict(nce_weight=-1.0), "nce_weight"),
     (dict(chunk_size=(5, 3)), "chunk_size"), (dict(decoder_depth=0), "decoder_depth"),
     (dict(backend="cuda"), "backend"), (dict(nce_weight=math.nan), "nce_weight"),
     (dict(recon_weight=math.inf), "recon_weight"), (dict(chunk_size=(2.7, 3.9)), "chunk_size"),
     (dict(embed_dim=15, num_heads=3), "embed_dim must be even"),
     (dict(decoder_embed_dim=15, decoder_num_heads=3), "decoder_embed_dim must be even"),
     (dict(num_heads=0), "num_heads must be an integer >= 1"), (dict(embed_dim=0), "embed_dim must be"),
     (dict(decoder_embed_dim=0), "decoder_embed_dim must be"), (dict(decoder_num_heads=0), "decoder_num_heads"),
     (dict(decoder_embed_dim=40, decoder_num_heads=3), "decoder_embed_dim=40 must be divisible by decoder_num_heads"),
     (dict(mask_ratio=None), "mask_ratio must be a finite number"), (dict(recon_weight=None), "recon_weight"),
     (dict(chunk_size=3), "chunk_size must be two integers"), (dict(chunk_size=("a", "b")), "chunk_size"),
     (dict(mlp_ratio=0.0), "mlp_ratio"), (dict(encoder_depth=1.5), "encoder_depth")],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="128 mel bins"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, T, 128\]"):
        model(torch.randn(2, 1, 64, 128))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 64, 128, dtype=torch.long))
    with pytest.raises(TypeError, match="spec must be a torch.Tensor, got numpy.ndarray"):
        model(torch.randn(2, 64, 128).numpy())
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 64, 128), noise=torch.rand(2, 31))
    with pytest.raises(ValueError, match="not both"):
        model(torch.randn(2, 64, 128), noise=torch.rand(2, 32), generator=torch.Generator())
    with pytest.raises(ValueError, match="non-empty batch"):
        model(torch.randn(0, 64, 128))
    with pytest.raises(TypeError, match="spec is torch.float64 but the model is torch.float32"):
        model(torch.randn(2, 64, 128, dtype=torch.float64))
    with pytest.raises(TypeError, match="spec is torch.float64"):
        model.forward_features(torch.randn(2, 64, 128, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast never casts float64: still refused
        with pytest.raises(TypeError, match="spec is torch.float64"):
            model(torch.randn(2, 64, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        MAEASTClassifier(num_classes=2.5, **TINY)


def test_float64_model_gets_the_exact_position_table():
    from audiomae.pos_embed import sincos_1d
    model = tiny().double()
    table = model._positions(32, 50, torch.device("cpu"))
    assert table.dtype == torch.float64 and torch.equal(table, sincos_1d(32, torch.arange(50)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["mae", "ssast"])
def test_models_in_other_dtypes(dtype, mode):
    """A model cast to bfloat16 runs in it (position tables follow the parameters); one in float64
    keeps float64 losses."""
    torch.manual_seed(0)
    model = tiny(mode=mode).to(dtype)
    spec = torch.randn(2, 48, 128).to(dtype)
    out = model(spec, noise=torch.rand(2, 24))
    out.loss.backward()
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == out.loss_recon.dtype == out.loss_nce.dtype == expected
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    assert model.forward_features(spec).dtype == dtype


def test_hyperparameters_take_numpy_scalars_and_generators_are_checked():
    import numpy as np

    model = MAEAST(mask_ratio=np.float32(0.75), recon_weight=torch.tensor(2.0), embed_dim=32, num_heads=2,
                   encoder_depth=1, decoder_depth=1, masking="chunk")
    assert type(model.mask_ratio) is float and model.mask_ratio == 0.75 and model.recon_weight == 2.0
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model(torch.randn(1, 32, 128), generator=3)


def test_chunk_masking_under_a_half_precision_default_dtype():
    # The drawn noise was fp16, which chunk masking refuses (its size comes from the low bits).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = MAEAST(masking="chunk", embed_dim=32, num_heads=2, encoder_depth=1, decoder_depth=1).float()
        assert torch.isfinite(model(torch.randn(1, 32, 128, dtype=torch.float32)).loss)
    finally:
        torch.set_default_dtype(default)
