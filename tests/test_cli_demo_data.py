"""``audiomae demo-data`` and the audio listing and decoding every command relies on."""
import csv
import json

import numpy as np
import pytest
import torch

from audiomae.cli import main
from audiomae.data import (SAMPLE_RATE, ClipDataset, Collate, EpochBatchSampler, NoAudioError, list_audio, load_clip,
                           scan_readable)
from audiomae.demo_data import CLASSES, synthesize

soundfile = pytest.importorskip("soundfile")  # the GPU machine may lack it: skip, not a collection error


def test_demo_data_writes_labelled_classes(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--num-per-class", "2", "--seconds", "0.25",
                 "--sample-rate", "22050", "--seed", "3"]) == 0
    assert "10 clips in 5 classes" in capsys.readouterr().out
    with open(tmp_path / "d" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["label"] for r in rows}) == sorted(CLASSES) and len(rows) == 10
    for row in rows:
        samples, rate = soundfile.read(tmp_path / "d" / row["path"])
        assert rate == 22050 and samples.shape == (round(0.25 * 22050),)
        assert row["path"].split("/")[0] == row["label"]
        assert np.abs(samples).max() > 0.01  # not silent
    items = list_audio(tmp_path / "d")
    assert sorted({i.labels for i in items}) == sorted((c,) for c in CLASSES)


def test_demo_data_is_seeded(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        main(["demo-data", str(tmp_path / name), "--num-per-class", "1", "--seconds", "0.1", "--seed", str(seed)])
    same = soundfile.read(tmp_path / "a/chirp/chirp_000.wav")[0], soundfile.read(tmp_path / "b/chirp/chirp_000.wav")[0]
    other = soundfile.read(tmp_path / "c/chirp/chirp_000.wav")[0]
    assert np.array_equal(*same) and not np.array_equal(same[0], other)


def test_demo_data_rejects_bad_sizes(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--num-per-class", "0"]) == 2
    assert "num_per_class" in capsys.readouterr().err


@pytest.mark.parametrize("kind", CLASSES)
def test_synthesize_stays_in_range(kind):
    clip = synthesize(kind, 0.3, 8000, np.random.default_rng(0))
    assert clip.dtype == np.float32 and clip.shape == (2400,) and np.abs(clip).max() <= 1.0
    assert np.isfinite(clip).all()


def test_load_clip_resamples_and_averages_channels(tmp_path):
    rate = 8000
    t = np.arange(rate // 2) / rate
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.ones_like(t)
    for suffix in ("flac", "ogg", "wav"):
        path = tmp_path / f"stereo.{suffix}"
        soundfile.write(path, np.stack([left, right], axis=1), rate)
        wave = load_clip(str(path))
        assert wave.dtype == torch.float32 and wave.dim() == 1
        assert abs(wave.shape[0] - SAMPLE_RATE // 2) <= 1
        # the channel mean of a 440 Hz sine and a 0.5 constant: mean 0.25, swing +-0.5
        middle = wave[2000:6000]
        tolerance = 0.1 if suffix == "ogg" else 0.02  # Vorbis is lossy
        assert abs(float(middle.mean()) - 0.25) < tolerance
        assert abs(float(middle.max()) - 0.75) < tolerance


def test_lists_from_csv_and_json(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.zeros(800), 16000)
    soundfile.write(tmp_path / "b.wav", np.zeros(800), 16000)
    (tmp_path / "list.csv").write_text('file,labels\na.wav,dog\nb.wav,"dog;cat"\n')
    (tmp_path / "list.json").write_text(json.dumps({"data": [{"wav": "a.wav", "labels": "dog,cat"}, "b.wav"]}))
    csv_items = list_audio(tmp_path / "list.csv")
    assert [i.labels for i in csv_items] == [("dog",), ("dog", "cat")]
    assert csv_items[0].path == str(tmp_path / "a.wav")
    json_items = list_audio(tmp_path / "list.json")
    assert [i.labels for i in json_items] == [("dog", "cat"), ()]


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, "does not exist"),
    ("", None, "holds no audio files"),
    ("x.txt", "hi", "neither a folder"),
    ("x.csv", "name\nfoo\n", "no path column"),
    ("x.json", '{"files": []}', "expected a JSON list"),
])
def test_bad_data_is_a_clear_error(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(NoAudioError, match=message):
        list_audio(tmp_path / name)


def test_scan_skips_unreadable_and_empty(tmp_path):
    soundfile.write(tmp_path / "good.wav", np.zeros(800), 16000)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    readable, skipped = scan_readable(list_audio(tmp_path))
    assert [i.path for i in readable] == [str(tmp_path / "good.wav")]
    reasons = dict(skipped)
    assert "empty" in reasons[str(tmp_path / "empty.wav")]
    assert "unreadable" in reasons[str(tmp_path / "junk.wav")]


def test_dataset_drops_a_clip_that_breaks_after_the_scan(tmp_path):
    for name in ("a", "b"):
        soundfile.write(tmp_path / f"{name}.wav", np.full(3000, 0.1), 16000)
    items = list_audio(tmp_path)
    (tmp_path / "b.wav").write_bytes(b"broken")
    dataset = ClipDataset(items, 2000, random_crop=True, seed=0)
    batch = Collate(2000, 400)([dataset[(0, 0)], dataset[(0, 1)]])
    assert len(batch) == 1 and batch.indices.tolist() == [0] and "b.wav" in batch.skipped[0]
    empty = Collate(2000, 400, num_classes=3)([dataset[(0, 1)]])
    stand_in = empty.stand_in()
    assert len(empty) == 0 and len(stand_in) == 1 and stand_in.weight == 0.0
    assert stand_in.targets.shape == (1, 3) and stand_in.waves.abs().sum() == 0


def test_crops_depend_on_seed_epoch_and_index_only(tmp_path):
    soundfile.write(tmp_path / "long.wav", np.random.default_rng(0).standard_normal(16000) * 0.1, 16000)
    items = list_audio(tmp_path)
    dataset = ClipDataset(items, 4000, random_crop=True, seed=5)
    first, again, next_epoch = dataset[(0, 0)][1], dataset[(0, 0)][1], dataset[(1, 0)][1]
    assert torch.equal(first, again) and not torch.equal(first, next_epoch) and first.shape == (4000,)
    start = ClipDataset(items, 4000, random_crop=False)[(0, 0)][1]
    assert torch.equal(start, load_clip(items[0].path)[:4000])


def test_short_clips_are_padded_with_one_frame_of_length(tmp_path):
    soundfile.write(tmp_path / "tiny.wav", np.full(100, 0.5), 16000)
    batch = Collate(1000, 400)([ClipDataset(list_audio(tmp_path), 1000, random_crop=True)[(0, 0)]])
    assert batch.lengths.tolist() == [400] and batch.waves[0, :100].eq(0.5).all() and batch.waves[0, 100:].eq(0).all()


@pytest.mark.parametrize("num_items, world_size, batch_size", [(10, 2, 3), (7, 3, 2), (5, 1, 5), (4, 4, 1)])
def test_sampler_shards_every_clip_once_per_epoch(num_items, world_size, batch_size):
    samplers = [EpochBatchSampler(num_items, batch_size, shuffle=True, drop_last=False, seed=1, rank=r,
                                  world_size=world_size) for r in range(world_size)]
    for epoch in (0, 1):
        seen = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            seen += [i for batch in sampler for e, i in batch if e == epoch]
        assert sorted(seen) == list(range(num_items))
    training = [EpochBatchSampler(num_items, batch_size, shuffle=True, drop_last=True, seed=1, rank=r,
                                  world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in training}) == 1  # every rank takes the same number of steps
    for sampler in training:
        assert all(len(batch) == batch_size for batch in sampler)


def test_sampler_resumes_mid_epoch():
    sampler = EpochBatchSampler(20, 3, shuffle=True, drop_last=True, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == full[2:]
    sampler.set_epoch(5)
    assert list(sampler) != full
