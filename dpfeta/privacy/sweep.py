"""Tuning accounting (docs/privacy.md, "Tuning"): what a sweep of trials on the sensitive data spends.

* ``private`` -- a *random* number of trials K (truncated negative binomial or Poisson; Papernot &
  Steinke, ICLR 2022), each M1 + M2 + M3, the best one released: ``RepeatAndSelectDpEvent``.
* ``naive`` -- k trials composed. ``public`` -- trials on a public proxy, the final run pays.

Per-trial sigma when the search space moves privacy parameters (central rounds, central noise, batch
sizes, epochs): the sweep plan builds a *reference trial* -- the worst central query over the space
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
this module imports nothing of Ray or of the sweep machinery.
"""

from __future__ import annotations

import dataclasses
import itertools
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
    smallest_sigma,
    tnb_gamma,
)
from dpfeta.privacy.events import NEIGHBOURING_RELATION, central_event, dpsgd_event, selection_event
from dpfeta.privacy.ledger import Ledger
from dpfeta.privacy.plan import Plan, dpsgd_steps, plan, plan_json, resolve

log = logging.getLogger(__name__)

CENTRAL_KEYS = ("central.rounds", "central.noise_multiplier", "central.batch_size")


DPSGD_KEYS = ("finetune.batch_size", "finetune.epochs")


PRIVACY_KEYS = CENTRAL_KEYS + DPSGD_KEYS


PLD_NOTE = (
    "privacy.accountant=pld: sweeps are accounted with RDP. dp_accounting 0.6.0's PLD accountant "
    "does not support RepeatAndSelectDpEvent (the Papernot-Steinke bound is an RDP result), and the "
    "per-trial calibration needs per-order RDP curve dominance"
)


def extremes(spec: dict) -> list:
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


@dataclass(frozen=True, kw_only=True)
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
        return central_event(noise_multiplier=self.sigma_c, sample_rate=self.q_c, rounds=self.rounds)

    def dpsgd(self, sigma: float):
        return dpsgd_event(noise_multiplier=sigma, sample_rate=self.q, steps=self.steps)


def trial_privacy(cfg: config_mod.Config, n: int) -> TrialPrivacy:
    c, f = cfg.central, cfg.finetune
    for key, b in (("central.batch_size", c.batch_size), ("finetune.batch_size", f.batch_size)):
        if b > n:
            raise ValueError(f"config key '{key}': expected an expected sample size <= N={n}, got {b!r}")
    q = f.batch_size / n
    if c.rounds > 0 and c.noise_multiplier is None:
        raise ValueError("central.noise_multiplier must be resolved (privacy.resolve) before planning")
    return TrialPrivacy(
        rounds=c.rounds,
        sigma_c=c.noise_multiplier if c.rounds else None,
        q_c=c.batch_size / n,
        q=q,
        steps=dpsgd_steps(epochs=f.epochs, sample_rate=q),
    )


def _worst_central(cfg: config_mod.Config, space: dict, n: int) -> TrialPrivacy:
    """The reference trial: the most expensive central query the space allows, base DP-SGD (q, T)."""
    base = trial_privacy(cfg, n)

    def values(key: str, default: Any) -> list:
        return extremes(space[key]) if key in space else [default]

    rounds = values("central.rounds", cfg.central.rounds)
    sigmas = values("central.noise_multiplier", cfg.central.noise_multiplier)
    batches = values("central.batch_size", cfg.central.batch_size)
    if max(batches) > n:
        raise ValueError(f"tune.search_space: central.batch_size reaches {max(batches)!r} > N={n}")
    for key in DPSGD_KEYS:
        if key == "finetune.batch_size" and key in space and max(extremes(space[key])) > n:
            raise ValueError(f"tune.search_space: finetune.batch_size reaches {max(extremes(space[key]))!r} > N={n}")
    worst = dataclasses.replace(
        base, rounds=int(max(rounds)), sigma_c=float(min(sigmas)) if max(rounds) > 0 else None, q_c=max(batches) / n
    )
    if worst.rounds > 0:  # sanity: the worst corner dominates every corner wherever both are finite
        ref = rdp_curve(worst.central(), INTEGER_RDP_ORDERS)
        for r, s, b in itertools.product(rounds, sigmas, batches):
            if r == 0:
                continue
            other = rdp_curve(central_event(noise_multiplier=s, sample_rate=b / n, rounds=r), INTEGER_RDP_ORDERS)
            both = np.isfinite(ref) & np.isfinite(other)
            if not np.all(other[both] <= ref[both] * (1 + 1e-9) + 1e-12):
                raise RuntimeError(
                    f"internal: the reference central query does not dominate rounds={r}, "
                    f"noise_multiplier={s}, batch_size={b}; refusing to plan the sweep"
                )
    return worst


def _privacy_keys_searched(cfg: config_mod.Config) -> list[str]:
    return sorted(k for k in cfg.tune.search_space if k in PRIVACY_KEYS)


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


def sweep_plan(cfg: config_mod.Config, n: int, space: dict) -> dict:
    """The privacy plan of a sweep, from public facts only (N, the config). JSON-able.

    Keys: mode, accountant (+ accountant_note), epsilon (the released model's total), delta,
    target_epsilon, trials (count or its distribution), trial_sigma (sigma* of the reference trial),
    single_sigma (sigma of one untuned run with the whole budget), penalty (their ratio),
    epsilon_per_trial (one reference trial alone), reference (its parameters and RDP curve).
    """
    with quiet_accountant():
        return _sweep_plan(cfg, n, space)


def _sweep_plan(cfg: config_mod.Config, n: int, space: dict) -> dict:
    cfg = resolve(cfg, n)
    p, t = cfg.privacy, cfg.tune
    if p.noise_multiplier is not None:
        raise ValueError(
            "config key 'privacy.noise_multiplier': expected null in a sweep (each "
            f"trial's sigma is calibrated from the total budget), got {p.noise_multiplier!r}"
        )
    # The untuned run for comparison; tuned sweeps are always accounted with RDP, so compare in RDP.
    single = plan(cfg if t.privacy_mode == "public" else config_mod.replace(cfg, {"privacy.accountant": "rdp"}), n)
    out: dict[str, Any] = {
        "mode": t.privacy_mode,
        "target_epsilon": p.epsilon,
        "delta": p.delta,
        "n": n,
        "single_sigma": single.noise_multiplier,
        "search_space": space,
        "neighbouring_relation": NEIGHBOURING_RELATION,
    }
    if t.privacy_mode == "public":
        out.update(
            accountant=single.accountant,
            epsilon=single.epsilon,
            trial_sigma=None,
            penalty=1.0,
            trials={"count": t.num_trials},
            tuning_cost=0.0,
            final=plan_json(single),
            note="trials run on the public proxy tune.proxy_data; the final run on the "
            "sensitive data carries the whole budget",
        )
        return out
    accountant, note = "rdp", None
    if p.accountant == "pld":
        note = PLD_NOTE
        log.warning("sweep accounted with RDP, not PLD: %s", note)
    ref = _worst_central(cfg, space, n)
    selection = selection_event(noise_multiplier=t.score_noise)
    sharing = central_sharing(cfg, space)
    # once: what runs once for the whole sweep (the shared central query); fixed: each trial's own
    once = [ref.central()] if sharing == "shared" else []
    fixed = [e for e in ((ref.central() if sharing == "per_trial" else None), selection) if e is not None]
    private = t.privacy_mode == "private"
    if private:
        mean, shape = trial_distribution(cfg)
        trials = {"distribution": t.trial_distribution, "mean": mean, "shape": "inf" if math.isinf(shape) else shape}
        if not math.isinf(shape):
            trials["gamma"] = tnb_gamma(mean, shape)
    else:
        k = t.num_trials
        trials = {"count": k}

    def total_event(sigma: float):
        inner = dp_event.ComposedDpEvent(fixed + [ref.dpsgd(sigma)])
        trials_event = (
            dp_event.RepeatAndSelectDpEvent(inner, mean, shape) if private else dp_event.SelfComposedDpEvent(inner, k)
        )
        return dp_event.ComposedDpEvent(once + [trials_event]) if once else trials_event

    def totalrdp_curve(sigma: float, orders: tuple) -> np.ndarray:
        base = sum(rdp_curve(e, orders) for e in fixed) + rdp_curve(ref.dpsgd(sigma), orders)
        once_curve = sum((rdp_curve(e, orders) for e in once), np.zeros(len(orders)))
        return once_curve + (repeat_curve(base, mean, shape, orders) if private else k * base)

    def eps_on(orders: tuple) -> Callable[[float], float]:
        return lambda sigma: curve_epsilon(totalrdp_curve(sigma, orders), p.delta, orders)

    floor = eps_on(DEFAULT_RDP_ORDERS)(1e6)
    if floor >= p.epsilon:
        where = {"shared": "once, before the trials", "per_trial": "in every trial"}.get(sharing, "")
        raise ValueError(
            f"the central query (rounds={ref.rounds}, sigma_c={ref.sigma_c}, q_c={ref.q_c:.4g}"
            f"{'; ' + where if where else ''}) and the "
            f"selection score (tune.score_noise={t.score_noise:g}) alone spend epsilon={floor:.4g} over "
            f"the sweep ({t.privacy_mode}, {trials}), not below privacy.epsilon={p.epsilon:g}: raise "
            "tune.score_noise or central noise, use fewer rounds or trials, or tune on public data"
        )
    # Search on the cheap integer orders (a subset only raises epsilon: an upper bound), then refine
    # on the whole grid from there; the trials are checked against the reference on the same grid.
    rough = search_sigma(eps_on(INTEGER_RDP_ORDERS), p.epsilon, rtol=1e-3, start=single.noise_multiplier, step=2.0)
    orders = DEFAULT_RDP_ORDERS
    sigma = search_sigma(eps_on(orders), p.epsilon, rtol=p.calibration_rtol, start=rough, step=1.02)
    epsilon = epsilon_of(total_event(sigma), delta=p.delta, accountant=accountant, orders=orders)
    while epsilon > p.epsilon:  # the accountant itself has the last word: never above the target
        sigma *= 1.0 + p.calibration_rtol
        epsilon = epsilon_of(total_event(sigma), delta=p.delta, accountant=accountant, orders=orders)
    reference = dp_event.ComposedDpEvent(fixed + [ref.dpsgd(sigma)])  # one trial's own mechanisms
    out.update(
        accountant=accountant,
        epsilon=epsilon,
        trials=trials,
        trial_sigma=sigma,
        penalty=sigma / single.noise_multiplier,
        score_noise=t.score_noise,
        central=sharing,
        epsilon_per_trial=epsilon_of(
            dp_event.ComposedDpEvent(once + [reference]), delta=p.delta, accountant=accountant
        ),
        reference={
            **dataclasses.asdict(ref),
            "sigma": sigma,
            "orders": list(orders),
            "rdp": [float(x) for x in rdp_curve(reference, orders)],
        },
        privacy_keys_searched=_privacy_keys_searched(cfg),
    )
    if once:
        out["shared_central"] = {
            "rounds": ref.rounds,
            "sigma_c": ref.sigma_c,
            "q_c": ref.q_c,
            "epsilon": epsilon_of(once[0], delta=p.delta, accountant=accountant),
        }
    if note:
        out["accountant_note"] = note
    return out


def trial_sigma(sp: dict, cfg: config_mod.Config, n: int) -> float:
    """The trial's own sigma: the smallest whose RDP curve stays under the sweep's reference curve.

    ``cfg`` is the trial's resolved config (search-space values applied). Public mode: the single-run
    calibration on the proxy's N.
    """
    if sp["mode"] == "public":
        return plan(config_mod.replace(cfg, {"privacy.noise_multiplier": None}), n).noise_multiplier
    ref = sp["reference"]
    mine = trial_privacy(cfg, n)
    worst = TrialPrivacy(rounds=ref["rounds"], sigma_c=ref["sigma_c"], q_c=ref["q_c"], q=ref["q"], steps=ref["steps"])
    if mine == worst:
        return float(ref["sigma"])
    orders = tuple(float(o) for o in ref["orders"])
    with quiet_accountant():
        bound = np.asarray(ref["rdp"], dtype=np.float64)
        fixed = rdp_curve(selection_event(noise_multiplier=sp["score_noise"]), orders)
        if mine.rounds and sp.get("central", "per_trial") == "per_trial":  # shared: outside the curve
            # By monotonicity in (rounds, 1/sigma_c, q_c) the worst central curve bounds ours too;
            # the minimum keeps orders where the accountant gave up on our parameters usable.
            own = rdp_curve(mine.central(), orders)
            fixed = fixed + (np.minimum(own, rdp_curve(worst.central(), orders)) if worst.rounds else own)

        def ok_on(subset: np.ndarray) -> Callable[[float], bool]:
            sub = tuple(np.asarray(orders)[subset])
            return lambda sigma: bool(np.all(fixed[subset] + rdp_curve(mine.dpsgd(sigma), sub) <= bound[subset]))

        # Integer orders first (cheap curves): a lower bound; then all of the sweep's orders.
        hi = float(ref["sigma"])
        integer = np.array([float(o).is_integer() for o in orders])
        ok_all = ok_on(np.ones(len(orders), dtype=bool))
        rough = smallest_sigma(ok_on(integer), rtol=1e-4, hi=hi if ok_on(integer)(hi) else None)
        if ok_all(rough):
            return rough
        return smallest_sigma(ok_all, rtol=1e-4, hi=hi if ok_all(hi) else None, lo=rough)


def trial_plan(sp: dict, cfg: config_mod.Config, n: int, sigma: float) -> Plan:
    """The plan of one trial: its ledger has M1, M2 and (private, naive) M3; private wraps it in repeat.

    ``epsilon`` is what the sweep would spend if every trial were this one (private: the
    Papernot-Steinke bound on this trial's curve; naive: k times this trial), at most the total.
    """
    if sp["mode"] == "public":
        fixed_cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": sigma})
        with quiet_accountant():
            return plan(fixed_cfg, n)
    tp = trial_privacy(cfg, n)
    ledger = Ledger(accountant=sp["accountant"], delta=cfg.privacy.delta, n=n, seeded=cfg.run.seed is not None)
    shared = sp.get("central") == "shared"
    if tp.rounds:  # shared: the sweep's query, run (and taken) before any trial started
        ledger.add(
            "central",
            noise_multiplier=tp.sigma_c,
            sample_rate=tp.q_c,
            count=tp.rounds,
            shared=shared,
            taken=tp.rounds if shared else 0,
        )
    ledger.add("dpsgd", noise_multiplier=sigma, sample_rate=tp.q, count=tp.steps)
    ledger.add("selection", noise_multiplier=sp["score_noise"], kind="gaussian", count=1)
    trials = sp["trials"]
    if sp["mode"] == "private":
        ledger.repeat = {
            "mean": trials["mean"],
            "shape": math.inf if trials["shape"] == "inf" else float(trials["shape"]),
        }
    orders = tuple(float(o) for o in sp["reference"]["orders"])
    with quiet_accountant():  # the sweep's grid and cached curves (the ledger's own epsilon is slower)
        base = sum(rdp_curve(m.event(m.planned), orders) for m in ledger.mechanisms if not m.shared)
        once = sum(
            (rdp_curve(m.event(m.planned), orders) for m in ledger.mechanisms if m.shared), np.zeros(len(orders))
        )
        total = once + (
            repeat_curve(base, trials["mean"], ledger.repeat["shape"], orders)
            if sp["mode"] == "private"
            else trials["count"] * base
        )
        epsilon = curve_epsilon(total, cfg.privacy.delta, orders)
    return Plan(
        noise_multiplier=sigma,
        sample_rate=tp.q,
        steps=tp.steps,
        central_rate=tp.q_c,
        ledger=ledger,
        epsilon=epsilon,
        target_epsilon=sp["target_epsilon"],
        delta=cfg.privacy.delta,
        accountant=sp["accountant"],
        n=n,
        expected_batch=cfg.finetune.batch_size,
    )


def sweep_plan_table(sp: dict) -> str:
    """Human-readable sweep plan (``dpfeta budget --sweep``)."""
    rows = [f"tuning mode        {sp['mode']}   trials {json.dumps(sp['trials'])}"]
    if sp["mode"] == "public":
        rows += [
            f"released model     epsilon {sp['epsilon']:.4f} (target {sp['target_epsilon']:g}, "
            f"delta {sp['delta']:g}, {sp['accountant']}); the sweep on the proxy costs 0",
            f"final run sigma    {sp['single_sigma']:.4f}",
        ]
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
    if sp.get("shared_central"):
        sc = sp["shared_central"]
        rows.append(
            f"central images     shared: one query before the trials (epsilon {sc['epsilon']:.4f} alone), "
            "read by every trial, outside the repeat"
        )
    elif sp.get("central") == "per_trial":
        rows.append("central images     per trial: each trial runs its own query, inside the repeat")
    if sp.get("privacy_keys_searched"):
        rows.append(
            f"searched privacy   {', '.join(sp['privacy_keys_searched'])}: each trial takes the "
            "smallest sigma whose RDP curve stays under the reference trial's"
        )
    if sp.get("accountant_note"):
        rows.append(f"note               {sp['accountant_note']}")
    return "\n".join(rows)


def sweep_plan_json(plan: dict) -> dict:
    """The sweep plan without the reference RDP curve (for people, JSON output and MLflow)."""
    return {k: v for k, v in plan.items() if k != "reference"} | (
        {"reference": {k: v for k, v in plan["reference"].items() if k not in ("rdp", "orders")}}
        if "reference" in plan
        else {}
    )


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
