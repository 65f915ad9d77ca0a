"""The training loop shared by ``audiomae pretrain`` and ``audiomae finetune``.

- Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) the
  model runs in DistributedDataParallel, NCCL on GPUs and gloo on CPUs; each rank reads its shard,
  only rank 0 writes checkpoints and logs.
- Optimiser and schedule as the official ``main_pretrain.py`` / ``main_finetune_as.py``: AdamW
  (betas (0.9, 0.95) for pretraining, PyTorch's defaults and layer-wise learning-rate decay for
  fine-tuning), weight decay as each official script sets it: pretraining as timm's
  ``add_weight_decay`` (none on 1-D parameters and biases, so the cls and mask tokens are decayed),
  fine-tuning as ``param_groups_lrd`` (also none on the model's ``no_weight_decay()`` names: the
  position embedding and cls token); ``lr = blr * effective_batch / 256``, linear warm-up then a half-cycle cosine
  to ``min_lr``, set before every optimiser step from the fractional epoch (step / steps per epoch).
- Mixed precision: bf16 autocast, or fp16 autocast with a GradScaler, or fp32.
- Checkpoints hold everything an exact continuation needs (weights, optimiser, scaler, step, the
  data position as epoch and batch within it, and every RNG: python, numpy, torch and CUDA, per
  rank). They are written to a temporary file and renamed, so a kill mid-write keeps the last good one.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn



# ------------------------------------------------------------------------------------------ ranks
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None) -> Dist:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device}: not a device name (cpu, cuda or cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        # meta has no values to train on, and mps and the rest are untried here: refused before anything runs
        raise ValueError(f"--device {device}: the commands run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Dist(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group. After a clean run every rank first waits for the others (rank 0 may
    still be closing its logs): a rank that tears gloo down and exits while a peer still holds its
    connections can abort ("terminate called without an active exception", seen once in CI).
    After an error nobody waits, since a peer may never arrive; and a peer that left on an error
    after the last collective fails the wait, which is reported and still ends in the teardown."""
    if not dist.is_initialized():
        return
    try:
        if wait_for_peers:
            dist.barrier()
    except Exception as exc:  # noqa: BLE001 - the run's own result stands; the group is left either way
        print(f"warning: not every rank reached the end of the run ({type(exc).__name__}: {exc})".splitlines()[0],
              file=sys.stderr)
    finally:
        dist.destroy_process_group()


def gather_objects(obj, world: Dist) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------ optimiser
ENCODER_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")  # "blocks.3." or "backbone.blocks.3.", not "decoder_blocks"
EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed", "token_embed")


def layer_id(name: str, num_layers: int) -> int:
    """BEiT-style depth of an encoder parameter: embeddings 0, block i at i + 1, the rest (final norm,
    head) at ``num_layers``."""
    match = ENCODER_BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(key in name for key in EMBEDDINGS):
        return 0
    return num_layers


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 no_decay_names=()) -> list[dict]:
    """Weight decay on every parameter but 1-D ones and biases (norms, biases) and the parameters
    named in ``no_decay_names``; frozen parameters left out. Pretraining passes no names, as the
    official ``main_pretrain.py`` calls timm's ``add_weight_decay``; fine-tuning passes the model's
    ``no_weight_decay()``, as ``param_groups_lrd``. With ``layer_decay`` (fine-tuning), each group's
    ``lr_scale`` is ``layer_decay ** (num_layers - layer)`` (``num_layers`` = encoder depth + 1), as
    the official fine-tuning does."""
    names = [name for name, _ in model.named_parameters()]
    num_layers = len({m.group(1) for name in names if (m := ENCODER_BLOCK.search(name))}) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names
        layer = layer_id(name, num_layers) if layer_decay is not None else num_layers
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0,
        })
        group["params"].append(param)
    return list(groups.values())


def scheduled_lr(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 over ``warmup_epochs``, then half-cycle cosine from ``lr`` to ``min_lr``
    at ``epochs``; ``epoch`` is fractional (step / steps per epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Precision:
    """Autocast context and loss scaling for ``"bf16"``, ``"fp16"`` (CUDA only, with a GradScaler) or ``"fp32"``."""

    def __init__(self, name: str, device: torch.device):
        if name not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {name!r}")
        if name == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters, clip_grad: float | None) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


# ----------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path) -> dict:
    """A ``.pth`` checkpoint, ours or official (whose ``args`` is the one class allowed to unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    from .checkpoint import load_torch_file

    return load_torch_file(path)


# ------------------------------------------------------------------------------------- logging
class RunLog:
    """A CSV log (``log.csv``, one row per logged step or evaluation) and TensorBoard events, written by
    rank 0 only; other ranks get a log that drops everything."""

    COLUMNS = ["time", "step", "name", "value"]

    def __init__(self, out_dir: Path, world: Dist, resume_step: int | None = None):
        """``resume_step``: the step of the checkpoint a resumed run continues from. A step's rows
        are written before its checkpoint, so rows past it come from a run that stopped before its
        next checkpoint, and the resumed run writes them again: they are dropped (the CSV's, and
        TensorBoard's through its ``purge_step``). A fresh run (None) starts an empty CSV."""
        self.active = world.is_main
        self.csv_path = out_dir / "log.csv"
        self.writer = None
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None and self.csv_path.exists():
                self.csv_path.unlink()
            if resume_step is not None and self.csv_path.exists():
                self._drop_rows_after(resume_step)
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def _drop_rows_after(self, step: int) -> None:
        """Keep the rows of steps up to ``step``. A row that does not parse (cut short or garbled
        by the crash that stopped the run) is dropped too, so the resumed run's rows start on a
        line of their own."""
        with open(self.csv_path, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if len(r) == len(self.COLUMNS) and r[1].isdigit() and int(r[1]) <= step]
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerows([self.COLUMNS, *kept])

    def write(self, step: int, **values) -> None:
        if not self.active:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.COLUMNS)
            for name, value in values.items():
                writer.writerow([f"{time.time():.3f}", step, name, f"{value:.6g}"])
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def say(world: Dist, message: str, every_rank: bool = False) -> None:
    """A message to stderr that keeps clear of the progress bar: from rank 0, or from any rank (tagged)."""
    if world.is_main or every_rank:
        from tqdm import tqdm

        tqdm.write(f"[rank {world.rank}] {message}" if world.enabled else message, file=sys.stderr)


# ---------------------------------------------------------------------------------------- loop
@dataclass
class Position:
    """Where a run stands: optimiser steps done, and micro-batches read in the current epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class Trainer:
    """Owns the (DDP-wrapped) model, optimiser, precision and position of one run, and runs it.

    ``fit(loader, sampler, loss_fn)`` trains until ``epochs`` are done or ``max_steps`` optimiser
    steps are reached (then it checkpoints and returns, as a killed run would have at its last
    checkpoint). ``loss_fn(model, batch, autocast) -> loss`` computes one micro-batch's mean loss.
    """

    def __init__(self, model: nn.Module, *, world: Dist, out_dir: Path, config: dict, precision: str,
                 lr: float, min_lr: float, warmup_epochs: float, epochs: int, weight_decay: float,
                 accum_iter: int, clip_grad: float | None, save_every: int, max_steps: int | None,
                 log_every: int, betas: tuple[float, float] = (0.9, 0.95), layer_decay: float | None = None,
                 find_unused_parameters: bool = False, compile: bool = False):
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {accum_iter}")
        self.world, self.out_dir, self.config = world, Path(out_dir), config
        self.module = model.to(world.device)
        self.ddp = None
        if world.enabled:
            device_ids = [world.device] if world.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
        self.model = self.module if self.ddp is None else self.ddp
        if compile:  # the DDP wrapper is compiled, so its bucketed all-reduce splits the graph where it should
            self.model = torch.compile(self.model)
        # On CUDA the whole AdamW update is one fused kernel per parameter group.
        fused = {"fused": True} if world.device.type == "cuda" else {}
        no_decay_names = set(getattr(self.module, "no_weight_decay", set)()) if layer_decay is not None else ()
        self.optimizer = torch.optim.AdamW(param_groups(self.module, weight_decay, layer_decay, no_decay_names), lr=lr,
                                           betas=betas,
                                           **fused)
        self.precision = Precision(precision, world.device)
        self.schedule = dict(lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)
        self.epochs, self.accum_iter, self.clip_grad = epochs, accum_iter, clip_grad
        self.save_every, self.max_steps, self.log_every = save_every, max_steps, log_every
        self.position = Position()
        self.skipped = 0

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pth"

    def save(self) -> None:
        rng = gather_objects(capture_rng(), self.world)  # a collective: every rank takes part
        if not self.world.is_main:
            return
        save_atomic({
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_groups": self._group_names(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "position": vars(self.position).copy(),
            "rng": rng,
            "config": self.config,
        }, self.checkpoint_path)

    def resume(self, checkpoint: dict) -> None:
        """Continue a run from its checkpoint: weights, optimiser, scaler, position and RNG states
        (the caller checks that the run is the same one, see ``train.make_trainer``)."""
        self.module.load_state_dict(checkpoint["model"])
        # The optimizer's state is matched to parameters by position within its groups: a checkpoint
        # grouped otherwise (by an older version's weight-decay rule) would load onto the wrong ones.
        saved_groups = checkpoint.get("optimizer_groups")
        if saved_groups is not None and saved_groups != self._group_names():
            raise ValueError("the checkpoint's optimizer groups its parameters otherwise than this version does "
                             "(a different weight-decay or layer-decay rule): resume it with the version that "
                             "wrote it, or start a new run from its weights")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as exc:  # an older checkpoint, without group names: its group sizes differ
            raise ValueError(f"the checkpoint's optimizer state does not fit this version's parameter groups ({exc}); "
                             "it was written by an older version (whose pretraining weight decay spared the cls "
                             "and mask tokens): resume it with that version, or start a new run") from exc
        if self.precision.scaler and checkpoint["scaler"]:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.position = Position(**checkpoint["position"])
        restore_rng(checkpoint["rng"][self.world.rank])

    def _group_names(self) -> list[list[str]]:
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [[names[id(p)] for p in group["params"]] for group in self.optimizer.param_groups]

    def parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (one sync): a step whose loss was finite
        can still write NaN weights (an overflowing or 0/0 gradient)."""
        flags = [torch.isfinite(p).all() for p in self.module.parameters()]
        finite = torch.stack(flags).all().float() if flags else torch.ones(())
        return self._mean_over_ranks(finite) == 1.0

    # ---------------------------------------------------------------- training
    def set_lr(self, loader_batches: int) -> float:
        """The schedule at the epoch fraction the official engines use, ``epoch + batch /
        len(loader)`` at an update's first micro-batch: with ``accum_iter`` not dividing the
        loader's batches (whose last partial accumulation is dropped here) it is not
        ``step / steps_per_epoch``."""
        lr = scheduled_lr(self.position.epoch + self.position.batch / loader_batches, **self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def fit(self, loader, sampler, loss_fn, *, log: RunLog, on_epoch_end=None) -> None:
        """Train to the end (or ``max_steps``); ``on_epoch_end(epoch) -> dict`` adds evaluation rows."""
        from tqdm import tqdm

        loader_batches = len(sampler)  # one shuffle of the whole dataset: not again at every step
        batches_per_epoch = loader_batches - loader_batches % self.accum_iter  # a partial accumulation is dropped
        steps_per_epoch = batches_per_epoch // self.accum_iter
        if steps_per_epoch == 0:
            raise ValueError(
                f"one optimiser step needs {sampler.batch_size * self.accum_iter} clips per process "
                f"(batch size x accumulation), but each of the {self.world.world_size} process(es) has only "
                f"{len(sampler.rank_indices())}: lower --batch-size or --accum-iter")
        total = self.epochs * steps_per_epoch
        stop = min(total, self.max_steps) if self.max_steps else total
        samples_per_step = sampler.batch_size * self.accum_iter * self.world.world_size
        bar = tqdm(total=stop, initial=self.position.step, unit="step", disable=not self.world.is_main,
                   dynamic_ncols=True, file=sys.stderr)
        running, steps_since_log = torch.zeros((), device=self.world.device), 0
        window_start, lr = time.perf_counter(), 0.0
        self.module.train()
        while self.position.step < stop:
            sampler.set_epoch(self.position.epoch, self.position.batch)
            for batch in loader:
                self._count_skipped(batch)
                if len(batch) == 0:
                    batch = batch.stand_in()
                micro = self.position.batch % self.accum_iter
                if micro == 0:
                    lr = self.set_lr(loader_batches)
                last = micro == self.accum_iter - 1
                sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
                with sync:
                    loss = loss_fn(self.model, batch, self.precision.autocast)
                    self.precision.backward(loss * batch.weight / self.accum_iter)
                running += loss.detach().float() / self.accum_iter
                self.position.batch += 1
                if not last:
                    continue
                self.precision.step(self.optimizer, self.module.parameters(), self.clip_grad)
                self.optimizer.zero_grad(set_to_none=True)
                self.position.step += 1
                steps_since_log += 1
                bar.update(1)
                if self.position.step % self.log_every == 0 or self.position.step == stop:
                    mean_loss = self._mean_over_ranks(running) / steps_since_log  # waits for the device
                    rate = steps_since_log * samples_per_step / (time.perf_counter() - window_start)
                    running.zero_()
                    steps_since_log, window_start = 0, time.perf_counter()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the loss is {mean_loss} at step {self.position.step}; stopping")
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                    log.write(self.position.step, loss=mean_loss, lr=lr, samples_per_s=rate)
                epoch_done = self.position.batch == batches_per_epoch
                if epoch_done:
                    self.position.epoch += 1
                    self.position.batch = 0
                    if on_epoch_end is not None:
                        log.write(self.position.step, **on_epoch_end(self.position.epoch - 1))
                        self.module.train()
                if self.position.step == stop or (self.save_every and self.position.step % self.save_every == 0):
                    # The losses since the last log are checked here too (one sync per save), so a
                    # diverged run stops before its weights replace the last good checkpoint.
                    if steps_since_log and not math.isfinite(self._mean_over_ranks(running)) \
                            or not self.parameters_finite():
                        raise FloatingPointError(f"the loss or the weights are not finite by step {self.position.step}; "
                                                 "stopping without saving over the last checkpoint")
                    self.save()
                if epoch_done or self.position.step == stop:
                    break
        bar.close()
        skipped = sum(gather_objects(self.skipped, self.world))
        if skipped:
            say(self.world, f"skipped {skipped} clip(s) that could not be decoded during training")

    def _count_skipped(self, batch) -> None:
        for reason in batch.skipped:
            self.skipped += 1
            say(self.world, f"skipped {reason}", every_rank=True)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world.world_size
        return float(value)
