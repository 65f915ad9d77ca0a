"""Every Triton launch compiles for the H100 (sm_90) and fits it, on a machine without a GPU.

The interpreter runs the kernels' arithmetic here but never the compiler: this test runs the real
launchers under ``benches.sm90_compile`` (in a child process, since this one interprets) at the
issues' target shapes and at the edges of each contract, and checks each cubin's resources.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches.sm90_compile import H100_SHARED_BYTES

ROOT = Path(__file__).resolve().parent.parent
# Register spills per thread: a few dozen bytes stay in L1; the tilings this guards against spilled
# 7 to 18 KB per thread.
MAX_STACK_BYTES = 512
KERNELS = {
    "tokens": {"_gather_kernel", "_gather_backward_kernel", "_unshuffle_kernel", "_mask_pos_backward_kernel"},
    "window": {"_window_attention_fwd", "_window_attention_bwd", "_window_attention_bwd_finish"},
    "postnorm": {"_forward_kernel", "_backward_kernel"},
    "gelu": {"_gelu_grad_kernel", "_gelu_grad_loop_kernel"},
    "gelumatmul": {"_linear_gelu_kernel", "_linear_gelu_backward_kernel"},
    "colsum": {"_column_partials_kernel", "_column_finish_kernel"},
    "scatter": {"_scatter_owned_rows_kernel"},
    "gatherfwd": {"_gather_kernel"},
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benches.sm90_compile", "--json", str(out), "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "benches.sm90_compile", "--list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True).stdout.split()
    return listed, json.loads(out.read_text())


@pytest.mark.slow
def test_every_case_compiles_each_kernel(compiled):
    names, launches = compiled
    assert names, "no cases"
    for name in names:
        kernels = {launch["kernel"] for launch in launches if launch["case"] == name}
        expected = KERNELS[name.split("-")[0]]
        if "notau-nobias" in name or name.endswith("-frozen"):  # no tau or bias gradient: no partials to finish
            expected = expected - {"_window_attention_bwd_finish"}
        if name.endswith("-fixed-pos") or name == "tokens-odd-channels":
            # x's gradient alone from a gather over more rows than it keeps: the scatter (with zeros)
            expected = expected | {"_scatter_owned_rows_kernel"}
        assert kernels == expected, name


@pytest.mark.slow
def test_launches_fit_an_h100(compiled):
    _, launches = compiled
    for launch in launches:
        where = f"{launch['case']} {launch['kernel']} {launch['constants']}"
        assert 0 <= launch["shared_bytes"] <= H100_SHARED_BYTES, where
        assert launch["stack_bytes"] <= MAX_STACK_BYTES, where


@pytest.mark.slow
@pytest.mark.parametrize("case,kernel,tile_bytes", [
    ("colsum-target-bf16", "_column_partials_kernel", 16 * 256 * 2),  # a 16 x 256 bf16 tile
    ("gelu-target-bf16", "_gelu_grad_loop_kernel", 2 * 32 * 128 * 2),  # hidden's and grad's 32 x 128 tiles
])
def test_loops_are_pipelined(compiled, case, kernel, tile_bytes):
    # Triton pipelines counted loops only: the tiles in flight sit in shared memory (cp.async),
    # two of them at num_stages=3. A while loop, which the partials loop was (25 to 42 % of copy
    # bandwidth on the H200), has none.
    _, launches = compiled
    shared = [launch["shared_bytes"] for launch in launches if launch["case"] == case and launch["kernel"] == kernel]
    assert shared and max(shared) >= 2 * tile_bytes, shared


def test_every_launched_kernel_is_listed():
    # A kernel added to kernels/ without a case here (or without its name in the step profile's
    # list of this project's kernels) would go uncompiled, or be counted as PyTorch's.
    import re

    from benches.bench_models import PROJECT_KERNELS

    launched = set()
    for path in (ROOT / "kernels").glob("*.py"):
        launched |= set(re.findall(r"^\s*(_\w+)\[[^\n]*?\]\(", path.read_text(), flags=re.M))  # name[grid](...
    listed = set().union(*KERNELS.values()) | {"_scatter_owned_rows_kernel"}  # the fixed-pos cases add it
    assert launched and launched == listed, (launched ^ listed)
    assert launched == PROJECT_KERNELS, launched ^ PROJECT_KERNELS
