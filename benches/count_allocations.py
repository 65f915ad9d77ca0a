"""Count, without a GPU, the memory one decoder block's attention path peaks at.

Issue 4 asks the block's attention path (qkv Linear, attention, proj Linear; forward and backward)
to peak at no more than half the official path's memory. ``bench_window_attention`` measures the
peaks on a GPU; this counts them on the CPU at the issue's shape (bf16, B=64, grid 64x8, C=512,
16 heads, window 4x4, shift (2, 0)): every storage an op makes is counted from its creation to its
release (``LiveStorages``, a dispatch mode over real CPU tensors), beyond the inputs, parameters
and output gradient that exist before the step, as ``benches.harness.time_fn`` reads a peak.

The fused path runs its eager ``autograd.Function`` with the Triton launches skipped
(``kernel_launches_skipped``): its values are garbage, but every buffer the launchers allocate,
keep and free is the one they use on a GPU. The official path runs for real. What a GPU adds is
not counted: the allocator's rounding, cuBLAS workspaces, anything allocated outside PyTorch's ops.

``python -m benches.count_allocations [--out F.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SUITE = "window_attention_block_count"


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is on, live and at their peak. A
    storage is counted from the op that makes it until its memory is released; storages in
    ``existing`` (made before) are never counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._counted = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._counted:
            return  # a view of a counted storage, or one made before
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)  # storages keep their Python object

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)


@contextlib.contextmanager
def kernel_launches_skipped():
    """The window-attention launchers with their Triton launches skipped (every ``@triton.jit``
    kernel of the module, launched as ``kernel[grid](...)``), and its eager path taken under the
    counting mode, which would otherwise route the call to the custom op."""
    module = sys.modules["kernels.window_attention"]

    class _Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # (under TRITON_INTERPRET=1, @triton.jit makes InterpretedFunctions)
    launches = [name for name, value in vars(module).items() if isinstance(value, (JITFunction, InterpretedFunction))]
    names = (*launches, "needs_custom_op", "use_triton", "_check_kernel_dtype")
    saved = {name: getattr(module, name) for name in names}
    for name in launches:
        setattr(module, name, _Skipped())
    module.needs_custom_op = lambda: False
    module.use_triton = lambda tensor: True
    module._check_kernel_dtype = lambda qkv: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def peak_bytes(step, existing) -> int:
    with LiveStorages(existing) as counter:
        result = step()
    del result
    return counter.peak


def run(cfg: dict | None = None) -> list[dict]:
    """The counted rows at ``cfg`` (default: issue 4's shape, ``bench_window_attention.TARGET``)."""
    from benches.bench_window_attention import TARGET, _AttentionPath, _shape

    cfg = dict(cfg or TARGET)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    B, L, C = cfg["B"], cfg["grid"][0] * cfg["grid"][1], cfg["num_heads"] * cfg["head_dim"]
    path = _AttentionPath(cfg).to(dtype)
    x = torch.randn(B, L, C, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, L, C, dtype=dtype)
    params = (x, *path.parameters())
    existing = (grad, *params)
    peaks = {"official": peak_bytes(lambda: torch.autograd.grad(path.official(x), params, grad), existing)}
    with kernel_launches_skipped():
        peaks["triton"] = peak_bytes(lambda: torch.autograd.grad(path.fused(x), params, grad), existing)
    base = dict(suite=SUITE, shape=_shape(cfg), dtype="bfloat16", device="cpu (counted, not measured)")
    return [dict(base, impl=impl, name=f"block {impl} fwd+bwd (counted)", counted_peak_bytes=peak,
                 peak_vs_official=peak / peaks["official"],
                 note=f"counted peak {peak / 2**20:.1f} MiB, {peak / peaks['official']:.3f}x the official path's")
            for impl, peak in peaks.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run()
    for r in rows:
        print(f"{r['name']:34s} {r['counted_peak_bytes'] / 2**20:8.1f} MiB  {r['peak_vs_official']:.3f}x official")
    if args.out:
        from benches.harness import device_info
        from benches.source_digest import source_info

        label = "real CPU tensors, Triton launches skipped (cpu): counted, not measured"
        device = {**device_info("cpu"), "device": label}
        with open(args.out, "w") as f:
            json.dump({"device": device, "source": source_info(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
