"""The official API beyond forward passes: fine-tuning a long-clip checkpoint on short clips
(``main_finetune_as.py`` + ``util/pos_embed.interpolate_pos_embed_audio``), clear errors for files that
are not AudioMAE checkpoints, the official attributes and methods (``patch_hw``, ``random_masking``,
``_init_weights``, timm's ``qk_scale``/``hybrid_backbone``, the huge presets) and decoder modes 2 and 3.
Each official behaviour is written out here from the official code, independently of ours."""
import argparse
from functools import partial

import pytest
import torch
import torch.nn as nn

import audiomae
from audiomae.checkpoint import CheckpointMismatchError, cut_pos_embed_time, infer_config
from audiomae.pos_embed import sincos_2d_official

LN = partial(nn.LayerNorm, eps=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def mae(img_size=(256, 128), decoder_mode=0, **kw):
    config = dict(img_size=img_size, patch_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, norm_layer=LN,
                  decoder_mode=decoder_mode)
    config.update(kw)
    return audiomae.MaskedAutoencoderViT(**config)


def vit(img_size=(128, 128), **kw):
    config = dict(img_size=img_size, patch_size=16, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.0, num_classes=3)
    config.update(kw)
    return audiomae.VisionTransformer(**config)


def official_cut(pos_embed, orig_size, new_size):
    """interpolate_pos_embed_audio(orig_size=(F, T), new_size=(F, T')) as explicit indices: its
    ``reshape(-1, F, T, D)[:, :, :T']`` keeps old token row ``r * T + c`` as new row ``r * T' + c``."""
    (num_freq, num_time), new_time = orig_size, new_size[1]
    rows = [0] + [1 + r * num_time + c for r in range(num_freq) for c in range(new_time)]
    return pos_embed[:, rows]


# ------------------------------------------------------------------ 1. long-clip checkpoint, short-clip model
@pytest.mark.parametrize("frames", [128, 64])
def test_encoder_from_a_longer_clip_checkpoint_gets_the_official_cut(tmp_path, frames):
    pretrained = mae(pos_trainable=True)  # 256 frames: a 16 x 8 grid
    with torch.no_grad():
        pretrained.pos_embed.add_(torch.randn_like(pretrained.pos_embed))  # a learnt table: every row matters
    path = tmp_path / "pretrain.pth"
    torch.save({"model": pretrained.state_dict(), "args": argparse.Namespace(model="mae_vit_small_patch16")}, path)
    model = audiomae.load_pretrained_encoder(vit((frames, 128)), path)
    expected = official_cut(pretrained.pos_embed.detach(), (8, 16), (8, frames // 16))
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    assert model(torch.randn(2, 1, frames, 128)).shape == (2, 3)


def test_the_cut_of_a_fixed_table_is_the_fresh_short_table():
    """Why the official cut is right although it does not keep the first time rows of the tokens."""
    table = sincos_2d_official(48, (64, 8)).unsqueeze(0)  # AudioSet's 1024 frames
    for frames in (512, 128):  # ESC-50, Speech Commands
        fresh = sincos_2d_official(48, (frames // 16, 8)).unsqueeze(0)
        assert torch.equal(official_cut(table, (8, 64), (8, frames // 16)), fresh)
        assert torch.equal(cut_pos_embed_time(table, (64, 8), frames // 16), fresh)


def test_grid_from_saved_config_and_misfits_name_both_shapes(tmp_path):
    path = mae((256, 64)).save_pretrained(tmp_path / "narrow.safetensors")  # 16 x 4: not 128 mel bins
    model = audiomae.load_pretrained_encoder(vit((128, 64)), path)
    assert torch.equal(model.pos_embed, sincos_2d_official(32, (8, 4)).unsqueeze(0))
    torch.save({"model": mae((128, 128)).state_dict()}, tmp_path / "short.pth")
    for frames, freq, shape in ((256, 128, [1, 129, 32]), (128, 64, [1, 33, 32])):  # longer; other frequency
        with pytest.raises(CheckpointMismatchError) as err:
            audiomae.load_pretrained_encoder(vit((frames, freq)), tmp_path / "short.pth")
        message = str(err.value)
        assert f"pos_embed: checkpoint [1, 65, 32] vs model {shape}" in message
        assert "8 x 8 patch grid" in message and f"{frames // 16} x {freq // 16} grid" in message


def test_cli_finetune_with_a_shorter_target_length(tmp_path):
    """``finetune --target-length`` below the pretraining's goes through the same cut."""
    from audiomae.cli import main
    from audiomae.training import load_checkpoint

    from cli_support import QUIET_RUN, make_demo, pretrain

    demo = make_demo(tmp_path / "demo", num_per_class=1)
    assert pretrain(demo, tmp_path / "pt", "--target-length", "64", "--max-steps", "1") == 0  # a 4 x 8 grid
    out = tmp_path / "ft"
    assert main(["finetune", str(demo), "--init", str(tmp_path / "pt" / "checkpoint.pth"), "--out", str(out),
                 *QUIET_RUN, "--batch-size", "4", "--epochs", "1", "--target-length", "32"]) == 0
    pos_embed = load_checkpoint(out / "checkpoint.pth")["model"]["pos_embed"]
    assert torch.equal(pos_embed, sincos_2d_official(32, (2, 8)).unsqueeze(0))


# ------------------------------------------------------------------ 2. not an AudioMAE checkpoint
def test_foreign_checkpoints_are_named_not_a_key_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"foo": torch.zeros(1), "pos_embed": torch.zeros(1, 5, 8)}}, path)
    for load in (audiomae.from_pretrained, partial(audiomae.load_pretrained_encoder, vit())):
        with pytest.raises(ValueError, match="not a recognised AudioMAE checkpoint") as err:
            load(path)
        assert "patch_embed.proj.weight" in str(err.value) and "blocks.0.mlp.fc1.weight" in str(err.value)
        assert "missing pos_embed" not in str(err.value)
    with pytest.raises(ValueError, match="missing patch_embed.proj.weight, pos_embed"):
        infer_config({})


# ------------------------------------------------------------------ 3. official attributes and methods
def test_patch_hw_as_the_official_patch_embeds():
    # PatchEmbed_org: (img_size[1] // p, img_size[0] // p); PatchEmbed_new(stride=16): the conv's (h, w).
    assert mae((1024, 128), depth=0).patch_embed.patch_hw == (8, 64)
    assert vit((1024, 128), depth=0).patch_embed.patch_hw == (64, 8)
    assert mae((128, 64), depth=0).patch_embed.patch_hw == (4, 8)
    assert vit((128, 64), depth=0).patch_embed.patch_hw == (8, 4)


def official_random_masking(x, mask_ratio):
    """models_vit.VisionTransformer.random_masking (= models_mae's)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75, 1.0])
def test_vit_random_masking_is_the_official_one(mask_ratio):
    model, x = vit(), torch.randn(3, 64, 32)
    torch.manual_seed(5)
    ours = model.random_masking(x, mask_ratio)
    torch.manual_seed(5)
    theirs = official_random_masking(x, mask_ratio)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    noise = torch.rand(3, 64)
    x_masked, mask, ids_restore = model.random_masking(x, 0.5, noise=noise)
    assert torch.equal(x_masked, x.gather(1, noise.argsort(1)[:, :32, None].expand(-1, -1, 32)))
    assert torch.equal(mask.sum(1), torch.full((3,), 32.0))


def test_init_weights_is_the_method_initialize_weights_applies():
    for model in (mae(), vit()):
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                nn.init.constant_(module.weight, 3.0)
                nn.init.constant_(module.bias, 3.0)
        model.apply(model._init_weights)
        fc1 = model.blocks[0].mlp.fc1
        assert not torch.any(fc1.bias) and torch.all(model.blocks[0].norm1.weight == 1)
        if isinstance(model, audiomae.MaskedAutoencoderViT):  # xavier-uniform, as models_mae
            assert fc1.weight.abs().max() <= (6 / sum(fc1.weight.shape)) ** 0.5
        else:  # timm's trunc_normal_(std=0.02)
            assert 0.015 < fc1.weight.std() < 0.025


def test_qk_scale_and_hybrid_backbone_keywords(tmp_path):
    x = torch.randn(2, 1, 128, 128)
    plain, scaled = vit().eval(), vit(qk_scale=0.05).eval()
    scaled.load_state_dict(plain.state_dict())
    assert scaled.blocks[0].attn.scale == 0.05 and vit(qk_scale=0).blocks[0].attn.scale == (32 // 4) ** -0.5
    assert not torch.allclose(scaled(x), plain(x))
    plain.blocks[0].attn.scale = 0.05
    torch.testing.assert_close(scaled(x), plain(x), rtol=0, atol=0)
    loaded = audiomae.from_pretrained(scaled.save_pretrained(tmp_path / "scaled.safetensors")).eval()
    assert loaded.blocks[0].attn.scale == 0.05
    assert vit(hybrid_backbone=None).patch_embed.num_patches == 64
    with pytest.raises(NotImplementedError, match="hybrid_backbone"):
        vit(hybrid_backbone=nn.Identity())


def test_huge_presets():
    with torch.device("meta"):
        model = audiomae.mae_vit_huge_patch14(img_size=(1008, 126))
        classifier = audiomae.vit_huge_patch14(img_size=(1008, 126), num_classes=527)
    for m in (model, classifier):
        assert m.patch_embed.proj.weight.shape == (1280, 1, 14, 14) and len(m.blocks) == 32
        assert m.blocks[0].attn.num_heads == 16 and m.pos_embed.shape == (1, 1 + 72 * 9, 1280)
    assert model.decoder_embed.weight.shape == (512, 1280) and model.decoder_blocks[0].attn.num_heads == 16
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        audiomae.vit_huge_patch14(depth=0)  # 14 does not tile the default 1024 x 128


# ------------------------------------------------------------------ 4. decoder modes 2 and 3
def official_forward_decoder(model, x, ids_restore):
    """models_mae.forward_decoder (use_custom_patch=False, decoder_mode <= 3), on the model's modules."""
    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    if model.decoder_mode != 0:
        x = x[:, 1:, :]
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))
    return pred if model.decoder_mode != 0 else pred[:, 1:, :]


@pytest.mark.parametrize("decoder_mode", [0, 2, 3])
def test_decoder_modes_2_and_3_are_global_without_the_cls_token(decoder_mode):
    torch.manual_seed(0)
    model = mae((128, 64), decoder_mode)
    torch.manual_seed(0)
    reference = mae((128, 64), 0)
    shapes = [(k, v.shape) for k, v in model.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in reference.state_dict().items()]
    imgs = torch.randn(2, 1, 128, 64)
    latent, _, ids_restore, _ = model.forward_encoder(imgs, 0.75, noise=torch.rand(2, 32))
    pred, _, _ = model.forward_decoder(latent, ids_restore)
    torch.testing.assert_close(pred, official_forward_decoder(model, latent, ids_restore), rtol=0, atol=0)
    if decoder_mode:
        assert not torch.allclose(pred, reference.forward_decoder(latent, ids_restore)[0])  # the cls token is gone
    loss = model(imgs, noise=torch.rand(2, 32))[0]
    loss.backward()
    assert torch.isfinite(loss) and model.decoder_blocks[0].attn.qkv.weight.grad is not None


def test_decoder_mode_survives_files_and_others_are_refused(tmp_path):
    model = mae(decoder_mode=2)
    loaded = audiomae.from_pretrained(model.save_pretrained(tmp_path / "m2.safetensors"))
    assert loaded.decoder_mode == 2 and loaded.decoder_blocks[0].attn.num_heads == 4
    # mode 2's keys are mode 0's: an official file's args tell them apart
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(decoder_mode=3)}, tmp_path / "m3.pth")
    assert audiomae.from_pretrained(tmp_path / "m3.pth", num_heads=4, decoder_num_heads=4).decoder_mode == 3
    for bad in (4, -1):
        with pytest.raises(ValueError, match="decoder_mode must be"):
            mae(decoder_mode=bad)


# ----------------------------------------------------------------------------------------------
# Second review: fine-tuning checkpoints keep fc_norm and head, known grids are compared, image ViTs refused
# ----------------------------------------------------------------------------------------------
def test_fine_tuned_checkpoint_keeps_fc_norm_and_a_matching_head(tmp_path):
    torch.manual_seed(0)
    # 128 mel bins, as every official recipe (a .pth without a config is read that way)
    source = audiomae.VisionTransformer(img_size=(64, 128), embed_dim=32, depth=1, num_heads=2, num_classes=5)
    with torch.no_grad():
        source.fc_norm.weight.fill_(3.0)
        source.fc_norm.bias.fill_(0.5)
        source.head.bias.fill_(1.0)
    path = tmp_path / "ft.pth"
    torch.save({"model": source.state_dict()}, path)
    same_classes = audiomae.VisionTransformer(img_size=(32, 128), embed_dim=32, depth=1, num_heads=2, num_classes=5)
    audiomae.load_pretrained_encoder(same_classes, path)
    assert torch.all(same_classes.fc_norm.weight == 3.0) and torch.all(same_classes.fc_norm.bias == 0.5)
    assert torch.all(same_classes.head.bias == 1.0)
    other_classes = audiomae.VisionTransformer(img_size=(32, 128), embed_dim=32, depth=1, num_heads=2, num_classes=7)
    fresh_head = other_classes.head.weight.detach().clone()
    audiomae.load_pretrained_encoder(other_classes, path)  # the head's shape differs: the model's own stays
    assert torch.equal(other_classes.head.weight, fresh_head) and torch.all(other_classes.fc_norm.weight == 3.0)


def test_known_grid_must_match_even_when_the_table_has_the_same_size(tmp_path):
    source = audiomae.VisionTransformer(img_size=(128, 64), embed_dim=32, depth=1, num_heads=2, num_classes=3)
    path = tmp_path / "ft.safetensors"
    source.save_pretrained(path)  # 8 x 4 patches, and the file says so
    transposed = audiomae.VisionTransformer(img_size=(64, 128), embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(audiomae.CheckpointMismatchError, match="4 x 8 grid"):
        audiomae.load_pretrained_encoder(transposed, path)


def test_official_args_length_that_contradicts_the_grid_is_refused(tmp_path):
    """512 frames x 256 bins give 32 x 16 patches, as many as 1024 x 128's 64 x 8: the official args'
    target_length says the table is not the model's, though its size matches."""
    import argparse

    source = audiomae.MaskedAutoencoderViT(img_size=(512, 256), embed_dim=32, depth=1, num_heads=4,
                                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(target_length=512)}, path)
    model = audiomae.VisionTransformer(img_size=(1024, 128), embed_dim=32, depth=1, num_heads=4, num_classes=3)
    with pytest.raises(audiomae.CheckpointMismatchError, match="32 x 16 patch grid"):
        audiomae.load_pretrained_encoder(model, path)


def test_image_vit_is_not_taken_for_an_audiomae_checkpoint(tmp_path):
    image = audiomae.VisionTransformer(img_size=(32, 128), in_chans=3, embed_dim=32, depth=1, num_heads=2,
                                       num_classes=10)
    path = tmp_path / "imagenet.pth"
    torch.save(image.state_dict(), path)
    with pytest.raises(ValueError, match="3 input channels, an image model's"):
        audiomae.from_pretrained(path)


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_parameter_order_is_the_official_one(global_pool):
    """The official fine-tuning model adds ``fc_norm`` after timm's ``head`` (and drops ``norm``):
    named_parameters() order, which the layer-decay parameter groups (and the optimizer state an
    official checkpoint saves) follow, must end head, then fc_norm."""
    model = audiomae.VisionTransformer(img_size=(128, 64), embed_dim=32, depth=2, num_heads=4, num_classes=3,
                                       global_pool=global_pool)
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    tail = ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"] if global_pool else \
        ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert names[-4:] == tail
    assert list(model.state_dict())[-4:] == tail


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vit_structured_masking_of_an_empty_batch(backend):
    model = audiomae.VisionTransformer(img_size=(128, 64), embed_dim=32, depth=1, num_heads=4, num_classes=3,
                                       backend=backend).train()
    out = model(torch.zeros(0, 1, 128, 64), mask_t_prob=0.5, mask_f_prob=0.25)
    assert out.shape == (0, 3)
