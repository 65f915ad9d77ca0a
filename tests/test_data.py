"""audiomae.data: listing clips from folders and lists, and decoding them, on the files real
datasets hold (links, hidden files, spreadsheets' CSVs, float WAVs with NaN)."""
import json
import os
import types

import numpy as np
import pytest
import torch

from audiomae.data import ClipDataset, NoAudioError, list_audio, load_clip

soundfile = pytest.importorskip("soundfile")


def wav(path, samples=None, subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.random.default_rng(0).standard_normal(1600).astype("float32") * 0.1 if samples is None else samples
    soundfile.write(str(path), samples, 16000, subtype=subtype)
    return path


def test_non_finite_samples_are_refused_and_the_clip_skipped(tmp_path):
    # A float WAV with one NaN gave NaN features and stopped the run at its loss, naming no file.
    for value in (np.nan, np.inf):
        samples = np.zeros(1600, dtype="float32")
        samples[100] = value
        path = wav(tmp_path / "bad.wav", samples, subtype="FLOAT")
        with pytest.raises(ValueError, match="non-finite samples"):
            load_clip(str(path))
        index, wave, reason = ClipDataset(list_audio(tmp_path), 16000, random_crop=False)[(0, 0)]
        assert wave is None and "bad.wav" in reason and "non-finite" in reason


def test_folders_follow_links_and_skip_hidden_entries(tmp_path):
    root = tmp_path / "root"
    wav(root / "dog" / "a.wav")
    wav(tmp_path / "elsewhere" / "b.wav")
    os.symlink(tmp_path / "elsewhere", root / "cat")  # a class folder that is a link
    os.symlink(root, root / "dog" / "loop")  # a link back up the tree: no endless walk
    wav(root / ".git" / "c.wav")
    wav(root / "dog" / ".hidden.wav")
    wav(root / "__MACOSX" / "dog" / "._a.wav")
    os.symlink(tmp_path / "missing.wav", root / "dog" / "broken.wav")  # listed: the scan reports it
    items = list_audio(root)
    found = {(os.path.relpath(item.path, root), item.labels) for item in items}
    assert found == {("cat/b.wav", ("cat",)), ("dog/a.wav", ("dog",)), ("dog/broken.wav", ("dog",))}


def test_spreadsheet_csvs_read_and_labels_count_once(tmp_path):
    wav(tmp_path / "a b.wav")
    wav(tmp_path / "ü.wav")
    # A byte-order mark, spaces after the commas, a repeated label, a quoted path with a comma.
    wav(tmp_path / "x,y.wav")
    (tmp_path / "list.csv").write_text('\ufeffpath, labels\n a b.wav, dog;dog\nü.wav,cat\n"x,y.wav","/m/01,/m/02"\n',
                                       encoding="utf-8")
    items = list_audio(tmp_path / "list.csv")
    assert [(os.path.basename(i.path), i.labels) for i in items] == [
        ("a b.wav", ("dog",)), ("ü.wav", ("cat",)), ("x,y.wav", ("/m/01", "/m/02"))]


@pytest.mark.parametrize("content,message", [
    ("path,label\na.wav,dog,extra\n", r"list.csv:2: 3 fields where the header has 2"),
    ("path,label\na.wav,dog\n\nb.wav,cat,x\n", r"list.csv:4: 3 fields where the header has 2"),
    ("path,label\n,dog\n", r"list.csv:2: no path"),
    ('path,label\na.wav,dog\nb.wav,cat\nc.wav,"dog\n' + "d.wav,cat\n" * 3, r"list.csv:4: not a readable CSV list"),
])
def test_malformed_csv_lists_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(NoAudioError, match=message):
        list_audio(tmp_path / "list.csv")


def test_undecodable_csv_names_the_file(tmp_path):
    (tmp_path / "list.csv").write_bytes("path,label\nü.wav,dog\n".encode("latin-1"))
    with pytest.raises(NoAudioError, match=r"list.csv: not a readable CSV list \(not UTF-8"):
        list_audio(tmp_path / "list.csv")


@pytest.mark.parametrize("content,message", [
    ('{"data": [{"wav": null}]}', "entry 0 is neither a path"),
    ("[3]", "entry 0 is neither a path"),
    ('[{"wav": ""}]', "entry 0 is neither a path"),
    ('{"data": [', r"list.json: not a readable JSON list"),
])
def test_malformed_json_lists_name_the_file_and_entry(tmp_path, content, message):
    (tmp_path / "list.json").write_text(content)
    with pytest.raises(NoAudioError, match=message):
        list_audio(tmp_path / "list.json")


def test_json_list_with_a_byte_order_mark(tmp_path):
    wav(tmp_path / "a.wav")
    (tmp_path / "list.json").write_text("\ufeff" + json.dumps({"data": [{"wav": "a.wav", "labels": "/m/01,/m/01"}]}),
                                        encoding="utf-8")
    (item,) = list_audio(tmp_path / "list.json")
    assert item.labels == ("/m/01",) and torch.isfinite(load_clip(item.path)).all()


def test_ranks_that_read_different_clips_stop(tmp_path, monkeypatch):
    # Each rank scans the files itself: one that missed a file would shift its shard silently.
    from audiomae import train, training

    wav(tmp_path / "dog" / "a.wav")
    wav(tmp_path / "dog" / "b.wav")
    single = types.SimpleNamespace(enabled=False)
    assert len(train.load_items(tmp_path, single)) == 2  # one process: nothing to compare
    monkeypatch.setattr(training, "gather_objects", lambda obj, world: [obj, (obj[0] - 1, "another list")])
    two = types.SimpleNamespace(enabled=True)
    with pytest.raises(NoAudioError, match=r"different readable clips in DATA \(rank 0: 2, rank 1: 1\)"):
        train.load_items(tmp_path, two)


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 44100, 48000, 11025])
@pytest.mark.parametrize("subtype,channels", [("PCM_16", 1), ("FLOAT", 2)])
def test_a_window_decodes_as_the_whole_clip_resampled_and_cut(tmp_path, rate, subtype, channels):
    # Only the window is decoded and resampled (a long recording is not read whole for ten
    # seconds of it): its samples must equal the whole clip's, resampled, then cut.
    rng = np.random.default_rng(rate)
    samples = (rng.standard_normal((3 * rate + 17, channels)) * 0.1).astype("float32")
    path = tmp_path / "long.wav"
    soundfile.write(str(path), samples, rate, subtype=subtype)
    whole = load_clip(str(path))
    num_samples = 4000
    for start in (0, 1, 157, 20000, whole.shape[0] - num_samples - 1, whole.shape[0] - num_samples):
        window = load_clip(str(path), num_samples, lambda excess, start=start: start)
        torch.testing.assert_close(window, whole[start:start + num_samples], rtol=0, atol=2e-6)
    assert torch.equal(load_clip(str(path), 10**7), whole)  # longer than the clip: all of it


def test_clips_without_an_exact_length_are_decoded_whole_then_cut(tmp_path):
    samples = (np.random.default_rng(1).standard_normal(22050 * 2) * 0.1).astype("float32")
    soundfile.write(str(tmp_path / "c.ogg"), samples, 22050, format="OGG", subtype="VORBIS")
    whole = load_clip(str(tmp_path / "c.ogg"))
    assert torch.equal(load_clip(str(tmp_path / "c.ogg"), 1000, lambda excess: 33), whole[33:1033])


def test_a_folder_reached_twice_is_listed_once_under_its_first_sorted_path(tmp_path):
    # The filesystem's listing order decided which name a linked folder got; now sorted order does.
    root = tmp_path / "root"
    wav(root / "zreal" / "a.wav")
    wav(root / "real" / "b.wav")
    os.symlink(root / "zreal", root / "alias")  # sorts before zreal: its name wins
    os.symlink(root / "real", root / "zalias")  # sorts after real: real wins
    labels = sorted(item.labels for item in list_audio(root))
    assert labels == [("alias",), ("real",)]
