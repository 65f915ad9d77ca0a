"""AudioMAE fine-tuning model, a drop-in for the official ``models_vit.VisionTransformer``.

timm's ViT with the official audio changes: a 1-channel ``img_size=(1024, 128)`` patch embedding,
fixed sin-cos position embeddings (official layout), global average pooling over the patch tokens
with ``fc_norm`` (``global_pool=True``) or the cls token after ``norm``, and structured time x
frequency masking during fine-tuning through ``forward(x, v=None, mask_t_prob, mask_f_prob)``.
``patch_embed.patch_hw`` is ``(T, F)``, as on the ``PatchEmbed_new`` that the official fine-tuning
script puts in (the pretraining model's is ``(F, T)``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .backends import check_backend
from .layers import Block, PatchEmbed
from .mae import ModelMixin, init_vit_weights
from .masking import check_probability, check_tokens_on_grid, draw_noise, draw_noise_2d, num_kept, random_masking_ids
from .pos_embed import sincos_2d_official


class VisionTransformer(ModelMixin, nn.Module):
    def __init__(
        self,
        img_size=(1024, 128),
        patch_size=16,
        in_chans=1,
        num_classes=527,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        hybrid_backbone=None,
        norm_layer=None,
        global_pool=True,
        mask_2d=True,
        use_custom_patch=False,
        backend="reference",
    ):
        super().__init__()
        if use_custom_patch:
            raise NotImplementedError("use_custom_patch=True (overlapping patches) is not supported")
        if hybrid_backbone is not None:
            raise NotImplementedError("hybrid_backbone (timm's CNN-feature patch embedding) is not supported; "
                                      "AudioMAE embeds spectrogram patches, pass hybrid_backbone=None")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size
        self.patch_embed.patch_hw = self.grid  # (T, F), as the official fine-tuning's PatchEmbed_new
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under torch.device("meta")
        self.blocks = nn.ModuleList(
            # timm 0.3's `qk_scale or head_dim ** -0.5`: a zero scale means the default, as there.
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale or None, drop=drop_rate,
                   attn_drop=attn_drop_rate, drop_path=rate, norm_layer=norm_layer, backend=backend)
             for rate in rates]
        )
        self.global_pool = global_pool
        # The official order: timm's ViT makes norm and head, then models_vit swaps norm for a
        # fc_norm made after head. named_parameters() follows it, and with it the layer-decay
        # parameter groups whose optimizer state an official checkpoint saves.
        if not global_pool:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        self.mask_2d = mask_2d
        self.use_custom_patch = False
        self.backend = check_backend(backend)

        self.pos_embed.data.copy_(sincos_2d_official(embed_dim, self.grid).unsqueeze(0))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        """timm's ViT initialisation, which the official fine-tuning model inherits (not MAE's xavier)."""
        init_vit_weights(m, linear_init=partial(nn.init.trunc_normal_, std=0.02))

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=""):
        """A fresh ``num_classes`` head (timm's API); the pooling is fixed at construction."""
        if global_pool:
            raise ValueError(f"pooling is fixed at construction (global_pool={self.global_pool}), got {global_pool!r}")
        self.num_classes = num_classes
        self.head = (nn.Linear(self.embed_dim, num_classes, device=self.cls_token.device, dtype=self.cls_token.dtype)
                     if num_classes > 0 else nn.Identity())

    def _embed(self, x):
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def _encode(self, x):
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls_tokens, x), dim=1))
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward_features(self, x):
        """[B, C, T, F] spectrogram -> [B, embed_dim] pooled features, no masking."""
        return self._encode(self._embed(x))

    def random_masking(self, x, mask_ratio, noise=None):
        """Official ``random_masking`` (the official forward never calls it): tokens [B, L, D] ->
        ``x_masked`` [B, K, D], ``mask`` [B, L] (1 = removed), ``ids_restore`` [B, L]."""
        B, L, _ = x.shape
        noise = draw_noise(B, L, x.device, noise)
        ids_keep, ids_restore, mask = random_masking_ids(noise, num_kept(L, mask_ratio, "mask_ratio"))
        return self.gather_tokens(x, ids_keep), mask, ids_restore

    def structured_masking_ids(self, batch, mask_t_prob, mask_f_prob, device, noise=None):
        """Kept time rows and frequency columns, each in random order as the official code keeps them."""
        T, F = self.grid
        len_keep_t, len_keep_f = num_kept(T, mask_t_prob, "mask_t_prob"), num_kept(F, mask_f_prob, "mask_f_prob")
        noise_t, noise_f = draw_noise_2d(batch, self.grid, device, noise)
        return torch.argsort(noise_t, dim=1)[:, :len_keep_t], torch.argsort(noise_f, dim=1)[:, :len_keep_f]

    def random_masking_2d(self, x, mask_t_prob, mask_f_prob, noise=None):
        """Official ``random_masking_2d``: patch tokens [B, T*F, D] -> ``(x_masked [B, Kt*Kf, D], None, None)``,
        the tokens of the kept time rows and frequency columns."""
        check_tokens_on_grid(x, self.grid)
        ids_keep_t, ids_keep_f = self.structured_masking_ids(x.shape[0], mask_t_prob, mask_f_prob, x.device, noise)
        if self.backend == "triton":
            from kernels.gather_tokens import gather_tokens_2d

            return gather_tokens_2d(x, ids_keep_t, ids_keep_f, self.grid, check_indices=False), None, None
        T, F = self.grid
        B, _, D = x.shape
        x = x.reshape(B, T, F, D)
        x = torch.gather(x, 1, ids_keep_t[:, :, None, None].expand(-1, -1, F, D))
        x = torch.gather(x, 2, ids_keep_f[:, None, :, None].expand(-1, x.shape[1], -1, D))
        return x.reshape(B, ids_keep_t.shape[1] * ids_keep_f.shape[1], D), None, None  # -1 fails for B = 0

    def forward_features_mask(self, x, mask_t_prob, mask_f_prob, noise=None):
        """Pooled features of the tokens left after dropping random time rows and frequency columns."""
        x, _, _ = self.random_masking_2d(self._embed(x), mask_t_prob, mask_f_prob, noise)
        if self.global_pool and x.shape[1] == 0:
            # The mean over no tokens is NaN (the official model's silent result): an error instead.
            raise ValueError(f"mask_t_prob={mask_t_prob} and mask_f_prob={mask_f_prob} keep no token of the "
                             f"{self.grid[0]}x{self.grid[1]} grid, and global pooling has nothing to average")
        return self._encode(x)

    def forward(self, x, v=None, mask_t_prob=0.0, mask_f_prob=0.0, noise=None):
        """Logits [B, num_classes]; with ``mask_t_prob`` or ``mask_f_prob`` > 0, structured masking first."""
        check_probability(mask_t_prob, "mask_t_prob")
        check_probability(mask_f_prob, "mask_f_prob")
        if mask_t_prob > 0.0 or mask_f_prob > 0.0:
            x = self.forward_features_mask(x, mask_t_prob, mask_f_prob, noise)
        else:
            x = self.forward_features(x)
        return self.head(x)


def vit_small_patch16(**kwargs):
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base_patch16(**kwargs):
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_large_patch16(**kwargs):
    return VisionTransformer(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kwargs})


def vit_huge_patch14(**kwargs):
    """Patches of 14 do not tile the default 1024 x 128: pass an img_size they tile, e.g. (1008, 126)."""
    return VisionTransformer(**{"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **kwargs})
