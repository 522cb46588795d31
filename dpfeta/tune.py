"""Ray Tune sweeps under a fixed total privacy budget (privacy.md §6, issue 7).

Three tuning privacy modes (``tune.privacy_mode``):

* ``private`` -- random search with a *random* number of trials K drawn from the distribution
  ``dp_accounting.RepeatAndSelectDpEvent`` accounts for (Papernot & Steinke, ICLR 2022): truncated
  negative binomial (shape eta >= 0; 0 = logarithmic, 1 = geometric) or Poisson. Each trial is
  M1 (central query) + M2 (DP-SGD) + M3 (Gaussian on the count of correct validation predictions);
  only the best trial (its model, hyperparameters and noisy score) is released. Every trial's sigma
  is calibrated so that the whole sweep meets (epsilon, delta). Adaptive schedulers are refused.
* ``naive`` -- ``tune.num_trials`` trials, composed; any scheduler; every trial output may be released.
* ``public`` -- the trials run on a public proxy dataset (``tune.proxy_data``); the final run on the
  sensitive data gets the whole budget.

How the per-trial sigma is fixed when the search space moves privacy parameters (central rounds,
central noise, batch sizes, epochs): the sweep plan builds a *reference trial* -- the worst central
query over the search space (most rounds, least noise, largest sample rate) plus DP-SGD at the base
config's (q, T) with sigma* plus M3 -- and calibrates sigma* so that the reference meets the total.
Each trial then takes the smallest sigma whose RDP curve (central + DP-SGD + selection, at every
order) lies under the reference curve. By joint quasi-convexity of the Renyi divergence, a trial that
draws its hyperparameters at random is then dominated by the reference at every order, so the
Papernot-Steinke bound computed on the reference covers the sweep. RDP is required for this
(``dp_accounting``'s PLD accountant supports neither RepeatAndSelectDpEvent nor curve dominance).

The trial count K is drawn once, from OS entropy (``run.seed`` only in tests; the record then says
``seeded``), before any trial runs, and stored; a resumed sweep reuses it. K is never chosen
adaptively, and -- like the other trials' scores -- it is not part of the released output.
``tune.search_seed`` seeds only the order of the hyperparameter draws (public).

What a sweep publishes is ``<sweep dir>/release/`` (``dpfeta.release``): the selected trial's
central images, weights and samples, its noisy score and hyperparameters, the ledger and the card,
under an opaque id (a keyed hash of Ray's trial id with a key drawn from OS entropy and kept in
sweep.json), so neither the id nor anything else in the release tells the trial's position or K.
Trial folders (``trials/<opaque id>/``), ``summary.json`` and ``trials.csv`` are operator-internal.
In private mode no MLflow run is created per trial; with ``tracking.nondp: true`` the summary and
trial table reach MLflow under ``nondp/`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from dp_accounting import dp_event, rdp
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_impl
from scipy.optimize import brentq

from dpfeta import config as config_mod
from dpfeta import privacy

log = logging.getLogger(__name__)

MODES = config_mod.TUNE_MODES
# Keys a search space may not touch: the budget, the sweep itself, the run identity, the data (N and
# the split are public facts of the plan) and the score's definition.
FORBIDDEN_PREFIXES = ("privacy.", "tune.", "run.", "tracking.", "data.", "eval.")
FORBIDDEN_KEYS = ("central.epsilon_share",)  # sigma_c is resolved once, before the sweep
CENTRAL_KEYS = ("central.rounds", "central.noise_multiplier", "central.batch_size")
DPSGD_KEYS = ("finetune.batch_size", "finetune.epochs")
PRIVACY_KEYS = CENTRAL_KEYS + DPSGD_KEYS
ORDERS = np.asarray(rdp.RdpAccountant().orders, dtype=np.float64)

PLD_NOTE = ("privacy.accountant=pld: sweeps are accounted with RDP. dp_accounting 0.6.0's PLD accountant "
            "does not support RepeatAndSelectDpEvent (the Papernot-Steinke bound is an RDP result), and the "
            "per-trial calibration needs per-order RDP curve dominance")


# --------------------------------------------------------------------------------------------
# Search space: tune.search_space -> Ray Tune domains
# --------------------------------------------------------------------------------------------

# type -> (required fields, optional fields)
SPACE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uniform": (("lower", "upper"), ()),
    "quniform": (("lower", "upper", "q"), ()),
    "loguniform": (("lower", "upper"), ("base",)),
    "qloguniform": (("lower", "upper", "q"), ("base",)),
    "randint": (("lower", "upper"), ()),  # upper exclusive (Ray)
    "qrandint": (("lower", "upper", "q"), ()),
    "lograndint": (("lower", "upper"), ("base",)),  # upper exclusive (Ray)
    "randn": (("mean", "sd"), ()),
    "choice": (("values",), ()),
    "grid": (("values",), ()),
}
BOUNDED = {"uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint", "lograndint",
           "choice", "grid"}


def _space_error(key: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"config key 'tune.search_space.{key}': expected {expected}, got {got!r}")


def check_search_space(cfg: config_mod.Config) -> dict[str, dict]:
    """Validate ``tune.search_space`` against the config schema and the privacy mode; return it."""
    space, mode = cfg.tune.search_space, cfg.tune.privacy_mode
    for key, spec in space.items():
        if key.startswith(FORBIDDEN_PREFIXES) or key in FORBIDDEN_KEYS:
            raise _space_error(key, "a key outside " + ", ".join(FORBIDDEN_PREFIXES + FORBIDDEN_KEYS)
                               + " (the budget, data and score are fixed for a sweep)", key)
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise _space_error(key, "a mapping with type one of " + ", ".join(SPACE_TYPES), spec)
        required, optional = SPACE_TYPES[spec["type"]]
        missing = [f for f in required if f not in spec]
        unknown = sorted(set(spec) - set(required) - set(optional) - {"type"})
        if missing or unknown:
            raise _space_error(key, f"fields {list(required)} for type {spec['type']}", spec)
        if spec["type"] in ("choice", "grid"):
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise _space_error(key, "a non-empty list of values", spec["values"])
        elif "lower" in spec and not spec["lower"] < spec["upper"]:
            raise _space_error(key, "lower < upper", spec)
        if spec["type"] == "grid" and mode == "private":
            raise _space_error(key, "random distributions in tune.privacy_mode=private (a grid is not "
                               "an i.i.d. draw; the Papernot-Steinke bound needs one)", spec)
        if key in PRIVACY_KEYS and spec["type"] not in BOUNDED:
            raise _space_error(key, f"a bounded distribution for the privacy parameter {key}", spec)
    _check_samples(cfg, space)
    return space


def _check_samples(cfg: config_mod.Config, space: dict) -> None:
    """Values the space can produce must make a valid config (type errors caught before any trial)."""
    probes = {key: _probe_values(spec) for key, spec in space.items()}
    for i in range(max(len(v) for v in probes.values()) if probes else 0):
        config_mod.replace(cfg, {key: values[i % len(values)] for key, values in probes.items()})


def _probe_values(spec: dict) -> list:
    t = spec["type"]
    if t in ("choice", "grid"):
        return list(spec["values"])
    if t == "randn":
        return [spec["mean"], spec["mean"] + spec["sd"]]
    lower, upper = _extremes(spec)
    if t in ("uniform", "loguniform"):  # a float draw: also probe a non-integer value
        return [lower, upper, lower + (upper - lower) / math.pi]
    return [lower, upper]


def search_space(space: dict) -> dict[str, Any]:
    """``{dotted key: ray.tune domain}`` from the YAML form of ``tune.search_space``."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        t = spec["type"]
        kw = {k: v for k, v in spec.items() if k != "type"}
        if t == "choice":
            out[key] = tune.choice(kw["values"])
        elif t == "grid":
            out[key] = tune.grid_search(kw["values"])
        else:
            out[key] = getattr(tune, t)(**kw)
    return out


def _extremes(spec: dict) -> list:
    """The values at which a privacy parameter's worst case can sit (bounds, or every choice)."""
    t = spec["type"]
    if t in ("choice", "grid"):
        return list(spec["values"])
    lower, upper = spec["lower"], spec["upper"]
    if t in ("randint", "lograndint"):
        return [lower, upper - 1]
    if "q" in spec:  # Ray rounds to the nearest multiple of q, which may leave [lower, upper]
        q = spec["q"]
        lower, upper = min(lower, round(lower / q) * q), max(upper, round(upper / q) * q)
    return [lower, upper]


def check_scheduler(cfg: config_mod.Config) -> None:
    """Private mode: plain random search only (FIFO, every trial to the end, selection on the DP score)."""
    t = cfg.tune
    if t.privacy_mode == "private" and t.scheduler != "fifo":
        raise ValueError(
            f"config key 'tune.scheduler': expected fifo in tune.privacy_mode=private, got {t.scheduler!r}: "
            "adaptive schedulers and searchers (ASHA, HyperBand, PBT, Bayesian search) decide on private "
            "intermediate scores and are outside the random-stopping analysis (Papernot & Steinke); use "
            "privacy_mode=naive (trials composed) or public (tune on a proxy dataset)")
    if t.privacy_mode == "private" and t.metric != "score":
        raise ValueError(f"config key 'tune.metric': expected score (the DP validation score, M3) in "
                         f"tune.privacy_mode=private, got {t.metric!r}")
    if t.privacy_mode != "public" and t.metric.startswith("nondp/"):
        raise ValueError(f"config key 'tune.metric': {t.metric!r} is not DP; selecting on it leaks. "
                         "Use score")


# --------------------------------------------------------------------------------------------
# The random number of trials (private mode)
# --------------------------------------------------------------------------------------------


def trial_distribution(cfg: config_mod.Config) -> tuple[float, float]:
    """``(mean, shape)`` of RepeatAndSelectDpEvent: shape = tune.tnb_eta, or inf for Poisson."""
    t = cfg.tune
    if t.trial_distribution == "poisson":
        return float(t.num_trials), math.inf
    if not t.tnb_eta >= 0:
        raise ValueError(f"config key 'tune.tnb_eta': expected a shape >= 0 (0 logarithmic, 1 "
                         f"geometric), got {t.tnb_eta!r}")
    return float(t.num_trials), float(t.tnb_eta)


def tnb_gamma(mean: float, shape: float) -> float:
    """The stopping probability gamma of the truncated negative binomial with this mean.

    The same (conservative) inversion the RDP accountant uses, so that the sampled distribution is
    the one accounted for.
    """
    return float(_rdp_impl._gamma_truncated_negative_binomial(shape, mean))


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


# --------------------------------------------------------------------------------------------
# RDP curves
# --------------------------------------------------------------------------------------------


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


INTEGER_ORDERS = tuple(float(o) for o in ORDERS if float(o).is_integer())


@functools.lru_cache(maxsize=2048)
def _step_curve(q: float, sigma: float, orders: tuple) -> np.ndarray:
    out = np.asarray(_rdp_impl._compute_rdp_poisson_subsampled_gaussian(q, sigma, list(orders)), dtype=np.float64)
    return np.where(np.isnan(out), np.inf, out)  # inf: an order the accountant cannot bound


def curve(event, orders: tuple = tuple(ORDERS)) -> np.ndarray:
    """The RDP of ``event`` at ``orders``: the sums dp_accounting's RdpAccountant forms, with the
    per-(q, sigma) step curve cached (calibration re-evaluates the fixed mechanisms many times)."""
    if isinstance(event, dp_event.SelfComposedDpEvent):  # 0 compositions cost 0 (not 0 * inf)
        return event.count * curve(event.event, orders) if event.count else np.zeros(len(orders))
    if isinstance(event, dp_event.ComposedDpEvent):
        return sum((curve(e, orders) for e in event.events), np.zeros(len(orders)))
    if isinstance(event, dp_event.GaussianDpEvent):
        return _step_curve(1.0, float(event.noise_multiplier), orders)
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        return _step_curve(float(event.sampling_probability), float(event.event.noise_multiplier), orders)
    acc = rdp.RdpAccountant(list(orders))
    acc.compose(event)
    return np.where(np.isnan(acc.rdp), np.inf, acc.rdp)


def curve_epsilon(rdp_curve: np.ndarray, delta: float, orders: tuple = tuple(ORDERS)) -> float:
    return float(_rdp_impl.compute_epsilon(list(orders), rdp_curve, delta)[0])


def repeat_curve(rdp_curve: np.ndarray, mean: float, shape: float, orders: tuple = tuple(ORDERS)) -> np.ndarray:
    """RDP of RepeatAndSelect over a base curve (the accountant's own Theorem 2 / 6 formula)."""
    return np.asarray(_rdp_impl._compute_rdp_repeat_and_select(list(orders), rdp_curve, mean, shape))


def smallest_sigma(ok: Callable[[float], bool], *, rtol: float, hi: float | None = None,
                   lo: float | None = None, lower: float = 1e-2, upper: float = 1e4) -> float:
    """Smallest sigma (to relative ``rtol``, never below the true one) with ``ok(sigma)``; ok monotone.

    ``hi``, when given, must satisfy ``ok``; ``lo``, when given, must not.
    """
    if hi is None:
        hi = 1.0
        while not ok(hi):
            hi *= 4.0
            if hi > upper:
                raise ValueError(f"no noise multiplier <= {upper:g} meets the target: the fixed "
                                 "mechanisms (central query, selection score) alone spend the budget")
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


def calibrate(epsilon_fn: Callable[[float], float], target: float, *, rtol: float, start: float,
              step: float = 2.0, upper: float = 1e4) -> float:
    """Smallest sigma with ``epsilon_fn(sigma) <= target`` (to ``rtol``; never above the target).

    Brent's method on log sigma -> log epsilon (decreasing), bracketed from ``start`` in steps of
    the factor ``step``.
    """
    def gap(log_sigma: float) -> float:
        return math.log(max(epsilon_fn(math.exp(log_sigma)), 1e-300)) - math.log(target)

    lo = hi = math.log(start)
    if gap(hi) > 0:
        while gap(hi) > 0:
            lo, hi = hi, hi + math.log(step)
            if hi > math.log(upper):
                raise ValueError(f"no noise multiplier <= {upper:g} meets epsilon={target:g}")
    else:
        while gap(lo) <= 0:
            hi, lo = lo, lo - math.log(step)
    root = brentq(gap, lo, hi, xtol=rtol / 4, rtol=1e-12)
    log_sigma = min(root + rtol / 4, hi)
    while gap(log_sigma) > 0:
        log_sigma = min(log_sigma + rtol / 4, hi)
    return math.exp(log_sigma)


# --------------------------------------------------------------------------------------------
# The sweep plan: per-trial sigma under the total budget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPrivacy:
    """The privacy-relevant parameters of one trial (what its RDP curve depends on)."""

    rounds: int
    sigma_c: Optional[float]
    q_c: float
    q: float
    steps: int

    def central(self):
        if self.rounds == 0:
            return None
        return privacy.central_event(noise_multiplier=self.sigma_c, sample_rate=self.q_c,
                                     rounds=self.rounds)

    def dpsgd(self, sigma: float):
        return privacy.dpsgd_event(noise_multiplier=sigma, sample_rate=self.q, steps=self.steps)


def trial_privacy(cfg: config_mod.Config, n: int) -> TrialPrivacy:
    c, f = cfg.central, cfg.finetune
    for key, b in (("central.batch_size", c.batch_size), ("finetune.batch_size", f.batch_size)):
        if b > n:
            raise ValueError(f"config key '{key}': expected an expected sample size <= N={n}, got {b!r}")
    q = f.batch_size / n
    if c.rounds > 0 and c.noise_multiplier is None:
        raise ValueError("central.noise_multiplier must be resolved (privacy.resolve) before planning")
    return TrialPrivacy(rounds=c.rounds, sigma_c=c.noise_multiplier if c.rounds else None,
                        q_c=c.batch_size / n, q=q,
                        steps=privacy.dpsgd_steps(epochs=f.epochs, sample_rate=q))


def _worst_central(cfg: config_mod.Config, space: dict, n: int) -> TrialPrivacy:
    """The reference trial: the most expensive central query the space allows, base DP-SGD (q, T)."""
    base = trial_privacy(cfg, n)

    def values(key: str, default: Any) -> list:
        return _extremes(space[key]) if key in space else [default]

    rounds = values("central.rounds", cfg.central.rounds)
    sigmas = values("central.noise_multiplier", cfg.central.noise_multiplier)
    batches = values("central.batch_size", cfg.central.batch_size)
    if max(batches) > n:
        raise ValueError(f"tune.search_space: central.batch_size reaches {max(batches)!r} > N={n}")
    for key in DPSGD_KEYS:
        if key == "finetune.batch_size" and key in space and max(_extremes(space[key])) > n:
            raise ValueError(f"tune.search_space: finetune.batch_size reaches "
                             f"{max(_extremes(space[key]))!r} > N={n}")
    worst = dataclasses.replace(base, rounds=int(max(rounds)),
                                sigma_c=float(min(sigmas)) if max(rounds) > 0 else None,
                                q_c=max(batches) / n)
    if worst.rounds > 0:  # sanity: the worst corner dominates every corner wherever both are finite
        ref = curve(worst.central(), INTEGER_ORDERS)
        for r, s, b in itertools.product(rounds, sigmas, batches):
            if r == 0:
                continue
            other = curve(privacy.central_event(noise_multiplier=s, sample_rate=b / n, rounds=r),
                          INTEGER_ORDERS)
            both = np.isfinite(ref) & np.isfinite(other)
            if not np.all(other[both] <= ref[both] * (1 + 1e-9) + 1e-12):
                raise RuntimeError(f"internal: the reference central query does not dominate rounds={r}, "
                                   f"noise_multiplier={s}, batch_size={b}; refusing to plan the sweep")
    return worst


def _privacy_keys_searched(cfg: config_mod.Config) -> list[str]:
    return sorted(k for k in cfg.tune.search_space if k in PRIVACY_KEYS)


def sweep_plan(cfg: config_mod.Config, n: int) -> dict:
    """The privacy plan of a sweep, from public facts only (N, the config). JSON-able.

    Keys: mode, accountant (+ accountant_note), epsilon (the released model's total), delta,
    target_epsilon, trials (count or its distribution), trial_sigma (sigma* of the reference trial),
    single_sigma (sigma of one untuned run with the whole budget), penalty (their ratio),
    epsilon_per_trial (one reference trial alone), reference (its parameters and RDP curve).
    """
    with quiet_accountant():
        return _sweep_plan(cfg, n)


def _sweep_plan(cfg: config_mod.Config, n: int) -> dict:
    cfg = privacy.resolve(cfg, n)
    p, t = cfg.privacy, cfg.tune
    if p.noise_multiplier is not None:
        raise ValueError("config key 'privacy.noise_multiplier': expected null in a sweep (each "
                         f"trial's sigma is calibrated from the total budget), got {p.noise_multiplier!r}")
    space = check_search_space(cfg)
    check_scheduler(cfg)
    # The untuned run for comparison; tuned sweeps are always accounted with RDP, so compare in RDP.
    single = privacy.plan(cfg if t.privacy_mode == "public" else config_mod.replace(cfg, {"privacy.accountant": "rdp"}), n)
    out: dict[str, Any] = {
        "mode": t.privacy_mode, "target_epsilon": p.epsilon, "delta": p.delta, "n": n,
        "single_sigma": single.sigma, "search_space": space,
        "neighbouring_relation": privacy.NEIGHBOURING_RELATION,
    }
    if t.privacy_mode == "public":
        out.update(accountant=p.accountant, epsilon=single.epsilon, trial_sigma=None, penalty=1.0,
                   trials={"count": t.num_trials}, tuning_cost=0.0,
                   final=privacy.plan_json(single),
                   note="trials run on the public proxy tune.proxy_data; the final run on the "
                        "sensitive data carries the whole budget")
        return out
    accountant, note = "rdp", None
    if p.accountant == "pld":
        note = PLD_NOTE
        log.warning("sweep accounted with RDP, not PLD: %s", note)
    ref = _worst_central(cfg, space, n)
    selection = privacy.selection_event(noise_multiplier=t.score_noise)
    fixed = [e for e in (ref.central(), selection) if e is not None]
    private = t.privacy_mode == "private"
    if private:
        mean, shape = trial_distribution(cfg)
        trials = {"distribution": t.trial_distribution, "mean": mean,
                  "shape": "inf" if math.isinf(shape) else shape}
        if not math.isinf(shape):
            trials["gamma"] = tnb_gamma(mean, shape)
    else:
        k = t.num_trials
        trials = {"count": k}

    def total_event(sigma: float):
        inner = dp_event.ComposedDpEvent(fixed + [ref.dpsgd(sigma)])
        return (dp_event.RepeatAndSelectDpEvent(inner, mean, shape) if private
                else dp_event.SelfComposedDpEvent(inner, k))

    def total_curve(sigma: float, orders: tuple) -> np.ndarray:
        base = sum(curve(e, orders) for e in fixed) + curve(ref.dpsgd(sigma), orders)
        return repeat_curve(base, mean, shape, orders) if private else k * base

    def eps_on(orders: tuple) -> Callable[[float], float]:
        return lambda sigma: curve_epsilon(total_curve(sigma, orders), p.delta, orders)

    floor = eps_on(tuple(ORDERS))(1e6)
    if floor >= p.epsilon:
        raise ValueError(
            f"the central query (rounds={ref.rounds}, sigma_c={ref.sigma_c}, q_c={ref.q_c:.4g}) and the "
            f"selection score (tune.score_noise={t.score_noise:g}) alone spend epsilon={floor:.4g} over "
            f"the sweep ({t.privacy_mode}, {trials}), not below privacy.epsilon={p.epsilon:g}: raise "
            "tune.score_noise or central noise, use fewer rounds or trials, or tune on public data")
    # Search on the cheap integer orders (a subset only raises epsilon: an upper bound), then refine
    # on the whole grid from there; the trials are checked against the reference on the same grid.
    rough = calibrate(eps_on(INTEGER_ORDERS), p.epsilon, rtol=1e-3, start=single.sigma)
    orders = tuple(float(o) for o in ORDERS)
    sigma = calibrate(eps_on(orders), p.epsilon, rtol=p.calibration_rtol, start=rough, step=1.02)
    epsilon = privacy.epsilon_of(total_event(sigma), delta=p.delta, accountant=accountant, orders=orders)
    while epsilon > p.epsilon:  # the accountant itself has the last word: never above the target
        sigma *= 1.0 + p.calibration_rtol
        epsilon = privacy.epsilon_of(total_event(sigma), delta=p.delta, accountant=accountant, orders=orders)
    reference = dp_event.ComposedDpEvent(fixed + [ref.dpsgd(sigma)])
    out.update(
        accountant=accountant, epsilon=epsilon, trials=trials, trial_sigma=sigma,
        penalty=sigma / single.sigma, score_noise=t.score_noise,
        epsilon_per_trial=privacy.epsilon_of(reference, delta=p.delta, accountant=accountant),
        reference={**dataclasses.asdict(ref), "sigma": sigma, "orders": list(orders),
                   "rdp": [float(x) for x in curve(reference, orders)]},
        privacy_keys_searched=_privacy_keys_searched(cfg))
    if note:
        out["accountant_note"] = note
    return out


def trial_sigma(sp: dict, cfg: config_mod.Config, n: int) -> float:
    """The trial's own sigma: the smallest whose RDP curve stays under the sweep's reference curve.

    ``cfg`` is the trial's resolved config (search-space values applied). Public mode: the single-run
    calibration on the proxy's N.
    """
    if sp["mode"] == "public":
        return privacy.plan(config_mod.replace(cfg, {"privacy.noise_multiplier": None}), n).sigma
    ref = sp["reference"]
    mine = trial_privacy(cfg, n)
    worst = TrialPrivacy(ref["rounds"], ref["sigma_c"], ref["q_c"], ref["q"], ref["steps"])
    if mine == worst:
        return float(ref["sigma"])
    orders = tuple(float(o) for o in ref["orders"])
    with quiet_accountant():
        bound = np.asarray(ref["rdp"], dtype=np.float64)
        fixed = curve(privacy.selection_event(noise_multiplier=sp["score_noise"]), orders)
        if mine.rounds:
            # By monotonicity in (rounds, 1/sigma_c, q_c) the worst central curve bounds ours too;
            # the minimum keeps orders where the accountant gave up on our parameters usable.
            own = curve(mine.central(), orders)
            fixed = fixed + (np.minimum(own, curve(worst.central(), orders)) if worst.rounds else own)

        def ok_on(subset: np.ndarray) -> Callable[[float], bool]:
            sub = tuple(np.asarray(orders)[subset])
            return lambda sigma: bool(np.all(fixed[subset] + curve(mine.dpsgd(sigma), sub) <= bound[subset]))

        # Integer orders first (cheap curves): a lower bound; then all of the sweep's orders.
        hi = float(ref["sigma"])
        integer = np.array([float(o).is_integer() for o in orders])
        ok_all = ok_on(np.ones(len(orders), dtype=bool))
        rough = smallest_sigma(ok_on(integer), rtol=1e-4, hi=hi if ok_on(integer)(hi) else None)
        if ok_all(rough):
            return rough
        return smallest_sigma(ok_all, rtol=1e-4, hi=hi if ok_all(hi) else None, lo=rough)


def trial_plan(sp: dict, cfg: config_mod.Config, n: int, sigma: float) -> privacy.Plan:
    """The plan of one trial: its ledger has M1, M2 and (private, naive) M3; private wraps it in repeat.

    ``epsilon`` is what the sweep would spend if every trial were this one (private: the
    Papernot-Steinke bound on this trial's curve; naive: k times this trial), at most the total.
    """
    if sp["mode"] == "public":
        fixed_cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": sigma})
        with quiet_accountant():
            return privacy.plan(fixed_cfg, n)
    tp = trial_privacy(cfg, n)
    ledger = privacy.Ledger(sp["accountant"], cfg.privacy.delta, n, seeded=cfg.run.seed is not None)
    if tp.rounds:
        ledger.add("central", noise_multiplier=tp.sigma_c, sample_rate=tp.q_c, count=tp.rounds)
    ledger.add("dpsgd", noise_multiplier=sigma, sample_rate=tp.q, count=tp.steps)
    ledger.add("selection", noise_multiplier=sp["score_noise"], kind="gaussian", count=1)
    trials = sp["trials"]
    if sp["mode"] == "private":
        ledger.repeat = {"mean": trials["mean"],
                         "shape": math.inf if trials["shape"] == "inf" else float(trials["shape"])}
    orders = tuple(float(o) for o in sp["reference"]["orders"])
    with quiet_accountant():  # the sweep's grid and cached curves (the ledger's own epsilon is slower)
        base = sum(curve(m.event(m.planned), orders) for m in ledger.mechanisms)
        total = (repeat_curve(base, trials["mean"], ledger.repeat["shape"], orders)
                 if sp["mode"] == "private" else trials["count"] * base)
        epsilon = curve_epsilon(total, cfg.privacy.delta, orders)
    return privacy.Plan(sigma=sigma, sample_rate=tp.q, steps=tp.steps, central_rate=tp.q_c, ledger=ledger,
                        epsilon=epsilon, target_epsilon=sp["target_epsilon"], delta=cfg.privacy.delta,
                        accountant=sp["accountant"], n=n, expected_batch=cfg.finetune.batch_size)


def sweep_plan_table(sp: dict) -> str:
    """Human-readable sweep plan (``dpfeta budget --sweep``)."""
    rows = [f"tuning mode        {sp['mode']}   trials {json.dumps(sp['trials'])}"]
    if sp["mode"] == "public":
        rows += [f"released model     epsilon {sp['epsilon']:.4f} (target {sp['target_epsilon']:g}, "
                 f"delta {sp['delta']:g}, {sp['accountant']}); the sweep on the proxy costs 0",
                 f"final run sigma    {sp['single_sigma']:.4f}"]
        return "\n".join(rows)
    ref = sp["reference"]
    rows += [
        f"released model     epsilon {sp['epsilon']:.4f} (target {sp['target_epsilon']:g}, delta "
        f"{sp['delta']:g}, {sp['accountant']}) -- the whole sweep, selection included",
        f"per-trial sigma    {sp['trial_sigma']:.4f}  (single untuned run: {sp['single_sigma']:.4f}; "
        f"penalty x{sp['penalty']:.2f})",
        f"one trial alone    epsilon {sp['epsilon_per_trial']:.4f}",
        f"reference trial    central rounds={ref['rounds']} sigma_c={ref['sigma_c']} q_c={ref['q_c']:.4g}; "
        f"DP-SGD q={ref['q']:.4g} T={ref['steps']}; score noise sigma_v={sp['score_noise']:g}",
    ]
    if sp.get("privacy_keys_searched"):
        rows.append(f"searched privacy   {', '.join(sp['privacy_keys_searched'])}: each trial takes the "
                    "smallest sigma whose RDP curve stays under the reference trial's")
    if sp.get("accountant_note"):
        rows.append(f"note               {sp['accountant_note']}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The DP selection score (M3)
# --------------------------------------------------------------------------------------------


def dp_score(correct: int, val_size: int, *, sigma_v: float, rng: np.random.Generator) -> float:
    """M3: (correct + N(0, sigma_v^2)) / val_size, a noisy validation accuracy.

    One validation record moves the count of correct predictions by at most 1 (sensitivity 1);
    ``val_size`` is public (fixed by the split rule). The noisy count is rounded to 1/100 of a record
    (post-processing) so that low-order float bits of the Gaussian draw are not released.
    """
    if val_size < 1:
        raise ValueError(f"expected a non-empty validation split for the DP score, got {val_size} "
                         "records; set data.val_fraction > 0")
    noisy = float(correct) + float(rng.normal(0.0, sigma_v))
    return round(noisy, 2) / val_size


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What a trial function gets: its config (sigma fixed), plan and ledger, and the Tune seams."""

    cfg: config_mod.Config  # search-space values applied, privacy.noise_multiplier = this trial's sigma
    params: dict[str, Any]
    plan: privacy.Plan  # sigma, q, T; its ledger holds M1, M2 (+ M3 and the repeat wrapper when tuned)
    out_dir: Path
    mode: str
    n: int
    trial_id: str

    @property
    def ledger(self) -> privacy.Ledger:
        return self.plan.ledger

    def report(self, metrics: dict[str, Any]) -> None:
        """Intermediate metrics to Tune (DP or data-independent values only)."""
        from ray import tune

        tune.report(dict(metrics))

    def train_callbacks(self) -> list:
        """Callbacks for the TorchTrainer's RunConfig: rank 0's reports go on to Tune (Train V2)."""
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]


TrialFn = Callable[[TrialContext], dict]
FinalFn = Callable[[config_mod.Config], dict]


def _metric_mode(metric: str) -> str:
    return "min" if any(word in metric for word in ("fid", "loss", "error")) else "max"


@dataclass
class _Spec:
    """Everything a trial needs, shipped once through ``tune.with_parameters``."""

    base: dict  # the resolved base config (proxy data in public mode)
    plan: dict  # sweep_plan(...)
    n: int  # N of the training split the trials use
    sweep_dir: str
    trial_fn: TrialFn
    tracking_uri: Optional[str] = None
    parent_run_id: Optional[str] = None
    log_trials: bool = True
    seed: Optional[int] = None  # run.seed (tests): seeds the score noise; None = OS entropy
    id_key: str = ""  # secret key of the opaque trial ids (sweep.json)


def opaque_id(key: str, ray_trial_id: str) -> str:
    """A trial's public id: a keyed hash of Ray's trial id (whose counter tells the trial's position)."""
    return hashlib.blake2b(ray_trial_id.encode(), key=bytes.fromhex(key), digest_size=8).hexdigest()


def _trial_config(spec: _Spec, params: dict, trial_id: str) -> config_mod.Config:
    updates = dict(params)
    updates.update({"run.dir": str(Path(spec.sweep_dir) / "trials"), "run.name": trial_id})
    if spec.tracking_uri:
        updates["tracking.uri"] = spec.tracking_uri
    if not spec.log_trials:
        updates["tracking.enabled"] = False
    cfg = config_mod.replace(config_mod.from_dict(spec.base), updates)
    config_mod.validate_against_n(cfg, spec.n)
    return cfg


RESULT_FILE = "trial_result.json"


def run_trial(spec: _Spec, params: dict, trial_id: str) -> dict:
    """One trial: calibrate its sigma, run the trial function, add the DP score. Returns the result.

    Idempotent: a trial that already scored returns its stored result (a rerun after a driver crash
    must not draw a second noisy score); the pipeline stages resume from the trial directory.
    """
    from dpfeta import tracking

    cfg = _trial_config(spec, params, trial_id)
    out_dir = cfg.run_dir()
    if (out_dir / RESULT_FILE).is_file():
        log.info("trial %s: already scored, returning %s", trial_id, out_dir / RESULT_FILE)
        return json.loads((out_dir / RESULT_FILE).read_text())
    sigma = trial_sigma(spec.plan, cfg, spec.n)
    plan = trial_plan(spec.plan, cfg, spec.n, sigma)
    cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": sigma})
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(out_dir / "config.json")  # the trial's resolved config, its sigma included
    tracker = None
    if spec.log_trials and spec.parent_run_id:
        tags = {"mlflow.parentRunId": spec.parent_run_id, "dpfeta.trial_id": trial_id,
                "dpfeta.sweep": Path(spec.sweep_dir).name, "dpfeta.tune_mode": spec.plan["mode"]}
        trial_params = {**tracking.run_params(cfg, plan), **{f"trial/{k}": v for k, v in params.items()}}
        tracker = tracking.start_run(cfg, out_dir, params=trial_params, tags=tags)
    ctx = TrialContext(cfg=cfg, params=dict(params), plan=plan, out_dir=out_dir,
                       mode=spec.plan["mode"], n=spec.n, trial_id=trial_id)
    try:
        out = dict(spec.trial_fn(ctx) or {})
        plan = ctx.plan  # the trial function may have reopened it (resume)
        result = _score(spec, plan, out, trial_id)
        result.update(sigma=sigma, id=trial_id, trial_done=1)  # "trial_id" is Ray's own (a counter)
        record = {**plan.ledger.state_dict(), "epsilon_trial": result.get("epsilon_trial"),
                  "epsilon_if_all_trials_were_this_one": plan.epsilon, "epsilon_total": spec.plan["epsilon"]}
        (out_dir / "trial_ledger.json").write_text(json.dumps(record, indent=2) + "\n")
        if (out_dir / "ledger.json").is_file():  # the pipeline's ledger, now with the score recorded
            with quiet_accountant():
                plan.ledger.save(out_dir / "ledger.json")
        tmp = out_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out_dir / RESULT_FILE)
    except BaseException:
        if tracker is not None:
            tracking.end_run("FAILED")
        raise
    if tracker is not None:
        # The released total only; one trial's own composition is not a total (naive/public modes only:
        # private sweeps make no per-trial runs).
        tracker.log_dp_metrics({k: result[k] for k in ("score", "sigma", "epsilon_total") if k in result})
        tracker.log_nondp_metrics({k: result[k] for k in ("epsilon_trial",) if k in result})
        tracker.log_artifact(out_dir / "trial_ledger.json")
        tracking.end_run()
    return result


def _score(spec: _Spec, plan: privacy.Plan, out: dict, trial_id: str) -> dict:
    """The trial's result: its metrics, the score (DP in private/naive mode) and its epsilon."""
    mode = spec.plan["mode"]
    result = {k: v for k, v in out.items() if k not in ("correct", "val_size")}
    result["epsilon_total"] = spec.plan["epsilon"]
    has_count = "correct" in out and "val_size" in out
    if mode == "public":  # the proxy is public: the exact accuracy is free
        if has_count:
            result["score"] = int(out["correct"]) / int(out["val_size"])
        return result
    if not has_count:
        raise ValueError("a trial function must return 'correct' and 'val_size' (the count of correct "
                         f"validation predictions and the public validation size), got {sorted(out)}")
    seed = None if spec.seed is None else [spec.seed, zlib.crc32(trial_id.encode())]
    result["score"] = dp_score(int(out["correct"]), int(out["val_size"]), sigma_v=spec.plan["score_noise"],
                               rng=np.random.default_rng(seed))
    plan.ledger.record_steps("selection", 1)
    for mech in plan.ledger.mechanisms:  # a stage that did not record its steps: count the whole plan
        if mech.taken == 0:
            plan.ledger.record_steps(mech.name, mech.planned)
    with quiet_accountant():
        result["epsilon_trial"] = privacy.epsilon_of(
            dp_event.ComposedDpEvent([m.event(m.taken) for m in plan.ledger.mechanisms]),
            delta=plan.delta, accountant=spec.plan["accountant"])
    return result


def pipeline_trial(ctx: TrialContext) -> dict:
    """The real trial, through the pipeline's stages in the trial directory (each resumable):
    central images (M1) -> warm-up -> DP fine-tuning on the TorchTrainer (M2; rank 0's reports
    reach Tune through TuneReportCallback) -> sampling -> the count of correct predictions on the
    validation split by the reference CNN trained on the synthetic set (scored as M3 by the caller).
    """
    import inspect

    from dpfeta import data, evaluate, pipeline, release

    cfg, run_dir = ctx.cfg, ctx.out_dir
    pl = pipeline.open_ledger(run_dir, ctx.plan)  # resume: the stored sigma is kept
    ctx.plan = pl
    splits = data.load_splits(cfg)  # validates before any privacy spend
    if len(splits.train) != ctx.n:
        raise ValueError(f"data: the sweep plan used N={ctx.n} but the training split has "
                         f"{len(splits.train)} records; set data.n_train to the true size")
    if len(splits.val) == 0 and ctx.mode != "public":
        raise ValueError("the DP selection score needs a validation split: set data.val_fraction > 0 "
                         "(or give the source a val part)")
    central_set = pipeline.stage_central(cfg, run_dir, pl, splits.train)
    init_dir = pipeline.stage_warmup(cfg, run_dir, central_set)
    kwargs = {}
    if "callbacks" in inspect.signature(pipeline.stage_finetune).parameters:
        kwargs["callbacks"] = ctx.train_callbacks()
    else:
        log.warning("pipeline.stage_finetune takes no callbacks: Tune sees this trial's DP-SGD "
                    "progress only when it ends")
    weights = pipeline.stage_finetune(cfg, run_dir, pl, splits.train, init_dir, **kwargs)
    synthetic = pipeline.stage_sample(cfg, run_dir, weights)
    release.put_model(run_dir, weights)  # the trial's release/ (central, samples, model) if selected
    e = cfg.eval
    model = evaluate.train_classifier(synthetic, epochs=e.classifier_epochs, batch_size=e.classifier_batch_size,
                                      lr=e.classifier_lr, label="selection CNN (synthetic)")
    val = splits.test if ctx.mode == "public" and len(splits.val) == 0 else splits.val
    correct = int((evaluate.predict(model, val.images) == val.labels).sum())
    return {"correct": correct, "val_size": len(val), "steps": pl.ledger.get("dpsgd").taken}


def _trainable(config: dict, spec: _Spec) -> None:
    """The Tune function trainable: one trial, its final result reported to Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    tune.report(run_trial(spec, config["params"], opaque_id(spec.id_key, trial_id)))


# --------------------------------------------------------------------------------------------
# The sweep: state, Tuner, summary
# --------------------------------------------------------------------------------------------

SWEEP_FILE, SUMMARY_FILE, TRIALS_FILE = "sweep.json", "summary.json", "trials.csv"
EXPERIMENT = "tune"  # the Tune experiment folder under the sweep directory
TRIAL_CPUS = 1.0  # the trial driver (central query, warm-up, sampling, scoring run in it)


def _fingerprint(cfg: config_mod.Config) -> dict:
    """What must not change when a sweep is resumed (run.* and tracking.* may)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in ("run", "tracking")}


def trials_config(cfg: config_mod.Config) -> tuple[config_mod.Config, int]:
    """The resolved config the trials run on, and its N: the proxy in public mode, else ``cfg``."""
    from dpfeta import data

    if cfg.tune.privacy_mode != "public":
        return cfg, data.public_train_size(cfg)
    proxy = cfg.tune.proxy_data
    if not proxy:
        raise ValueError("config key 'tune.proxy_data': expected data.* overrides naming a public proxy "
                         "dataset in tune.privacy_mode=public (e.g. {source: idx, path: /data/emnist}), got {}")
    proxy_cfg = config_mod.replace(cfg, {f"data.{k}": v for k, v in proxy.items()})
    if same_source(proxy_cfg.data, cfg.data):
        raise ValueError(f"config key 'tune.proxy_data': expected a public dataset apart from the sensitive "
                         f"data, got the same source ({cfg.data.source}, path={cfg.data.path!r}, "
                         f"name={cfg.data.name!r}); trials on it would spend budget the sweep does not count")
    if not cfg.tune.proxy_is_public:
        raise ValueError("config key 'tune.proxy_is_public': expected true in tune.privacy_mode=public (the "
                         "operator's statement that tune.proxy_data is public data; it is recorded in the "
                         "release), got false")
    n = data.public_train_size(proxy_cfg)
    return privacy.resolve(proxy_cfg, n), n


def same_source(a, b) -> bool:
    """Do two data sections name the same data (source, resolved path, torchvision name)?"""
    from dpfeta.data import same_location

    if a.source != b.source or a.name != b.name:
        return False
    if a.path is None or b.path is None:
        return a.path == b.path
    return same_location(a.path, b.path)


def _grid_size(space: dict) -> int:
    return math.prod(len(s["values"]) for s in space.values() if s["type"] == "grid")


def load_state(cfg: config_mod.Config, n: int) -> dict:
    """The sweep's fixed decisions (plan, trial count), made once and stored in ``sweep.json``.

    A resumed sweep reuses them: sigma is never recalibrated and K is never redrawn.
    """
    sweep_dir = cfg.run_dir()
    path = sweep_dir / SWEEP_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        if state["config"] != json.loads(json.dumps(_fingerprint(cfg))):
            raise ValueError(f"a sweep named '{cfg.run.name}' exists in {sweep_dir} with a different config; "
                             "rerun it unchanged to resume, or choose another run.name")
        return state
    plan = sweep_plan(cfg, n)
    t = cfg.tune
    if t.privacy_mode == "private":
        shape = math.inf if plan["trials"]["shape"] == "inf" else plan["trials"]["shape"]
        # Fresh OS entropy: K must be independent of the data and unknown to an observer of the release
        # (run.seed only in tests; the record then says seeded).
        k = draw_num_trials(plan["trials"]["mean"], shape, np.random.default_rng(cfg.run.seed))
    else:
        grid = _grid_size(t.search_space)
        if t.num_trials % grid:
            raise ValueError(f"config key 'tune.num_trials': expected a multiple of the grid size {grid}, "
                             f"got {t.num_trials}")
        k = t.num_trials
    state = {"config": _fingerprint(cfg), "plan": plan, "num_trials": k, "seeded": cfg.run.seed is not None,
             "id_key": secrets.token_hex(16)}  # secret key of the opaque trial ids
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)
    return json.loads(path.read_text())


def _scheduler(cfg: config_mod.Config):
    check_scheduler(cfg)
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(metric=cfg.tune.metric, mode=_metric_mode(cfg.tune.metric),
                         time_attr="training_iteration", grace_period=1)


def _fit(cfg: config_mod.Config, spec: _Spec, num_trials: int):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(_trainable, spec=spec), {"cpu": TRIAL_CPUS})
    path = Path(spec.sweep_dir) / EXPERIMENT
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the sweep from %s (finished trials are kept, unfinished ones continue)", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        t = cfg.tune
        grid = _grid_size(t.search_space)
        tuner = tune.Tuner(
            trainable, param_space={"params": search_space(t.search_space)},
            tune_config=tune.TuneConfig(
                num_samples=num_trials // grid, scheduler=_scheduler(cfg),
                # plain random search; the hyperparameter draws are data-independent
                search_alg=BasicVariantGenerator(random_state=t.search_seed, max_concurrent=t.max_concurrent_trials),
                reuse_actors=True),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=spec.sweep_dir,
                                      failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
                                      # private: Tune's trial table (every trial's score, K) stays off stdout
                                      verbose=0 if t.privacy_mode == "private" else None))
    return tuner.fit()


def _rows(grid, metric: str) -> list[dict]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        rows.append({
            "trial_id": m.get("id") or Path(result.path).name,
            "params": dict((result.config or {}).get("params", {})),
            "score": m.get(metric), "sigma": m.get("sigma"), "epsilon_trial": m.get("epsilon_trial"),
            "status": "error" if result.error else ("done" if m.get("trial_done") else "stopped"),
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _best(rows: list[dict], metric: str) -> Optional[dict]:
    """Best finished trial; failed or stopped trials are never selected (their score counts as -inf)."""
    done = [r for r in rows if r["status"] == "done" and isinstance(r["score"], (int, float))
            and math.isfinite(r["score"])]
    if not done:
        return None
    sign = 1.0 if _metric_mode(metric) == "max" else -1.0
    return max(done, key=lambda r: sign * r["score"])


def _write_trials_csv(rows: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for r in rows for k in r["params"]})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *keys, "sigma", "score", "epsilon_trial", "status"])
        for r in rows:
            w.writerow([r["trial_id"], *(r["params"].get(k) for k in keys), r["sigma"], r["score"],
                        r["epsilon_trial"], r["status"]])


def sweep_plan_json(plan: dict) -> dict:
    """The sweep plan without the reference RDP curve (for people, JSON output and MLflow)."""
    return {k: v for k, v in plan.items() if k != "reference"} | (
        {"reference": {k: v for k, v in plan["reference"].items() if k not in ("rdp", "orders")}}
        if "reference" in plan else {})


def run_sweep(cfg: config_mod.Config, *, trial_fn: Optional[TrialFn] = None,
              final_fn: Optional[FinalFn] = None, num_cpus: Optional[int] = None,
              echo: Callable[[str], None] = lambda line: None) -> dict:
    """Plan, run (or resume) and summarise the sweep named ``run.name``; returns the summary.

    ``trial_fn(ctx) -> {"correct": int, "val_size": int, ...}`` runs one trial (default: the
    pipeline's stages, ``pipeline_trial``); ``final_fn(cfg)`` the final run of public mode (default:
    ``pipeline.run``). ``echo`` gets the sweep plan (before any data is read) and the summary.
    """
    from dpfeta import data, tracking

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # Train reports carry no score
    n = data.public_train_size(cfg)
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)
    cfg = privacy.resolve(cfg, n)
    sweep_dir = cfg.run_dir()
    trials_cfg, trials_n = trials_config(cfg)  # refuses a bad proxy before anything is stored
    state = load_state(cfg, n)
    echo(f"sweep plan for '{cfg.run.name}' (no data read yet)\n" + sweep_plan_table(state["plan"]))
    if (sweep_dir / SUMMARY_FILE).is_file():
        log.info("sweep '%s' is complete; its summary is %s", cfg.run.name, sweep_dir / SUMMARY_FILE)
        summary = json.loads((sweep_dir / SUMMARY_FILE).read_text())
        echo(summary_text(summary))
        return summary
    plan, mode = state["plan"], cfg.tune.privacy_mode
    # Private mode releases the selected trial only: no MLflow run per trial, whatever tracking.nondp
    # says (the trials' outputs are not covered by epsilon; repeat-and-select covers the selected one).
    log_trials = mode != "private"
    tracker = tracking.start_run(cfg, sweep_dir, params={**cfg.public_flat(), **_plan_params(plan)},
                                 tags={"dpfeta.kind": "sweep", "dpfeta.tune_mode": mode})
    spec = _Spec(base=trials_cfg.to_dict(), plan=plan, n=trials_n, sweep_dir=str(sweep_dir),
                 trial_fn=trial_fn or pipeline_trial, tracking_uri=tracker.uri if tracker else None,
                 parent_run_id=tracker.run_id if tracker else None, log_trials=log_trials,
                 seed=cfg.run.seed, id_key=state["id_key"])
    rows: list[dict] = []
    try:
        if state["num_trials"] > 0:
            with data.ray_session(cfg, num_cpus=num_cpus):
                rows = _rows(_fit(cfg, spec, state["num_trials"]), cfg.tune.metric)
        summary = _summarize(cfg, state, rows)
        if mode == "public" and summary["best"] is not None:
            summary.update(_final_run(cfg, n, summary["best"]["params"], final_fn))
        _finish(cfg, summary, rows, tracker)
        echo(summary_text(summary))
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    return summary


def _plan_params(plan: dict) -> dict:
    keys = ("mode", "accountant", "epsilon", "trial_sigma", "single_sigma", "penalty", "score_noise")
    out = {f"sweep.{k}": plan.get(k) for k in keys if k in plan}
    out["sweep.trials"] = json.dumps(plan["trials"], sort_keys=True)
    return out


def _summarize(cfg: config_mod.Config, state: dict, rows: list[dict]) -> dict:
    plan = state["plan"]
    best = _best(rows, cfg.tune.metric)
    if best is not None:
        best = {**best, "dir": str(cfg.run_dir() / "trials" / best["trial_id"])}
    return {
        "name": cfg.run.name, "dir": str(cfg.run_dir()), "mode": plan["mode"], "epsilon": plan["epsilon"],
        "delta": plan["delta"],
        "accountant": plan["accountant"], "target_epsilon": plan["target_epsilon"],
        "metric": cfg.tune.metric, "num_trials": state["num_trials"], "seeded": state["seeded"],
        "best": best, "trials": rows, "plan": sweep_plan_json(plan),
    }


def _final_run(cfg: config_mod.Config, n: int, params: dict, final_fn: Optional[FinalFn]) -> dict:
    """Public mode: the best hyperparameters, one run on the sensitive data with the whole budget."""
    final_cfg = config_mod.replace(cfg, {**params, "run.dir": str(cfg.run_dir()), "run.name": "final"})
    with quiet_accountant():
        final_plan = privacy.plan(privacy.resolve(final_cfg, n), n)
    if final_fn is None:
        from dpfeta import pipeline

        final_fn = pipeline.run
    result = final_fn(final_cfg)
    return {"epsilon": final_plan.epsilon, "final": {"dir": str(final_cfg.run_dir()),
                                                    "sigma": final_plan.sigma, "result": result}}


NOTES = {
    "private": "only the selected trial (its central images, model, samples, hyperparameters and noisy score) is "
               "covered by epsilon (repeat-and-select over a random number of trials); the other trials, their "
               "scores, the number of trials and the selected trial's position are not released",
    "naive": "every trial's output is covered (k trials composed); this folder holds the selected trial's",
    "public": "the trials ran on a public proxy; epsilon is the final run's on the sensitive data",
}


def release_view(summary: dict) -> dict:
    """The selection facts a sweep releases: the selected trial's opaque id, hyperparameters, score
    and sigma (private: nothing about the other trials, nor K, nor the position)."""
    best = summary["best"]
    out = {"mode": summary["mode"], "metric": summary["metric"], "target_epsilon": summary["target_epsilon"],
           "selected": None if best is None else {"id": best["trial_id"], "params": best["params"],
                                                  "score": best["score"], "sigma": best["sigma"]},
           "note": NOTES[summary["mode"]] + ("" if best is not None or summary["mode"] == "public"
                                             else "; no trial finished, nothing is released")}
    if "final" in summary:
        out["final"] = {"sigma": summary["final"]["sigma"]}
    return out


def summary_text(summary: dict) -> str:
    """The operator's console summary. Private mode leaves K out (stdout ends up in Ray job logs)."""
    best = summary["best"]
    count = "" if summary["mode"] == "private" else f": {summary['num_trials']} trial(s) run"
    lines = [f"dpfeta tune '{summary['name']}' ({summary['mode']}){count}",
             f"  epsilon   {summary['epsilon']:.4f} for the release (target {summary['target_epsilon']:g}, "
             f"delta {summary['delta']:g}, {summary['accountant']}; the whole sweep, selection included)"]
    if best is None:
        lines.append("  selected  none (no trial finished): nothing is released")
    else:
        lines.append(f"  selected  {best['trial_id']}: {summary['metric']} {best['score']:.4f}, sigma "
                     f"{best['sigma']:.4f}, {json.dumps(best['params'], sort_keys=True)}")
    if "final" in summary:
        lines.append(f"  final     {summary['final']['dir']} (sigma {summary['final']['sigma']:.4f})")
    lines.append(f"  release   {Path(summary.get('dir', '.')) / 'release'} (what may be published; README.md is "
                 f"its card); {SUMMARY_FILE}, {TRIALS_FILE}: operator-internal")
    return "\n".join(lines)


def _release_ledger(summary: dict, state_plan: dict, cfg: config_mod.Config) -> privacy.Ledger:
    """The ledger the sweep's release states: the selected trial's (public mode: the final run's)."""
    where = Path(summary["final"]["dir"]) if "final" in summary else (
        Path(summary["best"]["dir"]) if summary["best"] is not None else None)
    if where is not None and (where / "ledger.json").is_file():
        return privacy.Ledger.load(where / "ledger.json")
    if where is not None and (where / "trial_ledger.json").is_file():
        return privacy.Ledger.from_state_dict(json.loads((where / "trial_ledger.json").read_text()))
    return privacy.Ledger(state_plan["accountant"], cfg.privacy.delta, 0, seeded=cfg.run.seed is not None)


def _publish_release(cfg: config_mod.Config, summary: dict, state_plan: dict) -> Path:
    """<sweep dir>/release/: the selected trial's (public: the final run's) outputs and the card."""
    from dpfeta import release

    sweep_dir, best = cfg.run_dir(), summary["best"]
    source = Path(summary["final"]["dir"]) if "final" in summary else (Path(best["dir"]) if best else None)
    if source is not None:
        for part in ("central", "model", "samples"):
            if (release.release_dir(source) / part).is_dir():
                release.put_dir(sweep_dir, release.release_dir(source) / part, part)
    ledger = _release_ledger(summary, state_plan, cfg)
    view = release_view(summary)
    metrics = {"epsilon": summary["epsilon"], "delta": summary["delta"], "accountant": summary["accountant"]}
    if best is not None:
        metrics[f"selected/{summary['metric']}"] = best["score"]
    facts = {"tuning mode": summary["mode"], "selection": json.dumps(view, sort_keys=True, default=str)}
    if summary["mode"] == "public":
        facts["proxy"] = (f"tune.proxy_data={json.dumps(cfg.tune.proxy_data, sort_keys=True)} "
                          "(declared public: tune.proxy_is_public)")
    else:
        facts["test split"] = "not used by the sweep (the selection score is on the validation split)"
    release.record(sweep_dir, kind="sweep", ledger=ledger, public_config=cfg.public_dict(), metrics=metrics,
                   extra_facts=facts, epsilon=summary["epsilon"], notes=[view["note"]])
    release.write_json(sweep_dir, release.SELECTION_FILE, view)
    return release.release_dir(sweep_dir)


def _finish(cfg: config_mod.Config, summary: dict, rows: list[dict], tracker) -> None:
    from dpfeta import tracking

    sweep_dir = cfg.run_dir()
    _write_trials_csv(rows, sweep_dir / TRIALS_FILE)
    state_plan = json.loads((sweep_dir / SWEEP_FILE).read_text())["plan"]
    root = _publish_release(cfg, summary, state_plan)
    tmp = sweep_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, sweep_dir / SUMMARY_FILE)
    best = summary["best"]
    log.info("sweep '%s' (%s): released epsilon %.4f (delta %g, %s); selected %s", summary["name"],
             summary["mode"], summary["epsilon"], summary["delta"], summary["accountant"],
             "none" if best is None else f"{best['trial_id']} score {best['score']:.4f} {best['params']}")
    if tracker is None:
        return
    tracker.log_dp_metrics({"epsilon": summary["epsilon"],
                            **({"selected/score": best["score"], "selected/sigma": best["sigma"]} if best else {})})
    tracker.log_artifact(root)  # release/... (the only artifacts in release mode)
    tracker.log_artifact(sweep_dir / SUMMARY_FILE)  # nondp/... (operator view), dropped in release mode
    tracker.log_artifact(sweep_dir / TRIALS_FILE)
    if best is not None:
        tracker.set_tags({"dpfeta.selected": best["trial_id"]})
        record = Path(best["dir"]) / tracking.RUN_FILE
        if summary["mode"] != "private" and record.is_file():
            best_run = tracking.Tracker(tracker.uri, json.loads(record.read_text())["run_id"], nondp=False)
            best_run.set_tags({"dpfeta.selected": "true"})
    final_record = Path(summary["final"]["dir"]) / tracking.RUN_FILE if "final" in summary else None
    if final_record is not None and final_record.is_file():  # public mode: nest the final run too
        final_run = tracking.Tracker(tracker.uri, json.loads(final_record.read_text())["run_id"], nondp=False)
        final_run.set_tags({"mlflow.parentRunId": tracker.run_id, "dpfeta.final": "true"})
    tracker.end("FINISHED")  # the handle: pipeline.run (public final run) replaces tracking's current run

