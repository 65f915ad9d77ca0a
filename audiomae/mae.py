"""AudioMAE pretraining model, a drop-in for the official ``models_mae.MaskedAutoencoderViT``.

Same constructor keywords, method names, return values and state-dict keys as the official
release, so official checkpoints load unchanged. Differences, all additive:
- the patch grid is derived from ``img_size`` (the official decoder, 2-D masking and
  ``unpatchify`` hard-code 64 x 8), so 1024-, 512- and 128-frame inputs all work;
  ``patch_embed.patch_hw`` holds it the official way round, ``(F, T)``;
- ``noise`` makes masking reproducible (``[B, L]``, or ``(noise_t [B, T], noise_f [B, F])`` for 2-D
  masking); without it masking draws from torch's RNG as the official code does;
- ``backend=`` / ``set_backend()`` switch the attention and token-shuffle implementation
  (see ``audiomae.backends``) without touching weights;
- everything runs on CPU and GPU (no hard-coded ``.cuda()``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .backends import check_backend
from .layers import Block, PatchEmbed, to_2tuple
from .masking import (check_tokens_on_grid, draw_noise, draw_noise_2d, num_kept, random_masking_ids,
                      structured_masking_ids)
from .pos_embed import sincos_2d_official
from .swin import SwinTransformerBlock, run_blocks


class ModelMixin:
    """``set_backend(name)`` switches every attention module (and the token ops) at once;
    ``save_pretrained(path)`` writes safetensors that ``audiomae.from_pretrained`` reads back."""

    def set_backend(self, name: str):
        name = check_backend(name)
        for module in self.modules():  # every module agrees first: a refused switch changes nothing
            if hasattr(module, "check_backend_fits"):
                module.check_backend_fits(name)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = name
        return self

    def save_pretrained(self, path):
        from .checkpoint import save_pretrained

        return save_pretrained(self, path)

    def gather_tokens(self, x, ids_keep, pos_embed=None):
        """Kept tokens ``x[b, ids_keep[b]] (+ pos_embed[ids_keep[b]])``: [B, L, C] -> [B, K, C]."""
        if self.backend == "triton":
            from kernels.gather_tokens import gather_tokens

            return gather_tokens(x, ids_keep, pos_embed, check_indices=False)  # built by our masking, in range
        if pos_embed is not None:
            x = x + pos_embed
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def unshuffle_tokens(self, x, ids_restore, mask_token, pos_embed):
        """Kept tokens [B, K, C] -> all tokens [B, L, C]: ``mask_token`` at the removed positions, then
        ``pos_embed`` [L, C] added (the official cat-then-gather)."""
        if self.backend == "triton":
            from kernels.unshuffle_tokens import unshuffle_tokens

            return unshuffle_tokens(x, ids_restore, mask_token, pos_embed, check_indices=False)
        B, K, C = x.shape
        x = torch.cat([x, mask_token.reshape(1, 1, C).expand(B, ids_restore.shape[1] - K, C)], dim=1)
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C)) + pos_embed


def init_vit_weights(module: nn.Module, linear_init=nn.init.xavier_uniform_) -> None:
    """The official pretraining initialisation: xavier-uniform Linear weights (``linear_init``), zero
    biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        linear_init(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], pixels row-major within a patch, channels last."""
    B, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a ``grid=(H/p, W/p)`` patch grid."""
    B = x.shape[0]
    h, w = grid
    p = patch_size
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(B, h, w, p, p, in_chans))
    return x.reshape(B, in_chans, h * p, w * p)


class MaskedAutoencoderViT(ModelMixin, nn.Module):
    """Masked autoencoder with a ViT encoder and a global (mode 0) or Swin (mode 1) decoder.

    Modes 2 and 3 are what the official code makes of them: the global decoder of mode 0 (same
    blocks, same state-dict keys), run without the cls token as the Swin decoder is."""

    def __init__(
        self,
        img_size=(1024, 128),
        patch_size=16,
        stride=10,
        in_chans=1,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss=False,
        audio_exp=True,
        alpha=0.0,
        temperature=0.2,
        mode=0,
        contextual_depth=8,
        use_custom_patch=False,
        split_pos=False,
        pos_trainable=False,
        use_nce=False,
        beta=4.0,
        decoder_mode=0,
        mask_t_prob=0.6,
        mask_f_prob=0.5,
        mask_2d=False,
        epoch=0,
        no_shift=False,
        backend="reference",
    ):
        super().__init__()
        if use_custom_patch:
            raise NotImplementedError("use_custom_patch=True (overlapping patches) is not supported")
        if decoder_mode not in (0, 1, 2, 3):
            # The official code sends modes above 3 to an MViT decoder it never builds.
            raise ValueError(f"decoder_mode must be 0 (global), 1 (Swin), 2 or 3 (global without the cls token), "
                             f"got {decoder_mode}")
        # Kept for drop-in compatibility; the official forward never reads them either.
        self.stride, self.alpha, self.T, self.mode = stride, alpha, temperature, mode
        self.split_pos, self.use_nce, self.beta, self.epoch = split_pos, use_nce, beta, epoch
        self.use_custom_patch = False
        self.audio_exp = audio_exp
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.patch_size = to_2tuple(patch_size)[0]
        if to_2tuple(patch_size)[1] != self.patch_size:
            raise ValueError(f"patch_size must be square, got {patch_size}")
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size
        # The official PatchEmbed_org's (frequency, time) patch counts, which its sin-cos tables are built from.
        self.patch_embed.patch_hw = (self.grid[1], self.grid[0])
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=pos_trainable)
        self.encoder_depth = depth
        self.contextual_depth = contextual_depth
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, backend=backend)
             for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=pos_trainable
        )
        self.no_shift = no_shift
        self.decoder_mode = decoder_mode
        if decoder_mode == 1:
            # The paper's decoder: 16 Swin blocks of 16 heads whatever decoder_depth says, as the official code.
            self.decoder_blocks = nn.ModuleList(
                [SwinTransformerBlock(decoder_embed_dim, 16, feat_size=self.grid, window_size=(4, 4),
                                      shift_size=(0, 0) if no_shift or index % 2 == 0 else (2, 0),
                                      mlp_ratio=mlp_ratio, norm_layer=norm_layer, backend=backend)
                 for index in range(16)]
            )
        else:
            self.decoder_blocks = nn.ModuleList(
                [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                       backend=backend)
                 for _ in range(decoder_depth)]
            )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.mask_t_prob = mask_t_prob
        self.mask_f_prob = mask_f_prob
        self.mask_2d = mask_2d
        self.backend = check_backend(backend)
        self.initialize_weights()

    def initialize_weights(self):
        self.pos_embed.data.copy_(sincos_2d_official(self.embed_dim, self.grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d_official(self.decoder_embed_dim, self.grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        """The official per-module initialisation that ``initialize_weights`` applies (xavier Linear)."""
        init_vit_weights(m)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.grid, self.in_chans)

    # ------------------------------------------------------------------ masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Official ``random_masking``: returns ``x_masked`` [B, K, D], ``mask`` [B, L], ``ids_restore`` [B, L]."""
        ids_keep, ids_restore, mask = self._masking_ids(x, mask_ratio, False, noise)
        return self.gather_tokens(x, ids_keep), mask, ids_restore

    def random_masking_2d(self, x, mask_t_prob, mask_f_prob, noise=None):
        """Official ``random_masking_2d`` on the model's grid (not a hard-coded 64 x 8)."""
        ids_keep, ids_restore, mask = self._structured_ids(x, mask_t_prob, mask_f_prob, noise)
        return self.gather_tokens(x, ids_keep), mask, ids_restore

    def _structured_ids(self, x, mask_t_prob, mask_f_prob, noise):
        T, F = self.grid
        check_tokens_on_grid(x, self.grid)
        len_keep_t, len_keep_f = num_kept(T, mask_t_prob, "mask_t_prob"), num_kept(F, mask_f_prob, "mask_f_prob")
        noise_t, noise_f = draw_noise_2d(x.shape[0], self.grid, x.device, noise)
        return structured_masking_ids(noise_t, noise_f, len_keep_t, len_keep_f)

    def _masking_ids(self, x, mask_ratio, mask_2d, noise):
        if mask_2d:
            return self._structured_ids(x, self.mask_t_prob, self.mask_f_prob, noise)
        B, L, _ = x.shape
        len_keep = num_kept(L, mask_ratio, "mask_ratio")
        return random_masking_ids(draw_noise(B, L, x.device, noise), len_keep)

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, x, mask_ratio, mask_2d=False, noise=None):
        """Returns ``(latent [B, 1+K, D], mask [B, L], ids_restore [B, L], None)``."""
        x = self.patch_embed(x)
        ids_keep, ids_restore, mask = self._masking_ids(x, mask_ratio, mask_2d, noise)
        x = self.gather_tokens(x, ids_keep, self.pos_embed[0, 1:, :])
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, None

    def forward_encoder_no_mask(self, x):
        """Mean of the normed outputs of the blocks past ``contextual_depth`` (cls included): [B, 1+L, D]."""
        if self.encoder_depth <= self.contextual_depth + 1:
            raise ValueError(
                f"forward_encoder_no_mask averages blocks past contextual_depth={self.contextual_depth}, "
                f"but the encoder has only {self.encoder_depth}"
            )
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        contextual = []
        for n, blk in enumerate(self.blocks):
            x = blk(x)
            if n > self.contextual_depth:
                contextual.append(self.norm(x))
        return torch.stack(contextual, dim=0).mean(dim=0)

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, x, ids_restore):
        """Returns ``(pred [B, L, p*p*C], None, None)``; every mode but 0 decodes without the cls token."""
        x = self.decoder_embed(x)
        tokens = self.unshuffle_tokens(x[:, 1:, :], ids_restore, self.mask_token, self.decoder_pos_embed[0, 1:, :])
        if self.decoder_mode == 0:
            x = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], tokens], dim=1)
        else:
            x = tokens  # modes 1-3 drop the cls token, as the official `decoder_mode != 0`
        x = run_blocks(self.decoder_blocks, x)  # blk(x) in turn (Swin blocks pass autocast's copy along)
        pred = self.decoder_pred(self.decoder_norm(x))
        if self.decoder_mode == 0:
            pred = pred[:, 1:, :]
        return pred, None, None

    # ------------------------------------------------------------------ loss
    def forward_loss(self, imgs, pred, mask, norm_pix_loss=False):
        """Mean squared error per patch, averaged over removed patches."""
        target = self.patchify(imgs)
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.8, noise=None):
        """Returns ``(loss_recon, pred, mask, loss_contrastive)`` as the official model does."""
        latent, mask, ids_restore, _ = self.forward_encoder(imgs, mask_ratio, mask_2d=self.mask_2d, noise=noise)
        pred, _, _ = self.forward_decoder(latent, ids_restore)
        loss_recon = self.forward_loss(imgs, pred, mask, norm_pix_loss=self.norm_pix_loss)
        return loss_recon, pred, mask, torch.zeros(1, device=imgs.device)


def _preset(embed_dim, depth, num_heads, patch_size=16):
    def build(**kwargs):
        config = dict(
            img_size=(1024, 128), in_chans=1, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=512, decoder_num_heads=16, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        config.update(kwargs)
        return MaskedAutoencoderViT(**config)

    return build


mae_vit_small_patch16 = _preset(384, 12, 6)
mae_vit_base_patch16 = _preset(768, 12, 12)
mae_vit_large_patch16 = _preset(1024, 24, 16)
# Patches of 14 do not tile 1024 x 128 (the official conv would drop the remainder, then its patchify
# fails): pass an img_size that they tile, e.g. (1008, 126).
mae_vit_huge_patch14 = _preset(1280, 32, 16, patch_size=14)
