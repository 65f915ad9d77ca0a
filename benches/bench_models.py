"""Whole-model steps per backend: AudioMAE pretraining, fine-tuning and embedding extraction.

Steps (GPU: the issue's targets, batch 64 of 1024 x 128 spectrograms, bf16 autocast):
- ``pretrain``: ``audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True)`` at mask ratio
  0.8: forward, backward and an AdamW update (the official betas (0.9, 0.95), weight decay 0.05);
- ``finetune``: ``audiomae.vit_base_patch16`` as the official AudioSet fine-tuning builds it
  (527 classes, drop path 0.1, global pooling) with structured masking ``mask_t_prob=0.2``,
  ``mask_f_prob=0.2`` (``ft_as.sh``), BCE-with-logits on multi-hot targets, AdamW (decay 5e-4);
- ``embed``: inference-only embedding extraction, the fine-tuning model's ``forward_features``
  (pooled [B, 768]) under ``torch.inference_mode``.

Variants: ``reference`` (the official eager math), ``reference+compile`` (the same model under
``torch.compile``), ``sdpa``, ``triton``, ``triton+graph`` (the training step captured whole in
one CUDA graph by ``audiomae.cuda_graph.capture_train_step`` and replayed: the same kernels
without the host time of launching them; training steps only), ``reference+graph`` (the official
math replayed the same way: what graphs alone buy), ``triton+compile+graph`` (the compiled step,
captured after its warm-up compiled it: fused elementwise work without launch time), ``triton+fusedmlp+graph``
and ``triton+fusedmlp+compile+graph`` (the same with every MLP's GELU in its own matmuls,
``Mlp.fused_matmul``: off by default until these rows say it pays), ``triton+percast`` and ``triton+percast+graph``
(autocast's cast of each Linear weight as it runs instead of one copy a block: what
``audiomae/autocast_weights.py`` buys, eager and replayed) and ``xformers`` (a SKIP row with the backend's reason
when its operators do not load, as with torch 2.11 and xformers 0.0.35). Each row reports ``median_ms`` (CUDA events, median
after warm-up, the input batch alternating between two random draws), ``samples_per_s``,
``peak_mem_bytes`` (the absolute peak allocated while stepping: weights, gradients and AdamW
state included, as the official 15.8 GiB figure; for ``+graph`` variants the peak over the warm-up
steps and the capture, since a replay allocates nothing), ``speedup_vs_reference`` and
``mem_fraction_of_reference`` (both against ``reference`` measured in the same run), and
``flops`` (``torch.utils.flop_counter`` over one eager reference forward and backward) with
``flop_floor_ms`` = flops over the bf16 matmul rate measured in the same run.

On the CPU the models are tiny, float32, batch 2 (1 with ``quick``, one timed step after one warm-up), and the
timings say nothing about GPU speed. There ``reference+compile`` is skipped (its first build takes minutes on two
cores) and so is the pretraining step on ``triton``: the 16-block Swin decoder's window attention
through Triton's interpreter takes tens of seconds a step; both are SKIP rows, not numbers.

``profile_step`` prints where a step's GPU time goes (``torch.profiler``); the GPU check calls it.
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import pytest
import torch
import torch.nn as nn

from benches.harness import count_flops, matmul_tflops, release_memory, time_fn
from benches.targets import STEP_VARIANTS, step_target_met

STEPS = ("pretrain", "finetune", "embed")
# Most wanted first: a time limit that cuts the run short keeps the reference and triton rows.
VARIANTS = ("reference", "triton", "triton+graph", "triton+compile", "triton+compile+graph", "sdpa", "reference+graph",
            "reference+compile", "xformers", "triton+fusedmlp+graph", "triton+fusedmlp+compile+graph",
            "triton+percast", "triton+percast+graph")
GPU_BATCH = 64
CPU_BATCH = 2
TARGET = "pretrain triton: >= 3x reference samples/s at <= 0.5x its peak memory (issue 6)"


def build_variant(step: str, device: torch.device, variant: str) -> nn.Module:
    """``build_model`` for a variant: its backend, with ``+fusedmlp`` every MLP's GELU in its
    matmuls (``Mlp.fused_matmul``, kernels/gelu_matmul.py), with ``+percast`` autocast's cast of
    each Linear weight as it runs instead of one copy a block (``cast_weights_together``,
    audiomae/autocast_weights.py)."""
    from audiomae.layers import Mlp

    model = build_model(step, device, variant.split("+")[0])
    for module in model.modules():
        if "+fusedmlp" in variant and isinstance(module, Mlp):
            module.fused_matmul = True
        if "+percast" in variant and hasattr(module, "cast_weights_together"):
            module.cast_weights_together = False
    return model


def build_model(step: str, device: torch.device, backend: str) -> nn.Module:
    import audiomae

    if device.type == "cuda":
        if step == "pretrain":
            model = audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True, backend=backend)
        else:
            model = audiomae.vit_base_patch16(num_classes=527, drop_path_rate=0.1, global_pool=True, mask_2d=True,
                                              backend=backend)
    elif step == "pretrain":
        model = audiomae.MaskedAutoencoderViT(
            img_size=(64, 64), embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256, decoder_num_heads=16,
            mlp_ratio=2.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), decoder_mode=1, norm_pix_loss=True,
            backend=backend)
    else:
        model = audiomae.VisionTransformer(img_size=(64, 64), embed_dim=64, depth=2, num_heads=4, num_classes=10,
                                           drop_path_rate=0.1, backend=backend)
    return model.to(device)


def _autocast(device: torch.device, cache_enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache_enabled)


def make_step(step: str, model: nn.Module, batch: int, device: torch.device, compiled: bool = False,
              graphed: bool = False):
    """A closure running one ``step``; inputs alternate between two random batches. ``graphed``
    (training steps on CUDA) captures the whole step in a CUDA graph and replays it."""
    inputs = [torch.randn(batch, 1, *model.patch_embed.img_size, device=device) for _ in range(2)]
    calls = [0]

    def next_input():
        calls[0] += 1
        return inputs[calls[0] % 2]

    if step == "embed":
        model.eval()
        features = torch.compile(model.forward_features) if compiled else model.forward_features

        def run():
            with torch.inference_mode(), _autocast(device):
                return features(next_input())

        return run

    model.train()
    forward = torch.compile(model) if compiled else model
    # The triton backend also takes the fused (single-kernel) AdamW step; the reference keeps the default.
    fused = {"fused": True} if device.type == "cuda" and model.backend == "triton" else {}
    if graphed:
        fused["capturable"] = True
    if step == "pretrain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **fused)

        def batch_loss(x):
            return forward(x, mask_ratio=0.8)[0]
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=5e-4, **fused)
        targets = (torch.rand(batch, model.num_classes, device=device) < 0.05).float()

        def batch_loss(x):
            logits = forward(x, mask_t_prob=0.2, mask_f_prob=0.2)
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)

    def loss_fn():
        return batch_loss(next_input())

    if graphed:
        from audiomae.cuda_graph import capture_train_step

        def graph_loss(x):
            with _autocast(device, cache_enabled=False):  # no weight cast cached across the capture
                return batch_loss(x)

        replay = capture_train_step(model, optimizer, graph_loss, inputs[0])

        def run():
            return replay(next_input())
    else:
        def run():
            with _autocast(device):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run.loss_fn = loss_fn
    return run


def step_flops(step: str, batch: int, device: torch.device) -> int:
    """FLOPs of one eager reference forward (and backward, for training steps)."""
    model = build_model(step, device, "reference")
    run = make_step(step, model, batch, device)
    if step == "embed":
        return count_flops(run)

    def forward_backward():
        with _autocast(device):
            loss = run.loss_fn()
        loss.backward()

    return count_flops(forward_backward)


def skip_reason(step: str, variant: str, device: torch.device) -> str | None:
    import audiomae

    backend = variant.split("+")[0]
    available, why = audiomae.backend_status(backend)
    if not available:
        return why
    if variant.endswith("+graph") and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if variant.endswith("+graph") and step == "embed":
        return "graph capture is measured on the training steps"
    if device.type == "cpu" and "+compile" in variant:
        return "torch.compile's first build of a step takes minutes on this CPU; measured on the GPU"
    if device.type == "cpu" and step == "pretrain" and backend == "triton":
        return "the Swin decoder's window attention through Triton's interpreter takes tens of seconds a step"
    return None


def _free(device: torch.device) -> None:
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(step: str, variant: str, batch: int, device: torch.device, warmup: int, reps: int) -> dict:
    _free(device)
    torch.manual_seed(0)
    model = build_variant(step, device, variant)
    graphed = variant.endswith("+graph")
    run = make_step(step, model, batch, device, compiled="+compile" in variant, graphed=graphed)
    # A replay allocates nothing, and what the capture freed stays in the graph's pool uncounted:
    # for graphed steps the peak is the one since _free() above, over the eager warm-up steps and
    # the capture, not one step's.
    timing = time_fn(run, device, warmup=warmup, reps=reps, measure_memory=not graphed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, run
    _free(device)
    return {"median_ms": timing.median_ms, "min_ms": timing.min_ms, "reps": timing.reps,
            "samples_per_s": batch / (timing.median_ms * 1e-3), "peak_mem_bytes": peak,
            "step_extra_mem_bytes": timing.peak_mem_bytes}


def run(device: str = "cuda", quick: bool = False, batch_sizes=None, steps=STEPS, variants=VARIANTS,
        on_row=None) -> list[dict]:
    """Rows for every step, batch size and variant; ``on_row(rows)`` is called as each row lands, so a
    caller can keep what was measured before a time limit cuts the run short."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    warmup, reps = (3, 10) if on_gpu else ((1, 1) if quick else (1, 3))  # timed after a warm-up, even quick
    batch_sizes = batch_sizes or [GPU_BATCH if on_gpu else (1 if quick else CPU_BATCH)]
    matmul_rate = matmul_tflops(str(device)) * 1e12
    rows = []
    for step in steps:
        for batch in batch_sizes:
            flops = step_flops(step, batch, device)
            base = {"suite": f"model_{step}", "name": step, "batch": batch,
                    "shape": f"B={batch} {'1024x128 base' if on_gpu else '64x64 tiny'}",
                    "dtype": "bf16-autocast" if on_gpu else "float32", "flops": flops,
                    "flop_floor_ms": flops / matmul_rate * 1e3}
            reference = None
            for variant in variants:
                reason = skip_reason(step, variant, device)
                if reason:
                    rows.append({**base, "impl": variant, "status": "SKIP", "note": reason})
                    on_row and on_row(rows)
                    continue
                try:
                    row = {**base, "impl": variant, **measure(step, variant, batch, device, warmup, reps)}
                except Exception as error:  # noqa: BLE001 - e.g. out of memory or a compile failure: report it
                    _free(device)
                    rows.append({**base, "impl": variant, "status": "ERROR",
                                 "note": f"{type(error).__name__}: {error}".splitlines()[0][:300]})
                    on_row and on_row(rows)
                    continue
                reference = reference or (row if variant == "reference" else None)
                row["fraction_of_floor"] = row["flop_floor_ms"] / row["median_ms"]
                if reference:
                    row["speedup_vs_reference"] = reference["median_ms"] / row["median_ms"]
                    if row["peak_mem_bytes"] and reference["peak_mem_bytes"]:
                        row["mem_fraction_of_reference"] = row["peak_mem_bytes"] / reference["peak_mem_bytes"]
                if step == "pretrain" and variant in STEP_VARIANTS and on_gpu and "mem_fraction_of_reference" in row:
                    met = step_target_met(row["speedup_vs_reference"], row["mem_fraction_of_reference"])
                    row["note"] = f"{'meets' if met else 'misses'} target: {TARGET}"
                rows.append(row)
                on_row and on_row(rows)
    return rows


def profile_step(step: str = "pretrain", variant: str = "triton", batch: int = GPU_BATCH, steps: int = 3,
                 row_limit: int = 30) -> str:
    """The profiler's tables of where ``steps`` steps spend their GPU time and their host time,
    costliest first."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    model = build_variant(step, device, variant)
    run = make_step(step, model, batch, device, compiled="+compile" in variant, graphed=variant.endswith("+graph"))
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
    title = f"{step} step, {variant}, batch {batch}: {steps} steps profiled"
    try:
        summary = kernel_time_summary(prof.events(), start.elapsed_time(end) / steps, steps)
    except Exception as error:  # noqa: BLE001 - the table below still says where the time goes
        summary = f"(no kernel summary: {type(error).__name__}: {error})"
    try:
        kernels = kernel_table(prof.events(), steps, top=2 * row_limit)
    except Exception as error:  # noqa: BLE001 - the tables below still say where the time goes
        kernels = f"(no kernel table: {type(error).__name__}: {error})"
    averages = prof.key_averages()
    # The last table says where the host's time goes (the eager step is bound by it): Python
    # wrappers, autograd Functions and launches, costliest first by their own CPU time.
    return "\n".join([title, summary, kernels, averages.table(sort_by="cuda_time_total", row_limit=row_limit),
                      "Host time, by self CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=row_limit)])


# This project's Triton kernels, by their exact names (a substring such as "_gather" would also
# catch PyTorch's own scatter/gather kernels).
PROJECT_KERNELS = frozenset({"_gather_kernel", "_gather_backward_kernel", "_scatter_owned_rows_kernel",
                             "_unshuffle_kernel", "_mask_pos_backward_kernel",
                             "_window_attention_fwd", "_window_attention_bwd", "_window_attention_bwd_finish",
                             "_forward_kernel", "_backward_kernel",
                             "_gelu_grad_kernel", "_gelu_grad_loop_kernel", "_linear_gelu_kernel",
                             "_linear_gelu_backward_kernel",
                             "_column_partials_kernel", "_column_finish_kernel"})
KERNEL_KINDS = (  # (kind, substrings of the GPU kernel's name), first match wins, after PROJECT_KERNELS
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")),
    ("attention (flash/SDPA)", ("flash", "fmha", "attention")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam", "multi_tensor")),
    ("elementwise and reductions", ("elementwise", "reduce", "vectorized", "unrolled", "copy", "cat", "index",
                                    "gather", "scatter", "softmax", "gelu", "fill")),
)


def _kernel_kind(name: str) -> str:
    lower = name.lower()
    return "this project's Triton kernels" if name in PROJECT_KERNELS else next(
        (k for k, keys in KERNEL_KINDS if any(key in lower for key in keys)), "other")


def _gpu_kernels(events):
    """The profiler's GPU kernel events (not the GPU spans of record_function ranges, which hold
    kernels counted on their own, as Optimizer.step#AdamW.step does)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def kernel_table(events, steps: int, top: int = 60) -> str:
    """Every GPU kernel by name, costliest first: launches and ms per step, mean us a launch, kind.
    The per-kind summary says how much is elementwise; this says which kernels those are."""
    per_name: dict[str, list[float]] = {}
    for event in _gpu_kernels(events):
        per_name.setdefault(event.name, []).append(event.device_time_total)
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"GPU kernels, costliest first (of {len(rows)} names; ms and launches per step):"]
    for name, times in rows[:top]:
        shown = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"  {sum(times) / 1e3 / steps:8.3f} ms {len(times) / steps:7.1f} x {sum(times) / len(times):8.1f} us"
                     f"  {_kernel_kind(name):29s}  {shown}")
    return "\n".join(lines)


def kernel_time_summary(events, step_ms: float, steps: int) -> str:
    """GPU time per kind of kernel, per step, and how much of the step the GPU was busy: an idle
    GPU means the step is bound by the host (launches, Python), not by kernels."""
    per_kind, launches = {}, 0
    for event in _gpu_kernels(events):
        launches += 1
        kind = _kernel_kind(event.name)
        per_kind[kind] = per_kind.get(kind, 0.0) + event.device_time_total / 1e3 / steps  # us -> ms per step
    busy = sum(per_kind.values())
    lines = [f"step {step_ms:.2f} ms (CUDA events), GPU busy {busy:.2f} ms ({busy / step_ms:.0%}), "
             f"{launches // steps} kernels a step"]
    lines += [f"  {kind:32s} {ms:8.2f} ms  {ms / step_ms:5.1%}" for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- pytest-benchmark
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_step(benchmark, step, variant):
    device = torch.device("cuda")
    reason = skip_reason(step, variant, device)
    if reason:
        pytest.skip(reason)
    model = build_variant(step, device, variant)
    run = make_step(step, model, GPU_BATCH, device, compiled="+compile" in variant, graphed=variant.endswith("+graph"))

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=10, warmup_rounds=3)
    benchmark.extra_info["samples_per_s"] = GPU_BATCH / benchmark.stats.stats.median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--profile", choices=STEPS, help="print the profiler's table for this step instead (GPU)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.profile:
        print(profile_step(args.profile, args.variants[-1], (args.batch_sizes or [GPU_BATCH])[0]))
        return
    def save(rows):
        print({k: rows[-1].get(k) for k in ("suite", "impl", "median_ms", "samples_per_s", "peak_mem_bytes", "status",
                                            "note")}, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)

    run(args.device, args.quick, args.batch_sizes, args.steps, args.variants, on_row=save)


if __name__ == "__main__":
    main()
