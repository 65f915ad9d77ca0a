"""Estimate: what one pretraining step keeps for its backward, per backend, without running it.

``bench_models`` measures the step's peak memory on a GPU. This suite estimates it anywhere, GPU
or not: it runs the forward of ``audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True)``
at the issue's batch of 64 (mask ratio 0.8, bf16 autocast) on fake CUDA tensors (shapes and dtypes,
no arithmetic, no device), then walks the autograd graph and adds up every distinct storage it holds
for the backward, parameters excluded: the activation memory that the backward starts from. The
static part is counted from the parameters: fp32 weights, their gradients and AdamW's two moments.
``estimated_total_bytes`` is their sum, an upper bound on the peak in the sense that gradients and
activations never coexist whole (the backward frees activations as it makes gradients), and a
lower one in that the allocator's rounding, cuBLAS workspaces and transient tensors are not counted.

Autocast is switched on for the fake CUDA tensors directly (``torch.set_autocast_enabled``), so
casts happen as on the GPU. Fake CUDA tensors have no device to pick an SDPA kernel for, so global
attention on the ``sdpa`` and ``triton`` backends is counted as the H100 runs it, through the flash
kernel (``aten._scaled_dot_product_flash_attention``: q, k, v, the output and its log-sum-exp),
and the ``sdpa`` backend's masked window attention through memory-efficient attention, which is
what SDPA picks for a mask there.
The row ``triton save=hidden`` keeps fc1's output in every MLP as well (``kernels.gelu_mlp``), to
show what the default recomputation saves. Rows list the five largest holders by autograd node.

The same count for issue 7: one MAE-AST pretraining step against its SSAST baseline at equal
encoder depth (6 and 12; patch and frame tokens; batch 32 ten-second clips; bf16 autocast; SSAST
and MAE-AST each on SDPA and on the ``"triton"`` backend, and both on the ``"reference"`` backend,
the explicit-softmax attention of the official code the paper timed), with ``saved_ratio_vs_ssast``
and ``total_ratio_vs_ssast`` the baseline's counted activations and total over the row's: SSAST on
the same ``"reference"`` backend for the reference rows, SSAST on SDPA for the others
(``ssast_baseline`` names it).
"""
from __future__ import annotations

import collections
import contextlib

import torch

SUITE = "memory_estimate"
BATCH = 64
VARIANTS = ("reference", "sdpa", "triton", "triton save=hidden")
MAE_AST_BATCH = 32
MAE_AST_CASES = [(tokens, depth, mode, backend) for tokens in ("patch", "frame") for depth in (6, 12)
                 for mode, backend in (("ssast", "sdpa"), ("ssast", "triton"), ("mae", "sdpa"), ("mae", "triton"),
                                       ("ssast", "reference"), ("mae", "reference"))]
# The SSAST row each MAE-AST row is compared with: the explicit-softmax attention of the official
# code against its own SSAST (the paper's setting), every other backend against SSAST on SDPA.
MAE_AST_BASELINE = {"reference": "reference", "sdpa": "sdpa", "triton": "sdpa"}


def _h100_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as an H100 runs it: the flash kernel, or memory-efficient attention with a mask."""
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    lead = q.shape[:-3]  # the kernels take [batch, heads, tokens, dim]: fold any other leading axes
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    bias = attn_mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2]).reshape(-1, *q4.shape[1:3], k.shape[-2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q4, k4, v4, bias, True, dropout_p, is_causal,
                                                                  scale=scale)[0]
    return out.reshape(*lead, *out.shape[1:])


@contextlib.contextmanager
def _cuda_autocast_on_fake_tensors():
    """bf16 CUDA autocast without ``torch.autocast`` (which refuses when no GPU is visible);
    the previous state comes back afterwards."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
        torch.clear_autocast_cache()


def _saved_storages(root, exclude: set) -> tuple[dict, collections.Counter]:
    """{storage: bytes} of every tensor the graph behind ``root`` saved, and bytes by node type."""
    seen, by_node, visited, stack = {}, collections.Counter(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        saved = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name, None)
                saved += [value] if isinstance(value, torch.Tensor) else [
                    t for t in value if isinstance(t, torch.Tensor)] if isinstance(value, (tuple, list)) else []
        saved += [t for t in getattr(node, "saved_tensors", ()) or () if isinstance(t, torch.Tensor)]
        for t in saved:
            key = t.untyped_storage()._cdata
            if key not in exclude and key not in seen:
                seen[key] = t.untyped_storage().nbytes()
                by_node[type(node).__name__.removeprefix("GeneratedBackwardFor_").removesuffix("Backward")
                        .removesuffix("_default")] += seen[key]
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen, by_node


def _count(build, forward) -> dict:
    """Build a model and run its loss on fake CUDA tensors under bf16 autocast; what it keeps."""
    from unittest import mock

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(F, "scaled_dot_product_attention", _h100_sdpa):
        with torch.device("cuda"):
            model = build()
        weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        with _cuda_autocast_on_fake_tensors():
            loss = forward(model)
        saved, by_node = _saved_storages(loss.grad_fn, weights)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = 4 * params + 4 * trainable + 8 * trainable  # weights, gradients, AdamW's exp_avg and exp_avg_sq
    activations = sum(saved.values())
    return {"saved_bytes": activations, "static_bytes": static, "estimated_total_bytes": activations + static,
            "largest_holders": ", ".join(f"{name} {b / 2**30:.2f} GiB" for name, b in by_node.most_common(5))}


def estimate(variant: str, batch: int = BATCH, img_size=(1024, 128)) -> dict:
    """Saved-activation and static bytes of one AudioMAE pretraining step of ``variant`` (see the module doc)."""
    import audiomae
    import audiomae.layers as layers

    backend, _, save = variant.partition(" save=")

    def build():
        model = audiomae.mae_vit_base_patch16(decoder_mode=1, norm_pix_loss=True, backend=backend, img_size=img_size)
        for module in model.modules():
            if save and isinstance(module, layers.Mlp):
                module.save = save
        return model

    return _count(build, lambda model: model(torch.randn(batch, 1, *img_size, device="cuda"), mask_ratio=0.8)[0])


def estimate_mae_ast(mode: str, backend: str, tokens: str, depth: int, batch: int = MAE_AST_BATCH,
                     frames: int = 1024) -> dict:
    """The same count for one MAE-AST pretraining step (issue 7's comparison: ``mode="mae"`` against
    the SSAST baseline ``mode="ssast"`` at equal encoder depth, 75 % masking, 10-second clips)."""
    from audiomae.mae_ast import MAEAST

    return _count(lambda: MAEAST(tokens=tokens, mode=mode, encoder_depth=depth, backend=backend),
                  lambda model: model(torch.randn(batch, frames, 128, device="cuda")).loss)


def run(device="cuda", quick: bool = False) -> list[dict]:
    del device  # fake CUDA tensors on any machine: the estimate is the same everywhere
    from benches.harness import device_info

    info = device_info("cpu")
    rows, reference = [], None
    for variant in VARIANTS:
        result = estimate(variant)
        reference = reference or result
        rows.append({
            "suite": SUITE, "name": "pretrain step memory (estimate)", "impl": variant,
            "shape": f"B={BATCH} mae_vit_base_patch16 decoder_mode=1 mask 0.8", "dtype": "bf16-autocast",
            **result,
            "saved_fraction_of_reference": result["saved_bytes"] / reference["saved_bytes"],
            "total_fraction_of_reference": result["estimated_total_bytes"] / reference["estimated_total_bytes"],
            "note": (f"estimated total {result['estimated_total_bytes'] / 2**30:.2f} GiB "
                     f"(x{result['estimated_total_bytes'] / reference['estimated_total_bytes']:.2f}), activations "
                     f"{result['saved_bytes'] / 2**30:.2f} GiB: counted on fake tensors, not measured"),
            **{k: v for k, v in info.items() if k != "device"},
        })
    baselines = {}
    for tokens, depth, mode, backend in MAE_AST_CASES:
        result = estimate_mae_ast(mode, backend, tokens, depth)
        against = MAE_AST_BASELINE[backend]
        if mode == "ssast" and against == backend:
            baselines[tokens, depth, backend] = result
        baseline = baselines[tokens, depth, against]  # MAE_AST_CASES lists each baseline first
        total = baseline["estimated_total_bytes"] / result["estimated_total_bytes"]
        saved = baseline["saved_bytes"] / result["saved_bytes"]
        rows.append({
            "suite": SUITE, "name": f"MAE-AST step memory (estimate) {tokens} depth {depth}", "impl": f"{mode}/{backend}",
            "shape": f"B={MAE_AST_BATCH} T=1024 {tokens} tokens depth {depth} mask 0.75", "dtype": "bf16-autocast",
            **result, "total_ratio_vs_ssast": total, "saved_ratio_vs_ssast": saved, "ssast_baseline": f"ssast/{against}",
            "note": (f"activations {result['saved_bytes'] / 2**30:.2f} GiB ({saved:.2f}x less than ssast/{against}), total "
                     f"{result['estimated_total_bytes'] / 2**30:.2f} GiB ({total:.2f}x): counted on fake tensors, "
                     "not measured"),
            **{k: v for k, v in info.items() if k != "device"},
        })
    return rows


if __name__ == "__main__":
    for r in run():
        print(f"{r['name'][-18:]:18s} {r['impl']:20s} {r['note']}   {r['largest_holders']}")
