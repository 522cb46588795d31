"""The privacy ledger: DpEvent builders, accountants, calibration, the budget plan.

Every mechanism that touches the sensitive training split is described as a ``dp_accounting``
DpEvent under the add/remove-one-record neighbouring relation (privacy.md §1-3):

* M1 ``central``  -- n rounds of a Poisson(q_c)-subsampled Gaussian on per-class sums;
* M2 ``dpsgd``    -- T logical steps of a Poisson(q)-subsampled Gaussian on clipped gradient sums;
* M3 ``selection``-- one Gaussian on a count of correct validation predictions (tuning only).

The reported epsilon is always the composed total of the ledger, computed by the configured
accountant. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import dp_accounting
import numpy as np
from dp_accounting import dp_event, pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant as rdp_impl
from scipy.optimize import brentq

NEIGHBOURING_RELATION = "add/remove one record (image with its label) of the training split"
PUBLIC_FACTS = ("N (training-split size)", "number of classes", "image shape and value range",
                "the whole config (noise seeds excepted)")
KINDS = ("poisson_gaussian", "gaussian")


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


def central_event(*, noise_multiplier: float, sample_rate: float, rounds: int) -> dp_accounting.DpEvent:
    """M1: ``rounds`` x Poisson(sample_rate)-subsampled Gaussian(noise_multiplier).

    Sensitivity: one record moves one per-class sum of 2x-downsampled images in [0, 1] by at most
    sqrt(d/4) in L2; the noise std is noise_multiplier * sqrt(d/4) on every coordinate.
    """
    return _poisson_gaussian(noise_multiplier, sample_rate, rounds)


def dpsgd_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """M2: ``steps`` x Poisson(sample_rate)-subsampled Gaussian(noise_multiplier).

    Sensitivity: the clipped per-example gradient (averaged over K noise draws first) has norm
    <= C; the noise N(0, (sigma C)^2) is added once per logical step to the clipped sum.
    """
    return _poisson_gaussian(noise_multiplier, sample_rate, steps)


def selection_event(*, noise_multiplier: float) -> dp_accounting.DpEvent:
    """M3: Gaussian(noise_multiplier) on a count of correct predictions (sensitivity 1)."""
    _positive("noise_multiplier", noise_multiplier)
    return dp_accounting.GaussianDpEvent(noise_multiplier)


def _poisson_gaussian(sigma: float, q: float, count: int) -> dp_accounting.DpEvent:
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


DEFAULT_RDP_ORDERS = tuple(rdp.RdpAccountant()._orders)  # dp_accounting's grid: 1.1..10.9, 11..63, 128..1024
INTEGER_RDP_ORDERS = tuple(o for o in DEFAULT_RDP_ORDERS if float(o).is_integer())


def make_accountant(accountant: str, orders: tuple | None = None):
    if accountant == "rdp":
        return rdp.RdpAccountant(list(orders or DEFAULT_RDP_ORDERS))
    if accountant == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"expected accountant 'rdp' or 'pld', got {accountant!r}")


def epsilon_of(event: dp_accounting.DpEvent, *, delta: float, accountant: str,
               orders: tuple | None = None) -> float:
    """epsilon(delta) of ``event``; ``orders`` restricts the RDP grid (a subset only raises epsilon).

    Fails closed: a NaN anywhere in the RDP curve counts as +inf at that order (dp_accounting's
    ``compute_epsilon`` would otherwise pick the NaN order and report epsilon = 0), and a result that
    is not a number >= 0 is an error, never a small epsilon.
    """
    if accountant == "rdp":
        grid = orders or DEFAULT_RDP_ORDERS
        vector = _rdp_vector(event, grid)
        if vector is None:
            acc = make_accountant("rdp", grid)
            acc.compose(event)
            vector = np.asarray(acc.rdp, dtype=np.float64)  # the accountant's composed curve
        vector = np.where(np.isnan(vector), np.inf, vector)
        eps = float(rdp_impl.compute_epsilon(grid, vector, delta)[0]) if np.isfinite(vector).any() else math.inf
    else:
        acc = make_accountant(accountant, orders)
        acc.compose(event)
        eps = float(acc.get_epsilon(delta))
    if math.isnan(eps) or eps < 0:
        raise ArithmeticError(f"the {accountant} accountant returned epsilon={eps!r}; refusing to report it")
    return eps


@functools.lru_cache(maxsize=4096)
def _poisson_gaussian_rdp(q: float, sigma: float, orders: tuple) -> np.ndarray:
    out = np.asarray(rdp_impl._compute_rdp_poisson_subsampled_gaussian(q, sigma, list(orders)), dtype=np.float64)
    return np.where(np.isnan(out), np.inf, out)  # inf: an order the accountant cannot bound


def _rdp_vector(event: dp_accounting.DpEvent, orders: tuple) -> np.ndarray | None:
    """RDP curve of Poisson-Gaussian compositions, the same sums dp_accounting's RdpAccountant
    forms, with the per-(q, sigma) curve cached (calibration re-evaluates the fixed mechanisms
    many times). None for any other event: the caller then uses the accountant itself."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        if event.count == 0:  # no composition: zero cost (avoid 0 * inf = NaN at extreme orders)
            return np.zeros(len(orders))
        inner = _rdp_vector(event.event, orders)
        return None if inner is None else event.count * inner
    if isinstance(event, dp_event.ComposedDpEvent):
        total = np.zeros(len(orders))
        for part in event.events:
            inner = _rdp_vector(part, orders)
            if inner is None:
                return None
            total = total + inner
        return total
    if isinstance(event, dp_event.RepeatAndSelectDpEvent):  # the accountant's own formula (Papernot-Steinke)
        inner = _rdp_vector(event.event, orders)
        return None if inner is None else np.asarray(rdp_impl._compute_rdp_repeat_and_select(
            list(orders), inner, float(event.mean), float(event.shape)), dtype=np.float64)
    if isinstance(event, dp_event.GaussianDpEvent):
        return _poisson_gaussian_rdp(1.0, float(event.noise_multiplier), orders)
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        return _poisson_gaussian_rdp(float(event.sampling_probability),
                                     float(event.event.noise_multiplier), orders)
    return None


def _optimal_order(event: dp_accounting.DpEvent, *, delta: float, orders: tuple) -> float:
    acc = make_accountant("rdp", orders)
    acc.compose(event)
    return float(acc.get_epsilon_and_optimal_order(delta)[1])


# --------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------


@dataclass
class Mechanism:
    name: str
    kind: str  # "poisson_gaussian" or "gaussian"
    noise_multiplier: float
    sample_rate: float = 1.0
    planned: int = 1  # compositions planned
    taken: int = 0  # compositions actually run

    def event(self, count: int) -> dp_accounting.DpEvent:
        if self.kind == "gaussian":
            return dp_accounting.SelfComposedDpEvent(selection_event(noise_multiplier=self.noise_multiplier), count)
        return _poisson_gaussian(self.noise_multiplier, self.sample_rate, count)


@dataclass
class Ledger:
    """Every mechanism's parameters, planned and taken counts, and the composed epsilon.

    ``repeat`` (tuning, privacy.md §6): ``{"mean": mu, "shape": eta}`` wraps the composition of all
    mechanisms (one trial) in a ``RepeatAndSelectDpEvent``: a random number of trials, the best
    one released (Papernot & Steinke 2022; eta = inf is the Poisson distribution).
    """

    accountant: str
    delta: float
    n: int
    mechanisms: list[Mechanism] = field(default_factory=list)
    repeat: Optional[dict] = None
    seeded: bool = False  # a fixed seed was used for sampling/noise (tests/reproduction only)

    def add(self, name: str, *, noise_multiplier: float, sample_rate: float = 1.0, count: int = 1,
            kind: str = "poisson_gaussian", taken: int = 0) -> Mechanism:
        if kind not in KINDS:
            raise ValueError(f"expected kind in {KINDS}, got {kind!r}")
        if any(m.name == name for m in self.mechanisms):
            raise ValueError(f"mechanism '{name}' is already in the ledger")
        mech = Mechanism(name, kind, float(noise_multiplier), float(sample_rate), int(count), int(taken))
        mech.event(1)  # validates the parameters
        self.mechanisms.append(mech)
        return mech

    def get(self, name: str) -> Mechanism:
        for m in self.mechanisms:
            if m.name == name:
                return m
        raise KeyError(f"no mechanism '{name}' in the ledger (have {[m.name for m in self.mechanisms]})")

    def record_steps(self, name: str, count: int) -> None:
        """Record that ``count`` compositions of ``name`` have been run in total (not a delta)."""
        mech = self.get(name)
        if count < mech.taken:
            raise ValueError(f"ledger '{name}': steps taken cannot go back from {mech.taken} to {count}")
        mech.taken = int(count)

    def event(self, planned: bool = False) -> dp_accounting.DpEvent:
        """The composition of every mechanism's compositions taken (or planned). A mechanism with a
        count of 0 is left out (it costs nothing; composing it 0 times would put 0 * inf = NaN into
        the RDP curve at orders where its per-step curve is infinite)."""
        counts = [(m, m.planned if planned else m.taken) for m in self.mechanisms]
        event = dp_accounting.ComposedDpEvent([m.event(c) for m, c in counts if c > 0])
        if self.repeat is not None:
            event = dp_event.RepeatAndSelectDpEvent(event, float(self.repeat["mean"]),
                                                         float(self.repeat["shape"]))
        return event

    def epsilon(self, planned: bool = False) -> float:
        """Composed epsilon(delta) over the steps taken (or the whole plan); 0 before anything ran."""
        if all((m.planned if planned else m.taken) == 0 for m in self.mechanisms):
            return 0.0
        return epsilon_of(self.event(planned), delta=self.delta, accountant=self.accountant)

    def per_mechanism(self, planned: bool = True) -> dict[str, float]:
        """Stand-alone epsilon of each mechanism (never a total)."""
        out = {}
        for m in self.mechanisms:
            count = m.planned if planned else m.taken
            out[m.name] = 0.0 if count == 0 else epsilon_of(m.event(count), delta=self.delta,
                                                            accountant=self.accountant)
        return out

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "n": self.n,
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "public_facts": list(PUBLIC_FACTS),
            "seeded": self.seeded,
            "repeat": self.repeat,
            "mechanisms": [vars(m).copy() for m in self.mechanisms],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Ledger":
        ledger = cls(state["accountant"], float(state["delta"]), int(state["n"]),
                     repeat=state.get("repeat"), seeded=bool(state.get("seeded", False)))
        for m in state["mechanisms"]:
            ledger.mechanisms.append(Mechanism(**m))
        return ledger

    def to_json(self) -> dict:
        """state_dict plus the composed epsilon so far and over the plan (for humans and MLflow)."""
        state = self.state_dict()
        state["epsilon_spent"] = self.epsilon()
        state["epsilon_planned"] = self.epsilon(planned=True)
        return state

    def save(self, path: Path | str) -> None:
        """Write ledger.json atomically (a temporary file, then a rename): a crash never leaves a
        half-written ledger in place of a good one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    def check_same_plan(self, other: "Ledger", *, where: str = "the stored ledger") -> None:
        """Refuse to continue ``other``'s plan with this one unless both describe the same mechanisms
        (q, counts, N, delta, accountant); sigma may differ only for a mechanism not yet run."""
        def key(ledger):
            return (ledger.n, ledger.delta, ledger.accountant,
                    [(m.name, m.kind, m.sample_rate, m.planned) for m in ledger.mechanisms])

        if key(self) != key(other):
            raise ValueError(f"{where} records a different privacy plan {key(other)} than the config's "
                             f"{key(self)}; use a new run name or output folder")

    @classmethod
    def load(cls, path: Path | str) -> "Ledger":
        return cls.from_state_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def calibrate_noise(*, make_events: Callable[[float], dp_accounting.DpEvent], epsilon: float,
                    delta: float, accountant: str, rtol: float = 1e-4,
                    lower: float = 1e-2, upper: float = 1e4) -> float:
    """Smallest sigma (to relative tolerance ``rtol``) with epsilon(make_events(sigma)) <= epsilon.

    Brent's method on log sigma -> log epsilon (monotone decreasing), then a step up until the
    target holds, so the result never overshoots. Raises if even ``upper`` does not reach the
    target (e.g. a fixed mechanism already spends it).

    RDP speed-up (exact, never optimistic): fractional orders are ~10x dearer than integer ones,
    so the search first runs on the integer orders, then refines on the integer orders plus the
    default grid's orders next to the optimal one. A subset of orders can only raise epsilon, so
    the result is an upper bound for the default grid too, and in practice equal to it.
    """
    if accountant != "rdp":
        return _calibrate(make_events, epsilon, delta, accountant, None, rtol, lower, upper)
    rough = _calibrate(make_events, epsilon, delta, "rdp", INTEGER_RDP_ORDERS, 1e-3, lower, upper)
    alpha = _optimal_order(make_events(rough), delta=delta, orders=INTEGER_RDP_ORDERS)
    orders = tuple(sorted(set(INTEGER_RDP_ORDERS) | {o for o in DEFAULT_RDP_ORDERS if abs(o - alpha) <= 1.5}))
    return _calibrate(make_events, epsilon, delta, "rdp", orders, rtol, lower, rough)


def _calibrate(make_events, epsilon, delta, accountant, orders, rtol, lower, upper) -> float:
    def gap(log_sigma: float) -> float:
        eps = epsilon_of(make_events(math.exp(log_sigma)), delta=delta, accountant=accountant, orders=orders)
        return math.log(max(eps, 1e-300)) - math.log(epsilon)

    # Bracket gap(lo) > 0 >= gap(hi), searching down from `upper` when it is a known-good sigma.
    step = math.log(4.0)
    top = math.log(upper)
    hi = min(0.0, top) if upper > 1e3 else top - 0.05
    if gap(hi) > 0:
        lo = hi
        while gap(hi) > 0:
            lo, hi = hi, hi + step
            if hi > top:
                if gap(top) > 0:
                    raise ValueError(f"no noise multiplier <= {upper:g} reaches epsilon={epsilon:g}; "
                                     "the fixed mechanisms alone spend the budget")
                hi = top
                break
    else:
        lo = hi
        while gap(lo) <= 0:
            hi, lo = lo, lo - step
            if lo < math.log(lower):
                return math.exp(hi)
    root = brentq(gap, lo, hi, xtol=rtol / 4, rtol=1e-12)
    log_sigma = min(root + rtol / 4, hi)
    while gap(log_sigma) > 0:  # guard against the accountant's numerics: never overshoot
        log_sigma = min(log_sigma + rtol / 4, hi)
    return math.exp(log_sigma)


# --------------------------------------------------------------------------------------------
# The plan of one run
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    sigma: float
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


def dpsgd_steps(*, epochs: float, sample_rate: float) -> int:
    """T = ceil(epochs / q): the number of logical DP-SGD steps planned."""
    return max(1, math.ceil(epochs / sample_rate - 1e-9))


def central_noise(cfg, n: int, *, target_epsilon: float | None = None) -> float:
    """sigma_c of the central query: the configured one, or calibrated to its epsilon share."""
    c, p = cfg.central, cfg.privacy
    if c.noise_multiplier is not None:
        return float(c.noise_multiplier)
    q_c = min(1.0, c.batch_size / n)
    share = c.epsilon_share * (p.epsilon if target_epsilon is None else target_epsilon)
    return calibrate_noise(make_events=lambda s: central_event(noise_multiplier=s, sample_rate=q_c,
                                                                rounds=max(c.rounds, 1)),
                           epsilon=share, delta=p.delta, accountant=p.accountant,
                           rtol=p.calibration_rtol)


def resolve(cfg, n: int):
    """The config with every privacy-derived value fixed (today: central.noise_multiplier).

    Call once, before any data is read; the result is what config.json records.
    """
    from dpfeta import config as config_mod

    if cfg.central.noise_multiplier is not None or cfg.central.rounds == 0:
        return cfg
    return config_mod.replace(cfg, {"central.noise_multiplier": central_noise(cfg, n)})


def plan(cfg, n: int, *, target_epsilon: float | None = None) -> Plan:
    """Plan the ledger of one run (central query + DP-SGD) and calibrate sigma once.

    Raises ValueError, before any data is read, when the central query alone reaches the target.
    """
    p, c, f = cfg.privacy, cfg.central, cfg.finetune
    target = p.epsilon if target_epsilon is None else target_epsilon
    if n < 1:
        raise ValueError(f"expected a training split of N >= 1 records, got N={n}")
    if c.batch_size > n or f.batch_size > n:
        raise ValueError(f"expected central.batch_size={c.batch_size:g} and finetune.batch_size="
                         f"{f.batch_size:g} <= N={n}")
    q_c, q = c.batch_size / n, f.batch_size / n
    steps = dpsgd_steps(epochs=f.epochs, sample_rate=q)
    ledger = Ledger(p.accountant, p.delta, n, seeded=cfg.run.seed is not None)
    if c.rounds > 0:
        sigma_c = central_noise(cfg, n, target_epsilon=target)
        ledger.add("central", noise_multiplier=sigma_c, sample_rate=q_c, count=c.rounds)
        central_eps = ledger.epsilon(planned=True)
        if central_eps >= target:
            raise ValueError(
                f"the central-image query alone spends epsilon={central_eps:.4g} "
                f"(central.rounds={c.rounds}, central.noise_multiplier={sigma_c:g}, "
                f"q_c={q_c:.4g}, delta={p.delta:g}, {p.accountant}), which is not below the target "
                f"privacy.epsilon={target:g}: raise the target, add central noise, or use fewer rounds")
    fixed = ledger.event(planned=True) if ledger.mechanisms else None

    def make_events(sigma: float) -> dp_accounting.DpEvent:
        sgd = dpsgd_event(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return sgd if fixed is None else dp_accounting.ComposedDpEvent([fixed, sgd])

    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    else:
        sigma = calibrate_noise(make_events=make_events, epsilon=target, delta=p.delta,
                                accountant=p.accountant, rtol=p.calibration_rtol)
    ledger.add("dpsgd", noise_multiplier=sigma, sample_rate=q, count=steps)
    eps = ledger.epsilon(planned=True)
    if eps > target * (1 + 1e-9):
        raise ValueError(f"privacy.noise_multiplier={sigma:g} gives epsilon={eps:.4g} above the target "
                         f"privacy.epsilon={target:g}; leave it null to calibrate")
    return Plan(sigma=sigma, sample_rate=q, steps=steps, central_rate=q_c, ledger=ledger, epsilon=eps,
                target_epsilon=target, delta=p.delta, accountant=p.accountant, n=n,
                expected_batch=f.batch_size)


def plan_json(pl: Plan) -> dict:
    alone = pl.ledger.per_mechanism(planned=True)
    return {
        "epsilon": pl.epsilon,
        "target_epsilon": pl.target_epsilon,
        "delta": pl.delta,
        "accountant": pl.accountant,
        "noise_multiplier": pl.sigma,
        "sample_rate": pl.sample_rate,
        "steps": pl.steps,
        "expected_batch": pl.expected_batch,
        "n": pl.n,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "mechanisms": [
            {"name": m.name, "noise_multiplier": m.noise_multiplier, "sample_rate": m.sample_rate,
             "count": m.planned, "epsilon": alone[m.name]}
            for m in pl.ledger.mechanisms
        ],
    }


def plan_table(pl: Plan) -> str:
    js = plan_json(pl)
    rows = [f"{'mechanism':<10} {'sigma':>10} {'q':>10} {'count':>8} {'eps alone':>10}"]
    for m in js["mechanisms"]:
        rows.append(f"{m['name']:<10} {m['noise_multiplier']:>10.4f} {m['sample_rate']:>10.5f} "
                    f"{m['count']:>8d} {m['epsilon']:>10.4f}")
    rows += [
        "",
        f"composed epsilon   {pl.epsilon:.4f}  (target {pl.target_epsilon:g}, delta {pl.delta:g}, "
        f"accountant {pl.accountant})",
        f"DP-SGD             sigma={pl.sigma:.4f}  q={pl.sample_rate:.5f}  T={pl.steps}  "
        f"expected batch={pl.expected_batch:g}  N={pl.n}",
        f"neighbouring       {NEIGHBOURING_RELATION}",
    ]
    return "\n".join(rows)
