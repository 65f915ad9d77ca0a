"""Audio datasets for the command line: finding clips, decoding them, batching raw samples.

Clips are decoded on the CPU (soundfile: wav, flac, ogg), averaged to mono and resampled to 16 kHz;
features are computed later, on the training device, for a whole batch at once (``train.py``).
Of a clip longer than the model's input only the window it uses is decoded and resampled
(``load_clip``: a ten-minute 44.1 kHz stereo WAV in 20 ms instead of 1.7 s, the same samples).

Data sources (``list_audio``):
- a folder, searched recursively (symlinked folders followed; hidden files and folders, and macOS's
  ``__MACOSX`` archive folders, skipped); a clip's label is the name of the folder it sits in
  (relative to the root), so ``root/dog/1.wav`` is a ``dog``; clips directly in the root have no label;
- a CSV file (UTF-8, a byte-order mark allowed) with a header: a path column (``path``, ``file``,
  ``filename`` or ``wav``) and optionally a ``label``/``labels`` column whose value holds one or
  more labels separated by ``;`` or ``,`` (AudioSet's ``/m/..,/m/..``); a label repeated on a clip
  counts once;
- a JSON file: a list (or ``{"data": [...]}``, the official AudioMAE layout) of paths or of objects
  with a path key and optional ``labels`` (a string as above, or a list).
Relative paths in a list are relative to the list's folder (the official code takes them relative
to the working directory). A malformed list is an error naming the file and the line or entry.
A crop whose samples hold NaN or Inf is skipped and reported like an unreadable clip (of a long
clip only the window a crop reads is decoded, so only that window is checked).

Determinism: every random choice here (the shuffle of an epoch, the crop of a clip) is a function of
``(seed, epoch, index)``, never of a process-wide RNG, so an epoch reads the same data in any process,
with any number of loader workers, and a resumed run can start in the middle of one.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
PATH_COLUMNS = ("path", "file", "filename", "wav")
LABEL_COLUMNS = ("labels", "label")


class NoAudioError(ValueError):
    """A DATA argument that names no readable audio."""


@dataclass(frozen=True)
class AudioItem:
    path: str
    labels: tuple[str, ...] = ()


def _split_labels(value) -> tuple[str, ...]:
    """A clip's labels, each once, in their first order (a repeated label would make a single-label
    task look multi-label)."""
    if value is None:
        return ()
    parts = value if isinstance(value, (list, tuple)) else re.split(r"[;,]", str(value))
    return tuple(dict.fromkeys(str(part).strip() for part in parts if str(part).strip()))


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _hidden(name: str) -> bool:
    """Dot files and folders (``.git``, macOS's ``._x.wav``) and unzipped archives' ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def _from_folder(root: Path) -> list[AudioItem]:
    """Audio files under ``root``, symlinked folders followed. A folder reached twice (a link to a
    folder also reached directly, or back up the tree: no loop) is listed once, under its first
    path in sorted order, the same on every machine. A broken link with an audio name is listed,
    for the scan to report."""
    paths, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not _hidden(name))
        paths += [Path(folder, name) for name in files
                  if not _hidden(name) and Path(name).suffix.lower() in AUDIO_SUFFIXES]
    items = []
    for path in sorted(paths):
        folder = path.parent.relative_to(root).as_posix()
        items.append(AudioItem(str(path), (folder,) if folder != "." else ()))
    return items


def _from_csv(path: Path) -> list[AudioItem]:
    # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True, strict=True)
        first_line = 1  # where the record being read starts: a malformed one is reported there
        try:
            columns = {name.strip().lower(): name for name in reader.fieldnames or ()}
            path_key = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
            if path_key is None:
                raise NoAudioError(f"{path}: the CSV header {reader.fieldnames} has no path column "
                                   f"(one of {PATH_COLUMNS})")
            label_key = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
            items, rows = [], iter(reader)
            while True:
                first_line = reader.line_num + 1  # line_num counts the lines read so far
                row = next(rows, None)
                if row is None:
                    break
                where = f"{path}:{reader.line_num}"  # the row's (last) line
                if None in row:  # more fields than the header: a stray comma or an unquoted one
                    raise NoAudioError(f"{where}: {len(reader.fieldnames) + len(row[None])} fields where the header "
                                       f"has {len(reader.fieldnames)} (quote values that hold commas)")
                clip = (row[path_key] or "").strip()
                if not clip:
                    raise NoAudioError(f"{where}: no path in the {path_key!r} column")
                items.append(AudioItem(_resolve(clip, path.parent),
                                       _split_labels(row.get(label_key) if label_key else None)))
            return items
        except csv.Error as exc:
            raise NoAudioError(f"{path}:{first_line}: not a readable CSV list ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise NoAudioError(f"{path}: not a readable CSV list (not UTF-8: {exc})") from exc


def _from_json(path: Path) -> list[AudioItem]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NoAudioError(f"{path}: not a readable JSON list ({exc})") from exc
    if isinstance(entries, dict) and "data" in entries:
        entries = entries["data"]
    if not isinstance(entries, list):
        raise NoAudioError(f"{path}: expected a JSON list of clips or {{'data': [...]}}, got {type(entries).__name__}")
    items = []
    for n, entry in enumerate(entries):
        if isinstance(entry, str) and entry.strip():
            items.append(AudioItem(_resolve(entry.strip(), path.parent)))
            continue
        key = next((k for k in PATH_COLUMNS if isinstance(entry, dict) and k in entry), None)
        if key is None or not isinstance(entry[key], str) or not entry[key].strip():
            raise NoAudioError(f"{path}: entry {n} is neither a path nor an object with a path string under one "
                               f"of {PATH_COLUMNS}: {str(entry)[:80]}")
        items.append(AudioItem(_resolve(entry[key].strip(), path.parent),
                               _split_labels(entry.get("labels", entry.get("label")))))
    return items


def list_audio(data) -> list[AudioItem]:
    """The clips a DATA argument names (folder, CSV or JSON list); raises ``NoAudioError`` if none."""
    data = Path(data)
    if data.is_dir():
        items = _from_folder(data)
    elif data.is_file() and data.suffix.lower() == ".csv":
        items = _from_csv(data)
    elif data.is_file() and data.suffix.lower() == ".json":
        items = _from_json(data)
    elif data.exists():
        raise NoAudioError(f"{data} is neither a folder nor a .csv/.json list of audio files")
    else:
        raise NoAudioError(f"{data} does not exist")
    if not items:
        raise NoAudioError(f"{data} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return items


def scan_readable(items: list[AudioItem]) -> tuple[list[AudioItem], list[tuple[str, str]]]:
    """Split clips into readable ones and ``(path, reason)`` for the unreadable or empty (headers only)."""
    import soundfile

    readable, skipped = [], []
    for item in items:
        if not os.path.isfile(item.path):  # a list's row naming a missing file: say so, not libsndfile's words
            skipped.append((item.path, "does not exist" if not os.path.exists(item.path) else "not a file"))
            continue
        try:
            info = soundfile.info(item.path)
        except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or OSError by case
            skipped.append((item.path, f"unreadable ({type(exc).__name__}: {str(exc).strip()[:120]})"))
            continue
        if info.frames == 0:
            skipped.append((item.path, "empty (no samples)"))
        else:
            readable.append(item)
    return readable, skipped


def load_clip(path: str, num_samples: int | None = None, choose_start=None) -> torch.Tensor:
    """Decode a clip to a float32 mono 16 kHz waveform [N]; raises on an unreadable or empty file.

    With ``num_samples``, at most that many samples: the window that starts at
    ``choose_start(excess)`` (default 0), ``excess`` being how many samples longer the whole
    clip is. Only that window is decoded and resampled (with a margin for the resampling filter,
    aligned to its phase, so the samples equal the whole clip's resampled and cut), not a long
    recording whole for ten seconds of it. Formats whose frame count a header states exactly
    (WAV, FLAC, AIFF); others are decoded whole, then cut."""
    import soundfile

    info = soundfile.info(path)
    length = resampled_length(info.frames, info.samplerate)
    if num_samples is None or length <= num_samples or info.format not in EXACT_LENGTH_FORMATS:
        wave = _decoded(path, info.samplerate)
        if num_samples is not None and wave.shape[0] > num_samples:
            start = choose_start(wave.shape[0] - num_samples) if choose_start else 0
            wave = wave[start:start + num_samples]
        return wave
    start = choose_start(length - num_samples) if choose_start else 0
    rate = info.samplerate
    gcd = math.gcd(rate, SAMPLE_RATE)
    block_in, block_out = rate // gcd, SAMPLE_RATE // gcd  # the resampler's phase repeats every block
    # Blocks of margin on each side: more than the filter's half-width (torchaudio's
    # ceil(6 * orig / (0.99 * min(orig, new))) input samples, in reduced units) plus a block.
    filter_width = math.ceil(6 * block_in / (0.99 * min(block_in, block_out))) + 1
    margin = -(-(filter_width + block_in) // block_in) + 1
    first = max(0, start // block_out - margin)
    last = -(-(start + num_samples) // block_out) + margin
    wave = _decoded(path, rate, first * block_in, min(info.frames, last * block_in))
    offset = start - first * block_out
    return wave[offset:offset + num_samples]


# Formats whose header states the exact frame count (a compressed stream's may be an estimate).
EXACT_LENGTH_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF")


def resampled_length(frames: int, rate: int) -> int:
    """Samples of a ``frames``-long clip at ``rate`` once resampled to 16 kHz (torchaudio's count)."""
    gcd = math.gcd(rate, SAMPLE_RATE)
    return -(-(SAMPLE_RATE // gcd) * frames // (rate // gcd))


def _decoded(path: str, rate: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``path``, channels averaged, resampled to 16 kHz."""
    import soundfile
    import torchaudio.functional as AF

    samples, _ = soundfile.read(path, start=start, stop=stop, dtype="float32", always_2d=True)
    if samples.shape[0] == 0:
        raise ValueError("empty (no samples)")
    if not np.isfinite(samples).all():  # a float file: its NaN would turn the whole batch's loss NaN
        raise ValueError("non-finite samples (NaN or Inf)")
    wave = torch.from_numpy(samples.mean(axis=1))
    if rate != SAMPLE_RATE:
        wave = AF.resample(wave, rate, SAMPLE_RATE)
    return wave


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, index))


class ClipDataset(torch.utils.data.Dataset):
    """Raw clips cropped to at most ``num_samples``: a random window when ``random_crop`` (drawn from
    ``(seed, epoch, index)``), else the start. Indexed by ``(epoch, index)`` pairs from ``EpochBatchSampler``.

    An item is ``(index, wave [n <= num_samples], targets [C] or None)``, or ``(index, None, reason)``
    for a clip that cannot be decoded: the batch drops it and the trainer counts it.
    """

    def __init__(self, items: list[AudioItem], num_samples: int, *, random_crop: bool, seed: int = 0,
                 classes: list[str] | None = None):
        self.items = items
        self.num_samples = num_samples
        self.random_crop = random_crop
        self.seed = seed
        self.classes = classes
        self.class_index = {name: n for n, name in enumerate(classes)} if classes else None

    def __len__(self) -> int:
        return len(self.items)

    def targets(self, item: AudioItem) -> torch.Tensor | None:
        if self.class_index is None:
            return None
        target = torch.zeros(len(self.class_index))
        for label in item.labels:
            target[self.class_index[label]] = 1.0
        return target

    def __getitem__(self, key):
        epoch, index = key
        item = self.items[index]
        def choose_start(excess: int) -> int:
            return int(clip_rng(self.seed, epoch, index).integers(0, excess + 1)) if self.random_crop else 0

        try:
            wave = load_clip(item.path, self.num_samples, choose_start)
        except Exception as exc:  # a file that broke after the scan: skipped, never fatal mid-epoch
            return index, None, f"{item.path}: {type(exc).__name__}: {str(exc).strip()[:120]}"
        return index, wave, self.targets(item)


@dataclass
class Batch:
    """Zero-padded clips ``waves`` [B, num_samples] with their ``lengths`` [B] (at least one frame),
    ``targets`` [B, C] (or None without labels), the dataset ``indices`` [B], the reasons of the clips
    ``skipped`` from it, and the ``weight`` of its loss (0 for a stand-in, see ``stand_in``)."""

    waves: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None
    indices: torch.Tensor
    skipped: list[str]
    weight: float = 1.0

    def __len__(self) -> int:
        return self.waves.shape[0]

    def stand_in(self) -> "Batch":
        """One silent clip of zero weight for a batch whose every clip was skipped: the training step
        still runs, so every process of a distributed job takes part in the same collectives."""
        targets = None if self.targets is None else self.targets.new_zeros(1, self.targets.shape[1])
        return Batch(self.waves.new_zeros(1, self.waves.shape[1]), torch.tensor([self.waves.shape[1]]), targets,
                     torch.tensor([-1]), self.skipped, weight=0.0)


class Collate:
    """Pads decoded clips to ``num_samples``; a clip shorter than ``min_length`` (one fbank frame)
    counts its zero padding up to that length as signal, so every clip gives features."""

    def __init__(self, num_samples: int, min_length: int, num_classes: int | None = None):
        self.num_samples, self.min_length, self.num_classes = num_samples, min_length, num_classes

    def __call__(self, samples) -> Batch:
        kept = [s for s in samples if s[1] is not None]
        skipped = [s[2] for s in samples if s[1] is None]
        waves = torch.zeros(len(kept), self.num_samples)
        lengths = torch.empty(len(kept), dtype=torch.int64)
        for row, (_, wave, _) in enumerate(kept):
            waves[row, : wave.shape[0]] = wave
            lengths[row] = max(wave.shape[0], self.min_length)
        targets = None
        if self.num_classes is not None:
            targets = torch.stack([s[2] for s in kept]) if kept else torch.zeros(0, self.num_classes)
        indices = torch.tensor([s[0] for s in kept], dtype=torch.int64)
        return Batch(waves, lengths, targets, indices, skipped)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` for one rank of ``world_size``: the epoch's permutation (seeded by
    ``seed + epoch``, the same on every rank, as ``DistributedSampler``) padded by wrapping to a
    multiple of ``world_size`` and dealt round-robin. ``drop_last`` drops the rank's last partial batch
    (training: every step has a full batch on every rank); without it, no padding either (evaluation:
    each clip once). ``set_epoch(epoch, start_batch)`` positions a resumed run mid-epoch."""

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.num_items))
        if self.drop_last:
            padding = -len(order) % self.world_size
            order += (order * (padding // max(len(order), 1) + 1))[:padding]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        count = len(self.rank_indices())
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self):
        indices = self.rank_indices()
        for batch in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in indices[batch * self.batch_size:(batch + 1) * self.batch_size]]


class FrontEnd:
    """The models' input for a batch of raw clips, on their device, in one fbank call
    (``audiomae.features``: mean removal, 128-bin Kaldi fbank, ``target_length`` frames, the dataset's
    normalisation). ``num_samples`` is the clip length that gives exactly ``target_length`` frames,
    ``min_samples`` one frame."""

    frame_length, frame_shift = 400, 160  # 25 ms and 10 ms at 16 kHz

    def __init__(self, target_length: int, dataset: str, pad_mode: str = "official", backend: str = "auto"):
        from .features import AudioMAEFeatures

        if target_length < 1:
            raise ValueError(f"target_length must be >= 1, got {target_length}")
        self.features = AudioMAEFeatures(sample_rate=SAMPLE_RATE, dataset=dataset, target_length=target_length,
                                         pad_mode=pad_mode, backend=backend)
        self.num_samples = (target_length - 1) * self.frame_shift + self.frame_length
        self.min_samples = self.frame_length

    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """waves [B, num_samples] zero-padded, lengths [B] -> features [B, target_length, 128]."""
        return self.features(waves, lengths.to(waves.device)).squeeze(1)
