"""Adversarial review of the drop-in models against the official AudioMAE, rebuilt here as an oracle.

``OfficialMAE`` is ``models_mae.MaskedAutoencoderViT`` as the official code builds, initialises and
runs it (module order, RNG draws, masking arithmetic, cat-then-gather decoder input), assembled from
timm 1.0's ``Block`` and ``SwinTransformerV2CrBlock`` (set to AudioMAE's (2, 0) shift, ``tau``
temperature and 0.1 meta-MLP dropout). Same seed -> same fresh weights, same masks, same dropout, same
outputs: that is what "drop-in" means to a user who compares runs. The fine-tuning model is checked
against timm's own ``VisionTransformer``.
"""
import argparse
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

import audiomae
from audiomae.backends import BackendUnavailableError
from audiomae.checkpoint import CheckpointMismatchError

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_swin = pytest.importorskip("timm.models.swin_transformer_v2_cr")

LN = partial(nn.LayerNorm, eps=1e-6)
IMG = (128, 64)
GRID = (8, 4)
L = GRID[0] * GRID[1]
CPU_BACKENDS = ("reference", "sdpa")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_mae(**kw):
    config = dict(img_size=IMG, patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                  decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=16, mlp_ratio=2.0, norm_layer=LN)
    config.update(kw)
    return audiomae.MaskedAutoencoderViT(**config)


def tiny_vit(**kw):
    config = dict(img_size=IMG, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)
    config.update(kw)
    return audiomae.VisionTransformer(**config)


def official_table(embed_dim, grid):
    """util/pos_embed.get_2d_sincos_pos_embed_flexible(embed_dim, patch_hw=(F, T), cls_token=True), in numpy."""
    num_time, num_freq = grid
    w, h = np.meshgrid(np.arange(num_time, dtype=np.float32), np.arange(num_freq, dtype=np.float32))
    halves = []
    for coordinate in (w.reshape(-1), h.reshape(-1)):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        angles = np.einsum("m,d->md", coordinate, omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    table = np.concatenate([np.zeros((1, embed_dim)), np.concatenate(halves, axis=1)], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def audiomae_swin_block(dim, grid, shift, mlp_ratio):
    """timm's Swin-V2-CR block as AudioMAE's timm_patch builds it: 16 heads, (4, 4) windows, the given
    shift on the time axis only (timm would force half a window on both), meta-MLP dropout 0.1 twice."""
    block = timm_swin.SwinTransformerV2CrBlock(dim, 16, feat_size=grid, window_size=(4, 4), shift_size=shift,
                                               mlp_ratio=mlp_ratio, norm_layer=LN)
    block.shift_size = shift
    block.attn_mask = block.get_attn_mask(dtype=torch.float32)
    block.attn.meta_mlp.drop1.p = block.attn.meta_mlp.drop2.p = 0.1
    return block


class OfficialMAE(nn.Module):
    """The official pretraining model (audio_exp=True, use_custom_patch=False) on any window-tiled grid."""

    def __init__(self, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=256, decoder_depth=2,
                 decoder_num_heads=16, mlp_ratio=2.0, norm_pix_loss=False, decoder_mode=0, mask_t_prob=0.6,
                 mask_f_prob=0.5, mask_2d=False, no_shift=False, contextual_depth=8, img_size=IMG):
        super().__init__()
        self.grid = (img_size[0] // 16, img_size[1] // 16)
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, embed_dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([timm_vit.Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LN)
                                     for _ in range(depth)])
        self.norm = LN(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        if decoder_mode == 1:
            shifts = [(0, 0) if no_shift or i % 2 == 0 else (2, 0) for i in range(16)]
            self.decoder_blocks = nn.ModuleList([audiomae_swin_block(decoder_embed_dim, self.grid, s, mlp_ratio)
                                                 for s in shifts])
        else:
            self.decoder_blocks = nn.ModuleList([
                timm_vit.Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LN)
                for _ in range(decoder_depth)])
        self.decoder_norm = LN(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, 16 * 16)
        self.decoder_mode, self.norm_pix_loss, self.contextual_depth = decoder_mode, norm_pix_loss, contextual_depth
        self.mask_t_prob, self.mask_f_prob, self.mask_2d = mask_t_prob, mask_f_prob, mask_2d
        # initialize_weights, in the official order of RNG draws
        self.pos_embed.data.copy_(official_table(embed_dim, self.grid))
        self.decoder_pos_embed.data.copy_(official_table(decoder_embed_dim, self.grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def tokens(self, imgs):
        return self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]

    def random_masking(self, x, mask_ratio):
        B, n, D = x.shape
        keep = int(n * (1 - mask_ratio))
        shuffle = torch.rand(B, n, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        mask = (torch.arange(n, device=x.device) >= keep).float().expand(B, n).gather(1, restore)
        return x.gather(1, shuffle[:, :keep, None].expand(-1, -1, D)), mask, restore

    def random_masking_2d(self, x, mask_t_prob, mask_f_prob):
        B, n, D = x.shape
        T, F = self.grid
        keep_t, keep_f = int(T * (1 - mask_t_prob)), int(F * (1 - mask_f_prob))
        removed_t = torch.rand(B, T, device=x.device).argsort(1).argsort(1) >= keep_t  # time noise first
        removed_f = torch.rand(B, F, device=x.device).argsort(1).argsort(1) >= keep_f
        mask = 1 - (1 - removed_t[:, :, None].float()) * (1 - removed_f[:, None, :].float())
        rank = torch.arange(B * T * F, dtype=torch.float32, device=x.device).view(B, T, F) + 999 * mask  # masked last
        order = rank.flatten(1).argsort(dim=1)
        kept = x.gather(1, order[:, : keep_t * keep_f, None].expand(-1, -1, D))
        return kept, mask.flatten(1), order.argsort(dim=1)

    def encode(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_encoder(self, imgs, mask_ratio, mask_2d=False):
        x = self.tokens(imgs)
        if mask_2d:
            x, mask, restore = self.random_masking_2d(x, self.mask_t_prob, self.mask_f_prob)
        else:
            x, mask, restore = self.random_masking(x, mask_ratio)
        return self.norm(self.encode(x)), mask, restore

    def forward_encoder_no_mask(self, imgs):
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1), self.tokens(imgs)], 1)
        outputs = []
        for n, blk in enumerate(self.blocks):
            x = blk(x)
            if n > self.contextual_depth:
                outputs.append(self.norm(x))
        return torch.stack(outputs).mean(0)

    def forward_decoder(self, latent, restore):
        x = self.decoder_embed(latent)
        B, n, D = x.shape
        filler = self.mask_token.repeat(B, restore.shape[1] + 1 - n, 1)
        tokens = torch.cat([x[:, 1:], filler], dim=1).gather(1, restore[:, :, None].repeat(1, 1, D))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        if self.decoder_mode == 1:
            x = x[:, 1:].reshape(B, *self.grid, D)
            for blk in self.decoder_blocks:
                x = blk(x)
            x = x.reshape(B, -1, D)
        else:
            for blk in self.decoder_blocks:
                x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))
        return pred if self.decoder_mode == 1 else pred[:, 1:]

    def forward(self, imgs, mask_ratio=0.8):
        latent, mask, restore = self.forward_encoder(imgs, mask_ratio, mask_2d=self.mask_2d)
        pred = self.forward_decoder(latent, restore)
        B, (T, F) = imgs.shape[0], self.grid
        target = imgs.reshape(B, 1, T, 16, F, 16).permute(0, 2, 4, 3, 5, 1).reshape(B, T * F, -1)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask, restore


def ours_as_official_state(model):
    """Our state dict under the timm oracle's names: ``tau`` is stored there as ``logit_scale = log(1 / tau)``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("attn.tau"):
            state[key.replace("tau", "logit_scale")] = torch.log(1.0 / value)
        else:
            state[key] = value
    return state


def seeded_pair(seed=0, **kw):
    torch.manual_seed(seed)
    ours = tiny_mae(**kw)
    torch.manual_seed(seed)
    official = OfficialMAE(**{k: v for k, v in kw.items() if k != "backend"})
    return ours, official


MAE_CONFIGS = [dict(decoder_mode=0), dict(decoder_mode=1), dict(decoder_mode=1, mask_2d=True, mask_t_prob=0.5,
               mask_f_prob=0.25), dict(decoder_mode=1, no_shift=True, norm_pix_loss=True)]


# ------------------------------------------------------------------ construction and initialisation
@pytest.mark.parametrize("config", MAE_CONFIGS)
def test_fresh_model_equals_official_under_the_same_seed(config):
    ours, official = seeded_pair(**config)
    theirs = official.state_dict()
    mine = ours_as_official_state(ours)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        if key.endswith("logit_scale"):
            assert torch.equal(mine[key], torch.zeros_like(value)), key  # tau starts at ones
        else:
            assert torch.equal(mine[key], value), key
    buffers = [name for name, _ in ours.named_buffers()]  # the Swin coordinates, never saved
    assert all(name.endswith("attn.relative_coordinates_log") for name in buffers)
    assert len(buffers) == (16 if config["decoder_mode"] == 1 else 0)
    assert not set(buffers) & set(ours.state_dict())


def test_initialisation_details():
    model = tiny_mae(decoder_mode=1)
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))  # xavier on the [D, C*p*p] view, not the conv's fans
    assert w.abs().max() <= bound and w.abs().max() > bound * 0.9 and w.abs().max() > 1 / math.sqrt(256)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0) and module.eps == 1e-6
        if isinstance(module, nn.Linear):
            assert torch.all(module.bias == 0)
    assert all(torch.equal(blk.attn.tau, torch.ones(16)) for blk in model.decoder_blocks)
    torch.testing.assert_close(model.pos_embed, official_table(64, GRID), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decoder_pos_embed, official_table(256, GRID), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos_trainable", [False, True])
def test_requires_grad_and_gradients(pos_trainable):
    model = tiny_mae(decoder_mode=1, pos_trainable=pos_trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == (set() if pos_trainable else {"pos_embed", "decoder_pos_embed"})
    model(torch.randn(2, 1, *IMG))[0].backward()
    assert (model.pos_embed.grad is not None) == pos_trainable
    if pos_trainable:  # the Swin decoder drops the cls token, so its decoder-table row learns nothing
        assert torch.all(model.decoder_pos_embed.grad[0, 0] == 0) and model.decoder_pos_embed.grad.abs().sum() > 0
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}


def test_state_dict_keys_and_shapes_of_the_base_presets_match_official():
    with torch.device("meta"):
        for decoder_mode in (0, 1):
            ours = audiomae.mae_vit_base_patch16(decoder_mode=decoder_mode)
            official = OfficialMAE(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                                   mlp_ratio=4.0, decoder_mode=decoder_mode, img_size=(1024, 128))
            mine = {k: tuple(v.shape) for k, v in ours_as_official_state(ours).items()}
            assert mine == {k: tuple(v.shape) for k, v in official.state_dict().items()}
        vit = audiomae.vit_base_patch16(num_classes=527)
        timm_model = timm_vit.VisionTransformer(img_size=(1024, 128), in_chans=1, num_classes=527, global_pool="avg",
                                                norm_layer=LN)
        theirs = {k: v.shape for k, v in timm_model.state_dict().items()}
        assert {k: v.shape for k, v in vit.state_dict().items()} == theirs


# ------------------------------------------------------------------ same seed, same run
@pytest.mark.parametrize("config", MAE_CONFIGS + [dict(decoder_mode=1, img_size=(1024, 128), depth=1),
                                    dict(decoder_mode=1, decoder_embed_dim=128)])  # 8-wide decoder heads
def test_training_step_equals_official_under_the_same_seed(config):
    """No ``noise``: masks (1-D: one rand(B, L); 2-D: time noise then frequency noise), the Swin meta-MLP
    dropout in training, the outputs, the loss and every gradient follow the official run draw for draw."""
    ours, official = seeded_pair(**config)
    ours, official = ours.double().train(), official.double().train()
    official.load_state_dict(ours_as_official_state(ours))
    imgs = torch.randn(3, 1, *config.get("img_size", IMG), dtype=torch.float64)
    torch.manual_seed(7)
    loss, pred, mask, loss_contrastive = ours(imgs, mask_ratio=0.75)
    after_ours = torch.rand(1)
    torch.manual_seed(7)
    ref_loss, ref_pred, ref_mask, _ = official(imgs, mask_ratio=0.75)
    assert torch.equal(after_ours, torch.rand(1))  # the same number of draws
    assert torch.equal(mask, ref_mask) and mask.dtype == torch.float32
    torch.testing.assert_close(pred, ref_pred, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    assert loss_contrastive.shape == (1,) and loss_contrastive.item() == 0.0
    loss.backward()
    ref_loss.backward()
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name.replace("attn.tau", "attn.logit_scale")].grad
        assert (p.grad is None) == (ref is None), name
        if ref is None:  # the frozen position tables
            continue
        if name.endswith("attn.tau"):  # d/dtau = d/dlogit_scale * dlogit_scale/dtau = -g / tau
            ref = -ref / p.detach()
        torch.testing.assert_close(p.grad, ref, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("mask_2d", [False, True])
def test_masking_methods_equal_official_under_the_same_seed(mask_2d):
    ours, official = seeded_pair(decoder_mode=0, mask_t_prob=0.5, mask_f_prob=0.5)
    x = torch.randn(4, L, 8)
    torch.manual_seed(3)
    got = ours.random_masking_2d(x, 0.5, 0.5) if mask_2d else ours.random_masking(x, 0.8)
    torch.manual_seed(3)
    want = official.random_masking_2d(x, 0.5, 0.5) if mask_2d else official.random_masking(x, 0.8)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    torch.manual_seed(3)
    latent, mask, ids_restore, extra = ours.forward_encoder(torch.randn(4, 1, *IMG), 0.8, mask_2d=mask_2d)
    assert extra is None and ids_restore.dtype == torch.int64 and mask.dtype == torch.float32
    assert latent.shape == (4, 1 + (4 * 2 if mask_2d else int(L * 0.2)), 64)
    pred, none1, none2 = ours.forward_decoder(latent, ids_restore)
    assert pred.shape == (4, L, 256) and none1 is None and none2 is None


def test_forward_encoder_no_mask_equals_official():
    ours, official = seeded_pair(depth=4, contextual_depth=1)
    ours, official = ours.double().eval(), official.double().eval()
    official.load_state_dict(ours_as_official_state(ours))
    imgs = torch.randn(2, 1, *IMG, dtype=torch.float64)
    torch.testing.assert_close(ours.forward_encoder_no_mask(imgs), official.forward_encoder_no_mask(imgs),
                               rtol=1e-10, atol=1e-10)


def test_patchify_unpatchify_official_grid():
    model = audiomae.MaskedAutoencoderViT(img_size=(1024, 128), embed_dim=32, depth=1, num_heads=2,
                                          decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 1, 1024, 128)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 512, 256)
    # token k = 8 t + f holds rows 16t.. and columns 16f.., row-major inside the patch
    torch.testing.assert_close(patches[1, 8 * 3 + 5], imgs[1, 0, 48:64, 80:96].reshape(-1), rtol=0, atol=0)
    assert torch.equal(model.unpatchify(patches), imgs)


# ------------------------------------------------------------------ train / eval behaviour
def test_meta_mlp_dropout_only_in_training():
    model = tiny_mae(decoder_mode=1)
    imgs, noise = torch.randn(2, 1, *IMG), torch.rand(2, L)
    model.train()
    assert not torch.equal(model(imgs, noise=noise)[1], model(imgs, noise=noise)[1])
    model.eval()
    assert torch.equal(model(imgs, noise=noise)[1], model(imgs, noise=noise)[1])
    global_decoder = tiny_mae(decoder_mode=0).train()  # no dropout anywhere in mode 0
    assert torch.equal(global_decoder(imgs, noise=noise)[1], global_decoder(imgs, noise=noise)[1])


# ------------------------------------------------------------------ the fine-tuning model
@pytest.fixture(autouse=True)
def timm_drop_path_as_pinned(monkeypatch):
    """The official code pins timm 0.3.2, whose stochastic depth draws ``floor(keep + rand)``;
    timm 1.0 draws ``bernoulli_``. The twins below take the pinned draw, transcribed here."""
    import timm.layers.drop as timm_drop

    def drop_path_0_3_2(x, drop_prob=0.0, training=False, scale_by_keep=True):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        random_tensor = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * random_tensor.floor_()

    monkeypatch.setattr(timm_drop, "drop_path", drop_path_0_3_2)


def timm_twin(ours, **kw):
    """timm's VisionTransformer with our weights: 'avg' pooling has ``fc_norm`` and no ``norm``, as ours."""
    model = timm_vit.VisionTransformer(img_size=IMG, patch_size=16, in_chans=1, num_classes=ours.num_classes,
                                       embed_dim=64, depth=len(ours.blocks), num_heads=4, mlp_ratio=2.0,
                                       qkv_bias=True, norm_layer=LN,
                                       global_pool="avg" if ours.global_pool else "token", **kw)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def official_masked_logits(model, x, mask_t_prob, mask_f_prob):
    """models_vit.forward_features_mask + head on timm's modules: whole time rows, then whole frequency
    columns, each kept in shuffled order, time noise drawn first."""
    tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
    B, _, D = tokens.shape
    T, F = GRID
    keep_t = torch.rand(B, T).argsort(1)[:, : int(T * (1 - mask_t_prob))]
    tokens = tokens.view(B, T, F, D).gather(1, keep_t[:, :, None, None].expand(-1, -1, F, D))
    keep_f = torch.rand(B, F).argsort(1)[:, : int(F * (1 - mask_f_prob))]
    tokens = tokens.gather(2, keep_f[:, None, :, None].expand(-1, tokens.shape[1], -1, D)).reshape(B, -1, D)
    x = model.pos_drop(torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), tokens], 1))
    x = model.blocks(x)
    pooled = model.fc_norm(x[:, 1:].mean(1)) if model.global_pool == "avg" else model.norm(x)[:, 0]
    return model.head(pooled)


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_equals_timm_in_eval_and_in_training_with_drop_path(global_pool):
    ours = tiny_vit(global_pool=global_pool, drop_path_rate=0.2, depth=3).double()
    theirs = timm_twin(ours, drop_path_rate=0.2).double()
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in ours.blocks] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(4, 1, *IMG, dtype=torch.float64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, theirs(x), rtol=1e-10, atol=1e-10)
    assert not torch.equal(a, ours(x))  # stochastic depth is live in training


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_masked_forward_equals_official_under_the_same_seed(global_pool):
    ours = tiny_vit(global_pool=global_pool, drop_path_rate=0.1).double().train()
    theirs = timm_twin(ours, drop_path_rate=0.1).double().train()
    x = torch.randn(3, 1, *IMG, dtype=torch.float64)
    for mask_t_prob, mask_f_prob in ((0.25, 0.5), (0.0, 0.5), (0.5, 0.0)):
        torch.manual_seed(11)
        got = ours(x, None, mask_t_prob, mask_f_prob)
        torch.manual_seed(11)
        torch.testing.assert_close(got, official_masked_logits(theirs, x, mask_t_prob, mask_f_prob),
                                   rtol=1e-10, atol=1e-10)
    ours.eval()
    torch.manual_seed(1)
    a = ours(x, mask_t_prob=0.25, mask_f_prob=0.25)
    torch.manual_seed(2)
    assert not torch.equal(a, ours(x, mask_t_prob=0.25, mask_f_prob=0.25))  # masks even in eval, as official


def test_vit_initialisation_follows_timm():
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=64, mlp_ratio=4.0, num_classes=300)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.all(module.bias == 0), name
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    # timm's _init_weights: trunc_normal_(std=.02) on every Linear (xavier: 0.079 for fc1, 0.074 for the head)
    for weight in (model.blocks[0].mlp.fc1.weight, model.head.weight, model.blocks[1].attn.qkv.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, official_table(64, GRID), rtol=0, atol=1e-6)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_vit_timm_classifier_api():
    model = tiny_vit(num_classes=5)
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(torch.randn(2, 1, *IMG)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, *IMG)).shape == (2, 64)
    assert tiny_vit(num_classes=0)(torch.randn(1, 1, *IMG)).shape == (1, 64)


# ------------------------------------------------------------------ checkpoints
def official_pretrain_args(**kw):
    """The Namespace main_pretrain.py saves (the fields the loader may read, plus typical noise)."""
    args = dict(batch_size=4, epochs=400, model="mae_vit_base_patch16", mask_ratio=0.8, norm_pix_loss=True,
                weight_decay=0.05, lr=None, blr=1e-3, dataset="audioset", audio_exp=True, alpha=0.0, mode=0,
                use_custom_patch=False, split_pos=False, pos_trainable=False, use_nce=False, decoder_mode=1,
                mask_t_prob=0.7, mask_f_prob=0.3, mask_2d=False, no_shift=False, distributed=True, gpu=0,
                dist_backend="nccl", dist_url="env://", output_dir="./output_dir", seed=0)
    args.update(kw)
    return argparse.Namespace(**args)


def save_official(path, model, args, ddp=False):
    state = model.state_dict()
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 20,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}, "args": args}, path)


@pytest.mark.parametrize("decoder_mode,ddp", [(1, False), (0, True)])
def test_official_pretraining_pth_round_trip(tmp_path, decoder_mode, ddp):
    model = tiny_mae(decoder_mode=decoder_mode, norm_pix_loss=True, mask_2d=True, mask_t_prob=0.5)
    path = tmp_path / "checkpoint-20.pth"
    save_official(path, model, official_pretrain_args(decoder_mode=decoder_mode, mask_2d=True, mask_t_prob=0.5,
                                                      mask_f_prob=0.5), ddp=ddp)
    # heads and mel bins are not in the weights: official files are 128-bin, this tiny one is 64
    loaded = audiomae.from_pretrained(path, num_heads=4, img_size=IMG, backend="sdpa")
    assert type(loaded) is audiomae.MaskedAutoencoderViT and loaded.backend == "sdpa"
    assert loaded.decoder_mode == decoder_mode and loaded.norm_pix_loss and loaded.mask_2d
    assert (loaded.mask_t_prob, loaded.mask_f_prob) == (0.5, 0.5) and loaded.grid == GRID
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.pos_embed.requires_grad
    noise = (torch.rand(2, 8), torch.rand(2, 4))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(torch.ones(2, 1, *IMG), noise=noise)[0],
                               model(torch.ones(2, 1, *IMG), noise=noise)[0], rtol=1e-5, atol=1e-6)


def test_official_finetuning_pth_round_trip(tmp_path):
    model = tiny_vit(num_classes=10, global_pool=True)
    path = tmp_path / "finetuned.pth"
    args = argparse.Namespace(model="vit_base_patch16", nb_classes=10, global_pool=True, mask_2d=True,
                              dataset="esc50", mask_t_prob=0.2, mask_f_prob=0.2, drop_path=0.1)
    save_official(path, model, args, ddp=True)
    loaded = audiomae.from_pretrained(path, num_heads=4, img_size=IMG)
    assert type(loaded) is audiomae.VisionTransformer and loaded.num_classes == 10 and loaded.global_pool
    x = torch.randn(2, 1, *IMG)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_strict_loading_lists_every_problem(tmp_path):
    state = tiny_mae(decoder_mode=1).state_dict()
    state["decoder_blocks.3.attn.logit_scale"] = state.pop("decoder_blocks.3.attn.tau")
    state["blocks.1.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"][:10]
    path = tmp_path / "bad.pth"
    torch.save({"model": state, "args": official_pretrain_args()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        audiomae.from_pretrained(path, num_heads=4)
    message = str(err.value)
    assert "missing (1): decoder_blocks.3.attn.tau" in message
    assert "unexpected (1): decoder_blocks.3.attn.logit_scale" in message
    assert "blocks.1.attn.qkv.weight: checkpoint [10, 64] vs model [192, 64]" in message


def test_overlapping_patch_checkpoints_are_refused_clearly(tmp_path):
    state = tiny_mae(decoder_mode=0).state_dict()
    path = tmp_path / "custom_patch.pth"
    torch.save({"model": state, "args": official_pretrain_args(use_custom_patch=True)}, path)
    with pytest.raises(NotImplementedError, match="use_custom_patch"):
        audiomae.from_pretrained(path, num_heads=4)


# ------------------------------------------------------------------ what a demanding user trips on
def test_bad_inputs_get_clear_errors():
    model = tiny_mae(decoder_mode=1)
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 1, 128, 64\], got \[2, 128, 64\]"):
        model(torch.randn(2, *IMG))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        model(torch.zeros(2, 1, *IMG, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor spectrogram, got numpy.ndarray"):
        model(torch.randn(2, 1, *IMG).numpy())
    with pytest.raises(TypeError, match="torch.float64.*torch.float32"):
        model(torch.randn(2, 1, *IMG, dtype=torch.float64))
    with pytest.raises(TypeError, match="noise"):
        model(torch.randn(2, 1, *IMG), noise=(torch.rand(2, 8), torch.rand(2, 4)))  # 2-D noise, 1-D masking
    two_d = tiny_mae(decoder_mode=1, mask_2d=True)
    with pytest.raises(TypeError, match=r"noise_t.*noise_f"):
        two_d(torch.randn(3, 1, *IMG), noise=torch.rand(3, L))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(2, 1, *IMG), mask_ratio=1.5)
    with pytest.raises(ValueError, match="expected input of shape"):
        tiny_vit()(torch.randn(2, 1, 64, 64))


def test_no_hard_coded_device():
    """Everything follows the input's device: on the meta device any tensor made on the CPU (or .cuda())
    would fail to mix."""
    for config in MAE_CONFIGS:
        for backend in CPU_BACKENDS:
            model = tiny_mae(backend=backend, **config).to("meta")
            loss, pred, mask, loss_contrastive = model(torch.empty(2, 1, *IMG, device="meta"))
            assert {t.device.type for t in (loss, pred, mask, loss_contrastive)} == {"meta"}
            loss.backward()
    vit = tiny_vit().to("meta")
    assert vit(torch.empty(2, 1, *IMG, device="meta"), mask_t_prob=0.5, mask_f_prob=0.5).device.type == "meta"


@pytest.mark.gpu
def test_cuda_training_step_equals_official_in_every_backend():
    """On CUDA: same seed, same masks and meta-MLP dropout as the official model, in every backend."""
    ours, official = seeded_pair(decoder_mode=1, mask_2d=True, mask_t_prob=0.5, mask_f_prob=0.5)
    official.load_state_dict(ours_as_official_state(ours))
    ours, official = ours.cuda().train(), official.cuda().train()
    imgs = torch.randn(2, 1, *IMG, device="cuda")
    torch.manual_seed(7)
    ref_loss, ref_pred, ref_mask, _ = official(imgs)
    for backend in audiomae.available_backends():
        torch.manual_seed(7)
        loss, pred, mask, loss_contrastive = ours.set_backend(backend)(imgs)
        assert all(t.is_cuda for t in (loss, pred, mask, loss_contrastive)), backend
        assert torch.equal(mask, ref_mask), backend
        torch.testing.assert_close(pred, ref_pred, rtol=1e-2, atol=1e-2, msg=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decoder_mode", [0, 1])
def test_autocast_bf16_on_cpu(backend, decoder_mode):
    torch.manual_seed(0)
    model = tiny_mae(decoder_mode=decoder_mode, backend=backend).eval()
    imgs, noise = torch.randn(2, 1, *IMG), torch.rand(2, L)
    loss32, pred32, _, _ = model(imgs, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask, _ = model(imgs, noise=noise)
    assert pred.dtype == torch.bfloat16 and mask.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(pred.float(), pred32, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(loss, loss32, rtol=2e-2, atol=1e-3)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", [dict(decoder_mode=0), dict(decoder_mode=1, mask_2d=True)])
def test_float64_model(config):
    model = tiny_mae(**config).eval()
    imgs = torch.randn(2, 1, *IMG)
    noise = (torch.rand(2, 8), torch.rand(2, 4)) if config.get("mask_2d") else torch.rand(2, L)
    loss32, pred32, _, _ = model(imgs, noise=noise)
    model = model.to(torch.float64)
    for backend in CPU_BACKENDS:
        model.set_backend(backend)
        loss, pred, mask, _ = model(imgs.double(), noise=noise)
        assert pred.dtype == torch.float64 and loss.dtype == torch.float64
        torch.testing.assert_close(pred, pred32.double(), rtol=1e-4, atol=1e-4)
        loss.backward()
    vit = tiny_vit().to(torch.float64)
    assert vit(torch.randn(2, 1, *IMG, dtype=torch.float64), mask_t_prob=0.5).dtype == torch.float64


def test_odd_but_valid_inputs():
    model = tiny_mae(decoder_mode=1).eval()
    spec, noise = torch.randn(2, 1, IMG[1], IMG[0]).transpose(2, 3), torch.rand(2, L)  # a transposed view
    torch.testing.assert_close(model(spec, noise=noise)[1], model(spec.contiguous(), noise=noise)[1])
    # numpy noise is float64: the mask stays float32 as the official torch.ones mask, and so does the loss
    loss, _, mask, _ = model(spec, noise=torch.from_numpy(np.random.default_rng(0).random((2, L))))
    assert mask.dtype == torch.float32 and loss.dtype == torch.float32
    loss, pred, mask, _ = model(torch.randn(1, 1, *IMG))
    assert pred.shape == (1, L, 256) and mask.sum() == L - int(L * 0.2) and torch.isfinite(loss)
    loss, pred, mask, _ = model(torch.randn(1, 1, *IMG), mask_ratio=1.0)  # nothing kept: cls only
    assert mask.sum() == L and torch.isfinite(loss)
    assert tiny_vit()(torch.randn(1, 1, *IMG), mask_t_prob=0.5, mask_f_prob=0.5).shape == (1, 5)


def test_set_backend_mid_training():
    torch.manual_seed(0)
    model = tiny_mae(decoder_mode=1)
    twin = tiny_mae(decoder_mode=1)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    params_before = [id(p) for p in model.parameters()]
    for step, backend in enumerate(("reference", "sdpa", "reference")):
        imgs, noise = torch.randn(2, 1, *IMG), torch.rand(2, L)
        model.set_backend(backend)
        for net, optimizer in ((model, opt), (twin, twin_opt)):
            torch.manual_seed(step)  # the same meta-MLP dropout for both
            optimizer.zero_grad()
            net(imgs, noise=noise)[0].backward()
            optimizer.step()
    assert [id(p) for p in model.parameters()] == params_before
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if not audiomae.backend_status("xformers")[0]:
        with pytest.raises(BackendUnavailableError):
            model.set_backend("xformers")
        assert model.backend == "reference"


def test_torch_compile_reference_model_on_cpu():
    torch.manual_seed(0)
    model = tiny_mae(decoder_mode=0, depth=1, decoder_depth=1).eval()
    imgs, noise = torch.randn(2, 1, *IMG), torch.rand(2, L)
    expected = model(imgs, noise=noise)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(imgs, noise=noise)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    got[0].backward()
