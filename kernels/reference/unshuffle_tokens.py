"""Eager reference for ``kernels.unshuffle_tokens``.

The official MAE decoder, op for op: repeat the mask token, append it to the kept tokens, gather
with the restore index repeated over the channels, add the positional embedding.
"""
import torch


def unshuffle_tokens(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` [B, K, C], ``ids_restore`` [B, L] int64, ``mask_token`` [C] or [1, 1, C],
    ``pos_embed`` [L, C] or [1, L, C] -> [B, L, C]."""
    B, K, C = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, C).repeat(B, L - K, 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
    if pos_embed is not None:
        x_ = x_ + pos_embed.reshape(1, L, C)
    return x_
