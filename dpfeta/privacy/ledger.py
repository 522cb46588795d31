"""The ledger: every mechanism's parameters, planned and taken counts, and the composed epsilon.

``ledger.json`` (in the run directory, every checkpoint's meta and ``release/``) is this object's
``to_json()``; it is the one record of a run's privacy decisions (sigma, q, T, N, delta, accountant).
``check_resume`` is the one resume guard: a resumed run (``Ledger.check_same_plan``) or DP-SGD stage
(its checkpoint's meta, ``plan.json``) continues its stored plan or is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import dp_accounting
from dp_accounting import dp_event

from dpfeta.privacy.accounting import PLD_INTERVAL, epsilon_of
from dpfeta.privacy.events import KINDS, NEIGHBOURING_RELATION, PUBLIC_FACTS, poisson_gaussian, selection_event


@dataclass(kw_only=True)
class Mechanism:
    name: str
    kind: str  # "poisson_gaussian" or "gaussian"
    noise_multiplier: float
    sample_rate: float = 1.0
    planned: int = 1  # compositions planned
    taken: int = 0  # compositions actually run
    shared: bool = False  # a sweep's mechanism run once before its trials, outside the repeat-and-select

    def event(self, count: int) -> dp_accounting.DpEvent:
        if self.kind == "gaussian":
            return dp_accounting.SelfComposedDpEvent(selection_event(noise_multiplier=self.noise_multiplier), count)
        return poisson_gaussian(self.noise_multiplier, self.sample_rate, count)


@dataclass(kw_only=True)
class Ledger:
    """Every mechanism's parameters, planned and taken counts, and the composed epsilon.

    ``repeat`` (tuning, docs/privacy.md §6): ``{"mean": mu, "shape": eta}`` wraps the composition of the
    trial's mechanisms in a ``RepeatAndSelectDpEvent``: a random number of trials, the best one
    released (Papernot & Steinke 2022; eta = inf is the Poisson distribution). A ``shared`` mechanism
    (the central query a sweep runs once, before its trials, and whose output every trial reads) is
    composed with that event, outside it: it ran once, whatever the number of trials.
    """

    accountant: str
    delta: float
    n: int
    mechanisms: list[Mechanism] = field(default_factory=list)
    repeat: Optional[dict] = None
    seeded: bool = False  # a fixed seed was used for sampling/noise (tests/reproduction only)
    groups: list = field(default_factory=list)  # DP-SGD worker groups (operator-internal; not in a
    # release): one entry per attempt, {"step": first step, "world_size": W, "nodes": distinct nodes}; an
    # elastic resize or a restart after a failure adds one. q, sigma and T never change with them.
    # A sweep's release: the bound over the whole search, stated by epsilon() when above this (selected)
    # trial's own composition (whose per-trial sigma is dominated order by order, not at the optimum).
    sweep_epsilon: Optional[float] = None

    def add(
        self,
        name: str,
        *,
        noise_multiplier: float,
        sample_rate: float = 1.0,
        count: int = 1,
        kind: str = "poisson_gaussian",
        taken: int = 0,
        shared: bool = False,
    ) -> Mechanism:
        if kind not in KINDS:
            raise ValueError(f"expected kind in {KINDS}, got {kind!r}")
        if any(m.name == name for m in self.mechanisms):
            raise ValueError(f"mechanism '{name}' is already in the ledger")
        mech = Mechanism(
            name=name,
            kind=kind,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            planned=int(count),
            taken=int(taken),
            shared=bool(shared),
        )
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
        the RDP curve at orders where its per-step curve is infinite). With ``repeat``, the shared
        mechanisms compose with the repeat-and-select of the others (none run yet: nothing to repeat)."""
        counts = [(m, m.planned if planned else m.taken) for m in self.mechanisms]
        trial = [m.event(c) for m, c in counts if c > 0 and not (self.repeat is not None and m.shared)]
        if self.repeat is None:
            return dp_accounting.ComposedDpEvent(trial)
        once = [m.event(c) for m, c in counts if c > 0 and m.shared]
        if trial:
            once.append(
                dp_event.RepeatAndSelectDpEvent(
                    dp_accounting.ComposedDpEvent(trial), float(self.repeat["mean"]), float(self.repeat["shape"])
                )
            )
        return dp_accounting.ComposedDpEvent(once)

    def epsilon(self, planned: bool = False, *, pld_interval: float = PLD_INTERVAL) -> float:
        """Composed epsilon(delta) over the steps taken (or the whole plan); 0 before anything ran.
        ``pld_interval``: the PLD grid (a coarser one is pessimistic: it only raises epsilon); the ledger's
        own is PLD_INTERVAL, the only one any stated total uses."""
        if all((m.planned if planned else m.taken) == 0 for m in self.mechanisms):
            own = 0.0
        else:
            own = epsilon_of(
                self.event(planned), delta=self.delta, accountant=self.accountant, pld_interval=pld_interval
            )
        return own if self.sweep_epsilon is None else max(own, float(self.sweep_epsilon))

    def per_mechanism(self, planned: bool = True) -> dict[str, float]:
        """Stand-alone epsilon of each mechanism (never a total)."""
        out = {}
        for m in self.mechanisms:
            count = m.planned if planned else m.taken
            out[m.name] = (
                0.0 if count == 0 else epsilon_of(m.event(count), delta=self.delta, accountant=self.accountant)
            )
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
            "groups": [dict(g) for g in self.groups],
            **({} if self.sweep_epsilon is None else {"sweep_epsilon": float(self.sweep_epsilon)}),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Ledger":
        ledger = cls(
            accountant=state["accountant"],
            delta=float(state["delta"]),
            n=int(state["n"]),
            repeat=state.get("repeat"),
            seeded=bool(state.get("seeded", False)),
            groups=[dict(g) for g in state.get("groups", [])],
            sweep_epsilon=state.get("sweep_epsilon"),
        )
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
        (q, counts, N, delta, accountant); sigma is not compared: a resumed run keeps the stored one."""
        check_resume(_plan_facts(other), _plan_facts(self), where=where, keys=PLAN_KEYS)

    @classmethod
    def load(cls, path: Path | str) -> "Ledger":
        return cls.from_state_dict(json.loads(Path(path).read_text()))


RESUME_KEYS = ("noise_multiplier", "sample_rate", "steps", "n")  # sigma, q, T and N of DP-SGD
PLAN_KEYS = ("n", "delta", "accountant", "mechanisms")  # a ledger's plan (``_plan_facts``)


def _plan_facts(ledger: Ledger) -> dict[str, Any]:
    return {
        "n": ledger.n,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "mechanisms": [(m.name, m.kind, m.sample_rate, m.planned, m.shared) for m in ledger.mechanisms],
    }


def check_resume(stored: Mapping[str, Any], given: Any, *, where: str, keys: Sequence[str] = RESUME_KEYS) -> None:
    """The one resume guard: what was stored (a checkpoint's meta, ``plan.json``, a ledger's facts) must
    hold the ``keys`` of ``given`` (a mapping or an object with these attributes, e.g. a ``Plan``);
    numbers within a relative 1e-12. A restart never recalibrates: sigma is decided once per run."""

    def value(source: Any, key: str) -> Any:
        return source[key] if isinstance(source, Mapping) else getattr(source, key)

    def same(a: Any, b: Any) -> bool:
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        return math.isclose(a, b, rel_tol=1e-12) if numbers else a == b

    saved = {k: value(stored, k) for k in keys}
    now = {k: value(given, k) for k in keys}
    if not all(same(saved[k], now[k]) for k in keys):
        raise ValueError(
            f"cannot resume {where}: it records a different privacy plan {saved} than the config's {now}; "
            "sigma is decided once per run: use a new run name or output folder"
        )
