"""Checkpoint retention of a training run (timm has the same ``CheckpointSaver``): which files ``checkpoints/``
keeps after each epoch, and in which order they are written.

``best.pt`` holds the weights (raw or EMA) that validated best; ``top_epoch_NNNN.pt`` the ``keep_top_k`` best
epochs; ``epoch_NNNN.pt`` every ``save_every``-th epoch's full state; ``last.pt`` the full state of the latest
epoch. ``last.pt`` is written last, so that it never refers to a best checkpoint not yet on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnetlab.checkpoint import save_checkpoint


class CheckpointSaver:
    def __init__(self, ckpt_dir: Path, *, keep_top_k: int, save_every: int | None, mode: str):
        self.ckpt_dir = ckpt_dir
        self.keep_top_k = keep_top_k
        self.save_every = save_every
        self.mode = mode  # "max" or "min": the direction in which the monitored metric improves
        self.top_k: list[tuple[float, int]] = []  # (metric, epoch) of the kept top epochs, best first

    def save(self, epoch: int, *, improved: bool, metric: float | None, weights: Callable[[], dict[str, Any]],
             state: Callable[[], dict[str, Any]]) -> None:
        """Write this epoch's files. ``weights`` makes the best/top-k checkpoint (model and meta), ``state`` the
        full resumable state; it is made after the top-k list is updated, which it records."""
        chosen = None
        if improved:
            chosen = weights()
            save_checkpoint(self.ckpt_dir / "best.pt", chosen)
        if self.keep_top_k > 1 and metric is not None:
            self.top_k.append((metric, epoch))
            # best first; among equals the earlier epoch (a stable sort keeps the append order)
            self.top_k.sort(key=lambda item: -item[0] if self.mode == "max" else item[0])
            kept = self.top_k[: self.keep_top_k]
            if any(e == epoch for _, e in kept):
                save_checkpoint(self.ckpt_dir / f"top_epoch_{epoch:04d}.pt", chosen if chosen is not None else weights())
            for _, e in self.top_k[self.keep_top_k:]:
                (self.ckpt_dir / f"top_epoch_{e:04d}.pt").unlink(missing_ok=True)
            self.top_k = kept
        full = state()
        if self.save_every and epoch % self.save_every == 0:
            save_checkpoint(self.ckpt_dir / f"epoch_{epoch:04d}.pt", full)
        save_checkpoint(self.ckpt_dir / "last.pt", full)  # last: it refers to everything written above
