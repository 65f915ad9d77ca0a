"""benches.ncu_kernels: one launcher per profiled kernel, and a clear skip where ncu cannot run."""
import shutil

import pytest
import torch

from benches import ncu_kernels


def test_every_profiled_kernel_has_a_launcher():
    assert set(ncu_kernels.KERNELS) == set(ncu_kernels.LAUNCHERS)


@pytest.mark.skipif(torch.cuda.is_available() and shutil.which("ncu") is not None, reason="ncu can run here")
def test_without_ncu_or_a_gpu_it_says_skipped_and_succeeds(capsys):
    assert ncu_kernels.main([]) == 0
    assert "ncu_kernels: skipped" in capsys.readouterr().out
