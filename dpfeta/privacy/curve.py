"""The epsilon curve of a run: the composed total at each report step, computed off the step path.

epsilon after t DP-SGD steps depends only on the plan (the mechanisms, sigma, q, delta, the accountant)
and t, never on the data, so the values a run reports can be computed before or while its steps run.
Each point is ``Ledger.epsilon()`` of a copy of the ledger whose ``name`` count is set to that step:
the ledger's own composition, the same number the ledger gives at that step (``tests/test_epsilon_curve.py``).
A PLD point on the ledger's grid (PLD_INTERVAL, 1e-4) costs 0.3-5 s on a CPU core (the self-composition of
the step's PLD), too slow for a GPU's few-ms steps; ``EpsilonCurve`` therefore composes the points before
the last on the coarse grid (PLD_COARSE_INTERVAL, 1e-3: ~10x cheaper; pessimistic, so an upper bound on
the true epsilon too; over 48 (q, sigma, T) settings never below the 1e-4 value, at most 8.6 % above) and
the last point, the run's total, on the ledger's own grid. An RDP point costs ~1 ms and is exact.
"""

from __future__ import annotations

import threading
from typing import Iterable

from dpfeta.privacy.accounting import PLD_COARSE_INTERVAL, PLD_INTERVAL
from dpfeta.privacy.ledger import Ledger


def epsilon_curve(ledger: Ledger, name: str, steps: Iterable[int]) -> dict[int, float]:
    """{step: the ledger's composed epsilon once ``name`` has taken ``step`` compositions in total}."""
    at = Ledger.from_state_dict(ledger.state_dict())
    out = {}
    for step in sorted(set(steps)):
        at.record_steps(name, step)
        out[step] = at.epsilon()
    return out


class EpsilonCurve:
    """``epsilon_curve`` computed point by point, in step order, on a daemon thread started at
    construction; ``at(step)`` returns a point, waiting for it only if the thread is behind. A PLD ledger's
    points before the last are composed on PLD_COARSE_INTERVAL (live values: pessimistic upper bounds), the
    last on PLD_INTERVAL (the ledger's final epsilon).

    ``close()`` stops the thread after its current point (a loop that ends early, e.g. on an error,
    leaves at most one point to finish).
    """

    def __init__(self, ledger: Ledger, name: str, steps: Iterable[int]):
        self.name = name
        self.steps = sorted(set(steps))
        self._base = ledger.state_dict()
        self._ledger = Ledger.from_state_dict(self._base)
        self._ledger.get(name)  # fail here, not on the thread, for an unknown mechanism
        self._points: dict[int, float] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="epsilon-curve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in self.steps:
                if self._stop.is_set():
                    return
                self._ledger.record_steps(self.name, step)
                live = step != self.steps[-1]
                epsilon = self._ledger.epsilon(pld_interval=PLD_COARSE_INTERVAL if live else PLD_INTERVAL)
                with self._ready:
                    self._points[step] = epsilon
                    self._ready.notify_all()
        except BaseException as exc:  # handed to the caller of at()
            with self._ready:
                self._error = exc
                self._ready.notify_all()

    def at(self, step: int) -> float:
        """The composed epsilon after ``step`` compositions of ``name`` (one of ``steps``)."""
        if step not in self.steps:
            raise ValueError(f"expected a step of the curve ({self.steps[:3]}...{self.steps[-1:]}), got step={step}")
        with self._ready:
            self._ready.wait_for(lambda: step in self._points or self._error is not None)
            if step in self._points:
                return self._points[step]
        raise RuntimeError(f"the epsilon curve failed before step {step}") from self._error

    def matches(self, ledger: Ledger, step: int) -> bool:
        """Whether ``ledger`` is the ledger this curve composed at ``step`` (same mechanisms and counts),
        so that ``at(step)`` is its epsilon."""
        at = Ledger.from_state_dict(self._base)
        at.get(self.name).taken = step
        mine, theirs = at.state_dict(), ledger.state_dict()
        return all(mine[k] == theirs[k] for k in ("accountant", "delta", "n", "repeat", "mechanisms")) and mine.get(
            "sweep_epsilon"
        ) == theirs.get("sweep_epsilon")

    def close(self) -> None:
        self._stop.set()
