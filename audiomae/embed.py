"""``audiomae embed DATA --ckpt CKPT --out FILE``: one embedding per clip from a trained encoder.

The embedding is the encoder's output averaged over the patch tokens: for a pretraining checkpoint
the final (normed) encoder output, for a fine-tuned one the pooled features its classifier reads;
``--layer K`` takes instead the tokens after block K (1 = first) averaged, unnormed. Clips longer
than the model's input are cut at its length from their start; shorter ones are padded.

``.npy`` output gets a sidecar ``<name>.files.txt`` (one path per row of the array); ``.safetensors``
output holds the tensor ``embeddings`` and the file list (JSON) in its metadata under ``files``.
Files that cannot be read are skipped, counted and left out of both.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .train import add_feature_args, add_input_args, command


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="clip embeddings from a checkpoint", description=__doc__.splitlines()[0])
    add_input_args(p)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="checkpoint: ours (pretrain or finetune), or an official AudioMAE .pth / .safetensors")
    p.add_argument("--out", required=True, type=Path, help="output file, .npy or .safetensors")
    p.add_argument("--layer", type=int, default=None, help="average the tokens after block K instead of the final output")
    add_feature_args(p)
    p.set_defaults(func=run)


def load_encoder(path: Path, backend: str):
    """(model, feature settings it was trained with) from any checkpoint the CLI knows (read once)."""
    from .checkpoint import checkpoint_features, model_from_checkpoint, read_checkpoint
    from .train import build_model

    state, extra = read_checkpoint(path)
    if "run_config" in extra:  # written by audiomae pretrain / finetune
        run = extra["run_config"]
        model = build_model(run["model"], run["model_kwargs"], backend)
        model.load_state_dict(state)
        return model, run["features"]
    model = model_from_checkpoint(state, extra, backend=backend)
    # An AudioMAE encoder takes one clip length; MAE-AST takes any (the flags or defaults choose).
    # An official checkpoint names its dataset, whose statistics normalise the features.
    features = checkpoint_features(extra)
    if hasattr(model, "patch_embed"):
        features["target_length"] = model.patch_embed.img_size[0]
    return model, features


def encoder_blocks(model):
    from .mae_ast import MAEASTClassifier

    return model.backbone.blocks if isinstance(model, MAEASTClassifier) else model.blocks


def final_embedding(model, spec: torch.Tensor) -> torch.Tensor:
    """The encoder's output pooled over tokens: spec [B, T, 128] -> [B, D]."""
    from .mae import MaskedAutoencoderViT
    from .mae_ast import MAEAST, MAEASTClassifier

    if hasattr(model, "patch_embed"):
        # The bins the patches tile: 126 of the 128 for patches of 14, as a strided convolution
        # over all 128 would drop the last two.
        spec = spec[..., : model.patch_embed.img_size[1]]
    if isinstance(model, MaskedAutoencoderViT):  # the encoder with nothing masked, cls token left out
        x = spec.unsqueeze(1)
        x = model.patch_embed(x) + model.pos_embed[:, 1:, :]
        cls_tokens = (model.cls_token + model.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for block in model.blocks:
            x = block(x)
        return model.norm(x)[:, 1:, :].mean(dim=1)
    if isinstance(model, MAEAST):
        return model.forward_features(spec).mean(dim=1)
    if isinstance(model, MAEASTClassifier):
        return model.backbone.forward_features(spec).mean(dim=1)
    return model.forward_features(spec.unsqueeze(1))  # VisionTransformer: what its head reads


def embed_batch(model, spec: torch.Tensor, layer: int | None) -> torch.Tensor:
    """spec [B, T, 128] -> embeddings [B, D]: the final output, or block ``layer``'s tokens averaged."""
    if layer is None:
        return final_embedding(model, spec)
    captured = []
    hook = encoder_blocks(model)[layer - 1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        final_embedding(model, spec)
    finally:
        hook.remove()
    tokens = captured[0]
    has_cls = hasattr(model, "cls_token")
    return (tokens[:, 1:, :] if has_cls else tokens).mean(dim=1)


@command
def run(args) -> int:
    import numpy as np

    from .data import ClipDataset, Collate, EpochBatchSampler, FrontEnd, NoAudioError
    from .train import UsageError, check_output_file, feature_settings, load_items, make_loader, resolve_backend
    from .training import say, setup_distributed

    if args.out.suffix not in (".npy", ".safetensors"):
        raise UsageError(f"--out must end in .npy or .safetensors, got {args.out}")
    check_output_file(args.out)
    world = setup_distributed(args.device)
    model, saved_features = load_encoder(args.ckpt, resolve_backend(args.backend, world.device))
    features = feature_settings(args, saved_features)
    if hasattr(model, "patch_embed") and model.patch_embed.img_size[0] != features["target_length"]:
        raise UsageError(f"this AudioMAE model takes {model.patch_embed.img_size[0]} frames; "
                         f"--target-length {features['target_length']} does not fit it")
    depth = len(encoder_blocks(model))
    if args.layer is not None and not 1 <= args.layer <= depth:
        raise UsageError(f"--layer must be in [1, {depth}] for this {depth}-block encoder")
    model.to(world.device).eval()
    items = load_items(args.data, world)
    front_end = FrontEnd(**features, backend=args.fbank_backend)
    dataset = ClipDataset(items, front_end.num_samples, random_crop=False)
    sampler = EpochBatchSampler(len(items), args.batch_size, shuffle=False, drop_last=False)
    loader = make_loader(dataset, sampler, Collate(front_end.num_samples, front_end.min_samples),
                         args.num_workers, world.device)
    from tqdm import tqdm

    rows, paths, skipped = [], [], 0
    with torch.no_grad():
        for batch in tqdm(loader, unit="batch", file=sys.stderr, dynamic_ncols=True):
            for reason in batch.skipped:
                skipped += 1
                say(world, f"skipped {reason}")
            if len(batch) == 0:
                continue
            spec = front_end(batch.waves.to(world.device), batch.lengths)
            rows.append(embed_batch(model, spec, args.layer).float().cpu())
            paths.extend(items[i].path for i in batch.indices.tolist())
    if not rows:
        raise NoAudioError(f"none of the clips in {args.data} could be decoded")
    embeddings = torch.cat(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".npy":
        np.save(args.out, embeddings.numpy())
        args.out.with_suffix(".files.txt").write_text("".join(p + "\n" for p in paths))
    else:
        from safetensors.torch import save_file

        metadata = {"files": json.dumps(paths), "checkpoint": str(args.ckpt), "layer": str(args.layer or "final")}
        save_file({"embeddings": embeddings.contiguous()}, str(args.out), metadata=metadata)
    note = f" ({skipped} unreadable clip(s) skipped)" if skipped else ""
    say(world, f"wrote {embeddings.shape[0]} embeddings of size {embeddings.shape[1]} to {args.out}{note}")
    return 0
