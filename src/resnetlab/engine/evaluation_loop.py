"""The evaluation loop: loss, top-1 and top-5 of a model over batches (validation during training, `evaluate`
afterwards), optionally with test-time augmentation and the logits kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.engine.runtime import Runtime
from resnetlab.evaluation.tta import tta_log_probabilities


@dataclass
class EpochResult:
    loss: float
    top1: float
    top5: float = float("nan")


@torch.no_grad()
def evaluate_loader(model: nn.Module, batches, runtime: Runtime, *, collect: bool = False, tta_flip: bool = False,
                    tta_crops: bool = False):
    """Mean loss, top-1 and top-5 over ``batches``; with ``collect``, also the logits and targets.

    ``tta_flip`` / ``tta_crops`` average the softmax over mirror images and corner crops (test-time augmentation,
    :mod:`resnetlab.evaluation.tta`) and return the log of that average as the logits.
    """
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct1 = torch.zeros((), dtype=torch.int64, device=runtime.device)
    correct5 = torch.zeros((), dtype=torch.int64, device=runtime.device)
    count = 0
    all_logits, all_targets = [], []
    for images, targets in batches:
        images = runtime.to_input(images)
        targets = targets.to(runtime.device)
        with runtime.autocast():
            if tta_flip or tta_crops:
                logits = tta_log_probabilities(model, images, flip=tta_flip, crops=tta_crops)
            else:
                logits = model(images).float()
        total_loss += F.cross_entropy(logits, targets, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == targets).sum()
        correct5 += (top == targets[:, None]).any(dim=1).sum()
        count += targets.numel()
        if collect:
            all_logits.append(logits.cpu())
            all_targets.append(targets.cpu())
    n = max(count, 1)
    result = EpochResult(total_loss.item() / n, correct1.item() / n, correct5.item() / n)
    if collect:
        logits = torch.cat(all_logits) if all_logits else torch.zeros(0, 0)
        targets = torch.cat(all_targets) if all_targets else torch.zeros(0, dtype=torch.long)
        return result, logits, targets
    return result
