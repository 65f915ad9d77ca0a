"""The memory estimate (benches/bench_memory_estimate.py) counts what each backend's step keeps.

These check the counting itself on a small grid (fake tensors: nothing runs), not a memory target:
the figures at the issue's size are the benchmark's rows.
"""
import torch

from benches.bench_memory_estimate import estimate


def test_counts_the_kernels_and_the_recomputation():
    small = dict(batch=2, img_size=(128, 64))
    reference, triton, hidden = (estimate(v, **small) for v in ("reference", "triton", "triton save=hidden"))
    assert reference["static_bytes"] == triton["static_bytes"] > 0
    # The kernels' saved tensors are found (custom ops: fake tensors take the op path).
    assert "audiomae_window_attention" in triton["largest_holders"]
    assert "audiomae_gelu_mlp" in hidden["largest_holders"]
    # Keeping fc1's output costs a [tokens, 4 x width] tensor per block, bfloat16 under autocast.
    decoder_tokens, encoder_tokens = 2 * 8 * 4, 2 * (1 + round(8 * 4 * 0.2))
    fc1_outputs = 2 * (decoder_tokens * 4 * 512 * 16 + encoder_tokens * 4 * 768 * 12)
    # fc1's bfloat16 bias, which only the recomputation needs, costs nothing more: it is cast with
    # the block's other Linear tensors into one buffer (audiomae.autocast_weights), which the saved
    # weights keep whole.
    assert hidden["saved_bytes"] - triton["saved_bytes"] == fc1_outputs
    assert triton["saved_bytes"] < reference["saved_bytes"]


def test_leaves_the_autocast_state_as_it_found_it():
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    estimate("triton", batch=1, img_size=(128, 64))
    assert (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) == before


def test_sdpa_row_keeps_the_position_bias():
    # The masked window attention must carry its bias (the meta-MLP): every parameter is in the graph.
    row = estimate("sdpa", batch=1, img_size=(128, 64))
    assert "ScaledDotProductEfficientAttention" in row["largest_holders"]


def test_mae_ast_count_keeps_less_than_its_ssast_baseline():
    from benches.bench_memory_estimate import estimate_mae_ast

    # Enough clips that activations outweigh the bf16 weight copies each Linear keeps (more layers in MAE-AST).
    small = dict(tokens="patch", depth=6, batch=8, frames=256)
    ssast, mae = (estimate_mae_ast(mode, "sdpa", **small) for mode in ("ssast", "mae"))
    assert 0 < mae["saved_bytes"] < ssast["saved_bytes"]
    assert "Addmm" in ssast["largest_holders"]
