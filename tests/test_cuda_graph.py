"""audiomae.cuda_graph.capture_train_step: input checks here, replay against eager steps on the GPU."""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

import audiomae
from audiomae.cuda_graph import capture_train_step

LN = partial(nn.LayerNorm, eps=1e-6)


def tiny_mae(backend="triton"):
    return audiomae.MaskedAutoencoderViT(
        img_size=(128, 64), patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256,
        decoder_depth=2, decoder_num_heads=16, mlp_ratio=2.0, norm_layer=LN, decoder_mode=1, norm_pix_loss=True,
        backend=backend)


def _loss_fn(model):
    return lambda imgs, noise: model(imgs, mask_ratio=0.75, noise=noise)[0]


def test_optimizer_must_be_capturable():
    model = tiny_mae("reference")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="capturable=True"):
        capture_train_step(model, optimizer, _loss_fn(model), torch.zeros(1))
    # SGD has no such option and nothing on the host: it gets as far as the input check
    with pytest.raises(ValueError, match="is on cpu"):
        capture_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss_fn(model), torch.zeros(1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        capture_train_step(model, object(), _loss_fn(model), torch.zeros(1))
    # Adagrad has no capturable option but keeps its step and decayed rate on the host
    with pytest.raises(ValueError, match="Adagrad has no capturable option"):
        capture_train_step(model, torch.optim.Adagrad(model.parameters(), lr_decay=0.5), _loss_fn(model), torch.zeros(1))


def test_inputs_must_be_cuda_tensors_and_warmup_positive():
    model = tiny_mae("reference")
    optimizer = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is on cpu"):
        capture_train_step(model, optimizer, _loss_fn(model), torch.zeros(2, 1, 128, 64))
    with pytest.raises(TypeError, match=r"example_inputs\[0\] must be a torch.Tensor"):
        capture_train_step(model, optimizer, _loss_fn(model), 3.0)
    with pytest.raises(ValueError, match="at least one input"):
        capture_train_step(model, optimizer, _loss_fn(model))
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        capture_train_step(model, optimizer, _loss_fn(model), torch.zeros(1), warmup=0)
    with pytest.raises(ValueError, match="eval mode"):
        capture_train_step(model.eval(), optimizer, _loss_fn(model), torch.zeros(1))


def _optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_replays_match_eager_steps(backend, optimizer):
    """Same weights, same batches and same masking noise: the graph's replays must train the model
    as eager steps do (and each replay must take the new inputs, not the captured ones)."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = tiny_mae(backend).to(device).train()
    # The decoder's meta-MLPs use dropout: the two runs would draw different masks from the one
    # generator (a replay draws its own). Without it both run the same kernels on the same data.
    for module in eager.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    graphed = copy.deepcopy(eager)
    batches = [(torch.randn(2, 1, 128, 64, device=device), torch.rand(2, 32, device=device)) for _ in range(5)]
    opt_eager, opt_graph = _optimizer(optimizer, eager), _optimizer(optimizer, graphed)

    warmup = 2
    losses_eager = []
    for imgs, noise in [batches[0]] * warmup + batches[1:]:
        opt_eager.zero_grad(set_to_none=True)
        loss = _loss_fn(eager)(imgs, noise)
        loss.backward()
        opt_eager.step()
        losses_eager.append(loss.item())

    step = capture_train_step(graphed, opt_graph, _loss_fn(graphed), *batches[0], warmup=warmup)
    losses_graph = [step(*batch).item() for batch in batches[1:]]

    torch.testing.assert_close(torch.tensor(losses_graph), torch.tensor(losses_eager[warmup:]), rtol=1e-4, atol=1e-6)
    if optimizer == "sgd":
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        # Adam divides by the gradients' running RMS: where a gradient is near zero, a last-bit
        # difference (cuBLAS may pick another algorithm on the capture stream) can flip an update
        # of size lr. Such elements must be rare; a replay that trained wrongly moves them all.
        off = sum(((b - a).abs() > 1e-5 + 1e-4 * a.abs()).sum().item()
                  for a, b in zip(eager.parameters(), graphed.parameters()))
        total = sum(p.numel() for p in eager.parameters())
        assert off <= max(1, total // 10_000), f"{off} of {total} weights differ after the same steps"


@pytest.mark.gpu
def test_step_rejects_inputs_unlike_the_captured_ones():
    device = torch.device("cuda")
    model = tiny_mae("triton").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True, capturable=True)
    imgs, noise = torch.randn(2, 1, 128, 64, device=device), torch.rand(2, 32, device=device)
    step = capture_train_step(model, optimizer, _loss_fn(model), imgs, noise, warmup=1)
    with pytest.raises(ValueError, match=r"inputs\[0\] must match the captured input"):
        step(torch.randn(3, 1, 128, 64, device=device), noise)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        step(imgs)
    # step() hands back what loss_fn returned: a 1-tuple stays a tuple
    as_tuple = capture_train_step(model, optimizer, lambda *a: (_loss_fn(model)(*a),), imgs, noise, warmup=1)
    out = as_tuple(imgs, noise)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dim() == 0


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_process_usable():
    """A capture that breaks (here: a host read inside the step) raises the step's own error and
    leaves the process as it found it: the caller's stream current, random draws working (CUDA
    leaves a broken capture's generator marked as capturing), a graph captured before it still
    replaying, and a later capture possible."""
    device = torch.device("cuda")
    torch.manual_seed(0)

    def dropout_model():
        return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).to(device).train()

    def squared(model):
        return lambda inputs: model(inputs).square().mean()

    x = torch.randn(4, 8, device=device)
    earlier = dropout_model()
    earlier_step = capture_train_step(earlier, torch.optim.SGD(earlier.parameters(), lr=0.1), squared(earlier), x,
                                      warmup=1)
    earlier_step(x)

    model = dropout_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def reads_on_the_host(inputs):
        loss = model(inputs).square().mean()
        return loss * (1.0 if loss.item() >= 0 else -1.0)

    with pytest.raises(RuntimeError, match="capturing the training step failed"):
        capture_train_step(model, optimizer, reads_on_the_host, x, warmup=1)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert all(p.grad is None for p in model.parameters())
    assert torch.rand(16, device=device).shape == (16,)
    assert torch.isfinite(earlier_step(torch.randn(4, 8, device=device))).all()

    step = capture_train_step(model, optimizer, squared(model), x, warmup=1)
    losses = torch.stack([step(torch.randn(4, 8, device=device)).clone() for _ in range(3)])
    assert torch.isfinite(losses).all() and losses.unique().numel() == 3  # new inputs, new dropout masks


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_mae_ast_step_replays_like_eager_steps(backend):
    """MAE-AST's step captured after eager steps on the default stream (whose graphs are freed):
    the replays train like eager steps from the same weights on the same masking (SGD)."""
    from audiomae.mae_ast import MAEAST

    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = MAEAST(tokens="patch", encoder_depth=1, decoder_depth=1, embed_dim=64, num_heads=4,
                   backend=backend).to(device).train()
    eager(torch.randn(2, 64, 128, device=device)).loss.backward()  # an eager step before the capture
    eager.zero_grad(set_to_none=True)
    graphed = copy.deepcopy(eager)
    specs = [torch.randn(2, 64, 128, device=device) for _ in range(4)]
    noise = torch.rand(2, 32, device=device)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.01)
    opt_graph = torch.optim.SGD(graphed.parameters(), lr=0.01)

    losses_eager = []
    for spec in specs:
        opt_eager.zero_grad(set_to_none=True)
        loss = eager(spec, noise=noise).loss
        loss.backward()
        opt_eager.step()
        losses_eager.append(loss.item())

    step = capture_train_step(graphed, opt_graph, lambda spec: graphed(spec, noise=noise).loss, specs[0], warmup=1)
    losses_graph = [step(spec).item() for spec in specs[1:]]
    torch.testing.assert_close(torch.tensor(losses_graph), torch.tensor(losses_eager[1:]), rtol=1e-4, atol=1e-6)
