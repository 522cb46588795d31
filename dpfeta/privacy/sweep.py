"""Tuning accounting (docs/privacy.md, "Tuning"): what a sweep of trials on the sensitive data spends.

* ``private`` -- a *random* number of trials K (truncated negative binomial or Poisson; Papernot &
  Steinke, ICLR 2022), each M1 + M2 + M3, the best one released: ``RepeatAndSelectDpEvent``.
* ``naive`` -- k trials composed. ``public`` -- trials on a public proxy, the final run pays.

Per-trial noise multiplier (sigma) when the search space moves privacy parameters (central rounds,
central noise, batch sizes, epochs): the sweep plan builds a *reference trial* -- the worst central query over the space
(most rounds, least noise, largest sample rate) plus DP-SGD at the base config's (q, T) with sigma*
plus M3 -- and calibrates sigma* so the reference meets the total. Each trial then takes the smallest
sigma whose RDP curve (central + DP-SGD + selection, at every order) lies under the reference curve.
By joint quasi-convexity of the Renyi divergence a trial that draws its hyperparameters at random is
then dominated by the reference at every order, so the Papernot-Steinke bound computed on the
reference covers the sweep.

Shared central images (``tune.central``: ``shared``, or ``auto`` when no central key is searched):
the sweep runs M1 once, before any trial, and every trial warms up on those images. The sweep is
then M1 composed with the repeat-and-select (or k-fold composition) of M2 + M3 alone: adaptive
composition of RDP, since every trial's (M2 + M3) has the same curve whatever M1 released. The
central query no longer sits inside the repeat, where the Papernot-Steinke bound charges it again
(it never costs more than the per-trial plan, and at a small epsilon it is what makes a sweep fit).
RDP is required (dp_accounting's PLD accountant supports neither
RepeatAndSelectDpEvent nor curve dominance). The search space arrives validated (``tune.space``);
this module imports nothing of Ray or of the sweep machinery. The plan is a ``SweepPlan``; its
``to_dict()`` is what ``sweep.json`` and ``dpfeta budget --sweep --json`` hold (their keys keep the
symbols: ``trial_sigma``, ``single_sigma``, ``sigma_c``). K and the score: ``privacy.repeat``; the
reference trial and each trial's noise multiplier and plan: ``privacy.trial``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from dp_accounting import dp_event

from dpfeta import config as config_mod
from dpfeta.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    INTEGER_RDP_ORDERS,
    curve_epsilon,
    epsilon_of,
    quiet_accountant,
    rdp_curve,
    repeat_curve,
    search_sigma,
    tnb_gamma,
)
from dpfeta.privacy.events import NEIGHBOURING_RELATION, selection_event
from dpfeta.privacy.plan import plan, plan_json, resolve
from dpfeta.privacy.repeat import trial_distribution
from dpfeta.privacy.trial import PRIVACY_KEYS, Reference, TrialPrivacy, reference_trial

log = logging.getLogger(__name__)

PLD_NOTE = (
    "privacy.accountant=pld: sweeps are accounted with RDP. dp_accounting 0.6.0's PLD accountant "
    "does not support RepeatAndSelectDpEvent (the Papernot-Steinke bound is an RDP result), and the "
    "per-trial calibration needs per-order RDP curve dominance"
)


CENTRAL_MODES = ("auto", "shared", "per_trial")


def central_sharing(cfg: config_mod.Config, space: dict) -> str:
    """How a sweep's trials get their central images: ``shared`` (one query by the sweep, before the
    trials), ``per_trial`` (each trial its own, inside the repeat), or ``none`` (no central query, or
    public mode, whose trials run on the proxy). ``tune.central: auto`` shares unless a central.* key
    is searched; ``shared`` with a central.* key searched is refused (one query cannot have several
    parameters)."""
    mode = cfg.tune.central
    if mode not in CENTRAL_MODES:
        raise ValueError(f"config key 'tune.central': expected one of {', '.join(CENTRAL_MODES)}, got {mode!r}")
    if cfg.tune.privacy_mode == "public":
        return "none"
    searched = sorted(k for k in space if k.startswith("central."))
    if mode == "shared" and searched:
        raise ValueError(
            f"config key 'tune.central': shared central images (one query before the trials) "
            f"cannot follow a searched {', '.join(searched)}; set tune.central=per_trial or leave "
            "central.* out of tune.search_space"
        )
    if cfg.central.rounds == 0 and "central.rounds" not in searched:
        return "none"
    if mode == "per_trial" or searched:
        return "per_trial"
    return "shared"


@dataclass(frozen=True, kw_only=True)
class SharedCentral:
    """The central query the sweep runs once, before its trials (``tune.central`` shared), and its epsilon alone."""

    rounds: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "sigma_c": self.noise_multiplier,
            "q_c": self.sample_rate,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SharedCentral:
        return cls(rounds=d["rounds"], noise_multiplier=d["sigma_c"], sample_rate=d["q_c"], epsilon=d["epsilon"])


# The published keys (sweep.json, summary.json, `dpfeta budget --sweep --json`), in their order; a
# field's name where it differs from its key.
_HEAD = ("mode", "target_epsilon", "delta", "n", "single_sigma", "search_space", "neighbouring_relation")
_HEAD += ("accountant", "epsilon")
_PUBLIC_KEYS = _HEAD + ("trial_sigma", "penalty", "trials", "tuning_cost", "final", "note")
_TUNED_KEYS = _HEAD + ("trials", "trial_sigma", "penalty", "score_noise", "central", "epsilon_per_trial")
_TUNED_KEYS += ("reference", "privacy_keys_searched", "shared_central", "accountant_note")
_FIELDS = {"single_sigma": "single_noise_multiplier", "trial_sigma": "trial_noise_multiplier"}


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    """The privacy plan of a sweep, from public facts only (N, the config).

    ``epsilon`` is the released model's total; ``trials`` the count (naive, public) or K's
    distribution (private: distribution, mean, shape, gamma); ``trial_noise_multiplier`` the
    reference trial's (None in public mode), ``single_noise_multiplier`` that of one untuned run with
    the whole budget, ``penalty`` their ratio; ``epsilon_per_trial`` one reference trial alone.
    Public mode fills ``tuning_cost``, ``final`` and ``note``; private and naive the rest. A field a
    plan stored by an older version lacks is None (and left out of ``to_dict()``).
    """

    mode: str
    target_epsilon: float
    delta: float
    accountant: str
    epsilon: float
    trials: dict
    single_noise_multiplier: float
    trial_noise_multiplier: Optional[float]
    penalty: float
    n: Optional[int] = None
    search_space: Optional[dict] = None
    neighbouring_relation: Optional[str] = None
    tuning_cost: Optional[float] = None
    final: Optional[dict] = None
    note: Optional[str] = None
    score_noise: Optional[float] = None
    central: Optional[str] = None  # shared, per_trial or none (None: stored before sharing, per trial)
    epsilon_per_trial: Optional[float] = None
    reference: Optional[Reference] = None
    privacy_keys_searched: Optional[list] = None
    shared_central: Optional[SharedCentral] = None
    accountant_note: Optional[str] = None

    def to_dict(self) -> dict:
        """The JSON-able plan, key for key and in order what ``sweep.json`` has always held."""
        out: dict[str, Any] = {}
        for key in _PUBLIC_KEYS if self.mode == "public" else _TUNED_KEYS:
            value = getattr(self, _FIELDS.get(key, key))
            if value is not None or key == "trial_sigma":
                out[key] = value.to_dict() if isinstance(value, (Reference, SharedCentral)) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> SweepPlan:
        """A stored plan (``sweep.json``'s ``plan``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {_FIELDS.get(k, k): v for k, v in d.items() if _FIELDS.get(k, k) in names}
        if kw.get("reference") is not None:
            kw["reference"] = Reference.from_dict(kw["reference"])
        if kw.get("shared_central") is not None:
            kw["shared_central"] = SharedCentral.from_dict(kw["shared_central"])
        return cls(**kw)

    def repeat(self) -> tuple[float, float]:
        """``(mean, shape)`` of a private sweep's random trial count K (shape inf: Poisson)."""
        shape = self.trials["shape"]
        return self.trials["mean"], math.inf if shape == "inf" else float(shape)


@dataclass(frozen=True)
class _Sweep:
    """A tuned sweep's mechanisms as a function of the trials' noise multiplier: ``once`` (the shared
    central query), each trial's ``fixed`` ones (its central query, the score) and DP-SGD at the
    reference trial's (q, T), repeated (``repeat``: K's mean and shape) or composed ``k`` times."""

    ref: TrialPrivacy
    once: list
    fixed: list
    repeat: Optional[tuple[float, float]]
    k: int = 0

    def event(self, noise_multiplier: float):
        inner = dp_event.ComposedDpEvent(self.fixed + [self.ref.dpsgd(noise_multiplier)])
        trials = (
            dp_event.RepeatAndSelectDpEvent(inner, *self.repeat)
            if self.repeat
            else dp_event.SelfComposedDpEvent(inner, self.k)
        )
        return dp_event.ComposedDpEvent(self.once + [trials]) if self.once else trials

    def rdp_curve(self, noise_multiplier: float, orders: tuple) -> np.ndarray:
        base = sum(rdp_curve(e, orders) for e in self.fixed) + rdp_curve(self.ref.dpsgd(noise_multiplier), orders)
        once_curve = sum((rdp_curve(e, orders) for e in self.once), np.zeros(len(orders)))
        return once_curve + (repeat_curve(base, *self.repeat, orders) if self.repeat else self.k * base)

    def epsilon_on(self, orders: tuple, delta: float) -> Callable[[float], float]:
        return lambda noise_multiplier: curve_epsilon(self.rdp_curve(noise_multiplier, orders), delta, orders)


def sweep_plan(cfg: config_mod.Config, n: int, space: dict) -> SweepPlan:
    """The privacy plan of a sweep, from public facts only (N, the config); ``.to_dict()`` is JSON-able."""
    with quiet_accountant():
        return _sweep_plan(cfg, n, space)


def _trials(cfg: config_mod.Config) -> tuple[dict, Optional[tuple[float, float]]]:
    """The published ``trials`` and K's (mean, shape) for the accounting (None: k trials composed)."""
    t = cfg.tune
    if t.privacy_mode != "private":
        return {"count": t.num_trials}, None
    mean, shape = trial_distribution(cfg)
    trials = {"distribution": t.trial_distribution, "mean": mean, "shape": "inf" if math.isinf(shape) else shape}
    if not math.isinf(shape):
        trials["gamma"] = tnb_gamma(mean, shape)
    return trials, (mean, shape)


def _sweep_plan(cfg: config_mod.Config, n: int, space: dict) -> SweepPlan:
    cfg = resolve(cfg, n)
    p, t = cfg.privacy, cfg.tune
    if p.noise_multiplier is not None:
        raise ValueError(
            "config key 'privacy.noise_multiplier': expected null in a sweep (each "
            f"trial's sigma is calibrated from the total budget), got {p.noise_multiplier!r}"
        )
    # The untuned run for comparison; tuned sweeps are always accounted with RDP, so compare in RDP.
    single = plan(cfg if t.privacy_mode == "public" else config_mod.replace(cfg, {"privacy.accountant": "rdp"}), n)
    facts: dict[str, Any] = dict(
        mode=t.privacy_mode,
        target_epsilon=p.epsilon,
        delta=p.delta,
        n=n,
        single_noise_multiplier=single.noise_multiplier,
        search_space=space,
        neighbouring_relation=NEIGHBOURING_RELATION,
    )
    if t.privacy_mode == "public":
        note = (
            "trials run on the public proxy tune.proxy_data; the final run on the sensitive data carries "
            "the whole budget"
        )
        return SweepPlan(
            **facts,
            accountant=single.accountant,
            epsilon=single.epsilon,
            trial_noise_multiplier=None,
            penalty=1.0,
            trials={"count": t.num_trials},
            tuning_cost=0.0,
            final=plan_json(single),
            note=note,
        )
    accountant, note = "rdp", None
    if p.accountant == "pld":
        note = PLD_NOTE
        log.warning("sweep accounted with RDP, not PLD: %s", note)
    ref = reference_trial(cfg, space, n)
    sharing = central_sharing(cfg, space)
    # once: what runs once for the whole sweep (the shared central query); fixed: each trial's own
    once = [ref.central()] if sharing == "shared" else []
    own_central = ref.central() if sharing == "per_trial" else None
    fixed = [e for e in (own_central, selection_event(noise_multiplier=t.score_noise)) if e is not None]
    trials, repeat = _trials(cfg)
    sweep = _Sweep(ref, once, fixed, repeat, t.num_trials)
    floor = sweep.epsilon_on(DEFAULT_RDP_ORDERS, p.delta)(1e6)
    if floor >= p.epsilon:
        where = {"shared": "once, before the trials", "per_trial": "in every trial"}.get(sharing, "")
        raise ValueError(
            f"the central query (rounds={ref.rounds}, sigma_c={ref.central_noise_multiplier}, "
            f"q_c={ref.central_rate:.4g}{'; ' + where if where else ''}) and the "
            f"selection score (tune.score_noise={t.score_noise:g}) alone spend epsilon={floor:.4g} over "
            f"the sweep ({t.privacy_mode}, {trials}), not below privacy.epsilon={p.epsilon:g}: raise "
            "tune.score_noise or central noise, use fewer rounds or trials, or tune on public data"
        )
    # Search on the cheap integer orders (a subset only raises epsilon: an upper bound), then refine
    # on the whole grid from there; the trials are checked against the reference on the same grid.
    start = single.noise_multiplier
    rough = search_sigma(sweep.epsilon_on(INTEGER_RDP_ORDERS, p.delta), p.epsilon, rtol=1e-3, start=start, step=2.0)
    orders = DEFAULT_RDP_ORDERS
    noise = search_sigma(sweep.epsilon_on(orders, p.delta), p.epsilon, rtol=p.calibration_rtol, start=rough, step=1.02)
    epsilon = epsilon_of(sweep.event(noise), delta=p.delta, accountant=accountant, orders=orders)
    while epsilon > p.epsilon:  # the accountant itself has the last word: never above the target
        noise *= 1.0 + p.calibration_rtol
        epsilon = epsilon_of(sweep.event(noise), delta=p.delta, accountant=accountant, orders=orders)
    reference = dp_event.ComposedDpEvent(fixed + [ref.dpsgd(noise)])  # one trial's own mechanisms
    per_trial = epsilon_of(dp_event.ComposedDpEvent(once + [reference]), delta=p.delta, accountant=accountant)
    rdp = tuple(float(x) for x in rdp_curve(reference, orders))
    shared = None
    if once:
        shared_epsilon = epsilon_of(once[0], delta=p.delta, accountant=accountant)
        shared = SharedCentral(
            rounds=ref.rounds,
            noise_multiplier=ref.central_noise_multiplier,
            sample_rate=ref.central_rate,
            epsilon=shared_epsilon,
        )
    return SweepPlan(
        **facts,
        accountant=accountant,
        epsilon=epsilon,
        trials=trials,
        trial_noise_multiplier=noise,
        penalty=noise / single.noise_multiplier,
        score_noise=t.score_noise,
        central=sharing,
        epsilon_per_trial=per_trial,
        reference=Reference(trial=ref, noise_multiplier=noise, orders=orders, rdp=rdp),
        privacy_keys_searched=sorted(k for k in t.search_space if k in PRIVACY_KEYS),
        shared_central=shared,
        accountant_note=note,
    )


def sweep_plan_table(sp: SweepPlan) -> str:
    """Human-readable sweep plan (``dpfeta budget --sweep``)."""
    rows = [f"tuning mode        {sp.mode}   trials {json.dumps(sp.trials)}"]
    if sp.mode == "public":
        rows += [
            f"released model     epsilon {sp.epsilon:.4f} (target {sp.target_epsilon:g}, "
            f"delta {sp.delta:g}, {sp.accountant}); the sweep on the proxy costs 0",
            f"final run sigma    {sp.single_noise_multiplier:.4f}",
        ]
        return "\n".join(rows)
    ref = sp.reference.trial
    rows += [
        f"released model     epsilon {sp.epsilon:.4f} (target {sp.target_epsilon:g}, delta "
        f"{sp.delta:g}, {sp.accountant}) -- the whole sweep, selection included",
        f"per-trial sigma    {sp.trial_noise_multiplier:.4f}  (single untuned run: {sp.single_noise_multiplier:.4f}; "
        f"penalty x{sp.penalty:.2f})",
        f"one trial alone    epsilon {sp.epsilon_per_trial:.4f}",
        f"reference trial    central rounds={ref.rounds} sigma_c={ref.central_noise_multiplier} "
        f"q_c={ref.central_rate:.4g}; DP-SGD q={ref.sample_rate:.4g} T={ref.steps}; "
        f"score noise sigma_v={sp.score_noise:g}",
    ]
    if sp.shared_central:
        rows.append(
            f"central images     shared: one query before the trials (epsilon {sp.shared_central.epsilon:.4f} alone), "
            "read by every trial, outside the repeat"
        )
    elif sp.central == "per_trial":
        rows.append("central images     per trial: each trial runs its own query, inside the repeat")
    if sp.privacy_keys_searched:
        rows.append(
            f"searched privacy   {', '.join(sp.privacy_keys_searched)}: each trial takes the "
            "smallest sigma whose RDP curve stays under the reference trial's"
        )
    if sp.accountant_note:
        rows.append(f"note               {sp.accountant_note}")
    return "\n".join(rows)


def sweep_plan_json(sp: SweepPlan) -> dict:
    """The sweep plan without the reference RDP curve (for people, JSON output and MLflow)."""
    plan = sp.to_dict()
    return {k: v for k, v in plan.items() if k != "reference"} | (
        {"reference": {k: v for k, v in plan["reference"].items() if k not in ("rdp", "orders")}}
        if "reference" in plan
        else {}
    )
