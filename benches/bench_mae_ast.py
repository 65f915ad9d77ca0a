"""One pretraining step of MAE-AST against its SSAST baseline at equal encoder depth.

The paper (Baade et al., Interspeech 2022) reports MAE-AST pretraining 3x faster and with 2x less
memory than SSAST at the same encoder depth. A step here is forward, backward and an AdamW update
(bf16 autocast on the GPU, float32 on the CPU) on 10-second clips (1024 frames x 128 bins, 512
tokens) at 75 % masking, for encoder depths 6 and 12 (decoder 2 layers, width 768, 12 heads).

Rows per (tokens, depth): ``ssast`` (SDPA attention, the baseline), ``mae`` with SDPA and, on the
GPU, ``mae`` with the ``"triton"`` backend (gather/unshuffle kernels), timed in alternation (one
step of each per round) so that a shared machine's load shifts hit all alike. On the GPU the same
three again with ``+graph`` backends: the step captured whole in a CUDA graph
(``audiomae.cuda_graph.capture_train_step``) and replayed, which removes the host's launch time
(at batch 32 an eager step launches kernels faster than they finish only in part); graph rows are
compared with the graphed SSAST row, their memory by saved activations (a replay allocates
nothing, so it has no step peak to read). Then (``--attention reference``) both models with the
``"reference"`` backend: the explicit softmax of the official SSAST code (timm's ViT attention) and
of MAE-AST's (fairseq's), which materialises each layer's [B, heads, L, L] attention matrix, the
attention the paper's 3x and 2x were timed with (on the GPU eager and graphed). SSAST pays that
matrix for all 512 tokens in every layer, MAE-AST's encoder for a quarter of them; SDPA's fused
attention takes most of it away, so the SDPA rows are the stricter comparison. Each row reports
- ``median_ms`` and ``peak_mem_bytes``: the step's peak beyond what was live before it
  (activations, gradients and optimizer temporaries; weights and Adam state excluded), on the GPU
  the allocator's peak, on the CPU the peak resident memory (``benches.harness.cpu_peak_rss_bytes``);
- ``saved_activation_bytes``: the distinct non-parameter tensors autograd saves for backward, a
  device-independent measure of the activation memory;
- ``speedup_vs_ssast`` and ``mem_ratio_vs_ssast``: the figure of ``ssast_baseline`` (the SSAST row
  of the same group: same attention, graphed against graphed, measured in the same run) over this
  row's; the memory ratio uses the peaks, or saved activations where no peak could be read;
- ``flops`` (``torch.utils.flop_counter`` over the step's forward and backward; on the CPU counted
  on ``CPU_PROBE_BATCH`` clips and scaled, ``counted_at_batch`` says which) and
  ``flop_floor_ms`` = flops over the measured matmul rate (``benches.harness.matmul_tflops``:
  bf16 on the GPU, fp32 on the CPU), with ``fraction_of_floor`` = floor / median.

``python -m benches.bench_mae_ast --device cpu --attention sdpa --depths 12 --tokens patch --warmup 1 --reps 3 --out F.json``
writes rows and ``benches.harness.device_info`` as JSON (batch 32, one process per (tokens, depth),
as a 24 GiB machine needs: ``benches/results/mae_ast_cpu_b32-*.json`` with ``--attention sdpa``,
``mae_ast_cpu_b32_reference-*.json`` with ``--attention reference``).
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from audiomae.mae_ast import MAEAST
from benches.harness import count_flops, cpu_peak_rss_bytes, device_info, matmul_tflops, release_memory, time_fn
from benches.source_digest import source_info

SUITE = "mae_ast_pretrain_step"
FULL = dict(batch=32, frames=1024, depths=(6, 12), tokens=("patch", "frame"), embed_dim=768, num_heads=12)
QUICK = dict(batch=2, frames=128, depths=(2,), tokens=("patch",), embed_dim=64, num_heads=4)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _pretraining_step(model: MAEAST, spec: torch.Tensor, optimizer: torch.optim.Optimizer):
    def step():
        with _autocast(spec.device):
            loss = model(spec).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_activation_bytes(model: MAEAST, spec: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for one step's backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        # Kept alive by the graph, so no pointer is reused while counting; detached, since a saved
        # output kept with its grad_fn would tie the graph in a reference cycle that outlives the
        # step (and its AccumulateGrad nodes, which break a later CUDA graph capture).
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _autocast(spec.device):
        loss = model(spec).loss
    del loss
    return sum(saved.values())


def step_flops(model: MAEAST, spec: torch.Tensor) -> int:
    def forward_backward():
        with _autocast(spec.device):
            loss = model(spec).loss
        loss.backward()

    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    return flops


# On the CPU, FLOPs and saved activations are counted on this many clips and scaled to the batch:
# both are exactly linear in it (every op is per clip, InfoNCE's negatives included), and counting
# a 10-second batch of 32 at depth 12 holds more memory than a 24 GiB machine has beside the step.
CPU_PROBE_BATCH = 4
ATTENTION = ("sdpa", "reference")


def _graphed_step(model: MAEAST, spec: torch.Tensor):
    """The step captured in a CUDA graph (capturable AdamW, no autocast weight cache across it)."""
    from audiomae.cuda_graph import capture_train_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)

    def loss_fn(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(x).loss

    replay = capture_train_step(model, optimizer, loss_fn, spec)
    return lambda: replay(spec)


def build_case(device, *, mode, backend, tokens, depth, batch, frames, embed_dim, num_heads, counts=None) -> dict:
    """Model, step and the step's FLOPs and saved activations, measured once. A ``backend`` ending
    in ``+graph`` (CUDA) replays the step from a CUDA graph. ``counts``, a dict shared between
    calls, keeps the FLOPs and saved activations of each model, which a graphed case shares with
    its eager twin (the same seed builds the same model)."""
    device = torch.device(device)
    torch.manual_seed(0)
    backend, graph = backend.removesuffix("+graph"), backend.endswith("+graph")
    model = MAEAST(tokens=tokens, mode=mode, encoder_depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                   backend=backend).to(device)
    spec = torch.randn(batch, frames, 128, device=device) * 0.5
    # A copy, not a view: a saved view would count the whole batch's storage.
    probe = spec if device.type == "cuda" else spec[: min(batch, CPU_PROBE_BATCH)].clone()
    scale = batch / probe.shape[0]
    key = (str(device), mode, backend, tokens, depth, batch, frames, embed_dim, num_heads)
    counts = {} if counts is None else counts
    if key not in counts:
        counts[key] = (round(step_flops(model, probe) * scale), round(saved_activation_bytes(model, probe) * scale))
    flops, saved = counts[key]
    row = {
        "suite": SUITE, "name": f"{mode}/{backend}{'+graph' if graph else ''} {tokens} depth {depth}", "impl": mode,
        "backend": backend, "cuda_graph": graph, "tokens": tokens,
        "encoder_depth": depth, "decoder_depth": 2 if mode == "mae" else 0, "embed_dim": embed_dim,
        "shape": f"B{batch}xT{frames}x128", "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "saved_activation_bytes": saved, "flops": flops,
        "counted_at_batch": probe.shape[0],
        "flop_floor_ms": flops / (matmul_tflops(str(device)) * 1e12) * 1e3,
    }
    if graph:
        return {"row": row, "step": _graphed_step(model, spec)}
    step = _pretraining_step(model, spec, torch.optim.AdamW(model.parameters(), lr=1e-4))
    return {"row": row, "step": step}


def _first_timing(step, device: torch.device, warmup: int, measure_memory: bool = True):
    """The first timed step, with its peak memory: the GPU's peak allocation (one more, untimed
    step, unless not ``measure_memory``), the CPU's peak resident memory (read around the timed
    step itself)."""
    if device.type == "cuda":
        return time_fn(step, device, warmup=warmup, reps=1, measure_memory=measure_memory)
    peak = {}

    def measured_step():
        peak["bytes"] = cpu_peak_rss_bytes(step)

    timing = time_fn(measured_step, device, warmup=warmup, reps=1)
    # The resident high-water mark reads 0 or a page at small shapes (the allocator reuses freed
    # heap): below a MiB it is no measurement, and the row says none rather than 0.
    return replace(timing, peak_mem_bytes=peak["bytes"] if peak["bytes"] > 2**20 else None)


def time_alternating(cases: list[dict], device, warmup: int, reps: int) -> list[dict]:
    """Times the cases' steps in alternation, one step each per round, so that load changes on a
    shared machine hit every case alike; the peak memory comes from each case's first timed step."""
    device = torch.device(device)
    for case in cases:
        # A replay allocates nothing: graphed cases report no peak, so none is measured.
        case["timings"] = [_first_timing(case["step"], device, warmup, not case["row"].get("cuda_graph"))]
    for _ in range(reps - 1):
        for case in cases:
            case["timings"].append(time_fn(case["step"], device, warmup=0, reps=1, measure_memory=False))
    rows = []
    for case in cases:
        times = sorted(t.median_ms for t in case["timings"])
        median = statistics.median(times)
        rows.append({**case["row"], "median_ms": median, "min_ms": times[0], "reps": len(times),
                     "peak_mem_bytes": _peak(case),
                     "fraction_of_floor": case["row"]["flop_floor_ms"] / median})
    return rows


def _peak(case) -> int | None:
    """The measured peak, or None where there is none (a replay allocates nothing)."""
    return None if case["row"].get("cuda_graph") else case["timings"][0].peak_mem_bytes


def _with_ratios(rows: list[dict], baseline: dict) -> list[dict]:
    # The CPU's resident peak can read 0 at small shapes (freed heap kept by the allocator): then the
    # saved activations compare the cases instead.
    memory = "peak_mem_bytes" if all(row["peak_mem_bytes"] for row in rows) else "saved_activation_bytes"
    for row in rows:
        row["ssast_baseline"] = baseline["name"]
        row["speedup_vs_ssast"] = baseline["median_ms"] / row["median_ms"]
        row["mem_ratio_vs_ssast"] = baseline[memory] / row[memory]
        row["mem_ratio_measure"] = memory
    return rows


def _groups(device: torch.device, attention: tuple[str, ...]) -> list[list[tuple[str, str]]]:
    """The (mode, backend) groups to time, each led by its SSAST baseline. ``"sdpa"``: SDPA for
    both models and, on the GPU, MAE-AST on the ``"triton"`` backend, then the same steps replayed
    from CUDA graphs. ``"reference"``: the explicit-softmax attention of the official SSAST and
    MAE-AST code (timm's and fairseq's), the attention the paper's 3x and 2x were timed with, and on
    the GPU the same replayed from CUDA graphs."""
    unknown = set(attention) - set(ATTENTION)
    if unknown:
        raise ValueError(f"unknown attention {sorted(unknown)}; choose from {', '.join(ATTENTION)}")
    groups = []
    if "sdpa" in attention:
        variants = [("ssast", "sdpa"), ("mae", "sdpa")] + ([("mae", "triton")] if device.type == "cuda" else [])
        groups.append(variants)
        if device.type == "cuda":
            groups.append([(mode, f"{backend}+graph") for mode, backend in variants])
    if "reference" in attention:
        groups.append([("ssast", "reference"), ("mae", "reference")])
        if device.type == "cuda":
            groups.append([("ssast", "reference+graph"), ("mae", "reference+graph")])
    return groups


def measure(device, *, batch, frames, depths, tokens, embed_dim, num_heads, warmup=3, reps=10,
            attention=ATTENTION) -> list[dict]:
    device = torch.device(device)
    groups = _groups(device, tuple(attention))
    rows, counts = [], {}
    for token_kind in tokens:
        for depth in depths:
            for group in groups:  # eager rows against eager SSAST, graphed against graphed
                try:
                    rows += _group_rows(device, group, token_kind, depth, batch, frames, embed_dim, num_heads,
                                        warmup, reps, counts)
                except Exception as error:  # noqa: BLE001 - a step, capture or replay that fails is a row that says why
                    kind = "graphed" if group[0][1].endswith("+graph") else f"eager {group[0][1]}"
                    rows.append({"suite": SUITE, "name": f"{kind} steps {token_kind} depth {depth}", "impl": "mae",
                                 "status": "ERROR", "note": f"{type(error).__name__}: {error}".splitlines()[0][:300]})
                release_memory(device)  # here, once the cases (and any traceback holding them) are gone
    return rows


def _group_rows(device, group, token_kind, depth, batch, frames, embed_dim, num_heads, warmup, reps,
                counts=None) -> list[dict]:
    """One group's cases built, timed in alternation and compared with the group's first (SSAST)."""
    cases = [build_case(device, mode=mode, backend=backend, tokens=token_kind, depth=depth, batch=batch,
                        frames=frames, embed_dim=embed_dim, num_heads=num_heads, counts=counts)
             for mode, backend in group]
    case_rows = time_alternating(cases, device, warmup, reps)
    return _with_ratios(case_rows, baseline=case_rows[0])


def run(device, quick: bool, attention=ATTENTION) -> list[dict]:
    config = QUICK if quick else FULL
    warmup, reps = (1, 2) if quick else (3, 10)
    return measure(device, warmup=warmup, reps=reps, attention=attention, **config)


# ------------------------------------------------------------------------------- pytest-benchmark
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("depth", FULL["depths"])
@pytest.mark.parametrize("mode,backend", [("ssast", "sdpa"), ("mae", "sdpa"), ("mae", "triton")])
def test_pretraining_step(benchmark, mode, backend, depth):
    torch.manual_seed(0)
    model = MAEAST(tokens="patch", mode=mode, encoder_depth=depth, backend=backend).cuda()
    spec = torch.randn(FULL["batch"], FULL["frames"], 128, device="cuda") * 0.5
    step = _pretraining_step(model, spec, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def synced_step():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(synced_step, warmup_rounds=3, rounds=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=FULL["batch"])
    parser.add_argument("--frames", type=int, default=FULL["frames"])
    parser.add_argument("--depths", type=int, nargs="+", default=list(FULL["depths"]))
    parser.add_argument("--tokens", nargs="+", default=list(FULL["tokens"]), choices=["patch", "frame"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=list(ATTENTION),
                        help="groups to time: SDPA (and on the GPU the triton and graphed steps), and the "
                             "official code's explicit-softmax attention")
    parser.add_argument("--quick", action="store_true", help="the smoke-test configuration of run(device, True)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        rows = run(args.device, quick=True, attention=args.attention)
    else:
        rows = measure(args.device, batch=args.batch, frames=args.frames, depths=args.depths, tokens=args.tokens,
                       embed_dim=FULL["embed_dim"], num_heads=FULL["num_heads"], warmup=args.warmup, reps=args.reps,
                       attention=args.attention)
    for row in rows:
        print(json.dumps({k: row.get(k) for k in ("name", "tokens", "encoder_depth", "shape", "median_ms",
                                               "speedup_vs_ssast", "mem_ratio_vs_ssast")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        note = ("CPU figures: fp32, no autocast; they say nothing about GPU speed; peak memory is the "
                "peak resident memory beyond what was resident before the step" if torch.device(args.device).type == "cpu" else "GPU figures, bf16 autocast")
        args.out.write_text(json.dumps({"device": device_info(args.device), "source": source_info(), "note": note,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
