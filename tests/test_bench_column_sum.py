"""The column-sum benchmark takes a fresh gradient every call (benches/bench_column_sum.py): its
32 MiB [32768, 512] bf16 input would otherwise be re-read from an H100's 50 MB L2."""
import torch

from benches import bench_column_sum, harness


def test_enough_gradients_to_stream_past_the_l2():
    for R, C, dtype in bench_column_sum._shapes(torch.device("cuda")):
        sets = harness.num_input_sets("cuda", R * C * dtype.itemsize)
        assert sets >= 2 and sets * R * C * dtype.itemsize >= harness.INPUT_SETS_BYTES


def test_each_gradient_is_its_own_tensor():
    grads = bench_column_sum.gradients(300, 40, torch.float32, torch.device("cpu"))
    assert len(grads) == 2 and grads[0].data_ptr() != grads[1].data_ptr() and not torch.equal(grads[0], grads[1])


def test_rows_say_how_many_input_sets_they_rotate(monkeypatch):
    monkeypatch.setattr(bench_column_sum, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(bench_column_sum, "memory_floor_ms", lambda nbytes, device: nbytes / 1e7)
    rows = bench_column_sum.run("cpu", quick=True)
    assert {r["impl"] for r in rows} == {"official", "kernel"}
    assert all(r["input_sets"] == 2 and r["median_ms"] > 0 for r in rows)
