"""MAE-AST (Baade, Peng, Harwath, Interspeech 2022) and its SSAST baseline on one set of modules.

Input: ``spec`` [B, T, 128], a 128-bin log-mel fbank already normalised with the dataset
statistics (the paper's N(0, 0.5^2)); that normalisation is the data pipeline's job, not the model's.

Tokens (no overlap, no cls token), ``P = 256`` values each:
- ``tokens="patch"``: 16 frames x 16 bins, numbered time-major, ``k = t * 8 + f`` on the
  ``(T // 16, 8)`` patch grid, values row-major (frame, then bin) as MAE-AST's ``nn.Unfold`` lays them;
- ``tokens="frame"``: 2 frames x 128 bins, ``k = t`` on the ``(T // 2, 1)`` grid.
Trailing frames that do not fill a token (``T % 16`` or ``T % 2``) are cropped, never padded.
Time-major numbering keeps a token's position independent of the clip length, so the fixed 1-D
sine-cosine embedding (``pos_embed.sincos_1d``) is computed for whatever length arrives.

``mode="mae"`` (MAE-AST): a linear token embedding plus positions; the encoder (timm pre-norm
``Block``s and a final LayerNorm) sees only the kept tokens; a projection (only when the decoder is
narrower or wider), a shared learned mask token for every masked position, positions again, a
shallow decoder over all tokens, and the heads on the decoder output.
``mode="ssast"`` (the paper's baseline): no decoder; the encoder runs over all tokens with the mask
token in place of each masked token's embedding, and the heads read the encoder output.

Heads and loss, on the masked tokens only (each clip masks the same number ``M``):
- reconstruction: ``recon_head`` (one Linear to ``P``), ``loss_recon = mean((pred - target)^2)``
  over masked tokens and their ``P`` values, the target being the normalised input token itself;
- InfoNCE: ``nce_head`` (one Linear to ``P``) gives ``c`` [B, M, P]; per clip the logits are
  ``c @ target^T`` [M, M] and ``loss_nce`` is the cross-entropy of each row against its diagonal,
  averaged over ``B * M``: each prediction must pick its own target among the clip's masked tokens.
  This is MAE-AST's criterion (``log_softmax(pred @ target^T, -1)``) and SSAST's equation (1);
  SSAST's released code normalises over the other axis (softmax over predictions per target).
- ``loss = recon_weight * loss_recon + nce_weight * loss_nce``; a weight of 0 removes that head
  and its loss (reported as 0, never computed). The defaults follow this project's issue
  (``nce_weight=10``); SSAST and MAE-AST's released config put lambda = 10 on the reconstruction
  instead (``recon_weight=10, nce_weight=1``).

Masking (``mask`` is 1 for masked tokens), ``M = N - int(N * (1 - mask_ratio))`` (the released
MAE-AST code's count, and AudioMAE's ``len_keep``) clamped to [1, N - 1]:
- ``masking="random"``: ``audiomae.masking.random_masking_ids`` on ``noise`` [B, N].
- ``masking="chunk"``: SSAST's scheme made exact and per clip. Chunks are anchored at the tokens
  in decreasing ``noise`` order (the order in which random masking masks them, so a chunk size of
  1 gives the random mask); each chunk is a ``c x c`` block of the patch grid (``c`` time rows
  by ``c`` frequency columns) or a run of ``c`` frame tokens, centred on its anchor and shifted
  inwards to lie on the grid (smaller when the grid is). As in SSAST (``cur_clus`` in
  ``gen_maskid_patch``) one size ``c``, uniform in ``chunk_size`` (inclusive), serves all of a
  clip's chunks. Chunks are added in order until ``M`` tokens are
  masked; the last one is cut at ``M`` (its new tokens taken time row by time row). The low-order
  bits of the clip's largest noise value, ``frac(noise * 4096)``, choose its size, so ``noise`` must be
  float32 or float64 uniform draws such as ``torch.rand``. Vectorised: every token anchors a chunk, so
  coverage is total and the first ``M`` tokens in chunk order are found with one scatter-min and
  one sort, O(N * c^2) work per clip, no host synchronisation and no Python loop.
  Shifting blocks inwards means fewer chunks cover the grid's edge rows and columns: at 75 % on
  AudioMAE's 64 x 8 patch grid with c in 3..5, the middle frequency columns are masked about 86 %
  of the time and the outermost about 60 % (an even ``c`` covers one more token below its anchor
  than above, so the low edge a little more). SSAST's and the released code's blocks, anchored
  top-left and cut or wrapped at the edges, mask the first and last time rows least instead.
``forward(spec, noise=None, generator=None)``: without ``noise``, it is drawn with ``torch.rand``
from ``generator`` (or torch's global RNG). Same noise, same mask, on every backend.

Backends (``backend=`` / ``set_backend``, see ``audiomae.backends``): attention as in the AudioMAE
model; ``"triton"`` also moves the encoder's kept-token gather (with its positions), the
decoder's unshuffle (with mask token and positions) and the masked-token gathers of the loss onto
``kernels.gather_tokens`` / ``kernels.unshuffle_tokens``. SSAST mode's mask-token substitution is
one ``torch.where`` on every backend.

Deviations from the released MAE-AST code: timm pre-norm blocks instead of fairseq post-norm ones,
no dropout or layer drop, sin/cos channels in halves instead of interleaved, and masks drawn per
clip (the released chunk masking shares one mask across the batch). Its chunks differ too: patch
blocks there run past the frequency edge into the next time row (here they stay ``c x c``, moved
inwards), frame chunks there are runs of ``2c - 1`` frames (here ``c``: pass ``chunk_size=(5, 9)``
for its lengths), and it masks the lowest-numbered of its over-generated tokens where here the
last chunk is cut. SSAST itself masks frame tokens at random, not in chunks (its code notes that
chunks hurt there).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import check_backend
from .layers import Block
from .mae import ModelMixin, init_vit_weights
from .masking import as_real, draw_noise, inverse_permutation, random_masking_ids
from .pos_embed import sincos_1d

NUM_MEL_BINS = 128
TOKEN_SHAPES = {"patch": (16, 16), "frame": (2, 128)}  # (frames, mel bins) per token
MODES = ("mae", "ssast")
MASKINGS = ("random", "chunk")
_SIZE_BITS = 4096  # frac(noise * 4096) picks a chunk's size: the noise's low 12 bits


class MAEASTOutput(NamedTuple):
    loss: torch.Tensor  # [] weighted sum
    loss_recon: torch.Tensor  # [] mean squared error on masked tokens (0 when switched off)
    loss_nce: torch.Tensor  # [] InfoNCE over each clip's masked tokens (0 when switched off)
    pred: torch.Tensor | None  # [B, N, P] reconstruction of every token, None without the head
    mask: torch.Tensor  # [B, N] float, 1 for masked tokens


def num_masked_tokens(num_tokens: int, mask_ratio: float) -> int:
    """``N - int(N * (1 - mask_ratio))``: the released MAE-AST code keeps ``int((1 - r) * N)`` tokens,
    as AudioMAE's ``random_masking`` does. Kept in [1, N - 1] so both losses and the encoder have tokens."""
    return min(max(num_tokens - int(num_tokens * (1 - mask_ratio)), 1), num_tokens - 1)


def chunk_masking_ids(noise: torch.Tensor, grid: tuple[int, int], num_masked: int, chunk_size: tuple[int, int]):
    """SSAST-style chunk masking on a ``grid = (T, F)`` of tokens ``k = t * F + f`` (module doc).

    ``noise`` [B, T*F]. Returns ``ids_keep`` [B, N - num_masked], ``ids_restore`` [B, N] (int64) and
    ``mask`` [B, N] (float), with the conventions of ``audiomae.masking``.
    """
    if not isinstance(noise, torch.Tensor) or noise.dim() != 2:
        raise ValueError(f"noise must be a [B, N] tensor, got {getattr(noise, 'shape', type(noise).__name__)}")
    if noise.dtype not in (torch.float32, torch.float64):
        # 16-bit noise has too few low-order bits to draw a size from (and ties between tokens)
        raise TypeError(f"noise must be float32 or float64 (its low-order bits pick the chunk size), got {noise.dtype}")
    B, N = noise.shape
    num_time, num_freq = grid
    if num_time * num_freq != N or not 0 <= num_masked <= N:
        raise ValueError(f"noise {list(noise.shape)} does not fit grid {tuple(grid)} with {num_masked} masked tokens")
    lo, hi = _chunk_size(chunk_size)
    extent_t, extent_f = min(hi, num_time), min(hi, num_freq)
    anchors = torch.argsort(noise, dim=1, descending=True)  # chunk r is anchored at token anchors[:, r]
    # One size per clip, from its first anchor's noise; remainder, not frac: noise outside [0, 1)
    # (a randn) must still give sizes in [lo, hi].
    fine = torch.remainder(torch.gather(noise, 1, anchors[:, :1]) * _SIZE_BITS, 1.0)
    size = (lo + (fine * (hi - lo + 1)).long()).clamp_(min=lo, max=hi)  # [B, 1]
    size_t, size_f = size.clamp(max=num_time), size.clamp(max=num_freq)
    # Centre each block on its anchor, shifted inwards to fit the grid: it still covers the anchor,
    # so every token is covered by some chunk and the first num_masked tokens in chunk order exist;
    # centring (not SSAST's top-left anchoring, clipped) keeps the highest bins from being favoured.
    top = (anchors // num_freq - size_t // 2).clamp(min=0).minimum(num_time - size_t)
    left = (anchors % num_freq - size_f // 2).clamp(min=0).minimum(num_freq - size_f)
    i = torch.arange(extent_t, device=noise.device).view(1, 1, -1, 1)
    j = torch.arange(extent_f, device=noise.device).view(1, 1, 1, -1)
    inside = (i < size_t[..., None, None]) & (j < size_f[..., None, None])
    token = (top[..., None, None] + i) * num_freq + left[..., None, None] + j
    rank = torch.arange(N, device=noise.device).view(1, -1, 1, 1)
    order = rank * (extent_t * extent_f) + i * extent_f + j  # chunk, then time row, then column
    first = torch.full((B, N + 1), N * extent_t * extent_f, dtype=torch.long, device=noise.device)
    first.scatter_reduce_(1, torch.where(inside, token, N).flatten(1), order.expand_as(token).flatten(1), "amin")
    # Every token's first-chunk order is distinct; the latest ones are kept.
    ids_keep, ids_restore, mask = random_masking_ids(first[:, :N].neg(), N - num_masked)
    return ids_keep, ids_restore, mask.float()


def _chunk_size(chunk_size) -> tuple[int, int]:
    """``chunk_size`` as ``(min, max)`` ints with ``1 <= min <= max``, or a ValueError naming it."""
    try:
        lo, hi = chunk_size
        if any(isinstance(c, bool) or int(c) != c for c in (lo, hi)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"chunk_size must be two integers (min, max), got {chunk_size!r}") from None
    lo, hi = int(lo), int(hi)
    if not 1 <= lo <= hi:
        raise ValueError(f"chunk_size must be (min, max) with 1 <= min <= max, got {chunk_size!r}")
    return lo, hi


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _real(name: str, value) -> float:
    """``value`` as a Python float (a numpy scalar or a 0-d tensor too: the config is saved as JSON),
    or a ValueError naming it."""
    real = as_real(value)
    if real is None or not math.isfinite(real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return real


def info_nce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pred``, ``target`` [B, M, P] -> [] mean over ``B * M`` of
    ``-log softmax_j(pred[b, i] . target[b, j])`` at ``j = i``, computed in float32 (or float64)."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    with torch.autocast(pred.device.type, enabled=False):
        logits = torch.bmm(pred.to(dtype), target.to(dtype).transpose(1, 2))  # [B, M, M]
    B, M, _ = logits.shape
    labels = torch.arange(M, device=logits.device).repeat(B)
    return F.cross_entropy(logits.reshape(B * M, M), labels)


@functools.lru_cache(maxsize=32)
def _sincos_table(embed_dim: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Computed in float64 and rounded once to the model's dtype (a float64 model gets the exact
    # table); built outside inference mode whatever the first caller's mode, so the cached tensor
    # can meet autograd later.
    with torch.inference_mode(False):
        return sincos_1d(embed_dim, torch.arange(length)).to(device, dtype)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class MAEAST(ModelMixin, nn.Module):
    """MAE-AST pretraining model (or its SSAST baseline with ``mode="ssast"``); see the module doc."""

    def __init__(
        self,
        tokens: str = "patch",
        encoder_depth: int = 6,
        decoder_depth: int = 2,
        embed_dim: int = 768,
        num_heads: int = 12,
        decoder_embed_dim: int | None = None,
        decoder_num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        masking: str = "random",
        mask_ratio: float = 0.75,
        chunk_size: tuple[int, int] = (3, 5),
        recon_weight: float = 1.0,
        nce_weight: float = 10.0,
        mode: str = "mae",
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        backend: str = "reference",
    ):
        super().__init__()
        _check_choice("tokens", tokens, tuple(TOKEN_SHAPES))
        _check_choice("masking", masking, MASKINGS)
        _check_choice("mode", mode, MODES)
        mask_ratio, recon_weight, nce_weight, mlp_ratio = (
            _real(name, value) for name, value in (("mask_ratio", mask_ratio), ("recon_weight", recon_weight),
                                                   ("nce_weight", nce_weight), ("mlp_ratio", mlp_ratio)))
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        if recon_weight < 0 or nce_weight < 0 or recon_weight == nce_weight == 0:
            raise ValueError(
                f"recon_weight and nce_weight must be >= 0 and not both 0, got {recon_weight} and {nce_weight}"
            )
        lo, hi = _chunk_size(chunk_size)
        _check_positive_int("encoder_depth", encoder_depth)
        _check_positive_int("decoder_depth", decoder_depth, minimum=1 if mode == "mae" else 0)
        decoder_embed_dim = embed_dim if decoder_embed_dim is None else decoder_embed_dim
        decoder_num_heads = num_heads if decoder_num_heads is None else decoder_num_heads
        for (name, dim), (heads_name, heads) in ((("embed_dim", embed_dim), ("num_heads", num_heads)),
                                                 (("decoder_embed_dim", decoder_embed_dim),
                                                  ("decoder_num_heads", decoder_num_heads))):
            _check_positive_int(name, dim)
            _check_positive_int(heads_name, heads)
            if dim % 2:  # the sin-cos position table pairs its columns
                raise ValueError(f"{name} must be even (sin-cos position embeddings), got {dim}")
            if dim % heads:
                raise ValueError(f"{name}={dim} must be divisible by {heads_name}={heads}")
        self._config = dict(
            tokens=tokens, encoder_depth=encoder_depth, decoder_depth=decoder_depth, embed_dim=embed_dim,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio, masking=masking, mask_ratio=mask_ratio, chunk_size=[lo, hi],
            recon_weight=recon_weight, nce_weight=nce_weight, mode=mode,
        )
        self.tokens, self.mode, self.masking = tokens, mode, masking
        self.mask_ratio, self.chunk_size = mask_ratio, (lo, hi)
        self.recon_weight, self.nce_weight = recon_weight, nce_weight
        self.embed_dim = embed_dim
        self.token_frames, self.token_bins = TOKEN_SHAPES[tokens]
        self.token_dim = self.token_frames * self.token_bins
        self.backend = check_backend(backend)

        def make_blocks(dim, heads, depth):
            return nn.ModuleList(
                [Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, backend=backend)
                 for _ in range(depth)]
            )

        self.token_embed = nn.Linear(self.token_dim, embed_dim)
        self.blocks = make_blocks(embed_dim, num_heads, encoder_depth)
        self.norm = norm_layer(embed_dim)
        if mode == "mae":
            self.decoder_embed_dim = decoder_embed_dim
            # MAE-AST projects the encoder output only when the decoder width differs.
            self.decoder_embed = (nn.Identity() if decoder_embed_dim == embed_dim
                                  else nn.Linear(embed_dim, decoder_embed_dim))
            self.decoder_blocks = make_blocks(decoder_embed_dim, decoder_num_heads, decoder_depth)
            self.decoder_norm = norm_layer(decoder_embed_dim)
            head_dim = decoder_embed_dim
        else:
            head_dim = embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, head_dim))
        self.recon_head = nn.Linear(head_dim, self.token_dim) if recon_weight > 0 else None
        self.nce_head = nn.Linear(head_dim, self.token_dim) if nce_weight > 0 else None
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_vit_weights)

    def config(self) -> dict:
        """The constructor keywords that rebuild this model, JSON-serialisable: the norm layer's eps
        as ``norm_eps`` (for ``norm_layer=partial(nn.LayerNorm, eps=norm_eps)``), as
        ``audiomae.checkpoint.model_config`` writes it."""
        return {**self._config, "norm_eps": self.norm.eps, "backend": self.backend}

    # ------------------------------------------------------------------ tokens
    def tokenize(self, spec: torch.Tensor, min_tokens: int = 1) -> torch.Tensor:
        """``spec`` [B, T, 128] -> tokens [B, N, 256] (module doc; trailing frames cropped), at
        least ``min_tokens`` of them (pretraining needs 2: one masked, one kept)."""
        if not isinstance(spec, torch.Tensor):
            raise TypeError(f"spec must be a torch.Tensor, got {type(spec).__module__}.{type(spec).__qualname__}")
        if not spec.is_floating_point():
            raise TypeError(f"spec must be a floating-point tensor, got {spec.dtype}")
        if spec.dim() != 3 or spec.shape[-1] != NUM_MEL_BINS:
            raise ValueError(f"spec must be [B, T, {NUM_MEL_BINS}] (128 mel bins), got shape {list(spec.shape)}")
        weight = self.token_embed.weight
        if spec.device != weight.device:
            raise ValueError(f"spec is on {spec.device} but the model is on {weight.device}")
        # Autocast casts float32 inputs, never float64 ones: a float64 spec meets a 16-bit matmul there.
        autocast = torch.is_autocast_enabled(spec.device.type) and spec.dtype != torch.float64
        if spec.dtype != weight.dtype and not autocast:
            raise TypeError(f"spec is {spec.dtype} but the model is {weight.dtype}: cast one to the other")
        B, T, _ = spec.shape
        grid = (T // self.token_frames, NUM_MEL_BINS // self.token_bins)
        if B == 0 or grid[0] * grid[1] < min_tokens:
            raise ValueError(
                f"spec {list(spec.shape)} gives {grid[0] * grid[1]} {self.tokens} tokens of {self.token_frames} "
                f"frames for batch {B}: need a non-empty batch and at least {min_tokens} token"
                + ("s (some masked, some kept)" if min_tokens > 1 else "")
            )
        x = spec[:, : grid[0] * self.token_frames].reshape(B, grid[0], self.token_frames, grid[1], self.token_bins)
        return x.transpose(2, 3).reshape(B, grid[0] * grid[1], self.token_dim)

    def grid(self, num_frames: int) -> tuple[int, int]:
        """The ``(time, frequency)`` token grid of a ``num_frames``-frame clip."""
        return num_frames // self.token_frames, NUM_MEL_BINS // self.token_bins

    def masking_ids(self, batch: int, num_frames: int, device, noise=None, generator=None):
        """``ids_keep`` [B, N - M], ``ids_restore`` [B, N], ``mask`` [B, N] for a ``num_frames`` clip."""
        grid = self.grid(num_frames)
        N = grid[0] * grid[1]
        if noise is not None and generator is not None:
            raise ValueError("pass noise or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if noise is None:
            # float32 at least whatever the default dtype: chunk masking reads the noise's low bits
            dtype = torch.get_default_dtype() if torch.get_default_dtype().itemsize >= 4 else torch.float32
            noise = torch.rand(batch, N, device=device, generator=generator, dtype=dtype)
        noise = draw_noise(batch, N, device, noise)
        num_masked = num_masked_tokens(N, self.mask_ratio)
        if self.masking == "chunk":
            return chunk_masking_ids(noise, grid, num_masked, self.chunk_size)
        ids_keep, ids_restore, mask = random_masking_ids(noise, N - num_masked)
        return ids_keep, ids_restore, mask.float()

    # ------------------------------------------------------------------ model
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, spec: torch.Tensor) -> torch.Tensor:
        """Encoder output over every token, nothing masked: [B, T, 128] -> [B, N, embed_dim]."""
        x = self.token_embed(self.tokenize(spec))
        return self._encode(x + self._positions(self.embed_dim, x.shape[1], x.device))

    def forward(self, spec: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEASTOutput:
        """Pretraining step on ``spec`` [B, T, 128]; ``noise`` [B, N] or ``generator`` fixes the mask."""
        target = self.tokenize(spec, min_tokens=2)
        B, N, _ = target.shape
        ids_keep, ids_restore, mask = self.masking_ids(B, spec.shape[1], spec.device, noise, generator)
        x = self.token_embed(target)
        pos_embed = self._positions(self.embed_dim, N, x.device)
        if self.mode == "mae":
            x = self._encode(self.gather_tokens(x, ids_keep, pos_embed))
            decoder_pos_embed = self._positions(self.decoder_embed_dim, N, x.device)
            x = self.unshuffle_tokens(self.decoder_embed(x), ids_restore, self.mask_token, decoder_pos_embed)
            for blk in self.decoder_blocks:
                x = blk(x)
            x = self.decoder_norm(x)
        else:
            x = self._encode(torch.where(mask.bool().unsqueeze(-1), self.mask_token, x) + pos_embed)
        ids_masked = inverse_permutation(ids_restore)[:, ids_keep.shape[1]:]  # [B, M]
        return self._losses(x, target, ids_masked, mask)

    def _positions(self, dim: int, length: int, device: torch.device) -> torch.Tensor:
        """The sin-cos table in the parameters' dtype (float32 under autocast, where they stay
        float32; a bfloat16 model's own dtype otherwise)."""
        return _sincos_table(dim, length, device, self.token_embed.weight.dtype)

    def _losses(self, x, target, ids_masked, mask) -> MAEASTOutput:
        at_least_fp32 = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        target_masked = at_least_fp32(self.gather_tokens(target, ids_masked))
        zero = target_masked.new_zeros(())
        loss_recon = loss_nce = zero
        pred = None
        if self.recon_head is not None:
            pred = self.recon_head(x)
            loss_recon = F.mse_loss(at_least_fp32(self.gather_tokens(pred, ids_masked)), target_masked)
        if self.nce_head is not None:
            loss_nce = info_nce(self.nce_head(self.gather_tokens(x, ids_masked)), target_masked)
        loss = self.recon_weight * loss_recon + self.nce_weight * loss_nce
        return MAEASTOutput(loss, loss_recon, loss_nce, pred, mask)


class MAEASTClassifier(ModelMixin, nn.Module):
    """Mean pooling over the tokens of ``MAEAST.forward_features`` and a linear head.

    ``MAEASTClassifier(backbone, num_classes)`` wraps a (pretrained) ``MAEAST``;
    ``MAEASTClassifier(num_classes=..., **kwargs)`` builds a fresh ``MAEAST(**kwargs)``.
    """

    def __init__(self, backbone: MAEAST | None = None, num_classes: int = 527, **backbone_kwargs):
        super().__init__()
        if backbone is None:
            backbone = MAEAST(**backbone_kwargs)
        elif backbone_kwargs:
            raise ValueError(f"pass a backbone or its keywords, not both (got {sorted(backbone_kwargs)})")
        if not isinstance(backbone, MAEAST):
            raise TypeError(f"backbone must be an MAEAST, got {type(backbone).__name__}")
        _check_positive_int("num_classes", num_classes)
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        init_vit_weights(self.head)

    def config(self) -> dict:
        return {**self.backbone.config(), "num_classes": self.num_classes}

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """[B, T, 128] -> logits [B, num_classes]."""
        return self.head(self.backbone.forward_features(spec).mean(dim=1))


def mae_ast_patch(**kwargs) -> MAEAST:
    """MAE-AST over 16 x 16 patches (6-layer encoder, 2-layer decoder, width 768, 12 heads)."""
    return MAEAST(**{"tokens": "patch", **kwargs})


def mae_ast_frame(**kwargs) -> MAEAST:
    """MAE-AST over 2-frame x 128-bin frames (6-layer encoder, 2-layer decoder, width 768, 12 heads)."""
    return MAEAST(**{"tokens": "frame", **kwargs})
