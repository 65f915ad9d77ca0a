"""Fixed sine-cosine position embeddings, built as the official AudioMAE builds them.

The official code passes the patch grid to its 2-D builder as ``(F, T)`` (frequency patches
first) for a ``(T, F)`` grid whose tokens are numbered ``k = t * F + f``. The builder then lays a
``F x T`` mesh over the tokens, so the first half of the channels encodes ``k mod T`` and the second
``k div T``: not the token's (t, f) position, but what every released checkpoint carries. A freshly
built model must equal the official one, so these tables reproduce that construction exactly
(in float64, like numpy, then cast).
"""
import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sines in the first half of the channels, cosines in the second."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_official(embed_dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """[(1 +) T*F, embed_dim] float32 table for the ``grid=(T, F)`` patch grid, official layout.

    With ``cls_token`` a zero row is prepended for the cls token, as in the official tables.
    """
    if embed_dim <= 0 or embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    num_time, num_freq = grid
    if num_time < 1 or num_freq < 1:
        raise ValueError(f"grid must have at least one patch along each axis, got {tuple(grid)}")
    k = torch.arange(num_time * num_freq)
    # The official mesh is F rows of T columns laid over k = row * T + col.
    col, row = k % num_time, k // num_time
    table = torch.cat([sincos_1d(embed_dim // 2, col), sincos_1d(embed_dim // 2, row)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()
