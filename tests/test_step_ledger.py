"""The step ledger (benches/step_ledger.py): its backward walk and its counts, on small shapes.

These check the counting (fake tensors: nothing runs), not a speed target: the ledger's figures at
the issue's size are the benchmark's rows.
"""
import json

import pytest
import torch

from benches import step_ledger

SMALL = dict(batch=2, img_size=(128, 64))


@pytest.fixture(scope="module")
def triton_rows():
    """One recorded step of the triton backend on a small grid (shared: recording takes seconds)."""
    return step_ledger.record_step("triton", **SMALL)


def _tiny_mae(backend):
    import audiomae

    return audiomae.MaskedAutoencoderViT(
        img_size=(128, 64), patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256,
        decoder_depth=2, decoder_num_heads=16, mlp_ratio=2.0, decoder_mode=1, backend=backend)


def test_run_backward_gives_the_engine_s_gradients():
    """The node-by-node walk (which fake CUDA tensors need) against loss.backward(), on real CPU
    tensors through every kind of node the model has: C++ nodes, broadcast biases, casts, a
    custom Function (the model's reference backend under a Python autograd.Function), leaves
    reached by several paths."""
    torch.manual_seed(0)
    model = _tiny_mae("reference").eval()
    imgs, noise = torch.randn(2, 1, 128, 64), torch.rand(2, 32)

    class Twice(torch.autograd.Function):  # a Python node with a non-tensor argument between tensors
        @staticmethod
        def forward(ctx, a, factor, b):
            ctx.factor = factor
            return a * factor + b

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.factor, None, grad

    def loss_of():
        loss = model(imgs, noise=noise)[0]
        return Twice.apply(loss, 2.0, model.cls_token.sum()).to(torch.float64)

    loss_of().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with step_ledger.recording_tensor_arguments():
        loss = loss_of()
    step_ledger.run_backward(loss)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 20
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _linear_flops(model, encoder_tokens, decoder_tokens):
    """2 * tokens * in * out for every Linear of the encoder and decoder blocks, once."""
    total = 0
    for prefix, tokens in (("blocks.", encoder_tokens), ("decoder_blocks.", decoder_tokens)):
        for name, module in model.named_modules():
            if name.startswith(prefix) and isinstance(module, torch.nn.Linear) and "meta_mlp" not in name:
                total += 2 * tokens * module.in_features * module.out_features
    return total


def test_counts_every_matmul_of_the_step(triton_rows):
    """Blocks' matmuls: forward, two backward products each, and fc1 once more where the MLP
    recomputes it (the triton backend's gelu_mlp): the walk reaches every backward node."""
    import audiomae

    batch, img_size = 2, (128, 64)
    model = audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True, img_size=img_size)  # as recorded
    encoder_tokens = batch * (1 + round(8 * 4 * 0.2))  # cls + the kept 20 % of the 8 x 4 grid
    decoder_tokens = batch * 8 * 4
    per_pass = _linear_flops(model, encoder_tokens, decoder_tokens)
    fc1 = sum(2 * tokens * blk.mlp.fc1.in_features * blk.mlp.fc1.out_features
              for blocks, tokens in ((model.blocks, encoder_tokens), (model.decoder_blocks, decoder_tokens))
              for blk in blocks)
    blocks = [r for r in triton_rows if r[1] == "matmul" and ("gelu_mlp" in r[0] or r[0] in ("aten::mm", "aten::addmm"))]
    counted = sum(r[3] for r in blocks)
    # The rest of the step's matmuls (patch embedding aside): decoder_embed, decoder_pred and the
    # meta-MLPs, small next to the blocks; bound them rather than count them twice here.
    assert 3 * per_pass + fc1 <= counted <= 1.1 * (3 * per_pass + fc1)


def test_the_stream_copy_lowers_the_floor(monkeypatch, triton_rows):
    from audiomae.swin import SwinTransformerBlock

    with_copy = step_ledger.summarize(triton_rows)
    monkeypatch.setattr(SwinTransformerBlock, "stream_copy_dtype", lambda self, x: None)
    without = step_ledger.summarize(step_ledger.record_step("triton", **SMALL))
    casts = lambda s: next(r["bytes"] for r in s["by_kind"] if r["kind"] == "casts and copies")  # noqa: E731
    assert casts(with_copy) < casts(without)
    assert with_copy["total_floor_ms"] < without["total_floor_ms"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_summary_adds_up(backend, triton_rows):
    rows = triton_rows if backend == "triton" else step_ledger.record_step(backend, **SMALL)
    summary = step_ledger.summarize(rows, bandwidth_gbps=1000.0, matmul_tflops=100.0, top=5)
    assert summary["ops_recorded"] == len(rows) and len(summary["top_ops"]) == 5
    assert sum(r["calls"] for r in summary["by_kind"]) == len(rows)
    assert sum(r["bytes"] for r in summary["by_kind"]) == sum(r[2] for r in rows)
    floors = [max(b / 1e12, f / 1e14) * 1e3 for _, _, b, f in rows]
    assert summary["total_floor_ms"] == pytest.approx(sum(floors))
    assert not torch.is_autocast_enabled("cuda")  # the state is restored
    if backend == "reference":  # no project op runs on the reference backend
        assert all(kind != "this project's kernels" for _, kind, _, _ in rows)


def test_fused_matmul_does_the_same_products_and_moves_less(triton_rows):
    fused = step_ledger.record_step("triton", **SMALL, fused_matmul=True)
    flops = lambda rows: sum(r[3] for r in rows if r[1] == "matmul")  # noqa: E731
    assert flops(fused) == flops(triton_rows)
    moved = lambda rows: sum(r[2] for r in rows)  # noqa: E731
    assert moved(fused) < moved(triton_rows)
    assert not any("gelu_and_grad" in r[0] or r[0].endswith("(gelu)") for r in fused)


def _results_file(path, device, date, rows):
    path.write_text(json.dumps({"device": {"device": device, "device_type": "cuda", "date": date}, "benchmarks": rows}))


def test_rates_come_from_the_newest_committed_run_on_the_device(tmp_path):
    model_row = {"suite": "model_pretrain", "flops": 8e12, "flop_floor_ms": 10.0}  # 800 TFLOP/s
    _results_file(tmp_path / "old.json", "NVIDIA H100 80GB HBM3", "2026-11-26T00:00:00Z",
                  [{"copy_gbps": 2900.0}, {"matmul_tflops": 700.0}])
    _results_file(tmp_path / "new.json", "NVIDIA H100 80GB HBM3", "2026-11-27T00:00:00Z",
                  [{"copy_bandwidth_gbps": 3007.0}, model_row])
    _results_file(tmp_path / "h200.json", "NVIDIA H200", "2026-11-28T00:00:00Z", [{"matmul_tflops": 990.0}])
    rates = step_ledger.measured_rates("H100", tmp_path)
    assert rates["matmul_tflops"] == pytest.approx(800.0) and rates["bandwidth_gbps"] == 3007.0
    assert rates["matmul_tflops_source"] == "measured on the NVIDIA H100 80GB HBM3, new.json"
    assert "measured" in step_ledger.rates_note(rates) and "assumption" not in step_ledger.rates_note(rates)


def test_rates_without_a_measurement_are_called_assumptions(tmp_path):
    _results_file(tmp_path / "h200.json", "NVIDIA H200", "2026-11-28T00:00:00Z", [{"matmul_tflops": 990.0}])
    rates = step_ledger.measured_rates("H100", tmp_path)
    assert rates["matmul_tflops"] == step_ledger.ASSUMED_RATES["matmul_tflops"]
    assert "an assumption" in rates["matmul_tflops_source"] and "an assumption" in step_ledger.rates_note(rates)


def test_command_line_rates_override_the_measured_ones_and_say_so(triton_rows):
    rates = step_ledger.rates_with(matmul_tflops=500.0)
    assert rates["matmul_tflops"] == 500.0 and rates["matmul_tflops_source"] == "given on the command line"
    assert rates["bandwidth_gbps"] == step_ledger.measured_rates()["bandwidth_gbps"]
    summary = step_ledger.summarize(triton_rows, matmul_tflops=500.0)
    text = step_ledger.render(summary, "small")
    assert "500 TFLOP/s bf16 matmul (given on the command line)" in text
    assert step_ledger.measured_rates()["bandwidth_gbps_source"] in text
