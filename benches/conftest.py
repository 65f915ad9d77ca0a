"""pytest-benchmark suites: ``pytest benches/bench_*.py`` on a GPU machine.

Each module's ``test_*`` functions skip without CUDA. Where pytest-benchmark is not installed, the
``benchmark`` fixture skips the test with that reason instead of failing to resolve.
"""
import importlib.util

import pytest

if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed")
