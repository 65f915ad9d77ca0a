"""benches.count_allocations: the live-storage count behind the block's counted peaks."""
import sys

import torch

from benches import count_allocations
from benches.count_allocations import LiveStorages


def test_live_storages_counts_from_creation_to_release_and_skips_what_existed():
    a = torch.ones(1024)  # 4 KiB, made before: never counted
    with LiveStorages([a]) as counter:
        b = a * 2  # +4 KiB
        c = b.view(32, 32)  # a view: nothing new
        d = b + 1  # +4 KiB: 8 KiB live, the peak
        del b, c, d  # all released
        e = a.to(torch.float64)  # 8 KiB
    assert counter.peak == 8192 and counter.live == 8192
    del e
    assert counter.live == 0


def test_block_counts_at_a_small_shape(monkeypatch):
    # The fused path keeps qkv (its gradient written over it), the attention output until the
    # projection's backward, the projection's output and input gradient, never an attention matrix:
    # well under the official path, whose windows, rolls and [windows, heads, N, N] matrices stay.
    # Keeping the output for the attention's backward (as before the backward took its softmax
    # correction from the tile) would cost one [B, L, C] tensor more at the peak.
    cfg = dict(B=8, grid=(8, 8), num_heads=2, head_dim=16, window=(4, 4), shift=(2, 0))
    unit = 8 * 64 * 32 * 2  # one [B, L, C] bf16 tensor
    rows = {r["impl"]: r for r in count_allocations.run(cfg)}
    assert rows["official"]["peak_vs_official"] == 1.0
    assert 6 * unit <= rows["triton"]["counted_peak_bytes"] < 7.5 * unit
    assert rows["triton"]["peak_vs_official"] < 0.45
    module = sys.modules["kernels.window_attention"]
    monkeypatch.setattr(module, "_backward_reads_out", lambda *args: True)
    kept = {r["impl"]: r for r in count_allocations.run(cfg)}
    assert kept["triton"]["counted_peak_bytes"] - rows["triton"]["counted_peak_bytes"] == unit
