"""audiomae.augment: the official recipe's training augmentations, batched."""
import pytest
import torch

from audiomae import augment


def test_scale_magnitudes_is_one_factor_per_clip_in_half_to_three_halves():
    torch.manual_seed(0)
    waves = torch.randn(400, 50)
    factor = augment.scale_magnitudes(waves) / waves
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor))
    factor = factor[:, 0]
    assert 0.5 < factor.min() and factor.max() < 1.5
    assert abs(float(factor.mean()) - 1.0) < 0.02 and 0.08 < float(factor.std()) < 0.14  # Beta(10, 10): std 0.109


def test_mix_clips_mixes_centred_partners_and_labels_alike():
    torch.manual_seed(1)
    B, N = 6, 40
    lengths = torch.tensor([40, 25, 40, 10, 33, 40])
    waves = (torch.randn(B, N) + 3.0) * (torch.arange(N) < lengths.unsqueeze(1))  # offsets, zero padding
    targets = torch.eye(B)  # clip i alone has class i: the mixed labels name the partner and lambda
    mixed, mixed_targets = augment.mix_clips(waves, lengths, targets, rate=1.0)
    centred = (waves - waves.sum(1, keepdim=True) / lengths.unsqueeze(1)) * (torch.arange(N) < lengths.unsqueeze(1))
    lams = []
    for i in range(B):
        lam = float(mixed_targets[i, i])
        others = [j for j in range(B) if j != i and mixed_targets[i, j] > 0]
        assert len(others) == 1 and float(mixed_targets[i].sum()) == pytest.approx(1.0)  # never itself
        torch.testing.assert_close(mixed[i], lam * waves[i] + (1 - lam) * centred[others[0]])
        lams.append(lam)
    assert all(0.05 < lam < 0.95 for lam in lams)
    unchanged = augment.mix_clips(waves, lengths, targets, rate=0.0)
    assert unchanged[0] is waves and unchanged[1] is targets
    alone = augment.mix_clips(waves[:1], lengths[:1], targets[:1], rate=1.0)  # a batch of one: no partner
    assert alone[0] is waves[:1] or torch.equal(alone[0], waves[:1])


def test_mix_clips_mixes_each_clip_with_the_given_probability():
    torch.manual_seed(2)
    B = 4000
    _, targets = augment.mix_clips(torch.randn(B, 8), torch.full((B,), 8), torch.eye(B)[:, :B], rate=0.3)
    own = targets.diagonal()
    share_mixed = float((own < 1).double().mean())
    assert 0.27 < share_mixed < 0.33


def test_mix_partners_are_the_other_clips_uniformly():
    torch.manual_seed(4)
    B = 3
    counts = torch.zeros(B, B)
    for _ in range(600):
        _, targets = augment.mix_clips(torch.randn(B, 8), torch.full((B,), 8), torch.eye(B), rate=1.0)
        counts += targets > 0
    assert torch.equal(counts.diagonal(), torch.full((B,), 600.0))  # each clip keeps its own label
    off = counts[~torch.eye(B, dtype=torch.bool)]
    assert 240 < float(off.min()) and float(off.max()) < 360  # each other clip about half the time


def test_spectrogram_masks_are_one_band_per_axis_per_clip():
    torch.manual_seed(3)
    B, T, bins = 500, 100, 128
    spec = torch.randn(B, T, bins)
    out = augment.mask_spectrogram(spec, freqm=48, timem=30, fill=0.25)
    masked = out != spec
    assert torch.all(out[masked] == 0.25)
    freq_rows = masked.all(1)  # [B, bins]: a bin masked in every frame
    time_rows = masked.all(2)  # [B, T]
    for rows, limit in ((freq_rows, 48), (time_rows, 30)):
        widths = rows.sum(1)
        assert widths.max() < limit and widths.float().mean() == pytest.approx((limit - 1) / 2, abs=3)
        for row in rows[:50]:
            index = row.nonzero().flatten()
            if len(index):
                assert torch.equal(index, torch.arange(int(index[0]), int(index[-1]) + 1))  # one band
    # everything masked lies in the clip's frequency band or its time band
    assert torch.equal(masked, freq_rows.unsqueeze(1) | time_rows.unsqueeze(2))
    assert torch.equal(augment.mask_spectrogram(spec, 0, 0, 0.25), spec)


def test_mix_clips_rejects_class_indices_and_bad_rates():
    waves, lengths = torch.randn(4, 100), torch.full((4,), 100)
    # Integer labels would take lam cast to 0: every mixed clip silently given its partner's label.
    with pytest.raises(TypeError, match="targets must be floating-point"):
        augment.mix_clips(waves, lengths, torch.tensor([0, 1, 2, 3]), 1.0)
    for rate in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate must lie in"):
            augment.mix_clips(waves, lengths, torch.eye(4), rate)
    with pytest.raises(TypeError, match="rate must be a number"):
        augment.mix_clips(waves, lengths, torch.eye(4), "0.5")


@pytest.mark.parametrize("freqm,timem", [(-5, 10), (1.5, 10), (10, -1), (True, 0)])
def test_mask_spectrogram_rejects_bad_widths(freqm, timem):
    with pytest.raises(ValueError, match="freqm|timem"):
        augment.mask_spectrogram(torch.zeros(2, 20, 16), freqm, timem, 0.0)
