"""Short pretraining from the command line: samples per second, each model backend on the same run.

``audiomae pretrain`` on ``audiomae demo-data`` clips, in process, as a user would run it: clips
decoded by loader workers, fbank on the device in one call per batch, mixed precision, AdamW.
Each backend trains ``2 * window`` optimiser steps; the figure is the second logged window (the
first absorbs compilation, autotuning and the CUDA extension's first build), from the run's own
``samples_per_s`` log, so it counts every host-device synchronisation a real run has.

Shapes (CUDA): ``mae_vit_base_patch16`` with the official AudioSet recipe's Swin decoder, 1024
frames, batch 32, bf16; ``reference`` (the official eager math) against ``triton`` (this project's
kernels). On the CPU (smoke test) a tiny model, 32 frames, fp32, ``reference`` against ``sdpa``:
those figures say nothing about GPU speed.

Floor: the FLOPs of one step (forward and backward, counted by ``torch.utils.flop_counter`` on the
reference model, whose every matmul is visible to it) over the matmul rate measured in the same
process; ``fraction_of_matmul_peak`` is that floor over the measured step time.
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import pytest
import torch

from benches.harness import count_flops, device_info, matmul_tflops

SUITE = "train"


def _config(device: str, quick: bool) -> dict:
    if device.startswith("cuda"):
        return {"model_args": [], "target_length": 1024, "batch": 32, "precision": "bf16", "seconds": 10.24,
                "window": 5 if quick else 20, "backends": ("reference", "triton"), "workers": 8,
                "size": {}}
    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2}
    model_args = [a for k, v in tiny.items() for a in ("--" + k.replace("_", "-"), str(v))] + ["--decoder-mode", "0"]
    return {"model_args": model_args, "target_length": 32, "batch": 4, "precision": "fp32", "seconds": 0.5,
            "window": 2, "backends": ("reference", "sdpa"), "workers": 0, "size": {**tiny, "decoder_mode": 0}}


def _step_flops(cfg: dict, device: str) -> int:
    from audiomae.train import build_model

    kwargs = {"img_size": [cfg["target_length"], 128], "norm_pix_loss": True, "decoder_mode": 1, **cfg["size"]}
    model = build_model("mae_vit_base_patch16", kwargs, "reference").to(device)
    spec = torch.randn(cfg["batch"], 1, cfg["target_length"], 128, device=device)
    return count_flops(lambda: model(spec, mask_ratio=0.8)[0].backward())


def _train(data: Path, out: Path, backend: str, cfg: dict, device: str) -> tuple[float, int | None]:
    """(samples per second in the last log window, peak device memory) of one short run."""
    from audiomae.cli import main

    window = cfg["window"]
    argv = ["pretrain", str(data), "--out", str(out), "--backend", backend, "--device", device,
            "--target-length", str(cfg["target_length"]), "--batch-size", str(cfg["batch"]),
            "--precision", cfg["precision"], "--num-workers", str(cfg["workers"]), "--max-steps", str(2 * window),
            "--log-every", str(window), "--save-every", "0", "--epochs", "1000", *cfg["model_args"]]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    if main(argv) != 0:
        raise RuntimeError(f"pretrain with backend {backend} failed")
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    with open(out / "log.csv") as f:
        rates = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "samples_per_s"]
    return rates[-1], peak


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    from audiomae.demo_data import write_demo_data

    device = str(torch.device(device))
    cfg = _config(device, quick)
    flops = _step_flops(cfg, device)
    rate = matmul_tflops(device) * 1e12
    info = device_info(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        write_demo_data(data, num_per_class=-(-cfg["batch"] // 5) * 2, seconds=cfg["seconds"])
        reference_ms = None
        for backend in cfg["backends"]:
            samples_per_s, peak = _train(data, Path(tmp) / backend, backend, cfg, device)
            step_ms = cfg["batch"] / samples_per_s * 1e3
            reference_ms = reference_ms or step_ms
            floor_ms = flops / rate * 1e3
            rows.append({
                "suite": SUITE, "name": "pretrain mae_vit_base_patch16" if not cfg["size"] else "pretrain tiny",
                "impl": backend, "shape": f"B={cfg['batch']} T={cfg['target_length']}", "dtype": cfg["precision"],
                "median_ms": step_ms, "samples_per_s": samples_per_s, "peak_mem_bytes": peak,
                "speedup_vs_reference": reference_ms / step_ms, "flops_per_step": flops, "floor_ms": floor_ms,
                "fraction_of_matmul_peak": floor_ms / step_ms, **info,
            })
    return rows


# pytest-benchmark: the same run, on CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pretrain_throughput(benchmark):
    rows = benchmark.pedantic(lambda: run("cuda", quick=True), rounds=1, iterations=1)
    benchmark.group = SUITE
    benchmark.extra_info["samples_per_s"] = {row["impl"]: row["samples_per_s"] for row in rows}
