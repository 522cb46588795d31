"""The plan of one run: N and the config -> (sigma, q, T) calibrated once so that the central query
and DP-SGD together meet the target epsilon; refuses, before any data is read, when they cannot."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import dp_accounting

from dpfeta import config as config_mod
from dpfeta.privacy.accounting import calibrate_noise
from dpfeta.privacy.auto import AUTO, CentralChoice, choose_central
from dpfeta.privacy.events import NEIGHBOURING_RELATION, central_event, dpsgd_event
from dpfeta.privacy.ledger import Ledger


@dataclass(kw_only=True)
class Plan:
    noise_multiplier: float  # sigma of DP-SGD
    sample_rate: float
    steps: int
    central_rate: float
    ledger: Ledger
    epsilon: float  # composed epsilon of the whole plan (<= target)
    target_epsilon: float
    delta: float
    accountant: str
    n: int
    expected_batch: float
    # privacy.accountant=auto: the DP-SGD sigma (or, with a fixed sigma, the epsilon) each accountant gave
    compared: Optional[dict] = None


def dpsgd_steps(*, epochs: float, sample_rate: float) -> int:
    """T = ceil(epochs / q): the number of logical DP-SGD steps planned."""
    return max(1, math.ceil(epochs / sample_rate - 1e-9))


def central_noise(cfg, n: int, *, target_epsilon: float | None = None) -> float:
    """sigma_c of the central query: the configured one, or calibrated to its epsilon share."""
    c, p = _apply_auto(cfg, n, target_epsilon).central, cfg.privacy
    if c.noise_multiplier is not None:
        return float(c.noise_multiplier)
    q_c = min(1.0, c.batch_size / n)
    share = c.epsilon_share * (p.epsilon if target_epsilon is None else target_epsilon)
    # auto: RDP, whose epsilon is the larger here, so the query spends at most its share under either
    return calibrate_noise(
        make_events=lambda s: central_event(noise_multiplier=s, sample_rate=q_c, rounds=max(c.rounds, 1)),
        epsilon=share,
        delta=p.delta,
        accountant="rdp" if p.accountant == "auto" else p.accountant,
        rtol=p.calibration_rtol,
    )


def central_choice(cfg, n: int, *, target_epsilon: float | None = None) -> Optional[CentralChoice]:
    """What ``central.rounds: auto`` / ``central.epsilon_share: auto`` stand for (privacy/auto.py), or None."""
    c, p, d = cfg.central, cfg.privacy, cfg.data
    if AUTO not in (c.rounds, c.epsilon_share):
        return None
    return choose_central(
        epsilon=p.epsilon if target_epsilon is None else target_epsilon,
        delta=p.delta,
        n=n,
        image_shape=(d.channels, d.resolution, d.resolution),
        num_classes=d.num_classes,
        batch_size=c.batch_size,
        downsample=c.downsample,
        accountant="rdp" if p.accountant == "auto" else p.accountant,  # the central noise's accountant
        rounds=None if c.rounds == AUTO else c.rounds,
        epsilon_share=None if c.epsilon_share == AUTO or c.noise_multiplier is not None else c.epsilon_share,
        noise_multiplier=c.noise_multiplier,
    )


def _apply_auto(cfg, n: int, target_epsilon: float | None):
    choice = central_choice(cfg, n, target_epsilon=target_epsilon)
    if choice is None:
        return cfg
    return config_mod.replace(cfg, {"central.rounds": choice.rounds, "central.epsilon_share": choice.epsilon_share})


def resolve(cfg, n: int, *, target_epsilon: float | None = None):
    """The config with every privacy-derived value fixed: ``auto`` central rounds and share (from public
    facts), then central.noise_multiplier.

    Call once, before any data is read; the result is what config.json records.
    """
    cfg = _apply_auto(cfg, n, target_epsilon)
    if cfg.central.noise_multiplier is not None or cfg.central.rounds == 0:
        return cfg
    return config_mod.replace(cfg, {"central.noise_multiplier": central_noise(cfg, n, target_epsilon=target_epsilon)})


def plan(cfg, n: int, *, target_epsilon: float | None = None) -> Plan:
    """Plan the ledger of one run (central query + DP-SGD) and calibrate sigma once.

    Raises ValueError, before any data is read, when the central query alone reaches the target.
    ``privacy.accountant: auto`` plans with RDP and with PLD and keeps the tighter (the smaller
    sigma, or with a fixed sigma the smaller epsilon): PLD in practice. Sweeps never come here with
    auto (they are accounted with RDP, which covers repeat-and-select).
    """
    if AUTO in (cfg.central.rounds, cfg.central.epsilon_share):
        cfg = resolve(cfg, n, target_epsilon=target_epsilon)
    if cfg.privacy.accountant == "auto":
        return _plan_tighter(cfg, n, target_epsilon=target_epsilon)
    p, c, f = cfg.privacy, cfg.central, cfg.finetune
    target = p.epsilon if target_epsilon is None else target_epsilon
    if n < 1:
        raise ValueError(f"expected a training split of N >= 1 records, got N={n}")
    if c.batch_size > n or f.batch_size > n:
        raise ValueError(
            f"expected central.batch_size={c.batch_size:g} and finetune.batch_size={f.batch_size:g} <= N={n}"
        )
    q_c, q = c.batch_size / n, f.batch_size / n
    steps = dpsgd_steps(epochs=f.epochs, sample_rate=q)
    ledger = Ledger(accountant=p.accountant, delta=p.delta, n=n, seeded=cfg.run.seed is not None)
    if c.rounds > 0:
        sigma_c = central_noise(cfg, n, target_epsilon=target)
        ledger.add("central", noise_multiplier=sigma_c, sample_rate=q_c, count=c.rounds)
        central_eps = ledger.epsilon(planned=True)
        if central_eps >= target:
            raise ValueError(
                f"the central-image query alone spends epsilon={central_eps:.4g} "
                f"(central.rounds={c.rounds}, central.noise_multiplier={sigma_c:g}, "
                f"q_c={q_c:.4g}, delta={p.delta:g}, {p.accountant}), which is not below the target "
                f"privacy.epsilon={target:g}: raise the target, add central noise, or use fewer rounds"
            )
    fixed = ledger.event(planned=True) if ledger.mechanisms else None

    def make_events(sigma: float) -> dp_accounting.DpEvent:
        sgd = dpsgd_event(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return sgd if fixed is None else dp_accounting.ComposedDpEvent([fixed, sgd])

    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    else:
        sigma = calibrate_noise(
            make_events=make_events, epsilon=target, delta=p.delta, accountant=p.accountant, rtol=p.calibration_rtol
        )
    ledger.add("dpsgd", noise_multiplier=sigma, sample_rate=q, count=steps)
    eps = ledger.epsilon(planned=True)
    if eps > target * (1 + 1e-9):
        raise ValueError(
            f"privacy.noise_multiplier={sigma:g} gives epsilon={eps:.4g} above the target "
            f"privacy.epsilon={target:g}; leave it null to calibrate"
        )
    return Plan(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        central_rate=q_c,
        ledger=ledger,
        epsilon=eps,
        target_epsilon=target,
        delta=p.delta,
        accountant=p.accountant,
        n=n,
        expected_batch=f.batch_size,
    )


def _plan_tighter(cfg, n: int, *, target_epsilon: float | None) -> Plan:
    cfg = resolve(cfg, n, target_epsilon=target_epsilon)  # one central sigma for both
    plans, refused = {}, None
    for name in ("pld", "rdp"):  # a fixed sigma may meet the target under PLD only
        try:
            plans[name] = plan(config_mod.replace(cfg, {"privacy.accountant": name}), n, target_epsilon=target_epsilon)
        except ValueError as exc:
            refused = refused or exc
    if not plans:
        raise refused
    fixed = cfg.privacy.noise_multiplier is not None
    key, attr = ("epsilon", "epsilon") if fixed else ("sigma", "noise_multiplier")
    best = min(plans.values(), key=lambda pl: (getattr(pl, attr), pl.accountant != "pld"))
    return dataclasses.replace(best, compared={f"{name}_{key}": getattr(pl, attr) for name, pl in plans.items()})


def plan_json(pl: Plan) -> dict:
    alone = pl.ledger.per_mechanism(planned=True)
    return {
        "epsilon": pl.epsilon,
        "target_epsilon": pl.target_epsilon,
        "delta": pl.delta,
        "accountant": pl.accountant,
        **({"accountant_compared": pl.compared} if pl.compared else {}),
        "noise_multiplier": pl.noise_multiplier,
        "sample_rate": pl.sample_rate,
        "steps": pl.steps,
        "expected_batch": pl.expected_batch,
        "n": pl.n,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "mechanisms": [
            {
                "name": m.name,
                "noise_multiplier": m.noise_multiplier,
                "sample_rate": m.sample_rate,
                "count": m.planned,
                "epsilon": alone[m.name],
            }
            for m in pl.ledger.mechanisms
        ],
    }


def plan_table(pl: Plan) -> str:
    js = plan_json(pl)
    rows = [f"{'mechanism':<10} {'sigma':>10} {'q':>10} {'count':>8} {'eps alone':>10}"]
    for m in js["mechanisms"]:
        rows.append(
            f"{m['name']:<10} {m['noise_multiplier']:>10.4f} {m['sample_rate']:>10.5f} "
            f"{m['count']:>8d} {m['epsilon']:>10.4f}"
        )
    rows += [
        "",
        f"composed epsilon   {pl.epsilon:.4f}  (target {pl.target_epsilon:g}, delta {pl.delta:g}, "
        f"accountant {pl.accountant})",
        *(
            [
                "accountant auto     "
                + ", ".join(f"{k}={v:.4f}" for k, v in pl.compared.items())
                + f": {pl.accountant} is the tighter"
            ]
            if pl.compared
            else []
        ),
        f"DP-SGD             sigma={pl.noise_multiplier:.4f}  q={pl.sample_rate:.5f}  T={pl.steps}  "
        f"expected batch={pl.expected_batch:g}  N={pl.n}",
        f"neighbouring       {NEIGHBOURING_RELATION}",
    ]
    return "\n".join(rows)


def privacy_summary(pl: Plan) -> dict:
    """The privacy head of eval.json: the composed epsilon so far and the plan's public parameters."""
    ledger = pl.ledger
    return {
        "epsilon": ledger.epsilon(),
        "epsilon_target": pl.target_epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "noise_multiplier": pl.noise_multiplier,
        "sample_rate": pl.sample_rate,
        "steps": ledger.get("dpsgd").taken,
        "steps_planned": pl.steps,
        "epsilon_per_mechanism": ledger.per_mechanism(planned=False),
        "seeded": ledger.seeded,
    }
