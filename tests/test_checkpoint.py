import argparse
from functools import partial

import pytest
import torch
import torch.nn as nn

import audiomae
from audiomae.checkpoint import CheckpointMismatchError, infer_config, read_checkpoint

LN = partial(nn.LayerNorm, eps=1e-6)


def small_mae(decoder_mode=1, **kw):
    return audiomae.MaskedAutoencoderViT(img_size=(128, 128), patch_size=16, in_chans=1, embed_dim=64, depth=2,
                                         num_heads=4, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=16,
                                         mlp_ratio=4.0, norm_layer=LN, decoder_mode=decoder_mode, **kw)


def write_official_pth(path, net, **args):
    """An official-format checkpoint: model, optimizer state, epoch, scaler and an argparse Namespace."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(1, 1, *net.patch_embed.img_size))[0].backward()
    optimizer.step()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(**args)}, path)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("decoder_mode", [0, 1])
def test_official_pth_round_trip(tmp_path, decoder_mode):
    model = small_mae(decoder_mode, norm_pix_loss=True)
    path = tmp_path / "checkpoint-3.pth"
    write_official_pth(path, model, model="mae_vit_small_patch16", norm_pix_loss=True, mask_2d=False,
                       target_length=128, decoder_mode=decoder_mode)
    loaded = audiomae.from_pretrained(path, num_heads=4)
    assert isinstance(loaded, audiomae.MaskedAutoencoderViT)
    assert loaded.decoder_mode == decoder_mode and loaded.norm_pix_loss
    assert_same_weights(model, loaded)
    for backend in audiomae.available_backends():
        if backend == "triton" and decoder_mode == 1:
            continue  # the Swin decoder's kernels, a minute in the interpreter: test_model.py's backend agreement runs them
        loaded.set_backend(backend)
        loss = loaded(torch.randn(2, 1, 128, 128), noise=torch.rand(2, 64))[0]
        loss.backward()
        assert torch.isfinite(loss), backend


def test_keys_tell_pretraining_modes_and_finetuning():
    state = small_mae(1).state_dict()
    cls, config = infer_config(state, {"target_length": 128})
    assert cls is audiomae.MaskedAutoencoderViT and config["decoder_mode"] == 1 and config["img_size"] == (128, 128)
    cls, config = infer_config(small_mae(0).state_dict(), {})
    assert config["decoder_mode"] == 0 and config["decoder_depth"] == 2 and config["img_size"] == (128, 128)
    vit = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=7)
    cls, config = infer_config(vit.state_dict(), {})
    assert cls is audiomae.VisionTransformer and config["num_classes"] == 7 and config["global_pool"]


def test_mode1_file_into_mode0_model_lists_keys(tmp_path):
    path = tmp_path / "mode1.pth"
    torch.save({"model": small_mae(1).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        audiomae.from_pretrained(path, num_heads=4, decoder_mode=0, decoder_depth=2)
    message = str(err.value)
    assert "unexpected" in message and "decoder_blocks.0.attn.tau" in message
    assert "mis-shaped" not in message or "decoder_blocks" in message


def test_misshaped_and_missing_keys_are_listed(tmp_path):
    state = small_mae(0).state_dict()
    state["decoder_pred.weight"] = torch.zeros(3, 3)
    del state["norm.bias"]
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        audiomae.from_pretrained(path, num_heads=4)
    assert "missing (1): norm.bias" in str(err.value)
    assert "decoder_pred.weight: checkpoint [3, 3] vs model [256, 256]" in str(err.value)


def test_safetensors_round_trip_keeps_config(tmp_path):
    model = small_mae(1, no_shift=True, mask_2d=True, mask_t_prob=0.25)
    path = model.save_pretrained(tmp_path / "m.safetensors")
    loaded = audiomae.from_pretrained(path)
    assert loaded.no_shift and loaded.mask_2d and loaded.mask_t_prob == 0.25
    assert loaded.blocks[0].attn.num_heads == 4
    assert_same_weights(model, loaded)
    vit = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=3,
                                     global_pool=False)
    loaded_vit = audiomae.from_pretrained(vit.save_pretrained(tmp_path / "v.safetensors"))
    assert not loaded_vit.global_pool and loaded_vit.num_classes == 3
    assert_same_weights(vit, loaded_vit)


@pytest.mark.parametrize("name", ["model", "model.pt", "weights.bin"])
def test_save_pretrained_reads_back_whatever_the_name(tmp_path, name):
    # The format is read from the file's content, not its suffix; a .pth under a .safetensors-free
    # name still loads as a .pth.
    model = small_mae(0)
    loaded = audiomae.from_pretrained(model.save_pretrained(tmp_path / name))
    assert_same_weights(model, loaded)
    torch.save({"model": model.state_dict()}, tmp_path / "official.bin")
    assert_same_weights(model, audiomae.from_pretrained(tmp_path / "official.bin", num_heads=4))


def test_ddp_prefix_and_bare_state_dict(tmp_path):
    model = small_mae(0)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    assert_same_weights(model, audiomae.from_pretrained(path, num_heads=4))


def test_encoder_from_pretraining_checkpoint(tmp_path):
    model = small_mae(1)
    path = tmp_path / "pre.pth"
    torch.save({"model": model.state_dict()}, path)
    vit = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=3)
    audiomae.load_pretrained_encoder(vit, path)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    wrong = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=3, num_heads=4, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match="blocks.2"):
        audiomae.load_pretrained_encoder(wrong, path)


class Custom:
    pass


def test_pickle_beyond_namespace_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Custom()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nothing.pth")


def test_mae_ast_save_and_load(tmp_path):
    model = audiomae.mae_ast_frame(embed_dim=64, num_heads=4, encoder_depth=2, decoder_depth=1, masking="chunk")
    loaded = audiomae.from_pretrained(model.save_pretrained(tmp_path / "ast.safetensors"))
    assert isinstance(loaded, audiomae.MAEAST) and loaded.masking == "chunk" and loaded.tokens == "frame"
    assert_same_weights(model, loaded)
    classifier = audiomae.MAEASTClassifier(model, num_classes=4)
    loaded = audiomae.from_pretrained(classifier.save_pretrained(tmp_path / "cls.safetensors"))
    assert isinstance(loaded, audiomae.MAEASTClassifier) and loaded.num_classes == 4
    assert_same_weights(classifier, loaded)


def test_wrappers_and_compiled_prefixes_load(tmp_path):
    model = small_mae(0)
    state = model.state_dict()
    # {"state_dict": ...} (Lightning and many scripts), torch.compile's _orig_mod. under DDP's module.
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert_same_weights(model, audiomae.from_pretrained(tmp_path / "wrapped.pth", num_heads=4))
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "compiled.pth")
    assert_same_weights(model, audiomae.from_pretrained(tmp_path / "compiled.pth", num_heads=4))


def test_official_args_saved_as_a_dict_are_read(tmp_path):
    # An official checkpoint re-saved for weights-only loading keeps args as a plain dict: its
    # decoder mode 2 (mode 0's keys) and loss settings were silently dropped.
    model = small_mae(2, norm_pix_loss=True)
    torch.save({"model": model.state_dict(), "args": {"decoder_mode": 2, "norm_pix_loss": True}}, tmp_path / "d.pth")
    loaded = audiomae.from_pretrained(tmp_path / "d.pth", num_heads=4)
    assert loaded.decoder_mode == 2 and loaded.norm_pix_loss


def test_patch14_official_checkpoint_infers_the_bins_its_patches_tile(tmp_path):
    vit = audiomae.vit_huge_patch14(img_size=(112, 126), embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.save({"model": vit.state_dict(), "args": argparse.Namespace(model="vit_huge_patch14")}, tmp_path / "h.pth")
    loaded = audiomae.from_pretrained(tmp_path / "h.pth", num_heads=2)
    assert loaded.patch_embed.img_size == (112, 126)
    assert_same_weights(vit, loaded)


def test_save_pretrained_keeps_qkv_bias_and_dropout_rates(tmp_path):
    vit = audiomae.vit_small_patch16(img_size=(128, 128), depth=3, qkv_bias=False, drop_rate=0.1,
                                     attn_drop_rate=0.2, drop_path_rate=0.3, num_classes=4)
    loaded = audiomae.from_pretrained(vit.save_pretrained(tmp_path / "nobias.safetensors"))
    assert loaded.blocks[0].attn.qkv.bias is None
    assert loaded.pos_drop.p == 0.1 and loaded.blocks[0].attn.attn_drop.p == 0.2
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in loaded.blocks] == pytest.approx([0.0, 0.15, 0.3])


def test_encoder_loading_refuses_keys_the_model_lacks(tmp_path):
    # Only the decoder, the mask token, final norms and a head are the model's to drop: a deeper
    # checkpoint's blocks or a layer scale were silently thrown away.
    model = small_mae(1)
    path = tmp_path / "pre.pth"
    torch.save({"model": model.state_dict()}, path)
    shallow = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=1, num_heads=4, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(\d+\): blocks\.1\."):
        audiomae.load_pretrained_encoder(shallow, path)
    state = {**model.state_dict(), "blocks.0.ls1.gamma": torch.ones(64)}
    torch.save({"model": state}, path)
    vit = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match="blocks.0.ls1.gamma"):
        audiomae.load_pretrained_encoder(vit, path)
    # A cls-pooled model keeps the checkpoint's norm; a head-less one drops a fine-tuned head.
    finetuned = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=5,
                                           global_pool=False)
    torch.save({"model": finetuned.state_dict()}, path)
    headless = audiomae.VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4, num_classes=0,
                                          global_pool=False)
    audiomae.load_pretrained_encoder(headless, path)
    assert torch.equal(headless.norm.weight, finetuned.norm.weight)
