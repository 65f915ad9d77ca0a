"""benches.targets: verdicts on the issues' targets, read off benchmark rows."""
import json

from benches import targets
from benches.render_results import render_file, render_targets
from benches.targets import target_rows

GATHER = targets.TOKEN_SHAPES["gather"]
UNSHUFFLE = targets.TOKEN_SHAPES["unshuffle"]
WINDOW = targets.WINDOW_SHAPE
PRETRAIN = {"suite": "model_pretrain", "shape": targets.PRETRAIN_SHAPE, "batch": 64}
FBANK = {"suite": "fbank", "shape": "B=256 N=160000 F=998 bins=128"}
STEP_TARGET = "pretraining step, triton: >= 3x the reference samples/s at <= 0.5x its peak memory"
CORE_FLOOR = "core fwd+bwd (graph replay): <= 3x the memory floor and <= 0.4 ms"
LEARNING = ("core fwd+bwd (graph replay): >= 10x FlexAttention, both learning tau and bias (triton vs "
            "flex_attention, whose bias gradient takes atomic adds)")
FROZEN = ("core fwd+bwd (graph replay): >= 10x FlexAttention, both with tau and bias frozen: equal work "
          "(triton_frozen_bias vs flex_attention_frozen_bias)")
UNEQUAL = ("core fwd+bwd (graph replay): >= 10x FlexAttention with tau and bias frozen, the kernel still learning "
           "them: more work than FlexAttention's (triton vs flex_attention_frozen_bias)")
FBANK_SPEED = "kernel: >= 4x the batched torch path under torch.compile"


def _verdicts(rows):
    return {r["target"]: (r["verdict"], r["measured"]) for r in target_rows(rows)}


def _pretrain(speed, mem=0.4, **extra):
    return {**PRETRAIN, "impl": "triton", "median_ms": 40.0, "speedup_vs_reference": speed,
            "mem_fraction_of_reference": mem, **extra}


def _core(impl="triton", step="fwd+bwd graph", **extra):
    return {"suite": "window_attention_core", "shape": WINDOW, "impl": impl, "step": step, "median_ms": 0.3,
            "floor_ratio": 2.5, "floor_units": 11, **extra}


def test_token_target_met_missed_and_unmeasured():
    rows = [
        {"suite": "tokens", "name": "gather fwd", "impl": "kernel_graph", "shape": GATHER, "median_ms": 0.01,
         "fraction_of_copy_bandwidth": 0.85, "speedup_vs_official": 6.0, "input_sets": 13},
        {"suite": "tokens", "name": "unshuffle fwd", "impl": "kernel_graph", "shape": UNSHUFFLE, "median_ms": 0.01,
         "fraction_of_copy_bandwidth": 0.79, "speedup_vs_official": 25.0, "input_sets": 7},
    ]
    v = _verdicts(rows)
    assert v["gather fwd: >= 80% of copy bandwidth (graph replay)"] == ("met", "85%")
    assert v["gather fwd: >= 5x the official path (both graph-replayed)"] == ("met", "6.0x")
    assert v["unshuffle fwd: >= 80% of copy bandwidth (graph replay)"] == ("missed", "79%")
    assert v["unshuffle fwd: >= 20x the official path (both graph-replayed)"][0] == "met"
    assert v["gather fwd+bwd: >= 80% of copy bandwidth (graph replay)"] == ("not measured", "")


def test_token_rows_without_fresh_input_sets_are_marked_l2_assisted():
    row = {"suite": "tokens", "name": "gather fwd", "impl": "kernel_graph", "shape": GATHER, "median_ms": 0.01,
           "fraction_of_copy_bandwidth": 0.85, "speedup_vs_official": 6.0}  # measured before the rotation
    v = _verdicts([row])
    assert v["gather fwd: >= 80% of copy bandwidth (graph replay)"] == ("met", "85%" + targets.L2_ASSISTED)
    assert targets.L2_ASSISTED == ", same inputs every call (L2-assisted)"
    assert v["gather fwd: >= 5x the official path (both graph-replayed)"][1].endswith("(L2-assisted)")
    assert _verdicts([dict(row, input_sets=13)])["gather fwd: >= 80% of copy bandwidth (graph replay)"][1] == "85%"


def test_a_row_at_another_shape_is_never_judged():
    # The unshuffle's shape for the gather's target, and the pretraining step at batch 8.
    gather_at_c512 = {"suite": "tokens", "name": "gather fwd", "impl": "kernel_graph", "shape": UNSHUFFLE,
                      "median_ms": 0.01, "fraction_of_copy_bandwidth": 0.9, "speedup_vs_official": 9.0, "input_sets": 7}
    small_batch = _pretrain(3.5, shape="B=8 1024x128 base", batch=8)
    unbatched = _pretrain(3.5, batch=None)  # the shape alone is not the target's workload
    v = _verdicts([gather_at_c512, small_batch, unbatched])
    assert v["gather fwd: >= 80% of copy bandwidth (graph replay)"] == ("not measured", "")
    assert v[STEP_TARGET] == ("not measured", "")
    fbank_small = {**FBANK, "shape": "B=4 N=16000 F=98 bins=128", "impl": "cuda_kernel", "median_ms": 1.0,
                   "clips_per_s": 9e5}
    assert _verdicts([fbank_small])["kernel: >= 500,000 clips/s (10 s clips, batch 256)"][0] == "not measured"


def test_a_quick_runs_rows_are_never_judged():
    quick = targets.stamp_run([_pretrain(3.5)], "cpu-bench", quick=True)
    assert _verdicts(quick)[STEP_TARGET] == ("not measured", "")
    full = targets.stamp_run([_pretrain(1.5)], "gpu_check", quick=False)
    assert _verdicts(full + quick)[STEP_TARGET] == ("missed", "1.50x speed, 0.40x memory")


def test_step_target_needs_speed_and_memory():
    def row(impl, speed, mem):
        return dict(_pretrain(speed, mem), impl=impl)

    v = _verdicts([row("triton", 3.1, 0.45), row("triton+graph", 3.2, 0.6), row("triton+compile+graph", 2.5, 0.45)])
    assert v[STEP_TARGET][0] == "met"
    assert v["pretraining step, triton+graph: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] == "missed"
    assert v["pretraining step, triton+compile+graph: >= 3x the reference samples/s at <= 0.5x its peak memory"][0] \
        == "missed"
    # a row without a timing (a SKIP or ERROR row) counts as not measured
    v = _verdicts([{**PRETRAIN, "impl": "triton", "median_ms": None, "status": "ERROR"}])
    assert v[STEP_TARGET][0] == "not measured"


def test_a_target_whose_latest_row_failed_is_not_measured_in_that_run():
    older = targets.stamp_run([_pretrain(3.5)], "gpu_check-old", quick=False)
    failed = {**PRETRAIN, "impl": "triton", "median_ms": None, "status": "ERROR", "note": "CUDA out of memory\nmore"}
    newer = targets.stamp_run([failed], "gpu_check-new", quick=False)
    verdict, measured = _verdicts(older + newer)[STEP_TARGET]
    assert verdict == "not measured" and "3.50x" not in measured
    assert measured == "not measured in its latest run, gpu_check-new (ERROR: CUDA out of memory)"
    # the same for a row that is timed but marked failed, and for an untimed window-attention row
    timed_error = targets.stamp_run([dict(_pretrain(3.5), status="ERROR")], "gpu_check-new", quick=False)
    assert _verdicts(older + timed_error)[STEP_TARGET][0] == "not measured"
    unavailable = _core(median_ms=None, unavailable="RuntimeError: capture failed")
    assert _verdicts([_core(), unavailable])[CORE_FLOOR] == (
        "not measured", "not measured in its latest run (no timing: RuntimeError: capture failed)")


def test_fbank_and_window_targets_use_the_newest_row():
    rows = [
        {**FBANK, "impl": "cuda_kernel", "median_ms": 1.0, "clips_per_s": 256000.0, "scratch_over_output": 0.0,
         "speedup_vs_torch_path_fp32_compiled": 4.5},
        _core(median_ms=0.5, floor_ratio=4.0, speedup_vs_flex_attention=12.0),
        _core(median_ms=0.3, floor_ratio=2.5, speedup_vs_flex_attention=9.0),
    ]
    v = _verdicts(rows)
    assert v["kernel: >= 500,000 clips/s (10 s clips, batch 256)"] == ("missed", "256,000 clips/s")
    assert v[FBANK_SPEED] == ("met", "4.50x")
    assert v["kernel: scratch memory <= the output"][0] == "met"
    assert v[CORE_FLOOR] == ("met", "0.300 ms, 2.5x floor")
    assert v[LEARNING] == ("missed", "9.0x")


def test_a_core_row_without_floor_units_may_have_the_older_floor():
    row = _core()
    del row["floor_units"]
    assert _verdicts([row])[CORE_FLOOR] == ("met", "0.300 ms, 2.5x floor" + targets.OLD_FLOOR)


def test_frozen_bias_flex_target_compares_the_kernel_frozen_too():
    # Equal work: FlexAttention with tau and bias frozen against the kernel with them frozen, not
    # against the kernel that still computes their gradients.
    rows = [_core(speedup_vs_flex_attention=100.0, speedup_vs_flex_attention_frozen_bias=8.0)]
    v = _verdicts(rows)
    assert v[FROZEN] == ("not measured", "no triton_frozen_bias row in that run")
    assert v[UNEQUAL] == ("missed", "8.0x")
    assert v[LEARNING] == ("met", "100.0x")
    rows.append(_core("triton_frozen_bias", median_ms=0.2, speedup_vs_flex_attention_frozen_bias=12.0))
    v = _verdicts(rows)
    assert v[FROZEN] == ("met", "12.0x")
    assert v[LEARNING] == ("met", "100.0x")


def test_frozen_line_takes_the_core_rows_run_only():
    """An older run's frozen-kernel row does not stand in where the newest run has none."""
    older = targets.stamp_run([_core(speedup_vs_flex_attention=90.0),
                               _core("triton_frozen_bias", speedup_vs_flex_attention_frozen_bias=12.0)], "old", False)
    newer = targets.stamp_run([_core(speedup_vs_flex_attention=100.0)], "new", False)
    v = _verdicts(older + newer)
    assert v[LEARNING] == ("met", "100.0x")
    assert v[FROZEN] == ("not measured", "no triton_frozen_bias row in that run")
    assert _verdicts(older)[FROZEN] == ("met", "12.0x")


def test_block_targets_eager_and_graph_replayed():
    block = {"suite": "window_attention_block", "shape": WINDOW, "impl": "triton"}
    rows = [
        {**block, "step": "fwd+bwd", "median_ms": 2.0, "speedup_vs_official": 2.0,
         "speedup_vs_official_compiled": 0.9, "peak_mem_vs_official": 0.45},
        {**block, "step": "fwd+bwd graph", "median_ms": 0.7, "speedup_vs_official": 5.5,
         "speedup_vs_official_compiled": 2.4, "peak_mem_bytes": None},
    ]
    v = _verdicts(rows)
    assert v["block fwd+bwd (both eager): >= 3x the official path"] == ("missed", "2.00x")
    assert v["block fwd+bwd (both graph-replayed): >= 3x the official path"] == ("met", "5.50x")
    assert v["block fwd+bwd (both graph-replayed): >= 2x the official path compiled"] == ("met", "2.40x")
    assert v["block fwd+bwd: <= 0.5x the official peak memory"] == ("met", "0.45x")
    v = _verdicts(rows[1:])
    assert v["block fwd+bwd: <= 0.5x the official peak memory"][0] == "not measured"


def _write(path, device, rows, date="2026-11-27T10:00:00Z", quick=False):
    path.write_text(json.dumps({"device": {"device": device, "date": date}, "quick": quick, "benchmarks": rows}))
    return path


def test_render_targets_takes_gpu_files_only(tmp_path):
    gpu = _write(tmp_path / "gpu.json", "NVIDIA H200", [_pretrain(3.5)])
    cpu = _write(tmp_path / "cpu.json", "cpu", [_pretrain(0.1, 0.9)])
    text = render_targets([cpu, gpu])
    assert "### Targets on the NVIDIA H200" in text and "cpu" not in text.split("\n")[0]
    assert f"| 6 | {STEP_TARGET} | 3.50x speed, 0.40x memory | met |" in text
    assert text.count("### Targets") == 1


def test_render_targets_takes_the_newest_run_where_runs_overlap(tmp_path):
    # File names sort the other way round from the dates: the date decides.
    older = _write(tmp_path / "run-b.json", "NVIDIA H200", [_pretrain(1.5)], "2026-11-26T10:00:00Z")
    newer = _write(tmp_path / "run-a.json", "NVIDIA H200", [_pretrain(3.5)], "2026-11-27T10:00:00Z")
    text = render_targets(sorted([older, newer]))
    assert "3.50x speed" in text and "1.50x speed" not in text


def test_render_targets_orders_parts_and_skips_quick_files(tmp_path):
    date = "2026-11-27T10:00:00Z"
    first = _write(tmp_path / "gpu_check-x.json", "NVIDIA H200", [_pretrain(1.5)], date)
    part2 = _write(tmp_path / "gpu_check-x-part2.json", "NVIDIA H200", [_pretrain(2.5)], date)
    quick = _write(tmp_path / "gpu_check-y.json", "NVIDIA H200", [_pretrain(3.5)], "2026-11-28T10:00:00Z", quick=True)
    text = render_targets([part2, quick, first])
    assert "2.50x speed" in text and "1.50x speed" not in text and "3.50x speed" not in text


def test_render_file_notes_window_rows_without_floor_units(tmp_path):
    row = _core(floor_ms=0.1)
    del row["floor_units"]
    old = _write(tmp_path / "old.json", "NVIDIA H200", [row])
    new = _write(tmp_path / "new.json", "NVIDIA H200", [_core(floor_ms=0.1)])
    assert "older 12-unit" in render_file(old) and "older 12-unit" not in render_file(new)


def test_mae_ast_without_rows_is_unmeasured_not_absent():
    lines = [r for r in targets.target_rows([]) if r["issue"] == 7]
    assert len(lines) == 1 and lines[0]["measured"] == "" and lines[0]["verdict"] == targets._verdict(None, bool)


def _mae_row(name, speed, mem, measure="peak_mem_bytes", **extra):
    return {"suite": "mae_ast_pretrain_step", "impl": "mae", "shape": targets.MAE_AST_SHAPE, "name": name,
            "median_ms": 10.0, "speedup_vs_ssast": speed, "mem_ratio_vs_ssast": mem, "mem_ratio_measure": measure,
            **extra}


def test_mae_ast_one_line_per_case_from_the_newest_run():
    older = targets.stamp_run([_mae_row("mae/sdpa patch depth 6", 1.0, 1.5),
                               _mae_row("mae/sdpa patch depth 12", 1.1, 2.0)], "run-1", False)
    newer = targets.stamp_run([_mae_row("mae/sdpa patch depth 6", 3.2, 2.1),
                               _mae_row("mae/sdpa+graph patch depth 6", 3.5, 2.5, "saved_activation_bytes"),
                               _mae_row("mae/reference patch depth 6", None, None, status="ERROR", note="OOM")],
                              "run-2", False)
    lines = {r["target"].split(":")[0]: r for r in targets.target_rows(older + newer) if r["issue"] == 7}
    assert set(lines) == {"mae/sdpa patch depth 6", "mae/sdpa+graph patch depth 6", "mae/reference patch depth 6"}
    eager, graph = lines["mae/sdpa patch depth 6"], lines["mae/sdpa+graph patch depth 6"]
    assert (eager["verdict"], eager["measured"]) == ("met", "3.20x speed, 2.10x less memory (measured peak)")
    assert graph["measured"] == ("3.50x speed, 2.50x fewer saved activation bytes "
                                 "(counted by a hook, not a measured peak)")
    assert "peak memory" not in graph["measured"].split("(")[0]
    failed = lines["mae/reference patch depth 6"]
    assert failed["verdict"] == "not measured"
    assert failed["measured"] == "not measured in its latest run, run-2 (ERROR: OOM)"


def test_fbank_ratio_comes_from_the_kernel_rows_own_run():
    rows = [{**FBANK, "impl": "cuda_kernel", "median_ms": 1.0, "speedup_vs_torch_path_fp32_compiled": 2.5},
            {**FBANK, "impl": "torch_path_fp32_compiled", "median_ms": 9.0}]  # another run's row
    line = next(r for r in targets.target_rows(rows) if "torch.compile" in r["target"])
    assert line["measured"] == "2.50x" and line["verdict"] == "missed"


def test_fbank_ratio_is_never_taken_from_another_runs_compiled_row():
    # A kernel row without the ratio (older runs stored none): its own run's compiled row only.
    rows = [{**FBANK, "impl": "torch_path_fp32_compiled", "median_ms": 9.0, "results_file": "run-1"},
            {**FBANK, "impl": "cuda_kernel", "median_ms": 1.0, "clips_per_s": 6e5, "results_file": "run-2"}]
    assert _verdicts(rows)[FBANK_SPEED] == ("not measured", "no compiled torch path row in the kernel's run")
    rows.append({**FBANK, "impl": "torch_path_fp32_compiled", "median_ms": 3.0, "results_file": "run-2"})
    assert _verdicts(rows)[FBANK_SPEED] == ("missed", "3.00x")


def test_render_results_tells_a_gpu_from_a_cpu_architecture():
    from benches.render_results import is_gpu

    assert is_gpu({"device": "NVIDIA H100 80GB HBM3"}) and is_gpu({"device": "x", "device_type": "cuda"})
    assert not any(is_gpu(d) for d in ({"device": "x86_64"}, {"device": "cpu"}, {"device": "aarch64"},
                                        {"device": "Intel Xeon", "device_type": "cpu"}, {}))


def test_cpu_fbank_target_prefers_the_paired_ratio_of_the_newest_full_run():
    shape = "B=16 N=160000 F=998 bins=128"
    base = {"suite": "fbank", "impl": "torch_path", "shape": shape, "median_ms": 20.0}
    paired = dict(base, speedup_vs_torchaudio_loop=1.9, speedup_vs_torchaudio_loop_paired=2.1, paired_ratio_q1=2.0,
                  paired_ratio_q3=2.2, pairs=15)
    (line,) = targets.cpu_target_rows([paired])
    assert (line["verdict"], line["measured"]) == ("met", "2.10x (median of 15 paired calls, quartiles 2.00x to 2.20x)")
    unpaired = dict(base, speedup_vs_torchaudio_loop=1.5)
    (line,) = targets.cpu_target_rows([paired, unpaired])  # the newest row wins, said to be unpaired
    assert (line["verdict"], line["measured"]) == ("missed", "1.50x (two separate timings, not paired)")
    quick = dict(paired, shape="B=4 N=16000 F=98 bins=128")  # a quick run's shape is no target's
    assert targets.cpu_target_rows([quick]) == []
