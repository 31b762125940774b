"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` (BLIP-style)."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """The learning rate used for optimizer step ``step`` (0-based).

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``.  Then a half
    cosine from ``base_lr`` (at ``step == warmup_steps``) down to ``min_lr`` (at the last step).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   base_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at` (the optimizer's lr must be ``base_lr``).
    Call ``scheduler.step()`` after each ``optimizer.step()``."""
    if base_lr <= 0:
        raise ValueError("base_lr must be positive")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, total_steps, warmup_steps, base_lr, min_lr) / base_lr
    )
