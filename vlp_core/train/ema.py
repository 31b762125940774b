"""An exponential moving average (EMA) of a model's weights, for evaluation, export and CapFilt.

A thin layer over timm's maintained :class:`timm.utils.ModelEmaV3`, set from a training
section's ``ema_decay`` and ``ema_warmup`` (:class:`vlp_core.config.TrainParams`).  The training
loop (:mod:`vlp_core.train.loop`) calls :meth:`WeightEma.update` after every optimizer step and
writes :attr:`WeightEma.module` as the run's final ``model/``; the checkpoint stores
:meth:`WeightEma.state_dict`, so a resumed run is bit-identical to an uninterrupted one.

What is averaged: the *trainable* parameters only.  Everything else is copied from the live
model at each update -- the buffers (BLIP's ITC feature queues and their pointer) and the
frozen parameters (BLIP's momentum encoders, ``*_m``, which are already an EMA of the live
encoders with their own ``momentum``).  The saved model then carries the live run's ITC teacher
state and queues, so a stage that trains on from it (a fine-tune, a ``continue`` retrain) gets
the same distillation state it would get from the live weights; evaluation, export and CapFilt
use none of them.  Parameters are walked once each (``model.parameters()`` skips the tied
decoder weights that ``state_dict()`` lists twice), so a tied tensor is never averaged twice.

Decay at optimizer step ``t`` (1-based): step 1 copies the live weights; after that
``ema_decay``, or with ``ema_warmup`` timm's warm-up ``min(ema_decay, 1 - t ** -0.75)``
(timm's ``warmup_gamma=1``, and the ``warmup_power=3/4`` it recommends for shorter runs), so the
first, random weights do not linger in a short run's average (0.968 at step 100, 0.993 at 800).
"""
from __future__ import annotations

from typing import Any

import torch

WARMUP_GAMMA = 1.0
WARMUP_POWER = 0.75


class WeightEma:
    """The EMA of ``model``'s trainable parameters (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        from timm.utils import ModelEmaV3

        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_gamma=WARMUP_GAMMA,
                               warmup_power=WARMUP_POWER, exclude_buffers=True)
        self._frozen = [i for i, p in enumerate(model.parameters()) if not p.requires_grad]

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (in eval mode; save it with ``save_pretrained``)."""
        return self._ema.module

    def decay_at(self, step: int) -> float:
        """The decay applied by :meth:`update` at optimizer step ``step`` (1-based)."""
        return float(self._ema.get_decay(step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in ``model``'s weights after optimizer step ``step`` (1-based count of steps done):
        trainable parameters averaged, buffers and frozen parameters copied."""
        self._ema.update(model, step=step)  # lerps every parameter, copies the buffers
        if self._frozen:
            live, ema = list(model.parameters()), list(self._ema.module.parameters())
            for i in self._frozen:
                ema[i].copy_(live[i])

    def state_dict(self) -> dict[str, Any]:
        return self._ema.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema.module.load_state_dict(state)


__all__ = ["WARMUP_GAMMA", "WARMUP_POWER", "WeightEma"]
