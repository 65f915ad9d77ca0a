"""``audiomae pretrain``: a few steps of each model, exact resume, the schedule, and bad data."""
import csv
import math

import numpy as np
import pytest
import torch

import audiomae.data
from audiomae.cli import main
from audiomae.training import load_checkpoint, param_groups, scheduled_lr

from cli_support import QUIET_RUN, TINY_MODEL, make_demo, pretrain

soundfile = pytest.importorskip("soundfile")  # the GPU machine may lack it: skip, not a collection error


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"))


def log_rows(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_pretrain_audiomae_writes_checkpoint_and_logs(demo, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(demo, out, "--epochs", "1", "--max-steps", "2") == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["position"] == {"step": 2, "epoch": 0, "batch": 2}
    assert checkpoint["config"]["model"] == "mae_vit_base_patch16"
    assert checkpoint["config"]["model_kwargs"]["img_size"] == [32, 128]
    losses = [float(r["value"]) for r in log_rows(out) if r["name"] == "loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert {r["name"] for r in log_rows(out)} == {"loss", "lr", "samples_per_s"}
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    err = capsys.readouterr().err
    assert "samples_s=" in err and "loss=" in err


@pytest.mark.parametrize("model, extra", [
    ("mae_ast_patch", ["--precision", "bf16"]),
    ("mae_ast_frame", ["--model-kwargs", '{"masking": "chunk", "mode": "ssast"}']),
])
def test_pretrain_mae_ast(demo, tmp_path, model, extra):
    out = tmp_path / model
    args = ["pretrain", str(demo), "--out", str(out), "--model", model, *TINY_MODEL, *QUIET_RUN,
            "--batch-size", "4", "--max-steps", "2", *extra]
    assert main(args) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["config"]["model_kwargs"]["encoder_depth"] == 2
    assert checkpoint["position"]["step"] == 2


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(demo, tmp_path):
    # 15 clips, batch 2: 7 batches per epoch, 6 used with 2-step accumulation, 3 optimiser steps per
    # epoch. The stop at step 4 lands mid-epoch (epoch 1, batch 2), mid-schedule (warm-up 1 epoch).
    common = ["--epochs", "3", "--batch-size", "2", "--accum-iter", "2", "--num-workers", "2"]
    assert pretrain(demo, tmp_path / "straight", *common) == 0
    assert pretrain(demo, tmp_path / "stopped", *common, "--max-steps", "4", "--save-every", "3") == 0
    stopped = load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")
    assert stopped["position"] == {"step": 4, "epoch": 1, "batch": 2}
    assert pretrain(demo, tmp_path / "stopped", *common, "--resume") == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    resumed = load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")
    assert resumed["position"] == straight["position"] == {"step": 9, "epoch": 3, "batch": 0}
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for state_a, state_b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    steps = [int(r["step"]) for r in log_rows(tmp_path / "stopped") if r["name"] == "loss"]
    assert steps == list(range(1, 10))  # the resumed run appends to the log


def test_resume_drops_log_rows_past_its_checkpoint(demo, tmp_path):
    # A run killed after logging steps its last checkpoint does not hold: the resumed run logs
    # those steps again, once.
    out = tmp_path / "run"
    common = ["--epochs", "2", "--batch-size", "2"]
    assert pretrain(demo, out, *common, "--max-steps", "3") == 0
    with open(out / "log.csv", "a", newline="") as f:  # what the killed run had written after step 3
        csv.writer(f).writerows([["0.0", "4", "loss", "1234"], ["0.0", "5", "loss", "1234"]])
    with open(out / "log.csv", "ab") as f:  # and a row the kill cut short, with a byte it garbled
        f.write(b"1795769999.1,\xff")
    assert pretrain(demo, out, *common, "--resume") == 0
    assert all(len(r) == 4 and None not in r.values() for r in log_rows(out))
    rows = [r for r in log_rows(out) if r["name"] == "loss"]
    assert [int(r["step"]) for r in rows] == list(range(1, 15))
    assert all(r["value"] != "1234" for r in rows)


def test_resume_refuses_a_different_run(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "run", "--max-steps", "1") == 0
    assert pretrain(demo, tmp_path / "run", "--batch-size", "2", "--resume") == 2
    assert "--resume needs the same" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(demo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert pretrain(demo, out, "--max-steps", "1") == 0
    good = (out / "checkpoint.pth").read_bytes()

    def dies_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pretrain(demo, out, "--max-steps", "2", "--resume")
    assert (out / "checkpoint.pth").read_bytes() == good
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["checkpoint.pth", "log.csv"]  # no temp left


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: p, "holds no audio files"),
    (lambda p: (p / "junk.wav").write_bytes(b"x" * 100) and p, "none of the 1 audio file"),
])
def test_data_without_audio_fails_clearly(tmp_path, capsys, setup, message):
    data = setup(tmp_path)
    assert pretrain(data, tmp_path / "out", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert "audiomae pretrain: error:" in err and message in err and "Traceback" not in err


def test_unreadable_and_empty_files_are_skipped_and_counted(demo, tmp_path, capsys):
    data = make_demo(tmp_path / "data", num_per_class=1)
    (data / "tone" / "junk.wav").write_bytes(b"RIFF but no audio")
    soundfile.write(data / "tone" / "empty.wav", np.zeros(0), 16000)
    assert pretrain(data, tmp_path / "out", "--batch-size", "2", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert "skipping 2 of 7 file(s)" in err and "junk.wav: unreadable" in err and "empty.wav: empty" in err


def test_clip_failing_mid_epoch_is_skipped_not_fatal(demo, tmp_path, capsys, monkeypatch):
    real_load = audiomae.data.load_clip

    def flaky(path, *args):
        if path.endswith("chirp_000.wav"):
            raise OSError("disk went away")
        return real_load(path, *args)

    monkeypatch.setattr(audiomae.data, "load_clip", flaky)
    # batch size 1: the failing clip's batch is empty, and a zero-weight stand-in keeps the step.
    assert pretrain(demo, tmp_path / "out", "--batch-size", "1", "--epochs", "1") == 0
    err = capsys.readouterr().err
    assert "chirp_000.wav: OSError: disk went away" in err
    assert "skipped 1 clip(s) that could not be decoded" in err
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["position"]["step"] == 15


def test_too_few_clips_for_a_step(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "out", "--batch-size", "8", "--accum-iter", "2", "--max-steps", "1") == 2
    assert "lower --batch-size or --accum-iter" in capsys.readouterr().err


def test_options_that_cannot_run_fail_clearly(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "out", "--precision", "fp16") == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_schedule_warms_up_then_follows_half_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert scheduled_lr(0, **kw) == 0 and scheduled_lr(1, **kw) == 0.5 and scheduled_lr(2, **kw) == 1.0
    assert scheduled_lr(6, **kw) == pytest.approx(0.55)
    assert scheduled_lr(10, **kw) == pytest.approx(0.1)
    values = [scheduled_lr(e / 4, **kw) for e in range(41)]
    assert values.index(max(values)) == 8 and all(a >= b for a, b in zip(values[8:], values[9:]))


def test_schedule_reads_the_epoch_fraction_as_the_official_engines_do(demo, tmp_path):
    # 15 clips, batch 2: 7 batches an epoch, accumulation 2. The official engines set the lr at an
    # update's first micro-batch b to the schedule at epoch + b / len(loader), b = 0, 2, 4; not at
    # step / steps_per_epoch (0, 1/3, 2/3), which runs ahead when accumulation does not divide 7.
    out = tmp_path / "run"
    assert pretrain(demo, out, "--epochs", "2", "--batch-size", "2", "--accum-iter", "2", "--lr", "0.001",
                    "--min-lr", "0", "--warmup-epochs", "1") == 0
    kw = dict(lr=0.001, min_lr=0.0, warmup_epochs=1, epochs=2)
    want = [scheduled_lr(epoch + b / 7, **kw) for epoch in range(2) for b in (0, 2, 4)]
    got = [float(r["value"]) for r in log_rows(out) if r["name"] == "lr"]
    assert got == pytest.approx(want, rel=1e-5)


def test_weight_decay_as_each_official_script():
    import audiomae

    model = audiomae.mae_vit_base_patch16(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                          decoder_num_heads=2, img_size=(32, 128))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    # pretraining: timm's add_weight_decay without a skip list spares 1-D parameters only
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= spared and {"cls_token", "mask_token"} <= decayed
    assert "pos_embed" not in decayed | spared  # frozen
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert decayed | spared == {n for n, p in model.named_parameters() if p.requires_grad}
    # fine-tuning: param_groups_lrd also spares the model's no_weight_decay() names
    vit = audiomae.vit_base_patch16(embed_dim=32, depth=2, num_heads=2, img_size=(32, 128), num_classes=4)
    names = {id(p): n for n, p in vit.named_parameters()}
    groups = param_groups(vit, 0.05, layer_decay=0.75, no_decay_names=vit.no_weight_decay())
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "cls_token" in spared and "head.weight" not in spared and "blocks.0.attn.qkv.weight" not in spared


def test_layer_decay_scales_by_depth():
    import audiomae

    model = audiomae.vit_base_patch16(embed_dim=32, depth=3, num_heads=2, img_size=(32, 128), num_classes=4)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for p in g["params"]}
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == 0.5 and scale["blocks.0.mlp.fc1.weight"] == 0.125
    assert scale["patch_embed.proj.weight"] == 0.0625 and scale["cls_token"] == 0.0625


def test_resume_refuses_a_different_model(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "run", "--max-steps", "1") == 0
    assert pretrain(demo, tmp_path / "run", "--max-steps", "2", "--resume", "--embed-dim", "64") == 2
    assert "--resume needs the model of the run it continues" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--max-steps", "0"), ("--epochs", "0"), ("--log-every", "0"),
                                        ("--save-every", "-1"), ("--target-length", "0"), ("--batch-size", "0"),
                                        ("--model-kwargs", "[1]"), ("--embed-dim", "-4"),
                                        ("--clip-grad", "-1"), ("--clip-grad", "0"), ("--weight-decay", "-1"),
                                        ("--blr", "-1e-3"), ("--warmup-epochs", "-1"), ("--mask-ratio", "1.5"),
                                        ("--mask-ratio", "1")])
def test_numbers_out_of_range_are_usage_errors(demo, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        pretrain(demo, tmp_path / "out", flag, value)
    assert stop.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_decoder_sizes_without_effect_are_refused(demo, tmp_path, capsys):
    """Decoder mode 1 is the official 16 Swin blocks of 16 heads whatever the sizes say: flags that
    would change nothing are an error, not a run whose config claims them."""
    assert pretrain(demo, tmp_path / "out", "--max-steps", "1", "--decoder-mode", "1") == 2
    err = capsys.readouterr().err
    assert "--decoder-depth and --decoder-num-heads have no effect with --decoder-mode 1" in err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_a_diverged_run_keeps_its_last_good_checkpoint(demo, tmp_path, capsys):
    """Saves check the losses since the last log, so NaN weights never replace a good checkpoint."""
    out = tmp_path / "run"
    assert pretrain(demo, out, "--max-steps", "1", "--save-every", "1") == 0
    good = load_checkpoint(out / "checkpoint.pth")
    code = pretrain(demo, out, "--max-steps", "6", "--save-every", "1", "--log-every", "100", "--resume",
                    "--lr", "1e12", "--warmup-epochs", "0")
    assert code == 1 and "not finite" in capsys.readouterr().err
    kept = load_checkpoint(out / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert kept["position"]["step"] >= good["position"]["step"]


def test_a_finite_loss_with_nan_gradients_is_not_saved(demo, tmp_path, capsys, monkeypatch):
    """The loss of a step comes before its update: a finite loss whose gradient is NaN (0 * inf) would
    write NaN weights, so saves check the weights too."""
    from audiomae.mae import MaskedAutoencoderViT

    out = tmp_path / "run"
    assert pretrain(demo, out, "--max-steps", "1", "--save-every", "1") == 0
    forward = MaskedAutoencoderViT.forward

    def nan_gradient(self, imgs, *args, **kwargs):
        loss, *rest = forward(self, imgs, *args, **kwargs)
        zero = 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return (loss + torch.sqrt(zero), *rest)  # adds 0; d sqrt / dx at 0 is inf, times 0: NaN

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", nan_gradient)
    assert pretrain(demo, out, "--max-steps", "3", "--save-every", "1", "--log-every", "100", "--resume") == 1
    assert "not finite by step 2" in capsys.readouterr().err
    kept = load_checkpoint(out / "checkpoint.pth")
    assert kept["position"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_resume_refuses_an_optimizer_grouped_otherwise(demo, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(demo, out, "--max-steps", "1") == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    groups = checkpoint["optimizer_groups"]
    groups[0], groups[1] = groups[1], groups[0]  # as if written with another weight-decay rule
    torch.save(checkpoint, out / "checkpoint.pth")
    capsys.readouterr()
    assert pretrain(demo, out, "--max-steps", "2", "--resume") == 2
    assert "groups its parameters otherwise" in capsys.readouterr().err


def test_out_that_is_a_file_is_one_line(demo, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert pretrain(demo, tmp_path / "taken", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "taken" in err and "Traceback" not in err


def test_resume_from_an_official_checkpoint_is_one_line(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "run", "--max-steps", "1") == 0
    ours = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    official = tmp_path / "official.pth"
    torch.save({"model": ours["model"], "epoch": 3, "args": None}, official)
    capsys.readouterr()
    assert pretrain(demo, tmp_path / "again", "--max-steps", "1", "--resume", str(official)) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint of an audiomae run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device", ["meta", "mps", "bogus", "cuda:7"])
def test_devices_the_commands_cannot_run_on_are_one_line(demo, tmp_path, capsys, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert pretrain(demo, tmp_path / "out", "--max-steps", "1", "--device", device) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_model_keywords_and_checkpoints_are_one_line(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "out", "--max-steps", "1", "--model-kwargs", '{"bogus": 1}') == 2
    assert "bogus" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert pretrain(demo, tmp_path / "run", "--max-steps", "1", "--resume", str(broken)) == 2
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err and len(err.strip().splitlines()) == 1
    assert main(["demo-data", str(broken)]) == 2  # a file where a folder should go
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", ['{"norm_layer": 1}', '{"patch_size": 0}', '{"mlp_ratio": -1}',
                                    '{"mlp_ratio": "x"}', '{"depth": 0}', '{"patch_size": 2.5}'])
def test_model_keywords_the_model_cannot_take_are_one_line(demo, tmp_path, capsys, kwargs):
    # These gave tracebacks from inside the constructor, or (depth 0) trained an encoder of no blocks.
    assert pretrain(demo, tmp_path / "out", "--max-steps", "1", "--model-kwargs", kwargs) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("--model-kwargs" in err or "cannot build" in err) and next(iter(eval(kwargs))) in err


def test_seed_and_out_errors_name_their_flag(demo, tmp_path, capsys):
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit) as stop:
            pretrain(demo, tmp_path / "out", "--seed", seed)
        assert stop.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo-data", str(tmp_path / "d"), "--seed", "-5"])
    assert "--seed" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("x")
    assert pretrain(demo, tmp_path / "labels.csv", "--max-steps", "1") == 2
    assert "--out" in capsys.readouterr().err


def test_resume_refuses_other_features_and_says_when_nothing_is_left(demo, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(demo, out, "--max-steps", "2") == 0
    capsys.readouterr()
    # Another normalisation mid-run was taken silently.
    assert pretrain(demo, out, "--max-steps", "3", "--resume", "--dataset", "esc50") == 2
    assert "--resume needs the same --dataset, --target-length and --pad-mode" in capsys.readouterr().err
    assert pretrain(demo, out, "--max-steps", "2", "--resume") == 0
    assert "nothing to train: the checkpoint is at step 2, --max-steps is 2" in capsys.readouterr().err


def test_a_cosine_that_would_climb_is_refused(demo, tmp_path, capsys):
    assert pretrain(demo, tmp_path / "out", "--max-steps", "1", "--lr", "1e-4", "--min-lr", "1e-3") == 2
    assert "--min-lr 0.001 is above the learning rate 0.0001" in capsys.readouterr().err
    assert pretrain(demo, tmp_path / "out2", "--max-steps", "1", "--epochs", "2", "--warmup-epochs", "3") == 0
    assert "--warmup-epochs 3 outlasts --epochs 2" in capsys.readouterr().err
