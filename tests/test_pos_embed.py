import numpy as np
import pytest
import torch

from audiomae.pos_embed import sincos_1d, sincos_2d_official


def official_table_float64(embed_dim, patch_hw):
    """The official construction, written out with numpy: a mesh over ``patch_hw=(F, T)`` with
    the w coordinate first, half the channels per coordinate, sines then cosines, a zero cls row."""
    grid_h = np.arange(patch_hw[0], dtype=np.float64)
    grid_w = np.arange(patch_hw[1], dtype=np.float64)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)
    halves = []
    for coordinate in mesh:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        angles = np.outer(coordinate, omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    table = np.concatenate(halves, axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), table], axis=0)


@pytest.mark.parametrize("embed_dim,grid", [(768, (64, 8)), (512, (64, 8)), (384, (32, 8)), (64, (8, 8)), (16, (5, 3))])
def test_matches_official_construction(embed_dim, grid):
    ours = sincos_2d_official(embed_dim, grid)
    official = official_table_float64(embed_dim, (grid[1], grid[0]))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), official, rtol=0, atol=1e-6)


def test_halves_encode_k_mod_T_and_k_div_T():
    T, F, D = 64, 8, 768
    table = sincos_2d_official(D, (T, F))[1:]
    k = torch.arange(T * F)
    torch.testing.assert_close(table[:, : D // 2], sincos_1d(D // 2, k % T).float())
    torch.testing.assert_close(table[:, D // 2 :], sincos_1d(D // 2, k // T).float())
    assert torch.equal(sincos_2d_official(D, (T, F))[0], torch.zeros(D))


def test_bad_embed_dim():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_official(10, (4, 4))


@pytest.mark.parametrize("embed_dim,grid", [(0, (4, 4)), (-4, (4, 4)), (8, (0, 4)), (8, (4, -1))])
def test_empty_or_negative_tables_are_errors(embed_dim, grid):
    with pytest.raises(ValueError, match="embed_dim|grid"):
        sincos_2d_official(embed_dim, grid)
