"""The AudioMAE front end: waveforms to normalised 128-bin Kaldi fbank images, a batch per call.

Follows the official recipe (facebookresearch/AudioMAE, ``dataset.py``: ``_wav2fbank`` then the
normalisation in ``__getitem__``), in this order:

1. remove each clip's mean (over its valid samples): a no-op here, not a skipped step. Kaldi's
   fbank removes each frame's own mean (``remove_dc_offset``) before anything else touches the
   samples, which takes any constant off exactly, so the features of a clip and of the clip less
   its mean are the same numbers. The official recipe's float32 subtraction only rounds every
   sample (3e-8 relative), which raises the floor under a tone's or sweep's spectrum enough to
   move quiet Mel bins by 1e-3 in log energy; both fbank backends remove the frame means in
   float64 instead;
2. Kaldi fbank: hanning window, 128 Mel bins, 25 ms frames every 10 ms, ``htk_compat=True``,
   ``use_energy=False``, no dither (``kernels.fbank``: the CUDA kernel for CUDA tensors);
3. crop or pad to ``target_length`` frames. The official recipe pads with 0.0 *in the log domain*
   (``ZeroPad2d`` on the fbank), which is loud (log-energy 0), not silence: ``pad_mode="official"``
   matches it, so features equal those the released checkpoints were trained on;
   ``pad_mode="silence"`` pads with the log floor, log(float32 eps) = -15.94, what an all-zero
   stretch of audio gives;
4. normalise: ``(fbank - mean) / (2 * std)`` with the dataset's statistics.

The result is ``[B, 1, target_length, 128]`` (time, then frequency), the models' input layout.
SpecAugment, mixup and magnitude scaling are training-time choices: ``audiomae.augment`` (the official
Speech Commands noise augmentation is not implemented).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.fbank import LOG_FLOOR, fbank

# Per-dataset fbank statistics (mean, std) and clip length in frames, from the official recipes.
DATASETS = {
    "audioset": (-4.2677393, 4.5689974, 1024),
    "esc50": (-6.6268077, 5.358466, 512),
    "speechcommands": (-6.845978, 5.5654526, 128),
}
PAD_MODES = ("official", "silence")
NUM_MEL_BINS = 128


def _check_settings(dataset: str, pad_mode: str, target_length) -> None:
    if target_length is not None and (isinstance(target_length, bool) or not hasattr(target_length, "__index__")
                                      or target_length < 1):
        raise ValueError(f"target_length must be None or an integer >= 1, got {target_length!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")


def audio_to_features(
    waveforms: torch.Tensor,
    sample_rate: float,
    *,
    lengths: torch.Tensor | None = None,
    dataset: str = "audioset",
    target_length: int | None = None,
    pad_mode: str = "official",
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Normalised fbank images ``[B, 1, target_length, 128]`` of clips ``[B, N]`` (or one clip ``[N]``).

    ``lengths`` ``[B]``: valid samples per clip of a zero-padded batch (each clip is then treated as
    if it were only that long). ``target_length`` defaults to the dataset's (1024 AudioSet, 512
    ESC-50, 128 Speech Commands). ``check_finite=True`` rejects NaN or Inf samples (``fbank``'s
    check, one device sync) where they would otherwise give NaN frames.
    """
    _check_settings(dataset, pad_mode, target_length)
    mean, std, default_length = DATASETS[dataset]
    target_length = default_length if target_length is None else int(target_length)
    if not isinstance(waveforms, torch.Tensor) or waveforms.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"waveforms must be a float32 or float64 tensor, got {getattr(waveforms, 'dtype', type(waveforms))}")
    if waveforms.dim() == 1:
        waveforms = waveforms.unsqueeze(0)

    # Step 1 (each clip's mean) is the frames' own DC removal inside fbank: see the module doc.
    result = fbank(
        waveforms, lengths=lengths, backend=backend, check_finite=check_finite, htk_compat=True, sample_frequency=sample_rate,
        use_energy=False, window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=10.0,
    )  # fmt: skip
    # Without lengths every clip has all the frames; with them, frames past a clip's end are 0.0,
    # which is exactly the official padding.
    features, num_frames = result if lengths is not None else (result, None)

    frames = features.shape[1]
    if frames >= target_length:
        features = features[:, :target_length]
    else:
        features = nn.functional.pad(features, (0, 0, 0, target_length - frames))
    if pad_mode == "silence":
        clip_frames = num_frames if num_frames is not None else torch.full((features.shape[0],), frames, device=features.device)
        padding = torch.arange(target_length, device=features.device) >= clip_frames.unsqueeze(-1)
        features = features.masked_fill(padding.unsqueeze(-1), math.log(LOG_FLOOR))
    return ((features - mean) / (2 * std)).unsqueeze(1)


class AudioMAEFeatures(nn.Module):
    """``audio_to_features`` with its settings fixed; ``forward(waveforms, lengths=None)``."""

    def __init__(self, sample_rate: float = 16000.0, dataset: str = "audioset", target_length: int | None = None,
                 pad_mode: str = "official", backend: str = "auto", check_finite: bool = False):
        super().__init__()
        _check_settings(dataset, pad_mode, target_length)
        self.check_finite = check_finite
        self.sample_rate = sample_rate
        self.dataset = dataset
        self.target_length = DATASETS[dataset][2] if target_length is None else target_length
        self.pad_mode = pad_mode
        self.backend = backend

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return audio_to_features(
            waveforms, self.sample_rate, lengths=lengths, dataset=self.dataset, target_length=self.target_length,
            pad_mode=self.pad_mode, backend=self.backend, check_finite=self.check_finite,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, dataset={self.dataset!r}, target_length={self.target_length}, pad_mode={self.pad_mode!r}"
