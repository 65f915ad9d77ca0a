"""A block's Linear weights cast for autocast in one multi-tensor copy, not one kernel per tensor.

Under autocast every Linear casts its float32 weight and bias to the autocast dtype as it runs, and
the backward casts each gradient back to float32: two small kernels and an autograd node per
tensor. In the AudioMAE pretraining step that is about 560 casts (``benches/step_ledger.py``
counts them), most of them on vectors of a few hundred values: their launches, not their bytes,
are what they cost, on the host in eager mode and in the gaps between kernels of a replayed graph.

``linear_weights_cast(block, x)`` casts the weights and biases of a block's stock ``nn.Linear``
modules in one ``torch._foreach_copy_`` (one flat buffer, a kernel or a few for the whole block),
hands the block those copies while it runs (the modules' parameter slots hold them for the
duration of the ``with``) and, in the backward, widens their gradients in one more. The values
are autocast's: the same roundings of the same tensors forward, and each gradient computed in the
autocast dtype and widened, as autocast's cast node widens it; only the number of launches
changes. The parameters themselves are untouched: they get their float32 gradients as before,
block by block, so gradient hooks and DistributedDataParallel still see them as the backward goes.

It steps aside (a plain ``with`` that does nothing) wherever autocast's own per-op casts are what
should run: no autocast for ``x``'s device, no grad mode (inference keeps autocast's cast cache),
torch.compile and export (the compiler fuses those casts itself), torch.func transforms, forward-mode AD, hooks on any of the block's modules (a hook
reading ``module.weight`` would see the copy), and any Linear that is not a stock ``nn.Linear``
with float32 ``nn.Parameter`` weights on ``x``'s device (a subclass, a parametrization, weights
already in the autocast dtype).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

from .layers import without_hooks

# Device types with an autocast (torch.amp.is_autocast_available's list for the devices in use).
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


class _CastParameters(torch.autograd.Function):
    """``(dtype, *params) -> params`` cast to ``dtype``, views of one new buffer; the backward
    widens the gradients that arrive to each parameter's dtype in one multi-tensor copy."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.set_materialize_grads(False)  # a copy nobody used gets no gradient, not a zero tensor
        ctx.param_dtypes = [p.dtype for p in params]
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        casts = torch._utils._unflatten_dense_tensors(flat, params)
        torch._foreach_copy_(casts, params)
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[i + 1]]
        out = [None] * len(grads)
        if wanted:
            # One buffer per dtype would do for mixed ones; the callers pass float32 parameters.
            dtype = ctx.param_dtypes[wanted[0]]
            sources = [grads[i] for i in wanted]
            flat = torch.empty(sum(g.numel() for g in sources), dtype=dtype, device=sources[0].device)
            widened = torch._utils._unflatten_dense_tensors(flat, sources)
            torch._foreach_copy_(widened, sources)
            for i, g in zip(wanted, widened):
                out[i] = g
        return (None, *out)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != torch.float32 else None


def _plain_parameter(p) -> bool:
    """A Parameter of a plain tensor, or of a fake one (shape inference and the step ledger run this
    like any torch ops); not a tensor subclass's (DTensor...), whose copies this could not make."""
    return isinstance(p, nn.Parameter) and (type(p) is nn.Parameter or isinstance(p, FakeTensor))


def _linear_slots(block: nn.Module, device: torch.device) -> list[tuple[nn.Module, str]] | None:
    """The (module, name) slots to cast: every weight and bias of the block's Linears, or None
    where one of them is not a stock Linear's float32 Parameter on ``device``."""
    slots = []
    for module in block.modules():
        if not isinstance(module, nn.Linear):
            continue
        if type(module) is not nn.Linear or "forward" in vars(module):
            return None  # a subclass or a patched forward may use its weights otherwise
        for name in ("weight", "bias"):
            if name not in module._parameters:
                return None  # a parametrization (weight norm...) computes it
            p = module._parameters[name]
            if p is None:
                continue
            if not _plain_parameter(p) or p.dtype != torch.float32 or p.device != device:
                return None
            slots.append((module, name))
    return slots


def casts_linear_weights(block: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``linear_weights_cast`` would cast ``block``'s Linears to for input ``x``, or None
    where it steps aside (see the module docstring)."""
    dtype = _autocast_dtype(x)
    # Dispatch modes (fake tensors, the step ledger's counting mode) run it like any torch ops.
    if (dtype is None or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or not without_hooks(*block.modules())):
        return None
    return dtype


@contextlib.contextmanager
def linear_weights_cast(block: nn.Module, x: torch.Tensor):
    """While the ``with`` runs, ``block``'s Linears hold their weights cast for autocast, all cast
    in one copy (see the module docstring); a no-op where that does not apply."""
    dtype = casts_linear_weights(block, x)
    slots = _linear_slots(block, x.device) if dtype is not None else None
    if not slots:
        yield
        return
    params = [module._parameters[name] for module, name in slots]
    casts = _CastParameters.apply(dtype, *params)
    for (module, name), cast in zip(slots, casts):
        module._parameters[name] = cast
    try:
        yield
    finally:
        for (module, name), param in zip(slots, params):
            module._parameters[name] = param
