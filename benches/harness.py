"""Timing, memory and floor measurement shared by every benchmark.

GPU timings use CUDA events after warm-up and report the median of many runs; CPU timings use
``time.perf_counter`` and say nothing about GPU speed. Floors are measured on the same device in
the same process: a large device-to-device copy for bandwidth and a large bf16 matmul for
arithmetic rate, so every figure can be reported as a fraction of what the machine can do.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import statistics
import sys
import time
from dataclasses import dataclass, asdict
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    peak_mem_bytes: int | None  # peak allocated during one call, beyond what was live before it

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Seconds of timed calls a row may take: a slow implementation (FlexAttention's backward without
# a frozen bias runs 350 ms a call) takes fewer repetitions, at least MIN_REPS, rather than minutes.
TIME_BUDGET_S = 3.0
MIN_REPS = 5


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 5, reps: int = 30,
            measure_memory: bool = True, budget_s: float = TIME_BUDGET_S) -> Timing:
    """Median wall time of ``fn()`` on ``device``, and the extra memory one call peaks at (one more,
    untimed call on the GPU; ``measure_memory=False`` skips it). Calls that would take more than
    ``budget_s`` over ``reps`` (judged from the last warm-up call; the first may compile) are
    timed fewer times, ``MIN_REPS`` at least, and warm up less."""
    device = torch.device(device)
    call_s = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        call_s = time.perf_counter() - t0
        if i >= 1 and call_s * (warmup - i - 1 + reps) > 2 * budget_s:
            break  # warmed up (past the first call) and slow: the rest of the warm-up would dominate
    if call_s > 0:
        reps = min(reps, max(MIN_REPS, int(budget_s / call_s)))  # the budget cuts to MIN_REPS, never adds
    peak = None
    if device.type == "cuda":
        if measure_memory:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        _sync(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), reps, peak)


# Fresh inputs: a call whose working set fits the L2 (50 MB on an H100) would find the previous
# call's inputs there and read faster than memory. Such a case builds several input sets, at least
# this many bytes over all of them on CUDA, and every call takes the next (``Rotation``).
INPUT_SETS_BYTES = 256 * 2**20
MAX_INPUT_SETS = 16


def num_input_sets(device: str, touched_bytes: int) -> int:
    """Input sets for a case whose call touches ``touched_bytes``: enough to stream past the L2."""
    if not str(device).startswith("cuda"):
        return 2  # the rotation still runs; CPU timings mean nothing for the GPU anyway
    return max(2, min(MAX_INPUT_SETS, -(-INPUT_SETS_BYTES // max(touched_bytes, 1))))


class Rotation:
    """Calls ``fns`` in turn, one per call: each on its own input set."""

    calls_per_replay = 1

    def __init__(self, fns):
        self.fns, self.calls = list(fns), 0

    def __call__(self):
        fn = self.fns[self.calls % len(self.fns)]
        self.calls += 1
        return fn()


def time_against_official(common: dict, steps: dict[str, Callable[[], object] | list[Callable[[], object]]],
                          device: torch.device, quick: bool,
                          graphed_impls: tuple[str, ...] = ("official", "kernel")) -> list[dict]:
    """One row per impl of ``steps`` (the first is the baseline), and on CUDA one more per impl
    of ``graphed_impls`` replayed from a CUDA graph (``<impl>_graph``): median and min ms, the
    extra memory of an eager call, the fraction of copy bandwidth (``common["floor_ms"]`` over
    the median) and the speed-up over the first impl timed the same way (eager or replayed).
    A step given as a list holds one call per input set: calls take them in turn (a graph per
    set for the replayed rows), and the rows say how many (``input_sets``)."""
    timed = list(steps.items())
    if device.type == "cuda":
        timed += [(f"{impl}_graph", steps[impl]) for impl in graphed_impls]
    warmup, reps = (2, 5) if quick else (10, 50)
    rows, baseline_ms = [], {}
    for impl, step in timed:
        graph = impl.endswith("_graph")
        t = time_fn(_rotated(step, graph), device, warmup=warmup, reps=reps, measure_memory=not graph)
        baseline_ms.setdefault(graph, t.median_ms)
        sets = {"input_sets": len(step)} if isinstance(step, list) else {}
        rows.append({**common, "impl": impl, "median_ms": t.median_ms, "min_ms": t.min_ms,
                     "peak_mem_bytes": t.peak_mem_bytes, "fraction_of_copy_bandwidth": common["floor_ms"] / t.median_ms,
                     "speedup_vs_official": baseline_ms[graph] / t.median_ms, **sets})
    return rows


def _rotated(step, graph: bool) -> Callable[[], object]:
    """``step`` (one callable, or one per input set taken in turn), each replayed from its own
    CUDA graph when ``graph``."""
    fns = step if isinstance(step, list) else [step]
    fns = [graphed(fn) for fn in fns] if graph else fns
    return Rotation(fns) if len(fns) > 1 else fns[0]


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(peak bytes, the allocations live at that peak, largest first) over an allocator trace
    (``torch.cuda.memory._snapshot()["device_traces"][i]``): "alloc" adds a block, its first
    "free_requested" or "free_completed" removes it (the allocator's allocated-bytes count drops
    at the request, before other streams' uses end). Blocks allocated before the trace are not
    counted, so the peak is the one beyond what was live when recording began, as ``time_fn``
    reads it, but in requested bytes: the allocator counts blocks rounded up to 512 bytes (and may
    hand out a cached block up to 1 MiB larger), so its peak may read a little higher."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for entry in trace:
        action = entry.get("action")
        if action == "alloc":
            live[entry["addr"]] = entry
            total += entry["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif action in ("free_requested", "free_completed") and entry.get("addr") in live:
            total -= live.pop(entry["addr"])["size"]
    return peak, sorted(at_peak, key=lambda e: -e["size"])


PROJECT_DIRS = ("/kernels/", "/audiomae/", "/benches/", "/tests/")


def _is_python_frame(frame: dict) -> bool:
    """A Python frame: a source file, or code without one (``<string>``, ``<eval_with_key>``)."""
    filename = str(frame.get("filename", ""))
    return filename.endswith(".py") or (filename.startswith("<") and filename != "<unknown>")


def _allocation_site(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost frame of this project's code (kernels/,
    audiomae/, benches/, tests/) other than ``peak_holders``' own call of the function it
    measures, else the innermost Python frame; none is a C++ caller such as the autograd engine
    running a built-in backward (its C++ frames, when recorded, follow: ``peak_holders(cpp=True)``)."""
    python = [f for f in frames if _is_python_frame(f)]
    own = [f for f in python if any(part in f["filename"] for part in PROJECT_DIRS)
           and not (f["filename"].endswith("benches/harness.py") and f.get("name") == "peak_holders")]
    frame = (own or python or [None])[0]
    if frame is not None:
        return f"{frame['filename'].rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}"
    native = [_function_name(f) for f in frames if not _is_python_frame(f) and not _plumbing_frame(f)]
    site = "C++ (no Python frame: an ATen op or the autograd engine)"
    return site + (": " + " <- ".join(native[:CPP_FRAMES]) if native else "")


# C++ frames shown for an allocation without a Python frame, after the allocator's, the unwinder's
# and the dispatcher's own (which say nothing about which op asked).
CPP_FRAMES = 8
PLUMBING_FRAMES = ("c10::cuda::CUDACachingAllocator", "c10::CachingDeviceAllocator", "c10::CapturedTraceback",
                   "torch::CapturedTraceback", "torch::cuda::(anonymous namespace)::gather", "unwind", "_Unwind",
                   "c10::Dispatcher", "c10::impl::", "c10::KernelFunction", "c10::BoxedKernel", "c10::OperatorHandle",
                   "std::", "pthread_", "__clone", "start_thread")


def _function_name(frame: dict) -> str:
    """A C++ frame's function without its argument list (which runs to hundreds of characters) or
    its return type (``void f<...>(...)`` gives ``f<...>``)."""
    name = str(frame.get("name", ""))
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the first "(" outside template brackets opens the arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    head = name[:cut]
    depth = 0
    for i in range(len(head) - 1, -1, -1):  # a return type ends at the last space outside brackets
        depth += (head[i] in ">)") - (head[i] in "<(")
        if head[i] == " " and depth == 0:
            return head[i + 1:]
    return head


def _plumbing_frame(frame: dict) -> bool:
    name = _function_name(frame)
    return not name or name.startswith("?") or name.startswith(PLUMBING_FRAMES)


def peak_holders(fn: Callable[[], object], device: torch.device | str, top: int = 8, cpp: bool = False) -> list[str]:
    """What holds the memory at the peak of one call of ``fn`` (CUDA only): the ``top`` largest
    allocations live at that moment, as "MiB at file:line function", from the allocator's history.
    For reading a peak that a memory model does not explain; one more, untimed call. ``cpp``
    records C++ stacks too (slower to symbolize), to name the ATen op behind an allocation that
    has no Python frame."""
    device = torch.device(device)
    _sync(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="all" if cpp else "python",
                                             max_entries=1 << 20, device=device)
    try:
        fn()
        _sync(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    peak, holders = live_at_peak(snapshot["device_traces"][index])
    lines = [f"{e['size'] / 2**20:.1f} MiB at {_allocation_site(e.get('frames', []))}" for e in holders[:top]]
    rest = sum(e["size"] for e in holders[top:])
    return [f"peak {peak / 2**20:.1f} MiB"] + lines + ([f"{rest / 2**20:.1f} MiB in {len(holders) - top} more"]
                                                      if len(holders) > top else [])


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after three warm-up calls on a side stream); returns
    its replay. Timing the replay measures the kernels without the host time eager PyTorch spends
    launching them, which at a few microseconds per kernel can exceed the kernels themselves.

    Every replay reads the same input buffers (as every eager repetition of ``time_fn`` does): a
    working set smaller than the GPU's L2 (50 MB on an H100) may be served partly from L2, so a
    fraction of the copy bandwidth (whose floor streams 2 GiB through memory) would read high.
    Suites that small (the token ops' forward, 21 to 41 MB at the issue's shape; the column sum's
    32 MiB gradient) capture a graph per input set and replay them in turn (``Rotation``, as
    ``time_against_official`` does for a step given one call per input set)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def release_memory(device: torch.device | str) -> None:
    """Hands freed memory back between cases: the CUDA allocator's cache on the GPU; on Linux CPUs
    the heap glibc keeps after a free (which would count as resident before the next case)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_peak_rss_bytes(fn: Callable[[], object]) -> int | None:
    """Resident memory ``fn()`` peaks at beyond what was resident before it (Linux: the high-water
    mark, reset through ``/proc/self/clear_refs``), or None where that cannot be read. The CPU's
    stand-in for the GPU's peak allocation; heap memory freed earlier but kept by the allocator
    counts as resident before, so small tensors can make it an underestimate."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current VmRSS
        before = _status_bytes("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return _status_bytes("VmHWM") - before


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in GB/s, counting the bytes read plus the bytes written."""
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), dev, warmup=3, reps=20)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_tflops(device: str = "cuda", n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate in TFLOP/s (bf16 on the GPU, fp32 on the CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda: a @ b, dev, warmup=3, reps=10)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def memory_floor_ms(nbytes: int, device: str = "cuda") -> float:
    """The time to move ``nbytes`` at the measured copy bandwidth."""
    return nbytes / (copy_bandwidth_gbps(device) * 1e9) * 1e3


def device_info(device: torch.device | str) -> dict:
    import platform

    import triton

    device = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,  # the name alone can be an architecture ("x86_64") on a CPU
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import torchaudio

        info["torchaudio"] = torchaudio.__version__
    except ImportError:
        pass
    return info


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` runs (matmuls and convolutions, forward and any backward it calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
