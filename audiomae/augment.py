"""The official recipe's training-time augmentations, for a batch at once on the batch's device.

facebookresearch/AudioMAE ``dataset.py`` applies them clip by clip in its data loader; here they
act on the padded batch (``waves`` [B, N] zero past each clip's ``lengths``) and on the front end's
normalised features, with the same distributions:

- ``scale_magnitudes``: ``roll_mag_aug``, each clip times ``Beta(10, 10) + 0.5``. The official
  function also rolls ``np.roll(waveform, randint(len(waveform)))``, but ``len`` of its
  ``[1, samples]`` mono clip is 1, so the roll is always by 0: only the scaling acts.
- ``mix_clips``: mixup. Each clip is mixed with probability ``rate`` with another clip, the
  waveforms (each less its own mean over its valid samples, the partner zero-padded or cut to the
  clip's length) weighted ``lam`` and ``1 - lam``, ``lam ~ Beta(10, 10)``, and the labels alike.
  The official partner is a uniformly drawn clip of the dataset (itself once in the dataset's
  size); here it is a uniformly drawn other clip of the batch (a batch of one has none: its clip is
  left as it is).
- ``mask_spectrogram``: SpecAugment as torchaudio's ``FrequencyMasking(freqm)`` then
  ``TimeMasking(timem)``, one band of each per clip, drawn as torchaudio draws it. The official
  masks write 0 into the log-Mel fbank before normalising; on normalised features that is
  ``fill = (0 - mean) / (2 * std)`` of the dataset.
"""
from __future__ import annotations

import numbers

import torch

from .masking import check_probability


def _beta_10_10(count: int, device) -> torch.Tensor:
    return torch.distributions.Beta(10.0, 10.0).sample((count,)).to(device)


def scale_magnitudes(waves: torch.Tensor) -> torch.Tensor:
    """``waves`` [B, N] times ``Beta(10, 10) + 0.5`` per clip."""
    return waves * (_beta_10_10(waves.shape[0], waves.device) + 0.5).to(waves.dtype).unsqueeze(1)


def mix_clips(waves: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, rate: float):
    """(waves, targets) with each clip mixed, with probability ``rate``, as the module doc says.
    ``targets`` [B, ...] are one-hot or multi-hot floats (a class index cannot be mixed)."""
    check_probability(rate, "rate")
    if not targets.is_floating_point():
        raise TypeError(f"targets must be floating-point (one-hot or multi-hot rows) to be mixed, got {targets.dtype}")
    B, N = waves.shape
    if rate <= 0 or B <= 1:  # a clip alone in its batch has no partner
        return waves, targets
    device = waves.device
    lengths = lengths.to(device)
    valid = torch.arange(N, device=device) < lengths.unsqueeze(1)
    mean = (waves * valid).sum(1, keepdim=True) / lengths.clamp(min=1).unsqueeze(1).to(waves.dtype)
    centred = (waves - mean) * valid  # zero past each clip's end: the official partner's zero padding
    # Another clip of the batch, uniformly: drawing the clip itself (1 / B of the time, half the
    # mixes at batch 2) would mix it with nothing.
    partner = ((torch.arange(B) + torch.randint(1, B, (B,))) % B).to(device)
    lam = torch.where(torch.rand(B).to(device) < rate, _beta_10_10(B, device), torch.ones((), device=device))
    lam_w = lam.to(waves.dtype).unsqueeze(1)
    # The clip's own constant offset is left to fbank's frame DC removal (audiomae.features); the
    # partner is centred over its own samples first, as the official code centres it.
    mixed = torch.where(lam_w == 1, waves, lam_w * waves + (1 - lam_w) * centred[partner])  # unmixed: as is
    lam_t = lam.to(targets.dtype).view(-1, *([1] * (targets.dim() - 1)))
    return mixed, lam_t * targets + (1 - lam_t) * targets[partner]


def _band(count: int, size: int, mask_param: int, device) -> torch.Tensor:
    """[count, size] bool: one band per row, ``torchaudio.functional.mask_along_axis``'s draw."""
    value = torch.rand(count) * mask_param
    start = (torch.rand(count) * (size - value)).long()  # truncated, as torchaudio's .long()
    end = start + value.long()
    index = torch.arange(size)
    return ((index >= start.unsqueeze(1)) & (index < end.unsqueeze(1))).to(device)


def mask_spectrogram(spec: torch.Tensor, freqm: int, timem: int, fill: float) -> torch.Tensor:
    """``spec`` [B, T, bins] with one frequency band of up to ``freqm`` bins and one time band of
    up to ``timem`` frames set to ``fill`` per clip (0 turns either off)."""
    for name, value in (("freqm", freqm), ("timem", timem)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer (0 turns the mask off), got {value!r}")
    B, T, bins = spec.shape
    mask = torch.zeros(B, T, bins, dtype=torch.bool, device=spec.device)
    if freqm > 0:
        mask |= _band(B, bins, freqm, spec.device).unsqueeze(1)
    if timem > 0:
        mask |= _band(B, T, timem, spec.device).unsqueeze(2)
    return spec.masked_fill(mask, fill)
