import pytest
import torch

from audiomae.masking import inverse_permutation, random_masking_ids, structured_masking_ids


def official_2d_ids(noise_t, noise_f, keep_t, keep_f):
    """The official 2-D construction: an index plus 999 for masked tokens, argsorted (valid for T*F < 999)."""
    B, T = noise_t.shape
    F = noise_f.shape[1]
    mask_t = torch.ones(B, T)
    mask_t[:, :keep_t] = 0
    mask_t = torch.gather(mask_t, 1, torch.argsort(torch.argsort(noise_t, 1), 1))
    mask_f = torch.ones(B, F)
    mask_f[:, :keep_f] = 0
    mask_f = torch.gather(mask_f, 1, torch.argsort(torch.argsort(noise_f, 1), 1))
    mask = 1 - (1 - mask_t[:, :, None]) * (1 - mask_f[:, None, :])
    index = torch.arange(B * T * F, dtype=torch.float64).reshape(B, T, F) + 999 * mask
    order = torch.argsort(index.flatten(1), 1)
    return order[:, : keep_t * keep_f], torch.argsort(order, 1), mask.flatten(1)


@pytest.mark.parametrize("B,L,ratio", [(1, 1, 0.0), (3, 10, 0.8), (4, 512, 0.8), (2, 37, 0.5), (2, 16, 1.0)])
def test_random_masking_invariants(B, L, ratio):
    noise = torch.rand(B, L)
    keep = int(L * (1 - ratio))
    ids_keep, ids_restore, mask = random_masking_ids(noise, keep)
    assert ids_keep.shape == (B, keep) and ids_restore.shape == (B, L) and mask.shape == (B, L)
    ids_shuffle = torch.argsort(noise, 1)
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, 1))
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(B, L))
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    kept = torch.zeros(B, L).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)
    # the official mask: ones after len_keep, unshuffled by ids_restore
    official = torch.ones(B, L)
    official[:, :keep] = 0
    assert torch.equal(torch.gather(official, 1, ids_restore), mask)


def test_inverse_permutation():
    perm = torch.stack([torch.randperm(50) for _ in range(4)])
    inv = inverse_permutation(perm)
    assert torch.equal(torch.gather(perm, 1, inv), torch.arange(50).expand(4, 50))


@pytest.mark.parametrize("B,T,F,pt,pf", [(3, 64, 8, 0.6, 0.5), (2, 8, 8, 0.3, 0.25), (1, 5, 3, 0.0, 0.5), (2, 4, 4, 0.0, 0.0)])
def test_structured_masking_matches_official(B, T, F, pt, pf):
    noise_t, noise_f = torch.rand(B, T), torch.rand(B, F)
    keep_t, keep_f = int(T * (1 - pt)), int(F * (1 - pf))
    ids_keep, ids_restore, mask = structured_masking_ids(noise_t, noise_f, keep_t, keep_f)
    ref_keep, ref_restore, ref_mask = official_2d_ids(noise_t, noise_f, keep_t, keep_f)
    assert torch.equal(ids_keep, ref_keep)
    assert torch.equal(ids_restore, ref_restore)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(mask.sum(1), torch.full((B,), float(T * F - keep_t * keep_f)))


def test_counts_outside_the_rows_are_errors():
    # A count past the row, or negative, once gave an all-ones mask or an ids_restore that is not
    # a permutation (indices 14 to 18 on a 15-token grid).
    with pytest.raises(ValueError, match="len_keep must be an integer in \\[0, 4\\]"):
        random_masking_ids(torch.rand(2, 4), -1)
    with pytest.raises(ValueError, match="len_keep_t"):
        structured_masking_ids(torch.rand(1, 5), torch.rand(1, 3), 7, 2)
    with pytest.raises(ValueError, match="len_keep_f"):
        structured_masking_ids(torch.rand(1, 5), torch.rand(1, 3), 2, 4)
