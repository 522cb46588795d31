"""The mechanisms (privacy contract, docs/privacy.md): each a ``dp_accounting`` DpEvent under the
add/remove-one-record neighbouring relation.

* M1 ``central``  -- n rounds of a Poisson(q_c)-subsampled Gaussian on per-class sums;
* M2 ``dpsgd``    -- T logical steps of a Poisson(q)-subsampled Gaussian on clipped gradient sums;
* M3 ``selection``-- one Gaussian on a count of correct validation predictions (tuning only).
"""

from __future__ import annotations

import dp_accounting

NEIGHBOURING_RELATION = "add/remove one record (image with its label) of the training split"


PUBLIC_FACTS = (
    "N (training-split size)",
    "number of classes",
    "image shape and value range",
    "the whole config (noise seeds excepted)",
)


KINDS = ("poisson_gaussian", "gaussian")


def central_event(*, noise_multiplier: float, sample_rate: float, rounds: int) -> dp_accounting.DpEvent:
    """M1: ``rounds`` x Poisson(sample_rate)-subsampled Gaussian(noise_multiplier).

    Sensitivity: one record moves one per-class sum of 2x-downsampled images in [0, 1] by at most
    sqrt(d/4) in L2; the noise std is noise_multiplier * sqrt(d/4) on every coordinate.
    """
    return poisson_gaussian(noise_multiplier, sample_rate, rounds)


def dpsgd_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """M2: ``steps`` x Poisson(sample_rate)-subsampled Gaussian(noise_multiplier).

    Sensitivity: the clipped per-example gradient (averaged over K noise draws first) has norm
    <= C; the noise N(0, (sigma C)^2) is added once per logical step to the clipped sum.
    """
    return poisson_gaussian(noise_multiplier, sample_rate, steps)


def selection_event(*, noise_multiplier: float) -> dp_accounting.DpEvent:
    """M3: Gaussian(noise_multiplier) on a count of correct predictions (sensitivity 1)."""
    _positive("noise_multiplier", noise_multiplier)
    return dp_accounting.GaussianDpEvent(noise_multiplier)


def poisson_gaussian(sigma: float, q: float, count: int) -> dp_accounting.DpEvent:
    _positive("noise_multiplier", sigma)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"expected a sample rate in (0, 1], got {q!r}")
    if count < 0:
        raise ValueError(f"expected a non-negative count, got {count!r}")
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, int(count))


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected {name} > 0, got {value!r}")
