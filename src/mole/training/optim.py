"""Optimizers (AdamW, Lion) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .config import LRSchedule, OptimConfig, OptimizerName


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p * (1 - lr * wd) - lr * update
    m      = beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr={lr}: Lion needs a positive learning rate")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas}: each must be in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-lr)
                m.mul_(b2).add_(g, alpha=1 - b2)
        return loss


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> Optimizer:
    if not params:
        raise ValueError("no trainable parameters: the stage set-up left nothing to optimise")
    if cfg.name is OptimizerName.LION:
        return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)


def make_schedule(optimizer: Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule is LRSchedule.CONSTANT:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        if cfg.schedule is LRSchedule.LINEAR:
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
