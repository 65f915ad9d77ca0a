"""Loading official AudioMAE checkpoints and saving our own, with the architecture read off the keys.

Official ``.pth`` files hold ``{"model", "optimizer", "epoch", "scaler", "args"}`` where ``args`` is
an ``argparse.Namespace``: they are read with ``torch.load(weights_only=True)`` and that one class
allow-listed, never with unpickling opened wide. ``.safetensors`` files written by
``save_pretrained`` carry the model's config in their metadata.

What a file is, is told by its keys: ``decoder_embed.weight`` marks a pretraining checkpoint, and a
Swin decoder (mode 1) has ``decoder_blocks.N.attn.tau``; ``head.weight`` marks a fine-tuning one.
Loading is strict: a mismatch raises with every missing, unexpected and mis-shaped key listed
(the official code loads a mode-1 file into a mode-0 model by silently dropping half of it). The one
reshaping done is the official fine-tuning's: an encoder pretrained on longer clips (AudioSet's 1024
frames) into a model for shorter ones (ESC-50's 512, Speech Commands' 128) gets its position table cut
along time (``cut_pos_embed_time``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from .mae import MaskedAutoencoderViT
from .mae_ast import MAEAST, MAEASTClassifier
from .vit import VisionTransformer

_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16}
_HEADS_BY_NAME = {"small": 6, "base": 12, "large": 16, "huge": 16}
_MEL_BINS = 128  # every official recipe uses 128-bin fbanks, which fixes the frequency side of img_size
# What infer_config reads before anything else: without them a state dict is not an AudioMAE one.
_REQUIRED_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model; the message lists every offending key."""


def unreadable(exc: BaseException) -> str:
    """Why a file did not load: the error's type and the first line of its message (for a refused
    unpickling, what was refused, without torch's advice to load untrusted files unsafely)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if type(exc).__name__ == "UnpicklingError":
        refused = next((line for line in lines if "Unsupported global" in line), None)
        return ("weights_only loading takes tensors and argparse.Namespace only"
                + (f"; {refused}" if refused else "; or the file is not a torch checkpoint"))
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_torch_file(path):
    """``torch.load`` of a ``.pth`` on the CPU, tensors and ``argparse.Namespace`` only (the one class
    official checkpoints pickle); a file that does not load is a ValueError that says why."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a checkpoint, or pickling something else
        raise ValueError(f"{path} is not a readable checkpoint ({unreadable(exc)})") from exc


def is_safetensors(path) -> bool:
    """Whether ``path`` is to be read as safetensors: its name ends in ``.safetensors`` (a damaged
    one then says what safetensors finds wrong), or its content is safetensors (an 8-byte
    little-endian header size, then the JSON header), so that ``save_pretrained`` output reads
    back whatever its name; a ``.pth`` (a zip archive or a pickle) never looks like one."""
    if Path(path).suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def read_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict, extra) from an official ``.pth``, our ``.safetensors`` or a training run's
    ``.pth``; extra holds the official ``args``, our ``config`` and ``class``, or the run's
    ``run_config`` (the model's name and constructor keywords)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_safetensors(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
            config = json.loads(metadata["audiomae_config"]) if "audiomae_config" in metadata else {}
        except Exception as exc:  # not safetensors, truncated, or a config that is not JSON
            raise ValueError(f"{path} is not a readable checkpoint ({unreadable(exc)})") from exc
        return state, {"config": config, "class": metadata.get("audiomae_class")}
    blob = load_torch_file(path)
    run = blob.get("config") if isinstance(blob, dict) else None
    if isinstance(run, dict) and "model" in run and "model_kwargs" in run and isinstance(blob.get("model"), dict):
        return blob["model"], {"run_config": run}  # written by audiomae pretrain / finetune
    for entry in ("model", "state_dict"):  # the official layout; Lightning's and many scripts' wrapper
        if isinstance(blob, dict) and isinstance(blob.get(entry), dict):
            args = blob.get("args")
            # args as a dict: an official checkpoint re-saved for weights-only loading
            args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
            return blob[entry], {"args": args}
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, {}
    raise ValueError(f"{path} holds neither a state dict nor a checkpoint dict with a 'model' or 'state_dict' entry")


# Prefixes every key gets from a wrapper: DistributedDataParallel's ``module.`` and a
# torch.compile'd model's ``_orig_mod.`` (either around the other).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefix(state: dict) -> dict:
    """The state dict with the wrappers' prefixes (``_WRAPPER_PREFIXES``) taken off its keys."""
    state = dict(state)
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _count(state: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _heads(width: int, args: dict) -> int | None:
    """Heads are not in the weights: read them off the official model name, else the width."""
    name = str(args.get("model", ""))
    for size, heads in _HEADS_BY_NAME.items():
        if f"_{size}_" in name or name.endswith(f"_{size}"):
            return heads
    return _HEADS_BY_WIDTH.get(width)


def check_audiomae_keys(state: dict) -> None:
    """Raise ``ValueError`` naming the missing keys if ``state`` lacks what every AudioMAE encoder has
    (rather than a bare ``KeyError`` from deep inside the loader)."""
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if not missing:
        dims = {"patch_embed.proj.weight": 4, "pos_embed": 3}
        missing = [f"{k} (a {dims[k]}-D tensor, got shape {list(state[k].shape)})"
                   for k in dims if state[k].dim() != dims[k]]

    if missing:
        sample = ", ".join(sorted(state)[:5]) or "none"
        raise ValueError(f"not a recognised AudioMAE checkpoint: missing {', '.join(missing)} "
                         f"(it has {len(state)} key(s): {sample}{', ...' if len(state) > 5 else ''})")


def infer_config(state: dict, args: dict | None = None) -> tuple[type, dict]:
    """(model class, constructor kwargs) for a state dict with official key names."""
    args = args or {}
    if args.get("use_custom_patch"):
        raise NotImplementedError("the checkpoint was trained with use_custom_patch=True (overlapping patches), "
                                  "which is not supported")
    check_audiomae_keys(state)
    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch, _ = proj.shape
    if in_chans == 3:
        # Without a saved config, an RGB patch embedding means an image ViT (timm's keys are the same).
        raise ValueError(f"not a recognised AudioMAE checkpoint: patch_embed.proj.weight {list(proj.shape)} takes "
                         "3 input channels, an image model's (AudioMAE's spectrograms have one); a 3-channel "
                         "model saved with save_pretrained() carries its config and loads")
    num_patches = state["pos_embed"].shape[1] - 1
    freq_patches = _MEL_BINS // patch
    if num_patches % freq_patches:
        raise ValueError(f"pos_embed has {num_patches} patch rows, not a multiple of {freq_patches} frequency patches")
    # The bins the patches tile: all 128 for patches of 16, 126 for the huge model's 14.
    img_size = (int(args.get("target_length", num_patches // freq_patches * patch)), freq_patches * patch)
    config = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=_count(state, "blocks"), num_heads=_heads(embed_dim, args),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    if "decoder_embed.weight" in state:
        decoder_mode = 1 if any(k.startswith("decoder_blocks.") and k.endswith("attn.tau") for k in state) else 0
        if decoder_mode == 0 and args.get("decoder_mode") in (2, 3):
            decoder_mode = args["decoder_mode"]  # modes 2 and 3 have mode 0's keys; only the args tell them apart
        config.update(
            decoder_embed_dim=state["decoder_embed.weight"].shape[0],
            decoder_depth=_count(state, "decoder_blocks"), decoder_num_heads=16, decoder_mode=decoder_mode,
        )
        for key in ("norm_pix_loss", "mask_2d", "mask_t_prob", "mask_f_prob", "no_shift", "pos_trainable"):
            if key in args:
                config[key] = args[key]
        return MaskedAutoencoderViT, config
    if "head.weight" in state or "fc_norm.weight" in state or "norm.weight" in state:
        config.update(
            num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
            global_pool="fc_norm.weight" in state,
        )
        return VisionTransformer, config
    raise ValueError("the state dict is neither an AudioMAE pretraining nor a fine-tuning checkpoint")


def check_state_dict(model: nn.Module, state: dict, note: str | None = None) -> None:
    """Raise ``CheckpointMismatchError`` listing missing, unexpected and mis-shaped keys, if any
    (and ``note``, a sentence on why, when given)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        lines = [f"the checkpoint does not fit {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        if note:
            lines.append(f"  {note}")
        raise CheckpointMismatchError("\n".join(lines))


def _build(cls: type, config: dict, overrides: dict) -> nn.Module:
    config = {**config, **overrides}
    if config.get("num_heads") is None:
        raise ValueError(f"cannot tell the number of heads of a width-{config['embed_dim']} encoder; pass num_heads=")
    eps = config.pop("norm_eps", 1e-6)
    config.setdefault("norm_layer", partial(nn.LayerNorm, eps=eps))
    if "img_size" in config:
        config["img_size"] = tuple(config["img_size"])
    return cls(**config)


def from_pretrained(path, **overrides) -> nn.Module:
    """Build the model a checkpoint describes and load it strictly.

    ``overrides`` are constructor keywords that replace what was read from the file
    (``backend="triton"``, ``norm_pix_loss=True``, ``num_heads=...`` for an unusual width...).
    """
    return model_from_checkpoint(*read_checkpoint(path), **overrides)


def checkpoint_features(extra: dict) -> dict:
    """The front-end settings a checkpoint records (``read_checkpoint``'s ``extra``): an official
    checkpoint's ``args.dataset`` (AudioSet, ESC-50 and Speech Commands normalise differently);
    empty when it records none we know."""
    from .features import DATASETS

    dataset = (extra.get("args") or {}).get("dataset")
    return {"dataset": dataset} if dataset in DATASETS else {}


def model_from_checkpoint(state: dict, extra: dict, **overrides) -> nn.Module:
    """``from_pretrained`` of a file already read (``read_checkpoint``'s pair)."""
    state = _strip_prefix(state)
    classes = {cls.__name__: cls for cls in (MaskedAutoencoderViT, VisionTransformer, MAEAST, MAEASTClassifier)}
    if "run_config" in extra:  # the run's own record: its preset, sizes, loss settings and heads
        from .train import build_model

        run, overrides = extra["run_config"], dict(overrides)
        backend = overrides.pop("backend", "reference")
        model = build_model(run["model"], {**run["model_kwargs"], **overrides}, backend)
        check_state_dict(model, state)
        model.load_state_dict(state, strict=True)
        return model
    if extra.get("class") in classes:
        cls, config = classes[extra["class"]], extra["config"]
    else:
        cls, config = infer_config(state, extra.get("args"))
    model = _build(cls, config, overrides)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def cut_pos_embed_time(pos_embed: torch.Tensor, grid: tuple[int, int], num_time: int) -> torch.Tensor:
    """The official ``interpolate_pos_embed_audio``: a ``[1, 1 + T*F, D]`` table of a ``grid=(T, F)``
    model -> the ``[1, 1 + num_time*F, D]`` table of a ``(num_time, F)`` one, for ``num_time <= T``.

    The official code views the token rows as ``(F, T)`` (its ``orig_size=(8, 64)``) and keeps the
    first ``num_time`` columns. That is not the first ``num_time`` time rows of the tokens (``k = t*F + f``),
    but it is right for the tables it cuts: their row ``k`` encodes ``(k mod T, k div T)`` (see
    ``audiomae.pos_embed``), so the cut is exactly the table a fresh ``num_time``-row model builds."""
    num_freq = grid[1]
    tokens = pos_embed[:, 1:].reshape(pos_embed.shape[0], num_freq, grid[0], pos_embed.shape[-1])
    return torch.cat([pos_embed[:, :1], tokens[:, :, :num_time].flatten(1, 2)], dim=1)


def _checkpoint_grid(state: dict, extra: dict) -> tuple[tuple[int, int] | None, bool]:
    """(the checkpoint's ``(T, F)`` patch grid or None if its table fits none, whether the grid is
    known). Known from our saved config; else taken as 128 mel bins, every official recipe's (the
    official fine-tuning assumes it too), checked against the official args' ``target_length``."""
    config = extra.get("config") or {}
    args = extra.get("args") or {}
    patch = state["patch_embed.proj.weight"].shape[-1]
    num_freq = config["img_size"][1] // patch if "img_size" in config else _MEL_BINS // patch
    num_patches = state["pos_embed"].shape[1] - 1
    if not num_freq or num_patches % num_freq:
        return None, False
    grid = (num_patches // num_freq, num_freq)
    if "img_size" not in config and "target_length" in args and int(args["target_length"]) // patch != grid[0]:
        # The args' clip length contradicts 128 mel bins: the grid is the one the length gives, and
        # known not to be the assumed one, even where the tables have the same size (512 x 256
        # frames and bins give 513 rows, as 1024 x 128 do).
        num_time = int(args["target_length"]) // patch
        if num_time and num_patches % num_time == 0:
            return (num_time, num_patches // num_time), True
        return None, True
    return grid, "img_size" in config or "target_length" in args


def _fit_pos_embed(model: VisionTransformer, state: dict, extra: dict) -> str | None:
    """Cut ``state["pos_embed"]`` in place to the model's shorter time axis, as the official fine-tuning
    does; else, if the tables still differ, the sentence that says why they cannot be fitted."""
    table, expected = state["pos_embed"], model.pos_embed
    (grid, known), (num_time, num_freq) = _checkpoint_grid(state, extra), model.grid
    if table.shape == expected.shape and (not known or grid == (num_time, num_freq)):
        return None  # the same table (a known grid must also be the model's: 64 x 8 is not 32 x 16)
    if grid is not None and grid[1] == num_freq and grid[0] > num_time and table.shape[-1] == expected.shape[-1]:
        state["pos_embed"] = cut_pos_embed_time(table, grid, num_time)
        return None
    where = f"a {grid[0]} x {grid[1]}" if grid else "an unknown"
    return (f"pos_embed: the checkpoint's table ({list(table.shape)}, {where} patch grid) cannot be fitted to "
            f"the model's ({list(expected.shape)}, a {num_time} x {num_freq} grid): only a shorter time axis "
            f"with the same frequency patches and width is cut from it, as the official fine-tuning does")


def load_pretrained_encoder(model: VisionTransformer, path) -> VisionTransformer:
    """Initialise a fine-tuning model from a pretraining or fine-tuning checkpoint, as the official
    fine-tuning does: decoder keys dropped, ``head.*`` dropped when its shape differs from the model's
    (another number of classes), the checkpoint's ``fc_norm``/``head``/``norm`` taken when it has them
    and the model's own kept otherwise; every encoder key required. (The official script then
    re-initialises ``head.weight``; ``audiomae finetune`` does too.) A checkpoint for longer clips fits
    a model for shorter ones: its position table is cut along time (``cut_pos_embed_time``)."""
    state, extra = read_checkpoint(path)
    state = _strip_prefix(state)
    check_audiomae_keys(state)
    expected = model.state_dict()
    # What the official strict=False load leaves out, and only that: the decoder and mask token of a
    # pretraining checkpoint, a final norm or head the model does not have, a head of another shape.
    # Any other key the model lacks (a deeper encoder's blocks, layer scales) is a mismatch.
    encoder = {k: v for k, v in state.items()
               if not (_left_to_the_model(k) and (k not in expected or v.shape != expected[k].shape))}
    for key in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias"):
        if key in expected and key not in encoder:
            encoder[key] = expected[key]
    note = _fit_pos_embed(model, encoder, extra)
    if note and encoder["pos_embed"].shape == model.pos_embed.shape:  # same size, another grid
        raise CheckpointMismatchError(f"the checkpoint does not fit {type(model).__name__}:\n  {note}")
    check_state_dict(model, encoder, note)
    model.load_state_dict(encoder, strict=True)
    return model


def _left_to_the_model(key: str) -> bool:
    """Keys ``load_pretrained_encoder`` drops where the model has no such key (or, for ``head.*``,
    one of another shape): a pretraining checkpoint's decoder and mask token, the final norms and
    the classifier head."""
    return key.startswith(("decoder_", "head.", "norm.", "fc_norm.")) or key == "mask_token"


def model_config(model: nn.Module) -> dict:
    """The constructor keywords that rebuild ``model`` (norm eps as ``norm_eps``)."""
    if hasattr(model, "config"):
        return model.config()
    blocks = model.blocks
    config = dict(
        img_size=list(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.in_chans, embed_dim=model.embed_dim, depth=len(blocks),
        num_heads=blocks[0].attn.num_heads, mlp_ratio=blocks[0].mlp.fc1.out_features / model.embed_dim,
        norm_eps=blocks[0].norm1.eps, backend=model.backend,
    )
    if isinstance(model, MaskedAutoencoderViT):
        decoder_heads = model.decoder_blocks[0].attn.num_heads
        config.update(
            decoder_embed_dim=model.decoder_embed_dim, decoder_depth=len(model.decoder_blocks),
            decoder_num_heads=decoder_heads if model.decoder_mode != 1 else 16, decoder_mode=model.decoder_mode,
            norm_pix_loss=model.norm_pix_loss, mask_2d=model.mask_2d, mask_t_prob=model.mask_t_prob,
            mask_f_prob=model.mask_f_prob, no_shift=model.no_shift, contextual_depth=model.contextual_depth,
            pos_trainable=model.pos_embed.requires_grad,
        )
    else:
        drop_path = blocks[-1].drop_path  # the last block's rate is drop_path_rate (the first's is 0)
        config.update(num_classes=model.num_classes, global_pool=model.global_pool, mask_2d=model.mask_2d,
                      qkv_bias=blocks[0].attn.qkv.bias is not None, drop_rate=model.pos_drop.p,
                      attn_drop_rate=blocks[0].attn.attn_drop.p,
                      drop_path_rate=getattr(drop_path, "drop_prob", 0.0))
        scale = blocks[0].attn.scale
        if scale != (model.embed_dim // blocks[0].attn.num_heads) ** -0.5:
            config["qk_scale"] = scale  # not in the weights, yet it changes every output
    return config


def save_pretrained(model: nn.Module, path) -> Path:
    """Write the weights as safetensors with the config in the metadata; ``from_pretrained`` reads it back."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # The backend is a property of the machine, not of the weights: a file loads in any backend.
    config = {k: v for k, v in model_config(model).items() if k != "backend"}
    metadata = {"format": "pt", "audiomae_class": type(model).__name__, "audiomae_config": json.dumps(config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
