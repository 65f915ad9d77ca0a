"""The issues' targets, read off measured benchmark rows: one verdict line per target.

``target_rows(rows)`` takes the rows of a GPU run (``benches/gpu_check.py``'s JSON), or several
runs' rows together, oldest run first, each stamped with its results file by ``stamp_run``; it
returns ``{"issue", "target", "measured", "verdict"}`` rows: ``met``, ``missed`` or ``not
measured``. The issues state their targets for an H100; rows from another GPU are judged as they
are, and the device column of the run says which. Nothing here is a figure of its own: every
number is a field of a measured row.

Which row a target reads: the newest row of the target's own workload (its suite, impl and step,
at the shape the issue names: a row at another batch size never counts) from a full run (a
``quick`` run's rows never count). Where that newest row failed (ERROR or SKIP, no timing), the
target is not measured in its latest run and its line says so: an older run's figure never
stands in for it.
"""
from __future__ import annotations

from typing import Callable, Iterable

# The issues' target workloads as the benchmarks write their ``shape``: every word here must be a
# word of a row's shape for the row to count.
TOKEN_SHAPES = {"gather": "B=64 L=512 K=102 C=768", "unshuffle": "B=64 L=512 K=102 C=512"}  # issue 3
WINDOW_SHAPE = "B=64 grid=64x8 C=512 heads=16 window=4x4 shift=(2,0)"  # issue 4
FBANK_SHAPE = "B=256 N=160000 bins=128"  # issue 5: 256 ten-second 16 kHz clips, 128 bins
CPU_FBANK_SHAPE = "B=16 N=160000 bins=128"  # issue 5's CPU target: bench_fbank's full CPU workload
PRETRAIN_SHAPE, PRETRAIN_BATCH = "B=64 1024x128 base", 64  # issue 6: mae_vit_base_patch16, batch 64
MAE_AST_SHAPE = "B32xT1024x128"  # issue 7: batch 32, ten-second clips

FAILED = ("ERROR", "SKIP", "FAIL", "TIMEOUT")
L2_ASSISTED = ", same inputs every call (L2-assisted)"
OLD_FLOOR = " (floor units not recorded: may be the older 12-unit floor)"


def stamp_run(rows: Iterable[dict], results_file: str, quick: bool) -> list[dict]:
    """Copies of one results file's rows, each naming its file and whether the run was quick."""
    return [dict(r, results_file=results_file, quick_run=bool(quick)) for r in rows if isinstance(r, dict)]


def _counts(row: dict, shape: str, fields: dict) -> bool:
    """Whether ``row`` is one of the target's: its fields, the issue's shape, a full run."""
    return (not row.get("quick_run") and all(row.get(k) == v for k, v in fields.items())
            and set(shape.split()) <= set(str(row.get("shape") or "").split()))


def _candidates(rows: list[dict], shape: str, **fields) -> list[dict]:
    """Every row of the target, timed or failed, oldest run first."""
    return [r for r in rows if _counts(r, shape, fields)]


def _find(rows: list[dict], shape: str, **fields) -> dict | None:
    """The target's newest row (the last: runs are concatenated oldest first), timed or failed: a
    failed one stands for its run, so that no older run's figure replaces it."""
    found = _candidates(rows, shape, **fields)
    return found[-1] if found else None


def _timed(row: dict | None) -> bool:
    return bool(row and row.get("median_ms")) and row.get("status") not in FAILED


def _field(row: dict | None, key: str):
    """``row[key]`` of a timed row; None for a missing or failed one."""
    return row.get(key) if _timed(row) else None


def _newest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run among ``rows`` (all of them where none names its results file)."""
    return [r for r in rows if r.get("results_file") == rows[-1].get("results_file")] if rows else []


def _verdict(value: float | None, ok: Callable[[float], bool]) -> str:
    return "not measured" if value is None else ("met" if ok(value) else "missed")


def _unmeasured(row: dict) -> str:
    """The measured column of a target whose newest row failed: which run, and why."""
    why = str(row.get("note") or row.get("unavailable") or row.get("error") or "").split("\n")[0][:100]
    run = f", {row['results_file']}" if row.get("results_file") else ""
    return f"not measured in its latest run{run} ({row.get('status') or 'no timing'}{': ' + why if why else ''})"


def _line(issue: int, target: str, value: float | None, ok: Callable[[float], bool], shown: str,
          row: dict | None = None) -> dict:
    """One verdict; where ``row`` (the target's newest) failed, the measured column says so."""
    if value is None and row is not None and not _timed(row):
        shown = _unmeasured(row)
    return {"issue": issue, "target": target, "measured": shown, "verdict": _verdict(value, ok)}


def _inputs_note(row: dict | None) -> str:
    """Token rows timed before every call took a fresh input set carry no ``input_sets``: each
    call re-read inputs the previous one left in the L2."""
    return "" if row is None or row.get("input_sets") else L2_ASSISTED


def _token_lines(rows, op: str, step: str, need: float):
    """Issue 3's lines for one op and pass: copy bandwidth and speed-up, graph-replayed and eager."""
    def find(impl):
        return _find(rows, TOKEN_SHAPES[op], suite="tokens", name=f"{op} {step}", impl=impl)

    # back to back: every input set's call in one graph, the op as a training step's graph runs
    # it, without a graph launch's gap per call
    back_to_back = "back to back in one graph"
    for impl, how, both in (("kernel_graph", "graph replay", "both graph-replayed"),
                            ("kernel_graph_back_to_back", back_to_back, f"both {back_to_back}")):
        row = find(impl)
        bw, speed = _field(row, "fraction_of_copy_bandwidth"), _field(row, "speedup_vs_official")
        yield _line(3, f"{op} {step}: >= 80% of copy bandwidth ({how})", bw, lambda v: v >= 0.8,
                    f"{bw:.0%}{_inputs_note(row)}" if bw else "", row)
        yield _line(3, f"{op} {step}: >= {need}x the official path ({both})", speed, lambda v: v >= need,
                    f"{speed:.1f}x{_inputs_note(row)}" if speed else "", row)
    eager = find("kernel_unchecked")
    speed = _field(eager, "speedup_vs_official")
    yield _line(3, f"{op} {step}: >= {need}x the official path (both eager, as a model calls them)", speed,
                lambda v: v >= need, f"{speed:.1f}x{_inputs_note(eager)}" if speed else "", eager)


def _token_targets(rows):
    for op, need in (("gather", 5), ("unshuffle", 20)):
        for step in ("fwd", "fwd+bwd"):
            yield from _token_lines(rows, op, step, need)


# The FlexAttention comparisons of issue 4's core target: (kernel impl, FlexAttention's ratio on
# its row, what the line compares). FlexAttention learning the bias sums its gradient by atomic
# adds (its backward takes ~352 ms); frozen, it computes qkv's gradients only.
FLEX_COMPARISONS = (
    ("triton", "speedup_vs_flex_attention",
     "FlexAttention, both learning tau and bias (triton vs flex_attention, whose bias gradient takes atomic adds)"),
    ("triton_frozen_bias", "speedup_vs_flex_attention_frozen_bias",
     "FlexAttention, both with tau and bias frozen: equal work (triton_frozen_bias vs flex_attention_frozen_bias)"),
    ("triton", "speedup_vs_flex_attention_frozen_bias",
     "FlexAttention with tau and bias frozen, the kernel still learning them: more work than FlexAttention's "
     "(triton vs flex_attention_frozen_bias)"),
)


def _window_core_lines(rows, step):
    """Issue 4's core lines for one step (eager or replayed): the floor, and each FlexAttention comparison."""
    how = "graph replay" if step.endswith("graph") else "eager"
    core = _find(rows, WINDOW_SHAPE, suite="window_attention_core", impl="triton", step=step)
    ms, ratio = _field(core, "median_ms"), _field(core, "floor_ratio")
    floor_note = OLD_FLOOR if core and "floor_units" not in core else ""
    yield _line(4, f"core fwd+bwd ({how}): <= 3x the memory floor and <= 0.4 ms", ms,
                lambda v: v <= 0.4 and ratio is not None and ratio <= 3,
                f"{ms:.3f} ms, {ratio:.1f}x floor{floor_note}" if ms and ratio else "", core)
    # Every comparison in the core row's run: the frozen kernel's row of another run would pair
    # this run's lines with another run's figures.
    same_run = {"results_file": core["results_file"]} if core and "results_file" in core else {}
    for impl, key, compared in FLEX_COMPARISONS:
        ours = core if impl == "triton" else _find(rows, WINDOW_SHAPE, suite="window_attention_core", impl=impl,
                                                    step=step, **same_run)
        speed = _field(ours, key)
        absent = f"no {impl} row in that run" if core and ours is None else ""
        yield _line(4, f"core fwd+bwd ({how}): >= 10x {compared}", speed, lambda v: v >= 10,
                    f"{speed:.1f}x" if speed else absent, ours)


def _window_targets(rows):
    for step in ("fwd+bwd graph", "fwd+bwd"):
        yield from _window_core_lines(rows, step)
    for step in ("fwd+bwd graph", "fwd+bwd"):
        block = _find(rows, WINDOW_SHAPE, suite="window_attention_block", impl="triton", step=step)
        how = "both graph-replayed" if step.endswith("graph") else "both eager"
        for key, need, label in (("speedup_vs_official", 3, ">= 3x the official path"),
                                 ("speedup_vs_official_compiled", 2, ">= 2x the official path compiled")):
            speed = _field(block, key)
            yield _line(4, f"block fwd+bwd ({how}): {label}", speed, lambda v, need=need: v >= need,
                        f"{speed:.2f}x" if speed else "", block)
    block = _find(rows, WINDOW_SHAPE, suite="window_attention_block", impl="triton", step="fwd+bwd")
    mem = _field(block, "peak_mem_vs_official")
    yield _line(4, "block fwd+bwd: <= 0.5x the official peak memory", mem, lambda v: v <= 0.5,
                f"{mem:.2f}x" if mem else "", block)


def _fbank_targets(rows):
    kernel = _find(rows, FBANK_SHAPE, suite="fbank", impl="cuda_kernel")
    clips = _field(kernel, "clips_per_s")
    yield _line(5, "kernel: >= 500,000 clips/s (10 s clips, batch 256)", clips, lambda v: v >= 5e5,
                f"{clips:,.0f} clips/s" if clips else "", kernel)
    # Both measured in the kernel row's run: the ratio it carries, else its run's compiled row
    # (older runs stored no ratio), never a compiled row of another run.
    speed = _field(kernel, "speedup_vs_torch_path_fp32_compiled")
    if speed is None and _timed(kernel):
        same_run = [r for r in rows if r.get("results_file") == kernel.get("results_file")]
        compiled = _find(same_run, FBANK_SHAPE, suite="fbank", impl="torch_path_fp32_compiled")
        if _timed(compiled):
            speed = compiled["median_ms"] / kernel["median_ms"]
    yield _line(5, "kernel: >= 4x the batched torch path under torch.compile", speed, lambda v: v >= 4,
                f"{speed:.2f}x" if speed else "no compiled torch path row in the kernel's run" if kernel else "",
                kernel)
    scratch = _field(kernel, "scratch_over_output")
    yield _line(5, "kernel: scratch memory <= the output", scratch, lambda v: v <= 1, f"{scratch:.2f}x the output"
                if scratch is not None else "", kernel)


# Issue 6's pretraining-step target, judged on these variants of benches/bench_models.py.
STEP_VARIANTS = ("triton", "triton+graph", "triton+compile+graph", "triton+fusedmlp+graph",
                 "triton+fusedmlp+compile+graph")


def step_target_met(speed: float, mem_fraction: float) -> bool:
    """>= 3x the reference samples/s at <= 0.5x its peak memory."""
    return speed >= 3 and mem_fraction <= 0.5


def _step_targets(rows):
    for impl in STEP_VARIANTS:
        row = _find(rows, PRETRAIN_SHAPE, suite="model_pretrain", impl=impl, batch=PRETRAIN_BATCH)
        speed, mem = _field(row, "speedup_vs_reference"), _field(row, "mem_fraction_of_reference")
        value = speed if speed is not None and mem is not None else None
        yield _line(6, f"pretraining step, {impl}: >= 3x the reference samples/s at <= 0.5x its peak memory", value,
                    lambda v, mem=mem: step_target_met(v, mem),
                    f"{speed:.2f}x speed, {mem:.2f}x memory" if value else "", row)


def _mae_ast_memory(row: dict, ratio: float) -> str:
    """How much less memory, and of what: CUDA-graph rows have no measured peak, and bench_mae_ast
    compares the activation bytes a hook counts instead."""
    if row.get("mem_ratio_measure") == "saved_activation_bytes":
        return f"{ratio:.2f}x fewer saved activation bytes (counted by a hook, not a measured peak)"
    measure = "measured peak" if row.get("mem_ratio_measure") == "peak_mem_bytes" else row.get("mem_ratio_measure")
    return f"{ratio:.2f}x less memory ({measure or 'measure not recorded'})"


def _mae_ast_targets(rows):
    cases = _newest_run(_candidates(rows, MAE_AST_SHAPE, suite="mae_ast_pretrain_step", impl="mae"))
    for r in {r.get("name"): r for r in cases}.values():  # one line per case: its last row in that run
        speed, mem = _field(r, "speedup_vs_ssast"), _field(r, "mem_ratio_vs_ssast")
        value = speed if speed is not None and mem is not None else None
        against = f" (against {r['ssast_baseline']})" if r.get("ssast_baseline") else ""
        yield _line(7, f"{r.get('name')}{against}: >= 3x SSAST's speed and >= 2x less memory", value,
                    lambda v, mem=mem: v >= 3 and mem >= 2,
                    f"{speed:.2f}x speed, {_mae_ast_memory(r, mem)}" if value is not None else "", r)
    if not cases:  # no row: the target is unmeasured, not absent
        yield _line(7, "MAE-AST pretraining step: >= 3x SSAST's speed and >= 2x less memory", None, lambda v: False, "")


def cpu_target_rows(rows: Iterable[dict]) -> list[dict]:
    """Issue 5's CPU target (the batched torch path at least 2x torchaudio's per-clip loop on the
    same threads) from the newest full CPU run's rows: the paired ratio where the row has it (the
    median of back-to-back pairs, which a shared CPU's drift does not bias), else the one ratio of
    two separate timings, said so."""
    rows = [r for r in rows if isinstance(r, dict)]
    path = _find(rows, CPU_FBANK_SHAPE, suite="fbank", impl="torch_path")
    paired = _field(path, "speedup_vs_torchaudio_loop_paired")
    ratio = paired if paired is not None else _field(path, "speedup_vs_torchaudio_loop")
    if paired is not None:
        shown = (f"{paired:.2f}x (median of {path.get('pairs')} paired calls, quartiles "
                 f"{path['paired_ratio_q1']:.2f}x to {path['paired_ratio_q3']:.2f}x)")
    else:
        shown = f"{ratio:.2f}x (two separate timings, not paired)" if ratio is not None else ""
    return [_line(5, "torch path on the CPU: >= 2x torchaudio's per-clip loop on the same threads", ratio,
                  lambda v: v >= 2, shown, path)] if path is not None else []


def target_rows(rows: Iterable[dict]) -> list[dict]:
    """Verdicts on the issues' GPU targets from ``rows`` (see the module doc)."""
    rows = [r for r in rows if isinstance(r, dict)]
    out = []
    for section in (_token_targets, _window_targets, _fbank_targets, _step_targets, _mae_ast_targets):
        out += list(section(rows))
    return out


COLUMNS = [("issue", "issue"), ("target", "target"), ("measured", "measured"), ("verdict", "verdict")]
