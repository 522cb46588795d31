"""Networks and weight averaging."""

from __future__ import annotations

import torch
from torch import nn

from dpfeta.nn.unet import UNet, count_parameters

__all__ = ["UNet", "count_parameters", "ema_decay", "update_ema"]


def ema_decay(num_updates: int, decay: float) -> float:
    """EMA decay with warm-up, as in DPDM's ``model/ema.py``: min(decay, (1+t)/(10+t))."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, *, num_updates: int, decay: float) -> float:
    """ema <- d*ema + (1-d)*model after the ``num_updates``-th optimiser step (counted from 1).

    ``model`` may be wrapped (GradSampleModule, DDP): parameters are matched by order.
    Returns the decay used.
    """
    d = ema_decay(num_updates, decay)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    assert len(ema_params) == len(params)
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach(), 1.0 - d)
    return d
