"""The token benchmark's input rotation: every call takes the next input set (issue 6: fresh inputs)."""
import pytest
import torch

from benches import bench_tokens
from kernels.gather_tokens import gather_tokens


def test_rotation_takes_the_sets_in_turn():
    calls = []
    rotation = bench_tokens.Rotation([lambda: calls.append(0), lambda: calls.append(1), lambda: calls.append(2)])
    for _ in range(7):
        rotation()
    assert calls == [0, 1, 2, 0, 1, 2, 0]


def test_enough_sets_to_stream_past_the_l2():
    mib = 2**20
    assert bench_tokens._num_sets("cuda", 20 * mib) * 20 * mib >= bench_tokens.INPUT_SETS_BYTES
    assert bench_tokens._num_sets("cuda", 1) == bench_tokens.MAX_INPUT_SETS
    assert bench_tokens._num_sets("cuda", 10**12) == 2
    assert bench_tokens._num_sets("cpu", 20 * mib) == 2


def test_each_set_has_its_own_inputs():
    for op, _, _, _, impls in bench_tokens._cases("cpu", quick=True):
        for impl, per_set in impls.items():
            assert len(per_set) == 2, (op, impl)
            (_, first), (_, second) = per_set
            assert all(a is not b and a.data_ptr() != b.data_ptr() for a, b in zip(first, second)), (op, impl)


def test_back_to_back_runs_every_set_once_a_replay(monkeypatch):
    """The back-to-back rows capture one call per input set in one graph and divide by their count."""
    monkeypatch.setattr(bench_tokens, "graphed", lambda fn: fn)  # no CUDA here: the capture is the call
    calls = []
    replay = bench_tokens.BackToBack([lambda: calls.append(0), lambda: calls.append(1), lambda: calls.append(2)])
    assert replay.calls_per_replay == 3 and bench_tokens.Rotation([lambda: 0]).calls_per_replay == 1
    replay()
    replay()
    assert calls == [0, 1, 2, 0, 1, 2]


def test_a_failing_graph_row_is_an_error_row_and_the_rest_still_run(monkeypatch):
    """On CUDA a graph capture that fails (here: every back-to-back one) gives that row an ERROR
    note; the eager and single-call graph rows of the case keep their timings."""
    monkeypatch.setattr(bench_tokens, "graphed", lambda fn: fn)

    def broken(fns):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(bench_tokens, "BackToBack", broken)
    impls = next(iter(bench_tokens._cases("cpu", quick=True)))[4]
    made = dict(bench_tokens._timed_impls(impls, "fwd", "cuda"))
    assert set(made) >= {"official_graph", "kernel_graph", "official_graph_back_to_back", "kernel_graph_back_to_back"}
    monkeypatch.setattr(bench_tokens, "_timed_impls", lambda impls, pass_name, device: iter(made.items()))
    monkeypatch.setattr(bench_tokens, "copy_bandwidth_gbps", lambda device: 1.0)
    monkeypatch.setattr(bench_tokens, "_cases", lambda device, quick: [("gather", "tiny", 1, 1, impls)])
    rows = bench_tokens.run("cpu", quick=True)
    errors = [r for r in rows if r.get("status") == "ERROR"]
    assert {r["impl"] for r in errors} == {"official_graph_back_to_back", "kernel_graph_back_to_back"}
    assert all("capture failed" in r["note"] for r in errors)
    timed = {r["impl"]: r for r in rows if r.get("median_ms")}
    assert timed["kernel_graph"]["speedup_vs_official"] is not None


@pytest.mark.parametrize("strategy", list(bench_tokens.FORCED_BACKWARDS.values()), ids=str)
def test_forced_backward_rows_compute_the_same_gradient(seed, strategy):
    """The A/B rows' gathers (backward forced to another strategy) give the default's gradient, bit for bit."""
    x = torch.randn(2, 30, 12, requires_grad=True)
    pos = torch.randn(30, 12)
    ids = torch.stack([torch.randperm(30)[:6] for _ in range(2)])
    ids[0, 4] = ids[0, 1]
    out = bench_tokens._ForcedBackwardGather.apply(x, ids, pos, strategy)
    want = gather_tokens(x, ids, pos)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_unshuffle_scatter_row_computes_the_same_gradients(seed):
    """The unshuffle A/B row (x's gradient by the scatter) gives the default's gradients, bit for bit."""
    from kernels.unshuffle_tokens import unshuffle_tokens

    B, L, K, C = 2, 40, 9, 12
    x = torch.randn(B, K, C, requires_grad=True)
    mask_token = torch.randn(C, requires_grad=True)
    pos = torch.randn(L, C)
    ids_restore = torch.rand(B, L).argsort(1).argsort(1)
    out = bench_tokens._ScatterBackwardUnshuffle.apply(x, ids_restore, mask_token, pos)
    want = unshuffle_tokens(x, ids_restore, mask_token, pos)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, (x, mask_token), g), torch.autograd.grad(want, (x, mask_token), g)):
        assert torch.equal(got, expected)
