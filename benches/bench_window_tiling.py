"""Benchmark: the window-attention kernel under each candidate tiling, at the decoder's shape (GPU only).

``kernels.window_attention.default_tiling`` takes its 16-bit tiles from this sweep (H100,
2026-11-27) and its float32 ones from the sm_90 register use that ``benches/sm90_compile.py``
reports. This suite times the kernel,
forward and forward + backward, under the default and under each candidate of
``TILING_CANDIDATES`` (forced for both passes), against the memory floor measured in the same run;
its ``speedup_vs_default`` column is the measurement that should set the default. Each step is
captured in a CUDA graph and replayed (``benches.harness.graphed``): the tiling changes the
kernels' time, and eager timings at this size are mostly the host's launch time (the first H200
run, timed eagerly, read 0.18 and 0.11 ms for the same forward tiling). On the CPU it is
one SKIP row: interpreter timings say nothing about tiles.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import triton

from benches.bench_window_attention import (FLOOR_UNITS, _add_ratios, _config, _core_impls, _core_inputs, _measure,
                                            _shape)
from benches.harness import memory_floor_ms

import kernels.window_attention  # noqa: F401  (the package attribute of that name is the function)

window_attention_module = sys.modules["kernels.window_attention"]

# (rows per tile, warps, batch elements per backward program)
TILING_CANDIDATES = [(16, 1, 1), (16, 1, 4), (16, 2, 1), (16, 2, 4), (16, 2, 8), (16, 4, 4), (32, 2, 4),
                     (32, 4, 4), (64, 4, 1)]


def _default_batch_per_program(cfg, qkv, tau, bias) -> int:
    """The batch elements a default backward program takes at this shape."""
    _, meta, _ = window_attention_module._launch_args(qkv, cfg["grid"], cfg["window"], cfg["shift"], cfg["num_heads"],
                                                      tau, bias, backward=True)
    return meta["BATCH_PER_PROGRAM"]


def run(device, quick: bool) -> list[dict]:
    """The kernel at the target shape under each candidate tiling (GPU only: interpreter timings
    would say nothing about tiles)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [dict(suite="window_attention_tiling", name="-", impl="-", status="SKIP",
                     note="tilings are timed on the GPU only")]
    dtype = torch.bfloat16
    cfg = _config(device)
    B, L, C = cfg["B"], cfg["grid"][0] * cfg["grid"][1], cfg["num_heads"] * cfg["head_dim"]
    qkv, tau, bias = _core_inputs(cfg, device, dtype)
    grad = torch.randn(B, L, C, device=device, dtype=dtype)
    fn = _core_impls(cfg, device)["triton"]()
    d_pad = max(16, triton.next_power_of_2(cfg["head_dim"]))
    area = cfg["window"][0] * cfg["window"][1]
    defaults = {step: window_attention_module.default_tiling(area, d_pad, dtype == torch.float32, backward)
                for step, backward in (("fwd", False), ("bwd", True))}
    unit = B * L * C * dtype.itemsize
    floors = {step: memory_floor_ms(units * unit, str(device)) for step, units in FLOOR_UNITS.items()}
    base = dict(suite="window_attention_tiling", shape=_shape(cfg), dtype=str(dtype).removeprefix("torch."),
                device=str(device),
                default=f"fwd rows={defaults['fwd'].rows} warps={defaults['fwd'].num_warps}, "
                        f"bwd rows={defaults['bwd'].rows} warps={defaults['bwd'].num_warps} "
                        f"batch={_default_batch_per_program(cfg, qkv, tau, bias)}")
    rows = []
    detached = tuple(t.detach() for t in (qkv, tau, bias))
    steps = {"fwd": lambda: fn(*detached),
             "fwd+bwd": lambda: torch.autograd.grad(fn(qkv, tau, bias), (qkv, tau, bias), grad)}
    for tile_rows, warps, per_program in [(None, None, None)] + TILING_CANDIDATES:
        impl = "default" if tile_rows is None else f"rows={tile_rows} warps={warps} batch={per_program}"
        forced = window_attention_module.forced_tiling(tile_rows, warps, per_program) if tile_rows else None
        with forced or contextlib.nullcontext():
            for step_name, step in steps.items():
                rows.append(_measure(dict(base, impl=impl, name=f"tiling {impl} {step_name}", step=step_name,
                                          floor_ms=floors[step_name], floor_units=FLOOR_UNITS[step_name]),
                                     step, device, True, capture=True))
    _add_ratios(rows, {"default": "speedup_vs_default"})
    return rows


