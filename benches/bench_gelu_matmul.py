"""Benchmark: the MLP with GELU in its matmuls' epilogues against the MLP on cuBLAS.

``kernels.gelu_mlp`` at the decoder's size, forward and forward + backward (save="input": the
backward recomputes fc1), two ways:
- ``cublas``: fc1, fc2 and the backward's matmuls on cuBLAS, GELU and its backward as their own
  passes (``kernels.gelu_grad`` in the backward): the default;
- ``fused``: ``fused_matmul=True``, fc1 with GELU in its epilogue, and one kernel for fc1's
  recomputation, fc2's input gradient and GELU's backward (``kernels.gelu_matmul``).
On CUDA also ``cublas_graph`` and ``fused_graph``, replayed from a CUDA graph. ``floor_ms`` is the
larger of the matmuls' FLOPs over the bf16 matmul rate measured in the same run and the fewest
bytes (x, weights, output and the gradients, once) over the copy bandwidth; the hidden width
never has to reach memory in the forward, and twice (GELU's output and its gradient) backward.

Shape (CUDA): M = 64 x 512 tokens, 512 -> 2048 -> 512, bfloat16, 16 of these per pretraining
step. On the CPU (smoke test) a small float32 shape; its figures say nothing about the GPU.
"""
from __future__ import annotations

import pytest
import torch

from benches.harness import copy_bandwidth_gbps, device_info, graphed, matmul_tflops, time_fn
from kernels.gelu_mlp import gelu_mlp

SUITE = "gelu_matmul"


def _config(device: torch.device) -> tuple[int, int, int, torch.dtype]:
    return (64 * 512, 512, 2048, torch.bfloat16) if device.type == "cuda" else (256, 64, 256, torch.float32)


def _floor_ms(M, C, H, dtype, backward, bandwidth_gbps, tflops) -> float:
    s = dtype.itemsize
    flops = 2 * M * C * H * (2 if not backward else 2 + 5)  # fc1, fc2; backward: fc1 again and four products
    moved = (2 * M * C + 2 * C * H) * s  # x and the output, the weights
    if backward:
        moved += (2 * M * C + 2 * M * H + 2 * M * H) * s  # grad in, x's grad; GELU's output and gradient, twice
    return max(flops / (tflops * 1e12), moved / (bandwidth_gbps * 1e9)) * 1e3


def run(device="cuda", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    M, C, H, dtype = _config(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, C, generator=gen).to(device, dtype).requires_grad_()
    params = [(torch.randn(H, C, generator=gen) * C**-0.5), 0.1 * torch.randn(H, generator=gen),
              (torch.randn(C, H, generator=gen) * H**-0.5), 0.1 * torch.randn(C, generator=gen)]
    params = [p.to(device, dtype).requires_grad_() for p in params]
    grad = torch.randn(M, C, generator=gen).to(device, dtype)
    bandwidth = copy_bandwidth_gbps(str(device))
    tflops = matmul_tflops(str(device)) if device.type == "cuda" else None
    info = device_info(device)
    warmup, reps = (2, 5) if quick else (10, 50)
    rows = []
    for pass_name in ("fwd", "fwd+bwd"):
        floor = _floor_ms(M, C, H, dtype, pass_name == "fwd+bwd", bandwidth, tflops) if tflops else None
        timed = [("cublas", False), ("fused", True)]
        if device.type == "cuda":
            timed += [("cublas_graph", False), ("fused_graph", True)]
        reference_ms = {}
        for impl, fused in timed:
            def step(fused=fused):
                if pass_name == "fwd":
                    with torch.no_grad():
                        return gelu_mlp(x, *params, fused_matmul=fused)
                out = gelu_mlp(x, *params, fused_matmul=fused)
                return torch.autograd.grad(out, [x, *params], grad)

            graph = impl.endswith("_graph")
            t = time_fn(graphed(step) if graph else step, device, warmup=warmup, reps=reps, measure_memory=not graph)
            reference_ms.setdefault(graph, t.median_ms)
            rows.append({
                "suite": SUITE, "name": f"mlp {pass_name}", "impl": impl, "shape": f"M={M} C={C} H={H}",
                "dtype": str(dtype).removeprefix("torch."), "median_ms": t.median_ms, "min_ms": t.min_ms,
                "peak_mem_bytes": t.peak_mem_bytes, "floor_ms": floor, "copy_gbps": bandwidth, "matmul_tflops": tflops,
                "fraction_of_floor": floor / t.median_ms if floor else None,
                "speedup_vs_cublas": reference_ms[graph] / t.median_ms, **info,
            })
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["cublas", "fused"])
def test_gelu_matmul(benchmark, fused):
    device = torch.device("cuda")
    M, C, H, dtype = _config(device)
    x = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
    params = [torch.randn(H, C, device=device, dtype=dtype, requires_grad=True),
              torch.randn(H, device=device, dtype=dtype, requires_grad=True),
              torch.randn(C, H, device=device, dtype=dtype, requires_grad=True),
              torch.randn(C, device=device, dtype=dtype, requires_grad=True)]

    def synced():
        out = gelu_mlp(x, *params, fused_matmul=fused)
        torch.autograd.grad(out.sum(), [x, *params])
        torch.cuda.synchronize()

    benchmark.group = "gelu_matmul fwd+bwd"
    benchmark(synced)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, quick="--quick" in sys.argv):
        print(f"{r['name']:12s} {r['impl']:14s} {r['median_ms']:8.3f} ms  x{r['speedup_vs_cublas']:.2f} vs cublas")
