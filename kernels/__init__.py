"""Fused kernels for AudioMAE and MAE-AST: each op beside its eager reference.

Triton ops run on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this package is imported; otherwise CPU tensors take the
eager reference in ``kernels.reference``. ``post_norm_residual`` fuses the decoder's post-norm
residual add with its LayerNorm; ``column_sum`` gives Linears their bias gradients without
PyTorch's staging buffer. ``fbank`` has a CUDA C++ kernel (``csrc/fbank``) and a
batched torch path.
"""
from .column_sum import column_sum
from .fbank import FbankOptions, fbank
from .gather_tokens import gather_tokens, gather_tokens_2d
from .gelu_mlp import gelu_mlp
from .post_norm_residual import post_norm_residual
from .reference.window_attention import window_attention_reference
from .unshuffle_tokens import unshuffle_tokens
from .window_attention import window_attention

__all__ = [
    "FbankOptions",
    "column_sum",
    "fbank",
    "gather_tokens",
    "gather_tokens_2d",
    "gelu_mlp",
    "post_norm_residual",
    "unshuffle_tokens",
    "window_attention",
    "window_attention_reference",
]
