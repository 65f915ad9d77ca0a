"""Benchmark: the host's time per launch, which bounds every eager (not graph-replayed) row.

At the issues' shapes the token kernels move their bytes in about 8 us, yet an eager call of the
gather forward took 84 us on the H200 (2026-11-27): the host's time, not the GPU's. This suite
splits that time, each row timed as a host loop of back-to-back calls on tiny tensors (the GPU
never the bottleneck) and reported per call:
- ``torch_add``: one small PyTorch op (``x + 1``), the dispatcher and allocator's cost;
- ``triton_one_arg``: a Triton kernel with one pointer argument (``JITFunction.run``: argument
  specialization, cache lookup, driver launch);
- ``triton_many_args``: the same kernel shape with the gather kernel's 19 arguments (the binder's
  cost grows with the arguments it specializes);
- ``gather_launcher``: ``kernels.gather_tokens._gather_forward`` (checks, output, one launch);
- ``gather_tokens``: the public op with ``check_indices=False``, as the models call it (adds the
  autograd.Function);
- ``official_gather``: the official path's ``torch.gather(x + pos, 1, index.repeat(...))``;
- the backward, whose eager cost was the larger mystery (gather fwd+bwd 420 to 500 us eager
  against 35 us replayed, H200 2026-11-27, with one kernel in the backward):
  ``autograd_identity_fwd_bwd`` (``torch.autograd.grad`` through a Python autograd.Function that
  does nothing: the engine's and its device thread's cost), ``gather_backward_launcher`` (the
  backward's launcher called directly), ``gather_backward_launcher_thread`` (the same, timed in a
  second Python thread, as the engine runs a CUDA backward off the main thread),
  ``gather_tokens_fwd_bwd`` and ``official_gather_fwd_bwd`` (the whole step each way). The
  difference between the whole step and its parts is what no row explains: on the H200
  (2026-11-28) 389 us against 66 + 100 + 43, about 180 us. Rows that bisect it:
  ``new_tensor_fwd_bwd`` (a Function allocating its output and its input's gradient),
  ``first_order_fwd_bwd`` (the same with the kernels' ``first_order_only`` backward),
  ``triton_backward_fwd_bwd`` (the same launching a Triton kernel in its backward, on the
  engine's device thread), ``gather_forward_then_backward_launcher`` (the gather's two
  launchers in turn, no engine) and ``gather_tokens_fwd_bwd_inside_backward`` (not the whole
  call: the time inside the gather's Python backward, as the engine runs it).

No floor: these are host costs. On the CPU (smoke test) the Triton rows run through the
interpreter, whose figures say nothing about a GPU's launch path.
"""
from __future__ import annotations

import threading
import time

import torch
import triton
import triton.language as tl

from benches.harness import device_info
from kernels._dispatch import first_order_only

SUITE = "launch_overhead"


@triton.jit
def _touch_kernel(ptr):
    tl.store(ptr + tl.program_id(0), 1.0)


@triton.jit
def _touch_many_kernel(ptr, a_ptr, b_ptr, c_ptr, n0, n1, n2, n3, s0, s1, s2, s3, s4, s5, s6, s7,
                       FLAG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    tl.store(ptr + tl.program_id(0), 1.0)


class _Identity(torch.autograd.Function):
    """Nothing forward or backward: ``torch.autograd.grad`` through it costs the engine alone."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _NewTensor(torch.autograd.Function):
    """A new tensor forward and backward (``empty_like``): the engine with allocations."""

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad)


class _NewTensorFirstOrder(_NewTensor):
    """``_NewTensor`` with the kernels' backward decorator (``first_order_only``)."""

    backward = staticmethod(first_order_only("launch_overhead")(_NewTensor.backward))


class _TritonBackward(_NewTensor):
    """``_NewTensor`` whose backward also launches a Triton kernel, from the engine's device thread
    on CUDA (the gather's backward launches its scatter there)."""

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        _touch_kernel[(1,)](out)
        return out


def _impls(device: torch.device) -> dict:
    from kernels.gather_tokens import _gather_forward, _GatherTokens, gather_rows_backward, gather_tokens

    B, L, K, C = 2, 16, 4, 32
    x = torch.randn(B, L, C, device=device, requires_grad=True)
    pos = torch.randn(1, L, C, device=device)
    ids = torch.rand(B, L, device=device).argsort(1)[:, :K]
    small = torch.zeros(16, device=device)
    grad = torch.randn(B, K, C, device=device)

    def backward_launcher():
        return gather_rows_backward(grad, ids, L, x.dtype, None)

    return {
        "torch_add": lambda: small + 1,
        "triton_one_arg": lambda: _touch_kernel[(1,)](small),
        "triton_many_args": lambda: _touch_many_kernel[(1,)](small, small, small, small, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                             10, 11, 12, FLAG=True, ACC=tl.float32, BLOCK=16),
        "gather_launcher": lambda: _gather_forward(x.detach(), ids, pos[0]),  # the table as the op passes it
        "gather_tokens": lambda: gather_tokens(x, ids, pos, check_indices=False),
        "official_gather": lambda: torch.gather(x + pos, 1, ids[..., None].repeat(1, 1, C)),
        "autograd_identity_fwd_bwd": lambda: torch.autograd.grad(_Identity.apply(x), (x,), x),
        "gather_backward_launcher": backward_launcher,
        "gather_backward_launcher_thread": _InThread(backward_launcher),
        # Bisecting what fwd+bwd adds to its parts: the engine with new tensors, with the
        # kernels' backward decorator, with a Triton launch in the backward; the gather's forward
        # and its backward launcher called in turn, without the engine.
        "new_tensor_fwd_bwd": lambda: torch.autograd.grad(_NewTensor.apply(x), (x,), x),
        "first_order_fwd_bwd": lambda: torch.autograd.grad(_NewTensorFirstOrder.apply(x), (x,), x),
        "triton_backward_fwd_bwd": lambda: torch.autograd.grad(_TritonBackward.apply(x), (x,), x),
        "gather_forward_then_backward_launcher": lambda: (_gather_forward(x.detach(), ids, pos[0]), backward_launcher()),
        "gather_tokens_fwd_bwd": lambda: torch.autograd.grad(gather_tokens(x, ids, pos, check_indices=False), (x,), grad),
        "gather_tokens_fwd_bwd_inside_backward": _InsideBackward(
            lambda: torch.autograd.grad(gather_tokens(x, ids, pos, check_indices=False), (x,), grad), _GatherTokens),
        "official_gather_fwd_bwd": lambda: torch.autograd.grad(
            torch.gather(x + pos, 1, ids[..., None].repeat(1, 1, C)), (x,), grad),
    }


class _InsideBackward:
    """A fwd+bwd row that reports the time spent inside ``function``'s Python backward per call
    (wall time from its entry to its return, on whichever thread the engine runs it), not the
    whole call: with the whole call beside it, what the engine adds around that backward."""

    def __init__(self, fn, function):
        self.fn, self.function = fn, function


class _InThread:
    """A row whose calls are timed in a second Python thread (``_host_us`` runs there whole)."""

    def __init__(self, fn):
        self.fn = fn


def _host_us(fn, device: torch.device, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the mean host time per call of ``calls`` back-to-back calls."""
    if isinstance(fn, _InsideBackward):
        function, original = fn.function, fn.function.__dict__["backward"]
        inside = []

        def timed(ctx, *grads):
            start = time.perf_counter()
            try:
                return original.__func__(ctx, *grads)
            finally:
                inside.append(time.perf_counter() - start)

        function.backward = staticmethod(timed)
        try:
            fn.whole_us = _host_us(fn.fn, device, calls, rounds)  # the same calls, whole
        finally:
            function.backward = original
        return sum(inside) / len(inside) * 1e6
    if isinstance(fn, _InThread):
        result = {}

        def timed():
            try:
                result["us"] = _host_us(fn.fn, device, calls, rounds)
            except Exception as e:  # re-raised in the caller's thread, where the row reports it
                result["error"] = e

        thread = threading.Thread(target=timed)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["us"]
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(per_call)[len(per_call) // 2]


def run(device="cuda", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    calls = 20 if quick or device.type != "cuda" else 1000
    info = device_info(device)
    rows = []
    for impl, fn in _impls(device).items():
        try:
            us = _host_us(fn, device, calls)
        except Exception as e:  # a row that cannot run says why; the others still measure
            rows.append({"suite": SUITE, "name": "host time per call", "impl": impl, "shape": "tiny",
                         "dtype": "float32", "median_ms": None, "unavailable": f"{type(e).__name__}: {e}", **info})
            continue
        rows.append({"suite": SUITE, "name": "host time per call", "impl": impl, "shape": "tiny", "dtype": "float32",
                     "median_ms": us / 1e3, "host_us_per_call": us, **info})
        if isinstance(fn, _InsideBackward):
            rows[-1]["whole_call_us"] = fn.whole_us
    base = next((r["median_ms"] for r in rows if r["impl"] == "torch_add" and r.get("median_ms")), None)
    for r in rows:
        if base and r.get("median_ms"):
            r["vs_torch_add"] = r["median_ms"] / base
    return rows


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, quick="--quick" in sys.argv):
        print(f"{r['impl']:32s} " + (f"{r['host_us_per_call']:8.1f} us per call" if r.get("median_ms") else r["unavailable"]))
