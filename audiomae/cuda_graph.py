"""A whole training step (forward, backward, optimizer update) captured once in a CUDA graph.

Why: at batch 64 the eager AudioMAE pretraining step launches about 2,500 kernels, and on an H200
the ``triton`` backend kept the GPU busy for 58 ms of each 143 ms profiled step (41 %;
``benches/results/gpu_check-h200-2026-11-26-profile.txt``; unprofiled the step takes 100 ms): the
rest of the time the GPU waits for Python to launch the next kernel. Replaying a captured graph launches every kernel of the step
at once, so the step takes its GPU time.

``capture_train_step(model, optimizer, loss_fn, *example_inputs, warmup=3)`` returns ``step``;
``step(*inputs)`` copies ``inputs`` into the captured input buffers (same shapes, dtypes and
devices as the examples), replays forward, backward and ``optimizer.step()``, and returns what
``loss_fn`` returned (the loss, say): tensors the next call overwrites, so ``clone()`` what you
keep. Nothing in it waits for the GPU; ``step(...).item()`` does.

What the capture needs (PyTorch's whole-network capture, see "CUDA Graphs" in PyTorch's CUDA
semantics notes):
- ``loss_fn(*inputs)`` runs the forward (under autocast if wanted: ``torch.autocast("cuda",
  dtype=torch.bfloat16, cache_enabled=False)``, since a weight cast cached outside the graph would
  be read stale inside it) and returns the loss first, then anything else to hand back; it must not
  read values on the host (``.item()``, ``.tolist()``, printing a tensor, boolean indexing) or
  change shapes between calls. Random draws (``torch.rand`` in the masking, drop path) give new
  numbers at each replay.
- ``optimizer`` built with ``capturable=True`` where it has that option (Adam, AdamW: with
  ``fused=True`` too for one kernel a step; SGD has nothing to set), and its learning rate fixed, or
  a tensor that you update in place: a float changed later is not seen by the graph.
- The ``warmup`` calls before the capture are real training steps on the example inputs (they
  compile the Triton kernels, create the optimizer state and let cuBLAS pick its algorithms).
- A capture that fails raises the step's own error, and leaves the process usable: the caller's
  stream current, the graph's memory pool released, the device's random generator cleared of the
  capture mark CUDA leaves on it (or every later random draw, and every replay of an earlier graph,
  would fail) and the gradients dropped. The warm-up and the capture run on one side stream.
- Gradients live in the graph's memory: ``param.grad`` holds the last replay's gradients; do not
  call ``optimizer.zero_grad()`` between replays (the graph writes them afresh each time).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    # Optimizers with a capturable option keep their step count on the host unless it is set. Of
    # those without one, SGD keeps nothing on the host; others (Adagrad's step and its decayed
    # learning rate, LBFGS's closures) would replay the capture's host values forever.
    if "capturable" not in optimizer.defaults and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"{type(optimizer).__name__} has no capturable option and keeps state on the host (its step "
                         "count, say), which a replayed graph would never advance: capture SGD, or an optimizer "
                         "created with capturable=True (Adam, AdamW, ...)")
    not_capturable = [i for i, group in enumerate(optimizer.param_groups) if "capturable" in group and not group["capturable"]]
    if not_capturable:
        raise ValueError(
            f"optimizer param_groups {not_capturable} have capturable=False: create the optimizer with "
            f"capturable=True (e.g. torch.optim.AdamW(params, fused=True, capturable=True)) to capture its step")


def _check_inputs(inputs: Sequence[torch.Tensor], name: str) -> None:
    if not inputs:
        raise ValueError(f"{name}: give at least one input tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{name}[{i}] is on {t.device}: a CUDA graph captures work on CUDA tensors only")


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# Graphs whose capture broke. The pinned-memory allocator keeps a filter that points at the graph
# object (torch 2.11 has no Python call that ends it): the object must outlive that filter.
_BROKEN_GRAPHS: list = []


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)


def _recover_from_broken_capture(device: torch.device, pool) -> list[str]:
    """Undo what a capture that broke leaves behind, on the current (restored) stream; returns
    what could not be undone.

    When a capture breaks, ``capture_end`` raises at ``cudaStreamEndCapture``, before the rest of
    its work (torch 2.11): the caching allocator keeps the graph's pool as a capture underway (its
    memory is never freed, and ``empty_cache`` stops releasing the other pools), and the device's
    generator stays marked as capturing, so every later random draw, and every replay of a graph
    captured earlier, fails with "Offset increment outside graph capture encountered unexpectedly"
    (seen on an H100, 2026-11-27: one failed capture took every later benchmark of its process down
    with it). A capture that completes clears that mark on the same generator state, so an empty
    one is run; swapping in a fresh state instead would leave earlier graphs on the marked one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    problems = []

    def attempt(what, undo) -> bool:
        try:
            undo()
            return True
        except Exception as error:  # noqa: BLE001 - the capture's own error is the one to raise
            problems.append(f"could not {what} ({type(error).__name__}: {error})")
            return False

    # Release only a pool whose capture this call ended: a PyTorch that ends it inside a failed
    # capture_end releases it with the graph too.
    if attempt("end the allocator's capture into the graph's pool", lambda: torch._C._cuda_endAllocateToPool(index, pool)):
        attempt("release the graph's pool", lambda: torch._C._cuda_releasePool(index, pool))

    def clear_generator_mark():
        marker = torch.cuda.CUDAGraph()
        with torch.cuda.graph(marker, stream=torch.cuda.Stream(device)):
            torch.empty(1, device=device).zero_()

    attempt("clear the device generator's capture mark", clear_generator_mark)
    return problems


def _capture(model, optimizer, loss_fn, static_inputs, warmup):
    """Warm up, then capture one step on the current device: (graph, the step's outputs)."""

    returned_tuple = []  # whether loss_fn returns a tuple: step() hands back the same structure

    def train_step():
        out = loss_fn(*static_inputs)
        returned_tuple[:] = [isinstance(out, tuple)]
        out = _as_tuple(out)
        out[0].backward()
        optimizer.step()
        return out

    def drop_gradients():
        # The model's too: a parameter outside the optimizer would otherwise keep its warm-up
        # gradient outside the graph, and every replay would add to it.
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    # Warm up on a side stream and capture on the same one (a capture needs a side stream; one made
    # here is on this device, where torch.cuda.graph's shared default stream may not be).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            drop_gradients()
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    # Gradients are None at the capture, so its backward allocates them in the graph's memory and
    # every replay writes them afresh instead of adding to the previous step's.
    drop_gradients()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # named, so that a broken capture's pool can be released
    failure, static_out = None, None
    with torch.cuda.stream(side):  # restores the caller's stream whatever happens inside
        graph.capture_begin(pool=pool)
        try:
            static_out = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in train_step())
            if not returned_tuple[0]:
                static_out = static_out[0]
        except Exception as error:  # noqa: BLE001 - re-raised below, once the capture has ended
            failure = error
        try:
            graph.capture_end()
        except Exception as end_error:
            # A broken capture ends with a generic "operation failed due to a previous error during
            # capture": the step's own error, kept above, says what went wrong.
            _BROKEN_GRAPHS.append(graph)
            end_failure = end_error
        else:
            end_failure = None
    if end_failure is not None:
        drop_gradients()  # allocated by the capture, never computed
        for problem in _recover_from_broken_capture(static_inputs[0].device, pool):
            _add_note(failure if failure is not None else end_failure, problem)
        if failure is None:
            raise end_failure
    if failure is not None:
        drop_gradients()
        graph = None  # its pool goes with it, not with the exception's lifetime
        raise RuntimeError(
            f"capturing the training step failed: {type(failure).__name__}: {failure} (the step must not read "
            f"tensor values on the host or change shapes; an autograd graph of an earlier step that is still "
            f"alive, a kept loss say, ties the parameters' gradient accumulation to the stream it ran on and "
            f"breaks the capture too; see audiomae.cuda_graph)") from failure
    return graph, static_out


def capture_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor | tuple],
    *example_inputs: torch.Tensor,
    warmup: int = 3,
) -> Callable[..., torch.Tensor | tuple]:
    """Capture ``loss_fn(*inputs)``, its backward and ``optimizer.step()`` in one CUDA graph; the
    returned ``step(*inputs)`` replays it. See the module docstring for what the capture needs."""
    _check_optimizer(optimizer)
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the optimizer state and the kernels must exist "
                         f"before the capture), got {warmup}")
    if not model.training:
        raise ValueError("model is in eval mode: a training step is captured in training mode (model.train())")
    _check_inputs(example_inputs, "example_inputs")
    static_inputs = [t.detach().clone() for t in example_inputs]
    device = static_inputs[0].device
    with torch.cuda.device(device):
        graph, static_out = _capture(model, optimizer, loss_fn, static_inputs, warmup)
    shapes = [(t.shape, t.dtype, t.device) for t in static_inputs]

    def step(*inputs: torch.Tensor):
        if len(inputs) != len(static_inputs):
            raise ValueError(f"step takes {len(static_inputs)} inputs, as captured; got {len(inputs)}")
        for i, (t, (shape, dtype, device)) in enumerate(zip(inputs, shapes)):
            if not isinstance(t, torch.Tensor) or (t.shape, t.dtype, t.device) != (shape, dtype, device):
                got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"inputs[{i}] must match the captured input {(tuple(shape), dtype, device)}, got {got}")
        for static, t in zip(static_inputs, inputs):
            if t.data_ptr() != static.data_ptr():
                static.copy_(t)
        graph.replay()
        return static_out  # what loss_fn returned: a tensor, or a tuple (a 1-tuple included)

    step.graph = graph
    step.static_inputs = static_inputs
    return step
