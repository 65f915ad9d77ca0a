"""Benchmark: the MLP backward's GELU pass, PyTorch's three passes against the fused kernel.

What ``gelu_mlp``'s backward needs of fc1's output ``hidden`` once fc2's input gradient
``grad_act`` is known: GELU(hidden) again (for fc2's weight gradient), GELU's backward, and fc1's
bias gradient (the column sums). Implementations:
- ``official``: ``F.gelu``, ``aten.gelu_backward`` and ``sum(0)``, as eager autograd runs them;
- ``official_compiled``: the same under ``torch.compile`` (GPU only), which may fuse the three;
- ``kernel``: ``kernels.gelu_grad.gelu_and_grad`` (one pass, the gradient over ``grad_act``; here
  over a copy made once, as the MLP's backward gives it a buffer it may overwrite).
On CUDA also ``official_graph`` and ``kernel_graph``, replayed from a CUDA graph (the kernels
without the host's launch time), each against the official replay, and ``kernel_loop<N>`` (eager
and replayed): the candidate loop kernel with N row tiles a program, pipelined (see
``kernels.gelu_grad._gelu_grad_loop_kernel``), so that a GPU run can say whether it should be the
default.

Shape (CUDA): the decoder's MLP at batch 64, M = 64 x 512 tokens, H = 2048, bfloat16, 16 of these
per pretraining step. On the CPU (smoke test) a small float32 shape; its figures say nothing about
the GPU. Fewest bytes (``floor_ms``, over the copy bandwidth of the same run): read ``hidden`` and
``grad_act`` and write GELU's output and the gradient once (the [H] bias gradient is negligible).
"""
from __future__ import annotations

import pytest
import torch

from benches.harness import copy_bandwidth_gbps, device_info, memory_floor_ms, time_against_official
from kernels.gelu_grad import gelu_and_grad, gelu_and_grad_reference

SUITE = "gelu_grad"
# Row tiles a program of the pipelined loop kernel (``gelu_and_grad(..., tiles_per_program)``),
# timed beside the default of one tile a program (2026-11-28: untimed yet).
LOOP_CANDIDATES = (4, 8, 16)


def _config(device: torch.device) -> tuple[int, int, torch.dtype]:
    return (64 * 512, 2048, torch.bfloat16) if device.type == "cuda" else (256, 384, torch.float32)


def _impls(device: torch.device) -> dict:
    def official(hidden, grad_act):
        return gelu_and_grad_reference(hidden, grad_act, "none", True)

    scratch: dict[int, torch.Tensor] = {}

    def kernel(hidden, grad_act, tiles_per_program=1):
        # The kernel writes the gradient over grad_act, as the MLP's backward lets it. Here it
        # writes over a copy made on the first call (the values it overwrites do not change its
        # work), so that the other rows keep their input and the timing is the kernel's alone.
        key = (grad_act.data_ptr(), grad_act.shape, grad_act.dtype)
        buffer = scratch.get(key)
        if buffer is None:
            buffer = scratch[key] = grad_act.clone()
        return gelu_and_grad(hidden, buffer, "none", True, tiles_per_program)

    impls = {"official": official, "kernel": kernel}
    if device.type == "cuda":
        impls["official_compiled"] = torch.compile(official)
        for tiles in LOOP_CANDIDATES:
            impls[f"kernel_loop{tiles}"] = lambda h, g, t=tiles: kernel(h, g, t)
    return impls


def run(device="cuda", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    rows_, cols, dtype = _config(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (2 * torch.randn(rows_, cols, generator=gen)).to(device, dtype)
    grad_act = torch.randn(rows_, cols, generator=gen).to(device, dtype)
    nbytes = 4 * rows_ * cols * dtype.itemsize
    floor = memory_floor_ms(nbytes, str(device))
    common = {"suite": SUITE, "name": "gelu_grad fwd+bwd", "shape": f"M={rows_} H={cols}",
              "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes, "floor_ms": floor,
              "copy_gbps": copy_bandwidth_gbps(str(device)), **device_info(device)}
    steps = {impl: (lambda fn=fn: fn(hidden, grad_act)) for impl, fn in _impls(device).items()}
    graphed = ("official", "kernel", *(impl for impl in steps if impl.startswith("kernel_loop")))
    return time_against_official(common, steps, device, quick, graphed_impls=graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["official", "official_compiled", "kernel"])
def test_gelu_grad(benchmark, impl):
    device = torch.device("cuda")
    rows_, cols, dtype = _config(device)
    hidden = torch.randn(rows_, cols, device=device, dtype=dtype)
    grad_act = torch.randn_like(hidden)
    fn = _impls(device)[impl]

    def synced():
        fn(hidden, grad_act)
        torch.cuda.synchronize()

    benchmark(synced)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, quick="--quick" in sys.argv):
        print(f"{r['impl']:18s} {r['median_ms']:8.4f} ms  {r['fraction_of_copy_bandwidth']:6.1%} of copy bw  "
              f"x{r['speedup_vs_official']:.2f} vs official")
