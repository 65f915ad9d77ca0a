"""``audiomae demo-data OUT``: a small synthetic labelled sound dataset, so every command runs offline.

Five classes, each clip with its own random parameters over a faint noise floor:
- ``tone``: a sine of 200 Hz to 2 kHz, faded in and out;
- ``chirp``: a linear sweep up or down between 100 Hz and 6 kHz;
- ``noise_burst``: one to four decaying bursts of white noise, 50 to 300 ms each;
- ``click_train``: 1 ms clicks repeating at 2 to 20 Hz;
- ``harmonic_stack``: a 80 to 400 Hz fundamental and 3 to 10 harmonics with vibrato.

Writes ``OUT/<class>/<class>_NNN.wav`` (16-bit PCM) and ``OUT/labels.csv`` (``path,label``, paths
relative to OUT). The same seed gives the same files.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

CLASSES = ("tone", "chirp", "noise_burst", "click_train", "harmonic_stack")


def _fade(n: int, rate: int) -> np.ndarray:
    """Unit envelope with 10 ms raised-cosine ends, so tones start and stop without clicks."""
    ramp = min(n // 2, int(0.01 * rate))
    envelope = np.ones(n)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        envelope[:ramp], envelope[n - ramp:] = edge, edge[::-1]
    return envelope


def synthesize(kind: str, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``kind``: float32 [round(seconds * rate)] in [-1, 1]."""
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    nyquist_safe = 0.45 * rate
    if kind == "tone":
        freq = min(rng.uniform(200, 2000), nyquist_safe)
        signal = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) * _fade(n, rate)
    elif kind == "chirp":
        low, high = rng.uniform(100, 1000), min(rng.uniform(1000, 6000), nyquist_safe)
        start, end = (low, high) if rng.random() < 0.5 else (high, low)
        signal = np.sin(2 * np.pi * (start * t + (end - start) * t**2 / (2 * max(seconds, 1e-9)))) * _fade(n, rate)
    elif kind == "noise_burst":
        signal = np.zeros(n)
        for _ in range(rng.integers(1, 5)):
            length = max(1, int(rng.uniform(0.05, 0.3) * rate))
            onset = rng.integers(0, max(1, n - length))
            burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 4))
            signal[onset:onset + length] += burst[: n - onset]
        signal /= max(np.abs(signal).max(), 1e-9)
    elif kind == "click_train":
        signal = np.zeros(n)
        period = rate / rng.uniform(2, 20)
        width = max(1, int(0.001 * rate))
        for onset in np.arange(rng.uniform(0, period), n, period).astype(int):
            signal[onset:onset + width] = np.hanning(width + 2)[1:-1][: n - onset]
    elif kind == "harmonic_stack":
        fundamental = rng.uniform(80, 400)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
        phase = 2 * np.pi * fundamental * np.cumsum(vibrato) / rate
        tilt = rng.uniform(0.5, 2.0)
        signal = sum(np.sin(k * phase) / k**tilt for k in range(1, rng.integers(4, 12)) if k * fundamental < nyquist_safe)
        signal = signal / max(np.abs(signal).max(), 1e-9) * _fade(n, rate)
    else:
        raise ValueError(f"unknown class {kind!r}; choose one of {CLASSES}")
    clip = rng.uniform(0.1, 0.6) * signal + 10 ** rng.uniform(-4, -2.5) * rng.standard_normal(n)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def write_demo_data(out, num_per_class: int = 8, seconds: float = 2.0, sample_rate: int = 16000,
                    seed: int = 0) -> Path:
    """Write the dataset under ``out``; returns the path of its ``labels.csv``."""
    import soundfile

    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    if not (math.isfinite(seconds) and seconds > 0) or sample_rate < 1000:
        raise ValueError(f"need finite seconds > 0 and sample_rate >= 1000, got {seconds} and {sample_rate}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder to write the dataset into")
    rng = np.random.default_rng(seed)
    rows = []
    for kind in CLASSES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for n in range(num_per_class):
            relative = f"{kind}/{kind}_{n:03d}.wav"
            soundfile.write(out / relative, synthesize(kind, seconds, sample_rate, rng), sample_rate, subtype="PCM_16")
            rows.append((relative, kind))
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return labels


def register(subparsers) -> None:
    from .train import SEED

    p = subparsers.add_parser("demo-data", help="write a small synthetic labelled sound dataset",
                              description=__doc__.splitlines()[0])
    p.add_argument("out", metavar="OUT", type=Path, help="folder to write (class sub-folders and labels.csv)")
    p.add_argument("--num-per-class", type=int, default=8, help="clips per class (default 8)")
    p.add_argument("--seconds", type=float, default=2.0, help="clip duration (default 2.0)")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate in Hz (default 16000)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    try:
        labels = write_demo_data(args.out, args.num_per_class, args.seconds, args.sample_rate, args.seed)
    except (ValueError, OSError) as exc:  # bad settings, or a folder that cannot be written
        print(f"audiomae demo-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_per_class * len(CLASSES)} clips in {len(CLASSES)} classes to {args.out} ({labels.name})")
    return 0
