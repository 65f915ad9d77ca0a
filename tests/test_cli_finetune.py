"""``audiomae finetune``: single- and multi-label classification from our pretraining checkpoints."""
import csv

import pytest
import torch

from audiomae.cli import main
from audiomae.finetune import accuracy, mean_average_precision
from audiomae.training import load_checkpoint

from cli_support import QUIET_RUN, TINY_MODEL, make_demo, pretrained_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    return pretrained_checkpoint(demo, tmp_path_factory.mktemp("pretrain"), max_steps=2)


def finetune(data, init, out, *extra):
    return main(["finetune", str(data), "--init", str(init), "--out", str(out), *QUIET_RUN, "--batch-size", "4",
                 "--epochs", "2", *extra])


def rows(out, name):
    with open(out / "log.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == name]


def test_single_label_from_class_folders(demo, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune(demo, pretrained, out, "--mixup", "0.5", "--val-fraction", "0.2") == 0
    err = capsys.readouterr().err
    assert "5 classes, single-label; 12 training and 3 validation clips" in err
    assert "epoch 1: val_accuracy" in err
    accuracies = rows(out, "val_accuracy")
    assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["config"]["classes"] == sorted(["chirp", "click_train", "harmonic_stack", "noise_burst", "tone"])
    assert checkpoint["model"]["head.weight"].shape == (5, 32)
    # the encoder started from the pretrained one (layer decay keeps early layers close to it)
    start = load_checkpoint(pretrained)["model"]["patch_embed.proj.weight"]
    assert checkpoint["model"]["patch_embed.proj.weight"].shape == start.shape


def test_multi_label_from_a_csv_reports_map(demo, pretrained, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    with open(demo / "labels.csv") as f, open(labels, "w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["path", "labels"])
        for n, row in enumerate(csv.DictReader(f)):
            tonal = "tonal" if row["label"] in ("tone", "chirp", "harmonic_stack") else "noisy"
            writer.writerow([str(demo / row["path"]), f"{row['label']};{tonal}" if n % 2 else row["label"]])
    out = tmp_path / "ft"
    assert finetune(labels, pretrained, out, "--val-fraction", "0.4", "--mask-t-prob", "0.5", "--mask-f-prob", "0.25") == 0
    assert "7 classes, multi-label" in capsys.readouterr().err
    maps = rows(out, "val_mAP")
    assert len(maps) == 2 and all(0.0 < m <= 1.0 for m in maps)


def test_finetune_resumes_exactly(demo, pretrained, tmp_path):
    common = ["--epochs", "2", "--mixup", "0.8", "--val-fraction", "0.2", "--batch-size", "2"]
    assert finetune(demo, pretrained, tmp_path / "a", *common) == 0
    assert finetune(demo, pretrained, tmp_path / "b", *common, "--max-steps", "4") == 0
    assert finetune(demo, pretrained, tmp_path / "b", *common, "--resume") == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pth")["model"] for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_from_mae_ast(demo, tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", str(demo), "--out", str(pre), "--model", "mae_ast_frame", *TINY_MODEL, *QUIET_RUN,
                 "--batch-size", "4", "--max-steps", "1"]) == 0
    assert finetune(demo, pre / "checkpoint.pth", tmp_path / "ft", "--epochs", "1") == 0
    checkpoint = load_checkpoint(tmp_path / "ft" / "checkpoint.pth")
    assert checkpoint["config"]["model"] == "MAEASTClassifier" and "head.weight" in checkpoint["model"]


@pytest.mark.parametrize("saved", ["MAEAST", "MAEASTClassifier"])
def test_finetune_from_mae_ast_safetensors(demo, tmp_path, saved):
    import torch

    from audiomae.mae_ast import MAEAST, MAEASTClassifier

    sizes = dict(tokens="frame", embed_dim=32, num_heads=2, encoder_depth=1, decoder_depth=1)
    model = MAEAST(**sizes) if saved == "MAEAST" else MAEASTClassifier(num_classes=7, **sizes)
    model.save_pretrained(tmp_path / "ast.safetensors")
    assert finetune(demo, tmp_path / "ast.safetensors", tmp_path / "ft", "--epochs", "1", "--target-length", "32",
                    "--lr", "0", "--min-lr", "0") == 0
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoint.pth")["model"]
    backbone = model if saved == "MAEAST" else model.backbone
    for name, value in backbone.state_dict().items():  # lr 0: the backbone's weights as loaded
        torch.testing.assert_close(tuned["backbone." + name], value)


@pytest.mark.parametrize("family", ["audiomae", "mae_ast"])
def test_init_from_a_finetuning_run(demo, pretrained, tmp_path, family):
    # A fine-tuned checkpoint of ours starts another fine-tuning run: its encoder (or backbone) as
    # saved, a new head. --lr 0 keeps the loaded weights.
    start = pretrained
    if family == "mae_ast":
        start = tmp_path / "pre" / "checkpoint.pth"
        assert main(["pretrain", str(demo), "--out", str(start.parent), "--model", "mae_ast_frame", *TINY_MODEL,
                     *QUIET_RUN, "--batch-size", "4", "--max-steps", "1"]) == 0
    assert finetune(demo, start, tmp_path / "ft", "--epochs", "1") == 0
    assert finetune(demo, tmp_path / "ft" / "checkpoint.pth", tmp_path / "ft2", "--epochs", "1", "--lr", "0", "--min-lr", "0") == 0
    first, second = (load_checkpoint(tmp_path / name / "checkpoint.pth") for name in ("ft", "ft2"))
    assert second["config"]["model"] == first["config"]["model"]
    encoder = [k for k in first["model"] if k.startswith(("blocks.", "patch_embed.", "backbone."))]
    assert encoder
    for name in encoder:
        torch.testing.assert_close(second["model"][name], first["model"][name], msg=name)


def test_official_json_list_with_the_class_index_csv(demo, pretrained, tmp_path, capsys):
    # The official AudioSet layout: a JSON list whose labels are mids, and class_labels_indices.csv
    # giving the head's classes in index order, those absent from the data included.
    import json

    with open(demo / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    mids = {name: f"/m/{n:02d}" for n, name in enumerate(names)}
    index = tmp_path / "class_labels_indices.csv"
    order = [*reversed(names), "absent"]  # not sorted: the CSV's order rules
    with open(index, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([n, mids.get(name, "/m/zz"), name] for n, name in enumerate(order))
    data = tmp_path / "train.json"
    data.write_text(json.dumps({"data": [{"wav": str(demo / r["path"]), "labels": mids[r["label"]]} for r in rows]}))
    out = tmp_path / "ft"
    assert finetune(data, pretrained, out, "--epochs", "1", "--multilabel", "--label-csv", str(index)) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["config"]["classes"] == [mids.get(name, "/m/zz") for name in order]
    assert checkpoint["model"]["head.weight"].shape[0] == len(order)
    capsys.readouterr()
    # resumed with the classes in another order: the head's rows would stand for other classes
    with open(index, "w", newline="", encoding="utf-8-sig") as f:  # a byte-order mark and spaces are fine
        f.write("index, mid, display_name\n")
        csv.writer(f).writerows([n, mids.get(name, "/m/zz"), name] for n, name in enumerate(reversed(order)))
    assert finetune(data, pretrained, out, "--epochs", "2", "--multilabel", "--label-csv", str(index), "--resume") == 2
    assert "--resume needs the classes, in the same order" in capsys.readouterr().err
    index.write_text("index,mid,display_name\n0,/m/00,a\n")  # a label of the data is missing
    assert finetune(data, pretrained, tmp_path / "ft2", "--epochs", "1", "--label-csv", str(index)) == 2
    assert "not in --label-csv" in capsys.readouterr().err
    index.write_text("mid,name\n/m/00,a\n")
    assert finetune(data, pretrained, tmp_path / "ft3", "--epochs", "1", "--label-csv", str(index)) == 2
    assert "index,mid" in capsys.readouterr().err


def test_unlabelled_data_is_refused(pretrained, tmp_path, capsys):
    make_demo(tmp_path / "flat", num_per_class=1)
    for clip in (tmp_path / "flat").rglob("*.wav"):
        clip.rename(tmp_path / "flat" / clip.name)
    (tmp_path / "flat" / "labels.csv").unlink()
    assert finetune(tmp_path / "flat", pretrained, tmp_path / "ft") == 2
    assert "finetune needs labels" in capsys.readouterr().err


def test_metrics_match_hand_computed_values():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # class 0 ranks 0.9(+) 0.8(-) 0.3(+) 0.1(-): AP = (1/1 + 2/3) / 2; class 1: 0.7(+) 0.6(+): AP = 1
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert accuracy(scores, targets) == pytest.approx(0.75)  # row 1 wrong
    with_empty_class = torch.cat([targets, torch.zeros(4, 1)], dim=1)
    assert mean_average_precision(torch.cat([scores, torch.rand(4, 1)], 1), with_empty_class) == pytest.approx(
        mean_average_precision(scores, targets))


def test_map_takes_tied_scores_as_one_threshold_as_sklearn_does():
    # Ties are one threshold: each positive in a group counts the precision at the group's end,
    # whatever the rows' order (sklearn's average_precision_score, the official evaluation).
    assert mean_average_precision(torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [0.0]])) == pytest.approx(0.5)
    assert mean_average_precision(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [1.0]])) == pytest.approx(0.5)
    # 0.9(+) then a tie 0.5(+) 0.5(-) 0.5(+) then 0.1(-): (1/1 + 2 * 3/4) / 3
    scores, targets = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1]), torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    want = (1 + 2 * 3 / 4) / 3
    for order in (torch.arange(5), torch.tensor([4, 2, 0, 3, 1]), torch.tensor([3, 1, 2, 4, 0])):
        got = mean_average_precision(scores[order, None], targets[order, None])
        assert got == pytest.approx(want)


def test_init_from_our_safetensors_keeps_its_heads(demo, tmp_path):
    """Heads are not in the weights: our .safetensors carries them in its config, and fine-tuning
    builds the encoder it describes (an unusual head count for the width included)."""
    import audiomae

    model = audiomae.MaskedAutoencoderViT(img_size=(32, 128), embed_dim=48, depth=1, num_heads=4, decoder_embed_dim=16,
                                          decoder_depth=1, decoder_num_heads=2, decoder_mode=0)
    path = tmp_path / "pre.safetensors"
    model.save_pretrained(path)
    out = tmp_path / "ft"
    assert finetune(demo, path, out, "--max-steps", "1") == 0
    config = load_checkpoint(out / "checkpoint.pth")["config"]
    assert config["model_kwargs"]["num_heads"] == 4 and config["model_kwargs"]["embed_dim"] == 48


@pytest.mark.parametrize("content", [b"garbage", b"", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w"])
def test_unreadable_init_is_one_line(demo, tmp_path, capsys, content):
    broken = tmp_path / "broken.safetensors"  # garbage, empty, cut inside its header
    broken.write_bytes(content)
    assert finetune(demo, broken, tmp_path / "ft") == 2
    err = capsys.readouterr().err
    # read as safetensors (its name says so): safetensors says what is wrong, not torch.load
    assert "is not a readable checkpoint (SafetensorError" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", str(demo), "--ckpt", str(broken), "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err
    assert "is not a readable checkpoint (SafetensorError" in err and len(err.strip().splitlines()) == 1


def test_a_given_dataset_sets_the_fine_tuning_clip_length():
    # The official recipes fine-tune AudioSet's 1024-frame encoder on ESC-50's 512 frames: a
    # --dataset given outranks the checkpoint's length when fine-tuning (the table is cut), not
    # when embedding (the model's length is fixed), and --target-length outranks both.
    from argparse import Namespace

    from audiomae.train import feature_settings

    saved = {"target_length": 1024}
    flags = Namespace(dataset="esc50", target_length=None, pad_mode=None)
    assert feature_settings(flags, saved, dataset_sets_length=True)["target_length"] == 512
    assert feature_settings(flags, saved)["target_length"] == 1024
    assert feature_settings(Namespace(dataset="esc50", target_length=256, pad_mode=None), saved,
                            dataset_sets_length=True)["target_length"] == 256
    assert feature_settings(Namespace(dataset=None, target_length=None, pad_mode=None), saved,
                            dataset_sets_length=True) == {"dataset": "audioset", "target_length": 1024,
                                                          "pad_mode": "official"}
    # The checkpoint's own dataset keeps its (custom) length; a table is never extended.
    own = {"dataset": "esc50", "target_length": 300}
    assert feature_settings(flags, own, dataset_sets_length=True)["target_length"] == 300
    short = {"target_length": 128}
    assert feature_settings(flags, short, dataset_sets_length=True)["target_length"] == 128


def test_lr_zero_keeps_the_weights_without_a_min_lr(demo, pretrained, tmp_path, capsys):
    # The default --min-lr is lowered to the learning rate; only one given above it is refused.
    assert finetune(demo, pretrained, tmp_path / "ft", "--epochs", "1", "--lr", "0", "--max-steps", "1") == 0
    assert finetune(demo, pretrained, tmp_path / "ft2", "--epochs", "1", "--lr", "0", "--min-lr", "1e-6") == 2
    assert "--min-lr 1e-06 is above the learning rate 0" in capsys.readouterr().err


def test_a_validation_split_without_labels_is_refused_before_training(demo, pretrained, tmp_path, capsys):
    # Its mAP is undefined: this used to end the run with an error after the first epoch's training.
    import shutil

    val = tmp_path / "val"
    val.mkdir()
    for clip in sorted(demo.rglob("*.wav"))[:2]:
        shutil.copy(clip, val / clip.name)  # top-level files of a folder: no class, no label
    assert finetune(demo, pretrained, tmp_path / "ft", "--epochs", "1", "--multilabel", "--val", str(val)) == 2
    assert "none of the 2 validation clip(s) has a label" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "checkpoint.pth").exists()
