"""The token benchmark's input rotation: every call takes the next input set (issue 6: fresh inputs)."""
from benches import bench_tokens


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
