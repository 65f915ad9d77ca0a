"""A block's Linear weights cast for autocast in one multi-tensor copy, not one kernel per tensor.

Under autocast every Linear casts its float32 weight and bias to the autocast dtype as it runs, and
the backward casts each gradient back to float32: two small kernels and an autograd node per
tensor. In the AudioMAE pretraining step that is about 560 casts (``benches/step_ledger.py``
counts them), most of them on vectors of a few hundred values: their launches, not their bytes,
are what they cost, in the gaps between the kernels of a replayed graph above all.

``linear_weights_cast(block, x)`` casts the weights and biases of a stock block's Linears in one
``torch._foreach_copy_`` into one buffer (a kernel or a few for the whole block), and while the
``with`` runs this project's modules take those copies in place of their parameters (``linear``,
``cast_of``: looked up in a context variable, so nothing else sees them: not another thread, not
``state_dict()``, not a hook). The backward widens their gradients in one more copy. The values
are autocast's: the same roundings of the same tensors forward, each gradient computed in the
autocast dtype and widened as autocast's cast node widens it (tested to the bit, forward and
every gradient). One difference: a block run twice inside one autocast region before a single
backward (or two blocks sharing a Linear) is cast once per call here, where autocast's cache casts
each weight once per region; its gradient is then summed in float32 rather than in the autocast
dtype. The parameters keep their float32 gradients, block by block as the backward goes (hooks and
DistributedDataParallel see them as before); a block's Linear gradients are views of one buffer.

It steps aside (autocast casts each tensor, as without it) wherever that is what should run: no
autocast for ``x``'s device, no grad mode (inference keeps autocast's cast cache), torch.compile,
export and ``torch.jit.trace`` (the compiler fuses those casts itself), torch.func transforms,
forward-mode AD, a block that is not entirely this project's stock modules (a subclass, a replaced
or patched ``forward``, another activation; they may use the weights otherwise), hooks on any of
its modules, and Linear parameters that are not contiguous float32 ``nn.Parameter``\\ s on ``x``'s
device (parametrizations, weights already in the autocast dtype, tensor subclasses).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

# Device types with an autocast (torch.amp.is_autocast_available's list for the devices in use).
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")

# {id(parameter): its cast} while a block's forward runs in this thread (or task), else None.
_CASTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("audiomae_weight_casts", default=None)


def cast_of(p: torch.Tensor | None) -> torch.Tensor | None:
    """``p``'s cast while ``linear_weights_cast`` runs for its block, else ``p`` itself."""
    if torch.compiler.is_compiling():  # never cast there, and dynamo cannot trace ContextVar.get
        return p
    casts = _CASTS.get()
    return p if casts is None or p is None else casts.get(id(p), p)


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, with the block's casts of its weight and bias where they are cast (a stock
    Linear without hooks then: ``F.linear`` is what calling it runs)."""
    if torch.compiler.is_compiling():  # never cast there, and dynamo cannot trace ContextVar.get
        return module(x)
    casts = _CASTS.get()
    if casts is None or id(module.weight) not in casts:
        return module(x)
    bias = module.bias
    return F.linear(x, casts[id(module.weight)], casts.get(id(bias), bias) if bias is not None else None)


class _CastParameters(torch.autograd.Function):
    """``(dtype, *params) -> params`` cast to ``dtype``, views of one new buffer; the backward
    widens the gradients that arrive to float32 in one multi-tensor copy."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.set_materialize_grads(False)  # a copy nobody used gets no gradient, not a zero tensor
        ctx.param_dtype = params[0].dtype
        casts = _segments(torch.empty(_buffer_size(params, dtype), dtype=dtype, device=params[0].device), params)
        torch._foreach_copy_(casts, params)
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[i + 1]]
        out = [None] * len(grads)
        if torch.is_grad_enabled():  # create_graph=True: differentiable casts (a foreach copy has no derivative)
            for i in wanted:
                out[i] = grads[i].to(ctx.param_dtype)
        elif wanted:
            sources = [grads[i] for i in wanted]
            flat = torch.empty(_buffer_size(sources, ctx.param_dtype), dtype=ctx.param_dtype, device=sources[0].device)
            widened = _segments(flat, sources)
            torch._foreach_copy_(widened, sources)
            for i, g in zip(wanted, widened):
                out[i] = g
        return (None, *out)


# Each tensor's segment starts at a multiple of 256 bytes into the buffer (which the allocator
# aligns further), as its own allocation would: cuBLASLt's algorithm choice looks at the
# operands' alignment up to 256 bytes (PyTorch passes it as a preference), so a less aligned
# copy could take another kernel and round differently.
_ALIGN_BYTES = 256


def _aligned(numel: int, itemsize: int) -> int:
    step = _ALIGN_BYTES // itemsize
    return -(-numel // step) * step


def _buffer_size(tensors, dtype: torch.dtype) -> int:
    return sum(_aligned(t.numel(), dtype.itemsize) for t in tensors)


def _segments(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """Contiguous views of ``flat`` shaped like ``like``, each at an aligned offset."""
    step = _ALIGN_BYTES // flat.dtype.itemsize
    if all(t.numel() % step == 0 for t in like):  # no padding: one call
        return list(torch._utils._unflatten_dense_tensors(flat, like))
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += _aligned(t.numel(), flat.dtype.itemsize)
    return views


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != torch.float32 else None


def _stock_types() -> frozenset:
    """The modules a block may hold for its Linears to be used only as ``linear``/``cast_of`` use them."""
    global _STOCK
    if _STOCK is None:
        from .layers import Attention, Block, DropPath, Mlp
        from .swin import SwinTransformerBlock, WindowMultiHeadAttention

        _STOCK = frozenset({Block, Attention, Mlp, DropPath, SwinTransformerBlock, WindowMultiHeadAttention,
                            nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU})
    return _STOCK


_STOCK = None


def _plain_parameter(p) -> bool:
    """A Parameter of a plain tensor, or of a fake one (shape inference and the step ledger run this
    like any torch ops); not a tensor subclass's (DTensor...), whose copies this could not make."""
    return isinstance(p, nn.Parameter) and (type(p) is nn.Parameter or isinstance(p, FakeTensor))


def _linear_parameters(block: nn.Module, device: torch.device) -> list[torch.Tensor] | None:
    """The weights and biases of the block's Linears, or None where the block is not all stock
    modules without hooks (one walk over it) or a parameter is not one this can cast."""
    from torch.nn.modules import module as hooks

    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return None
    stock, params = _stock_types(), []
    for m in block.modules():
        if (type(m) not in stock or "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks
                or m._backward_hooks or m._backward_pre_hooks):
            return None
        if type(m) is nn.Linear:
            for name in ("weight", "bias"):
                if name not in m._parameters:
                    return None  # a parametrization (weight norm...) computes it
                p = m._parameters[name]
                if p is None:
                    continue
                if (not _plain_parameter(p) or p.dtype != torch.float32 or p.device != device
                        or not p.is_contiguous()):
                    return None
                params.append(p)
    return params


def _steps_aside(x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)


def _plan(block: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, list[torch.Tensor]] | None:
    """(autocast dtype, the Linear parameters to cast), or None where it steps aside."""
    if _steps_aside(x):  # first: it keeps torch.compile off the context variable
        return None
    dtype = _autocast_dtype(x)
    params = _linear_parameters(block, x.device) if dtype is not None else None
    return (dtype, params) if params else None


def casts_linear_weights(block: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``linear_weights_cast`` casts ``block``'s Linears to for input ``x``, or None
    where it steps aside (see the module docstring)."""
    plan = _plan(block, x)
    return plan[0] if plan is not None else None


@contextlib.contextmanager
def linear_weights_cast(block: nn.Module, x: torch.Tensor):
    """While the ``with`` runs, this project's modules in ``block`` take its Linear weights cast
    for autocast, all cast in one copy (see the module docstring); a no-op where that does not
    apply, or inside another block's."""
    plan = _plan(block, x)
    if plan is None or _CASTS.get() is not None:
        yield
        return
    dtype, params = plan
    casts = _CastParameters.apply(dtype, *params)
    token = _CASTS.set({id(p): c for p, c in zip(params, casts)})
    try:
        yield
    finally:
        _CASTS.reset(token)


def block_weights_cast(block: nn.Module, x: torch.Tensor):
    """A transformer block's ``with``: ``linear_weights_cast`` on the ``"triton"`` backend unless
    the block opts out (``cast_weights_together = False``); otherwise nothing (autocast casts each
    weight as it runs)."""
    if block.cast_weights_together and getattr(block.attn, "backend", None) == "triton":
        return linear_weights_cast(block, x)
    return contextlib.nullcontext()
