"""Benchmark: fused shifted-window attention against the other ways PyTorch can compute it.

Suite ``window_attention_core`` (the attention alone, from the qkv projection's output to the
output projection's input, forward and forward + backward):
- ``triton``: ``kernels.window_attention``;
- ``reference`` / ``reference_compiled``: the official roll / partition / attend / reverse math,
  eager and under ``torch.compile``;
- ``flex_attention``: token order, a block mask of same-window pairs and a ``score_mod`` adding
  bias, temperature and shift mask (q and k normalised beforehand), compiled. Its backward sums the
  gradient of the [heads, N, N] bias table from every score, which FlexAttention does with atomic
  adds onto a few thousand addresses; ``flex_attention_frozen_bias`` is the same with ``tau`` and
  ``bias`` taken as constants (gradients for qkv only), FlexAttention's best case, and
  ``triton_frozen_bias`` the kernel on the same terms (it then skips its tau and bias partial sums):
  the two compare equal work;
- ``sdpa_dense_mask``: roll / partition, then SDPA on the window batch with a materialised additive
  mask (bias + shift mask) per window;
- ``xformers``: the same through ``memory_efficient_attention``, when its ops load; otherwise a row
  whose ``unavailable`` field gives the reason (not importable, no GPU, operators that do not run).
On CUDA every implementation also gets ``(graph)`` rows: the same step captured once in a CUDA
graph and replayed, which times the kernels without the host time of launching them (eager rows
are what a caller sees; at this size the launches of a few kernels cost about what they compute).
The floor is the bytes the core must move (``FLOOR_UNITS``: read q, k, v, write out; backward: read
q, k, v, dout, write dq, dk, dv) over the copy bandwidth measured in the same run; every core row
stores the units it used (``floor_units``: rows before it may have the older 12-unit fwd+bwd floor).
Every implementation's forward is checked against the float32 reference first
(``max_abs_err_vs_fp32_reference``): one off by more than its dtype's tolerance (``TOLERANCE``,
relative to the output's largest magnitude) gets ERROR rows with no timing, so that no verdict or
speed-up is taken from a wrong result.

Suite ``window_attention_block``: one decoder block's attention path (qkv Linear, attention, proj
Linear), forward + backward, the official order (roll, partition, Linear on windows, attend,
Linear, reverse, roll back) eager and compiled, against Linear -> ``window_attention`` -> Linear
(with ``overwrite_qkv``, as the decoder calls it); on CUDA eager and graph-replayed.

Target shape (issue 4): H100, bf16, B=64, grid 64x8, C=512, 16 heads, window 4x4, shift (2, 0).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benches.harness import copy_bandwidth_gbps, graphed, memory_floor_ms, peak_holders, time_fn
from kernels.reference.window_attention import (
    attend_windows, shift_window_mask, window_partition, window_reverse, window_attention_reference,
)
from kernels._dispatch import use_triton
from kernels.column_sum import linear
from kernels.window_attention import window_attention

TARGET = dict(B=64, grid=(64, 8), num_heads=16, head_dim=32, window=(4, 4), shift=(2, 0))
SMALL = dict(B=2, grid=(8, 8), num_heads=2, head_dim=16, window=(4, 4), shift=(2, 0))
MASK_VALUE = -100.0


# [B, L, C]-sized tensors the core moves at least: the forward reads q, k, v and writes out; the
# backward reads q, k, v and dout and writes dq, dk, dv. (Not out: where each window fits one tile,
# as at the target shape, the backward takes the softmax correction from the tile.)
FLOOR_UNITS = {"fwd": 4, "fwd+bwd": 11}

# Largest error of an implementation's forward against the float32 reference on the same inputs,
# relative to the reference output's largest magnitude. bf16 keeps 8 significant bits (a rounding
# is up to 0.4 %) and the attention rounds several intermediates: the committed H100 and H200 runs
# hold 0.3 % (triton) to 0.6 % (the official math in bf16) at the target shape, where the output
# peaks at 2.4. fp16 keeps 3 bits more; fp32 runs agree to 1e-7 (CPU runs, 2026-11-27). The bars
# sit over 3x above those errors (a baseline refused for rounding would take every ratio with it);
# a wrong kernel is off by the output's own size.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def _config(device: torch.device) -> dict:
    return TARGET if device.type == "cuda" else SMALL


def _shape(cfg) -> str:
    (T, F_), (wt, wf), (st, sf) = cfg["grid"], cfg["window"], cfg["shift"]
    return (f"B={cfg['B']} grid={T}x{F_} C={cfg['num_heads'] * cfg['head_dim']} heads={cfg['num_heads']} "
            f"window={wt}x{wf} shift=({st},{sf})")


def _core_inputs(cfg, device, dtype):
    B, (T, F_), H, D, (wt, wf) = cfg["B"], cfg["grid"], cfg["num_heads"], cfg["head_dim"], cfg["window"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T * F_, 3 * H * D, generator=gen).to(device, dtype).requires_grad_()
    tau = (torch.rand(H, generator=gen) * 0.5 + 0.5).to(device, dtype).requires_grad_()
    bias = (torch.randn(H, wt * wf, wt * wf, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    return qkv, tau, bias


def _token_layout(cfg, device):
    """Per token of the (T, F) grid: its window, its position inside the window and its shift region."""
    (T, F_), (wt, wf), (st, sf) = cfg["grid"], cfg["window"], cfg["shift"]
    t = torch.arange(T * F_, device=device) // F_
    f = torch.arange(T * F_, device=device) % F_
    x, y = (t - st) % T, (f - sf) % F_
    window_id = (x // wt) * (F_ // wf) + y // wf
    pos = (x % wt) * wf + y % wf
    region = ((x >= T - wt).int() + (x >= T - st).int()) * 3 + (y >= F_ - wf).int() + (y >= F_ - sf).int()
    return window_id, pos, region


def _split_heads(qkv, num_heads):
    """[B, L, 3*C] -> q, k, v [B, heads, L, head_dim]."""
    B, L, C3 = qkv.shape
    return qkv.view(B, L, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _flex_attention(cfg, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window_id, pos, region = _token_layout(cfg, device)
    L = window_id.numel()
    block_mask = create_block_mask(lambda b, h, q, kv: window_id[q] == window_id[kv], None, None, L, L,
                                   device=device)

    def run(qkv, tau, bias):
        q, k, v = _split_heads(qkv, cfg["num_heads"])
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        inv_tau = 1.0 / tau.clamp(min=0.01)

        def score_mod(score, b, h, q_idx, kv_idx):
            score = score * inv_tau[h] + bias[h, pos[q_idx], pos[kv_idx]]
            return torch.where(region[q_idx] != region[kv_idx], score + MASK_VALUE, score)

        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
        return out.transpose(1, 2).reshape(qkv.shape[0], L, -1)

    # Compiled whole, as a model would be: eager flex_attention materialises the scores.
    return torch.compile(run) if device.type == "cuda" else run


def _windowed(cfg, attend):
    """roll, partition, ``attend(q, k, v, mask [B*windows, heads, N, N])``, reverse, roll back."""
    (T, F_), window, shift = cfg["grid"], cfg["window"], cfg["shift"]
    H, area = cfg["num_heads"], window[0] * window[1]

    def run(qkv, tau, bias):
        B, L, C3 = qkv.shape
        x = torch.roll(qkv.view(B, T, F_, C3), shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = window_partition(x, window).view(-1, area, C3)
        q, k, v = x.view(-1, area, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-6) / tau.clamp(min=0.01).view(1, H, 1, 1)
        k = F.normalize(k, dim=-1, eps=1e-6)
        shift_mask = shift_window_mask((T, F_), window, shift, MASK_VALUE, device=qkv.device, dtype=qkv.dtype)
        mask = (bias.unsqueeze(0) + shift_mask.unsqueeze(1)).expand(B, -1, -1, -1, -1).reshape(-1, H, area, area)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(-1, *window, C3 // 3)
        out = torch.roll(window_reverse(out, window, (T, F_)), shifts=shift, dims=(1, 2))
        return out.reshape(B, L, C3 // 3)

    return run


def _frozen(fn):
    """``fn`` with ``tau`` and ``bias`` as constants: their gradients are not asked for."""
    return lambda qkv, tau, bias: fn(qkv, tau.detach(), bias.detach())


def _sdpa(cfg, device):
    return _windowed(cfg, lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))


def _xformers(cfg, device):
    """The windowed path through xformers; raises with the reason when its ops do not load (the
    model backend's own check: not importable, no CUDA device, or CUDA operators that do not run)."""
    from audiomae.backends import xformers_status

    available, reason = xformers_status()
    if not available:
        raise RuntimeError(reason)
    import xformers.ops as xops

    def attend(q, k, v, mask):
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=mask, scale=1.0)
        return out.transpose(1, 2)

    probe = torch.randn(1, 1, 16, 16, device=device, dtype=torch.bfloat16)
    attend(probe, probe, probe, torch.zeros(1, 1, 16, 16, device=device, dtype=torch.bfloat16))
    return _windowed(cfg, attend)


def _core_impls(cfg, device):
    """name -> (factory of fn(qkv, tau, bias) -> out). CPU runs skip the compiled ones."""
    args = dict(grid=cfg["grid"], window=cfg["window"], shift=cfg["shift"], num_heads=cfg["num_heads"],
                mask_value=MASK_VALUE)
    impls = {
        "triton": lambda: lambda qkv, tau, bias: window_attention(qkv, tau=tau, bias=bias, **args),
        "triton_frozen_bias": lambda: _frozen(lambda qkv, tau, bias: window_attention(qkv, tau=tau, bias=bias, **args)),
        "reference": lambda: lambda qkv, tau, bias: window_attention_reference(qkv, tau=tau, bias=bias, **args),
        "flex_attention": lambda: _flex_attention(cfg, device),
        "flex_attention_frozen_bias": lambda: _frozen(_flex_attention(cfg, device)),
        "sdpa_dense_mask": lambda: _sdpa(cfg, device),
    }
    if device.type == "cuda":
        impls["reference_compiled"] = lambda: torch.compile(impls["reference"]())
    impls["xformers"] = lambda: _xformers(cfg, device)  # a row that says why when it cannot run
    return impls


def _timings(device, quick):
    return dict(warmup=2, reps=5) if device.type != "cuda" else dict(warmup=5, reps=20 if quick else 50)


def _core_rows(device, quick, dtype):
    cfg = _config(device)
    B, L, C = cfg["B"], cfg["grid"][0] * cfg["grid"][1], cfg["num_heads"] * cfg["head_dim"]
    qkv, tau, bias = _core_inputs(cfg, device, dtype)
    grad = torch.randn(B, L, C, device=device, dtype=dtype)
    with torch.no_grad():
        expected = window_attention_reference(qkv.float(), tau=tau.float(), bias=bias.float(), grid=cfg["grid"],
                                              window=cfg["window"], shift=cfg["shift"],
                                              num_heads=cfg["num_heads"], mask_value=MASK_VALUE)
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32]) * expected.abs().max().item()
    unit = B * L * C * dtype.itemsize
    floors = {step: memory_floor_ms(units * unit, str(device)) for step, units in FLOOR_UNITS.items()}
    base = dict(suite="window_attention_core", shape=_shape(cfg), dtype=str(dtype).removeprefix("torch."),
                device=str(device), copy_bandwidth_gbps=copy_bandwidth_gbps(str(device)),
                triton_runs_on="triton" if use_triton(qkv) else "eager reference")
    rows, graph_steps, triton_step = [], [], None
    detached = tuple(t.detach() for t in (qkv, tau, bias))
    for name, factory in _core_impls(cfg, device).items():
        try:
            fn = factory()
            err = (fn(*detached).float() - expected).abs().max().item()
        except Exception as e:  # reported, not hidden: the row says why this impl has no figure
            rows.append(dict(base, impl=name, name=name, median_ms=None, peak_mem_bytes=None, unavailable=_reason(e)))
            continue
        steps = {
            "fwd": lambda fn=fn: fn(*detached),
            # allow_unused: the frozen-bias variant does not use tau's and bias's gradients
            "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(qkv, tau, bias), (qkv, tau, bias), grad, allow_unused=True),
        }
        if name == "triton":
            triton_step = steps["fwd+bwd"]
        if name in ("flex_attention_frozen_bias", "triton_frozen_bias"):
            del steps["fwd"]  # on detached inputs it is the unfrozen twin's forward, timed above
        for step_name, step in steps.items():
            row = dict(base, impl=name, name=f"{name} {step_name}", step=step_name, floor_ms=floors[step_name],
                       floor_units=FLOOR_UNITS[step_name], max_abs_err_vs_fp32_reference=err,
                       tolerance_vs_fp32_reference=tolerance)
            graph_row = dict(row, name=f"{row['name']} (graph)", step=f"{step_name} graph")
            if not err <= tolerance:  # NaN too: a wrong result is timed by no row
                rows += [_wrong(row)] + ([_wrong(graph_row)] if device.type == "cuda" else [])
                continue
            rows.append(_measure(row, step, device, quick))
            if device.type == "cuda":
                graph_steps.append((graph_row, step))
    # Captured last, so that a capture that fails cannot disturb the eager rows.
    rows += [_measure(row, step, device, quick, capture=True) for row, step in graph_steps]
    _add_peak_holders(rows, {"triton": triton_step} if triton_step else {}, device)
    _add_ratios(rows, {"reference": "speedup_vs_reference", "flex_attention": "speedup_vs_flex_attention",
                       "flex_attention_frozen_bias": "speedup_vs_flex_attention_frozen_bias"})
    return rows


def _wrong(row: dict) -> dict:
    """``row`` as an ERROR row without a timing: its forward is off the float32 reference by more
    than its dtype's tolerance."""
    return dict(row, median_ms=None, peak_mem_bytes=None, status="ERROR",
                note=f"max abs error {row['max_abs_err_vs_fp32_reference']:.3g} vs the float32 reference exceeds "
                     f"the tolerance {row['tolerance_vs_fp32_reference']:.3g} ({row['dtype']}): not timed")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _measure(row: dict, step, device, quick, capture: bool = False) -> dict:
    """``row`` with the timing of ``step`` (replayed from a CUDA graph when ``capture``) and, when
    the row has a ``floor_ms``, its ``floor_ratio``; or with why it could not run (failures are
    reported). A replay allocates nothing, so graph rows carry no peak memory."""
    try:
        t = time_fn(graphed(step) if capture else step, device, measure_memory=not capture, **_timings(device, quick))
    except Exception as e:
        return dict(row, median_ms=None, peak_mem_bytes=None, unavailable=_reason(e))
    row = dict(row, median_ms=t.median_ms, min_ms=t.min_ms, peak_mem_bytes=t.peak_mem_bytes)
    if "floor_ms" in row:
        row["floor_ratio"] = t.median_ms / row["floor_ms"]
    return row


def _add_peak_holders(rows, steps, device):
    """On a GPU, ``peak_holders`` on the eager fwd+bwd row of each impl in ``steps``: the largest
    allocations live at its peak and where each was made (``benches.harness.peak_holders``), to
    check the peak against what the path should keep."""
    if device.type != "cuda":
        return
    for r in rows:
        if r.get("step") == "fwd+bwd" and r["impl"] in steps and r.get("peak_mem_bytes") is not None:
            try:
                # C++ frames too: the allocations the autograd engine makes have no Python frame
                # (seconds to symbolize; on the H200 2.8 s for the triton block, 1.0 for the official)
                r["peak_holders"] = peak_holders(steps[r["impl"]], device, cpp=True)
            except Exception as e:  # a diagnostic: its failure is reported, the row keeps its figures
                r["peak_holders"] = [f"unavailable: {_reason(e)}"]


def _add_ratios(rows, baselines):
    """Speed-up of every row over each baseline impl measured in the same run, step for step."""
    for baseline, key in baselines.items():
        ref = {r["step"]: r["median_ms"] for r in rows if r["impl"] == baseline and r.get("median_ms")}
        for r in rows:
            if r.get("median_ms") and r.get("step") in ref:
                r[key] = ref[r["step"]] / r["median_ms"]


class _AttentionPath(torch.nn.Module):
    """One decoder block's attention path: qkv Linear, shifted-window attention, proj Linear."""

    def __init__(self, cfg):
        super().__init__()
        H, C, (wt, wf) = cfg["num_heads"], cfg["num_heads"] * cfg["head_dim"], cfg["window"]
        self.cfg = cfg
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.proj = torch.nn.Linear(C, C)
        self.tau = torch.nn.Parameter(torch.ones(H))
        self.bias = torch.nn.Parameter(torch.randn(H, wt * wf, wt * wf) * 0.5)

    def official(self, x):
        """The official order: roll and partition the block input, project each window."""
        (T, F_), window, shift, H = self.cfg["grid"], self.cfg["window"], self.cfg["shift"], self.cfg["num_heads"]
        B, L, C = x.shape
        x = torch.roll(x.view(B, T, F_, C), shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = window_partition(x, window).view(-1, window[0] * window[1], C)
        mask = shift_window_mask((T, F_), window, shift, MASK_VALUE, device=x.device, dtype=x.dtype)
        x = self.proj(attend_windows(self.qkv(x), num_heads=H, tau=self.tau, bias=self.bias, mask=mask))
        x = window_reverse(x.view(-1, *window, C), window, (T, F_))
        return torch.roll(x, shifts=shift, dims=(1, 2)).reshape(B, L, C)

    def fused(self, x):
        cfg = self.cfg
        # As the decoder calls it (audiomae.swin.WindowMultiHeadAttention on the triton backend):
        # qkv is read by nothing else, so its gradient may take its memory, and the Linears take
        # their bias gradients from kernels.column_sum, without torch's staging buffer.
        out = window_attention(linear(x, self.qkv.weight, self.qkv.bias), grid=cfg["grid"], window=cfg["window"],
                               shift=cfg["shift"], num_heads=cfg["num_heads"], tau=self.tau, bias=self.bias,
                               mask_value=MASK_VALUE, overwrite_qkv=True)
        return linear(out, self.proj.weight, self.proj.bias)


def _block_rows(device, quick, dtype):
    cfg = _config(device)
    B, L, C = cfg["B"], cfg["grid"][0] * cfg["grid"][1], cfg["num_heads"] * cfg["head_dim"]
    torch.manual_seed(0)
    path = _AttentionPath(cfg).to(device, dtype)
    x = torch.randn(B, L, C, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, L, C, device=device, dtype=dtype)
    params = (x, *path.parameters())
    impls = {"official": path.official, "triton": path.fused}
    if device.type == "cuda":
        impls["official_compiled"] = torch.compile(path.official)
    base = dict(suite="window_attention_block", shape=_shape(cfg), dtype=str(dtype).removeprefix("torch."),
                device=str(device))
    steps = {name: lambda fn=fn: torch.autograd.grad(fn(x), params, grad) for name, fn in impls.items()}
    rows = [_measure(dict(base, impl=name, name=f"block {name} fwd+bwd", step="fwd+bwd"), step, device, quick)
            for name, step in steps.items()]
    if device.type == "cuda":
        # Graph-replayed too (captured last, as for the core): the eager triton block is mostly
        # the host's launch time, which differs from machine to machine (0.98 and 1.99 ms on two
        # H100 machines for the same kernels); a replay times the kernels alone, as the graphed
        # training step runs them.
        rows += [_measure(dict(base, impl=name, name=f"block {name} fwd+bwd (graph)", step="fwd+bwd graph"), step,
                          device, quick, capture=True) for name, step in steps.items()]
    _add_ratios(rows, {"official": "speedup_vs_official", "official_compiled": "speedup_vs_official_compiled"})
    _add_peak_holders(rows, {name: steps[name] for name in ("official", "triton")}, device)
    for r in rows:
        for other in ("official", "official_compiled"):
            peak = next((o["peak_mem_bytes"] for o in rows if o["impl"] == other and o.get("peak_mem_bytes")), None)
            if peak and r.get("peak_mem_bytes") is not None:
                r[f"peak_mem_vs_{other}"] = r["peak_mem_bytes"] / peak
    return rows


def run(device, quick: bool) -> list[dict]:
    """Every row of both suites on ``device`` (bf16 on CUDA, fp32 on the CPU, small shapes there)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return _core_rows(device, quick, dtype) + _block_rows(device, quick, dtype)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "reference", "reference_compiled", "flex_attention", "sdpa_dense_mask"])
def test_core_fwd_bwd(benchmark, impl):
    device = torch.device("cuda")
    inputs = _core_inputs(TARGET, device, torch.bfloat16)
    grad = torch.randn(inputs[0].shape[:2] + (inputs[0].shape[2] // 3,), device=device, dtype=torch.bfloat16)
    fn = _core_impls(TARGET, device)[impl]()

    def step():
        torch.autograd.grad(fn(*inputs), inputs, grad)
        torch.cuda.synchronize()

    benchmark(step)


@needs_cuda
@pytest.mark.parametrize("impl", ["official", "official_compiled", "triton"])
def test_block_fwd_bwd(benchmark, impl):
    device = torch.device("cuda")
    path = _AttentionPath(TARGET).to(device, torch.bfloat16)
    fn = {"official": path.official, "official_compiled": torch.compile(path.official), "triton": path.fused}[impl]
    B, L, C = TARGET["B"], TARGET["grid"][0] * TARGET["grid"][1], TARGET["num_heads"] * TARGET["head_dim"]
    x = torch.randn(B, L, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        torch.autograd.grad(fn(x), (x, *path.parameters()), grad)
        torch.cuda.synchronize()

    benchmark(step)
