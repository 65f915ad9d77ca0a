"""Batched Kaldi-compatible log-Mel filterbanks (``torchaudio.compliance.kaldi.fbank`` for a batch).

Contract
--------
``fbank(waveforms, *, lengths=None, backend="auto", **options)``

* ``waveforms``: ``[N]`` (one clip, returns ``[frames, bins]``) or ``[B, N]`` (a batch of clips, not
  channels, returns ``[B, frames, bins]``); float32 or float64; the output has the input's dtype.
* ``lengths``: optional ``[B]`` integer tensor or sequence, the number of valid samples of each clip of
  a zero-padded batch. Then the result is a pair ``(features, num_frames)``: ``features`` has as many
  frames as the longest clip, frames past a clip's end are 0.0, and ``num_frames`` ``[B]`` (int64, on
  the waveforms' device) holds each clip's frame count. Without ``lengths`` only the features return.
* ``options``: torchaudio's keyword names, defaults and meaning: ``blackman_coeff``, ``dither``,
  ``energy_floor``, ``frame_length``, ``frame_shift``, ``high_freq``, ``htk_compat``, ``low_freq``,
  ``num_mel_bins``, ``preemphasis_coefficient``, ``raw_energy``, ``remove_dc_offset``,
  ``round_to_power_of_two``, ``sample_frequency``, ``snip_edges``, ``subtract_mean``, ``use_energy``,
  ``use_log_fbank``, ``use_power``, ``vtln_high``, ``vtln_low``, ``vtln_warp``, ``window_type``.
  ``channel`` and ``min_duration`` do not exist here (rows are clips, and every clip gives features).
  Extra keywords: ``check_finite=True`` rejects NaN/Inf samples (one device sync); ``generator`` seeds
  the dither noise (drawn block by block on the CPU, so a seed's noise depends on the device and on
  ``CPU_BLOCK_FRAMES``). Unknown keywords are a TypeError.
* Precision: each clip is framed, DC-corrected, pre-emphasised, windowed and transformed in float64
  whatever the input dtype, because the log of a bin 1e11 below the frame's peak (tones, sweeps)
  is only right to 1e-3 when the FFT's rounding error is that far down: float32 arithmetic, like
  torchaudio's own float32 run, is off by up to 1e-2 there. After the FFT the torch path works in
  the output's dtype: the power spectrum, the Mel sums (of non-negative terms) and the log are well
  conditioned, and float32 there costs about 1e-6 of the budget. Both backends are within 1e-3 (absolute,
  on log features) of torchaudio run in float64, with the same frame count. The Mel filterbank is
  built exactly as torchaudio builds it (in the default dtype; the kernel holds it in float32, which
  is exact unless the default dtype is float64), the log floor is float32's epsilon.
  One limit of float32 after the FFT: float32 samples beyond about 1e17 give a power spectrum past
  float32's range, and the torch path's features become inf or NaN there (the kernel stores the
  power spectrum scaled by a power of two, sums its Mel bins in float32 and takes the log in
  double; float64 clips are fine on both).

Backends
--------
* ``"torch"``: batched, vectorised torch (unfold, DC removal, pre-emphasis, window, rfft, power, Mel
  matmul, log) on any device, differentiable; scratch memory grows with batch x frames x FFT size.
* ``"cuda"``: ``csrc/fbank/fbank.cu``, one launch for the whole batch, one warp per frame, the FFT in
  registers and shared memory; nothing but the samples and the features touch device memory. It serves CUDA
  tensors with a power-of-two padded window (2 to 4096 samples; 2048 at most where a block may
  have only 64 KiB of shared memory, as on sm_75), no dither, no ``subtract_mean`` and no
  gradient; anything else is a ValueError naming the option.
* ``"auto"``: the kernel for CUDA tensors when the options allow it and the extension builds;
  otherwise the torch path, with a warning (once per reason) when a CUDA tensor did not get the kernel.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD

# numeric_limits<float>::epsilon(): Kaldi's and torchaudio's floor before every log.
LOG_FLOOR = torch.finfo(torch.float32).eps
WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")
MAX_CUDA_PADDED_WINDOW = 4096


@dataclass(frozen=True)
class FbankOptions:
    """torchaudio.compliance.kaldi.fbank's options and defaults (hashable: tables are cached on it)."""

    blackman_coeff: float = 0.42
    dither: float = 0.0
    energy_floor: float = 1.0
    frame_length: float = 25.0
    frame_shift: float = 10.0
    high_freq: float = 0.0
    htk_compat: bool = False
    low_freq: float = 20.0
    num_mel_bins: int = 23
    preemphasis_coefficient: float = 0.97
    raw_energy: bool = True
    remove_dc_offset: bool = True
    round_to_power_of_two: bool = True
    sample_frequency: float = 16000.0
    snip_edges: bool = True
    subtract_mean: bool = False
    use_energy: bool = False
    use_log_fbank: bool = True
    use_power: bool = True
    vtln_high: float = -500.0
    vtln_low: float = 100.0
    vtln_warp: float = 1.0
    window_type: str = "povey"

    @property
    def window_shift(self) -> int:
        return int(self.sample_frequency * self.frame_shift * 0.001)

    @property
    def window_size(self) -> int:
        return int(self.sample_frequency * self.frame_length * 0.001)

    @property
    def padded_window_size(self) -> int:
        size = self.window_size
        return 1 << (size - 1).bit_length() if self.round_to_power_of_two else size

    @property
    def num_features(self) -> int:
        return self.num_mel_bins + int(self.use_energy)

    def reflect_pad(self) -> int:
        """Samples reflected before the first frame when ``snip_edges`` is False (negative: skipped)."""
        return 0 if self.snip_edges else self.window_size // 2 - self.window_shift // 2

    def num_frames(self, num_samples):
        """Frames of a clip of ``num_samples`` samples (int or int64 tensor), as Kaldi counts them."""
        if self.snip_edges:
            return 1 + (num_samples - self.window_size) // self.window_shift
        return (num_samples + self.window_shift // 2) // self.window_shift

    def validate(self) -> None:
        for name, field in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if field.type in ("float", float) and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                                       and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.num_mel_bins, bool) or not hasattr(self.num_mel_bins, "__index__"):
            raise ValueError(f"num_mel_bins must be an integer, got {self.num_mel_bins!r}")
        if not self.vtln_warp > 0.0:
            raise ValueError(f"vtln_warp must be > 0 (1.0 disables warping), got {self.vtln_warp}")
        if self.window_type not in WINDOW_TYPES:
            raise ValueError(f"window_type must be one of {WINDOW_TYPES}, got {self.window_type!r}")
        if not self.sample_frequency > 0:
            raise ValueError(f"sample_frequency must be > 0, got {self.sample_frequency}")
        if self.window_size < 2:
            raise ValueError(f"frame_length={self.frame_length} ms gives a window of {self.window_size} samples; need >= 2")
        if self.window_shift < 1:
            raise ValueError(f"frame_shift={self.frame_shift} ms gives a shift of {self.window_shift} samples; need >= 1")
        if self.padded_window_size % 2:
            raise ValueError(
                f"the padded window ({self.padded_window_size} samples) must be even: "
                "use round_to_power_of_two=True or change frame_length"
            )
        if not 0.0 <= self.preemphasis_coefficient <= 1.0:
            raise ValueError(f"preemphasis_coefficient must be in [0, 1], got {self.preemphasis_coefficient}")
        if self.num_mel_bins <= 3:
            raise ValueError(f"num_mel_bins must be > 3, got {self.num_mel_bins}")
        if self.energy_floor < 0.0:
            raise ValueError(f"energy_floor must be >= 0 (0 disables it), got {self.energy_floor}")
        nyquist = 0.5 * self.sample_frequency
        high = self._high_freq()
        if not (0.0 <= self.low_freq < nyquist and 0.0 < high <= nyquist and self.low_freq < high):
            raise ValueError(
                f"low_freq={self.low_freq} and high_freq={self.high_freq} (-> {high}) must satisfy "
                f"0 <= low_freq < high_freq <= nyquist={nyquist}"
            )
        vtln_high = self.vtln_high + nyquist if self.vtln_high < 0.0 else self.vtln_high
        if self.vtln_warp != 1.0 and not (
            self.low_freq < self.vtln_low < high and 0.0 < vtln_high < high and self.vtln_low < vtln_high
        ):
            raise ValueError(
                f"vtln_low={self.vtln_low} and vtln_high={self.vtln_high} (-> {vtln_high}) must satisfy "
                f"low_freq < vtln_low < vtln_high < high_freq={high}"
            )

    def _high_freq(self) -> float:
        return self.high_freq + 0.5 * self.sample_frequency if self.high_freq <= 0.0 else self.high_freq

    def cuda_unsupported(self) -> str | None:
        """Why the CUDA kernel cannot compute these options, or None."""
        padded = self.padded_window_size
        if padded & (padded - 1) or padded > MAX_CUDA_PADDED_WINDOW:
            return f"padded window of {padded} samples (the kernel needs a power of two <= {MAX_CUDA_PADDED_WINDOW})"
        if self.dither != 0.0:
            return "dither != 0"
        if self.subtract_mean:
            return "subtract_mean=True"
        return None


# ---------------------------------------------------------------------------------------------
# Tables shared by both backends (built once per option set and device).


def window_function(opts: FbankOptions, device=None) -> torch.Tensor:
    """The analysis window ``[window_size]`` in float64, as torchaudio defines each type."""
    size, f64 = opts.window_size, torch.float64
    if opts.window_type == "hanning":
        return torch.hann_window(size, periodic=False, dtype=f64, device=device)
    if opts.window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=f64, device=device)
    if opts.window_type == "povey":
        return torch.hann_window(size, periodic=False, dtype=f64, device=device).pow(0.85)
    if opts.window_type == "rectangular":
        return torch.ones(size, dtype=f64, device=device)
    a = 2 * math.pi / (size - 1)
    n = torch.arange(size, dtype=f64, device=device)
    c = opts.blackman_coeff
    return c - 0.5 * torch.cos(a * n) + (0.5 - c) * torch.cos(2 * a * n)


def _mel(freq):
    return 1127.0 * (1.0 + freq / 700.0).log()


def _inverse_mel(mel):
    return 700.0 * ((mel / 1127.0).exp() - 1.0)


def _vtln_warp_freq(opts: FbankOptions, high_freq: float, vtln_high: float, freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's piecewise-linear VTLN warp of ``freq`` (Hz), identity outside [low_freq, high_freq]."""
    low_freq, factor = opts.low_freq, opts.vtln_warp
    lower = opts.vtln_low * max(1.0, factor)
    upper = vtln_high * min(1.0, factor)
    scale = 1.0 / factor
    scale_left = (scale * lower - low_freq) / (lower - low_freq)
    scale_right = (high_freq - scale * upper) / (high_freq - upper)
    warped = torch.where(freq >= upper, high_freq + scale_right * (freq - high_freq), scale * freq)
    warped = torch.where(freq < lower, low_freq + scale_left * (freq - low_freq), warped)
    return torch.where((freq < low_freq) | (freq > high_freq), freq, warped)


def mel_banks(opts: FbankOptions) -> torch.Tensor:
    """Triangular Mel filters ``[num_mel_bins, padded_window_size // 2]`` in the default dtype.

    The same arithmetic, in the same dtype, as torchaudio's ``get_mel_banks``, so the weights agree
    bit for bit; the Nyquist bin has no weight, which is why it is left out.
    """
    num_bins, padded = opts.num_mel_bins, opts.padded_window_size
    nyquist = 0.5 * opts.sample_frequency
    high_freq = opts._high_freq()
    mel_low, mel_high = math.log(1.0 + opts.low_freq / 700.0) * 1127.0, math.log(1.0 + high_freq / 700.0) * 1127.0
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    bin_index = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + bin_index * mel_delta
    center = mel_low + (bin_index + 1.0) * mel_delta
    right = mel_low + (bin_index + 2.0) * mel_delta
    if opts.vtln_warp != 1.0:
        vtln_high = opts.vtln_high + nyquist if opts.vtln_high < 0.0 else opts.vtln_high
        left, center, right = (
            _mel(_vtln_warp_freq(opts, high_freq, vtln_high, _inverse_mel(m))) for m in (left, center, right)
        )
    fft_mel = _mel(opts.sample_frequency / padded * torch.arange(padded / 2)).unsqueeze(0)
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    if opts.vtln_warp == 1.0:
        return torch.max(torch.zeros(1), torch.min(up, down))
    rising = (fft_mel > left) & (fft_mel <= center)
    falling = (fft_mel > center) & (fft_mel < right)
    return torch.where(rising, up, torch.where(falling, down, torch.zeros(1)))


@dataclass(frozen=True)
class KernelTables:
    """What the CUDA kernel reads besides the samples: all small, all built on the host."""

    window: torch.Tensor  # [window_size] float64
    fft_twiddles: torch.Tensor  # [P/2, 2] float64: the complex FFT's, pass by pass (fft_pass_twiddles)
    real_twiddles: torch.Tensor  # [P/2, 2] float64: exp(-2 pi i k / P), to split the real spectrum
    mel_start: torch.Tensor  # [num_mel_bins] int32: first FFT bin with weight
    mel_len: torch.Tensor  # [num_mel_bins] int32: number of FFT bins from mel_start
    mel_weights: torch.Tensor  # [max(mel_len), num_mel_bins] float32: column m is bin m's run, zero past
    # mel_len[m] (bin-major so that a warp's lanes, one Mel bin each, read one row together). float32:
    # torchaudio builds the filters in the default dtype, so they are exact unless that is float64
    # (then rounded by 6e-8 of a weight; a log moves by as much), in half the bytes of float64.


def _unit_circle(count: int, period: int) -> torch.Tensor:
    angle = torch.arange(count, dtype=torch.float64) * (-2.0 * math.pi / period)
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def fft_pass_twiddles(n: int) -> torch.Tensor:
    """``[n, 2]`` float64 twiddles of the kernel's ``n``-point Stockham FFT (csrc/fbank/fbank_frame.cuh,
    ``fft_passes``), pass by pass: passes of radix ``R = min(8, n / s)`` at sub-transform length
    ``s = 1, R1, R1 R2, ...``; the pass at ``s > 1`` owns entries ``r s + k`` for ``r`` in ``[1, R)``
    and ``k`` in ``[0, s)``, holding ``exp(-2 pi i k r / (s R))``. The first pass needs none: rows
    ``[0, R1)`` are zero."""
    table = torch.zeros(n, 2, dtype=torch.float64)
    span = pass_radix(n, 1)
    while span < n:
        radix = pass_radix(n, span)
        r = torch.arange(1, radix, dtype=torch.float64).unsqueeze(1)
        k = torch.arange(span, dtype=torch.float64)
        angles = (k * r).flatten() * (-2.0 * math.pi / (span * radix))
        table[span : span * radix] = torch.stack([angles.cos(), angles.sin()], dim=1)
        span *= radix
    return table


def pass_radix(n: int, span: int) -> int:
    """The radix of the kernel's FFT pass at sub-transform length ``span`` (fbank_frame.cuh's)."""
    return min(8, n // span)


# The tables are built eagerly on the CPU and cached, whatever the caller's context: torch.compile
# would otherwise trace through the cache and let Inductor recompute the Mel weights with other
# float32 rounding (up to 9e-3 relative on the smallest weights, 9e-3 on a tone's log features),
# and a default device (torch.set_default_device) would otherwise build them there.
@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def kernel_tables(opts: FbankOptions, device: torch.device, default_dtype: torch.dtype) -> KernelTables:
    """The kernel's tables: the Mel filters stored sparsely as one contiguous run per Mel bin."""
    with torch.device("cpu"):
        return _kernel_tables(opts, device)


def _kernel_tables(opts: FbankOptions, device: torch.device) -> KernelTables:
    half = opts.padded_window_size // 2
    banks = mel_banks(opts).double()
    nonzero = banks != 0
    has_any = nonzero.any(dim=1)
    first = torch.where(has_any, nonzero.int().argmax(dim=1), torch.zeros_like(has_any, dtype=torch.int64))
    last = torch.where(has_any, half - 1 - nonzero.flip(1).int().argmax(dim=1), first - 1)
    length = last - first + 1
    width = max(int(length.max()), 1)
    columns = first.unsqueeze(1) + torch.arange(width)
    weights = banks.gather(1, columns.clamp(max=half - 1)) * (torch.arange(width) < length.unsqueeze(1))
    to = functools.partial(torch.Tensor.to, device=device)
    return KernelTables(
        window=to(window_function(opts)),
        fft_twiddles=to(fft_pass_twiddles(half)),
        real_twiddles=to(_unit_circle(half, 2 * half)),
        mel_start=to(first.int()),
        mel_len=to(length.int()),
        mel_weights=to(weights.t().contiguous().float()),
    )


@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def _torch_tables(opts, device, compute_dtype, feature_dtype, default_dtype):
    # Built outside inference mode whatever the first caller's mode: cached inference tensors would
    # make every later differentiable call fail ("cannot be saved for backward").
    with torch.inference_mode(False), torch.device("cpu"):
        return window_function(opts, device).to(compute_dtype), mel_banks(opts).to(device, feature_dtype)


# Mel bins per band of the CPU's banded projection: 8 bands of 16 of AudioMAE's 128 bins read 268 FFT
# bins in all instead of 8 x 256, which halves the Mel matmul's time on the CPU (fewer bands pay
# in wasted zeros, more in calls).
MEL_BAND_SIZE = 16


@functools.lru_cache(maxsize=32)
def _mel_bands(banks: torch.Tensor) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """``banks`` ``[bins, fft_bins]`` cut into runs of ``MEL_BAND_SIZE`` Mel bins, each with the
    FFT-bin range ``[k0, k1)`` outside which all its weights are zero: ``(m0, m1, k0, k1, weights)``.
    The triangles of consecutive Mel bins overlap only their neighbours, so each band is narrow."""
    bands = []
    for m0 in range(0, banks.shape[0], MEL_BAND_SIZE):  # banks is a cached table, never an inference tensor
        m1 = min(m0 + MEL_BAND_SIZE, banks.shape[0])
        nonzero = (banks[m0:m1] != 0).any(0).nonzero().flatten().tolist()
        k0, k1 = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, 0)
        bands.append((m0, m1, k0, k1, banks[m0:m1, k0:k1].contiguous()))
    return tuple(bands)


def _apply_banks(spectrum: torch.Tensor, banks: torch.Tensor, banded: bool) -> torch.Tensor:
    """``spectrum @ banks.T`` over the last axis. ``banded`` (the CPU without autograd) multiplies
    each band of Mel bins by its nonzero FFT bins only; the same products and sums, so the same
    values, in about half the time."""
    if not banded:
        return spectrum @ banks.T
    rows = spectrum.reshape(-1, spectrum.shape[-1])
    out = rows.new_empty(rows.shape[0], banks.shape[0])
    for m0, m1, k0, k1, weights in _mel_bands(banks):
        if k1 == k0:
            out[:, m0:m1].zero_()
        else:
            # A column block of the row-major output is a BLAS matrix with a leading dimension:
            # written in place, no transposed copy afterwards (3x faster than bins-major plus copy).
            torch.mm(rows[:, k0:k1], weights.T, out=out[:, m0:m1])
    return out.reshape(*spectrum.shape[:-1], banks.shape[0])


# ---------------------------------------------------------------------------------------------
# Torch backend.


def _framed_sequence(x: torch.Tensor, lengths: torch.Tensor | None, first_frame: int, num_frames: int,
                     opts: FbankOptions) -> torch.Tensor:
    """The ``[B, M]`` samples whose windows of ``window_size`` every ``window_shift`` are frames
    ``first_frame .. first_frame + num_frames - 1``: a slice of ``x`` when edges are snipped, else
    each clip reflected about its own ends."""
    begin = first_frame * opts.window_shift
    end = begin + (num_frames - 1) * opts.window_shift + opts.window_size
    if opts.snip_edges:
        return x[:, begin:end]
    # Reflect each clip about its own ends: sample -1 is sample 0, sample L is sample L - 1.
    position = torch.arange(begin, end, device=x.device) - opts.reflect_pad()
    clip_length = x.shape[1] if lengths is None else lengths.unsqueeze(1)
    position = torch.where(position < 0, -position - 1, position)
    position = torch.where(position >= clip_length, 2 * clip_length - 1 - position, position)
    position = position.clamp(0, x.shape[1] - 1)
    return x[:, position] if lengths is None else x.gather(1, position)


def _frames(sequence: torch.Tensor, num_frames: int, opts: FbankOptions) -> torch.Tensor:
    """``[B, num_frames, window_size]`` overlapping frames of ``sequence`` ``[B, M]`` (a view)."""
    return sequence.unfold(1, opts.window_size, opts.window_shift)[:, :num_frames]


def _emphasized(sequence: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``sequence[i] - coefficient * sequence[i - 1]``, once per sample where per frame each sample
    would be done ``window_size / window_shift`` times (2.5 for Kaldi's defaults). Index 0 is never
    read: a frame's first sample has its own rule (Kaldi's ``x[-1] = x[0]``)."""
    if coefficient == 0.0:
        return sequence
    out = torch.empty_like(sequence)
    torch.add(sequence[:, 1:], sequence[:, :-1], alpha=-coefficient, out=out[:, 1:])
    out[:, 0] = 0.0
    return out


def _log_energy(frames: torch.Tensor, energy_floor: float) -> torch.Tensor:
    log_energy = frames.pow(2).sum(-1).clamp_min(LOG_FLOOR).log()
    return log_energy.clamp_min(math.log(energy_floor)) if energy_floor > 0.0 else log_energy


# Frames per block on the CPU: a block's buffers stay near the cores, where one pass over the whole
# batch's [B, frames, padded] float64 intermediates would stream them from memory. On a 2-core EPYC
# (32 MiB of L3 shared with other tenants): blocks of 2048 frames (whose float64 FFT input and
# output alone are 16 MiB) ran 10-25% slower than 1024 on ten-second clips; on one-second clips 768
# did best (the path 4.1x to 4.5x torchaudio's loop on 64 clips, 2.7x to 3.7x at 1024, 3.9x at 384).
CPU_BLOCK_FRAMES = 768


def _cpu_blocks(batch: int, num_frames: int) -> list[tuple[int, int, int, int]]:
    """The CPU's blocks ``(b0, b1, f0, f1)``, clips ``b0:b1`` and frames ``f0:f1``, of about
    ``CPU_BLOCK_FRAMES`` frames each: whole clips together where a clip is shorter than that, else
    each clip's frames in equal runs (the nearest count, so a ten-second clip's 998 frames stay one
    block: split in two they ran 14% slower). Either way a block's features are one contiguous
    piece of the result, which the log then writes in place."""
    if batch == 0 or num_frames == 0:
        return []
    target = max(1, CPU_BLOCK_FRAMES)
    runs = max(1, round(num_frames / target))
    if runs > 1:
        # Each clip's full runs first, the shorter last runs after: blocks of one shape in a row.
        step = -(-num_frames // runs)
        full = [(b, b + 1, f0, f0 + step) for b in range(batch) for f0 in range(0, num_frames - step + 1, step)]
        rest = num_frames % step
        return full + [(b, b + 1, num_frames - rest, num_frames) for b in range(batch) if rest]
    groups = max(1, round(batch * num_frames / target))
    clips = -(-batch // groups)
    return [(b0, min(b0 + clips, batch), 0, num_frames) for b0 in range(0, batch, clips)]


def _frame_features(frames, window, banks, opts: FbankOptions, generator, padded, emphasized=None) -> torch.Tensor:
    """``[..., window_size]`` frames -> ``[..., num_features]`` in ``banks``' dtype, Kaldi's
    per-frame pipeline. ``padded`` ``[..., padded_window_size]`` is the FFT input, zero past
    ``window_size`` (only the body is written here). ``emphasized``, when given, holds the same
    frames of the pre-emphasised sequence (``_emphasized``; no dither, no autograd): the body is
    then two passes instead of four. The CPU without autograd or dither has its own
    ``_CpuBlockPipeline``.

    Precision: everything up to the FFT runs in ``frames``' dtype (float64 by default): the FFT
    of a frame whose spectrum spans many decades (a tone) cancels, and float32 there misses the
    float64 log-Mel energies by more than 1e-3. The power spectrum, the Mel sums (sums of
    non-negative terms, relative error about n * eps) and the log are well conditioned and run in
    ``banks``' dtype, the output's."""
    source = frames
    if opts.dither != 0.0:
        source = frames + opts.dither * torch.randn(frames.shape, generator=generator, device=frames.device,
                                                    dtype=frames.dtype)
    mean = source.mean(-1, keepdim=True) if opts.remove_dc_offset else None
    if opts.use_energy and opts.raw_energy:
        log_energy = _log_energy(source - mean if mean is not None else source, opts.energy_floor)
    body = padded[..., : frames.shape[-1]]
    coefficient = opts.preemphasis_coefficient
    if emphasized is not None:
        # Kaldi's frame is w * (y - (1 - c) * mean), y[i] = x[i] - c x[i-1], y[0] = (1 - c) x[0]:
        # removing the mean before the pre-emphasis leaves (1 - c) * mean to take off every sample.
        torch.mul(emphasized, window, out=body)
        body[..., 0] = source[..., 0] * window[0] * (1.0 - coefficient)
        if mean is not None:
            body.addcmul_(mean, window, value=coefficient - 1.0)
    else:
        if coefficient != 0.0:
            # The same, from the frames (a dithered or differentiable call); out= cannot record
            # autograd, so a differentiable call takes two passes.
            if source.requires_grad and torch.is_grad_enabled():
                body[..., 1:].copy_(source[..., 1:]).sub_(source[..., :-1], alpha=coefficient)
            else:
                torch.add(source[..., 1:], source[..., :-1], alpha=-coefficient, out=body[..., 1:])
            body[..., 0] = source[..., 0] * (1.0 - coefficient)
        else:
            body.copy_(source)
        if mean is not None:
            body.sub_(mean * (1.0 - coefficient))
        body *= window
    if opts.use_energy and not opts.raw_energy:
        log_energy = _log_energy(body, opts.energy_floor)
    # |X|^2 from the real and imaginary parts (no square root and square), Nyquist bin dropped.
    spectrum = torch.fft.rfft(padded)[..., : opts.padded_window_size // 2]
    if not opts.use_power and spectrum.requires_grad and torch.is_grad_enabled():
        # |X| itself, as torchaudio takes it: its gradient at a silent bin is 0, where the square
        # root of the power would give 0/0 = NaN to every sample of a silent frame.
        spectrum = spectrum.abs().to(banks.dtype)
    else:
        squares = torch.view_as_real(spectrum).to(banks.dtype).square_()
        spectrum = squares[..., 0] + squares[..., 1]
        if not opts.use_power:
            spectrum.sqrt_()
    banded = spectrum.device.type == "cpu" and not (spectrum.requires_grad and torch.is_grad_enabled())
    features = _apply_banks(spectrum, banks, banded)
    if opts.use_log_fbank:
        features = features.clamp_min_(LOG_FLOOR).log_()
    if opts.use_energy:
        energy = log_energy.to(features.dtype).unsqueeze(-1)
        features = torch.cat([features, energy] if opts.htk_compat else [energy, features], dim=-1)
    return features


class _CpuBlockPipeline:
    """The CPU's pipeline for blocks of one shape, ``clips`` x ``count`` frames, without autograd or
    dither: every buffer is made once a call and every view of it once, so a block costs some 25
    torch operations on data that stays near the cores. The general path's 70 operations a block
    (views, slices, allocations) cost about 150 us each block in the dispatcher, 10-15 % of the
    path on ten-second clips, and its output, written band by band, missed the cache on the first
    band of each row. Arithmetic as ``_frame_features``' (the same steps on the same numbers):
    float64 up to the FFT, the output's dtype after it."""

    def __init__(self, clips: int, count: int, opts: FbankOptions, window: torch.Tensor, banks: torch.Tensor):
        S, W, P = opts.window_shift, opts.window_size, opts.padded_window_size
        span = (count - 1) * S + W  # the samples a clip's frames cover
        self.opts, self.window, self.coefficient = opts, window, opts.preemphasis_coefficient
        self.samples = window.new_empty(clips, span)
        self.frames = self.samples.unfold(1, W, S)
        emphasized = self.samples
        if self.coefficient != 0.0:
            # Pre-emphasised once per sample, not per frame (2.5 times as many for Kaldi's defaults);
            # a frame's first sample has its own rule (Kaldi's x[-1] = x[0]), so index 0 is never read.
            emphasized = window.new_zeros(clips, span)
            self.later_samples, self.earlier_samples = self.samples[:, 1:], self.samples[:, :-1]
            self.emphasized_later = emphasized[:, 1:]
            self.first_samples = self.samples[:, 0 : (count - 1) * S + 1 : S]
            self.first_weight = float(window[0]) * (1.0 - self.coefficient)
        self.emphasized_frames = emphasized.unfold(1, W, S)
        self.fft_input = window.new_empty(clips, count, P)
        self.fft_input[..., W:].zero_()
        self.body, self.body_first = self.fft_input[..., :W], self.fft_input[..., 0]
        if opts.remove_dc_offset:
            self.means = window.new_empty(clips, count, 1)
            # Kaldi's frame is w * (y - (1 - c) * mean), y the pre-emphasised samples: removing the
            # mean before the pre-emphasis leaves (1 - c) * mean to take off every sample.
            self.dc_scale = self.coefficient - 1.0
        half = P // 2  # the Nyquist bin dropped, as Kaldi does
        self.squares = banks.new_empty(clips, count, half, 2)
        self.power = banks.new_empty(clips, count, half)
        self.mel = banks.new_empty(clips * count, banks.shape[0])
        power_rows = self.power.view(clips * count, half)
        self.bands, self.empty_bands = [], []  # (power columns, weights, Mel columns); weightless Mel columns
        for m0, m1, k0, k1, weights in _mel_bands(banks):
            if k1 > k0:
                self.bands.append((power_rows[:, k0:k1], weights.T, self.mel[:, m0:m1]))
            else:
                self.empty_bands.append(self.mel[:, m0:m1])
        self.first_bin = 1 if opts.use_energy and not opts.htk_compat else 0

    def __call__(self, sequence: torch.Tensor, out: torch.Tensor) -> None:
        """Features of ``sequence`` ``[clips, span]`` (the samples of the block's frames) into
        ``out`` ``[clips, count, num_features]``, a contiguous block of the caller's result."""
        opts = self.opts
        self.samples.copy_(sequence)
        if self.coefficient != 0.0:
            torch.add(self.later_samples, self.earlier_samples, alpha=-self.coefficient, out=self.emphasized_later)
        torch.mul(self.emphasized_frames, self.window, out=self.body)
        if self.coefficient != 0.0:
            torch.mul(self.first_samples, self.first_weight, out=self.body_first)
        if opts.remove_dc_offset:
            # torch.mean, as torchaudio takes it: the same rounding where a DC offset dwarfs the
            # signal (sums of runs of samples, tried, saved nothing and moved that rounding).
            torch.mean(self.frames, -1, keepdim=True, out=self.means)
            self.body.addcmul_(self.means, self.window, value=self.dc_scale)
        if opts.use_energy:
            if not opts.raw_energy:
                energy = self.body
            else:
                energy = self.frames - self.means if opts.remove_dc_offset else self.frames
            log_energy = _log_energy(energy, opts.energy_floor)
        # |X|^2 from the real and imaginary parts (no square root and square), Nyquist bin dropped.
        spectrum = torch.view_as_real(torch.fft.rfft(self.fft_input))[..., : self.power.shape[-1], :]
        squares = self.squares.copy_(spectrum).square_()
        torch.add(squares[..., 0], squares[..., 1], out=self.power)
        if not opts.use_power:
            self.power.sqrt_()
        for band in self.empty_bands:
            band.zero_()
        for power, weights, mel in self.bands:
            # A column block of the row-major Mel sums is a BLAS matrix with a leading dimension:
            # written in place, no transposed copy afterwards (3x faster than bins-major plus copy).
            torch.mm(power, weights, out=mel)
        rows = out.view(-1, out.shape[-1])
        bins = rows[:, self.first_bin : self.first_bin + self.mel.shape[1]]
        # The Mel sums stay in a buffer near the cores; the result is written once, in order, by
        # the log (a strided write of a fresh result band by band ran 2-5x slower).
        if opts.use_log_fbank:
            torch.log(self.mel.clamp_min_(LOG_FLOOR), out=bins)
        else:
            bins.copy_(self.mel)
        if opts.use_energy:
            rows[:, -1 if opts.htk_compat else 0] = log_energy.reshape(-1)


def fbank_torch(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None,
    num_frames: int,
    opts: FbankOptions,
    *,
    compute_dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Features ``[B, num_frames, num_features]`` of ``waveforms`` ``[B, N]``, every clip at once.

    Inputs are assumed validated (``fbank`` does it). Up to the FFT the arithmetic is in
    ``compute_dtype``, after it in the waveform's dtype (``_frame_features`` says why);
    ``compute_dtype=float32`` is the plain float32 pipeline (as fast as it gets, not within 1e-3
    on tones): benchmarks compare against it. On the CPU the frames go through in blocks of about
    ``CPU_BLOCK_FRAMES`` (whole clips together, or runs of one clip's frames), on the GPU in one piece.
    """
    feature_dtype = waveforms.dtype if compute_dtype == torch.float64 else compute_dtype
    differentiable = waveforms.requires_grad and torch.is_grad_enabled()
    if differentiable and lengths is not None:
        # Frames past a clip's end are zeroed after the fact; their backward multiplies zeros by
        # whatever they computed, so padding that is NaN or Inf would reach the clip's samples.
        past_end = torch.arange(waveforms.shape[1], device=waveforms.device) >= lengths.unsqueeze(1)
        waveforms = waveforms.masked_fill(past_end, 0.0)
    # Everything before the FFT stays in compute_dtype too: float32 framing (the window's rounding
    # alone) puts a noise floor under a tone's spectrum that moves quiet Mel bins by more than 1e-3.
    window, banks = _torch_tables(opts, waveforms.device, compute_dtype, feature_dtype, torch.get_default_dtype())
    B = waveforms.shape[0]
    blocks = [(0, B, 0, num_frames)] if waveforms.is_cuda else _cpu_blocks(B, num_frames)
    # The CPU without autograd runs its blocks in inference mode: its operations skip autograd's
    # bookkeeping. The result is allocated outside it, an ordinary tensor a caller may hand to
    # autograd. Not under forward AD or a torch.func transform, whose tangents or batching inference
    # mode would drop or garble where the out= ops refuse them with a clear error.
    quiet = (not differentiable and not waveforms.is_cuda and fwAD.unpack_dual(waveforms).tangent is None
             and not torch._C._functorch.is_functorch_wrapped_tensor(waveforms))
    features = None if len(blocks) == 1 and not quiet else \
        torch.empty(B, num_frames, opts.num_features, dtype=feature_dtype, device=waveforms.device)
    pipelines = {}
    with torch.inference_mode() if quiet else contextlib.nullcontext():
        for b0, b1, f0, f1 in blocks:
            clips, count = b1 - b0, f1 - f0
            # Each block frames its own samples, converted to compute_dtype there (a few MB that stay
            # near the cores on the CPU): converting and pre-emphasising the whole batch first streamed
            # two float64 copies of it through memory.
            sequence = _framed_sequence(waveforms[b0:b1], None if lengths is None else lengths[b0:b1], f0, count, opts)
            if quiet and opts.dither == 0.0:
                if (clips, count) not in pipelines:
                    pipelines[clips, count] = _CpuBlockPipeline(clips, count, opts, window, banks)
                pipelines[clips, count](sequence, features[b0:b1, f0:f1])
                continue
            sequence = sequence.to(compute_dtype)
            frames = _frames(sequence, count, opts)
            emphasized = None
            if opts.dither == 0.0 and not differentiable:
                emphasized = _frames(_emphasized(sequence, opts.preemphasis_coefficient), count, opts)
            # A new FFT input each block (autograd keeps it for the backward). Only the padding past
            # window_size is zeroed: _frame_features writes the body, and zeroing all of it would
            # be a memset of the whole batch's frames on the GPU (1 GB in float64 for 256
            # ten-second clips).
            buffer = waveforms.new_empty(clips, count, opts.padded_window_size, dtype=compute_dtype)
            buffer[..., opts.window_size :].zero_()
            block = _frame_features(frames, window, banks, opts, generator, buffer, emphasized)
            if features is None:
                features = block
            else:
                features[b0:b1, f0:f1] = block
    if lengths is not None:
        valid = torch.arange(num_frames, device=features.device) < opts.num_frames(lengths).unsqueeze(1)
        features = features.masked_fill(~valid.unsqueeze(-1), 0.0)
    if opts.subtract_mean:
        count = opts.num_frames(lengths) if lengths is not None else torch.tensor([num_frames], device=features.device)
        mean = features.sum(1, keepdim=True) / count.view(-1, 1, 1).to(features.dtype)
        features = features - mean
        if lengths is not None:
            features = features.masked_fill(~valid.unsqueeze(-1), 0.0)
    return features.to(waveforms.dtype)


# ---------------------------------------------------------------------------------------------
# CUDA backend: the extension's launcher as a custom op so torch.compile can trace through it.


@torch.library.custom_op("audiomae::fbank_cuda", mutates_args=())
def _fbank_cuda_op(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    num_frames: int,
    window: torch.Tensor,
    fft_twiddles: torch.Tensor,
    real_twiddles: torch.Tensor,
    mel_start: torch.Tensor,
    mel_len: torch.Tensor,
    mel_weights: torch.Tensor,
    window_shift: int,
    reflect_pad: int,
    snip_edges: bool,
    remove_dc_offset: bool,
    preemphasis_coefficient: float,
    raw_energy: bool,
    energy_floor: float,
    use_energy: bool,
    htk_compat: bool,
    use_log_fbank: bool,
    use_power: bool,
    launch_shape: int,
    fast_path: bool,
) -> torch.Tensor:
    from kernels._cuda_extension import load_extension

    return load_extension("fbank").fbank_cuda(
        waveforms, lengths, num_frames, window, fft_twiddles, real_twiddles, mel_start, mel_len, mel_weights,
        window_shift, reflect_pad, snip_edges, remove_dc_offset, preemphasis_coefficient, raw_energy,
        energy_floor, use_energy, htk_compat, use_log_fbank, use_power, launch_shape, fast_path,
    )  # fmt: skip


@_fbank_cuda_op.register_fake
def _(waveforms, lengths, num_frames, window, fft_twiddles, real_twiddles, mel_start, mel_len, mel_weights,
      window_shift, reflect_pad, snip_edges, remove_dc_offset, preemphasis_coefficient, raw_energy, energy_floor,
      use_energy, htk_compat, use_log_fbank, use_power, launch_shape, fast_path):
    num_features = mel_start.shape[0] + (1 if use_energy else 0)
    return waveforms.new_empty(waveforms.shape[0], num_frames, num_features)


# The kernel's launch shapes (csrc/fbank/fbank.cu, kLaunchShapes): (frames per block, blocks per
# SM asked of the register allocator). ptxas (sm_90, CUDA 13.0, 2026-11-28) gives them 126, 96 and
# 80 registers a thread; the last spills (40 bytes stored, 136 loaded). A 512-point frame takes
# 9 KiB of shared memory, so an SM holds at most 24 warps whatever the registers allow: 16, 20 and
# 24 warps an SM. Float32 clips take DEFAULT_LAUNCH_SHAPE, the fastest on the GPU for the general
# pipeline: on an H200 (2026-11-27, batch 256 ten-second clips,
# benches/results/gpu_check-h200-2026-11-27.json) the three read 1.152, 0.9995 and 1.016 ms (two
# more shapes at 72 registers, 1.061 and 1.066 ms, are gone: they spill with the specialisation
# below), before the 512-point specialisation, which no GPU has timed yet. Float64 clips take
# shape 0 (no spills at 128 registers). ``forced_launch_shape`` picks another for float32, which
# the benchmark uses to time each.
LAUNCH_SHAPES = ((8, 2), (4, 5), (8, 3))
DEFAULT_LAUNCH_SHAPE = 1
_LAUNCH_SHAPE = DEFAULT_LAUNCH_SHAPE

# Frames of a 512-point padded window (25 ms at 16 kHz: every AudioMAE, SSAST and MAE-AST front
# end) that lie inside their clip take the kernel's specialisation of the frame pipeline
# (compute_frame_512 in csrc/fbank/fbank_frame.cuh: every size a constant, each sample read and
# converted once, float Mel sums for float features); the others, and every frame when
# ``forced_general_path`` is on, take the general pipeline. Same features within rounding.
_FAST_PATH = True


@contextlib.contextmanager
def forced_launch_shape(shape: int):
    """Launch float32 clips with ``LAUNCH_SHAPES[shape]`` inside the block (for measuring; a
    process-wide setting, not for concurrent use)."""
    global _LAUNCH_SHAPE
    if not isinstance(shape, int) or not 0 <= shape < len(LAUNCH_SHAPES):
        raise ValueError(f"shape must be an index into LAUNCH_SHAPES (0 to {len(LAUNCH_SHAPES) - 1}), got {shape!r}")
    previous, _LAUNCH_SHAPE = _LAUNCH_SHAPE, shape
    try:
        yield
    finally:
        _LAUNCH_SHAPE = previous


@contextlib.contextmanager
def forced_general_path():
    """Run every frame through the kernel's general pipeline, none through its 512-point
    specialisation (for measuring the one against the other; a process-wide setting, not for
    concurrent use)."""
    global _FAST_PATH
    previous, _FAST_PATH = _FAST_PATH, False
    try:
        yield
    finally:
        _FAST_PATH = previous


def fbank_cuda(waveforms: torch.Tensor, lengths: torch.Tensor, num_frames: int, opts: FbankOptions) -> torch.Tensor:
    """The kernel on ``waveforms`` ``[B, N]`` (contiguous CUDA) and ``lengths`` ``[B]`` int64."""
    t = kernel_tables(opts, waveforms.device, torch.get_default_dtype())
    shape = _LAUNCH_SHAPE if waveforms.dtype == torch.float32 else 0
    return _fbank_cuda_op(
        waveforms, lengths, num_frames, t.window, t.fft_twiddles, t.real_twiddles, t.mel_start, t.mel_len,
        t.mel_weights, opts.window_shift, opts.reflect_pad(), opts.snip_edges, opts.remove_dc_offset,
        opts.preemphasis_coefficient, opts.raw_energy, opts.energy_floor, opts.use_energy, opts.htk_compat,
        opts.use_log_fbank, opts.use_power, shape, _FAST_PATH,
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _kernel_unavailable(device_index: int) -> str | None:
    """None when the CUDA extension loads (building it the first time) and holds code that CUDA
    device ``device_index`` can run, else why not. An extension built ahead of time for sm_90 plus
    PTX imports on an older GPU too; without this check "auto" would fail at the launch there."""
    from kernels._cuda_extension import load_extension

    try:
        extension = load_extension("fbank")
        problem = extension.fbank_cuda_unavailable(device_index)
    except Exception as error:  # noqa: BLE001 - any build failure means "use the torch path"
        message = str(error).strip()
        if len(message) > 400:  # a compiler's command line first, its reason last: keep the reason
            message = "..." + message[-400:]
        return f"the CUDA extension did not build or load ({type(error).__name__}: {message})"
    if not problem:
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return (f"the CUDA extension has no code that {torch.cuda.get_device_name(device_index)} (sm_{major}{minor}) "
            f"can run ({problem}); rebuild it with TORCH_CUDA_ARCH_LIST={major}.{minor}")


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"kernels.fbank: {reason}; ran the torch path", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Public entry point.


def _check_lengths(lengths, batch: int, num_samples: int, device: torch.device) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.numel() == 0:
        lengths = lengths.to(torch.int64)  # an empty list or array carries no integer dtype to check
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}] (one per clip), got {list(lengths.shape)}")
    values = lengths.tolist()  # Python integers: exact for every integer dtype, unsigned ones included
    if batch and (min(values) < 0 or max(values) > num_samples):
        raise ValueError(f"lengths must lie in [0, {num_samples}] (the padded clip length), got {values}")
    return lengths.to(device=device, dtype=torch.int64).contiguous()  # a strided view would reach the kernel as is


def fbank(
    waveforms: torch.Tensor,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    generator: torch.Generator | None = None,
    **options,
):
    """Kaldi fbank features of one clip ``[N]`` or a batch of clips ``[B, N]``; see the module docstring.

    Returns ``[frames, bins]`` for one clip, ``[B, frames, bins]`` for a batch, and with ``lengths``
    the pair ``(features, num_frames)``, ``num_frames`` ``[B]`` int64 each clip's frame count.
    ``bins`` is ``num_mel_bins`` plus one with ``use_energy``."""
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    unknown = sorted(set(options) - set(FbankOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"fbank() got unknown option(s) {unknown}; torchaudio's names are {sorted(FbankOptions.__dataclass_fields__)}")
    # A 0-dim tensor (a sample rate from a dataloader) as its Python number, as torchaudio's arithmetic takes it.
    options = {name: value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value
               for name, value in options.items()}
    opts = replace(FbankOptions(), **options)
    opts.validate()
    if type(opts.num_mel_bins) is not int:  # a NumPy or torch integer: a plain int for the kernel's launcher
        opts = replace(opts, num_mel_bins=int(opts.num_mel_bins))
    if not isinstance(waveforms, torch.Tensor):
        raise TypeError(f"waveforms must be a torch.Tensor, got {type(waveforms).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != waveforms.device.type:
        raise ValueError(f"generator is on {generator.device} but waveforms on {waveforms.device}: dither draws "
                         "its noise on the waveforms' device")
    if waveforms.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"waveforms must be float32 or float64, got {waveforms.dtype}")
    if waveforms.dim() not in (1, 2):
        raise ValueError(f"waveforms must be [N] or [B, N] (a batch of clips), got shape {list(waveforms.shape)}")
    single = waveforms.dim() == 1
    if single and lengths is not None:
        raise ValueError("lengths is for a batch [B, N]; a single clip [N] is its own length")
    batch = waveforms.unsqueeze(0) if single else waveforms
    num_samples = batch.shape[1]
    if lengths is not None:
        lengths = _check_lengths(lengths, batch.shape[0], num_samples, batch.device)
        shortest = int(lengths.min()) if batch.shape[0] else num_samples
    else:
        shortest = num_samples
    if shortest < opts.window_size:
        raise ValueError(
            f"a clip of {shortest} samples is shorter than one frame ({opts.window_size} samples = "
            f"{opts.frame_length} ms at {opts.sample_frequency} Hz)"
        )
    if check_finite:
        valid = batch if lengths is None else batch.masked_fill(torch.arange(num_samples, device=batch.device) >= lengths.unsqueeze(1), 0.0)
        if not bool(torch.isfinite(valid).all()):
            raise ValueError("waveforms contain NaN or Inf samples")
    longest = num_samples if lengths is None else (int(lengths.max()) if batch.shape[0] else 0)
    num_frames = max(opts.num_frames(longest), 0)  # below 0 only for an empty batch with lengths

    use_kernel = _choose_backend(backend, batch, opts)
    # No frames happens without snip_edges when the shift exceeds twice the clip; no clips, with an
    # empty batch (its features are [0, frames, bins], like any torch op's on an empty batch).
    if num_frames == 0 or batch.shape[0] == 0:
        features = batch.new_zeros(batch.shape[0], num_frames, opts.num_features)
    elif use_kernel:
        clip_lengths = lengths if lengths is not None else torch.full((batch.shape[0],), num_samples, device=batch.device)
        features = fbank_cuda(batch.contiguous(), clip_lengths, num_frames, opts)
    else:
        features = fbank_torch(batch, lengths, num_frames, opts, generator=generator)
    if single:
        return features[0]
    if lengths is None:
        return features
    return features, opts.num_frames(lengths)


def kernel_frame_bytes(padded_window_size: int) -> int:
    """Shared memory the kernel takes for one frame (csrc/fbank/fbank_frame.cuh, scratch_doubles):
    two FFT buffers of P/2 complex doubles with one spare slot per 8."""
    half = padded_window_size // 2
    return 2 * 2 * (half + half // 8) * 8


@functools.lru_cache(maxsize=None)
def _shared_memory_shortfall(padded_window_size: int, device_index: int) -> str | None:
    """Why a frame does not fit the shared memory a block may have on the device, or None (a
    4096-point frame takes 72 KiB; an sm_75 GPU allows a block 64 KiB)."""
    needed = kernel_frame_bytes(padded_window_size)
    allowed = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 48 * 1024)
    if needed <= allowed:
        return None
    return (f"a padded window of {padded_window_size} samples needs {needed} bytes of shared memory a frame, "
            f"more than the {allowed} a block may have on this GPU")


def _choose_backend(backend: str, waveforms: torch.Tensor, opts: FbankOptions) -> bool:
    """True for the kernel; raises for ``backend="cuda"`` when the kernel cannot serve the call."""
    if backend == "torch":
        return False
    if waveforms.device.type != "cuda":
        if backend == "cuda":
            raise ValueError(f"backend='cuda' needs CUDA waveforms, got device {waveforms.device}")
        return False
    reason = opts.cuda_unsupported()
    if reason is None and waveforms.requires_grad and torch.is_grad_enabled():
        reason = "waveforms require grad (the kernel has no backward)"
    device_index = waveforms.device.index if waveforms.device.index is not None else torch.cuda.current_device()
    if reason is None:
        reason = _kernel_unavailable(device_index)
    if reason is None:
        reason = _shared_memory_shortfall(opts.padded_window_size, device_index)
    if reason is None:
        return True
    if backend == "cuda":
        raise ValueError(f"backend='cuda' cannot serve this call: {reason}")
    _warn_once(reason)
    return False
