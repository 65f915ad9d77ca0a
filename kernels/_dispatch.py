"""Where an op runs: the Triton kernel or the eager reference.

CUDA tensors always take the Triton kernel. CPU tensors take the eager reference, unless
``TRITON_INTERPRET=1`` is set, in which case they run the same Triton kernel through Triton's
interpreter: that is how the kernels are tested on machines without a GPU. The variable is read
at call time (unsetting it later selects the references), but Triton reads it when a kernel is
decorated, so it must be set before ``kernels`` is imported: set later, it is a RuntimeError.
"""
import functools
import os

import torch
from torch.autograd import forward_ad


def _interpret_env() -> bool:
    """TRITON_INTERPRET as Triton reads it (1, true, on or yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Whether the kernels were decorated under the interpreter: this module is imported with them.
_DECORATED_FOR_INTERPRETER = _interpret_env()


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` now. Set after ``kernels`` was imported, it is an error rather than a
    silent reference run or a Triton driver error: the kernels were decorated for the GPU."""
    if not _interpret_env():
        return False
    if not _DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after `kernels` was imported; Triton reads it when the kernels are "
            "decorated, so set it before the first `import kernels` (or unset it for the eager references)"
        )
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should serve these tensors (all on one device)."""
    device = next(t.device for t in tensors if t is not None)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require_triton(op: str, t: torch.Tensor) -> None:
    """The ``torch.library`` op ``audiomae::<op>``, called directly, launches its Triton kernel: a
    clear error for tensors no kernel can serve (CPU tensors without the interpreter), where the
    launch would fail inside Triton ("0 active drivers"). The public functions never get here
    with them: they serve such tensors with the eager reference."""
    if isinstance(t, torch.Tensor) and not use_triton(t):
        raise RuntimeError(
            f"torch.ops.audiomae.{op} launches a Triton kernel, which runs on CUDA tensors, or on CPU tensors when "
            f"TRITON_INTERPRET=1 is set before `import kernels`; got {t.device.type} tensors (the kernels.* "
            "functions serve them with the eager reference)")


def on_tensors_device(launcher):
    """Runs ``launcher`` with its first tensor argument's GPU current: Triton launches on the
    current CUDA device and its stream, so tensors on ``cuda:1`` while ``cuda:0`` is current would
    otherwise be read by a kernel on the wrong GPU. A no-op (one device query) in the usual case."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return wrapper


def check_same_device(**tensors) -> torch.device:
    """Every named tensor must share one device; the error names the odd one out."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: all inputs must share one device")
    return first


def first_order_only(op: str):
    """Decorates a backward (an autograd.Function's or a ``register_autograd`` rule): a double
    backward is a clear error. ``once_differentiable`` alone errs only when the incoming gradient
    requires grad; with ``create_graph=True`` and a plain incoming gradient (a gradient penalty on
    ``loss.sum()``) it would silently drop this op's second-order terms."""

    def decorate(backward):
        first_order = torch.autograd.function.once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
                raise RuntimeError(f"kernels.{op} cannot differentiate twice: its backward has no backward of "
                                   "its own (create_graph=True)")
            if any(_batched(g) for g in grads):
                # vmap over the backward: the launchers need real storage, a batched gradient has none
                raise NotImplementedError(f"kernels.{op} cannot take batched gradients (torch.autograd.grad with "
                                          "is_grads_batched=True, or vmap over a backward): loop over them instead")
            return first_order(ctx, *grads)

        return checked

    return decorate


def _batched(t) -> bool:
    """A gradient under vmap: ``torch.autograd.grad(..., is_grads_batched=True)`` batches it with
    the legacy ``Batched`` dispatch key, ``torch.func.vmap`` with ``FuncTorchBatched``. (Asked of
    functorch directly: formatting the dispatch key set took several times as long, on every
    backward.)"""
    if not isinstance(t, torch.Tensor):
        return False
    if torch.compiler.is_compiling():  # compiled autograd: dynamo traces this one, not the legacy check
        return torch._C._functorch.is_batchedtensor(t)
    return torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def autodiff_transforms_active() -> bool:
    """Whether ``torch.func``'s grad/vjp/jacrev/jvp/jacfwd transforms wrap this call (``vmap`` and
    ``functionalize`` do not count: the ops serve them)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    active = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
    return bool(active & {TransformType.Grad, TransformType.Jvp})


def has_forward_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` carries a ``torch.autograd.forward_ad`` tangent at the current
    level: the kernels' gradients are reverse-mode rules, and a launcher would drop it."""
    if forward_ad._current_level < 0:  # no dual level open: no tangents (the common case, one read)
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def reject_autodiff_transforms(op: str) -> None:
    """A clear error under ``torch.func.grad``/``vjp``/``jacrev``/``jvp``/``jacfwd``.

    The kernels' gradients are reverse-mode autograd formulas; under those transforms a custom op
    would give zero tangents (forward mode) or a confusing internal error. ``vmap`` and
    ``functionalize`` (and torch.compile) are fine and pass.
    """
    if autodiff_transforms_active():
        raise NotImplementedError(
            f"kernels.{op} does not support torch.func's grad/vjp/jacrev/jvp/jacfwd transforms; use "
            "torch.autograd (loss.backward(), torch.autograd.grad) or the eager reference in kernels.reference"
        )


def reject_forward_tangents(op: str, *tensors: torch.Tensor | None) -> None:
    """A clear error for dual tensors (``torch.autograd.forward_ad``), as for ``torch.func.jvp``:
    the kernel's gradients are reverse-mode rules, and its op would return no tangent at all
    (a ``torch.library`` op's autograd kernel is never reached by a tangent alone)."""
    if has_forward_tangent(*tensors):
        raise NotImplementedError(
            f"kernels.{op} has no forward-mode AD rule (dual tensors of torch.autograd.forward_ad); use reverse mode "
            "(torch.autograd) or the eager reference in kernels.reference"
        )


def needs_custom_op() -> bool:
    """Whether a call must go through the ``torch.library`` op rather than its eager twin.

    Eager calls skip the custom-op dispatcher: it costs tens of microseconds of host time per call
    (more with autograd), longer than these kernels run at the models' sizes. The op serves
    whatever traces or transforms the call: torch.compile, export and compiled autograd (one
    graph, no breaks), a dispatch mode such as fake tensors or make_fx (the op has a fake
    implementation, a Triton launch has none) and torch.func's vmap (the autodiff transforms are
    refused: ``reject_autodiff_transforms``).
    """
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    )
