"""Where an op runs: the Triton kernel or the eager reference.

CUDA tensors always take the Triton kernel. CPU tensors take the eager reference, unless
``TRITON_INTERPRET=1`` is set, in which case they run the same Triton kernel through Triton's
interpreter: that is how the kernels are tested on machines without a GPU. The variable is read
at call time, but Triton reads it when a kernel is decorated, so it must be set before ``kernels``
is imported for the interpreter to take effect.
"""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should serve these tensors (all on one device)."""
    device = next(t.device for t in tensors if t is not None)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def check_same_device(**tensors) -> torch.device:
    """Every named tensor must share one device; the error names the odd one out."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: all inputs must share one device")
    return first
