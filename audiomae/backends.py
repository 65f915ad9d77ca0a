"""Attention backends: which implementation serves the model's attention and token shuffles.

- ``"reference"``: the official math in eager PyTorch (explicit softmax, roll/partition windows,
  ``torch.gather`` masking), the baseline every other backend must equal.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` for global attention and, with an
  additive mask per window, for the decoder's window attention.
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` in the same places; only when xformers
  is installed *and* its CUDA operators load on this torch build.
- ``"triton"``: this project's fused kernels: masked-token gather and unshuffle, the decoder's
  shifted-window attention and its post-norm residual LayerNorms; global attention goes through
  SDPA (the fused flash kernel), and GELU MLPs through ``kernels.gelu_mlp``, which keeps fc1's
  input only and recomputes the rest in the backward (the same values, less activation memory).
  On CPU tensors the kernels run their eager references unless ``TRITON_INTERPRET=1``.

An unknown or unavailable backend raises; nothing falls back silently.
"""
from __future__ import annotations

import functools

BACKENDS = ("reference", "sdpa", "xformers", "triton")


class BackendUnavailableError(RuntimeError):
    """The asked-for backend exists but cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def xformers_status() -> tuple[bool, str]:
    """(available, reason). Imports xformers and runs one tiny CUDA call to prove its ops load."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken build raising anything at import
        return False, f"xformers is not importable ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return False, "xformers needs a CUDA device and none is available"
    try:
        q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:
        return False, (
            f"xformers {getattr(__import__('xformers'), '__version__', '?')} imports but its CUDA operators "
            f"do not run on torch {torch.__version__} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        )
    return True, "ok"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, "ok"


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for a backend name; raises ValueError for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers":
        return xformers_status()
    if name == "triton":
        return triton_status()
    return True, "ok"


def check_backend(name: str) -> str:
    """Return ``name`` if it can run here, else raise with the reason."""
    available, reason = backend_status(name)
    if not available:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return name


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_status(name)[0]]
