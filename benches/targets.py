"""The issues' targets, read off measured benchmark rows: one verdict line per target.

``target_rows(rows)`` takes the rows of a GPU run (``benches/gpu_check.py``'s JSON, or several
runs' rows together) and returns ``{"issue", "target", "measured", "verdict"}`` rows: ``met``,
``missed`` or ``not measured`` (the rows it needs are absent). The issues state their targets for an
H100; rows from another GPU are judged as they are, and the device column of the run says which.
Nothing here is a figure of its own: every number is a field of a measured row.
"""
from __future__ import annotations

from typing import Callable, Iterable


def _find(rows: list[dict], **fields) -> dict | None:
    """The last row whose fields equal ``fields`` (the newest, where runs were concatenated)."""
    found = [r for r in rows if all(r.get(k) == v for k, v in fields.items()) and r.get("median_ms")]
    return found[-1] if found else None


def _verdict(value: float | None, ok: Callable[[float], bool]) -> str:
    return "not measured" if value is None else ("met" if ok(value) else "missed")


def _line(issue: int, target: str, value: float | None, ok: Callable[[float], bool], shown: str) -> dict:
    return {"issue": issue, "target": target, "measured": shown if value is not None else "", "verdict": _verdict(value, ok)}


def _token_targets(rows):
    for op, need in (("gather", 5), ("unshuffle", 20)):
        for step in ("fwd", "fwd+bwd"):
            graph = _find(rows, suite="tokens", name=f"{op} {step}", impl="kernel_graph")
            bw = graph and graph.get("fraction_of_copy_bandwidth")
            yield _line(3, f"{op} {step}: >= 80% of copy bandwidth (graph replay)", bw, lambda v: v >= 0.8,
                        f"{bw:.0%}" if bw else "")
            speed = graph and graph.get("speedup_vs_official")
            yield _line(3, f"{op} {step}: >= {need}x the official path (both graph-replayed)", speed,
                        lambda v, need=need: v >= need, f"{speed:.1f}x" if speed else "")
            # The same, every input set's call back to back in one graph: the op as a training
            # step's graph runs it, without a graph launch's gap per call.
            stream = _find(rows, suite="tokens", name=f"{op} {step}", impl="kernel_graph_back_to_back")
            bw = stream and stream.get("fraction_of_copy_bandwidth")
            yield _line(3, f"{op} {step}: >= 80% of copy bandwidth (back to back in one graph)", bw,
                        lambda v: v >= 0.8, f"{bw:.0%}" if bw else "")
            speed = stream and stream.get("speedup_vs_official")
            yield _line(3, f"{op} {step}: >= {need}x the official path (both back to back in one graph)", speed,
                        lambda v, need=need: v >= need, f"{speed:.1f}x" if speed else "")
            eager = _find(rows, suite="tokens", name=f"{op} {step}", impl="kernel_unchecked")
            speed = eager and eager.get("speedup_vs_official")
            yield _line(3, f"{op} {step}: >= {need}x the official path (both eager, as a model calls them)", speed,
                        lambda v, need=need: v >= need, f"{speed:.1f}x" if speed else "")


def _window_targets(rows):
    for step in ("fwd+bwd graph", "fwd+bwd"):
        core = _find(rows, suite="window_attention_core", impl="triton", step=step)
        how = "graph replay" if step.endswith("graph") else "eager"
        ms = core and core["median_ms"]
        ratio = core and core.get("floor_ratio")
        yield _line(4, f"core fwd+bwd ({how}): <= 3x the memory floor and <= 0.4 ms", ms,
                    lambda v, ratio=ratio: v <= 0.4 and ratio is not None and ratio <= 3,
                    f"{ms:.3f} ms, {ratio:.1f}x floor" if ms and ratio else "")
        # Equal work: FlexAttention with a frozen tau and bias against the kernel with them frozen too.
        frozen = _find(rows, suite="window_attention_core", impl="triton_frozen_bias", step=step)
        for flex, ours, note in (("flex_attention", core, ""), ("flex_attention_frozen_bias", frozen, ""),
                                 ("flex_attention_frozen_bias", core, " (the kernel still computing tau's and bias's "
                                                                      "gradients: more work than FlexAttention's)")):
            speed = ours and ours.get(f"speedup_vs_{flex}")
            yield _line(4, f"core fwd+bwd ({how}): >= 10x {flex}{note}", speed, lambda v: v >= 10,
                        f"{speed:.1f}x" if speed else "")
    for step in ("fwd+bwd graph", "fwd+bwd"):
        block = _find(rows, suite="window_attention_block", impl="triton", step=step)
        how = "both graph-replayed" if step.endswith("graph") else "both eager"
        for key, need, label in (("speedup_vs_official", 3, ">= 3x the official path"),
                                 ("speedup_vs_official_compiled", 2, ">= 2x the official path compiled")):
            speed = block and block.get(key)
            yield _line(4, f"block fwd+bwd ({how}): {label}", speed, lambda v, need=need: v >= need,
                        f"{speed:.2f}x" if speed else "")
    block = _find(rows, suite="window_attention_block", impl="triton", step="fwd+bwd")
    mem = block and block.get("peak_mem_vs_official")
    yield _line(4, "block fwd+bwd: <= 0.5x the official peak memory", mem, lambda v: v <= 0.5, f"{mem:.2f}x" if mem else "")


def _fbank_targets(rows):
    kernel = _find(rows, suite="fbank", impl="cuda_kernel")
    clips = kernel and kernel.get("clips_per_s")
    yield _line(5, "kernel: >= 500,000 clips/s (10 s clips, batch 256)", clips, lambda v: v >= 5e5,
                f"{clips:,.0f} clips/s" if clips else "")
    speed = kernel and kernel.get("speedup_vs_torch_path_fp32_compiled")
    if kernel and speed is None:  # results written before the row carried its own ratio (one run each)
        compiled = _find(rows, suite="fbank", impl="torch_path_fp32_compiled")
        speed = (compiled["median_ms"] / kernel["median_ms"]
                 if compiled and compiled.get("median_ms") and kernel.get("median_ms") else None)
    yield _line(5, "kernel: >= 4x the batched torch path under torch.compile", speed, lambda v: v >= 4,
                f"{speed:.2f}x" if speed else "")
    scratch = kernel and kernel.get("scratch_over_output")
    yield _line(5, "kernel: scratch memory <= the output", scratch, lambda v: v <= 1, f"{scratch:.2f}x the output"
                if scratch is not None else "")


# Issue 6's pretraining-step target, judged on these variants of benches/bench_models.py.
STEP_VARIANTS = ("triton", "triton+graph", "triton+compile+graph", "triton+fusedmlp+graph",
                 "triton+fusedmlp+compile+graph")


def step_target_met(speed: float, mem_fraction: float) -> bool:
    """>= 3x the reference samples/s at <= 0.5x its peak memory."""
    return speed >= 3 and mem_fraction <= 0.5


def _step_targets(rows):
    for impl in STEP_VARIANTS:
        row = _find(rows, suite="model_pretrain", impl=impl)
        speed, mem = (row.get("speedup_vs_reference"), row.get("mem_fraction_of_reference")) if row else (None, None)
        value = speed if speed is not None and mem is not None else None
        yield _line(6, f"pretraining step, {impl}: >= 3x the reference samples/s at <= 0.5x its peak memory", value,
                    lambda v, mem=mem: step_target_met(v, mem), f"{speed:.2f}x speed, {mem:.2f}x memory" if value else "")


def _mae_ast_targets(rows):
    measured = [r for r in rows if r.get("suite") == "mae_ast_pretrain_step" and r.get("impl") == "mae"
                and r.get("median_ms")]
    for r in measured:
        speed, mem = r.get("speedup_vs_ssast"), r.get("mem_ratio_vs_ssast")
        against = f" (against {r['ssast_baseline']})" if r.get("ssast_baseline") else ""
        yield _line(7, f"{r['name']}{against}: >= 3x SSAST's speed and >= 2x less memory", speed,
                    lambda v, mem=mem: v >= 3 and mem >= 2,
                    f"{speed:.2f}x speed, {mem:.2f}x less memory ({r.get('mem_ratio_measure', '')})")
    if not measured:  # no row (or only failed ones): the target is unmeasured, not absent
        yield _line(7, "MAE-AST pretraining step: >= 3x SSAST's speed and >= 2x less memory", None, lambda v: False, "")


def target_rows(rows: Iterable[dict]) -> list[dict]:
    """Verdicts on the issues' GPU targets from ``rows`` (see the module doc)."""
    rows = [r for r in rows if isinstance(r, dict)]
    out = []
    for section in (_token_targets, _window_targets, _fbank_targets, _step_targets, _mae_ast_targets):
        out += list(section(rows))
    return out


COLUMNS = [("issue", "issue"), ("target", "target"), ("measured", "measured"), ("verdict", "verdict")]
