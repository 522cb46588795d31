"""A sweep trial's privacy (docs/privacy.md, "Tuning"): the parameters its RDP curve depends on, the
reference trial a search space allows (the worst central query, base DP-SGD), and each trial's own
noise multiplier and plan under the sweep's reference curve (``privacy.sweep`` makes the reference)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from dpfeta import config as config_mod
from dpfeta.privacy.accounting import (
    INTEGER_RDP_ORDERS,
    curve_epsilon,
    quiet_accountant,
    rdp_curve,
    repeat_curve,
    smallest_sigma,
)
from dpfeta.privacy.events import central_event, dpsgd_event, selection_event
from dpfeta.privacy.ledger import Ledger
from dpfeta.privacy.plan import Plan, dpsgd_steps, plan

if TYPE_CHECKING:
    from dpfeta.privacy.sweep import SweepPlan

CENTRAL_KEYS = ("central.rounds", "central.noise_multiplier", "central.batch_size")


DPSGD_KEYS = ("finetune.batch_size", "finetune.epochs")


PRIVACY_KEYS = CENTRAL_KEYS + DPSGD_KEYS


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


@dataclass(frozen=True, kw_only=True)
class TrialPrivacy:
    """The privacy-relevant parameters of one trial (what its RDP curve depends on)."""

    rounds: int
    central_noise_multiplier: Optional[float]
    central_rate: float
    sample_rate: float
    steps: int

    def central(self):
        if self.rounds == 0:
            return None
        return central_event(
            noise_multiplier=self.central_noise_multiplier, sample_rate=self.central_rate, rounds=self.rounds
        )

    def dpsgd(self, noise_multiplier: float):
        return dpsgd_event(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


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
        central_noise_multiplier=c.noise_multiplier if c.rounds else None,
        central_rate=c.batch_size / n,
        sample_rate=q,
        steps=dpsgd_steps(epochs=f.epochs, sample_rate=q),
    )


def reference_trial(cfg: config_mod.Config, space: dict, n: int) -> TrialPrivacy:
    """The reference trial: the most expensive central query the space allows, base DP-SGD (q, T)."""
    base = trial_privacy(cfg, n)

    def values(key: str, default: Any) -> list:
        return extremes(space[key]) if key in space else [default]

    rounds = values("central.rounds", cfg.central.rounds)
    noises = values("central.noise_multiplier", cfg.central.noise_multiplier)
    batches = values("central.batch_size", cfg.central.batch_size)
    if max(batches) > n:
        raise ValueError(f"tune.search_space: central.batch_size reaches {max(batches)!r} > N={n}")
    for key in DPSGD_KEYS:
        if key == "finetune.batch_size" and key in space and max(extremes(space[key])) > n:
            raise ValueError(f"tune.search_space: finetune.batch_size reaches {max(extremes(space[key]))!r} > N={n}")
    worst = dataclasses.replace(
        base,
        rounds=int(max(rounds)),
        central_noise_multiplier=float(min(noises)) if max(rounds) > 0 else None,
        central_rate=max(batches) / n,
    )
    if worst.rounds > 0:  # sanity: the worst corner dominates every corner wherever both are finite
        ref = rdp_curve(worst.central(), INTEGER_RDP_ORDERS)
        for r, s, b in itertools.product(rounds, noises, batches):
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


@dataclass(frozen=True, kw_only=True)
class Reference:
    """The reference trial (``reference_trial``) at the sweep's noise multiplier, and its
    RDP curve (one trial's own mechanisms) on the sweep's orders: every trial's curve stays under it."""

    trial: TrialPrivacy
    noise_multiplier: float
    orders: tuple
    rdp: tuple

    def to_dict(self) -> dict:
        t = self.trial
        return {
            "rounds": t.rounds,
            "sigma_c": t.central_noise_multiplier,
            "q_c": t.central_rate,
            "q": t.sample_rate,
            "steps": t.steps,
            "sigma": self.noise_multiplier,
            "orders": list(self.orders),
            "rdp": list(self.rdp),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Reference:
        trial = TrialPrivacy(
            rounds=d["rounds"],
            central_noise_multiplier=d["sigma_c"],
            central_rate=d["q_c"],
            sample_rate=d["q"],
            steps=d["steps"],
        )
        return cls(trial=trial, noise_multiplier=d["sigma"], orders=tuple(d["orders"]), rdp=tuple(d["rdp"]))


def trial_noise_multiplier(sp: SweepPlan, cfg: config_mod.Config, n: int) -> float:
    """The trial's own noise multiplier: the smallest whose RDP curve stays under the sweep's reference curve.

    ``cfg`` is the trial's resolved config (search-space values applied). Public mode: the single-run
    calibration on the proxy's N.
    """
    if sp.mode == "public":
        return plan(config_mod.replace(cfg, {"privacy.noise_multiplier": None}), n).noise_multiplier
    ref = sp.reference
    mine, worst = trial_privacy(cfg, n), ref.trial
    if mine == worst:
        return float(ref.noise_multiplier)
    orders = tuple(float(o) for o in ref.orders)
    with quiet_accountant():
        bound = np.asarray(ref.rdp, dtype=np.float64)
        fixed = rdp_curve(selection_event(noise_multiplier=sp.score_noise), orders)
        if mine.rounds and sp.central in (None, "per_trial"):  # shared: outside the curve
            # By monotonicity in (rounds, 1/sigma_c, q_c) the worst central curve bounds ours too;
            # the minimum keeps orders where the accountant gave up on our parameters usable.
            own = rdp_curve(mine.central(), orders)
            fixed = fixed + (np.minimum(own, rdp_curve(worst.central(), orders)) if worst.rounds else own)

        def ok_on(subset: np.ndarray) -> Callable[[float], bool]:
            sub = tuple(np.asarray(orders)[subset])
            return lambda noise: bool(np.all(fixed[subset] + rdp_curve(mine.dpsgd(noise), sub) <= bound[subset]))

        # Integer orders first (cheap curves): a lower bound; then all of the sweep's orders.
        hi = float(ref.noise_multiplier)
        integer = np.array([float(o).is_integer() for o in orders])
        ok_all = ok_on(np.ones(len(orders), dtype=bool))
        rough = smallest_sigma(ok_on(integer), rtol=1e-4, hi=hi if ok_on(integer)(hi) else None)
        if ok_all(rough):
            return rough
        return smallest_sigma(ok_all, rtol=1e-4, hi=hi if ok_all(hi) else None, lo=rough)


def trial_plan(sp: SweepPlan, cfg: config_mod.Config, n: int, noise_multiplier: float) -> Plan:
    """The plan of one trial: its ledger has M1, M2 and (private, naive) M3; private wraps it in repeat.

    ``epsilon`` is what the sweep would spend if every trial were this one (private: the
    Papernot-Steinke bound on this trial's curve; naive: k times this trial), at most the total.
    """
    if sp.mode == "public":
        fixed_cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": noise_multiplier})
        with quiet_accountant():
            return plan(fixed_cfg, n)
    tp = trial_privacy(cfg, n)
    ledger = Ledger(accountant=sp.accountant, delta=cfg.privacy.delta, n=n, seeded=cfg.run.seed is not None)
    shared = sp.central == "shared"
    if tp.rounds:  # shared: the sweep's query, run (and taken) before any trial started
        ledger.add(
            "central",
            noise_multiplier=tp.central_noise_multiplier,
            sample_rate=tp.central_rate,
            count=tp.rounds,
            shared=shared,
            taken=tp.rounds if shared else 0,
        )
    ledger.add("dpsgd", noise_multiplier=noise_multiplier, sample_rate=tp.sample_rate, count=tp.steps)
    ledger.add("selection", noise_multiplier=sp.score_noise, kind="gaussian", count=1)
    if sp.mode == "private":
        mean, shape = sp.repeat()
        ledger.repeat = {"mean": mean, "shape": shape}
    orders = tuple(float(o) for o in sp.reference.orders)
    with quiet_accountant():  # the sweep's grid and cached curves (the ledger's own epsilon is slower)
        base = sum(rdp_curve(m.event(m.planned), orders) for m in ledger.mechanisms if not m.shared)
        once = sum(
            (rdp_curve(m.event(m.planned), orders) for m in ledger.mechanisms if m.shared), np.zeros(len(orders))
        )
        total = once + (repeat_curve(base, mean, shape, orders) if sp.mode == "private" else sp.trials["count"] * base)
        epsilon = curve_epsilon(total, cfg.privacy.delta, orders)
    return Plan(
        noise_multiplier=noise_multiplier,
        sample_rate=tp.sample_rate,
        steps=tp.steps,
        central_rate=tp.central_rate,
        ledger=ledger,
        epsilon=epsilon,
        target_epsilon=sp.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=sp.accountant,
        n=n,
        expected_batch=cfg.finetune.batch_size,
    )
