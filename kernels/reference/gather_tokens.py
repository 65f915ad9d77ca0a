"""Eager references for ``kernels.gather_tokens`` and ``kernels.gather_tokens_2d``.

The official MAE / AudioMAE masking code, op for op: add the positional embedding to every token,
then ``torch.gather`` with the index repeated over the channels.
"""
import torch


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [B, L, C], ``ids_keep`` [B, K] int64, ``pos_embed`` [L, C] or [1, L, C] -> [B, K, C]."""
    B, L, C = x.shape
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, L, C)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, C))


def gather_tokens_2d(
    x: torch.Tensor,
    ids_keep_t: torch.Tensor,
    ids_keep_f: torch.Tensor,
    grid: tuple[int, int],
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` [B, T*F, C] in order t*F + f, ``ids_keep_t`` [B, Kt], ``ids_keep_f`` [B, Kf] -> [B, Kt*Kf, C].

    AudioMAE's fine-tuning ``random_masking_2d``: keep whole time rows, then whole frequency
    columns of what is left.
    """
    B, _, C = x.shape
    T, F = grid
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, T * F, C)
    x = x.reshape(B, T, F, C)
    Kt, Kf = ids_keep_t.shape[1], ids_keep_f.shape[1]
    x = torch.gather(x, 1, ids_keep_t[:, :, None, None].repeat(1, 1, F, C))
    x = torch.gather(x, 2, ids_keep_f[:, None, :, None].repeat(1, Kt, 1, C))
    return x.reshape(B, Kt * Kf, C)
