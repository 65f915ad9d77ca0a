"""Masked-token gather, 2-D gather and decoder unshuffle: the official torch path against the kernels.

Shapes (CUDA): the issue's targets, bf16, B=64, L=512, 80 % masked (K=102), C=768 for the gathers
and 512 for the unshuffle; the 2-D gather keeps 51 of 64 time rows and 6 of 8 frequency columns.
On the CPU (smoke test) small fp32 shapes, and the figures say nothing about GPU speed.

Implementations: ``official`` is the eager code the models replace (``kernels.reference``:
add the positional embedding to every token, repeat the index over the channels, gather; for
the decoder also repeat the mask token and concatenate). ``kernel`` is the public op as called,
index range check included (one reduction and one host sync per call); ``kernel_unchecked`` is
the same with ``check_indices=False``, as the models call it on indices they built: in eager mode
it reaches the launchers through a plain ``torch.autograd.Function``. ``kernel_custom_op`` (CUDA,
gather and unshuffle) calls the ``torch.library`` op that ``torch.compile`` traces, eagerly, to
show what its dispatcher costs. On CUDA, ``official_graph`` and ``kernel_graph`` replay the same
work captured in a CUDA graph (the index check is skipped under capture): at these sizes a kernel
moves its bytes in a few microseconds, close to what eager PyTorch spends launching it, so the
graphed rows are the ones that measure the kernels against the copy bandwidth, and the eager rows
what a caller sees. ``kernel_scan_bwd_graph`` and ``kernel_fill_scatter_bwd_graph`` (CUDA,
gather fwd+bwd) replay the gather with its backward forced to a strategy the default replaced at
this shape (``kernels.gather_tokens.scatters_owned_rows``): the scan of every table row, and a
zero fill by torch before the scatter; ``kernel_scatter_<R>x<Z>x<C>x<warps>_graph`` the default
strategy at each candidate tiling (``SCATTER_TILING_CANDIDATES``); all side by side in one run.
``kernel_scatter_bwd_graph`` (CUDA, unshuffle fwd+bwd) replays the unshuffle with x's gradient
by that scatter instead of its default scan. ``kernel_fwd_<R>x<C>x<warps>_graph`` (CUDA, gather
fwd) replays the gather's forward at each candidate tile (``GATHER_TILING_CANDIDATES``).
``official_graph_back_to_back`` and ``kernel_graph_back_to_back`` capture every input set's call
in one graph and report the time per call (``BackToBack``): the op as it runs inside a training
step's graph, without the gap between two graph launches.

Fresh inputs: each case builds several independent input sets (``INPUT_SETS_BYTES`` of them
in all on CUDA, well past an H100's 50 MB L2; two on the CPU) and every call, eager or replayed,
takes the next set in turn (a graph per set), so no repetition finds the previous one's inputs in
the L2: the ops' forward working sets (21 to 41 MB at these shapes) would otherwise fit there
and read faster than memory.

Fewest bytes (the ``floor_ms`` figure divides them by the copy bandwidth measured in the same
run, which counts bytes read plus bytes written): each tensor element the op must read or write,
once. The positional-embedding rows a gather reads count once per distinct row (the batch
re-reads them from L2). ``pos_embed`` is a fixed buffer as in both AudioMAE models, so the
backward passes compute the gradients of ``x`` and ``mask_token`` only: the gather backward
reads ``grad_out`` and the index and writes the whole of ``grad_x`` (zeros included); the
unshuffle backward reads every row of ``grad_out`` once (kept rows for ``x``, masked rows for
the mask token) and the index, and writes ``grad_x`` and one [C] row.
"""
from __future__ import annotations

import pytest
import torch

from benches.harness import (INPUT_SETS_BYTES, MAX_INPUT_SETS, Rotation, copy_bandwidth_gbps, device_info,  # noqa: F401
                             graphed, memory_floor_ms, num_input_sets, time_fn)
from kernels.gather_tokens import (GATHER_TILING_CANDIDATES, SCATTER_TILING_CANDIDATES, _gather_forward, _scatter_owned_rows, gather_rows_backward,
                                   gather_tokens, gather_tokens_2d)
from kernels.reference import gather_tokens as gather_reference
from kernels.reference import unshuffle_tokens as unshuffle_reference
from kernels.unshuffle_tokens import _input_grads, _mask_pos_backward, _setup_context, _unshuffle_forward, unshuffle_tokens

SUITE = "tokens"
_num_sets = num_input_sets  # input sets per case: enough to stream past the L2 on CUDA


def _shapes(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"B": 64, "L": 512, "mask_ratio": 0.8, "C_gather": 768, "C_unshuffle": 512, "grid": (64, 8), "keep_2d": (51, 6), "dtype": torch.bfloat16}
    return {"B": 2, "L": 48, "mask_ratio": 0.8, "C_gather": 40, "C_unshuffle": 24, "grid": (8, 6), "keep_2d": (6, 4), "dtype": torch.float32}


def _random_ids(B: int, n: int, keep: int, device: str) -> torch.Tensor:
    return torch.rand(B, n, device=device).argsort(dim=1)[:, :keep]


class BackToBack:
    """Every input set's call captured one after the other in a single CUDA graph.

    A replay of one call's graph pays the GPU's gap between graph launches (a few microseconds,
    about a third of a kernel that moves 20 MB); inside a training step's graph the op runs between
    other kernels without it. Timing ``len(fns)`` calls back to back and dividing by their number
    (``calls_per_replay``, as ``triton.testing.do_bench_cudagraph`` does) measures the op as it runs
    there. Each call still reads its own input set."""

    def __init__(self, fns):
        self.fns = list(fns)
        self.calls_per_replay = len(self.fns)
        self.replay = graphed(lambda: [fn() for fn in self.fns])

    def __call__(self):
        self.replay()


def _cases(device: str, quick: bool):
    """(op, shape, fwd bytes, bwd bytes, {impl: [(forward fn, inputs needing grad) per input set]})."""
    for op, shape, fwd, bwd, make in _case_makers(device, quick):
        yield op, shape, fwd, bwd, _per_set(make, _num_sets(device, fwd))


def _per_set(make, sets: int) -> dict:
    """{impl: [(forward, inputs) for each of ``sets`` input sets made by ``make()``]}."""
    made = [make() for _ in range(sets)]
    return {impl: [impls[impl] for impls in made] for impl in made[0]}


def _case_makers(device: str, quick: bool):
    """(op, shape, fwd bytes, bwd bytes, make) where ``make()`` builds one input set and returns
    {impl: (forward fn, inputs needing grad)} over it. Byte counts from a draw of indices like
    every set's."""
    s = _shapes(device, quick)
    B, L, dtype = s["B"], s["L"], s["dtype"]
    K = int(L * (1 - s["mask_ratio"]))
    size = torch.finfo(dtype).bits // 8
    idx = 8
    on_gpu = device.startswith("cuda")  # the op runs Triton on any tensor; CPU ones need the interpreter

    C = s["C_gather"]

    def gather_set():
        x = torch.randn(B, L, C, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, L, C, device=device, dtype=dtype)
        ids_keep = _random_ids(B, L, K, device)
        impls = {
            "official": (lambda: gather_reference.gather_tokens(x, ids_keep, pos), (x,)),
            "kernel": (lambda: gather_tokens(x, ids_keep, pos), (x,)),
            "kernel_unchecked": (lambda: gather_tokens(x, ids_keep, pos, check_indices=False), (x,)),
        }
        if on_gpu:
            impls["kernel_custom_op"] = (lambda: torch.ops.audiomae.gather_tokens(x, ids_keep, pos[0]), (x,))
            for impl, strategy in FORCED_BACKWARDS.items():
                impls[impl] = (lambda s=strategy: _ForcedBackwardGather.apply(x, ids_keep, pos[0], s), (x,))
            for impl, tiling in FORWARD_TILINGS.items():
                impls[impl] = (lambda t=tiling: _gather_forward(x, ids_keep, pos[0], t), (x,))
        return impls

    pos_rows = _random_ids(B, L, K, device).unique().numel()
    fwd = (B * K * C + pos_rows * C + B * K * C) * size + B * K * idx
    bwd = (B * K * C + B * L * C) * size + B * K * idx
    yield "gather", f"B={B} L={L} K={K} C={C}", fwd, bwd, gather_set

    (T, F), (Kt, Kf) = s["grid"], s["keep_2d"]
    K2 = Kt * Kf

    def gather_2d_set():
        x2 = torch.randn(B, T * F, C, device=device, dtype=dtype, requires_grad=True)
        pos2 = torch.randn(1, T * F, C, device=device, dtype=dtype)
        ids_t, ids_f = _random_ids(B, T, Kt, device), _random_ids(B, F, Kf, device)
        return {
            "official": (lambda: gather_reference.gather_tokens_2d(x2, ids_t, ids_f, (T, F), pos2), (x2,)),
            "kernel": (lambda: gather_tokens_2d(x2, ids_t, ids_f, (T, F), pos2), (x2,)),
            "kernel_unchecked": (lambda: gather_tokens_2d(x2, ids_t, ids_f, (T, F), pos2, check_indices=False), (x2,)),
        }

    ids_t, ids_f = _random_ids(B, T, Kt, device), _random_ids(B, F, Kf, device)
    pos_rows = (ids_t[:, :, None] * F + ids_f[:, None, :]).unique().numel()
    fwd = (B * K2 * C + pos_rows * C + B * K2 * C) * size + B * (Kt + Kf) * idx
    bwd = (B * K2 * C + B * T * F * C) * size + B * (Kt + Kf) * idx
    yield "gather_2d", f"B={B} T={T} F={F} Kt={Kt} Kf={Kf} C={C}", fwd, bwd, gather_2d_set

    C_u = s["C_unshuffle"]

    def unshuffle_set():
        kept = torch.randn(B, K, C_u, device=device, dtype=dtype, requires_grad=True)
        mask_token = torch.randn(1, 1, C_u, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, L, C_u, device=device, dtype=dtype)
        ids_restore = torch.rand(B, L, device=device).argsort(dim=1).argsort(dim=1)
        impls = {
            "official": (lambda: unshuffle_reference.unshuffle_tokens(kept, ids_restore, mask_token, pos),
                         (kept, mask_token)),
            "kernel": (lambda: unshuffle_tokens(kept, ids_restore, mask_token, pos), (kept, mask_token)),
            "kernel_unchecked": (lambda: unshuffle_tokens(kept, ids_restore, mask_token, pos, check_indices=False),
                                 (kept, mask_token)),
        }
        if on_gpu:
            impls["kernel_custom_op"] = (
                lambda: torch.ops.audiomae.unshuffle_tokens(kept, ids_restore, mask_token.reshape(C_u), pos[0]),
                (kept, mask_token))
            impls[UNSHUFFLE_SCATTER] = (
                lambda: _ScatterBackwardUnshuffle.apply(kept, ids_restore, mask_token.reshape(C_u), pos[0]),
                (kept, mask_token))
        return impls

    fwd = (B * K * C_u + C_u + L * C_u + B * L * C_u) * size + B * L * idx
    bwd = (B * L * C_u + B * K * C_u + C_u) * size + B * L * idx
    yield "unshuffle", f"B={B} L={L} K={K} C={C_u}", fwd, bwd, unshuffle_set


# The gather's fwd+bwd rows with the backward forced to the strategies the default replaced at
# this shape, and to each candidate tiling of the default's scatter, timed (replayed) beside it in
# the same run: impl name -> strategy.
FORCED_BACKWARDS = {"kernel_scan_bwd": "scan", "kernel_fill_scatter_bwd": "fill_scatter",
                    **{"kernel_scatter_" + "x".join(map(str, t)): t for t in SCATTER_TILING_CANDIDATES}}


class _ForcedBackwardGather(torch.autograd.Function):
    """The gather with its backward forced to ``strategy``: ``"scan"`` writes every table row from
    a scan of its index row (``scatter=False``); ``"fill_scatter"`` zero-fills the table with torch
    and then scatters the kept rows (the default until the zeros moved into the scatter's launch);
    a tuple is a tiling of the default's scatter (``kernels.gather_tokens.SCATTER_TILING``)."""

    @staticmethod
    def forward(ctx, x, ids_keep, pos, strategy):
        ctx.save_for_backward(ids_keep)
        ctx.num_rows, ctx.x_dtype, ctx.strategy = x.shape[1], x.dtype, strategy
        return _gather_forward(x, ids_keep, pos)

    @staticmethod
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        if ctx.strategy == "scan":
            grad_x, _ = gather_rows_backward(grad, ids_keep, ctx.num_rows, ctx.x_dtype, None, scatter=False)
        elif ctx.strategy == "fill_scatter":
            grad_x = _scatter_owned_rows(grad, ids_keep, ctx.num_rows, ctx.x_dtype, fill_first=True)
        else:
            grad_x = _scatter_owned_rows(grad, ids_keep, ctx.num_rows, ctx.x_dtype, tiling=ctx.strategy)
        return grad_x, None, None, None


# The unshuffle's fwd+bwd with x's gradient by the scatter (with zeros) instead of the default's
# scan: the gather's winning strategy at the other shape (102 table rows, a 512-long list), timed
# (replayed) beside the default.
UNSHUFFLE_SCATTER = "kernel_scatter_bwd"


def _unshuffle_backward_scattering(grad, ids_restore, num_kept, x_dtype, mask_dtype, pos_dtype):
    """``kernels.unshuffle_tokens._unshuffle_backward`` with x's gradient from the scatter."""
    grad_x = _scatter_owned_rows(grad, ids_restore, num_kept, x_dtype) if x_dtype is not None else None
    return (grad_x, *_mask_pos_backward(grad, ids_restore, num_kept, mask_dtype, pos_dtype))


class _ScatterBackwardUnshuffle(torch.autograd.Function):
    """The unshuffle (mask token [C], positions [L, C]) with ``_unshuffle_backward_scattering``."""

    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, pos_embed):
        _setup_context(ctx, (x, ids_restore, mask_token, pos_embed), None)
        return _unshuffle_forward(x, ids_restore, mask_token, pos_embed)

    @staticmethod
    def backward(ctx, grad):
        return _input_grads(ctx, grad, _unshuffle_backward_scattering)


def _forward_backward(forward, inputs):
    """forward + backward with a gradient drawn once, outside the timed step: making it inside would
    add a write of the output's size to every call the byte count does not include."""
    with torch.no_grad():
        grad = torch.randn_like(forward())

    def step():
        torch.autograd.grad(forward(), inputs, grad)

    return step


REPLAYED_BACKWARDS = {*FORCED_BACKWARDS, UNSHUFFLE_SCATTER}  # fwd+bwd rows, graph-replayed only
# The gather's forward at each candidate tile (``GATHER_TILING_CANDIDATES``): fwd rows, replayed only.
FORWARD_TILINGS = {"kernel_fwd_" + "x".join(map(str, t)): t for t in GATHER_TILING_CANDIDATES}


def _timed_impls(impls: dict, pass_name: str, device: str):
    """(impl, make): ``make()`` gives the callable, each call of which takes the next input set;
    graph rows replay one graph per set, or all sets' calls in one (built, and captured, by make)."""
    for impl, per_set in impls.items():
        if impl in REPLAYED_BACKWARDS and pass_name == "fwd":
            continue  # the same forward as kernel's
        if impl in FORWARD_TILINGS and pass_name != "fwd":
            continue  # a forward candidate: the backward's candidates are the scatter tilings
        fns = [forward if pass_name == "fwd" else _forward_backward(forward, inputs) for forward, inputs in per_set]
        if impl in REPLAYED_BACKWARDS or impl in FORWARD_TILINGS:  # replayed only: eagerly the host's launch time hides the kernels
            yield impl + "_graph", lambda fns=fns: Rotation([graphed(fn) for fn in fns])
            continue
        yield impl, lambda fns=fns: Rotation(fns)
        if device.startswith("cuda") and impl in ("official", "kernel_unchecked"):
            yield impl.replace("_unchecked", "") + "_graph", lambda fns=fns: Rotation([graphed(fn) for fn in fns])
            yield impl.replace("_unchecked", "") + "_graph_back_to_back", lambda fns=fns: BackToBack(fns)


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    device = str(torch.device(device))
    warmup, reps = (2, 5) if quick else (10, 100)
    bandwidth = copy_bandwidth_gbps(device)
    info = device_info(device)
    rows = []
    for op, shape, fwd_bytes, bwd_bytes, impls in _cases(device, quick):
        for pass_name, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", fwd_bytes + bwd_bytes)):
            floor = memory_floor_ms(nbytes, device)
            official_ms = {}  # eager kernels against eager official, graphed against graphed
            with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                for impl, make in _timed_impls(impls, pass_name, device):
                    mode = next((m for m in ("graph_back_to_back", "graph") if impl.endswith(m)), "eager")
                    try:
                        fn = make()
                        # a replay allocates nothing: graph rows carry no peak, as in every other suite
                        t = time_fn(fn, device, warmup=warmup, reps=reps, measure_memory=mode == "eager")
                    except Exception as error:  # noqa: BLE001 - a graph row that fails is a row that says why
                        if mode == "eager":
                            raise  # the op itself failed: nothing in this suite means anything
                        rows.append({"suite": SUITE, "name": f"{op} {pass_name}", "impl": impl, "shape": shape,
                                     "status": "ERROR", "note": f"{type(error).__name__}: {error}".splitlines()[0][:300]})
                        continue
                    median_ms, min_ms = t.median_ms / fn.calls_per_replay, t.min_ms / fn.calls_per_replay
                    if impl.startswith("official"):
                        official_ms[mode] = median_ms
                    rows.append({
                        "suite": SUITE, "name": f"{op} {pass_name}", "impl": impl, "shape": shape,
                        "dtype": str(_shapes(device, quick)["dtype"]).removeprefix("torch."),
                        "median_ms": median_ms, "min_ms": min_ms, "peak_mem_bytes": t.peak_mem_bytes,
                        "bytes": nbytes, "floor_ms": floor, "fraction_of_copy_bandwidth": floor / median_ms,
                        "achieved_gbps": nbytes / (median_ms * 1e-3) / 1e9, "copy_gbps": bandwidth,
                        # None where the official twin's graph failed (its ERROR row says why)
                        "speedup_vs_official": official_ms[mode] / median_ms if mode in official_ms else None,
                        "input_sets": len(fn.fns), "calls_per_replay": fn.calls_per_replay, **info,
                    })
    return rows


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: the same cases, timed by the fixture on CUDA
# ------------------------------------------------------------------------------------------------
def _case_ids():
    impls = {"gather": ("official", "kernel", "kernel_unchecked", "kernel_custom_op"),
             "gather_2d": ("official", "kernel", "kernel_unchecked"),
             "unshuffle": ("official", "kernel", "kernel_unchecked", "kernel_custom_op")}
    return [(op, impl, p) for op, names in impls.items() for impl in names for p in ("fwd", "fwd+bwd")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op,impl,pass_name", _case_ids())
def test_tokens(benchmark, op, impl, pass_name):
    cases = {name: impls for name, _, _, _, impls in _cases("cuda", quick=False)}
    fn = Rotation(forward if pass_name == "fwd" else _forward_backward(forward, inputs)
                  for forward, inputs in cases[op][impl])

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{op} {pass_name}"
    benchmark(synced)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for row in run(dev, quick="--quick" in sys.argv):
        if row.get("status") == "ERROR":
            print(f"{row['name']:18s} {row['impl']:17s} ERROR {row['note']}")
            continue
        speedup = row["speedup_vs_official"]
        print(f"{row['name']:18s} {row['impl']:17s} {row['median_ms']:8.4f} ms  "
              f"{row['fraction_of_copy_bandwidth']:6.1%} of copy bw  "
              + (f"x{speedup:.1f} vs official" if speedup is not None else "(no official twin)"))
