"""White-box gradient canaries through the real DP-SGD path (the worker side of ``dpfeta audit``).

A canary is a record of the training split like any other: it sits in some worker's shard, is
Poisson-sampled there with the run's q, and its per-example gradient is clipped, summed, all-reduced and
noised by ``dpsgd.DPSGD`` exactly as a real record's. What differs is its gradient: a fixed vector of
norm ``norm`` x C (>= C, so clipping acts on it) on one coordinate of a block reserved for the canaries
(a Dirac canary), and zero on the network. The m-coordinate block is a parameter of ``CanaryNet`` that
the network never uses, so real records have zero gradient there and the block sees only canaries and
noise.

Records carry their canary id in the label: ``label_offset + i`` (canary i, included) and
``label_offset + m + i`` (canary i, excluded: a placeholder whose gradient is zero, i.e. a record that is
not there). Placeholders keep the split's size at the public N + m whatever the inclusion bits, so the
divisor q (N + m) and the shard check never depend on them.

After every logical step each rank reads the privatised update of the block (white box, all iterates),
in units of C / (q N), and adds it to the canary scores: ``sums`` (plain) and ``scores``, where each step
is weighted by the inverse of its noise variance estimated from the block itself (the median absolute
coordinate). In a correct build every step has the same variance and the two are proportional; a
build that leaves some steps without noise is seen at once. Both are buffers of ``CanaryNet``, so they
are in every checkpoint and an elastic restart continues them from the step it resumes at.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import nn

from dpfeta import dpsgd, finetune
from dpfeta.config import Config
from dpfeta.data import ImageSet

NOISE_FLOOR = 1e-3  # smallest per-step noise std (units of C) a weight assumes: steps without noise weigh 1e6


class CanaryNet(nn.Module):
    """The network plus the canary block (``canary``, m zeros never used in forward) and the scores."""

    def __init__(self, net: nn.Module, *, canaries: int, label_offset: int, norm: float = 10.0):
        super().__init__()
        if canaries < 1 or norm < 1:
            raise ValueError(f"expected canaries >= 1 and a canary gradient norm >= 1 (x C), got {canaries}, {norm}")
        self.net = net
        self.canary = nn.Parameter(torch.zeros(canaries))
        self.register_buffer("scores", torch.zeros(canaries, dtype=torch.float64))
        self.register_buffer("sums", torch.zeros(canaries, dtype=torch.float64))
        self.label_offset, self.norm = int(label_offset), float(norm)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


class CanaryDPSGD(dpsgd.DPSGD):
    """``DPSGD`` over the network and the canary block; records of the canary block's update.

    The network goes to Opacus' hooks as usual; canaries skip it (their network gradient is zero) and
    enter the same clipping, sum, noise and all-reduce with their Dirac gradient.
    """

    def __init__(self, module: CanaryNet, **kwargs):
        super().__init__(module.net, **kwargs)
        self.canaries = module
        self.params.append(module.canary)  # after the network: noise, all-reduce and p.grad cover it
        self.numel += module.canary.numel()
        self._network_only = False

    def privatise(self, images: torch.Tensor, labels: torch.Tensor, loss_rows) -> dpsgd.StepStats:
        ids = labels - self.canaries.label_offset
        present = (ids < self.canaries.canary.numel()).nonzero().flatten()  # placeholders are absent
        order = present[torch.argsort((ids[present] >= 0).to(torch.int8), stable=True)]  # real records first
        stats = self._step(images[order], labels[order], loss_rows)
        self._observe()
        return stats

    def _step(self, images: torch.Tensor, labels: torch.Tensor, loss_rows) -> dpsgd.StepStats:
        """The unmodified DP step on the present records (a seam for the mutation tests)."""
        return super().privatise(images, labels, loss_rows)

    def _per_example(self, images, labels, draws, loss_rows):
        if self._network_only:
            return super()._per_example(images, labels, draws, loss_rows)
        ids = labels - self.canaries.label_offset
        real = int((ids < 0).sum())  # real records come first (``privatise``)
        params, block = self.params, self.canaries.canary
        if real:
            self.params, self._network_only = params[:-1], True  # the hooks know the network only
            try:
                grads, losses = super()._per_example(images[:real], labels[:real], draws, loss_rows)
            finally:
                self.params, self._network_only = params, False
        else:
            grads = [torch.zeros(0, p.numel(), device=self.device) for p in params[:-1]]
            losses = torch.zeros(0, device=self.device)
        extra = len(labels) - real
        grads = [torch.cat([g, g.new_zeros(extra, g.shape[1])]) for g in grads]
        dirac = torch.zeros(len(labels), block.numel(), device=self.device)
        # This micro-batch's share of the K draws: the parts of a split example add up to the full norm.
        dirac[torch.arange(real, len(labels)), ids[real:]] = (
            self.canaries.norm * self.max_grad_norm * len(draws) / self.K
        )
        return grads + [dirac], torch.cat([losses, losses.new_zeros(extra)])

    @torch.no_grad()
    def _observe(self) -> None:
        """Add this step's privatised block update (units of C / (q N)) to the scores."""
        update = self.canaries.canary.grad.double() * (self.expected_batch_size / self.max_grad_norm)
        spread = max(1.4826 * float(update.abs().median()), NOISE_FLOOR)  # robust noise std of the step
        self.canaries.sums += update
        self.canaries.scores += update / spread**2


# --------------------------------------------------------------------------------------------
# Records and the task
# --------------------------------------------------------------------------------------------


def label_offset(cfg: Config) -> int:
    """Canary labels start above the null class (``num_classes``) of label dropout."""
    return cfg.data.num_classes + 1


def canary_records(cfg: Config, included: np.ndarray) -> ImageSet:
    """m blank records: canary i labelled ``offset + i`` when included, ``offset + m + i`` when not."""
    m, d = len(included), cfg.data
    ids = np.arange(m) + np.where(included, 0, m)
    images = np.zeros((m, d.channels, d.resolution, d.resolution), np.uint8)
    return ImageSet(images, (label_offset(cfg) + ids).astype(np.int64), d.num_classes)


def with_canaries(train: ImageSet, canaries: ImageSet, rng: np.random.Generator) -> ImageSet:
    """The training split and the canary records, shuffled together (canaries land on every worker)."""
    images = np.concatenate([train.images, canaries.images])
    labels = np.concatenate([train.labels, canaries.labels])
    order = rng.permutation(len(labels))
    return ImageSet(images[order], labels[order], train.num_classes)


def _build(cfg: Config, *, canaries: int, norm: float, base: finetune.Task) -> CanaryNet:
    return CanaryNet(base.build(cfg), canaries=canaries, label_offset=label_offset(cfg), norm=norm)


def _keep_canary_labels(
    labels: torch.Tensor, cfg: Config, generator: torch.Generator, *, base: finetune.Task
) -> torch.Tensor:
    """The base task's label dropout for real records; canary labels (their ids) pass unchanged."""
    dropped = labels if base.prepare_labels is None else base.prepare_labels(labels, cfg, generator)
    return torch.where(labels >= label_offset(cfg), labels, dropped)


def canary_task(
    *,
    canaries: int,
    norm: float = 10.0,
    base: finetune.Task = finetune.EDM,
    dp_step: Optional[type] = None,
    sampler: Optional[type] = None,
) -> finetune.Task:
    """``base`` (the EDM U-Net) with m gradient canaries. ``dp_step``/``sampler``: a ``CanaryDPSGD`` /
    ``PoissonSampler`` subclass, for the mutation tests' deliberately broken builds only."""
    return finetune.Task(
        build=functools.partial(_build, canaries=canaries, norm=norm, base=base),
        loss_rows=base.loss_rows,
        optimizer=base.optimizer,
        prepare_labels=functools.partial(_keep_canary_labels, base=base),
        dp_step=dp_step or CanaryDPSGD,
        sampler=sampler or base.sampler,
    )
