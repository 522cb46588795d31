"""A run's folder and its spending protocol, in one place: ``RunDir``.

One object holds what a run's stages share: the resolved config, the folder (``storage.Workspace``:
a local folder, or a scratch copy of an object-store prefix), the privacy plan whose ledger is
``ledger.json``, and the MLflow run (a ``tracking.Tracker``, or None: nothing is logged). Every stage
follows the same crash protocol, written here once:

    done(rel)        skip: the committed output exists (fetched into the scratch copy)
    spend(m, count)  count: the ledger saved and committed *before* the mechanism's output touches the
                     disk (docs/privacy.md §3), so a crash can lose an output but never a count
    output(rel)      write: a scratch ``<rel>.tmp`` folder or file, atomically put in place, committed
    publish(...)     the release record (release/), committed, its files sent to MLflow

The folder (``<run.dir>/<run.name>``, a local path or an object-store prefix)::

    config.json      the resolved config (central sigma fixed); a resume must match it
    ledger.json      every mechanism, steps taken, composed epsilon; updated after each spending stage
    central/         DP central images (M1) + grid.png
    checkpoints/     warmup/ (no privacy cost), finetune/ (M2, Ray Train)
    samples/         synthetic set (images/<label>/*.png), grid.png, samples.json
    eval.json        epsilon (composed total), delta, accountant; "dp" and "nondp" metric sections
    release/         exactly what may be published (dpfeta.release): central images, the final
                     weights, samples, DP metrics, ledger.json, config.json, release.json, README.md
    mlflow_run.json  the MLflow run this directory logs into

A rerun of the same command resumes: ``open`` checks the stored config and keeps the stored ledger's
sigma (never recalibrated). Used by ``pipeline`` (a run), ``tune.trial`` (a trial's folder) and
``tune.sweep`` (the sweep's shared central query, under the sweep's own ledger). Nothing here knows
where a stage runs (``cluster``) or what it computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from dpfeta import console, data, privacy, release, storage, tracking
from dpfeta.config import Config
from dpfeta.storage import Storage, Workspace

log = logging.getLogger(__name__)

CONFIG_FILE, LEDGER_FILE = "config.json", "ledger.json"
# Sections whose change makes a run directory's outputs or ledger invalid.
RESUME_SECTIONS = ("data", "central", "model", "diffusion", "warmup", "finetune", "privacy")
RELEASE_FILES = (release.LEDGER_FILE, release.CONFIG_FILE, release.RECORD_FILE, release.CARD_FILE, release.METRICS_FILE)


@dataclasses.dataclass
class RunDir:
    """The run's config, folder, ledger (``ledger.json``) with the plan it belongs to, and MLflow run.

    ``plan`` is None for a folder that holds one mechanism's ledger only (a sweep's shared central
    query); otherwise ``plan.ledger is ledger``."""

    cfg: Config
    ws: Workspace
    ledger: privacy.Ledger
    plan: Optional[privacy.Plan] = None
    tracker: Optional[tracking.Tracker] = None

    @classmethod
    def of(cls, cfg: Config, ws: Workspace, plan: privacy.Plan) -> "RunDir":
        """A run folder of ``plan`` as it is (nothing read or written: see ``open``)."""
        return cls(cfg, ws, plan.ledger, plan)

    @classmethod
    def open(
        cls, cfg: Config, plan: privacy.Plan, *, ws: Optional[Workspace] = None, tags: Optional[dict] = None
    ) -> "RunDir":
        """Open (or resume) the run of ``cfg``: refuse a folder started with another config, write
        ``config.json``, load or write ``ledger.json`` (a stored sigma is kept), start the MLflow run."""
        run = cls.of(cfg, ws if ws is not None else Workspace(cfg.run_location()), plan)
        run.check_resume()
        run.write_config()
        run.open_ledger()
        run.start_tracker(params=tracking.run_params(cfg, run.plan), tags=tags)
        return run

    # -- the folder ---------------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        """Where ``rel`` is on this machine (the run's folder, or the scratch copy)."""
        return self.ws.path(rel)

    def url(self, rel: str = "") -> str:
        return self.ws.url(rel)

    def location(self, rel: str) -> Storage:
        """``rel`` in the run's storage, for a task or worker that reads or writes it itself."""
        return self.ws.remote.child(rel)

    def remote_location(self, rel: str) -> Optional[Storage]:
        """``location(rel)`` on an object store; None for a local run folder."""
        return self.location(rel) if self.ws.is_remote else None

    def done(self, rel: str) -> bool:
        """Is the committed output ``rel`` there? (Fetched into ``path(rel)`` when it is.)"""
        return self.ws.fetch(rel)

    def commit(self, rel: str) -> None:
        """Publish ``path(rel)`` to the store (nothing to do for a local folder)."""
        self.ws.commit(rel)

    def commit_once(self, rel: str) -> None:
        """Commit the folder ``path(rel)`` unless the store holds it committed already."""
        if self.ws.is_remote and not self.ws.remote.committed(rel):
            self.commit(rel)

    def scratch(self, rel: str) -> Path:
        """Where ``output(rel)`` writes before it lands (left by an interrupted block)."""
        return self.ws.path(rel + ".tmp")

    @contextlib.contextmanager
    def output(self, rel: str) -> Iterator[Path]:
        """Write ``rel``: the block writes the path it gets (a file or a folder, emptied first); when it
        ends without an error, that replaces ``rel`` atomically and is committed. A spending stage calls
        ``spend`` before this block (or inside it, before writing)."""
        tmp = self.scratch(rel)
        _remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        self.land(rel)

    def land(self, rel: str) -> None:
        """Put ``scratch(rel)`` in place of ``rel`` and commit it (also: finish an interrupted output)."""
        final = self.ws.path(rel)
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(self.scratch(rel), final)
        self.commit(rel)

    def stored(self, path: Path | Storage) -> Storage:
        """A folder of the run as a storage location a task can read (committed first if need be)."""
        if isinstance(path, Storage):
            return path
        if not self.ws.is_remote:
            return Storage(path)
        rel = Path(path).resolve().relative_to(self.ws.local.resolve()).as_posix()
        self.commit_once(rel)
        return self.location(rel)

    def pull(self, rel: str) -> None:
        """The files tasks wrote to the store under ``rel`` (no marker yet), into ``path(rel)``."""
        if self.ws.is_remote:
            self.ws.remote.get_files(rel, self.ws.path(rel))

    def commit_files(self, rel: str, names: tuple[str, ...]) -> None:
        """Commit the folder ``rel`` whose other files tasks wrote to the store: ``names`` from here,
        then its marker."""
        if self.ws.is_remote:
            for name in names:
                self.ws.remote.write_bytes(f"{rel}/{name}", self.ws.path(f"{rel}/{name}").read_bytes())
            self.ws.remote.mark_committed(rel)

    # -- config and ledger --------------------------------------------------------------------

    def check_resume(self) -> None:
        """Refuse a run folder started with another config (the sections of ``RESUME_SECTIONS``)."""
        if not self.ws.fetch(CONFIG_FILE):
            return
        saved, now = json.loads(self.path(CONFIG_FILE).read_text()), self.cfg.to_dict()
        changed = [f"{s}.{k}" for s in RESUME_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
        if changed:
            raise ValueError(
                f"run directory '{self.url()}' was started with a different config "
                f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); rerun with the "
                "same config to resume, or pick a new run.name"
            )

    def write_config(self) -> None:
        """``config.json``: the resolved config (noise seed redacted), committed."""
        self.path(CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
        self.cfg.dump(self.path(CONFIG_FILE))
        self.commit(CONFIG_FILE)

    def open_ledger(self) -> Optional[privacy.Plan]:
        """Load ``ledger.json`` (resume: its sigma is kept, never recalibrated) or write the planned one.

        Refuses a stored ledger of another plan (``Ledger.check_same_plan``, through ``privacy.check_resume``:
        the one resume guard; q, T and N here, the stored sigma kept), and a stored plan whose epsilon
        (recomputed now) is above the target (e.g. after an accountant upgrade): continuing it would end
        above the target."""
        path = self.path(LEDGER_FILE)
        if not self.ws.fetch(LEDGER_FILE):
            self.save_ledger()
            return self.plan
        stored = privacy.Ledger.load(path)
        self.ledger.check_same_plan(stored, where=f"'{path}'")
        if self.plan is not None:
            self.plan = _resumed(self.plan, stored, path)
        self.ledger = stored
        return self.plan

    def save_ledger(self) -> None:
        """``ledger.json`` saved and committed (a failed commit raises here)."""
        self.ledger.save(self.path(LEDGER_FILE))
        self.commit(LEDGER_FILE)

    def spend(self, mechanism: str, count: int) -> float:
        """Count ``count`` compositions of ``mechanism`` as taken (a total, not a delta) and return the
        composed epsilon. The privacy rule lives here: the ledger is counted, saved and committed
        *before* any of the mechanism's output is written, so a failed commit raises before the output
        exists and a crash after it can lose the output but never the count (the ledger never
        under-reports). Call it before ``output``."""
        self.ledger.record_steps(mechanism, count)
        self.save_ledger()
        eps = self.ledger.epsilon()
        if mechanism == "central":
            self.log_dp_metrics({"epsilon": eps}, step=0)
        return eps

    # -- the release and MLflow ---------------------------------------------------------------

    def publish(self, metrics: Optional[dict] = None) -> None:
        """Refresh the release record (ledger, config, card), commit it and send its files to MLflow."""
        release.record(
            self.ws.local,
            kind="run",
            ledger=self.ledger,
            public_config=self.cfg.public_dict(),
            metrics=metrics,
            extra_facts=release_facts(self.cfg),
        )
        root = release.release_dir(self.ws.local)
        for name in RELEASE_FILES:
            if (root / name).is_file():
                self.commit(f"{release.RELEASE_DIR}/{name}")
                self.log_artifact(root / name)
        if (root / "model" / "meta.json").is_file():  # restated by the record (the release's epsilon and ledger)
            self.commit(f"{release.RELEASE_DIR}/model/meta.json")

    def published(self, name: str) -> bool:
        """Is ``release/<name>`` there (committed)?"""
        return self.done(f"{release.RELEASE_DIR}/{name}")

    def publish_dir(self, src: Path, name: str) -> Path:
        """Copy a stage's folder into ``release/<name>`` and commit it; returns it."""
        shown = release.put_dir(self.ws.local, src, name)
        self.commit(f"{release.RELEASE_DIR}/{name}")
        return shown

    def publish_model(self, weights: Path) -> Path:
        """The final weights into ``release/model``, committed; returns it."""
        model = release.put_model(self.ws.local, weights)
        self.commit(f"{release.RELEASE_DIR}/model")
        return model

    def start_tracker(self, **kwargs: Any) -> Optional[tracking.Tracker]:
        """Start (or resume) the run's MLflow run (``tracking.start_run`` keywords)."""
        self.tracker = start_tracker(self.cfg, self.ws, **kwargs)
        return self.tracker

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(path, artifact_path)

    def log_dp_metrics(self, metrics: dict, *, step: Optional[int] = None) -> None:
        if self.tracker is not None:
            self.tracker.log_dp_metrics(metrics, step=step)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run (the folder is its opener's to close)."""
        if self.tracker is not None:
            self.tracker.end(status)
            self.tracker = None


def _resumed(pl: privacy.Plan, stored: privacy.Ledger, path: Path) -> privacy.Plan:
    """The plan with the stored ledger (checked to be the same plan): its sigma, never recalibrated."""
    sigma = stored.get("dpsgd").noise_multiplier
    if not math.isclose(sigma, pl.noise_multiplier, rel_tol=1e-6):
        log.warning(
            "resume: keeping the stored sigma=%.6g (the config now calibrates to %.6g)", sigma, pl.noise_multiplier
        )
    planned = stored.epsilon(planned=True)
    if planned > pl.target_epsilon * (1 + 1e-9):
        raise ValueError(
            f"'{path}' holds a plan of epsilon={planned:.6g} (recomputed by this version's "
            f"{stored.accountant} accountant), above the target privacy.epsilon={pl.target_epsilon:g}; "
            "it cannot be resumed within the budget: start a new run.name"
        )
    return dataclasses.replace(pl, noise_multiplier=sigma, ledger=stored, epsilon=planned)


def start_tracker(cfg: Config, ws: Workspace, **kwargs: Any) -> Optional[tracking.Tracker]:
    """The MLflow run of the folder ``ws`` (resumed through its ``mlflow_run.json``, which is committed)."""
    ws.fetch(tracking.RUN_FILE)
    tracker = tracking.start_run(cfg, ws.local, **kwargs)
    if tracker is not None and ws.path(tracking.RUN_FILE).is_file():
        ws.commit(tracking.RUN_FILE)
    return tracker


def release_facts(cfg: Config) -> dict:
    """Public facts of a release beyond privacy.PUBLIC_FACTS (where the test split comes from)."""
    return {"test split": data.test_split_fact(cfg)[1]}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextlib.contextmanager
def log_file(ws: Workspace):
    """``<run dir>/logs/dpfeta.log`` (appended on resume), committed at the end of the run."""
    ws.fetch(console.LOG_FILE)
    try:
        with console.log_file(ws.path(console.LOG_FILE)):
            yield
    finally:
        try:
            ws.commit(console.LOG_FILE)
        except storage.StorageError as exc:
            log.warning("could not commit the run's log %s (%s)", ws.url(console.LOG_FILE), exc)
