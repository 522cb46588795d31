"""What the console shows: dpfeta's own lines, progress bars, and nothing else unless asked.

Three modes, set once by the CLI (``configure``):

* ``normal``: the budget table, the run directory and MLflow link, one progress bar per stage
  (``dpfeta.progress``), dpfeta's warnings, errors and the summary;
* ``quiet`` (``--quiet``, for jobs): no bars and no start lines; the budget table, dpfeta's
  warnings, errors and the summary;
* ``verbose`` (``--verbose``): everything at DEBUG on the console, Ray's worker output included.

Everything else is routed to the log file of the run (``<run dir>/logs/dpfeta.log``, ``log_file``):
the INFO lines of dpfeta, the loggers of Ray, Ray Data, Ray Train, MLflow and absl (dp_accounting's
"failed to converge" chatter), Python warnings, and the stdout/stderr of Ray's workers and actors
(the Train controller, the PlacementGroupCleaner's "Failed to query Ray Train Controller actor
state", rank 0's step lines, Ray Data's progress bars). Ray prints worker output on the driver
through ``ray._private.worker.global_worker_stdstream_dispatcher`` (handler ``ray_print_logs``,
installed by ``ray.init(log_to_driver=True)``); ``after_ray_init`` swaps that handler for one that
writes the lines to the log. If that private hook is missing, ``ray_init_kwargs`` falls back to
``log_to_driver=False`` (the lines then stay in Ray's session logs, ``/tmp/ray/session_*/logs``).

A library caller that never calls ``configure`` keeps Python's and Ray's defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

MODES = ("normal", "quiet", "verbose")
LOG_FILE = "logs/dpfeta.log"
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Loggers of libraries that attach their own console handlers (propagate=False): rerouted to the root.
LIBRARY_LOGGERS = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "mlflow",
    "absl",
    "alembic",
    "werkzeug",
    "py.warnings",
)
WORKER_LOGGER = "ray.workers"  # the stdout/stderr lines of Ray's workers and actors

_mode: Optional[str] = None
_console: Optional[logging.Handler] = None


def mode() -> Optional[str]:
    """The configured mode, or None when the CLI did not configure the console (library use)."""
    return _mode


def quiet() -> bool:
    return _mode == "quiet"


def verbose() -> bool:
    return _mode == "verbose"


class _ConsoleFilter(logging.Filter):
    """normal/quiet: dpfeta's warnings and errors, and anyone's errors (not Ray's: its errors on
    the driver are about workers, and the failure itself reaches the user as dpfeta's error line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "dpfeta" or record.name.startswith("dpfeta."):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR and not record.name.startswith("ray")


class _BarSafeHandler(logging.StreamHandler):
    """A stderr handler that prints above the live progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure(mode: str) -> None:
    """Set up the console for ``mode`` (normal, quiet, verbose); call once, before any work."""
    global _mode, _console
    if mode not in MODES:
        raise ValueError(f"console mode: expected one of {MODES}, got {mode!r}")
    _mode = mode
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if mode == "verbose" else logging.INFO)
    if _console is not None:
        root.removeHandler(_console)
    _console = _BarSafeHandler()
    _console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if mode != "verbose":
        _console.addFilter(_ConsoleFilter())
    root.addHandler(_console)
    if mode != "verbose":
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # MLflow's own download bars
    logging.captureWarnings(True)  # Python warnings -> "py.warnings": the log file (console: --verbose)
    if mode != "verbose":
        warnings.filterwarnings("default")  # shown once each, in the log
    route_libraries()
    from dpfeta import progress

    progress.enable(mode == "normal")


def route_libraries() -> None:
    """Detach the console handlers that Ray, Ray Data, MLflow (and friends) install on import, so their
    records reach the root's handlers (the log file; the console only with --verbose). Their file
    handlers (Ray Data's session log) stay. Idempotent; call again after importing such a library."""
    if _mode is None:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
        if name == "ray.data" or name == "ray":
            logger.setLevel(logging.DEBUG if _mode == "verbose" else logging.INFO)


def ray_init_kwargs() -> dict:
    """Extra ``ray.init`` arguments: worker output stays off the console unless --verbose."""
    if _mode is None or _mode == "verbose":
        return {}
    route_libraries()  # ray's logger (e.g. "Started a local Ray instance") to the log
    return {"log_to_driver": _worker_hook() is not None}


def _worker_hook():
    try:
        from ray._private import worker

        dispatcher = worker.global_worker_stdstream_dispatcher
        return dispatcher if hasattr(dispatcher, "remove_handler") and hasattr(dispatcher, "add_handler") else None
    except (ImportError, AttributeError):
        return None


def _log_worker_lines(data: dict) -> None:
    """One batch of a Ray worker's stdout/stderr lines -> the log (Ray's tqdm_ray frames dropped)."""
    try:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except ImportError:  # pragma: no cover
        RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"
    logger = logging.getLogger(WORKER_LOGGER)
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''})"
    for line in data.get("lines", []):
        if line.strip() and RAY_TQDM_MAGIC not in line:
            logger.info("%s %s", prefix, line.rstrip())


def after_ray_init() -> None:
    """After ``ray.init``: worker lines to the log, Ray's loggers rerouted, Ray Data's bars off."""
    if _mode is None:
        return
    route_libraries()
    if _mode == "verbose":
        return
    dispatcher = _worker_hook()
    if dispatcher is not None:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _log_worker_lines)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        route_libraries()  # ray.data installs its console handler on import
    except (ImportError, AttributeError):  # pragma: no cover
        pass


@contextlib.contextmanager
def log_file(path: Path | str) -> Iterator[Path]:
    """Append every record (INFO and up; DEBUG with --verbose) to ``path`` for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG if _mode == "verbose" else logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
