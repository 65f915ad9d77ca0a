"""A model of the fbank kernel's shared-memory and L1 traffic: wavefronts per warp per frame.

The CUDA kernel (csrc/fbank/fbank.cu) does far less arithmetic per frame than an H100 SM can do
in the time it takes (about 15k float64 operations per 512-point frame), so what bounds it is the
SM's shared-memory/L1 pipe, which serves one 128-byte wavefront a cycle. This script walks the
accesses of one warp computing one frame, instruction by instruction, and counts

* shared memory: per instruction, the lanes go in phases of 128 bytes (32 lanes of 4 bytes, 16 of 8,
  8 of 16); a phase takes as many wavefronts as its most-conflicted bank has distinct words;
* global loads (L1 hits: tables and samples are reused by every warp): the 128-byte lines touched.

``--layout measured`` replays the kernel as it was when the H100 timed it (1.34 ms for 256
ten-second clips, 2026-11-27): samples staged in shared memory, an unpadded FFT buffer (the first
radix-8 pass stores at a 128-byte stride: 32-way conflicts), float64 Mel weights bin after bin,
one twiddle table. ``--layout current`` replays fbank_frame.cuh's general pipeline
(``compute_frame``; without ``--layout``, both), which the kernel now runs only for the frames that
its 512-point specialisation (``compute_frame_512``: each sample read once, float Mel sums) does
not serve; the benchmark times it as ``cuda_kernel_general`` and attaches the model's rate there.
The ratio of the two counts is what the change should buy where the pipe is the bound; it is a
model, not a timing:
the GPU benchmark (benches/bench_fbank.py) is the measurement. A check of the model: the measured
layout's count over the H100's time (1177 wavefronts x 256 x 998 frames / 132 SMs / 1.336 ms) is
1.71 G wavefronts a second per SM, about the H100's clock under load, so that kernel ran at the
pipe's rate; benches/bench_fbank.py reports the same figure for the kernel it times
(``model_ghz_per_sm``).

    python -m benches.fbank_traffic_model [--layout current|measured] [--bins 128] [--padded 512]
"""
from __future__ import annotations

import argparse

import torch

from kernels.fbank import FbankOptions, kernel_tables

WARP = 32


def shared_wavefronts(addresses: dict[int, int], size: int) -> int:
    """Wavefronts of one warp instruction accessing ``size`` bytes at ``addresses`` (lane -> byte)."""
    phase = 128 // size
    total = 0
    for first in range(0, WARP, phase):
        banks: dict[int, set[int]] = {}
        for lane in range(first, first + phase):
            if lane in addresses:
                for word in range(addresses[lane] // 4, (addresses[lane] + size) // 4):
                    banks.setdefault(word % 32, set()).add(word)
        total += max((len(words) for words in banks.values()), default=0)
    return total


def global_lines(addresses: dict[int, int], size: int) -> int:
    """128-byte lines one warp load touches (an L1 hit costs a wavefront per line)."""
    return len({a // 128 for a in addresses.values()} | {(a + size - 1) // 128 for a in addresses.values()})


def lanes(first: int, limit: int) -> dict[int, int]:
    """lane -> index for a lane-strided loop's iteration starting at ``first`` (indices < limit)."""
    return {lane: first + lane for lane in range(WARP) if first + lane < limit}


def count(layout: str, padded_size: int, window_size: int, num_mel_bins: int) -> dict[str, tuple[int, int]]:
    """{stage: (shared wavefronts, global lines)} for one warp and one frame."""
    current = layout == "current"
    n = padded_size // 2
    pad = (lambda i: i + (i >> 3)) if current else (lambda i: i)
    opts = FbankOptions(num_mel_bins=num_mel_bins, frame_length=window_size / 16.0)  # 16 kHz
    if opts.padded_window_size != padded_size:
        raise ValueError(f"a window of {window_size} samples pads to {opts.padded_window_size}, not {padded_size}")
    tables = kernel_tables(opts, torch.device("cpu"), torch.get_default_dtype())
    starts, lengths = tables.mel_start.tolist(), tables.mel_len.tolist()
    width = tables.mel_weights.shape[0]
    stages: dict[str, list[int]] = {}

    def add(stage, shared=0, lines=0):
        totals = stages.setdefault(stage, [0, 0])
        totals[0] += shared
        totals[1] += lines

    W = window_size
    if current:
        for j0 in range(0, W, WARP):  # the DC offset: float samples
            add("samples", lines=global_lines({l: 4 * j for l, j in lanes(j0, W).items()}, 4))
        items = n // 8
        for j0 in range(0, items, WARP):  # the first pass, from the clip: pairs m = j + items r
            for r in range(8):
                pairs = {l: 2 * (j + r * items) for l, j in lanes(j0, items).items() if 2 * (j + r * items) < W}
                if pairs:  # samples 2m and 2m + 1 in one 8-byte load (a frame inside its clip), 2m - 1 alone
                    add("samples", lines=global_lines({l: 4 * j for l, j in pairs.items()}, 8))
                    add("samples", lines=global_lines({l: 4 * (j - 1) for l, j in pairs.items() if j > 0}, 4))
                    add("window", lines=global_lines({l: 8 * j for l, j in pairs.items()}, 16))
            for r in range(8):
                add("fft", shared=shared_wavefronts({l: 16 * pad(j * 8 + r) for l, j in lanes(j0, items).items()}, 16))
    else:
        for j0 in range(0, W, WARP):  # staged in shared memory as doubles
            index = lanes(j0, W)
            add("samples", shared_wavefronts({l: 8 * j for l, j in index.items()}, 8), global_lines({l: 4 * j for l, j in index.items()}, 4))
        for j0 in range(0, padded_size, WARP):  # DC, pre-emphasis, window: a[j], a[j-1] -> b[j]
            index = lanes(j0, padded_size)
            body = {l: j for l, j in index.items() if j < W}
            if body:
                add("samples", shared_wavefronts({l: 8 * j for l, j in body.items()}, 8)
                    + shared_wavefronts({l: 8 * max(j - 1, 0) for l, j in body.items()}, 8))
                add("window", lines=global_lines({l: 8 * j for l, j in body.items()}, 8))
            add("samples", shared_wavefronts({l: 8 * j for l, j in index.items()}, 8))
    span = 1
    while span < n:
        radix = min(8, n // span)
        items = n // radix
        for j0 in range(0, items, WARP):
            index = lanes(j0, items)
            if span == 1 and current:
                break  # the first pass came from the clip
            for r in range(radix):
                add("fft", shared=shared_wavefronts({l: 16 * pad(j + r * items) for l, j in index.items()}, 16))
            if span > 1:
                for r in range(1, radix):
                    if current:
                        where = {l: 16 * (r * span + (j & (span - 1))) for l, j in index.items()}
                    else:
                        where = {l: 16 * ((j & (span - 1)) * r * (n // (span * radix))) for l, j in index.items()}
                    add("twiddles", lines=global_lines(where, 16))
            for r in range(radix):
                where = {l: 16 * pad((j - (j & (span - 1))) * radix + (j & (span - 1)) + r * span) for l, j in index.items()}
                add("fft", shared=shared_wavefronts(where, 16))
        span *= radix
    last = n // 2 if current else n - 1
    size = 4 if current else 8  # the power spectrum in shared memory: float32 now (float32 clips), double then
    for k0 in range(0, last + 1, WARP):  # the power spectrum
        index = lanes(k0, last + 1)
        add("power", shared_wavefronts({l: 16 * pad(k) for l, k in index.items()}, 16)
            + shared_wavefronts({l: 16 * pad((n - k) % n) for l, k in index.items()}, 16)
            + shared_wavefronts({l: size * k for l, k in index.items()}, size),
            global_lines({l: 16 * k for l, k in index.items()}, 16))
        if current:
            add("power", shared_wavefronts({l: size * (n - k) for l, k in index.items() if 0 < k < n // 2}, size))
    for m0 in range(0, num_mel_bins, WARP):  # Mel sums, one bin a lane
        bins = lanes(m0, num_mel_bins)
        add("mel", lines=2 + 1)  # mel_start and mel_len, the output row
        for i in range(max(lengths[m] for m in bins.values())):
            active = {l: m for l, m in bins.items() if i < lengths[m]}
            if current:  # float32 weights, bin-major
                weight = global_lines({l: 4 * (i * num_mel_bins + m) for l, m in active.items()}, 4)
            else:  # float64 weights, bin after bin
                weight = global_lines({l: 8 * (m * width + i) for l, m in active.items()}, 8)
            add("mel", shared_wavefronts({l: size * (starts[m] + i) for l, m in active.items()}, size), weight)
    return {stage: tuple(v) for stage, v in stages.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("current", "measured"), default=None,
                        help="one layout (default: both, side by side)")
    parser.add_argument("--bins", type=int, default=128)
    parser.add_argument("--padded", type=int, default=512)
    parser.add_argument("--window", type=int, default=400)
    args = parser.parse_args(argv)
    layouts = [args.layout] if args.layout else ["measured", "current"]
    totals = {}
    for layout in layouts:
        stages = count(layout, args.padded, args.window, args.bins)
        total = sum(s + g for s, g in stages.values())
        totals[layout] = total
        print(f"{layout}: {total} wavefronts a frame "
              + ", ".join(f"{name} {s}+{g}" for name, (s, g) in stages.items()) + " (shared+L1 lines)")
    if len(totals) == 2:
        print(f"measured / current: {totals['measured'] / totals['current']:.2f}x fewer wavefronts")


if __name__ == "__main__":
    main()
