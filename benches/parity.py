"""Parity cases: every kernel and every model backend against its float64 reference.

Each case calls an op's public API in one dtype on fresh random inputs, runs the reference in
float64 on the same (already rounded) inputs, and returns one row per pass (forward, backward)
with the worst tensor of that pass:

- ``max_abs``: the largest ``|actual - expected|`` over the tensor;
- ``max_rel``: ``max_abs / max |expected|``, the error relative to the tensor's scale (the measure
  the op tests use; an element-wise ratio would blow up on the entries near zero);
- ``status``: PASS when the tolerance's criterion (``max_rel``, or ``max_abs`` for fbank) is within
  it and every element is finite; FAIL otherwise; SKIP with a reason where this machine cannot run
  the case meaningfully; ERROR (with the message) when the op is missing or raises.

Tolerances are the ones the ops document: token gather/unshuffle copy and add in fp32 and round
once (``ROUNDING``); window attention ``ATTENTION`` as in ``tests/test_window_attention.py``;
fbank 1e-3 absolute on the log features (issue 5). Whole models (``models``): a backend in a
given dtype may be off the float64 model by ``MODEL`` or by twice what the ``"reference"``
backend is off in that same dtype, whichever is larger; switching backends must not cost more
accuracy than the official eager math has at that precision. A model gradient's relative error
is taken against its own largest entry or ``GRAD_FLOOR`` times the model's largest gradient,
whichever is larger, since some are zero in exact arithmetic.

Shapes: the targets' layouts at small batch on the GPU; tiny shapes on the CPU, where the
Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, set by the caller before
any ``kernels`` module is imported). The interpreter's bf16 ``tl.dot`` is wrong, so bf16 cases
that reach one are skipped on the CPU and checked on the GPU.

Nothing here imports ``kernels`` or ``audiomae`` at module level: an op whose module is absent
becomes an ERROR row, not a failed import of the whole table.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
FBANK_ABS = 1e-3
MODEL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
GRAD_FLOOR = 1e-3  # model gradients: relative errors are taken against at least this much of the largest
BF16_DOT_ON_CPU = "the Triton interpreter computes bf16 tl.dot wrongly; checked on the GPU"


class Skip(Exception):
    """Raised by a case that cannot run meaningfully here; the message is the reason."""


@dataclass
class Case:
    """One parity case: ``run(device, dtype, quick)`` returns rows (see ``compare``)."""

    op: str
    run: Callable[[torch.device, torch.dtype, bool], list[dict]]
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")


def error_stats(actual: torch.Tensor, expected: torch.Tensor, scale_floor: float = 0.0) -> tuple[float, float, bool]:
    """(max_abs, max_rel, finite) of ``actual`` against float64 ``expected``; the relative error's
    scale is ``max |expected|``, or ``scale_floor`` where that is larger."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}")
    finite = bool(torch.isfinite(actual).all())
    if expected.numel() == 0:
        return 0.0, 0.0, finite
    diff = (actual.detach().double() - expected.detach().double()).abs()
    max_abs = float(diff.max())
    scale = max(float(expected.detach().abs().max()), scale_floor)
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)), finite


def compare(impl: str, pass_name: str, actual: dict, expected: dict, tolerance: float, criterion: str = "max_rel",
            scale_floor: float = 0.0) -> dict:
    """One row for a pass: the worst of its tensors under ``criterion`` against ``tolerance``."""
    worst = None
    for name, tensor in actual.items():
        if tensor is None or expected.get(name) is None:
            raise ValueError(f"{pass_name}: {name} is missing from the {'kernel' if tensor is None else 'reference'}")
        max_abs, max_rel, finite = error_stats(tensor, expected[name], scale_floor)
        stats = {"max_abs": max_abs, "max_rel": max_rel, "finite": finite, "tensor": name}
        if worst is None or not finite or stats[criterion] > worst[criterion] and worst["finite"]:
            worst = stats
    passed = worst["finite"] and worst[criterion] <= tolerance
    return {"impl": impl, "pass": pass_name, "tensor": worst["tensor"], "max_abs": worst["max_abs"],
            "max_rel": worst["max_rel"], "tolerance": tolerance, "criterion": criterion,
            "status": "PASS" if passed else "FAIL", "note": "" if worst["finite"] else "non-finite output"}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(tensors: dict) -> dict:
    return {name: t.grad for name, t in tensors.items()}


def _check_op(impl: str, fn, reference, inputs: dict, tolerance: float) -> list[dict]:
    """Forward and backward of ``fn(**inputs)`` against ``reference`` on the float64 copies.

    ``inputs`` holds differentiable tensors in the case's dtype and anything else as is."""
    float_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    ours = {k: _leaf(v) for k, v in float_inputs.items()}
    theirs = {k: _leaf(v.double()) for k, v in float_inputs.items()}
    out = fn(**{**inputs, **ours})
    expected = reference(**{**inputs, **theirs})
    grad = torch.randn_like(expected).to(out.dtype)
    out.backward(grad)
    expected.backward(grad.double())
    return [compare(impl, "forward", {"out": out}, {"out": expected}, tolerance),
            compare(impl, "backward", {f"grad {k}": v for k, v in _grads(ours).items()},
                    {f"grad {k}": v for k, v in _grads(theirs).items()}, tolerance)]


# ----------------------------------------------------------------------------------- kernels
def gather_tokens_case(device, dtype, quick):
    from kernels.gather_tokens import gather_tokens
    from kernels.reference.gather_tokens import gather_tokens as reference

    B, L, K, C = (4, 512, 102, 768) if device.type == "cuda" else (3, 37, 8, 24)
    inputs = {"x": torch.randn(B, L, C, device=device, dtype=dtype),
              "ids_keep": torch.rand(B, L, device=device).argsort(1)[:, :K],
              "pos_embed": torch.randn(L, C, device=device, dtype=dtype)}
    return _check_op("triton", gather_tokens, reference, inputs, ROUNDING[dtype])


def gather_tokens_2d_case(device, dtype, quick):
    from kernels.gather_tokens import gather_tokens_2d
    from kernels.reference.gather_tokens import gather_tokens_2d as reference

    B, (T, F), (Kt, Kf), C = (4, (64, 8), (51, 6), 768) if device.type == "cuda" else (2, (7, 5), (4, 3), 24)
    inputs = {"x": torch.randn(B, T * F, C, device=device, dtype=dtype),
              "ids_keep_t": torch.rand(B, T, device=device).argsort(1)[:, :Kt],
              "ids_keep_f": torch.rand(B, F, device=device).argsort(1)[:, :Kf],
              "grid": (T, F), "pos_embed": torch.randn(T * F, C, device=device, dtype=dtype)}
    return _check_op("triton", gather_tokens_2d, reference, inputs, ROUNDING[dtype])


def unshuffle_tokens_case(device, dtype, quick):
    from kernels.reference.unshuffle_tokens import unshuffle_tokens as reference
    from kernels.unshuffle_tokens import unshuffle_tokens

    B, L, K, C = (4, 512, 102, 512) if device.type == "cuda" else (3, 37, 9, 24)
    inputs = {"x": torch.randn(B, K, C, device=device, dtype=dtype),
              "ids_restore": torch.rand(B, L, device=device).argsort(1).argsort(1),
              "mask_token": torch.randn(1, 1, C, device=device, dtype=dtype),
              "pos_embed": torch.randn(L, C, device=device, dtype=dtype)}
    return _check_op("triton", unshuffle_tokens, reference, inputs, ROUNDING[dtype])


def window_attention_case(device, dtype, quick):
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise Skip(BF16_DOT_ON_CPU)
    from kernels.reference.window_attention import window_attention_reference
    from kernels.window_attention import window_attention

    if device.type == "cuda":  # the decoder's layout: grid 64 x 8, C=512, 16 heads, window 4 x 4
        B, grid, heads, head_dim = 2, (64, 8), 16, 32
    else:
        B, grid, heads, head_dim = 2, (8, 8), 2, 16
    window, shift, N = (4, 4), (2, 0), 16
    inputs = {"qkv": torch.randn(B, grid[0] * grid[1], 3 * heads * head_dim, device=device, dtype=dtype),
              "tau": (torch.rand(heads, device=device) * 0.9 + 0.05).to(dtype),
              "bias": torch.randn(heads, N, N, device=device, dtype=dtype)}

    def call(fn):
        return lambda **kw: fn(kw["qkv"], grid=grid, window=window, shift=shift, num_heads=heads,
                               tau=kw["tau"], bias=kw["bias"])

    return _check_op("triton", call(window_attention), call(window_attention_reference), inputs, ATTENTION[dtype])


def post_norm_residual_case(device, dtype, quick):
    from kernels.post_norm_residual import post_norm_residual
    from kernels.reference.post_norm_residual import post_norm_residual as reference

    B, L, C = (4, 512, 512) if device.type == "cuda" else (3, 37, 24)  # the decoder's residual stream
    inputs = {"x": torch.randn(B, L, C, device=device, dtype=dtype),
              "branch": (2 * torch.randn(B, L, C, device=device) + 0.5).to(dtype),
              # LayerNorm parameters as training leaves them: near 1 and near 0.
              "weight": (1 + 0.2 * torch.randn(C, device=device)).to(dtype),
              "bias": (0.2 * torch.randn(C, device=device)).to(dtype)}
    return _check_op("triton", post_norm_residual, reference, inputs, ROUNDING[dtype])


def post_norm_residual_copy_case(device, dtype, quick):
    """The residual with its copy (``copy_dtype``, as the decoder feeds its Linears): both outputs
    take a gradient, which the kernel's backward adds up."""
    from kernels.post_norm_residual import post_norm_residual
    from kernels.reference.post_norm_residual import post_norm_residual as reference

    def kernel(**kw):
        out, copy = post_norm_residual(**kw, copy_dtype=dtype)
        return out + 0.5 * copy.to(out.dtype)

    def expected(**kw):  # float64, the copy rounded to the case's dtype as the kernel's is
        out = reference(**kw)
        return out + 0.5 * out.to(dtype).to(out.dtype)

    B, L, C = (4, 512, 512) if device.type == "cuda" else (3, 37, 24)
    inputs = {"x": torch.randn(B, L, C, device=device, dtype=dtype),
              "branch": (2 * torch.randn(B, L, C, device=device) + 0.5).to(dtype),
              "weight": (1 + 0.2 * torch.randn(C, device=device)).to(dtype),
              "bias": (0.2 * torch.randn(C, device=device)).to(dtype)}
    return _check_op("triton", kernel, expected, inputs, ROUNDING[dtype])


def linear_column_sum_case(device, dtype, quick):
    """The Linear whose bias gradient is ``kernels.column_sum`` (the decoder's attention Linears
    on the triton backend), at the decoder's qkv projection: a matmul, so ``ATTENTION``'s tolerance."""
    import torch.nn.functional as F

    from kernels.column_sum import linear

    B, L, C_in, C_out = (4, 512, 512, 1536) if device.type == "cuda" else (3, 37, 24, 40)
    inputs = {"x": torch.randn(B, L, C_in, device=device, dtype=dtype),
              "weight": (torch.randn(C_out, C_in, device=device) * C_in**-0.5).to(dtype),
              "bias": torch.randn(C_out, device=device, dtype=dtype)}
    return _check_op("triton", linear, F.linear, inputs, ATTENTION[dtype])


def _mlp_inputs(device, dtype) -> dict:
    M, C, H = (4 * 512, 512, 2048) if device.type == "cuda" else (37, 24, 96)  # the decoder's MLP
    return {"x": torch.randn(M, C, device=device, dtype=dtype),
            "fc1_weight": (torch.randn(H, C, device=device) / C**0.5).to(dtype),
            "fc1_bias": (0.1 * torch.randn(H, device=device)).to(dtype),
            "fc2_weight": (torch.randn(C, H, device=device) / H**0.5).to(dtype),
            "fc2_bias": (0.1 * torch.randn(C, device=device)).to(dtype)}


def gelu_mlp_case(device, dtype, quick):
    """The MLP, whose backward's GELU pass is a Triton kernel (kernels/gelu_grad.py)."""
    from kernels.gelu_mlp import gelu_mlp
    from kernels.reference.gelu_mlp import gelu_mlp as reference

    return _check_op("triton", gelu_mlp, reference, _mlp_inputs(device, dtype), ATTENTION[dtype])


def gelu_mlp_fused_case(device, dtype, quick):
    """The MLP with GELU in its matmuls' epilogues (``fused_matmul=True``, kernels/gelu_matmul.py)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise Skip(BF16_DOT_ON_CPU)
    from kernels.gelu_mlp import gelu_mlp
    from kernels.reference.gelu_mlp import gelu_mlp as reference

    return _check_op("triton", lambda **kw: gelu_mlp(**kw, fused_matmul=True), reference,
                     _mlp_inputs(device, dtype), ATTENTION[dtype])


FBANK_OPTIONS = dict(htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                     num_mel_bins=128, dither=0.0, frame_shift=10)


def _clips(num_clips: int, seconds: float, device) -> torch.Tensor:
    """Noise, a harmonic tone and a chirp: bins from loud to 1e-10 below the peak."""
    n = int(16000 * seconds)
    t = torch.arange(n, dtype=torch.float64) / 16000
    kinds = [0.1 * torch.randn(n, dtype=torch.float64),
             0.5 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 1320 * t),
             0.3 * torch.sin(2 * math.pi * (100 + 3000 * t / seconds) * t)]
    return torch.stack([kinds[i % len(kinds)] for i in range(num_clips)]).to(device)


def fbank_case(device, dtype, quick):
    import torchaudio.compliance.kaldi as kaldi

    from kernels.fbank import fbank

    clips = _clips(*((8, 10.0) if device.type == "cuda" else (3, 1.0)), device).to(dtype)
    expected = torch.stack([kaldi.fbank(c.double().cpu().unsqueeze(0), **FBANK_OPTIONS) for c in clips]).to(device)
    rows = []
    for backend in ("torch", "cuda"):
        if backend == "cuda" and device.type != "cuda":
            rows.append({"impl": backend, "pass": "forward", "status": "SKIP", "note": "the CUDA kernel needs a GPU"})
            continue
        out = fbank(clips, backend=backend, **FBANK_OPTIONS)
        rows.append(compare(backend, "forward", {"features": out}, {"features": expected}, FBANK_ABS, "max_abs"))
    return rows


# ------------------------------------------------------------------------------------ models
def _model_configs(device, quick):
    """(name, builder, input shape, noise maker, loss) per model on this device."""
    import torch.nn as nn

    import audiomae

    if device.type == "cuda":
        mae = lambda: audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True)  # noqa: E731
        vit = lambda: audiomae.vit_base_patch16(num_classes=527)  # noqa: E731
        batch, img = 2, (1024, 128)
    else:
        # The 16-block Swin decoder through the interpreter takes about a minute a step on two
        # cores: the quick table checks the global decoder (gather and unshuffle kernels) and
        # leaves window attention to its own rows; the full CPU table runs the Swin decoder too.
        decoder_mode = 0 if quick else 1
        img = (64, 64)
        mae = lambda: audiomae.MaskedAutoencoderViT(  # noqa: E731
            img_size=img, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256, decoder_depth=2,
            decoder_num_heads=16, mlp_ratio=2.0, norm_layer=nn.LayerNorm, decoder_mode=decoder_mode,
            norm_pix_loss=True)
        vit = lambda: audiomae.VisionTransformer(img_size=img, embed_dim=64, depth=2, num_heads=4,  # noqa: E731
                                                 num_classes=5)
        batch = 2
    return mae, vit, batch, img


def _model_outputs(model, kind, imgs, noise, target):
    """Forward outputs and parameter gradients of one pretraining or fine-tuning step."""
    model.zero_grad(set_to_none=True)
    if kind == "mae":
        loss, pred, _, _ = model(imgs, mask_ratio=0.8, noise=noise)
        forward = {"loss": loss, "pred": pred}
    else:
        logits = model(imgs, mask_t_prob=0.2, mask_f_prob=0.2, noise=noise)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        forward = {"loss": loss, "logits": logits}
    loss.backward()
    grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in forward.items()}, grads


def models_case(device, dtype, quick):
    """MAE pretraining (mask 0.8, norm-pix loss) and ViT fine-tuning (2-D mask 0.2/0.2), every
    available backend in ``dtype`` (autocast for bf16/fp16, as in training) against the float64
    model with the ``"reference"`` backend, on fixed noise."""
    if device.type == "cpu" and dtype != torch.float32:
        raise Skip("mixed precision is checked on the GPU, where these models train under autocast; "
                   "on the CPU the interpreter's bf16 tl.dot is wrong")
    import audiomae

    mae, vit, batch, img = _model_configs(device, quick)
    status = {b: audiomae.backend_status(b) for b in ("reference", "sdpa", "triton", "xformers")}
    backends = [b for b, (available, _) in status.items() if available]
    # An unavailable backend is a SKIP row with its reason, never a row that silently goes missing.
    rows = [{"impl": f"{kind}:{b}", "pass": "-", "status": "SKIP", "note": f"unavailable: {reason}"}
            for kind in ("mae", "vit") for b, (available, reason) in status.items() if not available]
    for kind, build in (("mae", mae), ("vit", vit)):
        torch.manual_seed(0)
        # eval(): the Swin decoder's meta-MLP dropout would draw different masks in each copy,
        # which is not a difference between implementations.
        model = build().to(device).eval()
        imgs = torch.randn(batch, 1, *img, device=device)
        T, F = model.grid
        noise = torch.rand(batch, T * F, device=device) if kind == "mae" else (
            torch.rand(batch, T, device=device), torch.rand(batch, F, device=device))
        target = (torch.rand(batch, model.num_classes, device=device) < 0.1).float() if kind == "vit" else None
        ref_model = copy.deepcopy(model).double().set_backend("reference")
        exp_fwd, exp_grads = _model_outputs(ref_model, kind, imgs.double(), noise, target)
        errors = {}
        for backend in backends:
            model.set_backend(backend)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fwd, grads = _model_outputs(model, kind, imgs, noise, target)
            errors[backend] = (fwd, grads)
        # Some gradients are zero in exact arithmetic (a bias added to every logit of a head does
        # not move its softmax): rounding noise there is measured against the model's gradient
        # scale, not against zero.
        floors = {"forward": 0.0, "backward": GRAD_FLOOR * max(float(g.abs().max()) for g in exp_grads.values())}
        passes = {"forward": exp_fwd, "backward": exp_grads}
        ref_error = {p: compare("reference", p, errors["reference"][i], passes[p], math.inf,
                                scale_floor=floors[p])["max_rel"] for i, p in enumerate(passes)}
        for backend, outputs in errors.items():
            for actual, (pass_name, expected) in zip(outputs, passes.items()):
                tolerance = max(MODEL[dtype], 2 * ref_error[pass_name])
                rows.append(compare(f"{kind}:{backend}", pass_name, actual, expected, tolerance,
                                    scale_floor=floors[pass_name]))
    return rows


CASES: dict[str, Case] = {
    case.op: case
    for case in (
        Case("gather_tokens", gather_tokens_case),
        Case("gather_tokens_2d", gather_tokens_2d_case),
        Case("unshuffle_tokens", unshuffle_tokens_case),
        Case("window_attention", window_attention_case),
        Case("post_norm_residual", post_norm_residual_case),
        Case("post_norm_residual_copy", post_norm_residual_copy_case),
        Case("linear_column_sum", linear_column_sum_case),
        Case("gelu_mlp_fused", gelu_mlp_fused_case),
        Case("gelu_mlp", gelu_mlp_case),
        Case("fbank", fbank_case, dtypes=("float32", "float64")),
        Case("models", models_case),
    )
}


def run_case(case: Case, device: torch.device, dtype_name: str, quick: bool) -> list[dict]:
    """The case's rows, each tagged with op and dtype; a Skip or any error becomes one row."""
    base = {"suite": "parity", "op": case.op, "dtype": dtype_name, "device": str(device)}
    torch.manual_seed(0)
    try:
        rows = case.run(device, DTYPES[dtype_name], quick)
    except Skip as reason:
        return [{**base, "impl": "-", "pass": "-", "status": "SKIP", "note": str(reason)}]
    except Exception as error:  # noqa: BLE001 - a missing or broken op is a row, not a crash
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return [{**base, "impl": "-", "pass": "-", "status": "ERROR", "note": message}]
    return [{**base, **row} for row in rows]
