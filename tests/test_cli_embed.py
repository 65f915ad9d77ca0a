"""``audiomae embed``: clip embeddings with their file list, in .npy or .safetensors."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from audiomae.cli import main
from audiomae.data import FrontEnd, list_audio, load_clip
from audiomae.embed import embed_batch, load_encoder

from cli_support import QUIET_RUN, TINY_MODEL, make_demo, pretrained_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), num_per_class=2)


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    return pretrained_checkpoint(demo, tmp_path_factory.mktemp("pretrain"), max_steps=1)


def embed(data, ckpt, out, *extra):
    return main(["embed", str(data), "--ckpt", str(ckpt), "--out", str(out), "--num-workers", "0",
                 "--batch-size", "3", *extra])


def test_npy_with_file_list(demo, pretrained, tmp_path):
    assert embed(demo, pretrained, tmp_path / "emb.npy") == 0
    embeddings = np.load(tmp_path / "emb.npy")
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert embeddings.shape == (10, 32) and np.isfinite(embeddings).all()
    assert files == [item.path for item in list_audio(demo)]
    # each row is the clip's own embedding, whatever batch it was in
    model, features = load_encoder(pretrained, "sdpa")
    front_end = FrontEnd(**features)
    wave = load_clip(files[4])[: front_end.num_samples]
    padded = torch.zeros(1, front_end.num_samples)
    padded[0, : wave.shape[0]] = wave
    with torch.no_grad():
        alone = embed_batch(model.eval(), front_end(padded, torch.tensor([wave.shape[0]])), None)
    np.testing.assert_allclose(embeddings[4], alone[0].numpy(), rtol=1e-4, atol=1e-5)


def test_safetensors_with_layer_and_metadata(demo, pretrained, tmp_path):
    assert embed(demo, pretrained, tmp_path / "emb.safetensors", "--layer", "1") == 0
    with safe_open(str(tmp_path / "emb.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        layer1 = f.get_tensor("embeddings")
    assert layer1.shape == (10, 32) and len(json.loads(metadata["files"])) == 10 and metadata["layer"] == "1"
    assert embed(demo, pretrained, tmp_path / "final.npy") == 0
    assert not np.allclose(layer1.numpy(), np.load(tmp_path / "final.npy"))


def test_layer_hook_matches_a_manual_pass(pretrained):
    model, _ = load_encoder(pretrained, "reference")
    spec = torch.randn(2, 32, 128)
    x = model.patch_embed(spec.unsqueeze(1)) + model.pos_embed[:, 1:, :]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1, :]).expand(2, -1, -1), x], dim=1)
    x = model.blocks[0](x)
    with torch.no_grad():
        torch.testing.assert_close(embed_batch(model, spec, 1), x[:, 1:].mean(1).detach())


def test_embed_skips_unreadable_and_mae_ast(demo, tmp_path, capsys):
    (demo / "tone" / "broken.wav").write_bytes(b"nothing")
    try:
        pre = tmp_path / "pre"
        assert main(["pretrain", str(demo), "--out", str(pre), "--model", "mae_ast_patch", *TINY_MODEL, *QUIET_RUN,
                     "--batch-size", "4", "--max-steps", "1"]) == 0
        assert embed(demo, pre / "checkpoint.pth", tmp_path / "e.npy", "--layer", "2") == 0
    finally:
        (demo / "tone" / "broken.wav").unlink()
    assert np.load(tmp_path / "e.npy").shape == (10, 32)
    assert "skipping 1 of 11 file(s)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--layer", "3"], "--layer must be in [1, 2]"),
    (["--target-length", "48"], "takes 32 frames"),
])
def test_bad_options(demo, pretrained, tmp_path, capsys, extra, message):
    assert embed(demo, pretrained, tmp_path / "e.npy", *extra) == 2
    assert message in capsys.readouterr().err


def test_bad_output_name(demo, pretrained, tmp_path, capsys):
    assert embed(demo, pretrained, tmp_path / "e.csv") == 2
    assert ".npy or .safetensors" in capsys.readouterr().err


def test_unusable_output_paths_are_refused_before_the_work(demo, pretrained, tmp_path, capsys):
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "folder.npy", "is a folder"), (tmp_path / "afile" / "e.npy", "cannot write in")):
        assert embed(demo, pretrained, out) == 2
        err = capsys.readouterr().err
        assert message in err and "wrote" not in err


def test_mae_ast_safetensors_embeds(demo, tmp_path):
    from audiomae.mae_ast import MAEASTClassifier

    ckpt = tmp_path / "ast.safetensors"
    MAEASTClassifier(num_classes=3, embed_dim=32, num_heads=2, encoder_depth=1, decoder_depth=1).save_pretrained(ckpt)
    assert embed(demo, ckpt, tmp_path / "e.npy", "--target-length", "32") == 0
    assert np.load(tmp_path / "e.npy").shape == (10, 32)


def test_from_pretrained_reads_a_training_run_checkpoint(pretrained):
    """The run's checkpoint records its model's name and keywords: from_pretrained builds that model
    (sizes, heads and loss settings included), not one guessed from the weights."""
    import audiomae

    state = torch.load(pretrained, weights_only=False)
    model = audiomae.from_pretrained(pretrained)
    assert model.norm_pix_loss == state["config"]["model_kwargs"]["norm_pix_loss"] is True
    assert model.blocks[0].attn.num_heads == 2 and model.decoder_mode == 0
    torch.testing.assert_close(model.state_dict(), state["model"])


def test_official_checkpoint_embeds_and_finetunes(demo, tmp_path):
    import argparse

    import audiomae

    model = audiomae.mae_vit_small_patch16(depth=1, decoder_depth=1, decoder_embed_dim=64, img_size=(32, 128))
    args = argparse.Namespace(model="mae_vit_small_patch16", target_length=32)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, tmp_path / "official.pth")
    assert embed(demo, tmp_path / "official.pth", tmp_path / "e.npy") == 0
    assert np.load(tmp_path / "e.npy").shape == (10, 384)
    assert main(["finetune", str(demo), "--init", str(tmp_path / "official.pth"), "--out", str(tmp_path / "ft"),
                 *QUIET_RUN, "--batch-size", "4", "--epochs", "1", "--max-steps", "1"]) == 0


def test_official_checkpoint_normalises_with_its_dataset(tmp_path):
    import argparse

    import audiomae

    # An official fine-tuned checkpoint names its dataset: ESC-50's statistics, not AudioSet's.
    vit = audiomae.vit_small_patch16(depth=1, img_size=(32, 128), num_classes=5)
    args = argparse.Namespace(model="vit_small_patch16", dataset="esc50")
    torch.save({"model": vit.state_dict(), "args": args}, tmp_path / "ft.pth")
    model, features = load_encoder(tmp_path / "ft.pth", "reference")
    assert features == {"dataset": "esc50", "target_length": 32}
    args.dataset = "k400"  # not an audio dataset we normalise for: the defaults decide
    torch.save({"model": vit.state_dict(), "args": args}, tmp_path / "other.pth")
    assert load_encoder(tmp_path / "other.pth", "reference")[1] == {"target_length": 32}


def test_patch14_checkpoints_embed_the_bins_their_patches_tile(tmp_path):
    import argparse

    import audiomae

    vit = audiomae.vit_huge_patch14(img_size=(28, 126), embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.save({"model": vit.state_dict(), "args": argparse.Namespace(model="vit_huge_patch14")}, tmp_path / "h.pth")
    model, features = load_encoder(tmp_path / "h.pth", "reference")  # heads from the name: 16
    assert model.patch_embed.img_size == (28, 126) and features == {"target_length": 28}
    model.eval()
    spec = torch.randn(2, 28, 128)  # the front end's 128 bins: the last two dropped, as a strided conv would
    with torch.no_grad():
        torch.testing.assert_close(embed_batch(model, spec, None), model.forward_features(spec[..., :126].unsqueeze(1)))
