"""Optimizers (with optional no-decay for norm and bias parameters) and the two-pass gradient wrappers.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021) and the
gradient-norm penalty (Zhao, Zhang and Hu, "Penalizing Gradient Norm for Efficiently Improving Generalization in
Deep Learning", ICML 2022) both evaluate the gradient a second time at weights moved along the normalized gradient:

    g1 = grad L(w),   w' = w + r * g1 / ||g1||,   g2 = grad L(w')

SAM updates with ``g2`` (``r`` is its ``rho``). The gradient-norm penalty minimises ``L(w) + lambda * ||grad L(w)||``;
its first-order finite-difference form (the paper's Eq. 7 and Algorithm 1, with ``alpha = lambda / r``) updates with

    g = (1 - alpha) * g1 + alpha * g2

so SAM is the special case ``alpha = 1``. :class:`GradientPerturbation` implements both around any base optimizer;
the base optimizer (momentum, weight decay, Adam moments ...) then steps with ``g`` as if it were the gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from resnetlab.config import OptimConfig
from resnetlab.errors import ConfigError

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """One group, or two when norm and bias parameters are exempt from weight decay."""
    if not no_decay_norm_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))  # a shared (tied) parameter must sit in one group only
            # Norm scales/shifts and biases are not decayed: decaying them only fights the normalization
            # (Goyal et al. 2017, "no bias decay"; timm's `param_groups_weight_decay`).
            (no_decay if isinstance(module, NORM_LAYERS) or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------------------
# Freezing (train.freeze): which parameters train when a trained model is fine-tuned on a few images
# ---------------------------------------------------------------------------------------------------------------

BATCH_NORMS = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class FreezeSummary:
    mode: str
    trainable: int  # parameters (elements) that train
    total: int
    head: str  # the classifier layer's attribute name

    def describe(self) -> str:
        what = {"none": "every layer", "backbone": f"only the classifier `{self.head}` (BatchNorm layers in eval "
                "mode: running statistics kept as trained)",
                "all_but_bn_and_head": f"only the BatchNorm scales and shifts and the classifier `{self.head}` "
                "(BatchNorm running statistics adapt to the new data)"}[self.mode]
        return (f"train.freeze={self.mode}: {self.trainable:,} of {self.total:,} parameters train "
                f"({self.trainable / max(self.total, 1):.1%}), {what}")


def classifier_of(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classifier layer, by the name the model's default config gives it (timm's
    ``default_cfg["classifier"]``; ``fc`` for every resnetlab model)."""
    name = str(getattr(model, "default_cfg", {}).get("classifier", "fc"))
    head = getattr(model, name, None)
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ConfigError(f"train.freeze: the model has no classifier layer '{name}' with parameters to train; "
                          "use train.freeze=none")
    return name, head


def freeze_parameters(model: nn.Module, mode: str) -> FreezeSummary:
    """Set ``requires_grad`` for ``train.freeze``; the optimizer then leaves frozen parameters out (see
    :func:`parameter_groups`).

    - ``none``: nothing is changed.
    - ``backbone``: only the classifier layer trains (a linear probe). The frozen BatchNorm layers are kept in eval
      mode by the trainer (:func:`frozen_norm_layers`), so the features the head learns on are exactly those of
      the trained model, and a few images cannot drag its running statistics.
    - ``all_but_bn_and_head``: the BatchNorm scales and shifts and the classifier train; the running statistics
      adapt to the new domain, the usual few-shot recipe (adapting BatchNorm to a domain shift: Li et al., "Revisiting
      Batch Normalization For Practical Domain Adaptation", 2016; training only BatchNorm: Frankle et al., "Training
      BatchNorm and Only BatchNorm", ICLR 2021). A model without BatchNorm (simple_cnn) trains its classifier only.

    Setting the flags again is a no-op, so the train job (before DistributedDataParallel sees the parameters) and
    the trainer can both call it.
    """
    total = sum(p.numel() for p in model.parameters())
    if mode == "none":
        return FreezeSummary(mode, sum(p.numel() for p in model.parameters() if p.requires_grad), total, "fc")
    if mode not in ("backbone", "all_but_bn_and_head"):
        raise ConfigError(f"train.freeze={mode!r}: choose none, backbone or all_but_bn_and_head")
    name, head = classifier_of(model)
    model.requires_grad_(False)
    if mode == "all_but_bn_and_head":
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                module.requires_grad_(True)
    head.requires_grad_(True)
    return FreezeSummary(mode, sum(p.numel() for p in model.parameters() if p.requires_grad), total, name)


def frozen_norm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose scale and shift are frozen: training keeps them in eval mode, so that they normalize
    with their trained running statistics and do not update them (``train.freeze=backbone``)."""
    return [module for module in model.modules() if isinstance(module, BATCH_NORMS)
            and any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())]


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam, AdamW or RMSprop over :func:`parameter_groups` (trainable parameters only:
    frozen ones get no optimizer state and no weight decay)."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if not any(group["params"] for group in groups):
        raise ConfigError("no parameter of the model trains (all are frozen); use train.freeze=none")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        # Adam's weight_decay is the L2 penalty added to the gradient (torch's definition); AdamW decouples it.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "rmsprop":
        # TF-style RMSprop settings (alpha 0.9, eps 1e-3), as timm and the EfficientNet/MobileNet recipes use.
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, alpha=0.9, eps=1e-3)
    raise ValueError(cfg.name)


class GradientPerturbation:
    """Wrap a base optimizer so that each step uses a gradient re-evaluated at perturbed weights.

    Simple use: compute the loss and ``backward()``, then ``step(closure)`` where ``closure`` recomputes the loss on
    the same batch and calls ``backward()`` (gradients are zeroed before it is called).

    The training loop uses the two halves, :meth:`perturb` and :meth:`restore`, so that mixed precision's loss
    scaling and gradient clipping fit around them: with a gradient scale ``s`` the gradients on entry are ``s``
    times the true ones, and :meth:`restore` leaves the combined gradient in that same scale for the scaler's step.
    """

    def __init__(self, base: torch.optim.Optimizer, *, radius: float, alpha: float = 1.0):
        if radius <= 0:
            raise ValueError("radius must be positive")
        if not 0 <= alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        self.base = base
        self.radius = radius
        self.alpha = alpha
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, shift, first gradient)

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0) -> torch.Tensor:
        """Move the weights to ``w + r * g1 / ||g1||`` and remember ``g1``; returns ``||g1||`` (true scale).

        A non-finite first gradient (an fp16 overflow) leaves the weights where they are, so that the scaler sees
        the overflow in the combined gradient and skips the step.
        """
        if self._saved:
            raise RuntimeError("perturb() called twice without restore()")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        first = [p.grad.detach() / grad_scale for p in params]
        # the norm in at least float32, whatever the parameters' precision
        norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in first]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        # No host sync: a non-finite or zero norm turns into a zero shift through torch.where.
        usable = torch.isfinite(norm) & (norm > 0)
        scale = torch.where(usable, self.radius / norm.clamp(min=1e-12), torch.zeros_like(norm))
        for p, g in zip(params, first):
            shift = torch.nan_to_num(g * scale.to(g.dtype), nan=0.0, posinf=0.0, neginf=0.0)
            p.add_(shift)
            self._saved.append((p, shift, g))
        return norm

    @torch.no_grad()
    def restore(self, grad_scale: float = 1.0) -> None:
        """Move the weights back and set each gradient to ``alpha * g2 + (1 - alpha) * g1`` (in ``grad_scale``)."""
        for p, shift, first in self._saved:
            p.sub_(shift)
            if p.grad is None:  # a parameter unused on the second pass keeps its first gradient
                p.grad = first * grad_scale
            elif self.alpha != 1.0:
                p.grad.mul_(self.alpha).add_(first, alpha=(1 - self.alpha) * grad_scale)
        self._saved = []

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.perturb()
        self.base.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self.restore()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def wrap_optimizer(base: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.Optimizer | GradientPerturbation:
    if cfg.wrapper == "sam":
        return GradientPerturbation(base, radius=cfg.sam_rho, alpha=1.0)
    if cfg.wrapper == "gnp":
        return GradientPerturbation(base, radius=cfg.gnp_r, alpha=cfg.gnp_alpha)
    return base


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged during a forward pass in training mode.

    The second (perturbed) pass of SAM/GNP must not count the same batch twice in the running statistics, nor
    record statistics of the perturbed weights (as in the reference SAM implementation's ``disable_running_stats``).
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            saved.append((module, module.momentum,
                          None if module.num_batches_tracked is None else module.num_batches_tracked.clone()))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)
