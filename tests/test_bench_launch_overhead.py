"""The host-overhead suite runs every row on the CPU (smoke: the Triton rows through the interpreter)."""
import threading

import pytest

from benches import bench_launch_overhead


def test_every_row_measures_on_the_cpu():
    rows = bench_launch_overhead.run("cpu", quick=True)
    impls = {r["impl"] for r in rows}
    assert {"torch_add", "gather_tokens", "autograd_identity_fwd_bwd", "gather_backward_launcher",
            "gather_backward_launcher_thread", "gather_tokens_fwd_bwd", "official_gather_fwd_bwd",
            "new_tensor_fwd_bwd", "first_order_fwd_bwd", "triton_backward_fwd_bwd",
            "gather_forward_then_backward_launcher", "gather_tokens_fwd_bwd_inside_backward"} <= impls
    for r in rows:
        assert "unavailable" not in r, r
        assert r["host_us_per_call"] > 0 and r["vs_torch_add"] > 0


def test_a_threaded_row_runs_in_another_thread_and_reraises_there():
    threads = []

    def record():
        threads.append(threading.get_ident())

    bench_launch_overhead._host_us(bench_launch_overhead._InThread(record), bench_launch_overhead.torch.device("cpu"), 2)
    assert threads and threading.get_ident() not in threads

    def fail():
        raise ValueError("row failed")

    with pytest.raises(ValueError, match="row failed"):
        bench_launch_overhead._host_us(bench_launch_overhead._InThread(fail), bench_launch_overhead.torch.device("cpu"), 2)


def test_the_inside_backward_row_times_the_backward_alone_and_restores_it():
    from kernels.gather_tokens import _GatherTokens

    backward = _GatherTokens.__dict__["backward"]
    rows = {r["impl"]: r for r in bench_launch_overhead.run("cpu", quick=True)}
    assert _GatherTokens.__dict__["backward"] is backward
    row = rows["gather_tokens_fwd_bwd_inside_backward"]
    # The backward is part of the call (medians over rounds: the whole call's median is at least
    # the backward's mean in all but a pathological round)
    assert 0 < row["host_us_per_call"] < 1.5 * row["whole_call_us"]
