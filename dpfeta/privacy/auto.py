"""``central.epsilon_share: auto`` and ``central.rounds: auto``: the central images' budget from public
facts only (ε, δ, N, the image shape, the number of classes, the query's batch and pooling), never the data.

The rule (docs/privacy.md §2a has the arithmetic). A central image is a noisy class mean: its per-pixel
noise std, in units of the [0, 1] pixel range, is

    std = σ_c · Δ / (B_c / classes),   Δ = sqrt(C·H·W) / f   (the L2 sensitivity of one pooled image)

A class mean is recognisable, and worth warming up on, when that std is at most ``TARGET_PIXEL_STD``
(0.15: the DP-FETA paper's MNIST setting has 0.117; digits at ε = 10 with 2 rounds and 30 % of the
budget, the tuned setting, has 0.137). So:

1. σ_τ = TARGET_PIXEL_STD · (B_c / classes) / Δ, the largest σ_c that keeps the std at the target;
2. the share r rounds need is ε_central(σ_τ, q_c, r) / ε (the accountant the central noise is calibrated
   with: RDP under ``auto``);
3. ``rounds: auto``: the most rounds (≤ ``MAX_ROUNDS``) whose share is ≤ ``MULTI_ROUND_SHARE_CAP``; when
   not even 2 fit, one round;
4. ``epsilon_share: auto``: the share the chosen rounds need, rounded up to 0.01, within
   [``SHARE_FLOOR``, ``SHARE_CAP``]; when even ``SHARE_CAP`` leaves the std above the target (small N, low ε),
   the cap: the central images are then the run's main signal and DP-SGD keeps 20 % of the budget.
5. A fixed ``central.noise_multiplier`` fixes the std: step 3 picks the rounds for that σ_c, and the share
   is not used (σ_c is not calibrated).

With one of the two keys fixed, the other follows the same arithmetic. ``central.noise_multiplier`` is
then calibrated from the share as always (``plan.central_noise``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dpfeta.privacy.accounting import epsilon_of
from dpfeta.privacy.events import central_event

AUTO = "auto"
TARGET_PIXEL_STD = 0.15
MAX_ROUNDS = 5
MULTI_ROUND_SHARE_CAP = 0.3
SHARE_CAP = 0.8
SHARE_FLOOR = 0.02


@dataclass(frozen=True)
class CentralChoice:
    rounds: int
    epsilon_share: float
    reason: str  # why, in one line (dpfeta budget prints it)


def sensitivity(image_shape: tuple[int, ...], downsample: int) -> float:
    """Δ = sqrt(d) / f: the largest L2 norm of one f-fold pooled image in [0, 1]^(d/f²)."""
    return math.sqrt(math.prod(image_shape)) / downsample


def pixel_std(
    noise_multiplier: float, *, image_shape: tuple[int, ...], downsample: int, batch_size: float, num_classes: int
) -> float:
    """The per-pixel noise std of a central image (a class mean over B_c / classes expected records)."""
    return noise_multiplier * sensitivity(image_shape, downsample) / (batch_size / num_classes)


def _share_needed(sigma: float, *, q_c: float, rounds: int, epsilon: float, delta: float, accountant: str) -> float:
    event = central_event(noise_multiplier=sigma, sample_rate=q_c, rounds=rounds)
    return epsilon_of(event, delta=delta, accountant=accountant) / epsilon


def choose_central(
    *,
    epsilon: float,
    delta: float,
    n: int,
    image_shape: tuple[int, ...],
    num_classes: int,
    batch_size: float,
    downsample: int,
    accountant: str,
    rounds: Optional[int] = None,
    epsilon_share: Optional[float] = None,
    noise_multiplier: Optional[float] = None,
) -> CentralChoice:
    """The central query's rounds and budget share by the rule above; ``rounds`` / ``epsilon_share``
    given (not ``auto``) are kept. With a fixed ``noise_multiplier`` (σ_c) the std is fixed too: rounds
    are chosen for that σ_c by step 3, and the share is only reported (σ_c is not calibrated to it).
    Public facts only."""
    if rounds is not None and epsilon_share is not None:
        raise ValueError("choose_central: nothing to choose (rounds and epsilon_share are both fixed)")
    q_c = min(1.0, batch_size / n)
    count = batch_size / num_classes
    sigma_target = TARGET_PIXEL_STD * count / sensitivity(image_shape, downsample)
    if noise_multiplier is not None:
        sigma_target = noise_multiplier

    def share(r: int) -> float:
        return _share_needed(sigma_target, q_c=q_c, rounds=r, epsilon=epsilon, delta=delta, accountant=accountant)

    facts = (
        f"target per-pixel noise std {TARGET_PIXEL_STD:g} (a class mean over B_c/classes={count:g} records, "
        f"sensitivity {sensitivity(image_shape, downsample):.4g}: sigma_c <= {sigma_target:.4g})"
        if noise_multiplier is None
        else f"central.noise_multiplier={noise_multiplier:g} (fixed)"
    )
    if epsilon_share is not None:  # rounds: auto at a fixed share
        fits = [r for r in range(1, MAX_ROUNDS + 1) if share(r) <= epsilon_share]
        chosen = max(fits, default=1)
        why = (
            f"{chosen} round(s): the most that keep the target at epsilon_share={epsilon_share:g}"
            if fits
            else f"1 round: even one round misses the target at epsilon_share={epsilon_share:g}"
        )
        return CentralChoice(chosen, float(epsilon_share), f"{why}; {facts}")

    if rounds is None:
        multi = [r for r in range(2, MAX_ROUNDS + 1) if share(r) <= MULTI_ROUND_SHARE_CAP]
        rounds = max(multi, default=1)
        how = (
            f"{rounds} rounds: the most (<= {MAX_ROUNDS}) that reach the target within "
            f"{MULTI_ROUND_SHARE_CAP:.0%} of the budget"
            if multi
            else f"1 round: 2 rounds would need more than {MULTI_ROUND_SHARE_CAP:.0%} of the budget"
        )
    else:
        how = f"central.rounds={rounds} (fixed)"
    need = share(rounds)
    chosen_share = min(SHARE_CAP, max(SHARE_FLOOR, math.ceil(need * 100 - 1e-9) / 100))
    if need > SHARE_CAP:
        how += f"; the target needs {need:.0%} of the budget, capped at {SHARE_CAP:.0%} (noisier central images)"
    else:
        how += f"; epsilon_share {chosen_share:g} (the target needs {need:.3f})"
    return CentralChoice(rounds, chosen_share, f"{how}; {facts}")
