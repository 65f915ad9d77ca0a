import sys
import types

import pytest
import torch

import audiomae
from audiomae import backends


@pytest.fixture
def fresh_status():
    backends.xformers_status.cache_clear()
    yield
    backends.xformers_status.cache_clear()


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of reference, sdpa, xformers, triton"):
        backends.backend_status("cudnn")


def test_reference_and_sdpa_always_available():
    assert {"reference", "sdpa"} <= set(audiomae.available_backends())


def test_xformers_missing_is_reported(monkeypatch, fresh_status):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    available, reason = backends.backend_status("xformers")
    assert not available and "not importable" in reason
    with pytest.raises(backends.BackendUnavailableError, match="backend 'xformers' is unavailable"):
        backends.check_backend("xformers")


def test_xformers_whose_ops_fail_is_reported(monkeypatch, fresh_status):
    """xformers 0.0.35 imports on torch 2.11 but its CUDA operators do not load: that must read as unavailable."""
    package = types.ModuleType("xformers")
    package.__version__ = "0.0.35"
    ops = types.ModuleType("xformers.ops")

    def broken(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    ops.memory_efficient_attention = broken
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    available, reason = backends.xformers_status()
    assert not available
    if torch.cuda.is_available():
        assert "imports but its CUDA operators do not run" in reason and "No operator found" in reason
    else:
        assert "needs a CUDA device" in reason


def test_set_backend_reaches_every_attention_module():
    model = audiomae.MaskedAutoencoderViT(img_size=(128, 64), embed_dim=32, depth=2, num_heads=2,
                                          decoder_embed_dim=256, decoder_mode=1)
    model.set_backend("sdpa")
    holders = [m for m in model.modules() if hasattr(m, "backend")]
    # The model's token ops, 2 encoder and 16 decoder attentions, and their MLPs (each decoder
    # attention also has its meta-MLP).
    assert len(holders) == 1 + 2 * (2 + 16) + 16
    assert all(m.backend == "sdpa" for m in holders)


def test_triton_refuses_a_decoder_head_dim_its_kernel_cannot_tile():
    """Decoder mode 1 always has 16 heads: a width of 64 gives head dim 4, which the window-attention
    kernel does not take. Building or switching to "triton" says so, and a refused switch changes
    no module."""
    small = dict(img_size=(128, 64), embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=64, decoder_mode=1)
    with pytest.raises(ValueError, match="head dims 16 to 128; this decoder's is 4"):
        audiomae.MaskedAutoencoderViT(**small, backend="triton")
    model = audiomae.MaskedAutoencoderViT(**small, backend="sdpa")
    with pytest.raises(ValueError, match="head dims 16 to 128"):
        model.set_backend("triton")
    assert all(m.backend == "sdpa" for m in model.modules() if hasattr(m, "backend"))
    audiomae.MaskedAutoencoderViT(**{**small, "decoder_embed_dim": 256}, backend="triton")  # head dim 16
