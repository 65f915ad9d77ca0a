"""benches.targets: verdicts on the issues' targets, read off benchmark rows."""
import json

from benches.render_results import render_targets
from benches.targets import target_rows


def _verdicts(rows):
    return {r["target"]: (r["verdict"], r["measured"]) for r in target_rows(rows)}


def test_token_target_met_missed_and_unmeasured():
    rows = [
        {"suite": "tokens", "name": "gather fwd", "impl": "kernel_graph", "median_ms": 0.01,
         "fraction_of_copy_bandwidth": 0.85, "speedup_vs_official": 6.0},
        {"suite": "tokens", "name": "unshuffle fwd", "impl": "kernel_graph", "median_ms": 0.01,
         "fraction_of_copy_bandwidth": 0.79, "speedup_vs_official": 25.0},
    ]
    v = _verdicts(rows)
    assert v["gather fwd: >= 80% of copy bandwidth (graph replay)"] == ("met", "85%")
    assert v["gather fwd: >= 5x the official path (both graph-replayed)"] == ("met", "6.0x")
    assert v["unshuffle fwd: >= 80% of copy bandwidth (graph replay)"] == ("missed", "79%")
    assert v["unshuffle fwd: >= 20x the official path (both graph-replayed)"][0] == "met"
    assert v["gather fwd+bwd: >= 80% of copy bandwidth (graph replay)"] == ("not measured", "")


def test_step_target_needs_speed_and_memory():
    def row(impl, speed, mem):
        return {"suite": "model_pretrain", "impl": impl, "median_ms": 40.0, "speedup_vs_reference": speed,
                "mem_fraction_of_reference": mem}

    v = _verdicts([row("triton", 3.1, 0.45), row("triton+graph", 3.2, 0.6), row("triton+compile+graph", 2.5, 0.45)])
    assert v["pretraining step, triton: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] == "met"
    assert v["pretraining step, triton+graph: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] == "missed"
    assert v["pretraining step, triton+compile+graph: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] \
        == "missed"
    # a row without a timing (a SKIP or ERROR row) counts as not measured
    v = _verdicts([{"suite": "model_pretrain", "impl": "triton", "median_ms": None, "status": "ERROR"}])
    assert v["pretraining step, triton: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] == "not measured"


def test_fbank_and_window_targets_use_the_newest_row():
    rows = [
        {"suite": "fbank", "impl": "cuda_kernel", "median_ms": 1.0, "clips_per_s": 256000.0, "scratch_over_output": 0.0},
        {"suite": "fbank", "impl": "torch_path_fp32_compiled", "median_ms": 4.5},
        {"suite": "window_attention_core", "impl": "triton", "step": "fwd+bwd graph", "median_ms": 0.5,
         "floor_ratio": 4.0, "speedup_vs_flex_attention": 12.0},
        {"suite": "window_attention_core", "impl": "triton", "step": "fwd+bwd graph", "median_ms": 0.3,
         "floor_ratio": 2.5, "speedup_vs_flex_attention": 9.0},
    ]
    v = _verdicts(rows)
    assert v["kernel: >= 500,000 clips/s (10 s clips, batch 256)"] == ("missed", "256,000 clips/s")
    assert v["kernel: >= 4x the batched torch path under torch.compile"] == ("met", "4.50x")
    assert v["kernel: scratch memory <= the output"][0] == "met"
    assert v["core fwd+bwd (graph replay): <= 3x the memory floor and <= 0.4 ms"] == ("met", "0.300 ms, 2.5x floor")
    assert v["core fwd+bwd (graph replay): >= 10x flex_attention"] == ("missed", "9.0x")


def test_frozen_bias_flex_target_compares_the_kernel_frozen_too():
    # Equal work: FlexAttention with tau and bias frozen against the kernel with them frozen, not
    # against the kernel that still computes their gradients.
    core = {"suite": "window_attention_core", "step": "fwd+bwd graph", "median_ms": 0.3, "floor_ratio": 2.5}
    rows = [dict(core, impl="triton", speedup_vs_flex_attention=100.0, speedup_vs_flex_attention_frozen_bias=8.0)]
    v = _verdicts(rows)
    assert v["core fwd+bwd (graph replay): >= 10x flex_attention_frozen_bias"][0] == "not measured"
    unequal = ("core fwd+bwd (graph replay): >= 10x flex_attention_frozen_bias (the kernel still computing tau's "
               "and bias's gradients: more work than FlexAttention's)")
    assert v[unequal] == ("missed", "8.0x")
    rows.append(dict(core, impl="triton_frozen_bias", median_ms=0.2, speedup_vs_flex_attention_frozen_bias=12.0))
    v = _verdicts(rows)
    assert v["core fwd+bwd (graph replay): >= 10x flex_attention_frozen_bias"] == ("met", "12.0x")
    assert v["core fwd+bwd (graph replay): >= 10x flex_attention"] == ("met", "100.0x")


def test_block_targets_eager_and_graph_replayed():
    rows = [
        {"suite": "window_attention_block", "impl": "triton", "step": "fwd+bwd", "median_ms": 2.0,
         "speedup_vs_official": 2.0, "speedup_vs_official_compiled": 0.9, "peak_mem_vs_official": 0.45},
        {"suite": "window_attention_block", "impl": "triton", "step": "fwd+bwd graph", "median_ms": 0.7,
         "speedup_vs_official": 5.5, "speedup_vs_official_compiled": 2.4, "peak_mem_bytes": None},
    ]
    v = _verdicts(rows)
    assert v["block fwd+bwd (both eager): >= 3x the official path"] == ("missed", "2.00x")
    assert v["block fwd+bwd (both graph-replayed): >= 3x the official path"] == ("met", "5.50x")
    assert v["block fwd+bwd (both graph-replayed): >= 2x the official path compiled"] == ("met", "2.40x")
    assert v["block fwd+bwd: <= 0.5x the official peak memory"] == ("met", "0.45x")
    v = _verdicts(rows[1:])
    assert v["block fwd+bwd: <= 0.5x the official peak memory"][0] == "not measured"


def test_render_targets_takes_gpu_files_only(tmp_path):
    gpu = {"device": {"device": "NVIDIA H200"}, "benchmarks": [
        {"suite": "model_pretrain", "impl": "triton", "median_ms": 40.0, "speedup_vs_reference": 3.5,
         "mem_fraction_of_reference": 0.4}]}
    cpu = {"device": {"device": "cpu"}, "benchmarks": [
        {"suite": "model_pretrain", "impl": "triton", "median_ms": 40.0, "speedup_vs_reference": 0.1,
         "mem_fraction_of_reference": 0.9}]}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    text = render_targets([tmp_path / "cpu.json", tmp_path / "gpu.json"])
    assert "### Targets on the NVIDIA H200" in text and "cpu" not in text.split("\n")[0]
    assert "| 6 | pretraining step, triton: >= 3x the reference samples/s at <= 0.5x its peak memory | 3.50x speed, 0.40x memory | met |" in text
    assert text.count("### Targets") == 1


def test_render_targets_takes_the_newest_run_where_runs_overlap(tmp_path):
    def run_file(name, date, speed):
        data = {"device": {"device": "NVIDIA H200", "date": date}, "benchmarks": [
            {"suite": "model_pretrain", "impl": "triton", "median_ms": 40.0, "speedup_vs_reference": speed,
             "mem_fraction_of_reference": 0.4}]}
        (tmp_path / name).write_text(json.dumps(data))
        return tmp_path / name

    # File names sort the other way round from the dates: the date decides.
    older = run_file("run-b.json", "2026-11-26T10:00:00Z", 1.5)
    newer = run_file("run-a.json", "2026-11-27T10:00:00Z", 3.5)
    text = render_targets(sorted([older, newer]))
    assert "3.50x speed" in text and "1.50x speed" not in text


def test_mae_ast_without_rows_is_unmeasured_not_absent():
    from benches import targets

    lines = [r for r in targets.target_rows([]) if r["issue"] == 7]
    assert len(lines) == 1 and lines[0]["measured"] == "" and lines[0]["verdict"] == targets._verdict(None, bool)


def test_fbank_ratio_comes_from_the_kernel_rows_own_run():
    from benches import targets

    rows = [{"suite": "fbank", "impl": "cuda_kernel", "median_ms": 1.0, "speedup_vs_torch_path_fp32_compiled": 2.5},
            {"suite": "fbank", "impl": "torch_path_fp32_compiled", "median_ms": 9.0}]  # another run's row
    line = next(r for r in targets.target_rows(rows) if "torch.compile" in r["target"])
    assert line["measured"] == "2.50x" and line["verdict"] == "missed"


def test_render_results_tells_a_gpu_from_a_cpu_architecture():
    from benches.render_results import is_gpu

    assert is_gpu({"device": "NVIDIA H100 80GB HBM3"}) and is_gpu({"device": "x", "device_type": "cuda"})
    assert not any(is_gpu(d) for d in ({"device": "x86_64"}, {"device": "cpu"}, {"device": "aarch64"},
                                        {"device": "Intel Xeon", "device_type": "cpu"}, {}))
