"""Test configuration.

Without a GPU the Triton kernels run through Triton's interpreter: ``TRITON_INTERPRET`` must be
set before any kernel module is imported, so it is set here, at collection time.
GPU-only tests carry ``@pytest.mark.gpu`` and are skipped on machines without CUDA.
"""
import os

import pytest

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` comes back NaN-filled: an output a kernel forgets to write shows up
    as NaN instead of as lucky zeros. Files opt in with ``pytestmark``."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def record_launches(monkeypatch):
    """``record_launches(module, name)``: a list to which every launch of the Triton kernel
    ``module.name`` appends ``(grid, args, kwargs)`` before it runs (what the launch was given:
    the interpreter ignores some of it, and a tile choice may not change the bits)."""

    def record(module, name):
        kernel, launches = getattr(module, name), []

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((grid, args, kwargs))
                    return kernel[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(module, name, Recorder())
        return launches

    return record


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a busy 2-core machine extra OpenMP threads only spin (40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
