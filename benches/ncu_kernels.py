"""Hardware counters of the kernels furthest from their targets, read by Nsight Compute on the GPU.

The fbank kernel (issue 5) runs at half its target and no longer at the rate of the shared-memory
pipe its traffic model counted; the window-attention backward (issue 4) at twice its memory floor.
The fbank kernel is profiled twice: as it runs (its 512-point frames on compute_frame_512) and
with every frame on the general pipeline (``fbank_general``), so that the instructions each
issues a frame (InstructionStats: about 2,400 for the general pipeline on the H200, 2026-11-27;
about 1,000 expected of the specialisation from its SASS) and the pipes they load
(ComputeWorkloadAnalysis: float64 and conversions) can be compared.
Timings alone cannot say what holds them: ``ncu`` can (warp stall reasons, issue slot use,
occupancy, memory throughput). ``python -m benches.ncu_kernels`` runs ``ncu`` on this module once
per kernel; each run launches that kernel at its issue's shape, warms it up (``WARMUP`` launches,
skipped by ``ncu``) and profiles the next launch, with the clocks left alone
(``--clock-control none``, as the device notes ask). A diagnostic: it always exits 0, and says
what it could not read (no ``ncu`` on the PATH, no GPU, an ``ncu`` run that failed or took more
than ``TIMEOUT_S``). ``--launch NAME`` (internal) only launches.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

import torch

WARMUP = 2
TIMEOUT_S = 60  # one ncu run: a Python start, the launches, and ncu's replays of one of them
# (the kernel's name for ncu's filter, what launches it)
KERNELS = {"fbank": "regex:fbank_kernel", "fbank_general": "regex:fbank_kernel",
           "window_attention_bwd": "regex:^_window_attention_bwd$"}
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats", "MemoryWorkloadAnalysis",
            "ComputeWorkloadAnalysis", "InstructionStats")


def _launch_fbank(repeats: int) -> None:
    from benches.bench_fbank import AUDIOMAE_OPTIONS, SAMPLE_RATE
    from kernels.fbank import fbank

    waveforms = 0.1 * torch.randn(256, 160000, device="cuda")  # the 256 ten-second clips
    for _ in range(repeats):
        fbank(waveforms, backend="cuda", sample_frequency=SAMPLE_RATE, **AUDIOMAE_OPTIONS)


def _launch_fbank_general(repeats: int) -> None:
    from kernels.fbank import forced_general_path

    with forced_general_path():
        _launch_fbank(repeats)


def _launch_window_attention_bwd(repeats: int) -> None:
    from benches.bench_window_attention import MASK_VALUE, TARGET as cfg, _core_inputs
    from kernels.window_attention import window_attention

    qkv, tau, bias = _core_inputs(cfg, torch.device("cuda"), torch.bfloat16)
    grad = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3, device="cuda", dtype=torch.bfloat16)
    for _ in range(repeats):
        out = window_attention(qkv, grid=cfg["grid"], window=cfg["window"], shift=cfg["shift"],
                               num_heads=cfg["num_heads"], tau=tau, bias=bias, mask_value=MASK_VALUE)
        torch.autograd.grad(out, (qkv, tau, bias), grad)


LAUNCHERS = {"fbank": _launch_fbank, "fbank_general": _launch_fbank_general,
             "window_attention_bwd": _launch_window_attention_bwd}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", choices=sorted(LAUNCHERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.launch:
        LAUNCHERS[args.launch](WARMUP + 1)
        torch.cuda.synchronize()
        return 0
    ncu = shutil.which("ncu")
    if ncu is None or not torch.cuda.is_available():
        print("ncu_kernels: skipped (" + ("no ncu on the PATH" if ncu is None else "no CUDA GPU") + ")")
        return 0
    for name, kernel_filter in KERNELS.items():
        command = [ncu, "--clock-control", "none", "--kernel-name", kernel_filter, "--launch-skip", str(WARMUP),
                   "--launch-count", "1", *(arg for section in SECTIONS for arg in ("--section", section)),
                   sys.executable, "-m", "benches.ncu_kernels", "--launch", name]
        print(f"===== {name}: {' '.join(command)}", flush=True)
        child = subprocess.Popen(command, start_new_session=True)  # its own group: ncu and the profiled program
        try:
            code = child.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            print(f"ncu_kernels: {name}: no report, ncu took more than {TIMEOUT_S} s", flush=True)
            continue
        if code:
            print(f"ncu_kernels: {name}: ncu exited with {code}; its output above says why", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
