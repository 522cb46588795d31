"""Repeat and select (docs/privacy.md, "Tuning"): the random number of trials K of a private sweep and
the noisy selection score M3 (Papernot & Steinke, ICLR 2022). What they spend is ``privacy.sweep``'s."""

from __future__ import annotations

import math

import numpy as np

from dpfeta import config as config_mod
from dpfeta.privacy.accounting import tnb_gamma


def trial_distribution(cfg: config_mod.Config) -> tuple[float, float]:
    """``(mean, shape)`` of RepeatAndSelectDpEvent: shape = tune.tnb_eta, or inf for Poisson."""
    t = cfg.tune
    if t.trial_distribution == "poisson":
        return float(t.num_trials), math.inf
    if not t.tnb_eta >= 0:
        raise ValueError(
            f"config key 'tune.tnb_eta': expected a shape >= 0 (0 logarithmic, 1 geometric), got {t.tnb_eta!r}"
        )
    return float(t.num_trials), float(t.tnb_eta)


def draw_num_trials(mean: float, shape: float, rng: np.random.Generator) -> int:
    """K ~ Poisson(mean) (shape = inf; K may be 0) or truncated negative binomial TNB(shape, gamma).

    TNB(eta, gamma) (Papernot & Steinke, Definition 1): P[K=k] is proportional to
    (1-gamma)^k * prod_{l<k} (l+eta)/(l+1) for k >= 1; eta = 0 is the logarithmic distribution
    P[K=k] = (1-gamma)^k / (k log(1/gamma)), eta = 1 the geometric one.
    """
    if math.isinf(shape):
        return int(rng.poisson(mean))
    gamma = tnb_gamma(mean, shape)
    if gamma >= 1.0:
        return 1
    if shape == 0:
        return int(rng.logseries(1.0 - gamma))
    while True:  # a negative binomial conditioned on K >= 1
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


def dp_score(correct: int, val_size: int, *, sigma_v: float, rng: np.random.Generator) -> float:
    """M3: (correct + N(0, sigma_v^2)) / val_size, a noisy validation accuracy.

    One validation record moves the count of correct predictions by at most 1 (sensitivity 1);
    ``val_size`` is public (fixed by the split rule). The noisy count is rounded to 1/100 of a record
    (post-processing) so that low-order float bits of the Gaussian draw are not released.
    """
    if val_size < 1:
        raise ValueError(
            f"expected a non-empty validation split for the DP score, got {val_size} records; set data.val_fraction > 0"
        )
    noisy = float(correct) + float(rng.normal(0.0, sigma_v))
    return round(noisy, 2) / val_size
