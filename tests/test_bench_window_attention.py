"""The window-attention benchmark's accuracy gate and floor record (benches/bench_window_attention.py):
a wrong implementation gets ERROR rows and no timing; a right one, committed results included, never does."""
import json
from pathlib import Path

import pytest
import torch

from benches import bench_window_attention as bench
from kernels.reference.window_attention import window_attention_reference

RESULTS = Path(bench.__file__).resolve().parent / "results"


def _output_scale(cfg, dtype) -> float:
    """The largest magnitude of the float32 reference output on the benchmark's own inputs."""
    qkv, tau, bias = bench._core_inputs(cfg, torch.device("cpu"), dtype)
    with torch.no_grad():
        out = window_attention_reference(qkv.float(), tau=tau.float(), bias=bias.float(), grid=cfg["grid"],
                                         window=cfg["window"], shift=cfg["shift"], num_heads=cfg["num_heads"],
                                         mask_value=bench.MASK_VALUE)
    return out.abs().max().item()


def _committed_core_rows():
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        rows = (data.get("benchmarks") or data.get("rows") or []) if isinstance(data, dict) else data
        for row in rows:
            if row.get("suite") == "window_attention_core" and row.get("max_abs_err_vs_fp32_reference") is not None:
                yield path.name, row


def test_every_committed_row_is_within_its_tolerance():
    """The committed runs measured right kernels: the tolerance must pass every one of them."""
    scales = {"bfloat16": _output_scale(bench.TARGET, torch.bfloat16),
              "float32": _output_scale(bench.SMALL, torch.float32)}
    checked = 0
    for name, row in _committed_core_rows():
        dtype = getattr(torch, row["dtype"])
        tolerance = bench.TOLERANCE[dtype] * scales[row["dtype"]]
        assert row["max_abs_err_vs_fp32_reference"] <= tolerance / 1.5, (name, row["impl"])  # with room to spare
        checked += 1
    assert checked > 50


def _run_core(monkeypatch, impls):
    monkeypatch.setattr(bench, "_core_impls", lambda cfg, device: impls)
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(bench, "memory_floor_ms", lambda nbytes, device: nbytes / 1e7)
    return bench._core_rows(torch.device("cpu"), True, torch.float32)


def test_a_wrong_result_is_an_error_row_without_timing(monkeypatch):
    cfg = bench.SMALL
    args = dict(grid=cfg["grid"], window=cfg["window"], shift=cfg["shift"], num_heads=cfg["num_heads"],
                mask_value=bench.MASK_VALUE)

    def right(qkv, tau, bias):
        return window_attention_reference(qkv, tau=tau, bias=bias, **args)

    def off_by_a_little(qkv, tau, bias):
        return right(qkv, tau, bias) * (1 + 1e-3)  # 1e-3 relative: wrong for float32

    def nan(qkv, tau, bias):
        return right(qkv, tau, bias) * float("nan")

    rows = _run_core(monkeypatch, {"reference": lambda: right, "wrong": lambda: off_by_a_little, "nan": lambda: nan})
    right_rows = [r for r in rows if r["impl"] == "reference"]
    assert {r["step"] for r in right_rows} == {"fwd", "fwd+bwd"}
    assert all(r["median_ms"] and "status" not in r for r in right_rows)
    assert all(r["max_abs_err_vs_fp32_reference"] <= r["tolerance_vs_fp32_reference"] for r in right_rows)
    for impl in ("wrong", "nan"):
        wrong = [r for r in rows if r["impl"] == impl]
        assert {r["step"] for r in wrong} == {"fwd", "fwd+bwd"}
        assert all(r["status"] == "ERROR" and r["median_ms"] is None and "exceeds the tolerance" in r["note"]
                   for r in wrong)
        assert not any(key.startswith("speedup_vs") for r in wrong for key in r)


def test_core_rows_record_their_floor_units(monkeypatch):
    cfg = bench.SMALL
    args = dict(grid=cfg["grid"], window=cfg["window"], shift=cfg["shift"], num_heads=cfg["num_heads"],
                mask_value=bench.MASK_VALUE)
    rows = _run_core(monkeypatch, {"reference": lambda: lambda qkv, tau, bias: window_attention_reference(
        qkv, tau=tau, bias=bias, **args)})
    assert {r["step"]: r["floor_units"] for r in rows} == bench.FLOOR_UNITS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tolerances_are_coarser_for_fewer_mantissa_bits(dtype):
    assert bench.TOLERANCE[dtype] >= torch.finfo(dtype).eps
