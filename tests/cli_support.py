"""Shared pieces of the command-line tests: a tiny synthetic dataset and a tiny model."""
from __future__ import annotations

from audiomae.cli import main
from audiomae.demo_data import write_demo_data

# A model and clips small enough that a training step takes milliseconds on the CPU:
# 32 frames (0.35 s) give a 2 x 8 patch grid.
TINY_MODEL = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-embed-dim", "16",
              "--decoder-depth", "1", "--decoder-num-heads", "2", "--target-length", "32"]
TINY_MAE = TINY_MODEL + ["--decoder-mode", "0"]
QUIET_RUN = ["--num-workers", "0", "--log-every", "1", "--warmup-epochs", "1"]


def make_demo(root, num_per_class: int = 3, seconds: float = 0.5, **kwargs):
    write_demo_data(root, num_per_class=num_per_class, seconds=seconds, **kwargs)
    return root


def pretrain(data, out, *extra) -> int:
    return main(["pretrain", str(data), "--out", str(out), *TINY_MAE, *QUIET_RUN, "--batch-size", "4", *extra])


def pretrained_checkpoint(data, out, max_steps: int):
    """A tiny AudioMAE pretrained for ``max_steps`` steps: the path of its checkpoint."""
    assert pretrain(data, out, "--max-steps", str(max_steps)) == 0
    return out / "checkpoint.pth"
