"""The decoder's Swin-V2-style blocks (AudioMAE decoder mode 1), with timm-patch parameter names.

Post-norm residual branches, scaled cosine attention with a learned per-head temperature ``tau``
(clamped at 0.01), a log-spaced continuous relative position bias from a 2-layer meta MLP
(dropout 0.1 while training), and a cyclic shift with ``-100`` added between tokens that the
wrap-around brought together. The attention core is computed in token order by the backend:
see ``window_attention_core``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autocast_weights import AUTOCAST_DEVICES, block_weights_cast, cast_of, linear
from .backends import BackendUnavailableError, check_backend
from .layers import Mlp, to_2tuple, without_hooks


def fit_window(grid, window, shift) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official clamp: a window no larger than the grid, and no shift along an axis it spans."""
    window = tuple(min(g, w) for g, w in zip(grid, window))
    shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
    return window, shift


def relative_coordinates_log(window: tuple[int, int]) -> torch.Tensor:
    """[N*N, 2] signed log(1 + |delta|) of (row, col) offsets between every pair of window cells."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    # In the default dtype, like the meta-MLP's parameters (float32 as the official table, unless
    # a float64 default builds a float64 model)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).to(torch.get_default_dtype())
    return torch.sign(relative) * torch.log1p(relative.abs())


def window_attention_sdpa(qkv, *, grid, window, shift, num_heads, tau, bias, mask_value=-100.0, use_xformers=False):
    """The window attention through SDPA (or xformers) on rolled, partitioned windows, with the
    position bias and shift mask as one additive mask. Cosine attention normalises q and k each
    (norms clamped at 1e-3, so their product clamps at 1e-6 as the official one does whenever both
    norms are small; the two differ only for a vector of norm below 1e-3 beside a larger one, in the
    forward and in the gradients, which SDPA's one scale per call cannot express)."""
    from kernels.reference.window_attention import shift_window_mask, window_partition, window_reverse

    B, L, C3 = qkv.shape
    C, area = C3 // 3, window[0] * window[1]
    head_dim = C // num_heads
    x = qkv.reshape(B, *grid, C3)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = window_partition(x, window).view(B, -1, area, 3, num_heads, head_dim)
    q, k, v = x.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, windows, heads, area, head_dim]
    scale = head_dim**-0.5
    if tau is not None:
        q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-3)
        k = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-3)
        q = q / tau.clamp(min=0.01).to(q.dtype).view(num_heads, 1, 1)
        scale = 1.0
    mask = torch.zeros(1, num_heads, area, area, device=qkv.device, dtype=q.dtype)
    if bias is not None:
        mask = mask + bias.to(q.dtype)
    if any(shift):
        mask = mask + shift_window_mask(grid, window, shift, mask_value, device=qkv.device, dtype=q.dtype)[:, None]
    num_windows = q.shape[1]
    if use_xformers:
        import xformers.ops as xops

        def heads_last(t):
            return t.reshape(B * num_windows, num_heads, area, head_dim).transpose(1, 2)

        full_mask = mask.expand(B, num_windows, num_heads, area, area).reshape(-1, num_heads, area, area)
        out = xops.memory_efficient_attention(heads_last(q), heads_last(k), heads_last(v), attn_bias=full_mask,
                                              scale=scale)
        out = out.view(B, num_windows, area, C)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.permute(0, 1, 3, 2, 4).reshape(B, num_windows, area, C)
    out = window_reverse(out.reshape(-1, *window, C), window, grid)
    if any(shift):
        out = torch.roll(out, shifts=tuple(shift), dims=(1, 2))
    return out.reshape(B, L, C)


def window_attention_core(qkv, *, backend, grid, window, shift, num_heads, tau, bias, mask_value=-100.0,
                          overwrite_qkv=False):
    """[B, L, 3C] qkv in token order -> [B, L, C] attention output in token order.
    ``overwrite_qkv``: the caller reads qkv nowhere else, so the Triton backward may write qkv's
    gradient over it (``kernels.window_attention``); the other backends ignore it."""
    kwargs = dict(grid=grid, window=window, shift=shift, num_heads=num_heads, tau=tau, bias=bias,
                  mask_value=mask_value)
    if backend == "reference":
        from kernels.reference.window_attention import window_attention_reference

        return window_attention_reference(qkv, **kwargs)
    if backend == "triton":
        from kernels.window_attention import window_attention

        return window_attention(qkv, overwrite_qkv=overwrite_qkv, **kwargs)
    if backend == "sdpa":
        return window_attention_sdpa(qkv, **kwargs)
    if backend == "xformers":
        if qkv.device.type != "cuda":
            raise BackendUnavailableError(f"backend 'xformers' runs on CUDA tensors only, got {qkv.device}")
        return window_attention_sdpa(qkv, use_xformers=True, **kwargs)
    raise ValueError(f"unknown backend {backend!r}")


class WindowMultiHeadAttention(nn.Module):
    """Scaled cosine window attention with the meta-MLP position bias (keys ``qkv``, ``proj``,
    ``meta_mlp.fc1``, ``meta_mlp.fc2``, ``tau``)."""

    def __init__(self, dim, num_heads, window_size, meta_hidden_dim=384, drop_attn=0.0, drop_proj=0.0,
                 backend="reference"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if drop_attn:
            raise ValueError("attention-map dropout is not supported in the fused window attention; use drop_attn=0")
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(drop_proj)
        self.meta_mlp = Mlp(2, hidden_features=meta_hidden_dim, out_features=num_heads, act_layer=nn.ReLU, drop=0.1,
                            backend=backend)
        self.tau = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("relative_coordinates_log", relative_coordinates_log(self.window_size), persistent=False)
        self.check_backend_fits(backend)
        self.backend = check_backend(backend)

    def check_backend_fits(self, backend: str) -> None:
        """Raise if ``backend`` cannot serve this module's shape: the Triton kernel's tiles take head
        dims 16 to 128 (the released decoder's is 32); the other backends take any."""
        head_dim = self.qkv.in_features // self.num_heads
        if backend == "triton" and not 16 <= head_dim <= 128:
            raise ValueError(f"backend 'triton' takes window-attention head dims 16 to 128; this decoder's is "
                             f"{head_dim} (width {self.qkv.in_features}, {self.num_heads} heads): use another "
                             "backend or a width of 256 to 2048 with decoder mode 1's 16 heads")

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N], computed once per call and shared by every window."""
        n = self.window_size[0] * self.window_size[1]
        return self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(self.num_heads, n, n)

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``; on the ``"triton"`` backend a stock Linear without hooks takes its bias
        gradient from ``kernels.column_sum`` (the same values, without the staging buffer that
        PyTorch's column sum allocates: 128 MiB beside a [32768, 512] bf16 gradient)."""
        if self.backend == "triton" and _stock(layer, nn.Linear) and without_hooks(layer):
            from kernels.column_sum import linear as column_sum_linear

            # (under autocast, the block's one-copy casts of the weights: audiomae.autocast_weights)
            return column_sum_linear(x, cast_of(layer.weight), cast_of(layer.bias))
        return linear(layer, x)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
        qkv = self._linear(self.qkv, x)
        out = window_attention_core(
            qkv, backend=self.backend, grid=grid, window=self.window_size, shift=shift,
            num_heads=self.num_heads, tau=self.tau, bias=self.position_bias().to(qkv.dtype),
            # qkv goes nowhere but the attention, unless a hook on the projection sees it
            overwrite_qkv=without_hooks(self.qkv),
        )
        return self.proj_drop(self._linear(self.proj, out))


class SwinTransformerBlock(nn.Module):
    """Post-norm Swin-V2 block on a ``feat_size=(T, F)`` token grid: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``."""

    # On the "triton" backend under autocast: the Linears' weights cast in one copy; False opts out
    # (audiomae.autocast_weights.block_weights_cast).
    cast_weights_together = True

    def __init__(self, dim, num_heads, feat_size, window_size=(4, 4), shift_size=(0, 0), mlp_ratio=4.0,
                 drop=0.0, norm_layer=nn.LayerNorm, backend="reference"):
        super().__init__()
        self.feat_size = to_2tuple(feat_size)
        self.window_size, self.shift_size = fit_window(self.feat_size, to_2tuple(window_size), to_2tuple(shift_size))
        for axis, (g, w) in enumerate(zip(self.feat_size, self.window_size)):
            if g % w:
                raise ValueError(f"the patch grid {self.feat_size} is not tiled by window {self.window_size} (axis {axis})")
        self.attn = WindowMultiHeadAttention(dim, num_heads, self.window_size, drop_proj=drop, backend=backend)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, backend=backend)
        self.norm2 = norm_layer(dim)

    def _add_norm(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``x + norm(branch)``: one fused kernel on the ``"triton"`` backend (same dtypes and values)."""
        if self._fusable_norm(norm):
            from kernels.post_norm_residual import post_norm_residual

            return post_norm_residual(x, branch, norm.weight, norm.bias, eps=norm.eps)
        return x + norm(branch)

    def _fusable_norm(self, norm: nn.Module) -> bool:
        return (self.attn.backend == "triton" and type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
                and without_hooks(norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with block_weights_cast(self, x):  # one cast of its Linear weights (autocast_weights)
            x = self._add_norm(x, self.attn(x, self.feat_size, self.shift_size), self.norm1)
            return self._add_norm(x, self.mlp(x), self.norm2)


    def stream_copy_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype autocast casts this block's input to for its Linears, when the ``"triton"``
        backend can make that copy inside the post-norm kernels instead (see ``forward_with_copy``);
        None otherwise: no autocast, an input autocast leaves alone, hooks that would see it."""
        device = x.device.type
        # (torch.amp.is_autocast_available would do, but torch.compile cannot trace it)
        autocast = device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device)
        # The copy stands in for autocast's cast only where x goes straight into one Linear in each
        # branch: the stock attention and MLP (not a replaced or wrapped module, nor a patched forward).
        stock = (_stock(self.attn, WindowMultiHeadAttention) and _stock(self.attn.qkv, nn.Linear)
                 and _stock(self.mlp, Mlp) and _stock(self.mlp.fc1, nn.Linear))
        if not (autocast and x.dtype == torch.float32 and stock and self._fusable_norm(self.norm1)
                and self._fusable_norm(self.norm2) and without_hooks(*self.modules())):
            return None
        return torch.get_autocast_dtype(device)

    def forward_with_copy(self, x: torch.Tensor, x_copy: torch.Tensor | None, keep_copy: bool):
        """``forward`` for a decoder that runs the blocks in turn under autocast: ``(x, x_copy)``, with
        ``x_copy`` = ``x`` in ``stream_copy_dtype`` (None without one, or not ``keep_copy``).

        Under autocast the float32 residual stream reaches each Linear through autocast's cast to
        bfloat16, and its gradient comes back through a cast to float32 and an add. Here the
        post-norm kernels write the bfloat16 copy beside the sum and add the gradients in their
        backward; the Linears get the copy, the very values autocast would give them. Outputs and
        gradients are those of ``forward``: only passes over memory go."""
        copy_dtype = self.stream_copy_dtype(x)
        if copy_dtype is None:
            return self(x), None
        from kernels.post_norm_residual import post_norm_residual

        with block_weights_cast(self, x):  # one cast of its Linear weights (autocast_weights)
            attn = self.attn(x_copy if x_copy is not None else x, self.feat_size, self.shift_size)
            x, x_copy = post_norm_residual(x, attn, self.norm1.weight, self.norm1.bias, eps=self.norm1.eps,
                                           copy_dtype=copy_dtype)
            mlp = self.mlp(x_copy)
            if not keep_copy:
                return post_norm_residual(x, mlp, self.norm2.weight, self.norm2.bias, eps=self.norm2.eps), None
            return post_norm_residual(x, mlp, self.norm2.weight, self.norm2.bias, eps=self.norm2.eps,
                                      copy_dtype=copy_dtype)


def _stock(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` itself (not a subclass) whose ``forward`` nobody replaced."""
    return type(module) is cls and "forward" not in vars(module)


def run_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    """``for blk in blocks: x = blk(x)``, handing each Swin block the compute-dtype copy of its
    input that the previous one made (``SwinTransformerBlock.forward_with_copy``) where it can."""
    x_copy = None
    for n, blk in enumerate(blocks):
        if _stock(blk, SwinTransformerBlock) and without_hooks(blk):
            last = n == len(blocks) - 1
            x, x_copy = blk.forward_with_copy(x, x_copy, keep_copy=not last)
        else:
            x, x_copy = blk(x), None
    return x
