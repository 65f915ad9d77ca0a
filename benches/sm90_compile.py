"""Compile every Triton launch for the H100 (sm_90) without a GPU, and report what each needs.

The interpreter proves a kernel's arithmetic on the CPU, but it accepts programs the compiler
rejects (layouts, dtypes of ``tl.dot`` operands, shared memory past the SM's 227 KiB) and says
nothing of registers. This module runs the real launchers under a stand-in driver that claims an
sm_90 target: every ``kernel[grid](...)`` compiles through Triton's full pipeline to a cubin (the
same cache key, options and specialisation a GPU launch would use) and is then not launched. The
cubin's resource usage comes from ``cuobjdump``, which ships with Triton.

``python -m benches.sm90_compile [--cases NAME ...] [--json PATH]`` prints one row per compiled
kernel: shared memory, registers per thread, stack (register spills) and warps. It must run in its
own process with ``TRITON_INTERPRET`` unset, before ``kernels`` is imported: the test in
``tests/test_sm90_compile.py`` starts it that way. Outputs of the launches are never written, so
only their shapes and the launch arguments mean anything.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

H100_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may opt into on sm_90


@dataclasses.dataclass
class CompiledLaunch:
    case: str
    kernel: str
    shared_bytes: int
    registers: int
    stack_bytes: int
    num_warps: int
    num_stages: int
    constants: dict


class _Sm90Driver:
    """Just what ``JITFunction.run`` asks of the active driver before it compiles."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _cuobjdump() -> str:
    """The cuobjdump that ships in Triton's wheel, else the CUDA toolkit's on the PATH."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: neither in Triton's wheel nor on the PATH")
    return found


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    registers, stack = re.search(r"REG:(\d+)\s+STACK:(\d+)", text).groups()
    return int(registers), int(stack)


@contextlib.contextmanager
def compile_only(case_name: list[str]):
    """Inside, a Triton launch compiles for sm_90 and records a ``CompiledLaunch`` instead of running.
    ``case_name[0]`` labels the records (a list, so the caller can relabel between launches)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("sm90_compile needs TRITON_INTERPRET unset before kernels are imported")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import kernels._dispatch as dispatch

    records: list[CompiledLaunch] = []
    original_run, original_interpreting = JITFunction.run, dispatch.interpreting
    original_driver = driver._active  # None until a real driver is asked for; there may be none

    def run(self, *args, grid, warmup, **kwargs):
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        registers, stack = resource_usage(compiled.asm["cubin"])
        bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        constants = {name: value for name, value in bound.arguments.items()
                     if self.params[self.arg_names.index(name)].is_constexpr}
        records.append(CompiledLaunch(case_name[0], self.fn.__name__, compiled.metadata.shared, registers, stack,
                                      compiled.metadata.num_warps, compiled.metadata.num_stages, constants))
        return compiled

    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    dispatch.interpreting = lambda: True  # CPU tensors take the kernels' launchers
    try:
        yield records
    finally:
        JITFunction.run, dispatch.interpreting = original_run, original_interpreting
        driver._active = original_driver


# ---- the launches ---------------------------------------------------------------------------------

def _tokens_case(dtype, B, L, K, C, pos=True, pos_grad=True):
    import torch

    import kernels
    x = torch.randn(B, L, C, dtype=dtype, requires_grad=True)
    pos_embed = torch.randn(1, L, C, dtype=dtype, requires_grad=pos_grad) if pos else None
    ids = torch.rand(B, L).argsort(1)
    kept = kernels.gather_tokens(x, ids[:, :K], pos_embed)
    kept.backward(torch.randn_like(kept))
    restore = ids.argsort(1)
    y = torch.randn(B, K, C, dtype=dtype, requires_grad=True)
    mask = torch.randn(C, dtype=dtype, requires_grad=True)
    full = kernels.unshuffle_tokens(y, restore, mask, pos_embed)
    full.backward(torch.randn_like(full))


def _window_case(dtype, B, grid, window, shift, heads, head_dim, tau=True, bias=True, frozen=False):
    import torch

    import kernels
    qkv = torch.randn(B, grid[0] * grid[1], 3 * heads * head_dim, dtype=dtype, requires_grad=True)
    area = window[0] * window[1]
    # frozen: True (tau and bias), "tau" or "bias": applied, without a gradient
    tau_t = torch.ones(heads, requires_grad=frozen not in (True, "tau")) if tau else None
    bias_t = torch.randn(heads, area, area, requires_grad=frozen not in (True, "bias")) if bias else None
    out = kernels.window_attention(qkv, grid=grid, window=window, shift=shift, num_heads=heads, tau=tau_t,
                                   bias=bias_t)
    out.backward(torch.randn_like(out))


def _post_norm_case(x_dtype, branch_dtype, M, C, params=True, copy_dtype=None):
    import torch

    import kernels
    x = torch.randn(M, C, dtype=x_dtype, requires_grad=True)
    branch = torch.randn(M, C, dtype=branch_dtype, requires_grad=True)
    weight = torch.randn(C, requires_grad=True).to(branch_dtype if branch_dtype == torch.float64 else torch.float32)
    bias = weight.detach().clone().requires_grad_() if params else None
    if copy_dtype is None:
        out = kernels.post_norm_residual(x, branch, weight if params else None, bias)
        out.backward(torch.randn_like(out))
        return
    out, copy = kernels.post_norm_residual(x, branch, weight if params else None, bias, copy_dtype=copy_dtype)
    torch.autograd.backward((out, copy), (torch.randn_like(out), torch.randn_like(copy)))


def _gelu_case(dtype, rows, cols, approximate, tiles_per_program=1):
    import torch

    from kernels.gelu_grad import gelu_and_grad
    hidden = torch.randn(rows, cols, dtype=dtype)
    gelu_and_grad(hidden, torch.randn_like(hidden), approximate, True, tiles_per_program)


def _gelu_matmul_case(dtype, M, K, N, J, approximate):
    import torch

    from kernels.gelu_matmul import linear_gelu, linear_gelu_backward
    x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    g, w2 = torch.randn(M, J, dtype=dtype), torch.randn(J, N, dtype=dtype)
    linear_gelu(x, w, b, approximate)
    linear_gelu_backward(x, w, b, g, w2, approximate, True)
    linear_gelu_backward(x, w, b, g, w2, approximate, True, hidden=torch.randn(M, N, dtype=dtype))


def _scatter_case(dtype, tiling):
    """The gather's backward scatter (x's gradient alone) at the encoder's shape and a tiling."""
    import torch

    from kernels.gather_tokens import _scatter_owned_rows
    ids = torch.stack([torch.randperm(512)[:102] for _ in range(2)])
    _scatter_owned_rows(torch.randn(2, 102, 768, dtype=dtype), ids, 512, dtype, tiling=tiling)


def _gather_forward_case(dtype, tiling):
    """The gather's forward at the encoder's shape and a candidate tile."""
    import torch

    from kernels.gather_tokens import _gather_forward
    ids = torch.stack([torch.randperm(512)[:102] for _ in range(2)])
    _gather_forward(torch.randn(2, 512, 768, dtype=dtype), ids, torch.randn(512, 768, dtype=dtype), tiling)


def _column_sum_case(dtype, rows, cols, out_dtype=None):
    import torch

    from kernels.column_sum import column_sum
    column_sum(torch.randn(rows, cols, dtype=dtype), out_dtype)


def _forced(rows, warps, batch_per_program, launch):
    with sys.modules["kernels.window_attention"].forced_tiling(rows, warps, batch_per_program):
        launch()


def cases() -> dict:
    """name -> launcher call. The issues' target shapes in every dtype, then the edges of each
    kernel's contract (head dims, window sizes, chunked windows, no tau or bias)."""
    import torch
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    table = {}
    for name, dtype in dtypes.items():
        # #3: gather at C=768 (the encoder), unshuffle at C=512 (the decoder); B and L do not change the code.
        table[f"tokens-target-{name}"] = lambda d=dtype: (_tokens_case(d, 2, 512, 102, 768),
                                                          _tokens_case(d, 2, 512, 102, 512))
        # The models' setting, timed by benches/bench_tokens.py: a fixed positional embedding.
        table[f"tokens-target-{name}-fixed-pos"] = lambda d=dtype: (
            _tokens_case(d, 2, 512, 102, 768, pos_grad=False), _tokens_case(d, 2, 512, 102, 512, pos_grad=False))
        # #4: decoder grid 64x8, 16 heads of 32, window 4x4, shift (2, 0).
        table[f"window-target-{name}"] = lambda d=dtype: _window_case(d, 1, (64, 8), (4, 4), (2, 0), 16, 32)
    # A frozen tau and bias (applied, no gradients): the backward without its partial sums.
    table["window-target-bf16-frozen"] = lambda: _window_case(torch.bfloat16, 1, (64, 8), (4, 4), (2, 0), 16, 32,
                                                              frozen=True)
    table["window-target-bf16-frozen-tau"] = lambda: _window_case(torch.bfloat16, 1, (64, 8), (4, 4), (2, 0), 16, 32,
                                                                  frozen="tau")
    table["window-16x16-d128-bf16-frozen"] = lambda: _window_case(torch.bfloat16, 1, (16, 16), (16, 16), (8, 8), 1,
                                                                  128, frozen=True)
    # The MLP backward's fused GELU pass at the decoder's hidden width, exact and tanh.
    for name, dtype in dtypes.items():
        table[f"gelu-target-{name}"] = lambda d=dtype: (_gelu_case(d, 128, 2048, "none"), _gelu_case(d, 70, 33, "tanh"),
                                                  _gelu_case(d, 256, 2048, "none", 8),  # the loop candidate
                                                  _gelu_case(d, 256, 2048, "tanh", 8))
        # The MLP's matmuls with GELU in their epilogues (kernels/gelu_matmul.py), decoder widths.
        table[f"gelumatmul-target-{name}"] = lambda d=dtype: (_gelu_matmul_case(d, 256, 512, 2048, 512, "none"),
                                                        _gelu_matmul_case(d, 70, 40, 72, 24, "tanh"))
    # The Linears' bias gradients (kernels/column_sum.py): the decoder's qkv and proj widths, the
    # edges (float64, an odd width into a float32 result).
    table["colsum-target-bf16"] = lambda: (_column_sum_case(torch.bfloat16, 4096, 1536),
                                           _column_sum_case(torch.bfloat16, 4096, 512))
    table["colsum-fp64"] = lambda: _column_sum_case(torch.float64, 1000, 768)
    table["colsum-odd-fp16"] = lambda: _column_sum_case(torch.float16, 37, 300, torch.float32)
    table["tokens-odd-channels"] = lambda: _tokens_case(torch.bfloat16, 1, 37, 5, 1000, pos=False)
    # The scatter's tilings that benches/bench_tokens.py times on the GPU.
    from kernels.gather_tokens import SCATTER_TILING_CANDIDATES
    for tiling in SCATTER_TILING_CANDIDATES:
        table["scatter-target-bf16-" + "x".join(map(str, tiling))] = lambda t=tiling: _scatter_case(torch.bfloat16, t)
    # The gather forward's tiles that benches/bench_tokens.py times on the GPU.
    from kernels.gather_tokens import GATHER_TILING_CANDIDATES
    for tiling in GATHER_TILING_CANDIDATES:
        table["gatherfwd-target-bf16-" + "x".join(map(str, tiling))] = (
            lambda t=tiling: _gather_forward_case(torch.bfloat16, t))
    # float64 accumulates in float64: the widest tiles' registers.
    table["tokens-target-fp64-fixed-pos"] = lambda: _tokens_case(torch.float64, 2, 512, 102, 768, pos_grad=False)
    # The decoder's post-norm residual (fp32 stream, bf16 branch), and the edges: float64, odd and
    # widest rows, no parameters.
    table["postnorm-target-bf16"] = lambda: _post_norm_case(torch.float32, torch.bfloat16, 64, 512)
    table["postnorm-target-bf16-copy"] = lambda: _post_norm_case(torch.float32, torch.bfloat16, 64, 512,
                                                                 copy_dtype=torch.bfloat16)
    table["postnorm-fp64"] = lambda: _post_norm_case(torch.float64, torch.float64, 40, 768)
    table["postnorm-odd-fp16-noparams"] = lambda: _post_norm_case(torch.float16, torch.float16, 7, 1000, params=False)
    table["postnorm-widest-fp32"] = lambda: _post_norm_case(torch.float32, torch.float32, 3, 16384)
    table["postnorm-wide-fp64"] = lambda: _post_norm_case(torch.float64, torch.float64, 3, 8192)
    # The tilings benches/bench_window_tiling.py times on the GPU, each forced for both passes.
    from benches.bench_window_tiling import TILING_CANDIDATES
    for rows, warps, per_program in TILING_CANDIDATES:
        table[f"window-target-bf16-rows{rows}-warps{warps}-batch{per_program}"] = \
            lambda r=rows, w=warps, n=per_program: _forced(
                r, w, n, lambda: _window_case(torch.bfloat16, 1, (64, 8), (4, 4), (2, 0), 16, 32))
    # Chunked windows whose backward programs take several batch elements (the partial summed in
    # memory), as default_batch_per_program gives them at real batch sizes: the widest head dim at
    # the backward's 16 rows, and head dim 32 at the default tiles.
    table["window-16x16-d128-bf16-batch2"] = lambda: _forced(
        16, 4, 2, lambda: _window_case(torch.bfloat16, 1, (16, 16), (16, 16), (8, 8), 1, 128))
    for name in ("bf16", "fp32"):
        table[f"window-16x16-d32-{name}-batch8"] = lambda d=dtypes[name]: _forced(
            32, 4, 8, lambda: _window_case(d, 1, (16, 16), (16, 16), (8, 8), 2, 32))
    edges = [  # (grid, window, shift, heads, head_dim, tau, bias)
        ((8, 8), (2, 2), (1, 1), 2, 16, True, True),
        ((16, 8), (8, 8), (4, 4), 2, 64, True, True),
        ((16, 16), (16, 16), (8, 8), 1, 128, True, True),
        ((16, 16), (16, 16), (0, 0), 1, 16, False, False),
        ((8, 8), (4, 4), (0, 2), 2, 128, False, True),
        ((8, 8), (4, 4), (2, 0), 2, 80, True, False),
        ((12, 8), (3, 4), (1, 2), 2, 48, True, True),
    ]
    for grid, window, shift, heads, head_dim, tau, bias in edges:
        for name in ("bf16", "fp32"):
            label = f"window-{window[0]}x{window[1]}-d{head_dim}-{name}" + ("" if tau else "-notau") + \
                    ("" if bias else "-nobias")
            table[label] = lambda d=dtypes[name], a=(grid, window, shift, heads, head_dim, tau, bias): \
                _window_case(d, 1, *a)
    return table


def compile_cases(names: list[str] | None = None, jobs: int = 1) -> list[CompiledLaunch]:
    """Compile the named cases (all when ``names`` is None), over up to ``jobs`` processes
    (compiling is CPU-bound)."""
    table = cases()
    names = list(table) if names is None else list(names)
    jobs = min(jobs, len(names))
    if jobs > 1:
        import concurrent.futures
        import multiprocessing
        shares = [names[i::jobs] for i in range(jobs)]
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(compile_cases, shares))
        order = {name: i for i, name in enumerate(names)}
        return sorted((r for part in done for r in part), key=lambda r: order[r.case])
    current = [""]
    with compile_only(current) as records:
        for name in names:
            current[0] = name
            table[name]()
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", help="only these cases (default: all); --list shows them")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args()
    if args.list:
        print("\n".join(cases()))
        return 0
    records = compile_cases(args.cases, args.jobs)
    print(f"{'case':36s} {'kernel':28s} {'shared':>8s} {'regs':>5s} {'stack':>6s} {'warps':>5s}")
    for r in records:
        print(f"{r.case:36s} {r.kernel:28s} {r.shared_bytes:8d} {r.registers:5d} {r.stack_bytes:6d} {r.num_warps:5d}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1, default=str))
    return 0


if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
