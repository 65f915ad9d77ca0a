"""benches.harness: the allocator-trace reading behind ``peak_holders`` (the GPU call itself is
exercised by the window-attention benchmark on a GPU), and the input rotation of
``time_against_official`` (fresh inputs every call)."""
import pytest
import torch

from benches import harness
from benches.harness import _allocation_site, live_at_peak, peak_holders


def _alloc(addr, size, filename="/x/torch/nn/functional.py", name="linear"):
    return {"action": "alloc", "addr": addr, "size": size, "frames": [{"filename": filename, "line": 7, "name": name}]}


def _free(addr, action="free_completed"):
    return {"action": action, "addr": addr}


def test_live_at_peak_finds_the_largest_live_set_and_releases_blocks_at_the_free_request():
    trace = [
        _alloc(1, 100), _alloc(2, 50), _free(1, "free_requested"), _free(1),  # 150 live, then 50
        {"action": "segment_alloc", "addr": 9, "size": 10**9},  # the cache growing is not an allocation
        _alloc(6, 500), _free(6, "free_requested"),  # another stream still uses it: released all the same
        _alloc(3, 30), _alloc(4, 200),  # 280 live: the peak
        _free(4), _free(77),  # a block allocated before the trace: ignored
        _alloc(5, 60), _free(6),  # the completion of a request already counted: no change
    ]
    peak, holders = live_at_peak(trace)
    assert peak == 550  # 50 + 500, while block 6 was live
    assert [h["addr"] for h in holders] == [6, 2]
    peak, holders = live_at_peak(trace[:6] + trace[7:])  # without block 6's request: it stays live
    assert peak == 780 and [h["addr"] for h in holders] == [6, 4, 2, 3]
    assert live_at_peak([]) == (0, [])


def test_allocation_site_prefers_this_projects_innermost_frame():
    frames = [{"filename": "/v/torch/autograd/function.py", "line": 3, "name": "apply"},
              {"filename": "/repo/kernels/window_attention.py", "line": 560, "name": "_backward"},
              {"filename": "/repo/benches/bench_window_attention.py", "line": 9, "name": "step"}]
    assert _allocation_site(frames) == "window_attention.py:560 _backward"
    assert _allocation_site(frames[:1]) == "function.py:3 apply"
    assert _allocation_site([]).startswith("C++")


def test_allocation_site_skips_the_harness_call_and_names_cpp_callers():
    harness = {"filename": "/repo/benches/harness.py", "line": 129, "name": "peak_holders"}
    test = {"filename": "/repo/tests/test_harness.py", "line": 50, "name": "step"}
    assert _allocation_site([test, harness]) == "test_harness.py:50 step"
    assert _allocation_site([harness]) == "harness.py:129 peak_holders"  # no other Python frame
    # Names as torch symbolizes them, argument lists and return types included (the H200's, 2026-11-27).
    native = [{"filename": "??", "line": 0, "name": "torch::cuda::(anonymous namespace)::gather_with_cpp()"},
              {"filename": "??", "line": 0, "name": "c10::cuda::CUDACachingAllocator::Native::malloc(void**, int, unsigned long)"},
              {"filename": "??", "line": 0, "name": "void at::native::gpu_reduce_kernel<c10::BFloat16, float, 4, 8>"
                                                     "(at::TensorIterator&, std::optional<long> const&)"},
              {"filename": "??", "line": 0, "name": "at::Tensor at::_sum_to<c10::SymInt>(at::Tensor, c10::ArrayRef<c10::SymInt>, bool)"},
              {"filename": "??", "line": 0, "name": "c10::Dispatcher::call(std::vector<long> const&)"},
              {"filename": "/pytorch/autograd/engine.cpp", "line": 9,
               "name": "torch::autograd::Engine::evaluate_function(std::shared_ptr<torch::autograd::GraphTask>&)"},
              {"filename": "??", "line": 0, "name": "start_thread"}]
    assert _allocation_site(native) == (
        "C++ (no Python frame: an ATen op or the autograd engine): at::native::gpu_reduce_kernel<c10::BFloat16, "
        "float, 4, 8> <- at::_sum_to<c10::SymInt> <- torch::autograd::Engine::evaluate_function")
    assert _allocation_site([{"filename": "<string>", "line": 1, "name": "<module>"}] + native) == "<string>:1 <module>"


@pytest.mark.gpu
def test_gpu_peak_holders_names_the_allocations_of_one_call():
    x = torch.randn(1024, 1024, device="cuda")

    def step():
        y = x * 2  # 4 MiB
        z = y + 1  # 4 MiB more, both live
        return z.sum()

    step()
    lines = peak_holders(step, "cuda", top=2)
    assert lines[0].startswith("peak ") and float(lines[0].split()[1]) >= 8.0
    assert all("MiB at test_harness.py" in line for line in lines[1:3]), lines


def test_time_against_official_takes_the_input_sets_in_turn():
    calls = []
    steps = {"official": [lambda i=i: calls.append(("official", i)) for i in range(3)],
             "kernel": lambda: calls.append(("kernel", 0))}  # one callable: the same inputs every call
    rows = harness.time_against_official({"floor_ms": 1.0}, steps, torch.device("cpu"), quick=True)
    official = [i for impl, i in calls if impl == "official"]
    assert official == [i % 3 for i in range(len(official))] and len(official) >= 6
    assert rows[0]["input_sets"] == 3 and "input_sets" not in rows[1]


def test_replayed_rows_capture_a_graph_per_input_set(monkeypatch):
    captured = []
    monkeypatch.setattr(harness, "graphed", lambda fn: captured.append(fn) or fn)
    fns = [lambda: "a", lambda: "b"]
    replay = harness._rotated(fns, graph=True)
    assert captured == fns and [replay() for _ in range(4)] == ["a", "b", "a", "b"]
    single = lambda: "c"  # noqa: E731
    assert harness._rotated(single, graph=False) is single


def test_enough_input_sets_to_stream_past_the_l2():
    mib = 2**20
    assert harness.num_input_sets("cuda", 32 * mib) * 32 * mib >= harness.INPUT_SETS_BYTES
    assert harness.num_input_sets("cuda", 1) == harness.MAX_INPUT_SETS
    assert harness.num_input_sets("cpu", 32 * mib) == 2


def test_graphed_docstring_names_every_suite_that_fits_the_l2():
    assert "column sum" in harness.graphed.__doc__ and "the one suite" not in harness.graphed.__doc__
