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
