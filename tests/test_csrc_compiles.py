"""Every CUDA/C++ source under csrc/ compiles with this machine's nvcc for sm_90a, without spills.

Nothing runs: this is what lets a machine without a GPU catch a broken kernel source. Sources are
compiled in parallel (one nvcc each); the binding files get torch's and Python's headers.
"""
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from kernels.fbank import DEFAULT_LAUNCH_SHAPE

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


def nvcc_compile(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    includes = [*include_paths(device_type="cuda"), sysconfig.get_paths()["include"]]
    command = [
        shutil.which("nvcc"), "-arch=sm_90a", "-std=c++17", "-O3", "-c", str(source),
        "-o", str(out_dir / f"{source.stem}.o"), "-DTORCH_EXTENSION_NAME=compile_check", "-Xptxas=-v",
        *(f"-I{path}" for path in includes),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_every_csrc_source_compiles_for_sm90(tmp_path):
    assert SOURCES, "no sources under csrc/"
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
        results = list(pool.map(lambda s: nvcc_compile(s, tmp_path), SOURCES))
    failures = [f"{s.relative_to(CSRC)}:\n{r.stderr[-4000:]}" for s, r in zip(SOURCES, results) if r.returncode]
    assert not failures, "\n\n".join(failures)
    # ptxas reports each kernel's registers and spills: a spill in a default kernel would be a slow
    # kernel on the H100. The fbank kernel's candidate launch shapes (neither float64's shape 0 nor
    # float32's DEFAULT_LAUNCH_SHAPE: capped registers, timed against the default by the
    # benchmark) may spill a little, no more.
    spills = []
    for source, result in zip(SOURCES, results):
        kernel = None
        for line in result.stderr.splitlines():
            if "Compiling entry function" in line:
                kernel = line
            found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if found and max(map(int, found.groups())) > 0:
                shape = re.search(r"fbank_kernelI[fd]Li(\d+)E", kernel or "")
                candidate = shape and int(shape.group(1)) not in (0, DEFAULT_LAUNCH_SHAPE)
                if not candidate or max(map(int, found.groups())) > 256:
                    spills.append(f"{source.relative_to(CSRC)}: {kernel}: {line.strip()}")
    assert not spills, "\n".join(spills)
    reports = [line for r in results for line in r.stderr.splitlines() if "ptxas info" in line and "registers" in line]
    assert reports, "ptxas printed no register report: is -Xptxas=-v still passed?"


def test_a_build_without_a_gpu_targets_sm90(monkeypatch):
    """torch's builder reads the architecture off the visible GPU and fails with an IndexError when
    there is none: a build machine then gets sm_90 plus PTX, unless TORCH_CUDA_ARCH_LIST says otherwise."""
    import torch

    from kernels import _cuda_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # recorded, so the teardown restores the original state
    assert _cuda_extension.ensure_arch_list() == "9.0+PTX"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert _cuda_extension.ensure_arch_list() == "9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _cuda_extension.ensure_arch_list() == "8.0"


def test_a_build_of_other_sources_is_stale(tmp_path):
    """setup.py stamps each built extension with its sources' digest; the loader skips a build whose
    stamp differs (edited sources), and trusts one without a stamp (an installed wheel)."""
    from kernels import _cuda_extension as ext

    built = tmp_path / "_fbank_cuda.so"
    built.write_bytes(b"")
    assert not ext._stale(str(built), "fbank")  # no stamp: nothing to compare
    ext.stamp_path(built).write_text(ext.sources_digest("fbank") + "\n")
    assert not ext._stale(str(built), "fbank")
    ext.stamp_path(built).write_text("0" * 64 + "\n")
    assert ext._stale(str(built), "fbank")
