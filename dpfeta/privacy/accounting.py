"""Accounting: RDP order grids, one cached RDP curve, epsilon(delta), and the sigma searches.

The only module that touches ``dp_accounting`` internals; each one is wrapped here once (and pinned by
``tests/test_privacy.py``):

* ``rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian`` -- one step's RDP curve, cached
  per (q, sigma, orders) because calibration re-evaluates the fixed mechanisms many times;
* ``rdp_privacy_accountant._compute_rdp_repeat_and_select`` -- Papernot-Steinke's repeat-and-select
  bound on a base curve (the accountant's own formula);
* ``rdp_privacy_accountant._gamma_truncated_negative_binomial`` -- the accountant's (conservative)
  inversion of the truncated negative binomial's mean;
* ``rdp_privacy_accountant.compute_epsilon`` -- epsilon(delta) from a curve;
* ``RdpAccountant._orders`` -- the default order grid;
* ``pld.privacy_loss_distribution`` -- the PLD of one Poisson-subsampled Gaussian step, cached per
  (q, sigma, interval), then self-composed (cached per count: the central query's recurs in every
  epsilon of a run) and composed in the order ``PLDAccountant`` composes (its construction is ~85 % of
  a PLD epsilon).

Fails closed: an order the accountant cannot bound (NaN) counts as +inf, never as epsilon = 0.
Imports neither torch, Ray, nor anything of dpfeta.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, Optional

import dp_accounting
import numpy as np
from dp_accounting import dp_event, pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant as rdp_impl
from scipy.optimize import brentq

DEFAULT_RDP_ORDERS = tuple(float(o) for o in rdp.RdpAccountant()._orders)  # 1.1..10.9, 11..63, 128..1024
INTEGER_RDP_ORDERS = tuple(o for o in DEFAULT_RDP_ORDERS if o.is_integer())


# PLD: dp_accounting's pessimistic discretisation (every grid gives an upper bound on epsilon). The
# ledger and the final check of a calibration use PLD_INTERVAL; the calibration searches on the
# coarser grids 10 * PLD_COARSE_INTERVAL and PLD_COARSE_INTERVAL first (an evaluation there is
# 10-20x cheaper), then confirms on PLD_INTERVAL.
PLD_INTERVAL = 1e-4
PLD_COARSE_INTERVAL = 1e-3
CALIBRATION_SLACK = 5e-4  # a PLD sigma is the smallest to this relative tolerance (privacy.md: 1e-3)


def make_accountant(accountant: str, orders: tuple | None = None, *, pld_interval: float = PLD_INTERVAL):
    if accountant == "rdp":
        return rdp.RdpAccountant(list(orders or DEFAULT_RDP_ORDERS))
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=pld_interval)
    raise ValueError(f"expected accountant 'rdp' or 'pld', got {accountant!r}")


@contextlib.contextmanager
def quiet_accountant():
    """dp_accounting logs one absl warning per order it cannot evaluate; keep those out of the way."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


# --------------------------------------------------------------------------------------------
# RDP curves
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _step_curve(q: float, sigma: float, orders: tuple) -> np.ndarray:
    out = np.asarray(rdp_impl._compute_rdp_poisson_subsampled_gaussian(q, sigma, list(orders)), dtype=np.float64)
    return np.where(np.isnan(out), np.inf, out)  # inf: an order the accountant cannot bound


def rdp_curve(event: dp_accounting.DpEvent, orders: tuple = DEFAULT_RDP_ORDERS) -> np.ndarray:
    """The RDP of ``event`` at ``orders``: the sums dp_accounting's RdpAccountant forms, with the
    Poisson-Gaussian step curves cached. 0 compositions cost 0 (not 0 * inf = NaN)."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return event.count * rdp_curve(event.event, orders) if event.count else np.zeros(len(orders))
    if isinstance(event, dp_event.ComposedDpEvent):
        return sum((rdp_curve(e, orders) for e in event.events), np.zeros(len(orders)))
    if isinstance(event, dp_event.RepeatAndSelectDpEvent):
        return repeat_curve(rdp_curve(event.event, orders), float(event.mean), float(event.shape), orders)
    if isinstance(event, dp_event.GaussianDpEvent):
        return _step_curve(1.0, float(event.noise_multiplier), orders)
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        return _step_curve(float(event.sampling_probability), float(event.event.noise_multiplier), orders)
    acc = rdp.RdpAccountant(list(orders))  # any other event: the accountant itself
    acc.compose(event)
    return np.where(np.isnan(acc.rdp), np.inf, np.asarray(acc.rdp, dtype=np.float64))


def repeat_curve(curve: np.ndarray, mean: float, shape: float, orders: tuple = DEFAULT_RDP_ORDERS) -> np.ndarray:
    """RDP of RepeatAndSelect over a base curve (Papernot & Steinke; the accountant's own formula)."""
    return np.asarray(rdp_impl._compute_rdp_repeat_and_select(list(orders), curve, mean, shape), dtype=np.float64)


def curve_epsilon(curve: np.ndarray, delta: float, orders: tuple = DEFAULT_RDP_ORDERS) -> float:
    """epsilon(delta) of an RDP curve; +inf when no order is finite."""
    curve = np.where(np.isnan(curve), np.inf, curve)
    if not np.isfinite(curve).any():
        return math.inf
    return float(rdp_impl.compute_epsilon(list(orders), curve, delta)[0])


def tnb_gamma(mean: float, shape: float) -> float:
    """The stopping probability gamma of the truncated negative binomial with this mean, by the same
    (conservative) inversion the RDP accountant uses, so the sampled distribution is the accounted one."""
    return float(rdp_impl._gamma_truncated_negative_binomial(shape, mean))


# --------------------------------------------------------------------------------------------
# PLD
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)  # a PLD at interval 1e-4 holds ~1e5 floats: keep few
def _step_pld(q: float, sigma: float, interval: float):
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


@functools.lru_cache(maxsize=4)  # the fixed mechanisms (the central query) recur in every epsilon of a run
def _self_composed_pld(q: float, sigma: float, interval: float, count: int):
    return _step_pld(q, sigma, interval).self_compose(count)


def _pld_parts(event: dp_accounting.DpEvent, count: int, interval: float, parts: list) -> bool:
    """Append the PLDs ``PLDAccountant`` would compose for ``event`` (``count`` times), in its order,
    as (q, sigma, count) of a Poisson-sampled Gaussian; False for an event it handles otherwise (then use it)."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return _pld_parts(event.event, event.count * count, interval, parts)
    if isinstance(event, dp_event.ComposedDpEvent):
        return all(_pld_parts(e, count, interval, parts) for e in event.events)
    if (
        isinstance(event, dp_event.PoissonSampledDpEvent)
        and isinstance(event.event, dp_event.GaussianDpEvent)
        and event.sampling_probability > 0
        and event.event.noise_multiplier > 0
        and count > 0
    ):
        parts.append((float(event.sampling_probability), float(event.event.noise_multiplier), count))
        return True
    return False


def _pld_epsilon(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    """``PLDAccountant(interval)``'s epsilon(delta) of ``event``, with the step PLDs cached."""
    parts: list = []
    if not _pld_parts(event, 1, interval, parts):
        acc = make_accountant("pld", pld_interval=interval)
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    total = pld.privacy_loss_distribution.identity(value_discretization_interval=interval)
    for q, sigma, count in parts:
        total = total.compose(_self_composed_pld(q, sigma, float(interval), count))
    return float(total.get_epsilon_for_delta(delta))


def epsilon_of(
    event: dp_accounting.DpEvent,
    *,
    delta: float,
    accountant: str,
    orders: tuple | None = None,
    pld_interval: float = PLD_INTERVAL,
) -> float:
    """epsilon(delta) of ``event``; ``orders`` restricts the RDP grid (a subset only raises epsilon),
    ``pld_interval`` is the PLD discretisation (pessimistic: coarser only raises epsilon).

    Fails closed: a result that is not a number >= 0 is an error, never a small epsilon.
    """
    if accountant == "rdp":
        grid = tuple(orders or DEFAULT_RDP_ORDERS)
        eps = curve_epsilon(rdp_curve(event, grid), delta, grid)
    elif accountant == "pld":
        eps = _pld_epsilon(event, delta, pld_interval)
    else:
        raise ValueError(f"expected accountant 'rdp' or 'pld', got {accountant!r}")
    if math.isnan(eps) or eps < 0:
        raise ArithmeticError(f"the {accountant} accountant returned epsilon={eps!r}; refusing to report it")
    return eps


def _optimal_order(event: dp_accounting.DpEvent, *, delta: float, orders: tuple) -> float:
    acc = make_accountant("rdp", orders)
    acc.compose(event)
    return float(acc.get_epsilon_and_optimal_order(delta)[1])


# --------------------------------------------------------------------------------------------
# Searches for the smallest sigma
# --------------------------------------------------------------------------------------------


def search_sigma(
    epsilon_fn: Callable[[float], float],
    target: float,
    *,
    rtol: float,
    start: float = 1.0,
    step: float = 4.0,
    lower: float = 1e-2,
    upper: float = 1e4,
) -> float:
    """Smallest sigma (to relative ``rtol``) with ``epsilon_fn(sigma) <= target``; never above it.

    Brent's method on log sigma -> log epsilon (monotone decreasing), bracketed from ``start`` in
    factors of ``step``, then a step up until the target holds (the accountant's numerics never make
    the result overshoot). Raises when even ``upper`` does not reach the target.
    """

    def gap(log_sigma: float) -> float:
        return math.log(max(epsilon_fn(math.exp(log_sigma)), 1e-300)) - math.log(target)

    top, factor = math.log(upper), math.log(step)
    lo = hi = math.log(start)
    if gap(hi) > 0:
        while gap(hi) > 0:
            lo, hi = hi, hi + factor
            if hi > top:
                if gap(top) > 0:
                    raise ValueError(
                        f"no noise multiplier <= {upper:g} reaches epsilon={target:g}; "
                        "the fixed mechanisms alone spend the budget"
                    )
                hi = top
                break
    else:
        while gap(lo) <= 0:
            hi, lo = lo, lo - factor
            if lo < math.log(lower):
                return math.exp(hi)
    root = brentq(gap, lo, hi, xtol=rtol / 4, rtol=1e-12)
    log_sigma = min(root + rtol / 4, hi)
    while gap(log_sigma) > 0:  # guard against the accountant's numerics: never overshoot
        log_sigma = min(log_sigma + rtol / 4, hi)
    return math.exp(log_sigma)


def calibrate_noise(
    *,
    make_events: Callable[[float], dp_accounting.DpEvent],
    epsilon: float,
    delta: float,
    accountant: str,
    rtol: float = 1e-4,
    lower: float = 1e-2,
    upper: float = 1e4,
) -> float:
    """Smallest sigma (to relative tolerance ``rtol``) with epsilon(make_events(sigma)) <= epsilon.

    RDP speed-up (exact, never optimistic): fractional orders are ~10x dearer than integer ones,
    so the search first runs on the integer orders, then refines on the integer orders plus the
    default grid's orders next to the optimal one. A subset of orders can only raise epsilon, so
    the result is an upper bound for the default grid too, and in practice equal to it.

    PLD speed-up: the search runs on coarse discretisations (1e-2, then ``PLD_COARSE_INTERVAL``) and
    its result is confirmed on ``PLD_INTERVAL``, the ledger's (``_confirm_pld``).
    """

    def on(orders: Optional[tuple], acc: str) -> Callable[[float], float]:
        return lambda s: epsilon_of(make_events(s), delta=delta, accountant=acc, orders=orders)

    start = 1.0 if upper > 1e3 else math.exp(math.log(upper) - 0.05)
    if accountant == "pld":

        def pld_on(interval: float) -> Callable[[float], float]:
            return lambda s: epsilon_of(make_events(s), delta=delta, accountant="pld", pld_interval=interval)

        rough = search_sigma(
            pld_on(10 * PLD_COARSE_INTERVAL), epsilon, rtol=1e-3, start=start, lower=lower, upper=upper
        )
        coarse = search_sigma(
            pld_on(PLD_COARSE_INTERVAL),
            epsilon,
            rtol=rtol,
            start=math.exp(math.log(rough * 1.01) - 0.05),
            lower=lower,
            upper=rough * 1.01,
        )
        return _confirm_pld(pld_on(PLD_INTERVAL), epsilon, coarse, rtol=rtol, lower=lower)
    if accountant != "rdp":
        return search_sigma(on(None, accountant), epsilon, rtol=rtol, start=start, lower=lower, upper=upper)
    rough = search_sigma(on(INTEGER_RDP_ORDERS, "rdp"), epsilon, rtol=1e-3, start=start, lower=lower, upper=upper)
    alpha = _optimal_order(make_events(rough), delta=delta, orders=INTEGER_RDP_ORDERS)
    orders = tuple(sorted(set(INTEGER_RDP_ORDERS) | {o for o in DEFAULT_RDP_ORDERS if abs(o - alpha) <= 1.5}))
    return search_sigma(
        on(orders, "rdp"), epsilon, rtol=rtol, start=math.exp(math.log(rough) - 0.05), lower=lower, upper=rough
    )


def _confirm_pld(fine: Callable[[float], float], epsilon: float, sigma: float, *, rtol: float, lower: float) -> float:
    """``sigma`` from the coarse PLD search, checked on the ledger's PLD_INTERVAL (``fine``): kept when it
    meets the target there and ``CALIBRATION_SLACK`` less noise does not (the coarse grid's epsilon is
    1e-5 to 3e-3 relative above the fine one), else searched again on the fine grid. Never above it."""
    if fine(sigma) <= epsilon and fine(sigma * (1 - max(rtol, CALIBRATION_SLACK))) > epsilon:
        return sigma
    return search_sigma(fine, epsilon, rtol=rtol, start=sigma, lower=lower, upper=sigma * 1.05)


def smallest_sigma(
    ok: Callable[[float], bool],
    *,
    rtol: float,
    hi: float | None = None,
    lo: float | None = None,
    lower: float = 1e-2,
    upper: float = 1e4,
) -> float:
    """Smallest sigma (to relative ``rtol``, never below the true one) with ``ok(sigma)``; ok monotone.
    Bisection on log sigma (for a bound on a whole RDP curve, where there is no scalar to root-find).

    ``hi``, when given, must satisfy ``ok``; ``lo``, when given, must not.
    """
    if hi is None:
        hi = 1.0
        while not ok(hi):
            hi *= 4.0
            if hi > upper:
                raise ValueError(
                    f"no noise multiplier <= {upper:g} meets the target: the fixed "
                    "mechanisms (central query, selection score) alone spend the budget"
                )
    if lo is None:
        lo = hi / 4.0
        while ok(lo):
            hi, lo = lo, lo / 4.0
            if lo < lower:
                return hi
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
