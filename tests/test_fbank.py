"""kernels.fbank against torchaudio.compliance.kaldi.fbank run in float64.

The torch backend runs here; the CUDA kernel's arithmetic (csrc/fbank/fbank_frame.cuh) runs here
through csrc/fbank/fbank_host_test.cpp, compiled with g++ and called through ctypes; the kernel
itself runs in the ``gpu`` tests.
"""
import contextlib
import ctypes
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchaudio.compliance import kaldi

from kernels.fbank import (
    LAUNCH_SHAPES, FbankOptions, _fbank_cuda_op, _warn_once, fft_pass_twiddles, fbank, forced_general_path,
    forced_launch_shape, kernel_tables,
)

ATOL = 1e-3
CSRC = Path(__file__).resolve().parent.parent / "csrc" / "fbank"


def make_clip(kind: str, num_samples: int, sample_rate: float, seed: int = 0) -> torch.Tensor:
    """float32 test clips: speech-like, noise, tone, sweep, silent."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    nyquist = sample_rate / 2
    if kind == "noise":
        x = 0.1 * torch.randn(num_samples, generator=g, dtype=torch.float64)
    elif kind == "tone":
        x = 0.5 * torch.sin(2 * math.pi * 440.0 * t + 0.3)
    elif kind == "sweep":
        f0, f1, duration = 50.0, 0.9 * nyquist, num_samples / sample_rate
        x = 0.5 * torch.sin(2 * math.pi * (f0 * t + (f1 - f0) / (2 * duration) * t * t))
    elif kind == "speech":
        # Voiced harmonics of a wobbling 120 Hz pitch under a 4 Hz syllable envelope, plus breath noise.
        pitch = 120.0 + 20.0 * torch.sin(2 * math.pi * 3.0 * t)
        phase = 2 * math.pi * torch.cumsum(pitch, 0) / sample_rate
        harmonics = sum(torch.sin(h * phase) / h for h in range(1, 20) if 120 * h < nyquist)
        envelope = 0.5 * (1 - torch.cos(2 * math.pi * 4.0 * t)) ** 2
        x = 0.2 * envelope * harmonics + 0.01 * torch.randn(num_samples, generator=g, dtype=torch.float64)
    elif kind == "silent":
        x = torch.zeros(num_samples, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return x.float()


CLIP_KINDS = ("speech", "noise", "tone", "sweep", "silent")


def reference(clip: torch.Tensor, **options) -> torch.Tensor:
    return kaldi.fbank(clip.double().unsqueeze(0), **options)


# Option sets: every window type, both edge modes, every energy/log/power switch, frequency limits,
# sample rates. Each runs on every clip kind.
OPTION_SETS = {
    "defaults": {},
    "audiomae": dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10),
    "hamming": dict(window_type="hamming"),
    "rectangular": dict(window_type="rectangular", num_mel_bins=40),
    "blackman": dict(window_type="blackman", blackman_coeff=0.4),
    "no_snip_edges": dict(snip_edges=False, window_type="hanning"),
    "no_snip_long_shift": dict(snip_edges=False, frame_length=20.0, frame_shift=30.0),
    "no_preemphasis_no_dc": dict(preemphasis_coefficient=0.0, remove_dc_offset=False),
    "full_preemphasis": dict(preemphasis_coefficient=1.0),
    "no_round_pow2": dict(round_to_power_of_two=False),
    "energy": dict(use_energy=True),
    "energy_htk_windowed": dict(use_energy=True, htk_compat=True, raw_energy=False, energy_floor=0.0),
    "energy_floor_high": dict(use_energy=True, energy_floor=50.0),
    "linear_fbank": dict(use_log_fbank=False),
    "magnitude": dict(use_power=False, num_mel_bins=64),
    "freq_band": dict(low_freq=300.0, high_freq=3400.0, num_mel_bins=30),
    "negative_high_freq": dict(high_freq=-400.0, low_freq=0.0),
    "vtln": dict(vtln_warp=0.9, num_mel_bins=40),
    "subtract_mean": dict(subtract_mean=True),
    "rate_8k": dict(sample_frequency=8000.0, num_mel_bins=40),
    "rate_22k": dict(sample_frequency=22050.0, num_mel_bins=80),
    "rate_44k": dict(sample_frequency=44100.0, num_mel_bins=128, frame_length=50.0),
    "short_frames": dict(frame_length=5.0, frame_shift=2.5, num_mel_bins=8),
}


def clips_for(options, num_samples=None):
    rate = options.get("sample_frequency", 16000.0)
    num_samples = num_samples or int(rate * 0.25)
    return torch.stack([make_clip(kind, num_samples, rate, seed) for seed, kind in enumerate(CLIP_KINDS)])


def assert_matches_reference(features, clips, options, lengths=None):
    for i, clip in enumerate(clips):
        clip = clip if lengths is None else clip[: int(lengths[i])]
        expected = reference(clip, **options)
        got = features[i, : expected.shape[0]].double()
        if options.get("use_log_fbank", True) is False:
            # Linear energies: compare relative to each frame's scale, in log terms.
            got, expected = got.clamp_min(1e-30).log(), expected.clamp_min(1e-30).log()
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{CLIP_KINDS[i]}: {m}")


@pytest.mark.parametrize("name", OPTION_SETS)
def test_torch_backend_matches_torchaudio_float64(name):
    options = OPTION_SETS[name]
    clips = clips_for(options)
    features = fbank(clips, backend="torch", **options)
    assert features.dtype == torch.float32
    assert features.shape[:2] == (len(clips), reference(clips[0], **options).shape[0])
    assert_matches_reference(features, clips, options)


def test_float64_input_is_float64_exact():
    clips = clips_for({}).double()
    features = fbank(clips, backend="torch", num_mel_bins=40)
    assert features.dtype == torch.float64
    for clip, got in zip(clips, features):
        torch.testing.assert_close(got, reference(clip, num_mel_bins=40), atol=1e-9, rtol=1e-9)


def test_single_clip_and_noncontiguous_batch():
    clips = clips_for({}, num_samples=3000)
    one = fbank(clips[2], backend="torch")
    torch.testing.assert_close(one.double(), reference(clips[2]), atol=ATOL, rtol=0)
    strided = torch.stack([clips, clips], dim=2).reshape(len(clips), -1)[:, ::2]  # non-contiguous view
    assert not strided.is_contiguous()
    torch.testing.assert_close(fbank(strided, backend="torch"), fbank(clips, backend="torch"))


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560])
@pytest.mark.parametrize("snip_edges", [True, False])
def test_very_short_clips(num_samples, snip_edges):
    clips = clips_for({}, num_samples=num_samples)
    features = fbank(clips, backend="torch", snip_edges=snip_edges)
    assert_matches_reference(features, clips, dict(snip_edges=snip_edges))


@pytest.mark.parametrize("snip_edges", [True, False])
def test_padded_batch_with_lengths(snip_edges):
    options = dict(snip_edges=snip_edges, num_mel_bins=40, use_energy=True)
    clips = clips_for({}, num_samples=4000)
    lengths = torch.tensor([4000, 400, 1234, 3999, 2500])
    padded = clips.clone()
    padded[torch.arange(4000) >= lengths.unsqueeze(1)] = 123.0  # junk past each end must not leak in
    features, num_frames = fbank(padded, lengths=lengths, backend="torch", **options)
    expected_frames = [reference(c[:n], **options).shape[0] for c, n in zip(clips, lengths)]
    assert num_frames.tolist() == expected_frames
    assert features.shape[1] == max(expected_frames)
    assert_matches_reference(features, clips, options, lengths)
    for i, n in enumerate(expected_frames):
        assert (features[i, n:] == 0).all()


def test_lengths_as_list_and_subtract_mean_over_valid_frames():
    options = dict(subtract_mean=True, num_mel_bins=30)
    clips = clips_for({}, num_samples=3000)
    lengths = [3000, 1000, 2000, 800, 2999]
    features, num_frames = fbank(clips, lengths=lengths, backend="torch", **options)
    assert_matches_reference(features, clips, options, lengths)
    assert num_frames.dtype == torch.int64


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.int16])
def test_lengths_of_any_integer_numpy_dtype(dtype):
    clips = clips_for({}, num_samples=3000)
    lengths = [3000, 1000, 2000, 800, 2999]
    want, want_frames = fbank(clips, lengths=lengths, backend="torch")
    got, frames = fbank(clips, lengths=np.array(lengths, dtype=dtype), backend="torch")
    assert torch.equal(frames, want_frames) and torch.equal(got, want)
    huge = np.array(lengths, dtype=dtype)
    huge[1] = np.iinfo(dtype).max  # past the clip, and past int64 for uint64: an error, not a wrap
    with pytest.raises(ValueError, match="lengths must lie in"):
        fbank(clips, lengths=huge, backend="torch")


def test_dither_is_random_and_reproducible():
    clip = clips_for({})[4:5]  # silent: without dither every bin sits at the log floor
    seeded = [fbank(clip, dither=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=0)
    other = fbank(clip, dither=1.0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(seeded[0], other)
    # Unit-variance noise through the povey window: the mean log-Mel energy is far above the floor.
    assert seeded[0].mean() > 0.0 > fbank(clip).mean()


def test_negative_dither_scales_the_noise_as_torchaudio_does():
    # torchaudio (and Kaldi) add dither * N(0, 1) without checking the sign: -1 adds the same
    # draws negated, not an error. On silence the frame is the noise alone and the (linear) frame
    # pipeline's power spectrum cannot tell the sign; on a clip with signal it can.
    silent, tone = clips_for({})[4:5], clips_for({})[2:3]
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    negative, positive = (fbank(silent, dither=d, generator=generator()) for d in (-1.0, 1.0))
    torch.testing.assert_close(negative, positive, rtol=1e-6, atol=1e-6)
    assert negative.mean() > 0.0 > fbank(silent).mean()
    negative, positive = (fbank(tone, dither=d, generator=generator()) for d in (-0.5, 0.5))
    assert not torch.equal(negative, positive)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: fbank(x.to(torch.int16)), TypeError, "float32 or float64"),
        (lambda x: fbank(x.half()), TypeError, "float32 or float64"),
        (lambda x: fbank(x[:, :399]), ValueError, "shorter than one frame"),
        (lambda x: fbank(x, lengths=[1000, 1000, 399, 1000, 1000]), ValueError, "shorter than one frame"),
        (lambda x: fbank(x, lengths=[1000, 1000]), ValueError, r"shape \[5\]"),
        (lambda x: fbank(x, lengths=[1000, 1000, 1001, 1000, 1000]), ValueError, r"lengths must lie in"),
        (lambda x: fbank(x, lengths=torch.full((5,), 500.0)), TypeError, "integers"),
        (lambda x: fbank(x[0], lengths=[500]), ValueError, "single clip"),
        (lambda x: fbank(x.unsqueeze(0)), ValueError, r"\[N\] or \[B, N\]"),
        (lambda x: fbank(x, num_mel_bin=40), TypeError, "num_mel_bin"),
        (lambda x: fbank(x, channel=0), TypeError, "channel"),
        (lambda x: fbank(x, window_type="hann"), ValueError, "window_type"),
        (lambda x: fbank(x, backend="triton"), ValueError, "backend"),
        (lambda x: fbank(x, backend="cuda"), ValueError, "CUDA waveforms"),
        (lambda x: fbank(x, high_freq=9000.0), ValueError, "high_freq"),
        (lambda x: fbank(x, num_mel_bins=3), ValueError, "num_mel_bins"),
        (lambda x: fbank(x, preemphasis_coefficient=1.5), ValueError, "preemphasis"),
        (lambda x: fbank(x, frame_length=25.0625, round_to_power_of_two=False), ValueError, "even"),
        (lambda x: fbank(x, energy_floor=-1.0), ValueError, "energy_floor"),
        (lambda x: fbank(x, vtln_warp=1.1, vtln_low=10.0), ValueError, "vtln_low"),
        (lambda x: fbank(x.tolist()), TypeError, "torch.Tensor"),
        (lambda x: fbank(x, frame_length=float("nan")), ValueError, "frame_length must be a finite number"),
        (lambda x: fbank(x, frame_shift=float("inf")), ValueError, "frame_shift must be a finite number"),
        (lambda x: fbank(x, dither=float("nan")), ValueError, "dither must be a finite number"),
        (lambda x: fbank(x, sample_frequency="16000"), ValueError, "sample_frequency must be a finite number"),
        (lambda x: fbank(x, vtln_warp=0.0), ValueError, "vtln_warp must be > 0"),
        (lambda x: fbank(x, num_mel_bins=40.0), ValueError, "num_mel_bins must be an integer"),
        (lambda x: fbank(x, dither=1.0, generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(clips_for({}, num_samples=1000))


def test_zero_dim_tensor_options_are_their_numbers():
    """A rate from a dataloader is often a 0-dim tensor; torchaudio takes it, so does fbank."""
    clips = clips_for({}, num_samples=1000)
    expected = fbank(clips, sample_frequency=8000.0, num_mel_bins=20)
    got = fbank(clips, sample_frequency=torch.tensor(8000.0), num_mel_bins=torch.tensor(20))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite(bad):
    clips = clips_for({}, num_samples=1000)
    clips[3, 500] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fbank(clips, check_finite=True)
    fbank(clips, lengths=[1000, 1000, 1000, 500, 1000], check_finite=True)  # the bad sample is padding


# --- the kernel's arithmetic on the host ---------------------------------------------------------


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    library = tmp_path_factory.mktemp("fbank_host") / "fbank_host.so"
    source = CSRC / "fbank_host_test.cpp"
    subprocess.run([compiler, "-O2", "-std=c++17", "-pthread", "-shared", "-fPIC", "-o", str(library), str(source)],
                   check=True)
    return ctypes.CDLL(str(library))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def host_fbank(lib, waveforms, lengths, opts: FbankOptions, lanes: int | None = None, fast_path: bool = True,
               counted: list | None = None):
    """The kernel's per-frame pipeline over a batch, on the CPU, with the kernel's own tables: one
    lane at a time, or ``lanes`` threads standing in for the warp's lanes. ``fast_path=False``
    keeps every frame on the general pipeline (with 32 lanes, the frames that allow it otherwise
    take the 512-point specialisation); ``counted`` (lanes only) gets the number that took it."""
    t = kernel_tables(opts, torch.device("cpu"), torch.get_default_dtype())
    num_frames = opts.num_frames(int(lengths.max()))
    out = torch.full((len(waveforms), num_frames, opts.num_features), float("nan"), dtype=waveforms.dtype)
    suffix = "float" if waveforms.dtype == torch.float32 else "double"
    i64, i32, f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_double
    fast_frames = ctypes.c_int64(0)
    if lanes is None:
        function, team = getattr(lib, f"fbank_host_{suffix}"), ()
    else:
        function, team = getattr(lib, f"fbank_host_lanes_{suffix}"), (i32(lanes), ctypes.byref(fast_frames))
    function(
        _ptr(waveforms), _ptr(out), *team, i64(len(waveforms)), i64(waveforms.shape[1]), _ptr(lengths), i64(num_frames),
        i32(opts.window_size), i32(opts.padded_window_size), i64(opts.window_shift), i64(opts.reflect_pad()),
        i32(opts.snip_edges), i32(opts.remove_dc_offset), f64(opts.preemphasis_coefficient), i32(opts.raw_energy),
        f64(opts.energy_floor), i32(opts.use_energy), i32(opts.htk_compat), i32(opts.use_log_fbank),
        i32(opts.use_power), i32(opts.num_mel_bins), i32(t.mel_weights.shape[0]), _ptr(t.window),
        _ptr(t.fft_twiddles), _ptr(t.real_twiddles), _ptr(t.mel_start), _ptr(t.mel_len), _ptr(t.mel_weights),
        i32(fast_path),
    )  # fmt: skip
    if counted is not None:
        counted.append(fast_frames.value)
    return out


KERNEL_OPTION_SETS = [name for name, o in OPTION_SETS.items() if FbankOptions(**o).cuda_unsupported() is None]


@pytest.mark.parametrize("name", KERNEL_OPTION_SETS)
def test_kernel_arithmetic_matches_torchaudio_float64(host_lib, name):
    options = OPTION_SETS[name]
    clips = clips_for(options)
    lengths = torch.tensor([clips.shape[1]] * len(clips))
    features = host_fbank(host_lib, clips, lengths, FbankOptions(**options))
    assert features.isfinite().all()
    assert_matches_reference(features, clips, options)


def test_kernel_arithmetic_padded_batch_float64(host_lib):
    options = dict(snip_edges=False, use_energy=True, num_mel_bins=40)
    clips = clips_for({}, num_samples=3000).double()
    lengths = torch.tensor([3000, 400, 1111, 2999, 2000])
    features = host_fbank(host_lib, clips, lengths, FbankOptions(**options))
    torch.testing.assert_close(features, fbank(clips, lengths=lengths, backend="torch", **options)[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_keeps_nan_samples_nan(host_lib, lanes, dtype):
    """A NaN or Inf sample gives NaN in the frames that read it, as torchaudio and the torch path
    give; a max() that drops NaN (fmax) would turn them into the log floor and hide bad audio."""
    options = dict(use_energy=True, energy_floor=1.0)
    clips = clips_for({}, num_samples=3000).to(dtype)
    clips[1, 1000], clips[3, 2000] = float("nan"), float("inf")
    lengths = torch.full((len(clips),), 3000)
    features = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=lanes)
    expected = fbank(clips, lengths=lengths, backend="torch", **options)[0]
    torch.testing.assert_close(features.isnan(), expected.isnan())
    assert features[1].isnan().any(dim=1).sum() == 3 and features[0].isfinite().all()  # frames 4-6 read sample 1000
    torch.testing.assert_close(features.nan_to_num(0.0), expected.nan_to_num(0.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_pairs_and_single_samples(host_lib, lanes, dtype, snip_edges):
    """Frames inside their clip that start on a pair's alignment read two samples a load, the others
    one: an odd clip length (every other clip starts off the alignment), an odd frame shift (every
    other frame does) and reflected edges take both paths, with identical arithmetic."""
    options = dict(frame_shift=161 / 16.0, snip_edges=snip_edges, use_energy=True, raw_energy=False, dither=0.0)
    clips = clips_for({}, num_samples=2401).to(dtype)
    lengths = torch.tensor([2401, 2400, 1999, 2401, 1234])
    features = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=lanes)
    expected, _ = fbank(clips, lengths=lengths, backend="torch", **options)
    torch.testing.assert_close(features, expected, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)
    assert_matches_reference(features, clips, options, lengths)


@pytest.mark.parametrize("amplitude", [1e-157, 1e-160, 6e151])
@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_float64_clips_of_extreme_size(host_lib, lanes, amplitude):
    """float64 clips keep their power spectrum in double as it is: no scale to overflow or vanish
    (a frame energy near 1e-310 or 1e300), features as torchaudio's in float64."""
    clips = amplitude * torch.randn(2, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for options in (dict(), dict(use_power=False)):
        features = host_fbank(host_lib, clips, torch.tensor([4000, 4000]), FbankOptions(**options), lanes=lanes)
        assert features.isfinite().all(), options
        assert_matches_reference(features, clips, options)


@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_float_spectrum_of_wide_range(host_lib, lanes):
    """float32 clips keep their power spectrum in float32, scaled so that the largest possible bin
    sits at 2^100: bins 50 decades below a loud frame's largest (here an exactly transformed loud
    pattern over unit noise) stay normal floats and keep their log."""
    x = torch.zeros(1024, dtype=torch.float64)
    x[0::4], x[2::4] = 1e25, -1e25
    x[1::2] = torch.randn(512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = dict(window_type="rectangular", frame_length=32.0, preemphasis_coefficient=0.0, remove_dc_offset=False,
                   num_mel_bins=23)
    clips = x.float().unsqueeze(0)
    features = host_fbank(host_lib, clips, torch.tensor([1024]), FbankOptions(**options), lanes=lanes)
    torch.testing.assert_close(features[0].double(), kaldi.fbank(clips.double(), **options), atol=1e-3, rtol=0)


@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_inf_sample_without_preemphasis_keeps_infinite_energy(host_lib, lanes):
    """Without pre-emphasis (or DC removal) an Inf sample's frames have infinite energy, as
    torchaudio's and the torch path's: no 0 * Inf from the previous sample turns it into NaN."""
    options = dict(preemphasis_coefficient=0.0, use_energy=True, raw_energy=False, remove_dc_offset=False)
    clips = clips_for({}, num_samples=3000).double()
    clips[1, 1000] = float("inf")
    features = host_fbank(host_lib, clips, torch.full((len(clips),), 3000), FbankOptions(**options), lanes=lanes)
    want = kaldi.fbank(clips[1:2], **options)
    torch.testing.assert_close(features[1, :, 0], want[:, 0], atol=1e-3, rtol=0)  # energy: inf in frames 4-6
    assert features[1, :, 0].isinf().sum() == 3


@pytest.mark.parametrize("lanes", [None, 32], ids=["serial", "warp"])  # a warp of 32 takes compute_frame_512
def test_kernel_arithmetic_float_features_past_float_range(host_lib, lanes):
    """float32 samples near 1e18 have Mel energies past float32's range: the kernel takes the log in
    double, so the features stay finite and match torchaudio in float64."""
    t = torch.arange(8000, dtype=torch.float64) / 16000
    clips = (1e18 * torch.sin(2 * math.pi * 1000 * t)).float().unsqueeze(0)
    features = host_fbank(host_lib, clips, torch.tensor([8000]), FbankOptions(), lanes=lanes)
    assert features.isfinite().all()
    want = kaldi.fbank(clips.double())
    torch.testing.assert_close(features[0].double(), want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("lanes", [32, 5])
@pytest.mark.parametrize("name", ["defaults", "audiomae", "energy_htk_windowed", "no_snip_edges", "magnitude",
                                  "short_frames"])
def test_kernel_arithmetic_with_concurrent_lanes(host_lib, name, lanes):
    """The warp's decomposition: lanes as threads (lane-strided loops, syncs, sums), padded batch."""
    options = OPTION_SETS[name]
    clips = clips_for(options, num_samples=2400).double()
    lengths = torch.tensor([2400, 401, 1999, 2400, 1234])[: len(clips)]
    opts = FbankOptions(**options)
    if opts.window_size > int(lengths.min()):
        lengths = lengths.clamp_min(opts.window_size)
    serial = host_fbank(host_lib, clips, lengths, opts)
    threaded = host_fbank(host_lib, clips, lengths, opts, lanes=lanes)
    assert threaded.isfinite().all()
    torch.testing.assert_close(threaded, serial, atol=1e-9, rtol=0)  # sums in another order
    expected, _ = fbank(clips, lengths=lengths, backend="torch", **options)
    torch.testing.assert_close(threaded, expected, atol=1e-6, rtol=0)


FAST_OPTION_SETS = [name for name in KERNEL_OPTION_SETS if FbankOptions(**OPTION_SETS[name]).padded_window_size == 512]


def fast_frame_count(opts: FbankOptions, lengths) -> int:
    """Frames that compute_frame_512 serves: inside their clip (on a pair's alignment or not), an
    even window of a 512-point padded frame."""
    if opts.padded_window_size != 512 or opts.window_size % 2:
        return 0
    count = 0
    for length in (int(n) for n in lengths):
        for frame in range(opts.num_frames(length)):
            first = frame * opts.window_shift - opts.reflect_pad()
            count += first >= 0 and first + opts.window_size <= length
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FAST_OPTION_SETS)
def test_fast_frames_match_torchaudio_and_the_general_pipeline(host_lib, name, dtype):
    """compute_frame_512, the specialisation that the kernel's warps take for 512-point frames inside
    their clip, against torchaudio in float64 and against the general pipeline on the same frames.
    An odd clip length puts every other clip off the pair alignment (its frames read their samples
    one at a time) and a padded batch puts frames past its clips' ends, and edges unsnipped reflect
    (those take the general pipeline, in the same call)."""
    options = OPTION_SETS[name]
    opts = FbankOptions(**options)
    clips = clips_for(options, num_samples=2401).to(dtype)
    lengths = torch.tensor([2401, 2400, 1999, 2401, 1234])[: len(clips)]
    counted = []
    fast = host_fbank(host_lib, clips, lengths, opts, lanes=32, counted=counted)
    general = host_fbank(host_lib, clips, lengths, opts, lanes=32, fast_path=False)
    assert counted == [fast_frame_count(opts, lengths)] and counted[0] > 0
    assert fast.isfinite().all() if options.get("use_log_fbank", True) else not fast.isnan().any()
    # float32: the power spectrum is rounded to float in both; the sums of the mean and the
    # energies run in another order (a last bit of a power, 1e-7 on a log)
    torch.testing.assert_close(fast, general, atol=1e-5 if dtype == torch.float32 else 1e-9, rtol=0)
    assert_matches_reference(fast, clips, options, lengths)


def test_fast_frames_keep_an_overflowed_mean_infinite(host_lib):
    """Finite float64 samples whose frame sum overflows (a mean of Inf): the windowed energy is Inf
    on both pipelines, as torchaudio's; pairs past the window add zero, not 0 * Inf."""
    options = dict(window_type="rectangular", preemphasis_coefficient=0.0, use_energy=True, raw_energy=False)
    clips = torch.full((1, 1600), 1e306, dtype=torch.float64)
    lengths = torch.tensor([1600])
    counted = []
    fast = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=32, counted=counted)[0, :, 0]
    general = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=32, fast_path=False)[0, :, 0]
    assert counted[0] == len(fast) and kaldi.fbank(clips, **options)[:, 0].isposinf().all()
    assert fast.isposinf().all() and general.isposinf().all()


@pytest.mark.parametrize("use_power", [True, False])
def test_float64_spectrum_near_overflow_as_torchaudio(host_lib, use_power):
    """float64 clips whose largest |X| is about 1e154: double features keep the real FFT's halves
    (computing 2X first would square past double's range at half the amplitude), so they are
    infinite exactly where torchaudio's are."""
    clips = 1.5e152 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = kaldi.fbank(clips, use_power=use_power)
    for lanes in (None, 32):
        got = host_fbank(host_lib, clips, torch.tensor([4000]), FbankOptions(use_power=use_power), lanes=lanes)
        assert torch.equal(got[0].isinf(), want.isinf()), (lanes, int(got.isinf().sum()), int(want.isinf().sum()))


def test_fast_frames_nan_where_the_general_pipeline_has_nan(host_lib):
    """A tone at a quarter of the rate near double's largest value: Z[128] is infinite, and the
    general pipeline's bin 128 is Inf - Inf = NaN; the specialisation computes that bin by the same
    formula, so NaN lands in the same features."""
    options = dict(window_type="rectangular", frame_length=32.0, preemphasis_coefficient=0.0, remove_dc_offset=False,
                   low_freq=0.0, use_log_fbank=False)
    y = torch.zeros(1024, dtype=torch.float64)
    y[0::2] = 7.5e305 * (-1.0) ** torch.arange(512, dtype=torch.float64)
    clips, lengths = y.unsqueeze(0), torch.tensor([1024])
    fast = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=32)
    general = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=32, fast_path=False)
    assert general.isnan().any() and torch.equal(fast.isnan(), general.isnan())


def test_fast_frames_need_an_even_window(host_lib):
    """A 401-sample window (25.0625 ms at 16 kHz) pads to 512 points but ends inside a pair: the
    general pipeline serves every frame."""
    options = dict(frame_length=25.0625, window_type="hanning", num_mel_bins=40)
    clips = clips_for(options, num_samples=2400)
    lengths = torch.full((len(clips),), 2400)
    counted = []
    features = host_fbank(host_lib, clips, lengths, FbankOptions(**options), lanes=32, counted=counted)
    assert counted == [0]
    assert_matches_reference(features, clips, options)


@pytest.mark.parametrize("padded", [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_kernel_arithmetic_every_fft_size(host_lib, padded):
    # frame_length so that the window is exactly `padded` samples at 16 kHz (round_to_power_of_two=True).
    options = dict(frame_length=padded / 16.0, frame_shift=max(padded / 32.0, 0.0625), num_mel_bins=4 if padded < 64 else 23)
    if padded < 64:
        options.update(low_freq=0.0)
    clips = clips_for({}, num_samples=max(2 * padded, 800))
    lengths = torch.tensor([clips.shape[1]] * len(clips))
    features = host_fbank(host_lib, clips.double(), lengths, FbankOptions(**options))
    assert_matches_reference(features, clips, options)


@pytest.mark.parametrize("n", [1 << k for k in range(12)])
def test_stockham_fft_matches_numpy(host_lib, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    data = torch.from_numpy(np.stack([x.real, x.imag], axis=1).copy())
    twiddles = fft_pass_twiddles(n)
    host_lib.fft_host(_ptr(data), ctypes.c_int(n), _ptr(twiddles))
    np.testing.assert_allclose(data[:, 0].numpy() + 1j * data[:, 1].numpy(), np.fft.fft(x), atol=1e-11 * n, rtol=0)


def test_kernel_mel_table_equals_dense_banks():
    opts = FbankOptions(num_mel_bins=128, sample_frequency=44100.0, vtln_warp=1.1)
    t = kernel_tables(opts, torch.device("cpu"), torch.get_default_dtype())
    dense = torch.zeros(opts.num_mel_bins, opts.padded_window_size // 2, dtype=torch.float64)
    for m in range(opts.num_mel_bins):
        start, length = int(t.mel_start[m]), int(t.mel_len[m])
        dense[m, start : start + length] = t.mel_weights[:length, m]
    expected, _ = kaldi.get_mel_banks(128, opts.padded_window_size, 44100.0, 20.0, 0.0, 100.0, -500.0, 1.1)
    assert torch.equal(dense, expected.double())


# --- backend selection and the CUDA kernel -------------------------------------------------------


def test_auto_on_cpu_runs_torch_without_warning():
    clips = clips_for({}, num_samples=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fbank(clips), fbank(clips, backend="torch"))


def test_differentiable_through_torch_backend():
    clips = clips_for({}, num_samples=1000).double().requires_grad_()
    fbank(clips, backend="torch", num_mel_bins=20).sum().backward()
    assert clips.grad is not None and clips.grad.isfinite().all()


def test_gradient_through_cpu_blocks_equals_torchaudio(monkeypatch):
    """Past CPU_BLOCK_FRAMES the CPU path runs in blocks; each block keeps its own FFT input for
    the backward (a shared buffer would be overwritten before autograd reads it)."""

    monkeypatch.setattr(sys.modules["kernels.fbank"], "CPU_BLOCK_FRAMES", 8)
    clips = clips_for({}, num_samples=3000).double()
    ours = clips.clone().requires_grad_()
    theirs = clips.clone().requires_grad_()
    features = fbank(ours, backend="torch", num_mel_bins=20)
    weights = torch.randn_like(features)
    (features * weights).sum().backward()
    expected = torch.stack([reference(clip, num_mel_bins=20) for clip in theirs])
    (expected * weights).sum().backward()
    scale = float(theirs.grad.abs().max())
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("block_frames", [10**9, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_cpu_features_are_ordinary_tensors(monkeypatch, block_frames, padded):
    """The CPU path computes its blocks in inference mode; the features it returns must not be
    inference tensors, or a model that saves them for backward (a Linear learning its weight)
    would fail: in one block and in many, with and without lengths, and the same values inside a
    caller's own inference mode."""
    monkeypatch.setattr(sys.modules["kernels.fbank"], "CPU_BLOCK_FRAMES", block_frames)
    clips = clips_for({}, num_samples=3000)
    kwargs = dict(lengths=[3000, 2000, 3000, 1500, 2500][: clips.shape[0]]) if padded else {}
    features = fbank(clips, backend="torch", num_mel_bins=20, **kwargs)
    features = features[0] if padded else features
    assert not features.is_inference() and not features.requires_grad
    weight = torch.randn(20, 3, requires_grad=True)
    (features @ weight).square().sum().backward()  # saves features for weight's gradient
    assert weight.grad is not None
    features.add_(1.0)  # an in-place update outside inference mode is allowed on it too
    with torch.inference_mode():
        inside = fbank(clips, backend="torch", num_mel_bins=20, **kwargs)
    torch.testing.assert_close(inside[0] if padded else inside, features - 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nested", [False, True])
def test_cpu_path_never_drops_a_forward_mode_tangent(nested):
    """Forward-mode AD through the CPU path: the no-autograd path's out= ops refuse dual tensors,
    and the inference mode that path runs in must not get there first and return features with
    no tangent. ``nested``: the clip's tangent belongs to an outer torch.func.jvp, unseen by the
    inner level's unpack_dual."""
    import torch.autograd.forward_ad as fwAD

    clip = clips_for({}, num_samples=2000)[0].double()
    tangent = torch.ones_like(clip)
    if nested:
        one = torch.ones(1, dtype=torch.float64)

        def inner(x):
            return torch.func.jvp(lambda y: fbank(x, backend="torch").sum() + y.sum(), (one,), (one,))[0]

        call = lambda: torch.func.jvp(inner, (clip,), (tangent,))  # noqa: E731
    else:
        def call():
            with fwAD.dual_level():
                features = fbank(fwAD.make_dual(clip, tangent), backend="torch")
                return fwAD.unpack_dual(features).tangent
    try:
        result = call()
    except (NotImplementedError, RuntimeError) as error:
        assert "out=" in str(error)  # refused, and saying why
    else:
        assert result is not None and (result[1] if nested else result).abs().sum() > 0


@pytest.mark.parametrize("options", [dict(use_power=False), dict(use_power=False, use_log_fbank=False), {}])
def test_gradient_through_silent_frames_is_finite_as_torchaudio_s(options):
    """A magnitude spectrum (use_power=False) of a silent frame: torchaudio's |X| has gradient 0
    there, a square root of the power would give NaN to every sample of the frame."""
    g = torch.Generator().manual_seed(0)
    clip = torch.zeros(4000, dtype=torch.float64)
    clip[2000:] = 0.1 * torch.randn(2000, generator=g, dtype=torch.float64)
    ours, theirs = clip.clone().requires_grad_(), clip.clone().requires_grad_()
    weights = torch.randn(fbank(clip, backend="torch", **options).shape, generator=g, dtype=torch.float64)
    (fbank(ours, backend="torch", **options) * weights).sum().backward()
    (reference(theirs, **options) * weights).sum().backward()
    assert ours.grad.isfinite().all()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-9 * float(theirs.grad.abs().max()))


@pytest.mark.parametrize("pad", [float("nan"), float("inf")])
def test_padding_past_lengths_reaches_no_gradient(pad):
    """Whatever lies past a clip's length (out of contract: NaN, Inf) touches neither the features
    nor, through the masked frames' backward, the gradients of the clip's own samples."""
    g = torch.Generator().manual_seed(0)
    clips = 0.1 * torch.randn(2, 4000, generator=g, dtype=torch.float64)
    padded = clips.clone()
    padded[1, 3000:] = pad
    grads = []
    for batch in (clips, padded):
        batch = batch.clone().requires_grad_()
        features, _ = fbank(batch, lengths=[4000, 3000], backend="torch")
        assert features.isfinite().all()
        features.sum().backward()
        grads.append(batch.grad)
    assert torch.equal(grads[0], grads[1]) and (grads[1][1, 3000:] == 0).all()


@pytest.mark.parametrize("use_energy,energy_floor", [(False, 1.0), (True, 0.0), (True, 0.5), (False, 2.0), (True, 1.0)])
def test_cuda_op_fake_shape(use_energy, energy_floor):
    """The op's fake implementation (what torch.compile traces) gives the kernel's shape: one
    column per Mel bin, and one more for the energy only when use_energy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    opts = FbankOptions(num_mel_bins=128, use_energy=use_energy, energy_floor=energy_floor)
    t = kernel_tables(opts, torch.device("cpu"), torch.get_default_dtype())
    args = (torch.zeros(2, 16000), torch.full((2,), 16000), opts.num_frames(16000), t.window, t.fft_twiddles,
            t.real_twiddles, t.mel_start, t.mel_len, t.mel_weights, opts.window_shift, opts.reflect_pad(), True, True,
            0.97, True, energy_floor, use_energy, False, True, True, 0, True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = _fbank_cuda_op(*fake)
    assert tuple(out.shape) == (2, opts.num_frames(16000), opts.num_features) == (2, 98, 128 + use_energy)


def test_empty_batch_gives_empty_features():
    assert fbank(torch.zeros(0, 4000), num_mel_bins=40).shape == (0, 23, 40)
    for lengths in ([], torch.zeros(0, dtype=torch.int64), np.zeros(0)):
        features, frames = fbank(torch.zeros(0, 4000), lengths=lengths, num_mel_bins=40)
        assert features.shape == (0, 0, 40) and frames.shape == (0,) and frames.dtype == torch.int64


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("name", KERNEL_OPTION_SETS)
def test_cuda_kernel_matches_torchaudio_float64(name):
    options = OPTION_SETS[name]
    clips = clips_for(options)
    features = fbank(clips.cuda(), backend="cuda", **options)
    assert features.isfinite().all()
    assert_matches_reference(features.cpu(), clips, options)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_padded_batch_equals_torch_backend(dtype):
    options = dict(snip_edges=False, use_energy=True, htk_compat=True, num_mel_bins=128, window_type="hanning")
    clips = clips_for({}, num_samples=16000).to(dtype)
    clips = torch.cat([clips] * 20).cuda()  # 100 clips
    lengths = torch.randint(400, 16001, (len(clips),), generator=torch.Generator().manual_seed(0)).cuda()
    got, frames = fbank(clips, lengths=lengths, backend="cuda", **options)
    want, want_frames = fbank(clips, lengths=lengths, backend="torch", **options)
    assert torch.equal(frames, want_frames)
    torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)
    # lengths as a slice that starts 8 bytes into its storage: only the kernel's 16-byte tables
    # must be aligned, not the lengths it reads one at a time.
    sliced = torch.cat([lengths[:1], lengths])[1:]
    assert sliced.data_ptr() % 16 == 8
    got_sliced, _ = fbank(clips, lengths=sliced, backend="cuda", **options)
    torch.testing.assert_close(got_sliced, got, atol=0, rtol=0)


@gpu
@pytest.mark.parametrize("path", ["fast", "general"])
@pytest.mark.parametrize("shape", range(len(LAUNCH_SHAPES)))
def test_cuda_every_launch_shape_matches_torchaudio_float64(shape, path):
    """Each launch shape the benchmark times (fewer frames a block, capped registers) is the same
    arithmetic: checked against torchaudio on every option set, with a padded batch and the
    largest FFT (one frame a block), before any can become the default; each with the 512-point
    frames on their specialisation and on the general pipeline (the benchmark times both)."""
    general = forced_general_path() if path == "general" else contextlib.nullcontext()
    with forced_launch_shape(shape), general:
        for name in KERNEL_OPTION_SETS:
            options = OPTION_SETS[name]
            clips = clips_for(options)
            assert_matches_reference(fbank(clips.cuda(), backend="cuda", **options).cpu(), clips, options)
        clips = torch.cat([clips_for({}, num_samples=16000)] * 4).cuda()
        lengths = torch.randint(400, 16001, (len(clips),), generator=torch.Generator().manual_seed(1)).cuda()
        got, _ = fbank(clips, lengths=lengths, backend="cuda", snip_edges=False)
        want, _ = fbank(clips, lengths=lengths, backend="torch", snip_edges=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        options = dict(frame_length=4096 / 16.0, frame_shift=128 / 16.0, num_mel_bins=4, low_freq=0.0)
        clips = clips_for({}, num_samples=9000)
        assert_matches_reference(fbank(clips.cuda(), backend="cuda", **options).cpu(), clips, options)


def test_frames_too_big_for_the_gpus_shared_memory_go_to_the_torch_path(monkeypatch):
    """A 4096-point frame takes 72 KiB of shared memory: more than an sm_75 GPU gives a block
    (64 KiB), where "auto" must take the torch path with a reason rather than fail at the launch."""
    from types import SimpleNamespace

    module = sys.modules["kernels.fbank"]
    assert module.kernel_frame_bytes(512) == 9 * 1024 and module.kernel_frame_bytes(4096) == 72 * 1024
    limits = {0: 64 * 1024, 1: 227 * 1024}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(shared_memory_per_block_optin=limits[index]))
    module._shared_memory_shortfall.cache_clear()
    try:
        assert re.search(r"4096 samples needs 73728 bytes .* more than the 65536", module._shared_memory_shortfall(4096, 0))
        assert module._shared_memory_shortfall(2048, 0) is None
        assert module._shared_memory_shortfall(4096, 1) is None
    finally:
        module._shared_memory_shortfall.cache_clear()


def test_forced_launch_shape_rejects_unknown_shapes_and_restores():
    module = sys.modules["kernels.fbank"]
    for bad in (-1, len(LAUNCH_SHAPES), 1.0):
        with pytest.raises(ValueError, match="LAUNCH_SHAPES"):
            with forced_launch_shape(bad):
                pass
    with forced_launch_shape(2):
        assert module._LAUNCH_SHAPE == 2
    assert module._LAUNCH_SHAPE == module.DEFAULT_LAUNCH_SHAPE


@gpu
def test_cuda_every_fft_size_and_noncontiguous():
    clips = clips_for({}, num_samples=9000)
    for padded in [2, 16, 256, 1024, 4096]:
        options = dict(frame_length=padded / 16.0, frame_shift=max(padded / 32.0, 0.0625), num_mel_bins=4, low_freq=0.0)
        strided = torch.stack([clips, clips], dim=2).reshape(len(clips), -1)[:, ::2].cuda()
        assert_matches_reference(fbank(strided, backend="cuda", **options).cpu(), clips, options)


@gpu
def test_cuda_unsupported_options():
    clips = clips_for({}, num_samples=1000).cuda()
    with pytest.raises(ValueError, match="dither"):
        fbank(clips, backend="cuda", dither=1.0)
    with pytest.raises(ValueError, match="power of two"):
        fbank(clips, backend="cuda", round_to_power_of_two=False)
    _warn_once.cache_clear()
    with pytest.warns(UserWarning, match="subtract_mean.*torch path"):
        fbank(clips, subtract_mean=True)


def test_extension_without_code_for_the_gpu_is_a_reason_not_a_launch_failure(monkeypatch):
    # An extension built for sm_90 plus PTX imports on an A100 but has no image it can load: "auto"
    # must hear why and take the torch path. The stub stands for that extension; no GPU needed.
    import kernels._cuda_extension as cuda_extension

    fbank_module = sys.modules["kernels.fbank"]

    class NoImage:
        @staticmethod
        def fbank_cuda_unavailable(device_index):
            assert device_index == 0
            return "no kernel image is available for execution on the device"

    class Loads:
        @staticmethod
        def fbank_cuda_unavailable(device_index):
            return ""

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    for stub, expected in ((NoImage, r"no code that NVIDIA A100-SXM4-80GB \(sm_80\) can run"), (Loads, None)):
        fbank_module._kernel_unavailable.cache_clear()
        monkeypatch.setattr(cuda_extension, "load_extension", lambda name, stub=stub: stub)
        reason = fbank_module._kernel_unavailable(0)
        if expected is None:
            assert reason is None
        else:
            assert re.search(expected, reason) and "TORCH_CUDA_ARCH_LIST=8.0" in reason, reason
    fbank_module._kernel_unavailable.cache_clear()


@gpu
def test_cuda_op_registration():
    opts = FbankOptions(num_mel_bins=40, use_energy=True)
    clips = clips_for({}, num_samples=2000).cuda()
    lengths = torch.full((len(clips),), 2000, device="cuda")
    t = kernel_tables(opts, clips.device, torch.get_default_dtype())
    args = (clips, lengths, opts.num_frames(2000), t.window, t.fft_twiddles, t.real_twiddles, t.mel_start, t.mel_len,
            t.mel_weights, opts.window_shift, opts.reflect_pad(), True, True, 0.97, True, 1.0, True, False, True, True, 0,
            True)  # fmt: skip
    torch.library.opcheck(_fbank_cuda_op, args)
    compiled = torch.compile(lambda x: _fbank_cuda_op(x, *args[1:]), fullgraph=True)
    torch.testing.assert_close(compiled(clips), fbank(clips, backend="cuda", num_mel_bins=40, use_energy=True))


def test_cpu_blocks_tile_the_result_in_contiguous_pieces(monkeypatch):
    """CPU blocks of about CPU_BLOCK_FRAMES frames: whole clips together, or equal runs of one
    clip's frames; they cover every (clip, frame) once, and each is one contiguous piece of the
    [B, frames, bins] result. One ten-second clip (998 frames) stays one block under 768."""
    fbank_module = sys.modules["kernels.fbank"]
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 768)
    blocks = fbank_module._cpu_blocks
    assert blocks(1, 998) == [(0, 1, 0, 998)] and blocks(1, 1100) == [(0, 1, 0, 1100)]
    assert blocks(1, 1300) == [(0, 1, 0, 650), (0, 1, 650, 1300)]
    assert blocks(16, 998) == [(b, b + 1, 0, 998) for b in range(16)]
    assert blocks(32, 98) == [(0, 8, 0, 98), (8, 16, 0, 98), (16, 24, 0, 98), (24, 32, 0, 98)]
    assert blocks(0, 98) == [] and blocks(3, 0) == []
    assert blocks(2, 2000) == [(0, 1, 0, 667), (0, 1, 667, 1334), (1, 2, 0, 667), (1, 2, 667, 1334),
                               (0, 1, 1334, 2000), (1, 2, 1334, 2000)]  # equal shapes in a row
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 0)  # no block size: a frame at a time, no error
    assert blocks(2, 2) == [(0, 1, 0, 1), (0, 1, 1, 2), (1, 2, 0, 1), (1, 2, 1, 2)]
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 768)
    for batch in (1, 3, 16, 100):
        for frames in (1, 97, 998, 5001):
            covered = torch.zeros(batch, frames, dtype=torch.int64)
            result = torch.empty(batch, frames, 2)
            for b0, b1, f0, f1 in blocks(batch, frames):
                covered[b0:b1, f0:f1] += 1
                assert result[b0:b1, f0:f1].is_contiguous()
                assert (b1 - b0) * (f1 - f0) <= 1.5 * 768 or b1 - b0 == 1 or f1 - f0 < 768 // 2
            assert (covered == 1).all()


@pytest.mark.parametrize("name", ["defaults", "audiomae", "no_snip_edges", "energy", "energy_htk_windowed",
                                  "full_preemphasis", "no_preemphasis_no_dc", "subtract_mean"])
def test_cpu_blocks_equal_one_pass(monkeypatch, name):
    """The CPU path runs frames in blocks; any block size gives the one-pass result."""

    fbank_module = sys.modules["kernels.fbank"]
    options = {**OPTION_SETS[name], "dither": 0.0}
    clips = clips_for(options, num_samples=5000).double()
    lengths = torch.tensor([5000, 3000, 4100, 401, 5000])[: len(clips)]
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 10**9)
    whole, frames = fbank(clips, lengths=lengths, backend="torch", **options)
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 1)  # blocks of one frame per clip
    blocked, frames_blocked = fbank(clips, lengths=lengths, backend="torch", **options)
    assert torch.equal(frames, frames_blocked)
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", OPTION_SETS)
def test_cpu_pipeline_equals_the_general_path(monkeypatch, name):
    """The CPU without autograd or dither runs its own pipeline (buffers and views made once a
    call, banded Mel sums); a differentiable call runs the general one. Both give the same
    features for every option set, across block shapes, and NaN samples spoil only the frames
    that read them, in both."""
    fbank_module = sys.modules["kernels.fbank"]
    monkeypatch.setattr(fbank_module, "CPU_BLOCK_FRAMES", 7)  # several blocks and two block shapes
    options = {**OPTION_SETS[name], "dither": 0.0}
    clips = clips_for(options, num_samples=int(options.get("sample_frequency", 16000.0) * 0.3)).double()
    shift = fbank_module.FbankOptions(**options).window_shift
    clips[2, clips.shape[1] // 2 : clips.shape[1] // 2 + shift] = float("nan")  # read by a frame even where frames leave gaps
    lengths = torch.tensor([clips.shape[1], clips.shape[1] // 2, clips.shape[1] - 3, 900, clips.shape[1]])[: len(clips)]
    lengths = lengths.clamp_min(fbank_module.FbankOptions(**options).window_size)
    pipeline, frames = fbank(clips, lengths=lengths, backend="torch", **options)
    general, general_frames = fbank(clips.clone().requires_grad_(), lengths=lengths, backend="torch", **options)
    assert torch.equal(frames, general_frames)
    assert torch.equal(pipeline.isnan(), general.isnan()) and pipeline.isnan().any()
    assert pipeline[0].isfinite().all()
    torch.testing.assert_close(pipeline, general.detach(), rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("name", ["defaults", "audiomae", "freq_band", "vtln", "rate_8k", "rate_44k", "short_frames",
                                  "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_banded_mel_projection_equals_dense(name, dtype):
    """The CPU's banded Mel matmul skips only zero weights: the dense product's values, for any
    bin count (a last band shorter than the others, bands of nothing but zeros), VTLN included."""

    fbank_module = sys.modules["kernels.fbank"]
    opts = FbankOptions(**OPTION_SETS[name])
    banks = fbank_module.mel_banks(opts).to(dtype)
    spectrum = torch.rand(3, 37, banks.shape[1], dtype=dtype) ** 4  # non-negative, many decades
    dense = spectrum @ banks.T
    banded = fbank_module._apply_banks(spectrum, banks, banded=True)
    assert banded.shape == dense.shape
    # Sums of non-negative terms in another order: a few ulps apart at most (the bound is n ulps).
    rtol = 32 * torch.finfo(dtype).eps
    torch.testing.assert_close(banded, dense, rtol=rtol, atol=0)
    zero_bins = banks.clone()
    zero_bins[: fbank_module.MEL_BAND_SIZE] = 0.0  # a whole band without weights
    torch.testing.assert_close(fbank_module._apply_banks(spectrum, zero_bins, banded=True), spectrum @ zero_bins.T,
                               rtol=rtol, atol=0)


@pytest.mark.parametrize("num_samples", [4000, 40000])  # one block, and several on the CPU
def test_features_are_contiguous_like_torchaudio(num_samples):
    features = fbank(torch.randn(2, num_samples), backend="torch", num_mel_bins=40)
    assert features.is_contiguous()
    assert fbank(torch.randn(num_samples), backend="torch").is_contiguous()


@pytest.mark.parametrize("name", ["defaults", "audiomae", "no_snip_edges", "energy_htk_windowed", "no_round_pow2",
                                  "rate_22k"])
@pytest.mark.parametrize("path", ["pipeline", "autograd", "dither"])
def test_no_buffer_is_read_before_it_is_written(monkeypatch, name, path):
    """With uninitialised memory filled with NaN (torch's deterministic mode), every path gives
    the same features: the CPU pipeline's reused buffers and the general path's FFT input, whose
    padding alone is zeroed, are written before they are read."""
    monkeypatch.setattr(sys.modules["kernels.fbank"], "CPU_BLOCK_FRAMES", 7)  # blocks of two shapes
    options = dict(OPTION_SETS[name], dither=0.5 if path == "dither" else 0.0)
    clips = clips_for(options, num_samples=int(options.get("sample_frequency", 16000.0) * 0.2)).double()
    clips.requires_grad_(path == "autograd")

    def features():
        return fbank(clips, backend="torch", generator=torch.Generator().manual_seed(0), **options)

    expected = features()
    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        poisoned = features()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cached", [False, True])
def test_a_default_device_changes_nothing(cached):
    """torch.set_default_device (or a device context) moves factory calls without a device: the
    tables and the CPU path's buffers must still be made beside the waveforms, whether the tables
    were cached before or are built under the context. "meta" stands in for "cuda" here."""
    options = dict(num_mel_bins=21, frame_length=19.0 + cached)  # tables no other test has cached
    clips = clips_for({}, num_samples=3000)
    expected = fbank(clips, backend="torch", **options) if cached else None
    with torch.device("meta"):
        got = fbank(clips, backend="torch", **options)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected if cached else fbank(clips, backend="torch", **options), rtol=0, atol=0)


def test_compile_uses_the_cached_tables(monkeypatch):
    """torch.compile must not trace through the table cache: Inductor would recompute the Mel
    weights with other float32 rounding (9e-3 on a tone's log features was seen)."""
    fbank_module = sys.modules["kernels.fbank"]
    build = fbank_module.mel_banks

    def eager_only(opts):
        assert not torch.compiler.is_compiling(), "mel_banks traced by torch.compile"
        return build(opts)

    monkeypatch.setattr(fbank_module, "mel_banks", eager_only)
    options = dict(num_mel_bins=17, frame_length=23.0)  # tables no other test has cached
    clips = clips_for({}, num_samples=3000).double()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fbank(x, backend="torch", **options), backend="eager")
    torch.testing.assert_close(compiled(clips), fbank(clips, backend="torch", **options), rtol=0, atol=0)


def test_first_call_in_inference_mode_leaves_later_gradients_working():
    options = dict(num_mel_bins=19, frame_length=23.0)  # tables no other test has cached
    with torch.inference_mode():
        fbank(torch.randn(1, 3000), backend="torch", **options)
    clip = torch.randn(1, 3000, dtype=torch.float64, requires_grad=True)
    fbank(clip, backend="torch", **options).sum().backward()
    assert clip.grad is not None and clip.grad.isfinite().all()


def test_a_bare_int_for_lengths_is_a_shape_error():
    with pytest.raises(ValueError, match=r"lengths must have shape \[2\]"):
        fbank(torch.randn(2, 4000), lengths=4000)
