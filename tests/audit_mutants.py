"""Deliberately broken DP-SGD builds for the audit's mutation check (tests and bench/audit.py only).

Each is a ``CanaryDPSGD`` (or ``PoissonSampler``) subclass that breaks one rule of docs/privacy.md and
changes nothing else; ``dpfeta.audit.run_audit(..., dp_step=..., sampler=...)`` runs it on Ray Train (the
module is pickled by value to the workers: ``ray.cloudpickle.register_pickle_by_value``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dpfeta import dpsgd
from dpfeta.canaries import CanaryDPSGD


class NoNoise(CanaryDPSGD):
    """Noise off."""

    def __init__(self, module, **kwargs):
        super().__init__(module, **kwargs)
        self.noise_multiplier = 0.0


class NoiseDiv10(CanaryDPSGD):
    """The noise std divided by 10."""

    def __init__(self, module, **kwargs):
        super().__init__(module, **kwargs)
        self.noise_multiplier /= 10


def _unclipped(step: CanaryDPSGD, *args) -> None:
    """``_clip_and_add`` with clipping to norm infinity (factor 1); the noise keeps sigma C."""
    bound, step.max_grad_norm = step.max_grad_norm, math.inf
    try:
        dpsgd.DPSGD._clip_and_add(step, *args)
    finally:
        step.max_grad_norm = bound


class NoClip(CanaryDPSGD):
    """Clipping off."""

    def _clip_and_add(self, grads, losses, total, stats):
        _unclipped(self, grads, losses, total, stats)


class ClipAfterSum(CanaryDPSGD):
    """Clipping after the sum: each micro-batch's sum of raw gradients is clipped to C per example
    (its mean to C), instead of each example's gradient to C."""

    def _clip_and_add(self, grads, losses, total, stats):
        raw = torch.zeros_like(total)
        _unclipped(self, grads, losses, raw, stats)
        limit = self.max_grad_norm * len(losses)
        total += raw * min(1.0, limit / (float(raw.norm()) + 1e-6))


class NoNoiseWhenRank0Empty(CanaryDPSGD):
    """The noise rank adds no noise at a step where its own local batch is empty."""

    def _step(self, images, labels, loss_rows):
        if self.rank != self.noise_rank or len(images):
            return super()._step(images, labels, loss_rows)
        noise_multiplier, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            return super()._step(images, labels, loss_rows)
        finally:
            self.noise_multiplier = noise_multiplier


class OneRankUnclipped(CanaryDPSGD):
    """The last rank of the group does not clip its examples."""

    def _clip_and_add(self, grads, losses, total, stats):
        last = dist.is_initialized() and self.rank == dist.get_world_size() - 1 and self.rank != self.noise_rank
        if last:
            _unclipped(self, grads, losses, total, stats)
        else:
            super()._clip_and_add(grads, losses, total, stats)


class FixedBatch(dpsgd.PoissonSampler):
    """A fixed batch instead of Poisson sampling: the first step's Bernoulli(q) draw is reused at every step."""

    def sample(self) -> torch.Tensor:
        if not hasattr(self, "_fixed"):
            self._fixed = super().sample()
        return self._fixed


DP_STEPS = {
    "noise off": NoNoise,
    "noise std / 10": NoiseDiv10,
    "clipping off": NoClip,
    "clipping after the sum": ClipAfterSum,
    "no noise when rank 0's batch is empty": NoNoiseWhenRank0Empty,
    "one rank's examples unclipped": OneRankUnclipped,
}
SAMPLERS = {"fixed batch instead of Poisson": FixedBatch}
