"""Transformer building blocks with timm's module and parameter names.

Names matter: the official checkpoints were saved from timm's ``PatchEmbed``/``Block``/``Mlp``, so
``patch_embed.proj``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1`` ... must be
spelled exactly so for their state dicts to load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autocast_weights import block_weights_cast, cast_of, linear
from .backends import BackendUnavailableError, check_backend


def to_2tuple(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class PatchEmbed(nn.Module):
    """Non-overlapping patches of a spectrogram ``[B, C, T, F]`` -> tokens ``[B, L, D]``, ``k = t * F' + f``."""

    def __init__(self, img_size=(1024, 128), patch_size=16, in_chans=1, embed_dim=768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for axis, (size, patch) in enumerate(zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(f"img_size[{axis}]={size} is not a multiple of patch_size[{axis}]={patch}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor spectrogram, got {type(x).__module__}.{type(x).__qualname__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}], "
                f"got {list(x.shape)}"
            )
        weight = self.proj.weight
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point spectrogram, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"the input is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"the input is {x.dtype} but the model is {weight.dtype}: cast one to the other")
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """timm 0.3.2's stochastic depth, the version the official code pins: one uniform draw per
    sample, ``floor(keep + u)`` keeps it, survivors scaled by 1/keep. Same seed, same samples
    dropped as the official training (timm 1.0's ``bernoulli_`` draws differently)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    kept = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * kept


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def without_hooks(*modules: nn.Module) -> bool:
    """True when calling these modules runs nothing but their ``forward``: a fused path that
    bypasses them would otherwise skip a user's hooks."""
    from torch.nn.modules import module as module_hooks

    if (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
            or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


class Mlp(nn.Module):
    """timm's ``Mlp``. On the ``"triton"`` backend a GELU MLP runs as ``kernels.gelu_mlp``: the
    same values, fewer activations kept for the backward (``save``: ``"input"`` keeps fc1's input
    and recomputes fc1 and GELU, ``"hidden"`` also keeps fc1's output; see that module).
    ``fused_matmul`` (off by default: not yet timed on a GPU) puts GELU and its backward in the
    epilogues of this project's matmuls (``kernels.gelu_matmul``): the same values up to the
    order of the matmuls' sums."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 backend="reference", save="input", fused_matmul=False):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)
        self.backend = check_backend(backend)
        if save not in ("input", "hidden"):
            raise ValueError(f"save must be 'input' or 'hidden', got {save!r}")
        self.save = save
        if not isinstance(fused_matmul, bool):
            raise TypeError(f"fused_matmul must be a bool, got {type(fused_matmul).__name__}")
        self.fused_matmul = fused_matmul

    def _fusable(self) -> bool:
        # Only the plain modules (a subclass or wrapper may do more than its weights say), and no
        # dropout between GELU and fc2 (its mask would have to be kept) unless in eval.
        no_dropout = type(self.drop1) is nn.Identity or (
            type(self.drop1) is nn.Dropout and (self.drop1.p == 0.0 or not self.training))
        return (self.backend == "triton" and type(self.act) is nn.GELU and no_dropout
                and type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear
                and without_hooks(self.fc1, self.act, self.drop1, self.fc2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():
            from kernels.gelu_mlp import gelu_mlp

            out = gelu_mlp(x, cast_of(self.fc1.weight), cast_of(self.fc1.bias), cast_of(self.fc2.weight),
                           cast_of(self.fc2.bias), approximate=self.act.approximate, save=self.save,
                           fused_matmul=self.fused_matmul)
            return self.drop2(out)
        # ``linear``: the Linear, with its block's one-copy casts under autocast (autocast_weights)
        return self.drop2(linear(self.fc2, self.drop1(self.act(linear(self.fc1, x)))))


def global_attention(q, k, v, *, backend: str, dropout_p: float = 0.0, scale: float | None = None):
    """Softmax attention over the whole sequence. ``q, k, v`` [B, heads, N, head_dim] -> same shape."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "reference":
        attn = (q @ k.transpose(-2, -1)) * scale
        attn = F.dropout(attn.softmax(dim=-1), p=dropout_p)
        return attn @ v
    if backend in ("sdpa", "triton"):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if backend == "xformers":
        if q.device.type != "cuda":
            raise BackendUnavailableError(f"backend 'xformers' runs on CUDA tensors only, got {q.device}")
        import xformers.ops as xops

        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)
    raise ValueError(f"unknown backend {backend!r}")


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (timm's ``Attention``), with a switchable backend."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, backend="reference"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = linear(self.qkv, x)  # the Linear, with its block's one-copy casts under autocast (autocast_weights)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = global_attention(q, k, v, backend=self.backend, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(linear(self.proj, x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block``): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    # On the "triton" backend under autocast: the Linears' weights cast in one copy; False opts out
    # (audiomae.autocast_weights.block_weights_cast).
    cast_weights_together = True

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        backend="reference",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, backend=backend)
        if qk_scale is not None:
            self.attn.scale = qk_scale
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with block_weights_cast(self, x):  # one cast of its Linear weights (autocast_weights)
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

