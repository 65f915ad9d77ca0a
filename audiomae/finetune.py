"""``audiomae finetune``: classification on labelled audio from a pretrained encoder.

Labels come from class folders or from a label column of a CSV/JSON list (``audiomae.data``). A clip
with several labels makes the task multi-label (sigmoid outputs, binary cross-entropy, mean average
precision); otherwise it is single-label (softmax, cross-entropy, accuracy). Training uses the
official recipe's augmentations (``audiomae.augment``: magnitude scaling, mixup of waveforms,
SpecAugment bands), its structured time/frequency token masking and layer-wise learning-rate
decay; after every epoch the validation split is scored and logged (mAP ranks the logits
themselves: a float32 sigmoid rounds every logit above 16.6 to 1.0 and would tie them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import augment
from .data import AudioItem, ClipDataset, Collate, EpochBatchSampler, FrontEnd, NoAudioError
from .train import (UsageError, build_model, family_of, feature_settings, load_items, make_loader, make_trainer,
                    resolve_backend, setup_run, training_data)
from .features import DATASETS as FEATURE_DATASETS, NUM_MEL_BINS
from .training import Dist, gather_objects, say


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes (those with a positive) of average precision: scores, targets [N, C].

    As sklearn's ``average_precision_score`` (the official evaluation): tied scores are one
    threshold, so each positive counts the precision at the end of its group of ties, whatever
    the rows' order (logits rounded to 16 bits tie often)."""
    sorted_scores, order = scores.sort(dim=0, descending=True, stable=True)
    hits = targets.gather(0, order).double()
    n = hits.shape[0]
    rows = torch.arange(n)[:, None].expand_as(hits)
    group_end = torch.ones_like(hits, dtype=torch.bool)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    # Each row's group end: the first end at or after it (a reverse running minimum).
    end = torch.where(group_end, rows, n).flip(0).cummin(dim=0).values.flip(0)
    precision_at_end = (hits.cumsum(dim=0) / (rows + 1)).gather(0, end)
    positives = hits.sum(dim=0)
    average_precision = (precision_at_end * hits).sum(dim=0) / positives.clamp(min=1)
    if not bool((positives > 0).any()):
        raise ValueError("no class has a positive clip in the validation split; mAP is undefined")
    return float(average_precision[positives > 0].mean())


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == targets.argmax(dim=1)).double().mean())


def pretrained_backbone(path):
    """(model name, constructor keywords, feature settings or None, state to load or None) of the
    classifier that starts from the pretraining checkpoint ``path``; the caller adds ``num_classes``.

    Our AudioMAE checkpoints and official ones become a ``VisionTransformer`` of the same encoder
    (loaded with ``load_pretrained_encoder``); our MAE-AST ones an ``MAEASTClassifier`` over the
    same backbone (whose state is returned here)."""
    from .checkpoint import infer_config, read_checkpoint

    state, extra = read_checkpoint(path)  # once: a large official .pth is slow to read
    config = extra.get("run_config")
    if config is not None:  # written by audiomae pretrain or finetune
        family = family_of(config["model"])
        if family == "mae_ast":
            kwargs = {"backbone": config["model"], "backbone_kwargs": config["model_kwargs"]}
            return "MAEASTClassifier", kwargs, config["features"], state
        if family == "mae_ast_classifier":  # a fine-tuning run: its backbone, a new head
            kwargs = {k: config["model_kwargs"][k] for k in ("backbone", "backbone_kwargs")}
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            return "MAEASTClassifier", kwargs, config["features"], state
        with torch.device("meta"):  # the sizes, without allocating the weights
            preset = build_model(config["model"], config["model_kwargs"], "reference")
        # A pretraining run's MaskedAutoencoderViT or a fine-tuning run's VisionTransformer
        # (load_pretrained_encoder takes the encoder of either).
        block = preset.blocks[0]
        width = block.norm1.normalized_shape[0]
        sizes = {"embed_dim": width, "depth": len(preset.blocks), "num_heads": block.attn.num_heads,
                 "mlp_ratio": block.mlp.fc1.out_features / width, "patch_size": preset.patch_embed.patch_size[0]}
        return "VisionTransformer", sizes, config["features"], None
    if extra.get("class") in ("MAEAST", "MAEASTClassifier") and extra.get("config"):
        return _mae_ast_backbone(path, state, extra)
    if extra.get("class") in ("MaskedAutoencoderViT", "VisionTransformer") and extra.get("config"):
        config = extra["config"]  # our .safetensors: the sizes it was built with (heads are not in the weights)
    else:
        _, config = infer_config(state, extra.get("args"))
    sizes = {k: config[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")}
    if sizes["num_heads"] is None:
        raise ValueError(f"cannot tell the number of heads of {path}'s width-{sizes['embed_dim']} encoder (an official "
                         "checkpoint's model name or our .safetensors config says it)")
    return "VisionTransformer", sizes, {"target_length": config["img_size"][0]}, None


def _mae_ast_backbone(path, state: dict, extra: dict):
    """An MAE-AST (or its classifier's) ``.safetensors``: the classifier over the same backbone,
    built from the config it stores, and the backbone's weights (a classifier's head is dropped)."""
    config = {k: v for k, v in extra["config"].items() if k not in ("backend", "num_classes")}
    eps = config.pop("norm_eps", 1e-6)
    if eps != 1e-6:
        raise ValueError(f"{path}: its LayerNorm eps {eps} is not the presets' 1e-6, which a fine-tuning run rebuilds")
    preset = "mae_ast_patch" if config.get("tokens", "patch") == "patch" else "mae_ast_frame"
    if extra["class"] == "MAEASTClassifier":
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return "MAEASTClassifier", {"backbone": preset, "backbone_kwargs": config}, None, state


def split(items: list[AudioItem], val_data, fraction: float, seed: int, world: Dist):
    if val_data is not None:
        return items, load_items(val_data, world, "--val")
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise UsageError(f"{len(items)} clip(s) are too few to hold out a validation split")
    return [items[i] for i in order[count:]], [items[i] for i in order[:count]]


def class_index(path) -> list[str]:
    """The classes of an official class index CSV (``index,mid,display_name``, as AudioSet's
    ``class_labels_indices.csv``), in index order: the head's outputs, as the official recipe's."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a column
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                    for row in csv.DictReader(f, skipinitialspace=True)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--label-csv {path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if not rows or not {"index", "mid"} <= set(rows[0]):
        raise UsageError(f"--label-csv {path}: expected the columns index,mid[,display_name] of the official "
                         "class_labels_indices.csv")
    try:
        indexed = sorted((int(row["index"]), row["mid"]) for row in rows)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--label-csv {path}: an index that is not an integer ({exc})") from exc
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise UsageError(f"--label-csv {path}: indices must be 0 .. {len(indexed) - 1}, each once")
    mids = [mid for _, mid in indexed]
    if len(set(mids)) != len(mids) or "" in mids:
        raise UsageError(f"--label-csv {path}: every mid must be given, once")
    return mids


def label_set(train: list[AudioItem], val: list[AudioItem], multilabel: bool,
              classes: list[str] | None = None) -> tuple[list[str], bool]:
    """The head's classes (``classes`` from ``--label-csv``, else the labels found, sorted) and
    whether the task is multi-label."""
    everything = train + val
    found = {label for item in everything for label in item.labels}
    if classes is not None:
        unknown = sorted(found - set(classes))
        if unknown:
            example = next(item.path for item in everything if unknown[0] in item.labels)
            raise NoAudioError(f"{len(unknown)} label(s) are not in --label-csv, e.g. {unknown[0]!r} of {example}")
    else:
        classes = sorted(found)
    if not found:
        raise NoAudioError("finetune needs labels: class folders, or a CSV/JSON list with a labels column")
    multilabel = multilabel or any(len(item.labels) > 1 for item in everything)
    if not multilabel:
        unlabelled = [item.path for item in everything if not item.labels]
        if unlabelled:
            raise NoAudioError(f"{len(unlabelled)} clip(s) have no label, e.g. {unlabelled[0]}")
    if len(classes) < 2 and not multilabel:
        raise NoAudioError(f"single-label classification needs at least 2 classes, found {classes}")
    return classes, multilabel


def finetune(args) -> int:
    world, precision, checkpoint = setup_run(args)
    backend = resolve_backend(args.backend, world.device)
    name, kwargs, saved_features, backbone_state = pretrained_backbone(args.init)
    features = feature_settings(args, saved_features, dataset_sets_length=True)
    train_items, val_items = split(load_items(args.data, world), args.val, args.val_fraction, args.seed, world)
    classes, multilabel = label_set(train_items, val_items, args.multilabel,
                                    class_index(args.label_csv) if args.label_csv is not None else None)
    if multilabel and val_items and not any(item.labels for item in val_items):
        # mAP needs a positive: refused now, not after the first epoch's training
        raise UsageError(f"none of the {len(val_items)} validation clip(s) has a label, so mAP is undefined: "
                         "give --val labelled clips (or --val-fraction of labelled DATA)")
    say(world, f"{len(classes)} classes, {'multi' if multilabel else 'single'}-label; "
               f"{len(train_items)} training and {len(val_items)} validation clips")

    vit = name == "VisionTransformer"
    kwargs = {**kwargs, "num_classes": len(classes)}
    bins = NUM_MEL_BINS
    if vit:
        patch = kwargs.get("patch_size", 16)
        bins = NUM_MEL_BINS // patch * patch  # the bins the patches tile (126 for patches of 14; the rest dropped)
        kwargs.update(img_size=[features["target_length"], bins], drop_path_rate=args.drop_path, global_pool=True,
                      mask_2d=True)
    model = build_model(name, kwargs, backend)
    if checkpoint is None and vit:
        from .checkpoint import load_pretrained_encoder

        load_pretrained_encoder(model, args.init)
        # As the official main_finetune_as.py: a near-zero head on top of the pretrained encoder.
        torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
    elif checkpoint is None:
        model.backbone.load_state_dict(backbone_state)

    front_end = FrontEnd(**features, backend=args.fbank_backend)
    loader, sampler = training_data(train_items, front_end, args, world, classes)
    config = {"model": name, "model_kwargs": kwargs, "features": features, "classes": classes,
              "multilabel": multilabel}
    # MAE-AST's decoder rides along unused in its classifier; DDP must be told.
    trainer, log = make_trainer(model, args, world, precision, config, checkpoint, num_clips=len(train_items),
                                find_unused=not vit, betas=(0.9, 0.999), layer_decay=args.layer_decay)

    mean, std, _ = FEATURE_DATASETS[features["dataset"]]
    masked_value = (0.0 - mean) / (2 * std)  # the official masks write 0 into the fbank, then normalise

    def loss_fn(model, batch, autocast):
        waves = batch.waves.to(world.device, non_blocking=True)
        targets = batch.targets.to(world.device)
        if args.roll_mag_aug:
            waves = augment.scale_magnitudes(waves)
        waves, targets = augment.mix_clips(waves, batch.lengths, targets, args.mixup)
        spec = augment.mask_spectrogram(front_end(waves, batch.lengths), args.freqm, args.timem, masked_value)
        spec = spec[..., :bins]
        with autocast():
            if vit:
                logits = model(spec.unsqueeze(1), mask_t_prob=args.mask_t_prob, mask_f_prob=args.mask_f_prob)
            else:
                logits = model(spec)
        logits = logits.float()
        if multilabel:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets)

    metric_name = "val_mAP" if multilabel else "val_accuracy"
    val_set = ClipDataset(val_items, front_end.num_samples, random_crop=False, classes=classes)
    val_sampler = EpochBatchSampler(len(val_items), args.batch_size, shuffle=False, drop_last=False,
                                    rank=world.rank, world_size=world.world_size)
    val_loader = make_loader(val_set, val_sampler, Collate(front_end.num_samples, front_end.min_samples, len(classes)),
                             args.num_workers, world.device)

    @torch.no_grad()
    def evaluate(epoch: int) -> dict:
        trainer.module.eval()
        scores, targets = [], []
        for batch in val_loader:
            if len(batch) == 0:
                continue
            spec = front_end(batch.waves.to(world.device), batch.lengths)[..., :bins]
            with trainer.precision.autocast():
                logits = trainer.module(spec.unsqueeze(1) if vit else spec).float()
            scores.append(logits.cpu())  # monotone in sigmoid and softmax: mAP and accuracy rank logits
            targets.append(batch.targets)
        parts = gather_objects((scores, targets), world)
        scores = [s for part in parts for s in part[0]]
        targets = torch.cat([t for part in parts for t in part[1]]) if scores else None
        if not scores:
            say(world, f"epoch {epoch}: no validation clip could be read")
            return {}
        scores = torch.cat(scores)
        try:
            value = (mean_average_precision if multilabel else accuracy)(scores, targets)
        except ValueError as exc:  # the clips read hold no positive: no metric, but the run goes on
            say(world, f"epoch {epoch}: no {metric_name}: {exc}")
            return {}
        say(world, f"epoch {epoch}: {metric_name} {value:.4f} on {len(targets)} clips")
        return {metric_name: value}

    trainer.fit(loader, sampler, loss_fn, log=log, on_epoch_end=evaluate if val_items else None)
    log.close()
    say(world, f"checkpoint: {trainer.checkpoint_path}")
    return 0
