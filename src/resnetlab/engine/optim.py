"""Optimizers (with optional no-decay for norm and bias parameters) and the two-pass gradient wrappers.

SAM (Foret et al., ICLR 2021) and the gradient-norm penalty (Zhao, Zhang and Hu, ICML 2022) both evaluate the
gradient a second time at weights moved along the normalized gradient:

    g1 = grad L(w),   w' = w + r * g1 / ||g1||,   g2 = grad L(w')

SAM then updates with ``g2``. The gradient-norm penalty minimises ``L(w) + lambda * ||grad L(w)||`` and its
first-order finite-difference form (the paper's Eq. 7, with ``alpha = lambda / r``) updates with

    g = (1 - alpha) * g1 + alpha * g2

so SAM is the special case ``alpha = 1``. :class:`GradientPerturbation` implements both around any base optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from resnetlab.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    if not no_decay_norm_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            # Norm scales/shifts and biases are not decayed: decaying them only fights the normalization
            # (Goyal et al. 2017, "no bias decay"; timm's `param_groups_weight_decay`).
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, alpha=0.9, eps=1e-3)
    raise ValueError(cfg.name)


class GradientPerturbation:
    """Wrap a base optimizer so that each step uses a gradient re-evaluated at perturbed weights.

    Use: compute the loss and ``backward()`` as usual, then call ``step(closure)`` where ``closure`` zeroes the
    gradients, recomputes the loss on the same batch and calls ``backward()``.
    """

    def __init__(self, base: torch.optim.Optimizer, *, radius: float, alpha: float = 1.0):
        if radius <= 0:
            raise ValueError("radius must be positive")
        self.base = base
        self.radius = radius
        self.alpha = alpha
        self.param_groups = base.param_groups

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        first_grads = [p.grad.detach().clone() for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in first_grads]))
        scale = self.radius / (norm + 1e-12)
        shifts = [g * scale for g in first_grads]
        for p, shift in zip(params, shifts):
            p.add_(shift)
        with torch.enable_grad():
            loss = closure()
        for p, shift, g1 in zip(params, shifts, first_grads):
            p.sub_(shift)
            if p.grad is None:  # a parameter unused on the second pass keeps its first gradient
                p.grad = g1
            elif self.alpha != 1.0:
                p.grad.mul_(self.alpha).add_(g1, alpha=1 - self.alpha)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def wrap_optimizer(base: torch.optim.Optimizer, cfg: OptimConfig):
    if cfg.wrapper == "sam":
        return GradientPerturbation(base, radius=cfg.sam_rho, alpha=1.0)
    if cfg.wrapper == "gnp":
        return GradientPerturbation(base, radius=cfg.gnp_r, alpha=cfg.gnp_alpha)
    return base
