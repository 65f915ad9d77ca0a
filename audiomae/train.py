"""``audiomae pretrain`` and ``audiomae finetune``: training on your own audio, on one device or many.

    audiomae pretrain DATA --model mae_vit_base_patch16 --out runs/pt [--resume]
    audiomae finetune DATA --init runs/pt/checkpoint.pth --out runs/ft
    torchrun --nproc_per_node=8 -m audiomae pretrain DATA ...

DATA is a folder of audio (recursive), or a CSV/JSON list (see ``audiomae.data``). Each run writes
``OUT/checkpoint.pth`` (every ``--save-every`` steps and at the end), ``OUT/log.csv`` and TensorBoard
events under ``OUT/tensorboard``. ``--resume`` continues a stopped run exactly where its last
checkpoint left it (run it with the same arguments).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

MAE_MODELS = ("mae_vit_base_patch16", "mae_vit_small_patch16", "mae_vit_large_patch16")
MAE_AST_MODELS = ("mae_ast_patch", "mae_ast_frame")
DATASETS = ("audioset", "esc50", "speechcommands")  # audiomae.features.DATASETS: statistics and clip length
SIZE_FLAGS = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
MAE_AST_NAMES = {"depth": "encoder_depth"}  # where MAE-AST's constructor names a size differently


class UsageError(ValueError):
    """A command-line mistake: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------ arguments
def _bounded(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int or float) within the bounds, finite; argparse names the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording
    return parse


POSITIVE_INT = _bounded(int, 1)
NON_NEGATIVE_INT = _bounded(int, 0)
SEED_MAX = 2**32 - 1  # numpy's range (seed_everything seeds it too)
SEED = _bounded(int, 0, SEED_MAX)
NON_NEGATIVE = _bounded(float, 0)
FRACTION = _bounded(float, 0, 1, high_open=True)  # [0, 1)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of constructor keywords, got {text}")
    return value


def add_input_args(p: argparse.ArgumentParser) -> None:
    """Arguments every command that reads audio shares (pretrain, finetune, embed)."""
    p.add_argument("data", metavar="DATA", help="folder of audio files (searched recursively) or a CSV/JSON list")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="clips per process per step (default 8)")
    p.add_argument("--num-workers", type=NON_NEGATIVE_INT, default=4, help="audio decoding processes per rank (default 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "sdpa", "xformers", "triton"),
                   help="model kernels (audiomae.backends); auto = triton on CUDA, sdpa on the CPU")
    p.add_argument("--fbank-backend", default="auto", choices=("auto", "torch", "cuda"),
                   help="fbank implementation (kernels.fbank); auto = the CUDA kernel for CUDA tensors when built")


def add_feature_args(p: argparse.ArgumentParser, *, dataset_sets_length: bool = False) -> None:
    """The front end's flags; ``dataset_sets_length`` (fine-tuning): a ``--dataset`` given sets the
    clip length before the checkpoint's does (``feature_settings``)."""
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="fbank normalisation statistics and default clip length of this dataset "
                        "(default: the checkpoint's, else audioset)")
    lengths = "1024 audioset, 512 esc50, 128 speechcommands"
    default = (f"the --dataset's when given ({lengths}; a longer checkpoint's position table is cut to it), "
               "else the checkpoint's, else 1024" if dataset_sets_length
               else f"the checkpoint's, else the dataset's: {lengths}")
    p.add_argument("--target-length", type=POSITIVE_INT, default=None,
                   help=f"frames per clip, 10 ms each (default: {default}); longer clips are cropped, shorter padded")
    p.add_argument("--pad-mode", default=None, choices=("official", "silence"),
                   help="padding of short clips: official (0 in the log domain, as the released models; the default) "
                        "or silence")


def add_training_args(p: argparse.ArgumentParser, *, epochs: int, warmup: float, blr: float, min_lr: float,
                      weight_decay: float, dataset_sets_length: bool = False) -> None:
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pth, log.csv, tensorboard/")
    add_feature_args(p, dataset_sets_length=dataset_sets_length)
    p.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help=f"epochs (default {epochs}); the schedule spans them")
    p.add_argument("--max-steps", type=POSITIVE_INT, default=None,
                   help="stop (with a checkpoint) after this many optimiser steps; the schedule still spans --epochs")
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=warmup, help=f"linear warm-up epochs (default {warmup})")
    p.add_argument("--blr", type=NON_NEGATIVE, default=blr,
                   help=f"base learning rate: lr = blr * effective batch / 256 (default {blr})")
    p.add_argument("--lr", type=NON_NEGATIVE, default=None, help="absolute learning rate (overrides --blr)")
    # None: the default, lowered to the learning rate where that is smaller (--lr 0 keeps weights).
    p.add_argument("--min-lr", type=NON_NEGATIVE, default=None,
                   help=f"learning rate at the end of the cosine (default {min_lr}, or the learning rate where "
                        "that is smaller)")
    p.set_defaults(default_min_lr=min_lr)
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=weight_decay, help=f"AdamW weight decay (default {weight_decay})")
    p.add_argument("--accum-iter", type=POSITIVE_INT, default=1, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--roll-mag-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="scale each training clip by Beta(10, 10) + 0.5, the official roll_mag_aug as its AudioSet "
                        "scripts set it (its roll moves nothing: it rolls the channel axis of a mono clip)")
    p.add_argument("--clip-grad", type=_bounded(float, 0, low_open=True), default=None,
                   help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto = bf16 on CUDA, fp32 on the CPU; fp16 uses a GradScaler (CUDA only)")
    p.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    p.add_argument("--seed", type=SEED, default=0, help="random seed; process k of a distributed run takes seed + k "
                                                        "(default 0)")
    p.add_argument("--save-every", type=NON_NEGATIVE_INT, default=1000,
                   help="checkpoint every N optimiser steps (default 1000; 0: only at the end)")
    p.add_argument("--log-every", type=POSITIVE_INT, default=10, help="log the loss every N optimiser steps (default 10)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a stopped run from CKPT (default OUT/checkpoint.pth)")


def add_size_args(p: argparse.ArgumentParser) -> None:
    for flag in SIZE_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=POSITIVE_INT, default=None, help=f"override the preset's {flag}")
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='more constructor keywords, as a JSON object (e.g. \'{"mlp_ratio": 2}\')')


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="self-supervised pretraining (AudioMAE or MAE-AST)",
                              description=__doc__.splitlines()[0])
    add_input_args(p)
    p.add_argument("--model", default="mae_vit_base_patch16", choices=MAE_MODELS + MAE_AST_MODELS)
    add_size_args(p)
    p.add_argument("--mask-ratio", type=_bounded(float, 0, 1, low_open=True, high_open=True), default=None,
                   help="fraction of tokens masked (default: 0.8 for AudioMAE as the official recipe, "
                        "the model's own for MAE-AST)")
    p.add_argument("--decoder-mode", type=int, default=1, choices=(0, 1),
                   help="AudioMAE decoder: 0 global attention, 1 shifted-window (Swin) attention as the official AudioSet recipe")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="AudioMAE: reconstruct per-patch normalised targets, as the official recipe")
    # The official AudioSet-2M recipe (submit_pretrain_audioset2M.sh): 33 epochs, 3 of warm-up,
    # blr 2e-4, weight decay 1e-4 (main_pretrain.py's own defaults differ; the script overrides them).
    add_training_args(p, epochs=33, warmup=3.0, blr=2e-4, min_lr=0.0, weight_decay=1e-4)
    p.set_defaults(func=run_pretrain)

    p = subparsers.add_parser("finetune", help="classification from a pretrained checkpoint")
    add_input_args(p)
    p.add_argument("--init", required=True, type=Path,
                   help="pretraining checkpoint (ours, or an official AudioMAE .pth / .safetensors)")
    p.add_argument("--multilabel", action="store_true",
                   help="multi-label (BCE, mAP) even if every clip has one label; chosen anyway when some clip has several")
    p.add_argument("--label-csv", type=Path, default=None,
                   help="the official class index (class_labels_indices.csv: index, mid, display_name): the classes "
                        "and their order for the head, as the official recipe's --label_csv (default: the labels "
                        "found in the data, sorted)")
    p.add_argument("--val", default=None, help="validation DATA (default: a --val-fraction split of DATA)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of DATA held out for validation")
    p.add_argument("--mask-t-prob", type=FRACTION, default=0.2, help="structured masking: share of time rows dropped")
    p.add_argument("--mask-f-prob", type=FRACTION, default=0.2, help="structured masking: share of frequency columns dropped")
    p.add_argument("--mixup", type=_bounded(float, 0, 1), default=0.5,
                   help="share of training clips mixed with another clip of the batch, as the official recipe: "
                        "waveforms mixed before the fbank, lambda ~ Beta(10, 10), labels mixed alike (0: off)")
    p.add_argument("--freqm", type=NON_NEGATIVE_INT, default=48,
                   help="SpecAugment: each training clip loses up to this many Mel bins, as torchaudio's "
                        "FrequencyMasking in the official recipe (default 48; 0: off)")
    p.add_argument("--timem", type=NON_NEGATIVE_INT, default=192,
                   help="SpecAugment: each training clip loses up to this many frames, as TimeMasking "
                        "(default 192; 0: off)")
    p.add_argument("--drop-path", type=_bounded(float, 0, 1, high_open=True), default=0.1, help="stochastic depth rate")
    p.add_argument("--layer-decay", type=_bounded(float, 0, 1, low_open=True), default=0.75,
                   help="layer-wise learning-rate decay")
    add_training_args(p, epochs=60, warmup=4.0, blr=1e-3, min_lr=1e-6, weight_decay=5e-4, dataset_sets_length=True)
    p.set_defaults(func=run_finetune)


# ---------------------------------------------------------------------------------------- models
def family_of(name: str) -> str:
    if name in MAE_MODELS:
        return "mae"
    if name in MAE_AST_MODELS:
        return "mae_ast"
    if name == "VisionTransformer":
        return "vit"
    if name == "MAEASTClassifier":
        return "mae_ast_classifier"
    raise UsageError(f"unknown model {name!r}")


# Constructor keywords that are counts or sizes: --model-kwargs must give them as positive integers
# (the size flags' own argparse type checks theirs), or the constructors fail deep inside, or
# build an encoder of no blocks.
SIZE_KEYWORDS = (*SIZE_FLAGS, "patch_size", "encoder_depth", "in_chans")


def size_overrides(args, family: str) -> dict:
    kwargs = {}
    for flag in SIZE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            kwargs[MAE_AST_NAMES.get(flag, flag) if family == "mae_ast" else flag] = value
    for key, value in args.model_kwargs.items():
        least = 0 if key == "decoder_depth" else 1  # MAE-AST's SSAST mode has no decoder
        if key in SIZE_KEYWORDS and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise UsageError(f"--model-kwargs {key} must be an integer >= {least}, got {value!r}")
    return {**kwargs, **args.model_kwargs}


def build_model(name: str, kwargs: dict, backend: str):
    """A model from its name and constructor keywords, as our checkpoints store them. An
    ``MAEASTClassifier``'s keywords are ``backbone`` (a preset name), ``backbone_kwargs`` and
    ``num_classes``."""
    import audiomae
    from audiomae import mae_ast

    family = family_of(name)
    if family == "mae_ast_classifier":
        backbone = build_model(kwargs["backbone"], kwargs["backbone_kwargs"], backend)
        return mae_ast.MAEASTClassifier(backbone, num_classes=kwargs["num_classes"])
    constructor = getattr(mae_ast if family == "mae_ast" else audiomae, name)
    try:
        return constructor(**kwargs, backend=backend)
    except (TypeError, ValueError, ArithmeticError, RuntimeError, AttributeError) as exc:
        # A keyword the model does not take, or a value it cannot use (--model-kwargs, or a
        # checkpoint's run config): one line naming the keywords, not a traceback from inside it.
        raise UsageError(f"cannot build {name} with {kwargs}: {type(exc).__name__}: {exc}") from exc


def resolve_backend(name: str, device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    return name


# ------------------------------------------------------------------------------------------ data
def load_items(data, world, what: str = "DATA"):
    """Readable clips of a DATA argument; unreadable and empty files are reported and skipped."""
    from .data import NoAudioError, list_audio, scan_readable
    from .training import say

    items = list_audio(data)
    readable, skipped = scan_readable(items)
    if skipped:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        say(world, f"skipping {len(skipped)} of {len(items)} file(s) in {what}:\n{shown}{more}")
    if not readable:
        raise NoAudioError(f"none of the {len(items)} audio file(s) in {data} could be read")
    _check_ranks_agree(readable, world, what)
    return readable


def _check_ranks_agree(items, world, what: str) -> None:
    """Every process lists and scans the clips itself; a file one of them could not read (a network
    file system's hiccup) would shift its shard against the others' silently: an error instead."""
    import hashlib

    from .data import NoAudioError
    from .training import gather_objects

    if not world.enabled:  # one process: nothing to compare, and no digest of millions of paths
        return
    digest = hashlib.sha1("\n".join(f"{item.path}\t{','.join(item.labels)}" for item in items).encode()).hexdigest()
    seen = gather_objects((len(items), digest), world)
    if len(set(seen)) > 1:
        counts = ", ".join(f"rank {rank}: {count}" for rank, (count, _) in enumerate(seen))
        raise NoAudioError(f"the processes found different readable clips in {what} ({counts}): every rank must "
                           "read the same files")


def make_loader(dataset, sampler, collate, num_workers: int, device):
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader off the global RNG, which checkpoints restore
    )


# ------------------------------------------------------------------------------------- commands
def command(run):
    """Wrap a command: bad arguments, data or checkpoints (ValueError, which the library raises for
    every bad input, FileNotFoundError, CheckpointMismatchError) become one line on stderr and exit 2."""
    def wrapped(args) -> int:
        from .backends import BackendUnavailableError
        from .checkpoint import CheckpointMismatchError
        from .training import teardown_distributed

        finished = False
        try:
            status = run(args)
            finished = status == 0
            return status
        except (ValueError, FileNotFoundError, CheckpointMismatchError, BackendUnavailableError) as exc:
            print(f"audiomae {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            # a path given on the command line that cannot be used as asked (e.g. --out names a file)
            print(f"audiomae {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except FloatingPointError as exc:  # a diverged run: the last good checkpoint is kept
            print(f"audiomae {args.command}: error: {exc}", file=sys.stderr)
            return 1
        finally:
            teardown_distributed(wait_for_peers=finished)

    wrapped.__name__ = run.__name__
    return wrapped


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (made if missing) takes no files, or None: a probe file is written and removed,
    so permissions, read-only mounts and quotas answer before a long run, not in a traceback after it."""
    probe = folder / f".audiomae-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def check_output_file(path: Path) -> None:
    """Before a long run: ``path`` is not a folder, and its folder exists (made) and takes files."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name")
    problem = unwritable(path.parent)
    if problem:
        raise UsageError(f"--out {path}: cannot write in {path.parent} ({problem})")


def setup_run(args):
    """(world, precision name, resume checkpoint or None) for a training command."""
    from .training import load_checkpoint, seed_everything, setup_distributed

    world = setup_distributed(args.device)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if world.device.type == "cuda" else "fp32"
    problem = unwritable(args.out)
    if problem:
        raise UsageError(f"--out {args.out}: cannot write the run there ({problem})")
    checkpoint = None
    if args.resume:
        path = args.out / "checkpoint.pth" if args.resume == "auto" else args.resume
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
            raise UsageError(f"--resume {path}: not a checkpoint of an audiomae run (it has no run config); "
                             "to start from official weights, use finetune --init")
    if args.seed + world.rank > SEED_MAX:
        raise UsageError(f"--seed {args.seed}: process {world.rank} would take seed {args.seed + world.rank}, "
                         f"past {SEED_MAX}")
    seed_everything(args.seed + world.rank)
    return world, precision, checkpoint


def feature_settings(args, saved: dict | None = None, *, dataset_sets_length: bool = False) -> dict:
    """The front end's settings: each flag given, else the checkpoint's (``saved``), else the defaults.
    ``dataset_sets_length`` (fine-tuning, whose model is built for the clip length): a ``--dataset``
    given sets the length before the checkpoint does, as the official recipes fine-tune an AudioSet
    encoder on ESC-50's 512 frames."""
    from .features import DATASETS as FEATURE_DATASETS

    saved = saved or {}
    dataset = args.dataset or saved.get("dataset", "audioset")
    saved_length = saved.get("target_length")
    if args.target_length is not None:
        length = args.target_length
    elif dataset_sets_length and args.dataset not in (None, saved.get("dataset", "audioset")):
        # Another dataset than the checkpoint's: its clip length, where the checkpoint's position
        # table can be cut to it (it is never extended).
        length = min(FEATURE_DATASETS[dataset][2], saved_length or FEATURE_DATASETS[dataset][2])
    else:
        length = saved_length or FEATURE_DATASETS[dataset][2]
    return {"dataset": dataset, "target_length": length, "pad_mode": args.pad_mode or saved.get("pad_mode", "official")}


def training_data(items, front_end, args, world, classes=None):
    """(loader, sampler) over ``items``: shuffled per epoch, randomly cropped, sharded over ranks."""
    from .data import ClipDataset, Collate, EpochBatchSampler

    dataset = ClipDataset(items, front_end.num_samples, random_crop=True, seed=args.seed, classes=classes)
    sampler = EpochBatchSampler(len(items), args.batch_size, shuffle=True, drop_last=True, seed=args.seed,
                                rank=world.rank, world_size=world.world_size)
    collate = Collate(front_end.num_samples, front_end.min_samples, len(classes) if classes else None)
    return make_loader(dataset, sampler, collate, args.num_workers, world.device), sampler


def make_trainer(model, args, world, precision, config, checkpoint, *, num_clips: int, find_unused=False, **extra):
    """The Trainer and RunLog of a run; a ``checkpoint`` to resume is loaded into them."""
    from .training import RunLog, Trainer, say

    # What a resumed run must share with the run it continues, for the data position to mean the same.
    config["run"] = {"clips": num_clips, "batch_size": args.batch_size, "accum_iter": args.accum_iter,
                     "world_size": world.world_size, "seed": args.seed}
    effective_batch = args.batch_size * args.accum_iter * world.world_size
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256
    min_lr = min(args.default_min_lr, lr) if args.min_lr is None else args.min_lr
    if min_lr > lr:
        raise UsageError(f"--min-lr {min_lr:g} is above the learning rate {lr:g}: the cosine would climb")
    if args.warmup_epochs > args.epochs:
        say(world, f"warning: --warmup-epochs {args.warmup_epochs:g} outlasts --epochs {args.epochs}: the learning "
                   f"rate never reaches {lr:g}")
    trainer = Trainer(
        model, world=world, out_dir=args.out, config=config, precision=precision, lr=lr, min_lr=min_lr,
        warmup_epochs=args.warmup_epochs, epochs=args.epochs, weight_decay=args.weight_decay,
        accum_iter=args.accum_iter, clip_grad=args.clip_grad, save_every=args.save_every,
        max_steps=args.max_steps, log_every=args.log_every, find_unused_parameters=find_unused,
        compile=args.compile, **extra)
    if checkpoint is not None:
        # What a resumed run must share with the one it continues, each with what it means.
        for keys, needs in ((("model", "model_kwargs"), "the model of the run it continues"),
                            (("classes", "multilabel"), "the classes, in the same order (--label-csv), and the task "
                                                        "of the run it continues"),
                            (("run",), "the same data, batch size, gradient accumulation, seed and number of "
                                       "processes as the run it continues"),
                            (("features",), "the same --dataset, --target-length and --pad-mode as the run it "
                                            "continues")):
            saved, now = ({k: c.get(k) for k in keys} for c in (checkpoint["config"], config))
            if saved != now:
                raise UsageError(f"--resume needs {needs}: it had {saved}, this run has {now}")
        trainer.resume(checkpoint)
        position = trainer.position
        say(world, f"resuming at step {position.step} (epoch {position.epoch}, batch {position.batch})")
        if args.max_steps is not None and position.step >= args.max_steps:
            say(world, f"nothing to train: the checkpoint is at step {position.step}, --max-steps is {args.max_steps}")
    return trainer, RunLog(args.out, world, resume_step=trainer.position.step if checkpoint is not None else None)


@command
def run_pretrain(args) -> int:
    from .augment import scale_magnitudes
    from .data import FrontEnd
    from .training import say

    world, precision, checkpoint = setup_run(args)
    family = family_of(args.model)
    features = feature_settings(args)
    kwargs = size_overrides(args, family)
    if family == "mae" and args.decoder_mode == 1:
        ignored = [f"--{flag.replace('_', '-')}" for flag in ("decoder_depth", "decoder_num_heads")
                   if getattr(args, flag) is not None]
        if ignored:
            raise UsageError(f"{' and '.join(ignored)} have no effect with --decoder-mode 1: its decoder is 16 Swin "
                             "blocks of 16 heads, as the official model builds it; use --decoder-mode 0")
    if family == "mae":
        kwargs = {"img_size": [features["target_length"], 128], "decoder_mode": args.decoder_mode,
                  "norm_pix_loss": args.norm_pix_loss, **kwargs}
    elif args.mask_ratio is not None:
        kwargs = {"mask_ratio": args.mask_ratio, **kwargs}
    model = build_model(args.model, kwargs, resolve_backend(args.backend, world.device))
    mask_ratio = 0.8 if args.mask_ratio is None else args.mask_ratio

    items = load_items(args.data, world)
    front_end = FrontEnd(**features, backend=args.fbank_backend)
    loader, sampler = training_data(items, front_end, args, world)
    config = {"model": args.model, "model_kwargs": kwargs, "features": features}
    trainer, log = make_trainer(model, args, world, precision, config, checkpoint, num_clips=len(items),
                                find_unused=family == "mae_ast")

    def loss_fn(model, batch, autocast):
        waves = batch.waves.to(world.device, non_blocking=True)
        if args.roll_mag_aug:
            waves = scale_magnitudes(waves)
        spec = front_end(waves, batch.lengths)
        with autocast():
            if family == "mae_ast":
                return model(spec).loss
            return model(spec.unsqueeze(1), mask_ratio=mask_ratio)[0]

    trainer.fit(loader, sampler, loss_fn, log=log)
    log.close()
    say(world, f"checkpoint: {trainer.checkpoint_path}")
    return 0


@command
def run_finetune(args) -> int:
    from .finetune import finetune

    return finetune(args)
