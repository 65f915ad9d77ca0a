"""Benchmark: a Linear's bias gradient, PyTorch's column sum against ``kernels.column_sum``.

The decoder's attention Linears on the triton backend take their bias gradients from
``kernels.column_sum`` (``kernels.column_sum.linear``). Implementations:
- ``official``: ``g.sum(0)``, the reduction autograd's ``_sum_to`` runs for ``nn.Linear``'s bias
  (on the H200, 2026-11-27, it allocated 128 MiB of staging beside a 32 MiB [32768, 512] input);
- ``kernel``: ``kernels.column_sum.column_sum`` (two launches, float32 partials).
On CUDA also ``official_graph`` and ``kernel_graph``, replayed from a CUDA graph, and
``kernel_stages<N>`` and ``kernel_stages<N>_graph``: the launcher with its partials loop pipelined
N deep (1: no prefetch, as the while loop before 2026-11-28; ``STAGES``, the default, among them
as the control: these rows skip ``column_sum``'s argument checks), so that a GPU run can pick the
depth. The peak column is each call's memory beyond its input: the point of the kernel.

Shapes (CUDA): the output gradients of the decoder's qkv (C = 1536) and proj (C = 512) Linears at
batch 64 (R = 64 x 512 tokens), bfloat16. On the CPU (smoke test) a small float32 shape; its
figures say nothing about the GPU. Fewest bytes (``floor_ms``, over the copy bandwidth of the
same run): reading the gradient once.

Fresh inputs: the [32768, 512] bf16 gradient (32 MiB) fits an H100's 50 MB L2, so a call that
re-read the previous call's input would read faster than memory. Each shape builds several
gradients (``benches.harness.num_input_sets``: 256 MiB over all of them on CUDA, two on the CPU)
and every call, eager or replayed, takes the next (``benches.harness.Rotation``); the rows say
how many (``input_sets``).
"""
from __future__ import annotations

import pytest
import torch

from benches.harness import (Rotation, copy_bandwidth_gbps, device_info, memory_floor_ms, num_input_sets,
                             time_against_official)
from kernels.column_sum import _as_rows, _column_sum_launch, column_sum

SUITE = "column_sum"


def _shapes(device: torch.device) -> list[tuple[int, int, torch.dtype]]:
    if device.type == "cuda":
        return [(64 * 512, 512, torch.bfloat16), (64 * 512, 1536, torch.bfloat16)]
    return [(300, 40, torch.float32)]


IMPLS = {"official": lambda g: g.sum(0), "kernel": column_sum}
# Every depth, the default's included: its row (through the same launcher, without column_sum's
# checks) is the control for the others.
STAGE_CANDIDATES = (1, 2, 3, 4)


def _staged(stages: int):
    return lambda g: _column_sum_launch(_as_rows(g), g.dtype, stages)


def gradients(R: int, C: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Independent [R, C] gradients, enough that no call finds its input in the L2 (``num_input_sets``)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    sets = num_input_sets(str(device), R * C * dtype.itemsize)
    return [torch.randn(R, C, generator=gen).to(device, dtype) for _ in range(sets)]


def run(device="cuda", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    bandwidth = copy_bandwidth_gbps(str(device))
    rows = []
    for R, C, dtype in _shapes(device):
        grads = gradients(R, C, dtype, device)
        nbytes = R * C * dtype.itemsize
        floor = memory_floor_ms(nbytes, str(device))
        common = {"suite": SUITE, "name": "bias gradient (column sum)", "shape": f"R={R} C={C}",
                  "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes, "floor_ms": floor,
                  "copy_gbps": bandwidth, **device_info(device)}
        # one call per gradient, taken in turn
        impls = dict(IMPLS)
        if device.type == "cuda":
            impls.update({f"kernel_stages{n}": _staged(n) for n in STAGE_CANDIDATES})
        steps = {impl: [lambda fn=fn, g=g: fn(g) for g in grads] for impl, fn in impls.items()}
        rows += time_against_official(common, steps, device, quick,
                                      graphed_impls=("official", "kernel", *(i for i in impls if i.startswith("kernel_"))))
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_column_sum(benchmark, impl):
    R, C, dtype = _shapes(torch.device("cuda"))[0]
    fn = Rotation([lambda g=g: IMPLS[impl](g) for g in gradients(R, C, dtype, torch.device("cuda"))])

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark(synced)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, quick="--quick" in sys.argv):
        peak = r["peak_mem_bytes"]
        print(f"{r['shape']:16s} {r['impl']:15s} {r['median_ms']:8.4f} ms  {r['fraction_of_copy_bandwidth']:6.1%} of "
              f"copy bw  x{r['speedup_vs_official']:.2f} vs official  "
              + (f"{peak / 2**20:.1f} MiB beyond the input" if peak is not None else ""))
