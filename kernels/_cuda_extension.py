"""Build and load the CUDA extensions under ``csrc/``.

Each extension ``<name>`` is the ``.cu`` and ``.cpp`` files of ``csrc/<name>/`` other than host test
harnesses (``*_host_test.cpp``). ``setup.py`` builds them ahead of time as
``torch.utils.cpp_extension.CUDAExtension("kernels._<name>_cuda", ...)`` from
``extension_sources``/``NVCC_FLAGS``; without that, the first use builds them just in time with ninja
and caches the result in torch's extension directory (``TORCH_EXTENSIONS_DIR``).
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Without a visible GPU (a build machine, a container) torch's builder has no architecture to read
# and fails with an IndexError; build for the H100 then, plus PTX for newer GPUs to JIT from.
# TORCH_CUDA_ARCH_LIST, when set, decides.
DEFAULT_ARCH_LIST = "9.0+PTX"
CXX_FLAGS = ["-O3", "-std=c++17"]
# No --use_fast_math: the kernel's float64 FFT is what keeps quiet bins within 1e-3 of Kaldi.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def ensure_arch_list() -> str | None:
    """Sets ``TORCH_CUDA_ARCH_LIST`` to ``DEFAULT_ARCH_LIST`` when it is unset and no GPU is
    visible; returns the list the build will use (None: the visible GPUs')."""
    import os

    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return os.environ.get("TORCH_CUDA_ARCH_LIST")


def extension_sources(name: str) -> list[str]:
    """The files compiled into extension ``name``: csrc/<name>/*.cu and *.cpp, harnesses excluded."""
    folder = CSRC / name
    files = sorted(folder.glob("*.cu")) + sorted(p for p in folder.glob("*.cpp") if not p.stem.endswith("_host_test"))
    if not files:
        raise FileNotFoundError(f"no CUDA sources under {folder}")
    return [str(p) for p in files]


def extension_names() -> list[str]:
    """Every extension under csrc/ (one per folder)."""
    return sorted(p.name for p in CSRC.iterdir() if p.is_dir() and any(p.glob("*.cu")))


def sources_digest(name: str) -> str:
    """A hash of extension ``name``'s sources and headers (contents, not times: a copied checkout
    gets new times without new code)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((CSRC / name).iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp_path(module_file) -> Path:
    """Where ``setup.py`` records the sources' digest beside a built extension."""
    return Path(str(module_file) + ".sources")


def _stale(module_file: str | None, name: str) -> bool:
    """Whether a built extension was built from other sources than the checkout's (edited after
    ``setup.py build_ext --inplace``): it would run old code, or lack a function the Python side
    now calls. Without a stamp or the sources (an installed wheel) nothing can be compared."""
    if not module_file or not (CSRC / name).is_dir() or not stamp_path(module_file).is_file():
        return False
    return stamp_path(module_file).read_text().strip() != sources_digest(name)


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """The compiled extension ``name``: the one setup.py installed (unless its sources are newer),
    else a cached just-in-time build (which rebuilds when the sources change)."""
    try:
        module = importlib.import_module(f"kernels._{name}_cuda")
        if not _stale(getattr(module, "__file__", None), name):
            return module
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    ensure_arch_list()
    return load(
        name=f"audiomae_{name}_cuda",
        sources=extension_sources(name),
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        verbose=False,
    )
