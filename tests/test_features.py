"""audiomae.features against the official AudioMAE recipe, one clip at a time with torchaudio in float64."""
import math

import pytest
import torch
from torch import nn
from torchaudio.compliance import kaldi

from audiomae.features import DATASETS, AudioMAEFeatures, audio_to_features


def official_features(clip: torch.Tensor, sample_rate: float, dataset: str, target_length: int) -> torch.Tensor:
    """facebookresearch/AudioMAE dataset.py: _wav2fbank, then the normalisation in __getitem__."""
    mean, std, _ = DATASETS[dataset]
    waveform = clip.double().unsqueeze(0)
    waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)  # fmt: skip
    p = target_length - fbank.shape[0]
    if p > 0:
        fbank = nn.ZeroPad2d((0, 0, 0, p))(fbank)
    elif p < 0:
        fbank = fbank[0:target_length, :]
    return ((fbank - mean) / (std * 2)).unsqueeze(0)


def clips(num_clips, num_samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000.0
    tone = torch.sin(2 * math.pi * torch.linspace(200, 3000, num_clips).unsqueeze(1) * t)
    return (0.3 * tone + 0.05 * torch.randn(num_clips, num_samples, generator=g) + 0.1).float()  # + DC offset


@pytest.mark.parametrize("dataset, num_samples", [("speechcommands", 16000), ("speechcommands", 8000), ("esc50", 30000)])
def test_matches_official_pipeline(dataset, num_samples):
    batch = clips(3, num_samples)
    target = DATASETS[dataset][2]
    got = audio_to_features(batch, 16000, dataset=dataset, backend="torch")
    assert got.shape == (3, 1, target, 128) and got.dtype == torch.float32
    for clip, features in zip(batch, got):
        torch.testing.assert_close(features.double(), official_features(clip, 16000, dataset, target), atol=1e-3, rtol=0)


def test_sweep_with_dc_offset_within_1e3_before_normalising():
    """The clip mean is the frames' own DC removal (float64 in fbank), not a float32 subtraction
    whose rounding lifts a sweep's spectral floor by more than 1e-3 in log energy; compared before
    the normalisation divides the error by 2 * std."""
    mean, std, _ = DATASETS["esc50"]
    t = torch.arange(16000, dtype=torch.float64) / 16000
    sweep = (0.9 * torch.sin(2 * math.pi * (50 * t + (0.3 * 8000 - 50) / 2 * t * t)) + 0.05).float()
    got = audio_to_features(sweep, 16000, dataset="esc50", backend="torch")[0].double() * (2 * std) + mean
    want = official_features(sweep, 16000, "esc50", 512) * (2 * std) + mean
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_padded_batch_equals_each_clip_alone():
    batch = clips(4, 12000)
    lengths = torch.tensor([12000, 3000, 8000, 400])
    padded = batch.masked_fill(torch.arange(12000) >= lengths.unsqueeze(1), float("nan"))  # padding never read
    got = audio_to_features(padded, 16000, lengths=lengths, dataset="speechcommands", backend="torch")
    for clip, n, features in zip(batch, lengths, got):
        torch.testing.assert_close(features.double(), official_features(clip[:n], 16000, "speechcommands", 128), atol=1e-3, rtol=0)


def test_silence_padding_and_module():
    batch = clips(2, 8000)
    module = AudioMAEFeatures(dataset="speechcommands", pad_mode="silence", backend="torch")
    got = module(batch, torch.tensor([8000, 4000]))
    mean, std, _ = DATASETS["speechcommands"]
    silence = (math.log(torch.finfo(torch.float32).eps) - mean) / (2 * std)
    assert not torch.allclose(got[0, 0, 47], torch.tensor(silence))
    assert torch.allclose(got[0, 0, 48:], torch.tensor(silence))  # 8000 samples -> 48 frames
    assert torch.allclose(got[1, 0, 23:], torch.tensor(silence))  # 4000 samples -> 23 frames
    official = audio_to_features(batch, 16000, lengths=[8000, 4000], dataset="speechcommands", backend="torch")
    torch.testing.assert_close(got[:, :, :23], official[:, :, :23])
    assert (official[1, 0, 23:] == -mean / (2 * std)).all()


def test_target_length_override_crops():
    batch = clips(2, 16000)
    got = audio_to_features(batch, 16000, dataset="audioset", target_length=50, backend="torch")
    assert got.shape == (2, 1, 50, 128)
    torch.testing.assert_close(got[0].double(), official_features(batch[0], 16000, "audioset", 50), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(dataset="librispeech"), ValueError), (dict(pad_mode="zeros"), ValueError), (dict(target_length=0), ValueError),
     (dict(target_length=100.0), ValueError), (dict(target_length=True), ValueError)],
)
def test_bad_settings(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        audio_to_features(clips(1, 1000), 16000, **kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):  # the module says so when it is built
        AudioMAEFeatures(**kwargs)


def test_integer_waveforms_rejected():
    with pytest.raises(TypeError, match="float32 or float64"):
        audio_to_features(torch.zeros(2, 1000, dtype=torch.int16), 16000)


def test_check_finite_rejects_bad_samples_before_anything_runs():
    clips = torch.randn(2, 4000)
    clips[1, 123] = float("nan")
    assert audio_to_features(clips, 16000).isnan().any()  # unchecked: NaN frames, as torchaudio gives
    with pytest.raises(ValueError, match="NaN or Inf"):
        audio_to_features(clips, 16000, check_finite=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        AudioMAEFeatures(check_finite=True)(clips)
    clips[1, 123] = 0.0
    torch.testing.assert_close(AudioMAEFeatures(check_finite=True)(clips), audio_to_features(clips, 16000))
