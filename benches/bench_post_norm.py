"""Benchmark: the decoder's post-norm residual ``x + norm(branch)``, eager and compiled, against the kernel.

Shape and dtypes (CUDA): one decoder block's residual as the bf16-autocast pretraining step has
it: B=64, L=512 (the 64 x 8 grid), C=512, a float32 residual stream ``x``, a bfloat16 ``branch``
(the attention's or the MLP's output projection), float32 LayerNorm parameters, under
``torch.autocast("cuda", torch.bfloat16)``, where eager layer_norm first casts the branch to a
float32 copy and keeps that copy for the backward. Each decoder block has two of these (32 per
pretraining step). On the CPU (smoke test) small float32 shapes, and the figures say nothing about
GPU speed.

Implementations: ``official`` (``x + norm(branch)``, the decoder's eager code), ``official_compiled``
(the same under ``torch.compile``; GPU only) and ``kernel`` (``kernels.post_norm_residual``); on
CUDA also ``official_graph`` and ``kernel_graph``, the same steps replayed from a CUDA graph: at
this size an eager call's host time (launches, autograd) is a large part of what it costs, and the
replays compare the kernels alone (each against the official replay).
Passes: ``fwd`` (no grad) and ``fwd+bwd`` (gradients of ``x``, ``branch``, the weight and the bias).

``post_norm+copy`` rows: the same residual as the decoder uses it, whose sum also feeds the next
Linear in bfloat16 (``copy_dtype``): ``official`` and ``kernel`` cast the sum with ``.to()`` (as
autocast does before the Linear; autograd casts the copy's gradient back and adds it to the sum's),
``kernel_copy`` writes the copy in the kernel's pass and adds the two gradients in its backward.
Both incoming gradients are given. Fewest bytes add the copy's write, the copy gradient's read and
``x``'s gradient (now a sum) written.

Fewest bytes (``floor_ms`` divides them by the copy bandwidth measured in the same run): forward,
read ``x`` and ``branch`` and write the sum; backward, read ``grad_out`` and ``branch`` and write
the branch's gradient (``x``'s gradient is ``grad_out`` itself, and the per-row statistics and
the [C] parameter gradients are negligible). ``saved_bytes`` (CUDA) is what one forward with
autograd keeps alive beyond its output: the activation memory that 32 of these hold through a
training step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from benches.harness import copy_bandwidth_gbps, device_info, graphed, memory_floor_ms, time_fn
from kernels.post_norm_residual import post_norm_residual

SUITE = "post_norm"
NORMS_PER_STEP = 32  # 16 decoder blocks, two post-norm residuals each


def _config(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"B": 64, "L": 512, "C": 512, "x_dtype": torch.float32, "branch_dtype": torch.bfloat16, "autocast": True}
    return {"B": 2, "L": 48, "C": 40, "x_dtype": torch.float32, "branch_dtype": torch.float32, "autocast": False}


def _inputs(cfg: dict, device: torch.device):
    shape = (cfg["B"], cfg["L"], cfg["C"])
    x = torch.randn(shape, device=device, dtype=cfg["x_dtype"], requires_grad=True)
    branch = (torch.randn(shape, device=device) * 2 + 0.5).to(cfg["branch_dtype"]).requires_grad_()
    norm = nn.LayerNorm(cfg["C"]).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    return x, branch, norm


def _impls(cfg: dict, device: torch.device, norm: nn.Module) -> dict:
    def official(x, branch):
        return x + norm(branch)

    def kernel(x, branch):
        return post_norm_residual(x, branch, norm.weight, norm.bias, eps=norm.eps)

    impls = {"official": official, "kernel": kernel}
    if device.type == "cuda":
        impls["official_compiled"] = torch.compile(official)
    return impls


def _copy_impls(cfg: dict, device: torch.device, norm: nn.Module) -> dict:
    """The residual whose sum also goes to the next Linear as a bfloat16 copy: ``(out, copy)``."""
    plain = _impls(cfg, device, norm)

    def cast_after(fn):
        def both(x, branch):
            out = fn(x, branch)
            return out, out.to(torch.bfloat16)
        return both

    def kernel_copy(x, branch):
        return post_norm_residual(x, branch, norm.weight, norm.bias, eps=norm.eps, copy_dtype=torch.bfloat16)

    impls = {"official": cast_after(plain["official"]), "kernel": cast_after(plain["kernel"]), "kernel_copy": kernel_copy}
    if device.type == "cuda":
        impls["official_compiled"] = torch.compile(cast_after(plain["official"]))
    return impls


def _timed(impls: dict, device: torch.device):
    """(impl, fn) to time: every impl eagerly, then on CUDA the official and kernel steps again as
    CUDA-graph replays (``_graph``), which time the kernels without the host's launch time."""
    yield from impls.items()
    if device.type == "cuda":
        for impl in ("official", "kernel", "kernel_copy"):
            if impl in impls:
                yield f"{impl}_graph", impls[impl]


def _bytes(cfg: dict) -> tuple[int, int]:
    elements = cfg["B"] * cfg["L"] * cfg["C"]
    x_size, branch_size = cfg["x_dtype"].itemsize, cfg["branch_dtype"].itemsize
    out_size = torch.promote_types(cfg["x_dtype"], torch.float32 if cfg["autocast"] else cfg["branch_dtype"]).itemsize
    forward = elements * (x_size + branch_size + out_size)
    backward = elements * (out_size + 2 * branch_size)
    return forward, backward


def _copy_bytes(cfg: dict) -> tuple[int, int]:
    """``_bytes`` plus the bfloat16 copy written, its gradient read and x's gradient (a sum) written."""
    elements = cfg["B"] * cfg["L"] * cfg["C"]
    forward, backward = _bytes(cfg)
    return forward + 2 * elements, backward + elements * (2 + cfg["x_dtype"].itemsize)


def _saved_bytes(fn, x, branch, device: torch.device) -> int | None:
    """Memory one forward with autograd keeps alive beyond its output."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = fn(x, branch)
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before - out.numel() * out.element_size()
    del out
    return kept


def _pass_rows(variant, impls, pass_name, nbytes, cfg, device, x, branch, params, grad, grad_copy, warmup, reps,
               dtype, shape, info, bandwidth) -> list[dict]:
    rows = []
    floor = memory_floor_ms(nbytes, str(device))
    official_ms = {}  # eager against eager official, graph replays against the official replay
    for impl, fn in _timed(impls, device):
        def step(fn=fn):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["autocast"], cache_enabled=False):
                if pass_name == "fwd":
                    with torch.no_grad():
                        return fn(x, branch)
                outputs = fn(x, branch)
            if isinstance(outputs, tuple):  # (out, copy): both get a gradient
                out, copy = outputs
                return torch.autograd.grad(outputs, params, (grad.to(out.dtype), grad_copy.to(copy.dtype)))
            return torch.autograd.grad(outputs, params, grad.to(outputs.dtype))

        graph = impl.endswith("_graph")
        t = time_fn(graphed(step) if graph else step, device, warmup=warmup, reps=reps, measure_memory=not graph)
        official_ms.setdefault(graph, t.median_ms)
        row = {
            "suite": SUITE, "name": f"{variant} {pass_name}", "impl": impl, "shape": shape, "dtype": dtype,
            "median_ms": t.median_ms, "min_ms": t.min_ms, "peak_mem_bytes": t.peak_mem_bytes,
            "bytes": nbytes, "floor_ms": floor, "fraction_of_copy_bandwidth": floor / t.median_ms,
            "achieved_gbps": nbytes / (t.median_ms * 1e-3) / 1e9, "copy_gbps": bandwidth,
            "speedup_vs_official": official_ms[graph] / t.median_ms, **info,
        }
        if pass_name == "fwd+bwd" and not graph and variant == "post_norm":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["autocast"]):
                saved = _saved_bytes(fn, x, branch, device)
            row["saved_bytes"] = saved
            row["saved_bytes_per_step"] = saved * NORMS_PER_STEP if saved is not None else None
        rows.append(row)
    return rows


def run(device="cuda", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    cfg = _config(device)
    warmup, reps = (2, 5) if quick else (10, 100)
    x, branch, norm = _inputs(cfg, device)
    impls = _impls(cfg, device, norm)
    grad = torch.randn(x.shape, device=device)
    fwd_bytes, bwd_bytes = _bytes(cfg)
    bandwidth = copy_bandwidth_gbps(str(device))
    info = device_info(device)
    dtype = "bf16-autocast" if cfg["autocast"] else str(cfg["branch_dtype"]).removeprefix("torch.")
    shape = f"B={cfg['B']} L={cfg['L']} C={cfg['C']} x={str(cfg['x_dtype'])[6:]} branch={str(cfg['branch_dtype'])[6:]}"
    params = (x, branch, norm.weight, norm.bias)
    grad_copy = torch.randn(x.shape, device=device).to(torch.bfloat16)
    rows = []
    variants = (("post_norm", impls, (fwd_bytes, bwd_bytes)),
                ("post_norm+copy", _copy_impls(cfg, device, norm), _copy_bytes(cfg)))
    for variant, variant_impls, (fwd_nbytes, bwd_nbytes) in variants:
        for pass_name, nbytes in (("fwd", fwd_nbytes), ("fwd+bwd", fwd_nbytes + bwd_nbytes)):
            rows += _pass_rows(variant, variant_impls, pass_name, nbytes, cfg, device, x, branch, params, grad,
                               grad_copy, warmup, reps, dtype, shape, info, bandwidth)
    return rows


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: the same cases, timed by the fixture on CUDA
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["official", "official_compiled", "kernel"])
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
def test_post_norm(benchmark, impl, pass_name):
    device = torch.device("cuda")
    cfg = _config(device)
    x, branch, norm = _inputs(cfg, device)
    fn = _impls(cfg, device, norm)[impl]
    grad = torch.randn(x.shape, device=device)

    def synced():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if pass_name == "fwd":
                with torch.no_grad():
                    fn(x, branch)
            else:
                out = fn(x, branch)
                torch.autograd.grad(out, (x, branch, norm.weight, norm.bias), grad)
        torch.cuda.synchronize()

    benchmark.group = f"post_norm {pass_name}"
    benchmark(synced)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, quick="--quick" in sys.argv):
        print(f"{r['name']:18s} {r['impl']:18s} {r['median_ms']:8.4f} ms  {r['fraction_of_copy_bandwidth']:6.1%} of copy bw  "
              f"x{r['speedup_vs_official']:.2f} vs official  saved {r.get('saved_bytes')}")
