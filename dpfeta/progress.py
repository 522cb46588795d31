"""One live progress bar per stage (tqdm, on stderr): rate, ETA and a few public fields.

Bars are off unless the CLI turned them on (``enable``; ``dpfeta.console`` does it in normal mode,
never with ``--quiet`` or in Ray workers). A stage opens its bar with ``stage(key, ...)``; the code
doing the work moves it with ``advance``/``position``, which are no-ops when no bar of that key is
open, so the library never needs to know whether anyone is watching.

DP-SGD runs in Ray Train workers: rank 0's reports reach the Train controller, whose callback
(``train_relay``) forwards (step, epsilon) to a small actor that a driver thread polls into the bar.
Only public numbers travel that way (the step, and epsilon, which depends on the plan only).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator, Optional

_enabled = False
_bars: dict[str, Any] = {}
POLL_S = 0.5


def enable(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


class _Pending:
    """A bar declared ``lazy``: drawn at its first move, so a stage that is skipped shows none."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs


def _new_bar(*, total: Optional[float], unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5,
        smoothing=0.1,
    )


@contextlib.contextmanager
def stage(
    key: str, *, total: Optional[float], unit: str, desc: Optional[str] = None, lazy: bool = False
) -> Iterator[None]:
    """Bar ``key`` for the block (nothing when bars are off). ``lazy``: drawn at its first move, for a
    stage that may be skipped (resume) or run elsewhere (a GPU task)."""
    if not _enabled or key in _bars:
        yield None
        return
    spec = dict(total=total, unit=unit, desc=desc or key)
    _bars[key] = _Pending(**spec) if lazy else _new_bar(**spec)
    try:
        yield None
    finally:
        bar = _bars.pop(key, None)
        if bar is not None and bar is not _DONE and not isinstance(bar, _Pending):
            bar.close()


_DONE = object()  # a finished bar: further moves are ignored


def _bar(key: str):
    bar = _bars.get(key)
    if bar is _DONE:
        return None
    if isinstance(bar, _Pending):
        bar = _bars[key] = _new_bar(**bar.kwargs)
    return bar


def _postfix(bar, fields: dict) -> None:
    if fields:
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}, refresh=False)


def advance(key: str, n: float = 1, **fields: Any) -> None:
    """Move bar ``key`` by ``n`` (no-op without such a bar); ``fields`` are shown after the rate."""
    bar = _bar(key)
    if bar is not None:
        _postfix(bar, fields)
        bar.update(n)
        _finish(key, bar)


def position(key: str, n: float, **fields: Any) -> None:
    """Move bar ``key`` to ``n``. The first call of a resumed stage (n > 1 from 0) starts the bar
    there, so the rate and ETA count only the work done now."""
    bar = _bar(key)
    if bar is None:
        return
    if bar.n == 0 and n > 1 and not getattr(bar, "_dpfeta_started", False):
        bar.n = bar.last_print_n = bar.initial = n - 1
    bar._dpfeta_started = True
    _postfix(bar, fields)
    if n > bar.n:
        bar.update(n - bar.n)
    else:
        bar.refresh()
    _finish(key, bar)


def _finish(key: str, bar) -> None:
    """A bar at its total is closed now (its time is the work's, not the stage's clean-up)."""
    if bar.total is not None and bar.n >= bar.total and not bar.disable:
        bar.close()
        _bars[key] = _DONE


# --------------------------------------------------------------------------------------------
# Ray Train: rank 0's reports -> the driver's bar
# --------------------------------------------------------------------------------------------


class _Latest:
    """The latest report of a Train run (an actor with no CPU)."""

    def __init__(self):
        self.value = None

    def put(self, value) -> None:
        self.value = value

    def get(self):
        return self.value


@contextlib.contextmanager
def train_relay(key: str) -> Iterator[list]:
    """Ray Train callbacks (a list, empty when bars are off) that move bar ``key`` to each report's
    ``step`` with its ``epsilon``; call with Ray initialised, pass the list to ``RunConfig``."""
    if key not in _bars:
        yield []
        return
    import ray
    from ray.train import UserCallback

    latest = ray.remote(num_cpus=0)(_Latest).remote()

    class ProgressRelay(UserCallback):
        def __init__(self, sink):
            self.sink = sink

        def after_report(self, run_context, metrics, checkpoint):
            report = dict(metrics[0]) if metrics else {}
            if "step" in report:
                self.sink.put.remote((int(report["step"]), report.get("epsilon")))  # fire and forget

    stop = threading.Event()

    seen: list = [None]

    def poll_once() -> None:
        try:
            value = ray.get(latest.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the bar is best effort
            return
        if value is not None and value != seen[0]:
            seen[0] = value
            step, eps = value
            position(key, step, **({"eps": float(eps)} if eps is not None else {}))

    def poll() -> None:
        while not stop.wait(POLL_S):
            poll_once()
        poll_once()  # the last report

    thread = threading.Thread(target=poll, name="dpfeta-progress", daemon=True)
    thread.start()
    try:
        yield [ProgressRelay(latest)]
    finally:
        stop.set()
        thread.join(timeout=15)
        try:
            ray.kill(latest)
        except Exception:  # noqa: BLE001
            pass
