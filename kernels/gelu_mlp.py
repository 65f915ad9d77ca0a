"""The transformer MLP ``fc2(gelu(fc1(x)))`` keeping fewer activations for the backward.

Eagerly autograd keeps three tensors per MLP: fc1's input, fc1's output (for GELU's backward) and
GELU's output (for fc2's weight gradient); the last two are 4x the width of the first. In the
AudioMAE decoder at batch 64 those two are 268 MB a block in bfloat16, 4.3 GB over the 16 blocks:
the largest item of the pretraining step's peak memory. ``gelu_mlp`` computes the same forward and
keeps less, recomputing in the backward what it dropped:

* ``save="input"`` keeps only fc1's input (in the compute dtype: under autocast the bfloat16 copy
  that eager fc1 keeps too); the backward recomputes fc1 and GELU, one extra matmul of fc1's size.
* ``save="hidden"`` also keeps fc1's output; the backward recomputes only GELU (one elementwise pass).

Both keep the weights as eager ``F.linear`` keeps them (under autocast, their compute-dtype copies),
so updating a weight in place between the forward and the backward behaves as it does eagerly.

Every matmul is the one eager autograd runs (the same matmuls in the same dtypes); the backward's
GELU, GELU gradient and fc1 bias gradient are one pass (``kernels.gelu_grad``, PyTorch's
arithmetic) and fc2's bias gradient is ``kernels.column_sum`` (no staging buffer), so outputs
and gradients equal eager ``Mlp`` up to the order of the bias sums and the
last bit of erf/tanh on the GPU. ``fused_matmul=True`` (opt-in, not yet timed on a GPU) runs fc1
with GELU in its epilogue (with ``save="input"``), and fc1's recomputation (or the kept output),
fc2's input gradient and GELU's backward as one kernel (``kernels.gelu_matmul``): this project's
Triton matmuls instead of cuBLAS's, so the values are the same up to the order of those matmuls'
sums as well.
Autocast is honoured as eager ``F.linear`` honours it: under an enabled autocast for the input's
device, float32 and lower inputs compute in the autocast dtype; otherwise every tensor must share
one dtype. Dropout is not part of the op (the models use it only with ``drop=0``).

Eager calls run an ``autograd.Function`` over torch operations and this project's kernels (CPU
tensors as well as CUDA ones). What torch.compile, export or a dispatch mode traces is the ``torch.library`` op pair
``audiomae::gelu_mlp`` / ``audiomae::gelu_mlp_backward`` (the same operations inside): traced
through, the Function's recomputation would be undone by the compiler, which merges the
backward's fc1 with the forward's and keeps both of the wide tensors again (seen on the CPU: twice
the hidden activation saved, against none eagerly); an op is opaque to it, so compiled code keeps
what the eager op keeps. Under torch.func transforms it runs the reference's ops unfused (same
values, eager memory).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._dispatch import check_same_device, first_order_only, has_forward_tangent, needs_custom_op
from kernels.column_sum import column_sum
from kernels.gelu_grad import gelu_and_grad
from kernels.gelu_matmul import linear_gelu, linear_gelu_backward
from kernels.reference.gelu_mlp import gelu_mlp as reference

SAVE_CHOICES = ("input", "hidden")
APPROXIMATIONS = ("none", "tanh")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., n] as [rows, n] (explicit rows: -1 cannot be inferred when n is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def _linear_backward(grad2d, inp2d, weight, need_input, need_weight, need_bias, input_shape):
    grad_input = (grad2d @ weight).view(*input_shape[:-1], weight.shape[1]) if need_input else None
    grad_weight = grad2d.t() @ inp2d if need_weight else None
    # column_sum: the sum(0) without the staging buffer torch's reduction allocates (4x the input)
    grad_bias = column_sum(grad2d) if need_bias else None
    return grad_input, grad_weight, grad_bias


def _forward_math(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype, approximate, fused=False):
    """(out, and the inputs cast to the compute dtype: xc, w1, b1, w2, then fc1's output, None when
    ``fused``: fc1 with GELU in its epilogue, ``kernels.gelu_matmul``, which never stores it)."""
    xc, w1, b1, w2, b2 = (_cast(t, compute_dtype) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    with torch.autocast(x.device.type, enabled=False):
        if fused:
            hidden = None
            act = linear_gelu(_rows(xc), w1, b1, approximate).view(*xc.shape[:-1], w1.shape[0])
        else:
            hidden = F.linear(xc, w1, b1)
            act = F.gelu(hidden, approximate=approximate)
        out = F.linear(act, w2, b2)
    return out, xc, w1, b1, w2, hidden


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype, save_hidden, approximate,
                fused_matmul):
        out, xc, w1, b1, w2, hidden = _forward_math(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype,
                                                    approximate, fused_matmul and not save_hidden)
        # The compute-dtype copies are kept, as eager F.linear keeps them under autocast (so the
        # weights may change in place before the backward, as eagerly); fc1's bias only where
        # fc1 is recomputed.
        ctx.save_for_backward(xc, w1, None if save_hidden else b1, w2, hidden if save_hidden else None)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
        ctx.approximate, ctx.fused_matmul = approximate, fused_matmul
        return out

    @staticmethod
    @first_order_only("gelu_mlp")
    def backward(ctx, grad):
        xc, w1, b1, w2, hidden = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        if needs_custom_op():  # compiled autograd traces this backward: there it takes the op too
            kept = hidden is not None
            grads = torch.ops.audiomae.gelu_mlp_backward(grad, xc, w1, b1, w2, hidden if kept else xc.new_empty(0),
                                                         kept, ctx.approximate, needs, ctx.fused_matmul)
            grads = [g if need else None for g, need in zip(grads, needs)]
        else:
            grads = _backward_math(grad, xc, w1, b1, w2, hidden, ctx.approximate, needs, ctx.fused_matmul)
        return (*(g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)), None, None, None,
                None)


def _backward_math(grad, xc, w1, b1, w2, hidden, approximate, needs, fused=False):
    """Gradients of (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) in the compute dtype (None where
    ``needs`` says no), from fc1's input ``xc`` and the weights in the compute dtype; ``hidden``
    (fc1's output) is recomputed when None. ``fused``: fc1's recomputation, the matmul making
    GELU's output gradient and GELU's backward in one kernel (``kernels.gelu_matmul``)."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    with torch.autocast(xc.device.type, enabled=False):
        grad2d = _rows(grad.to(xc.dtype))
        if fused:
            act, grad_hidden, grad_b1 = linear_gelu_backward(
                _rows(xc), w1, b1, grad2d, w2, approximate, need_b1, hidden=_rows(hidden) if hidden is not None else None)
        else:
            if hidden is None:
                hidden = F.linear(xc, w1, b1)
            hidden2d = _rows(hidden)
            grad_act = grad2d @ w2
            # GELU again (for fc2's weight gradient), GELU's backward (over grad_act, which is ours)
            # and fc1's bias gradient in one pass over the hidden width (kernels/gelu_grad.py)
            act, grad_hidden, grad_b1 = gelu_and_grad(hidden2d, grad_act, approximate, need_b1)
            del hidden2d, grad_act
        del hidden
        _, grad_w2, grad_b2 = _linear_backward(grad2d, act, w2, False, need_w2, need_b2, act.shape)
        del act  # the largest tensor of the backward: free it before the next one is made
        grad_x, grad_w1, _ = _linear_backward(grad_hidden, _rows(xc), w1, need_x, need_w1, False, xc.shape)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


# ----------------------------------------------------------------------------------------------
# The same computation as torch.library ops, for what traces the call (see the module doc)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("audiomae::gelu_mlp", mutates_args=())
def _gelu_mlp_op(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None, compute_dtype: torch.dtype, save_hidden: bool, approximate: str,
    fused_matmul: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, then what the backward keeps: x, fc1's output, fc1's weight and bias and fc2's weight in
    the compute dtype). Each of the kept ones is an empty tensor where there is nothing to keep: an
    input already in the compute dtype is kept as the input itself (an op's output may not alias
    one), fc1's output and bias only where the backward needs them."""
    out, xc, w1, b1, w2, hidden = _forward_math(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype,
                                                approximate, fused_matmul and not save_hidden)
    keep = _kept(x, fc1_weight, fc1_bias, fc2_weight, compute_dtype, save_hidden)
    kept = [t if wanted else out.new_empty(0) for t, wanted in zip((xc, hidden, w1, b1, w2), keep)]
    return (out, *kept)


def _kept(x, fc1_weight, fc1_bias, fc2_weight, compute_dtype, save_hidden) -> tuple[bool, ...]:
    """Which of (x, fc1's output, fc1_weight, fc1_bias, fc2_weight) the op returns for the backward."""
    cast = lambda t: t is not None and t.dtype != compute_dtype  # noqa: E731
    return cast(x), save_hidden, cast(fc1_weight), cast(fc1_bias) and not save_hidden, cast(fc2_weight)


@_gelu_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype, save_hidden, approximate, fused_matmul):
    hidden = x.new_empty((*x.shape[:-1], fc1_weight.shape[0]), dtype=compute_dtype)
    out = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=compute_dtype)
    keep = _kept(x, fc1_weight, fc1_bias, fc2_weight, compute_dtype, save_hidden)
    # empty_like: a cast keeps the input's strides (a transposed x stays transposed)
    like = [torch.empty_like(x, dtype=compute_dtype), hidden] + [
        torch.empty_like(t, dtype=compute_dtype) if t is not None else None for t in (fc1_weight, fc1_bias, fc2_weight)]
    return (out, *[t if wanted else x.new_empty(0, dtype=compute_dtype) for t, wanted in zip(like, keep)])


@torch.library.custom_op("audiomae::gelu_mlp_backward", mutates_args=())
def _gelu_mlp_backward_op(
    grad: torch.Tensor, xc: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor, hidden: torch.Tensor, saved_hidden: bool, approximate: str, needs: list[bool],
    fused_matmul: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) in the compute dtype; one not
    in ``needs`` comes back empty (an op cannot return None)."""
    if len(needs) != 5:
        raise ValueError(f"needs must hold 5 flags (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), got {len(needs)}")
    dtype = xc.dtype
    w1, b1, w2 = fc1_weight.to(dtype), _cast(fc1_bias, dtype), fc2_weight.to(dtype)  # no-ops when kept cast
    grads = _backward_math(grad, xc, w1, b1, w2, hidden if saved_hidden else None, approximate, needs, fused_matmul)
    return tuple(g if g is not None else grad.new_empty(0, dtype=dtype) for g in grads)


@_gelu_mlp_backward_op.register_fake
def _(grad, xc, fc1_weight, fc1_bias, fc2_weight, hidden, saved_hidden, approximate, needs, fused_matmul):
    dtype = xc.dtype
    # fc1_bias is None when fc1's output was kept (not needed): its gradient's shape is fc1's width
    shapes = (xc.shape, fc1_weight.shape, (fc1_weight.shape[0],), fc2_weight.shape, (fc2_weight.shape[0],))
    return tuple(grad.new_empty(shape if need and shape is not None else (0,), dtype=dtype)
                 for shape, need in zip(shapes, needs))


def _op_setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute_dtype, save_hidden, approximate, fused_matmul = inputs
    _, *kept = output
    keep = _kept(x, fc1_weight, fc1_bias, fc2_weight, compute_dtype, save_hidden)
    xc, hidden, w1, b1, w2 = (out if wanted else given for out, wanted, given in zip(
        kept, keep, (x, kept[1], fc1_weight, None if save_hidden else fc1_bias, fc2_weight)))
    ctx.save_for_backward(xc, w1, b1, w2, hidden)  # hidden: empty unless kept
    ctx.mark_non_differentiable(*kept)
    ctx.saved_hidden, ctx.approximate, ctx.fused_matmul = save_hidden, approximate, fused_matmul
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)


@first_order_only("gelu_mlp")
def _op_backward(ctx, grad, *_kept_grads):
    xc, w1, b1, w2, hidden = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    needs[2] &= ctx.has_bias[0]
    needs[4] &= ctx.has_bias[1]
    grads = torch.ops.audiomae.gelu_mlp_backward(grad, xc, w1, b1, w2, hidden, ctx.saved_hidden, ctx.approximate,
                                                 needs, ctx.fused_matmul)
    grads = [g.to(dtype) if need else None for g, dtype, need in zip(grads, ctx.dtypes, needs)]
    return (*grads, None, None, None, None)


_gelu_mlp_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def compute_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """The dtype eager ``F.linear`` computes in here, or a TypeError where it would refuse."""
    device_type = x.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device without autocast (meta tensors, shape inference): none applies
        autocast = False
    target = torch.get_autocast_dtype(device_type) if autocast else None
    names = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    named = [(name, t) for name, t in zip(names, (x, *params)) if t is not None]
    dtypes = {target if autocast and t.dtype != torch.float64 else t.dtype for _, t in named}
    if len(dtypes) > 1:
        found = ", ".join(f"{name}={t.dtype}" for name, t in named)
        raise TypeError(f"gelu_mlp: x and the weights must share one dtype (or run under autocast), got {found}")
    return dtypes.pop()


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    save: str = "input",
    fused_matmul: bool = False,
) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x`` [..., C], ``fc1_weight`` [H, C], ``fc2_weight`` [C_out, H];
    ``save`` picks what the backward keeps ("input" or "hidden"); ``fused_matmul`` puts GELU's
    backward (and with ``save="input"`` GELU itself) in the epilogues of this project's own
    matmuls (``kernels.gelu_matmul``) instead of separate passes after cuBLAS's. See the module doc."""
    if not isinstance(fused_matmul, bool):
        raise TypeError(f"fused_matmul must be a bool, got {type(fused_matmul).__name__}")
    if save not in SAVE_CHOICES:
        raise ValueError(f"save must be one of {SAVE_CHOICES}, got {save!r}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    named = {"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
    for name, t in named.items():
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    hidden, channels = fc1_weight.shape if fc1_weight.dim() == 2 else (None, None)
    if channels is None or x.dim() == 0 or x.shape[-1] != channels:
        raise ValueError(f"fc1_weight must be [H, C] with C = x.shape[-1], got {tuple(fc1_weight.shape)} for x {tuple(x.shape)}")
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight must be [C_out, {hidden}], got {tuple(fc2_weight.shape)}")
    for name, bias, size in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"{name} must be [{size}], got {tuple(bias.shape)}")
    check_same_device(**named)
    dtype = compute_dtype(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if (torch._C._are_functorch_transforms_active() or x.device.type == "meta"
            or has_forward_tangent(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)):
        # torch.func transforms and forward-mode AD (dual tensors) compose with plain torch ops,
        # not with this Function's saving scheme: run the same ops unfused (same values, eager
        # memory). Meta tensors (shape inference) too: the Function's autocast guards need a
        # device that has autocast.
        return reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate)
    # [..., C] as [rows, C]: for a 3-D or deeper input F.linear returns a view of its 2-D product
    # (the same values as on the rows), and a view made inside an autograd.Function cannot be
    # modified in place afterwards, where timm's Mlp's output can.
    lead = x.shape[:-1]
    if x.dim() > 2:
        x = _rows(x)
    if needs_custom_op():
        out = _gelu_mlp_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, dtype, save == "hidden", approximate,
                           fused_matmul)[0]
    else:
        out = _GeluMlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, dtype, save == "hidden", approximate,
                             fused_matmul)
    return out.view(*lead, out.shape[-1]) if len(lead) > 1 else out
