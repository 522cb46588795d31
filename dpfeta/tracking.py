"""MLflow tracking: an absolute store, the experiment created once, DP vs ``nondp/`` metrics.

* Store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs run.dir>/mlflow.db``
  (never MLflow's cwd-relative default: Ray jobs run in throw-away directories). With a local
  sqlite store, artifacts go to ``<abs run.dir>/mlartifacts`` for the same reason.
* The driver creates the experiment once (``setup``) before anything else writes (sqlite schema race).
* One MLflow run per dpfeta run: its id is kept in ``<run dir>/mlflow_run.json`` so a resumed run
  logs into the same MLflow run; params are logged once (only missing keys on resume: MLflow
  refuses to change a param).
* Metrics: DP quantities (epsilon spent, sigma, q, steps, evaluation of DP outputs against the
  test split) by name; non-DP quantities (loss on sensitive batches, gradient norms, numbers that
  used the training split) under ``nondp/``, dropped entirely when ``tracking.nondp`` is false.
* Best effort: a tracking failure is logged as a warning and never stops training; after
  ``MAX_FAILURES`` failures the run's tracking is switched off.
* Artifacts: a file of the run's ``release/`` folder (``dpfeta.release``) is logged under
  ``release/...``; any other file is operator-internal and goes under ``nondp/...``, or nowhere in
  release mode (``tracking.nondp: false``). So in release mode MLflow holds only files of
  ``release/``, whoever calls ``log_artifact``.
* Never log raw sensitive images, their statistics, per-example data or noise seeds
  (docs/privacy.md §7). The secret config keys (``config.SECRET_KEYS``: ``run.seed``) are redacted by
  ``Tracker.log_params`` itself, whatever the caller passes.

No process learns a run it is not meant to write to (docs/privacy.md §7): the run is never exported
to Ray workers (a runtime_env is inherited by every task and actor, a sweep's trials included), and
there is no process-wide current run: ``start_run`` returns a ``Tracker`` handle that the run's
``RunDir`` holds and passes on. The one worker-side logger, Ray Train's callback
(``distributed.mlflow_callbacks``), is handed the run's uri and id explicitly by the driver; a
process that was not handed a tracker logs nothing. The pyfunc model logger is ``mlflow_model``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpfeta import config as config_mod
from dpfeta import release as release_mod
from dpfeta.config import INFRA_KEYS, SECRET_KEYS, SEED_REDACTED, Config

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
NONDP_PREFIX = "nondp/"
ENV_URI, ENV_RUN_ID = "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"
# Variables through which a process could learn a run: cleared in a process that must not log (``off``).
RUN_ENV = (
    ENV_URI,
    ENV_RUN_ID,
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "DPFETA_TRACKING_NONDP",
    "DPFETA_RELEASE_DIR",
)
MAX_PARAM_CHARS = 6000
MAX_FAILURES = 3  # then the run's tracking is switched off (an unreachable server retries for minutes)


def tracking_uri(cfg: Config) -> Optional[str]:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else an absolute sqlite file under a local run.dir
    (None for an object-store run.dir: a sqlite file there would be lost; use a tracking server)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI]
    if config_mod.is_uri(cfg.run.dir):
        return None
    return f"sqlite:///{Path(cfg.run.dir).expanduser().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def ui_command(uri: str) -> str:
    """How to look at the runs."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _client(uri: str):
    from mlflow import MlflowClient

    from dpfeta import console

    console.route_libraries()  # MLflow's own console handler (e.g. "Creating initial MLflow database tables")
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, uri: str, name: str, artifact_location: Optional[str] = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    path = _sqlite_path(uri)
    location = artifact_location or ((path.parent / "mlartifacts").as_uri() if path is not None else None)
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def setup(cfg: Config) -> Optional[str]:
    """Create the store and the experiment once (driver only). Returns the URI, or None if off/failed."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)
    if uri is None:
        log.warning(
            "tracking off: run.dir %s is an object store and no tracking.uri (or MLFLOW_TRACKING_URI) "
            "names an MLflow server; set one to log this run",
            cfg.run.dir,
        )
        return None
    try:
        _experiment_id(_client(uri), uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    except Exception as exc:  # noqa: BLE001 - tracking is best effort
        log.warning("tracking disabled: cannot set up MLflow at %s (%s)", uri, exc)
        return None
    return uri


def _clean(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class Tracker:
    """Handle on one MLflow run; every method is best effort."""

    uri: str
    run_id: str
    nondp: bool
    release_root: Optional[str] = None  # the run's release/ folder: its files go to MLflow as release/...
    # "epsilon" in a run whose epsilon is the release's total; a naive/public sweep's trial run logs its own
    # composition as "nondp/epsilon_trial" (not a total: the sweep's run states that)
    epsilon_name: str = "epsilon"
    enabled: bool = True
    failures: int = 0
    _cached: Any = field(default=None, repr=False, compare=False)

    @property
    def client(self):
        if self._cached is None:
            self._cached = _client(self.uri)
        return self._cached

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tracking failure must not kill training
            self.failures += 1
            log.warning("tracking: %s failed (%s: %s)", what, type(exc).__name__, exc)
            if self.failures >= MAX_FAILURES:
                log.warning("tracking: %d failures, switching MLflow logging off for this run", self.failures)
                self.enabled = False

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not logged before; a changed value is kept as it was and warned about."""

        def run():
            client = self.client
            logged = client.get_run(self.run_id).data.params
            new = {}
            for key, value in params.items():
                if key in (*SECRET_KEYS, *INFRA_KEYS) and value is not None:
                    value = SEED_REDACTED
                text = str(value)[:MAX_PARAM_CHARS]
                if key not in logged:
                    new[key] = text
                elif logged[key] != text:
                    log.warning("tracking: param %s was logged as %r; keeping it (now %r)", key, logged[key], text)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])

        self._call("log_params", run)

    def _log_metrics(self, metrics: dict[str, Any], step: Optional[int]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, v, now, int(step or 0)) for k, v in ((k, _clean(v)) for k, v in metrics.items()) if v is not None
        ]
        if items:
            self._call("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_dp_metrics(self, metrics: dict[str, Any], *, step: Optional[int] = None) -> None:
        """Metrics that are DP releases (or data-independent): logged under their own names."""
        bad = [k for k in metrics if k.startswith(NONDP_PREFIX)]
        if bad:
            raise ValueError(f"expected DP metric names, got non-DP names {bad}; use log_nondp_metrics")
        if self.epsilon_name != "epsilon" and "epsilon" in metrics:
            metrics = dict(metrics)
            self.log_nondp_metrics({self.epsilon_name: metrics.pop("epsilon")}, step=step)
        self._log_metrics(metrics, step)

    def log_nondp_metrics(self, metrics: dict[str, Any], *, step: Optional[int] = None) -> None:
        """Non-DP metrics: logged under ``nondp/`` only when tracking.nondp is true."""
        if not self.nondp:
            return
        self._log_metrics({k if k.startswith(NONDP_PREFIX) else NONDP_PREFIX + k: v for k, v in metrics.items()}, step)

    def artifact_path_for(self, path: Path, artifact_path: Optional[str] = None) -> Optional[str]:
        """Where ``path`` goes in MLflow: ``release/<its place in release/>`` for a release file,
        else ``nondp/<artifact_path>`` (operator view), or None (not logged: release mode)."""
        if self.release_root is not None:
            root = Path(self.release_root).resolve()
            try:
                rel = path.resolve().relative_to(root)
            except ValueError:
                rel = None
            if rel is not None:
                return "/".join(
                    [release_mod.RELEASE_DIR, *rel.parent.parts]
                    if not path.is_dir()
                    else [release_mod.RELEASE_DIR, *rel.parts]
                )
        if not self.nondp:
            return None
        return NONDP_PREFIX.rstrip("/") + (f"/{artifact_path}" if artifact_path else "")

    def log_artifact(self, path: Path | str, artifact_path: Optional[str] = None) -> None:
        """Log a file or folder: release files under ``release/``, anything else under ``nondp/``
        (nothing in release mode)."""
        path = Path(path)
        if not path.exists():
            log.warning("tracking: no artifact at %s", path)
            return
        artifact_path = self.artifact_path_for(path, artifact_path)
        if artifact_path is None:
            log.debug("tracking: release mode, not logging %s (not a file of release/)", path)
            return
        if path.is_dir():
            self._call("log_artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        def run():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

        self._call("set_tags", run)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end run", lambda: self.client.set_terminated(self.run_id, status))


def start_run(
    cfg: Config,
    run_dir: Path | str | None = None,
    *,
    params: Optional[dict] = None,
    tags: Optional[dict] = None,
    fresh: bool = False,
    trial: bool = False,
) -> Optional[Tracker]:
    """Start (or resume, via ``<run dir>/mlflow_run.json``) the MLflow run of ``cfg``; None when off.

    ``fresh``: never resume; a stored run is deleted and a new one created (a private sweep's run is
    created when its result is known, so its start and end times say nothing of the trials).
    ``trial``: a naive/public sweep's trial run (its ``epsilon`` is logged as ``nondp/epsilon_trial``).
    The handle is the caller's to pass on (a ``RunDir`` holds it): no process-wide current run."""
    uri = setup(cfg)
    if uri is None:
        return None
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir()
    record = run_dir / RUN_FILE
    try:
        client = _client(uri)
        run_id = None
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("uri") == uri:
                try:
                    run_id = client.get_run(saved["run_id"]).info.run_id
                    if fresh:
                        client.delete_run(run_id)
                        run_id = None
                    else:
                        client.update_run(run_id, status="RUNNING")
                except Exception:  # noqa: BLE001 - deleted or another store: start a new run
                    run_id = None
        if run_id is None:
            exp_id = _experiment_id(client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
            run_id = client.create_run(exp_id, run_name=cfg.run.name, tags=dict(tags or {})).info.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(
                json.dumps({"uri": uri, "run_id": run_id, "experiment": cfg.tracking.experiment}, indent=2) + "\n"
            )
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking disabled: cannot start an MLflow run at %s (%s)", uri, exc)
        return None
    tracker = Tracker(
        uri,
        run_id,
        nondp=cfg.tracking.nondp,
        release_root=str(release_mod.release_dir(run_dir).resolve()),
        epsilon_name="nondp/epsilon_trial" if trial else "epsilon",
    )
    if params:
        tracker.log_params(params)
    return tracker


@contextlib.contextmanager
def off():
    """A block in which no library finds a run through the environment (a private sweep's trial): none
    of the variables through which MLflow or a library could find one (``RUN_ENV``), restored after.
    dpfeta's own logging goes through a ``Tracker`` handle only, which such a block is never given."""
    env = {k: os.environ.pop(k) for k in RUN_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(env)


def run_params(cfg: Config, plan) -> dict[str, Any]:
    """The flattened config (noise seed redacted) plus the privacy plan (sigma, q, T, delta, accountant)."""
    params = cfg.public_flat()
    params.update(
        {
            "dp.noise_multiplier": plan.noise_multiplier,
            "dp.q": plan.sample_rate,
            "dp.T": plan.steps,
            "dp.delta": plan.delta,
            "dp.accountant": plan.accountant,
            "dp.N": plan.n,
            "dp.epsilon_planned": plan.epsilon,
            "dp.central_q": plan.central_rate,
        }
    )
    return params


def log_epsilon_curve(tracker: Optional[Tracker], ledger, points: int = 25) -> None:
    """epsilon spent after t DP-SGD steps (central query included), t = 0..T taken.

    epsilon depends only on public quantities (sigma, q, counts), so the curve is computed from the
    ledger rather than collected from the workers.
    """
    if tracker is None:
        return
    mech = ledger.get("dpsgd")
    ledger = type(ledger).from_state_dict(ledger.state_dict())
    for t in sorted({round(i * mech.taken / points) for i in range(points + 1)}):
        ledger.get("dpsgd").taken = t
        tracker.log_dp_metrics({"epsilon": ledger.epsilon()}, step=t)


def log_eval(tracker: Optional[Tracker], result: dict) -> None:
    """An eval.json's metrics: the dp section by name, the nondp section under nondp/."""
    if tracker is None:
        return
    tracker.log_dp_metrics({"epsilon_final": result["epsilon"], **result.get("dp", {})})
    tracker.log_nondp_metrics(result.get("nondp", {}))


def code_version_tags() -> dict[str, str]:
    """The code a run used: git commit of the dpfeta checkout (if it is one), dpfeta and library versions.
    ``mlflow.source.*`` are the tags the MLflow UI shows as the run's source."""
    import subprocess

    import dpfeta

    tags = {"dpfeta.version": dpfeta.__version__, "mlflow.source.name": "dpfeta", "mlflow.source.type": "LOCAL"}
    versions = dpfeta.library_versions("torch", "opacus", "ray", "mlflow", "dp-accounting")
    tags.update({f"dpfeta.{dist}_version": version for dist, version in versions.items() if version is not None})
    where = str(Path(dpfeta.__file__).parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if len(commit) == 40:
        tags.update(
            {
                "mlflow.source.git.commit": commit,
                "dpfeta.git_commit": commit,
                "dpfeta.git_dirty": "true" if dirty else "false",
            }
        )
    return tags


def run_link(tracker: Tracker) -> str:
    """Where to look at the run: its page on a tracking server, or how to open the local store."""
    try:
        exp = tracker.client.get_run(tracker.run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - best effort
        return ui_command(tracker.uri)
    page = f"#/experiments/{exp}/runs/{tracker.run_id}"
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/{page}"
    return f"{ui_command(tracker.uri)}, then http://127.0.0.1:5000/{page}"


def run_description(result: dict) -> str:
    """The run's description (markdown): epsilon and the DP accuracy, or why it is absent. Non-DP
    numbers are never written here (only pointed at under nondp/)."""
    text = (
        f"dpfeta run: epsilon = {result['epsilon']:.4f} spent of {result.get('epsilon_target', result['epsilon']):g} "
        f"(delta {result['delta']:g}, {result['accountant']} accountant, composed over every mechanism)."
    )
    dp = result.get("dp", {})
    if "accuracy" in dp:
        text += f" Downstream accuracy (DP: public test set) = {dp['accuracy']:.4f}."
    elif "accuracy" in result.get("nondp", {}):
        text += " Downstream accuracy: not a DP release (measured on a sensitive test split); see nondp/accuracy."
    else:
        text += " Downstream accuracy: withheld (release mode, the test split is sensitive)."
    if "fid" in dp:
        text += f" FID (DP) = {dp['fid']:.2f}."
    return (
        text + " Published artifacts are under release/ (README.md is the card); the model is the released EMA weights."
    )
