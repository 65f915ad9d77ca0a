"""Ledger: what one pretraining step must move and compute, op by op, without running it.

The profile (``bench_models --profile``) says where a GPU spends a step; this says what each part
of the step would cost at the hardware's floor, anywhere, GPU or not. It runs one whole step of
``audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True)`` at batch 64 (mask ratio
0.8, bf16 autocast, forward, backward and the AdamW update) on fake CUDA tensors (shapes and
dtypes, no arithmetic; see ``bench_memory_estimate``) and records every op the dispatcher runs:
the bytes it reads and writes (each input and output once: the fewest an unfused op can move)
and, for matmuls and attention, its FLOPs. Its floor is the larger of bytes over the copy
bandwidth and FLOPs over the bf16 matmul rate. Views move nothing and are skipped; this
project's ops (``audiomae::*``) count their inputs and outputs like any other op.

The sum of the floors is what the step would take if every op ran at its floor, one after
another: a lower bound for the step as it is written, which fusing ops (fewer bytes) lowers.
Rows group the ops by kind (matmul, attention, this project's kernels, casts, reductions,
other elementwise, optimizer), with the ops that move the most bytes named. The rates default
to the ones measured on an H100 (``RATES_DEVICE``) in the newest committed results under
``benches/results/`` that record them (``measured_rates``): the copy bandwidth the benchmarks'
floors divide by, and the bf16 matmul rate of ``benches.harness.matmul_tflops`` (an 8192-cubed
matmul; ``bench_gelu_matmul`` stores it as ``matmul_tflops``, ``bench_models`` and ``bench_mae_ast``
as ``flops`` over ``flop_floor_ms``). Where no such run exists the figure is an assumption
(``ASSUMED_RATES``), and the output says so, as it names the file a measured rate comes from;
``--bandwidth-gbps`` and ``--matmul-tflops`` override either.

``python -m benches.step_ledger [--backend triton] [--batch 64] [--top 12] [--fused-matmul]``;
``--results PATH`` writes every variant's row as a results file.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
RATES_DEVICE = "H100"  # the GPU the issues state their targets for: its measured rates are the defaults
# Only where no committed run on RATES_DEVICE measured a rate; the output then calls it an assumption.
ASSUMED_RATES = {"bandwidth_gbps": 3000.0, "matmul_tflops": 600.0}
RATE_NAMES = {"bandwidth_gbps": "GB/s copy", "matmul_tflops": "TFLOP/s bf16 matmul"}

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "convolution", "convolution_backward"}
ATTENTION_PREFIXES = ("_scaled_dot_product", "_efficient_attention", "_flash_attention")
CASTS = {"_to_copy", "copy_", "clone", "contiguous", "_foreach_copy_"}  # the last: audiomae.autocast_weights
REDUCTIONS = {"sum", "mean", "var", "var_mean", "amax", "amin", "aminmax", "max", "min", "norm", "linalg_vector_norm",
              "native_layer_norm", "native_layer_norm_backward", "_log_softmax", "_softmax", "_softmax_backward_data"}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "ones_like",
        "full", "full_like", "scalar_tensor", "lift_fresh", "_local_scalar_dense", "set_", "resize_", "record_stream",
        "_has_compatible_shallow_copy_type", "_unsafe_view"}  # _unsafe_view: a view the schema does not mark


def _unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (a broadcast axis of stride 0 counts once)."""
    if t.numel() == 0:
        return 0
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _matmul_flops(name: str, args, out) -> int:
    """Multiply-adds times two of a matmul-like op, from its operand shapes."""
    if name in ("mm", "addmm", "bmm", "baddbmm", "addmv", "mv"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm", "mv") else (args[1], args[2])
        return 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    if name in ("convolution", "convolution_backward"):
        weight = args[1] if name == "convolution" else args[2]
        output = out if name == "convolution" else args[0]
        per_output = weight[0].numel()  # in_channels * kernel area (groups of 1)
        return 2 * output.numel() * per_output * (2 if name == "convolution_backward" else 1)
    return 0


def _attention_flops(args) -> int:
    """Forward flash/efficient attention: QK^T and PV, q [B, H, N, D], k [B, H, M, D]."""
    q, k = args[0], args[1]
    return 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]


def kind_of(name: str, namespace: str) -> str:
    if namespace == "audiomae":
        return "this project's kernels"
    if name in CASTS:
        return "casts and copies"
    if name.startswith("_fused_adam") or name.startswith("_foreach"):
        return "optimizer"
    if name in MATMULS:
        return "matmul"
    if name.startswith(ATTENTION_PREFIXES):
        return "attention (SDPA)"
    if name in REDUCTIONS:
        return "reductions and norms"
    return "other elementwise"


def _gelu_mlp_rows(name: str, args) -> list[tuple]:
    """The passes inside ``audiomae::gelu_mlp`` and its backward (``kernels.gelu_mlp``), whose
    matmuls a fake op does not dispatch: (op, kind, bytes, flops) rows, one per pass."""
    def matmul(what, rows, inner, cols, s, out_size=None):
        moved = (rows * inner + inner * cols) * s + rows * cols * (out_size or s)
        return (f"audiomae::{name} ({what})", "matmul", moved, 2 * rows * inner * cols)

    if name == "gelu_mlp":
        x, w1, w2, dtype, save_hidden, fused = args[0], args[1], args[3], args[5], args[6], args[8]
        s, width, hid, out = dtype.itemsize, x.shape[-1], w1.shape[0], w2.shape[0]
        M = x.numel() // width
        rows = [] if x.dtype == dtype else [(f"audiomae::{name} (cast)", "casts and copies",
                                             M * width * (x.element_size() + s), 0)]
        if fused and not save_hidden:  # GELU in fc1's epilogue: fc1's output never stored
            return rows + [matmul("fc1 with gelu", M, width, hid, s), matmul("fc2", M, hid, out, s)]
        return rows + [matmul("fc1", M, width, hid, s),
                       (f"audiomae::{name} (gelu)", "other elementwise", 2 * M * hid * s, 0),
                       matmul("fc2", M, hid, out, s)]
    grad, xc, w1, w2, hidden, needs, fused = args[0], args[1], args[2], args[4], args[5], args[8], args[9]
    s, width, hid, out = xc.dtype.itemsize, xc.shape[-1], w1.shape[0], w2.shape[0]
    M = xc.numel() // width
    if fused:  # one kernel: fc1 again (or the kept output read), fc2's input gradient, GELU's backward
        recompute = not hidden.numel()
        fc1_in = (M * width + hid * width) * s if recompute else M * hid * s
        moved = fc1_in + (M * out + out * hid) * s + 2 * M * hid * s  # inputs, then GELU's output and gradient
        flops = 2 * M * out * hid + (2 * M * width * hid if recompute else 0)
        rows = [(f"audiomae::{name} (fused gelu backward)", "matmul", moved, flops)]
    else:
        rows = [] if hidden.numel() else [matmul("fc1 again", M, width, hid, s)]
        rows += [matmul("grad of fc2's input", M, out, hid, s),
                 (f"audiomae::{name} (gelu_and_grad)", "this project's kernels", 4 * M * hid * s, 0)]
    if needs[3]:
        rows.append(matmul("fc2 weight grad", out, M, hid, s, out_size=4))
    if needs[4]:
        rows.append((f"audiomae::{name} (fc2 bias grad)", "reductions and norms", M * out * s, 0))
    if needs[0]:
        rows.append(matmul("grad of fc1's input", M, hid, width, s))
    if needs[1]:
        rows.append(matmul("fc1 weight grad", hid, M, width, s, out_size=4))
    return rows


class Ledger(TorchDispatchMode):
    """Records (op, kind, bytes, flops) for every non-view op dispatched under it."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self.in_optimizer = False  # every op of the optimizer's step counts as "optimizer"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name, namespace = packet.__name__, func.namespace
        if func.is_view or name in FREE or namespace == "prim":
            return out
        if namespace == "audiomae" and name in ("gelu_mlp", "gelu_mlp_backward"):
            self.rows += _gelu_mlp_rows(name, args)
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if name.endswith("_") and not outputs:  # an in-place op returning nothing new
            outputs = inputs[:1]
        moved = sum(_unique_bytes(t) for t in inputs) + sum(_unique_bytes(t) for t in outputs)
        flops = 0
        if name in MATMULS:
            flops = _matmul_flops(name, args, out if isinstance(out, torch.Tensor) else None)
        elif name.startswith(ATTENTION_PREFIXES):
            flops = _attention_flops(args) * (2.5 if "backward" in name else 1)
        kind = "optimizer" if self.in_optimizer else kind_of(name, namespace)
        self.rows.append((f"{namespace}::{name}", kind, moved, int(flops)))
        return out


# Which forward arguments of each Python Function node were tensors (the engine keeps that mask
# in C++; ``recording_tensor_arguments`` notes it as the forward runs).
TENSOR_ARGUMENTS: dict = {}


@contextlib.contextmanager
def recording_tensor_arguments():
    original = torch.autograd.Function.apply.__func__

    def apply(cls, *args, **kwargs):
        out = original(cls, *args, **kwargs)
        node = next((t.grad_fn for t in _tensors(out) if t.grad_fn is not None), None)
        if node is not None:
            TENSOR_ARGUMENTS[node] = [isinstance(a, torch.Tensor) for a in args]
        return out

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = classmethod(original)


def run_backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` node by node on the calling thread. The autograd engine runs CUDA nodes
    on a device thread that needs a CUDA context, which fake CUDA tensors do not have; calling the
    nodes in topological order dispatches the same ops (each node's backward, and the adds of
    gradients that meet at a node), and leaves each leaf's gradient in ``.grad``."""
    order, pending, stack = [], collections.Counter(), [loss.grad_fn]
    seen = {loss.grad_fn}
    while stack:  # count each node's consumers, so that a node runs once all its gradients are in
        node = stack.pop()
        order.append(node)
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] += 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    grads = {loss.grad_fn: [torch.ones_like(loss)]}
    ready = [loss.grad_fn]
    with torch.no_grad():  # as the engine runs a backward without create_graph
        _drain(ready, grads, pending)


def _drain(ready, grads, pending) -> None:
    while ready:
        node = ready.pop()
        incoming = grads.pop(node)
        if hasattr(node, "variable"):  # AccumulateGrad: the leaf's gradient
            variable = node.variable
            variable.grad = incoming[0] if variable.grad is None else variable.grad + incoming[0]
            continue
        if callable(node):  # a C++ node: one gradient per edge
            outputs = node(*incoming)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        else:  # a Python Function's node: one gradient per forward argument, edges for the tensors only
            outputs = node.apply(*incoming)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            outputs = [g for g, is_tensor in zip(outputs, TENSOR_ARGUMENTS[node]) if is_tensor]
        for (child, slot), grad in zip(node.next_functions, outputs):
            if child is None:
                continue
            if grad is not None:
                # The engine's validate_outputs: a broadcast input's gradient is summed to its
                # shape (addmm's bias), and one of another dtype cast to the input's.
                meta = child._input_metadata[slot]
                if tuple(grad.shape) != tuple(meta.shape):
                    grad = grad.sum_to_size(meta.shape)
                if grad.dtype != meta.dtype:
                    grad = grad.to(meta.dtype)
                buffer = grads.setdefault(child, [None] * len(child._input_metadata))
                buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad
            pending[child] -= 1
            if pending[child] == 0:
                if child not in grads:
                    continue  # nothing reached it (every gradient into it was None)
                ready.append(child)


def record_step(backend: str = "triton", batch: int = 64, img_size=(1024, 128), fused_matmul: bool = False) -> list[tuple]:
    """Every op of one pretraining step (forward, backward, AdamW) on fake CUDA tensors
    (``fused_matmul``: every MLP with GELU in its matmuls, ``kernels.gelu_matmul``)."""
    from unittest import mock

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    import audiomae
    from benches.bench_memory_estimate import _cuda_autocast_on_fake_tensors, _h100_sdpa

    ledger = Ledger()
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(F, "scaled_dot_product_attention", _h100_sdpa):
        with torch.device("cuda"):
            model = audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True, backend=backend,
                                                  img_size=img_size)
            for module in model.modules():
                if hasattr(module, "fused_matmul"):
                    module.fused_matmul = fused_matmul
            imgs = torch.randn(batch, 1, *img_size)
        fused = {"fused": True} if backend == "triton" else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **fused)
        with ledger:
            with _cuda_autocast_on_fake_tensors(), recording_tensor_arguments():
                loss = model(imgs, mask_ratio=0.8)[0]
            run_backward(loss)
            ledger.in_optimizer = True
            optimizer.step()
    return ledger.rows


def _row_rates(row: dict) -> dict:
    """The rates a results row was measured against: the copy bandwidth its floors divide by, and
    the matmul rate (stored, or the quotient of its FLOPs and their floor)."""
    rates = {}
    copy = row.get("copy_gbps") or row.get("copy_bandwidth_gbps")
    if copy:
        rates["bandwidth_gbps"] = copy
    if row.get("matmul_tflops"):
        rates["matmul_tflops"] = row["matmul_tflops"]
    elif row.get("flops") and row.get("flop_floor_ms"):
        rates["matmul_tflops"] = row["flops"] / (row["flop_floor_ms"] * 1e9)
    return rates


def _runs_on(device: str, results: Path) -> list[tuple[dict, str, list[dict]]]:
    """(device info, file name, rows) of every results file measured on a GPU whose name holds
    ``device``, newest first."""
    from benches.render_results import is_gpu, rows_and_device

    runs = []
    for path in results.glob("*.json"):
        rows, info = rows_and_device(json.loads(path.read_text()))
        if device.lower() in str(info.get("device", "")).lower() and is_gpu(info):
            runs.append((info, path.name, rows))
    return sorted(runs, key=lambda run: (str(run[0].get("date", "")), run[1]), reverse=True)


@functools.lru_cache(maxsize=None)
def measured_rates(device: str = RATES_DEVICE, results: Path = RESULTS) -> dict:
    """``{"bandwidth_gbps", "matmul_tflops"}`` and, for each, ``<rate>_source``: the figure of
    the newest committed run on ``device`` that records it, and which file; else
    ``ASSUMED_RATES``' figure, called an assumption."""
    rates = {}
    for info, name, rows in _runs_on(device, results):
        for row in rows:
            for key, value in _row_rates(row).items():
                if key not in rates:
                    rates[key] = value
                    rates[f"{key}_source"] = f"measured on the {info['device']}, {name}"
    for key, value in ASSUMED_RATES.items():
        if key not in rates:
            rates[key] = value
            rates[f"{key}_source"] = f"an assumption: no committed {device} run under benches/results measured it"
    return rates


def rates_with(bandwidth_gbps: float | None = None, matmul_tflops: float | None = None) -> dict:
    """``measured_rates()`` with the figures given (on the command line) in their place."""
    rates = dict(measured_rates())
    for key, value in (("bandwidth_gbps", bandwidth_gbps), ("matmul_tflops", matmul_tflops)):
        if value is not None:
            rates[key], rates[f"{key}_source"] = value, "given on the command line"
    return rates


def rates_note(rates: dict) -> str:
    """The rates and where each comes from, for the output."""
    return ", ".join(f"{rates[key]:.0f} {unit} ({rates[key + '_source']})" for key, unit in RATE_NAMES.items())


def summarize(rows, bandwidth_gbps: float | None = None, matmul_tflops: float | None = None, top: int = 12) -> dict:
    """Floors by kind, and the ops (by name) that cost the most at their floor, at the given rates
    (by default the measured ones: ``measured_rates``)."""
    rates = rates_with(bandwidth_gbps, matmul_tflops)
    bandwidth_gbps, matmul_tflops = rates["bandwidth_gbps"], rates["matmul_tflops"]
    by_kind = collections.defaultdict(lambda: [0, 0, 0.0, 0])  # bytes, flops, floor ms, calls
    by_op = collections.defaultdict(lambda: [0, 0.0, 0, ""])  # bytes, floor ms, calls, kind
    for name, kind, moved, flops in rows:
        floor_ms = max(moved / (bandwidth_gbps * 1e9), flops / (matmul_tflops * 1e12)) * 1e3
        k = by_kind[kind]
        k[0] += moved
        k[1] += flops
        k[2] += floor_ms
        k[3] += 1
        o = by_op[name]
        o[0] += moved
        o[1] += floor_ms
        o[2] += 1
        o[3] = kind
    total = sum(k[2] for k in by_kind.values())
    kinds = sorted(({"kind": kind, "bytes": b, "flops": f, "floor_ms": ms, "calls": n}
                    for kind, (b, f, ms, n) in by_kind.items()), key=lambda r: -r["floor_ms"])
    ops = sorted(({"op": name, "kind": kind, "bytes": b, "floor_ms": ms, "calls": n}
                  for name, (b, ms, n, kind) in by_op.items()), key=lambda r: -r["floor_ms"])[:top]
    return {"total_floor_ms": total, "ops_recorded": len(rows), "by_kind": kinds, "top_ops": ops,
            "bandwidth_gbps": bandwidth_gbps, "matmul_tflops": matmul_tflops, "rates": rates_note(rates)}


def render(summary: dict, title: str) -> str:
    lines = [f"{title}: {summary['ops_recorded']} ops, {summary['total_floor_ms']:.1f} ms at their floors "
             f"({summary['bandwidth_gbps']:.0f} GB/s, {summary['matmul_tflops']:.0f} TFLOP/s)",
             f"  rates: {summary['rates']}"]
    for r in summary["by_kind"]:
        lines.append(f"  {r['kind']:26s} {r['floor_ms']:8.2f} ms  {r['bytes'] / 1e9:8.2f} GB  "
                     f"{r['flops'] / 1e12:7.2f} TFLOP  {r['calls']:5d} calls")
    lines.append("  costliest ops:")
    for r in summary["top_ops"]:
        lines.append(f"    {r['op']:44s} {r['floor_ms']:8.2f} ms  {r['bytes'] / 1e9:8.2f} GB  {r['calls']:5d} calls"
                     f"  ({r['kind']})")
    return "\n".join(lines)


SUITE = "step_ledger"
VARIANTS = ("reference", "triton", "triton fused_matmul")


def run(device="cuda", quick: bool = False) -> list[dict]:
    """One row per backend: the step's floor, by kind and by costliest op (figures, not timings)."""
    del device, quick  # fake CUDA tensors on any machine: the ledger is the same everywhere
    from benches.harness import device_info

    info = {k: v for k, v in device_info("cpu").items() if k != "device"}
    rows = []
    for variant in VARIANTS:
        backend, _, fused = variant.partition(" ")
        summary = summarize(record_step(backend, fused_matmul=bool(fused)), top=24)
        by_kind = ", ".join(f"{r['kind']} {r['floor_ms']:.2f} ms" + (f" ({r['flops'] / 1e12:.2f} TFLOP)" if r["flops"] else "")
                            for r in summary["by_kind"])
        top_ops = ", ".join(f"{r['op']} {r['floor_ms']:.2f} ms" for r in summary["top_ops"])
        rows.append({
            "suite": SUITE, "name": "pretrain step ledger", "impl": variant,
            "shape": "B=64 mae_vit_base_patch16 decoder_mode=1 mask 0.8", "dtype": "bf16-autocast",
            "floor_ms": summary["total_floor_ms"], "ops_recorded": summary["ops_recorded"],
            "bandwidth_gbps": summary["bandwidth_gbps"], "matmul_tflops": summary["matmul_tflops"],
            "rates": summary["rates"], "by_kind": by_kind, "top_ops": top_ops,
            "note": f"{summary['total_floor_ms']:.1f} ms if every op ran at its floor (counted on fake tensors, "
                    f"not measured; rates: {summary['rates']}): {by_kind}",
            **info,
        })
    return rows


def write_results(path) -> None:
    """``run()``'s rows as a results file (``benches/results/step-ledger-<date>.json``)."""
    from benches.harness import device_info
    from benches.source_digest import source_info

    device = {**device_info("cpu"), "device": "fake CUDA tensors on the CPU (cpu): counted, not measured"}
    note = ("Bytes and matmul FLOPs of every op of one bf16-autocast pretraining step of mae_vit_base_patch16 "
            "(batch 64, decoder mode 1, mask 0.8; forward, backward, AdamW), each op at its floor "
            f"({rates_note(measured_rates())}): benches/step_ledger.py")
    with open(path, "w") as f:
        json.dump({"device": device, "source": source_info(), "note": note, "rows": run()}, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=["reference", "sdpa", "triton"])
    parser.add_argument("--fused-matmul", action="store_true", help="every MLP with GELU in its matmuls")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    measured = f"default: measured on the {RATES_DEVICE} (measured_rates), else an assumption"
    parser.add_argument("--bandwidth-gbps", type=float, help=measured)
    parser.add_argument("--matmul-tflops", type=float, help=measured)
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--results", help="write every variant's row as a results file here (and print nothing else)")
    args = parser.parse_args(argv)
    if args.results:
        write_results(args.results)
        return 0
    rows = record_step(args.backend, args.batch, fused_matmul=args.fused_matmul)
    summary = summarize(rows, args.bandwidth_gbps, args.matmul_tflops, args.top)
    print(render(summary, f"pretrain step, {args.backend}, batch {args.batch}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "batch": args.batch, **summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
