"""``make gpu-check``'s driver runs end to end on a machine without a GPU.

The GPU machine is lent rarely and briefly: a crash in the driver itself would waste the call. Here
it runs one quick part (the tiling sweep, one SKIP row without a GPU) and must write its files.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_a_part_and_writes_its_files(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benches/gpu_check.py", "--parts", "bench-window_tiling"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "log.txt", "report.md"]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {part["part"]: part["status"] for part in result["parts"]}
    assert parts == {"bench-window_tiling": "OK"}
    rows = result["benchmarks"]
    assert rows and all(row["suite"] == "window_attention_tiling" for row in rows)
    assert "bench-window_tiling" in (tmp_path / "report.md").read_text()


def test_profile_summary_sorts_kernels_by_kind():
    # The profile part's summary: GPU time per kind of kernel and how busy the GPU was.
    import torch

    from benches.bench_models import kernel_time_summary

    class Event:
        def __init__(self, name, us, device_type=torch.autograd.DeviceType.CUDA, annotation=False):
            self.name, self.device_time_total, self.device_type = name, us, device_type
            self.is_user_annotation = annotation

    events = [Event("sm90_xmma_gemm_bf16bf16_bf16f32", 3000.0), Event("_window_attention_fwd", 1000.0),
              Event("_forward_kernel", 600.0), Event("vectorized_elementwise_kernel<4>", 300.0),
              Event("void at::native::_scatter_gather_elementwise_kernel<128, 8>", 100.0),
              Event("aten::addmm", 9999.0, torch.autograd.DeviceType.CPU),
              Event("Optimizer.step#AdamW.step", 5000.0, annotation=True)]  # a range, not a kernel
    text = kernel_time_summary(events, step_ms=5.0 * 2 / 2, steps=2)
    assert text.splitlines()[0].startswith("step 5.00 ms (CUDA events), GPU busy 2.50 ms (50%), 2 kernels a step")
    assert "elementwise and reductions           0.20 ms" in text  # PyTorch's gather kernel is not ours
    assert "matmul                               1.50 ms" in text
    assert "this project's Triton kernels        0.80 ms" in text
    assert "addmm" not in text


def test_profile_kernel_table_names_each_kernel():
    # Which kernels the elementwise time is: every GPU kernel by name, costliest first, per step.
    import torch

    from benches.bench_models import kernel_table

    class Event:
        def __init__(self, name, us, device_type=torch.autograd.DeviceType.CUDA, annotation=False):
            self.name, self.device_time_total, self.device_type = name, us, device_type
            self.is_user_annotation = annotation

    events = [Event("void at::native::unrolled_elementwise_kernel<copy>", 4.0) for _ in range(6)]
    events += [Event("_gelu_grad_kernel", 300.0), Event("_gelu_grad_kernel", 100.0),
               Event("aten::copy_", 999.0, torch.autograd.DeviceType.CPU),
               Event("Optimizer.step#AdamW.step", 5000.0, annotation=True)]
    lines = kernel_table(events, steps=2, top=5).splitlines()
    assert lines[0] == "GPU kernels, costliest first (of 2 names; ms and launches per step):"
    assert lines[1].split() == ["0.200", "ms", "1.0", "x", "200.0", "us", "this", "project's", "Triton", "kernels",
                                "_gelu_grad_kernel"]
    assert lines[2].split()[:6] == ["0.012", "ms", "3.0", "x", "4.0", "us"]
    assert "elementwise and reductions" in lines[2] and lines[2].endswith("unrolled_elementwise_kernel<copy>")
    assert len(lines) == 3


def test_unknown_parts_are_refused_with_the_list():
    done = subprocess.run([sys.executable, "benches/gpu_check.py", "--parts", "bench-gelu-grad"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown part(s) bench-gelu-grad" in done.stderr and "bench-gelu_grad" in done.stderr


def test_a_benchmark_with_error_rows_fails_its_part(tmp_path):
    from benches.gpu_check import collect

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"suite": "s", "status": "ERROR", "note": "No module named 'soundfile'"},
                                {"suite": "s", "median_ms": 1.0}]))
    state = {"parts": [], "parity": [], "bench": [], "profile": ""}
    result = {"part": "bench-x", "status": "OK", "returncode": 0}
    collect({"name": "bench-x", "rows": rows}, result, "", tmp_path, state, run=None, log=None)
    assert result["status"] == "ERROR" and "soundfile" in result["summary"] and len(state["bench"]) == 2
