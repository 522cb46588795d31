"""The sweep: its fixed decisions (plan, trial count K, the id key) made once and stored in
``sweep.json`` (the K hyperparameter sets among them); the Ray Tune wiring (one Tune run over the
trials not scored yet, so resuming is running it again); ``run_sweep``."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from typing import Callable, Optional

import numpy as np

from dpfeta import cluster, privacy, runlock
from dpfeta import config as config_mod
from dpfeta.privacy.accounting import quiet_accountant
from dpfeta.privacy.repeat import draw_num_trials
from dpfeta.privacy.sweep import SweepPlan, sweep_plan, sweep_plan_table
from dpfeta.storage import Storage, Workspace
from dpfeta.tune.space import _metric_mode, check_search_space, draw_trials
from dpfeta.tune.spec import FinalFn, TrialFn, TrialSpec, trial_id
from dpfeta.tune.summary import SUMMARY_FILE, SWEEP_FILE, _finish, _plan_params, _rows, _summarize, summary_text
from dpfeta.tune.trial import RESULT_FILE, _trainable, pipeline_trial

log = logging.getLogger(__name__)


EXPERIMENT = "tune"  # the Tune experiment folder under the sweep directory


TRIAL_CPUS = 1.0  # the trial driver (central query, warm-up, sampling, scoring run in it)


def plan_sweep(cfg: config_mod.Config, n: int) -> SweepPlan:
    """The sweep's privacy plan from public facts (N, the config): the search space validated here,
    the accounting in ``privacy.sweep``. The config is revalidated (a dataclasses.replace skips it)."""
    config_mod.validate(cfg)
    return sweep_plan(cfg, n, check_search_space(cfg))


def _fingerprint(cfg: config_mod.Config) -> dict:
    """What must not change when a sweep is resumed (run.* and tracking.* may)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in ("run", "tracking")}


def _same_fingerprint(stored: dict, cfg: config_mod.Config) -> bool:
    """Is ``cfg`` the config a stored sweep was started with? A key the storing version did not have
    (added since) matches when it is at its default now: the stored plan keeps the old behaviour
    (e.g. a sweep.json without tune.central resumes with its central query per trial)."""
    now = json.loads(json.dumps(_fingerprint(cfg)))
    default = json.loads(json.dumps(_fingerprint(config_mod.Config())))
    for section, keys in now.items():
        if isinstance(keys, dict) and isinstance(stored.get(section), dict):
            for key in set(keys) - set(stored[section]):
                if keys[key] == default.get(section, {}).get(key, object()):
                    del keys[key]
    return stored == now


def trials_config(cfg: config_mod.Config) -> tuple[config_mod.Config, int]:
    """The resolved config the trials run on, and its N: the proxy in public mode, else ``cfg``."""
    from dpfeta import data

    if cfg.tune.privacy_mode != "public":
        return cfg, data.public_train_size(cfg)
    proxy = cfg.tune.proxy_data
    if not proxy:
        raise ValueError(
            "config key 'tune.proxy_data': expected data.* overrides naming a public proxy "
            "dataset in tune.privacy_mode=public (e.g. {source: idx, path: /data/emnist}), got {}"
        )
    proxy_cfg = config_mod.replace(cfg, {f"data.{k}": v for k, v in proxy.items()})
    if same_source(proxy_cfg.data, cfg.data):
        raise ValueError(
            f"config key 'tune.proxy_data': expected a public dataset apart from the sensitive "
            f"data, got the same source ({cfg.data.source}, path={cfg.data.path!r}, "
            f"name={cfg.data.name!r}); trials on it would spend budget the sweep does not count"
        )
    if not cfg.tune.proxy_is_public:
        raise ValueError(
            "config key 'tune.proxy_is_public': expected true in tune.privacy_mode=public (the "
            "operator's statement that tune.proxy_data is public data; it is recorded in the "
            "release), got false"
        )
    n = data.public_train_size(proxy_cfg)
    return privacy.resolve(proxy_cfg, n), n


def same_source(a, b) -> bool:
    """Do two data sections name the same data (source, resolved path, torchvision name)?"""
    from dpfeta.data import same_location

    if a.source != b.source or a.name != b.name:
        return False
    if a.path is None or b.path is None:
        return a.path == b.path
    return same_location(a.path, b.path)


def _grid_size(space: dict) -> int:
    return math.prod(len(s["values"]) for s in space.values() if s["type"] == "grid")


def load_state(cfg: config_mod.Config, n: int, ws: Optional[Workspace] = None) -> dict:
    """The sweep's fixed decisions (plan, trial count), made once and stored in ``sweep.json``
    (committed to the sweep's storage before any trial starts).

    A resumed sweep reuses them: sigma is never recalibrated and K is never redrawn.
    """
    ws = ws if ws is not None else Workspace(cfg.run_location())
    path = ws.path(SWEEP_FILE)
    if ws.fetch(SWEEP_FILE):
        state = json.loads(path.read_text())
        if not _same_fingerprint(state["config"], cfg):
            raise ValueError(
                f"a sweep named '{cfg.run.name}' exists in {ws.url()} with a different config; "
                "rerun it unchanged to resume, or choose another run.name"
            )
        if "trials" not in state:  # written by an older version: the draws are made (once) now
            log.warning(
                "sweep '%s' was started by an older dpfeta whose trial folders are named otherwise: "
                "its trials run again under new ids (K and sigma are kept; only the new trials "
                "are scored and selected from)",
                cfg.run.name,
            )
            state["trials"] = draw_trials(cfg.tune.search_space, state["num_trials"], cfg.tune.search_seed)
            _save_state(ws, state)
        return state
    plan = plan_sweep(cfg, n)
    t = cfg.tune
    if t.privacy_mode == "private":
        # Fresh OS entropy: K must be independent of the data and unknown to an observer of the release
        # (run.seed only in tests; the record then says seeded).
        k = draw_num_trials(*plan.repeat(), np.random.default_rng(cfg.run.seed))
    else:
        grid = _grid_size(t.search_space)
        if t.num_trials % grid:
            raise ValueError(
                f"config key 'tune.num_trials': expected a multiple of the grid size {grid}, got {t.num_trials}"
            )
        k = t.num_trials
    state = {
        "config": _fingerprint(cfg),
        "plan": plan.to_dict(),
        "num_trials": k,
        "seeded": cfg.run.seed is not None,
        "id_key": secrets.token_hex(16),  # secret key of the opaque trial ids
        "trials": draw_trials(t.search_space, k, t.search_seed),
    }  # the K hyperparameter sets
    _save_state(ws, state)
    return json.loads(path.read_text())


def _save_state(ws: Workspace, state: dict) -> None:
    path = ws.path(SWEEP_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)
    ws.commit(SWEEP_FILE)


def _scheduler(cfg: config_mod.Config):
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        metric=cfg.tune.metric, mode=_metric_mode(cfg.tune.metric), time_attr="training_iteration", grace_period=1
    )


def _fit(cfg: config_mod.Config, spec: TrialSpec, todo: list[dict]):
    """One Tune run over the trials not scored yet (``todo``: entries of sweep.json's ``trials``).

    The list of trials is the sweep's own (drawn once, in sweep.json), not Tune's search state: a
    resumed sweep starts a new Tune run over what is left instead of ``Tuner.restore``. Tune's state
    on an object store is uploaded as several objects, at most every ``SyncConfig.sync_period``; in
    a test, a restore after the driver was killed hung with the remaining trials never started
    (its searcher still counted a trial as live). A trial that was running resumes its stages from
    its folder; a scored one is not in ``todo``.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(_trainable, spec=spec), {"cpu": TRIAL_CPUS})
    store = Storage(spec.sweep_dir)  # Tune's experiment folder in the sweep's storage (local or object store)
    t = cfg.tune
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(
            num_samples=1,
            scheduler=_scheduler(cfg),
            search_alg=BasicVariantGenerator(max_concurrent=t.max_concurrent_trials),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=store.fs_path(),
            storage_filesystem=None if store.is_local else store.filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            # private: Tune's trial table (every trial's score, K) stays off stdout
            verbose=0 if t.privacy_mode == "private" else None,
        ),
    )
    if t.privacy_mode != "private":
        return tuner.fit()
    # Tune's console table ("Number of trials") prints even at verbose=0 with the new output engine; in
    # private mode that number is K (or the trials left), which stays off stdout (Ray job logs).
    # The legacy reporter prints nothing at verbose=0.
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return tuner.fit()
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def run_sweep(
    cfg: config_mod.Config,
    *,
    trial_fn: Optional[TrialFn] = None,
    final_fn: Optional[FinalFn] = None,
    num_cpus: Optional[int] = None,
    echo: Callable[[str], None] = lambda line: None,
) -> dict:
    """Plan, run (or resume) and summarise the sweep named ``run.name``; returns the summary.

    ``trial_fn(ctx) -> {"correct": int, "val_size": int, ...}`` runs one trial (default: the
    pipeline's stages, ``pipeline_trial``); ``final_fn(cfg)`` the final run of public mode (default:
    ``pipeline.run``). ``echo`` gets the sweep plan (before any data is read) and the summary.
    """
    from dpfeta import data

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # Train reports carry no score
    n = data.public_train_size(cfg)
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)
    cfg = privacy.resolve(cfg, n)
    trials_cfg, trials_n = trials_config(cfg)  # refuses a bad proxy before anything is stored
    cluster.check_reachable(cfg)  # a dead or wrong address: an error now
    ws = Workspace(cfg.run_location())  # the sweep's folder: a local path or an object-store prefix
    try:
        if ws.is_remote:
            ws.remote.check_writable()  # a missing bucket, no permission, no endpoint: an error now
        with runlock.hold(ws.remote):  # one process per sweep directory
            return _sweep(
                cfg, n, ws, trials_cfg, trials_n, trial_fn=trial_fn, final_fn=final_fn, num_cpus=num_cpus, echo=echo
            )
    finally:
        ws.close()


def _sweep(
    cfg: config_mod.Config,
    n: int,
    ws: Workspace,
    trials_cfg: config_mod.Config,
    trials_n: int,
    *,
    trial_fn: Optional[TrialFn],
    final_fn: Optional[FinalFn],
    num_cpus: Optional[int],
    echo: Callable[[str], None],
) -> dict:
    state = load_state(cfg, n, ws)
    plan, mode = SweepPlan.from_dict(state["plan"]), cfg.tune.privacy_mode
    echo(f"sweep plan for '{cfg.run.name}' (no data read yet)\n" + sweep_plan_table(plan))
    if ws.fetch(SUMMARY_FILE):
        log.info("sweep '%s' is complete; its summary is %s", cfg.run.name, ws.url(SUMMARY_FILE))
        summary = json.loads(ws.path(SUMMARY_FILE).read_text())
        echo(summary_text(summary))
        return summary
    if plan.central == "shared":
        shared_central(cfg, n, ws, plan)  # before any trial (and before the MLflow run: no artifacts yet)
    # Private mode releases the selected trial only: no MLflow run per trial, whatever tracking.nondp
    # says (the trials' outputs are not covered by epsilon; repeat-and-select covers the selected one),
    # and the sweep's own run is created when the result is known (``_finish``): a run open during the
    # trials would carry their number in its start and end times.
    log_trials = mode != "private"
    tracker = None if mode == "private" else _start_tracker(cfg, ws, plan)
    spec = TrialSpec(
        base=trials_cfg.to_dict(),
        plan=plan,
        n=trials_n,
        sweep_dir=ws.url(),
        trial_fn=trial_fn or pipeline_trial,
        tracking_uri=tracker.uri if tracker else None,
        parent_run_id=tracker.run_id if tracker else None,
        log_trials=log_trials,
        seed=cfg.run.seed,
        id_key=state["id_key"],
    )
    try:
        todo = [t for t in state["trials"] if not ws.remote.is_file(f"trials/{trial_id(spec, t)}/{RESULT_FILE}")]
        if len(todo) < len(state["trials"]) and mode != "private":  # private: K stays out of the logs
            log.info(
                "sweep '%s': %d of %d trials already scored (kept), running %d",
                cfg.run.name,
                len(state["trials"]) - len(todo),
                len(state["trials"]),
                len(todo),
            )
        grid = None
        if todo:
            with cluster.session(cfg, num_cpus=num_cpus):
                grid = _fit(cfg, spec, todo)
        rows = _rows(ws, spec, state["trials"], grid, cfg.tune.metric)
        summary = _summarize(cfg, state, rows, ws)
        if mode == "public" and summary["best"] is not None:
            summary.update(_final_run(cfg, n, summary["best"]["params"], final_fn, ws))
        _finish(
            cfg,
            summary,
            rows,
            (lambda: _start_tracker(cfg, ws, plan, fresh=True)) if mode == "private" else tracker,
            ws,
        )
        echo(summary_text(summary))
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    return summary


def _start_tracker(cfg: config_mod.Config, ws: Workspace, plan: SweepPlan, *, fresh: bool = False):
    """The sweep's MLflow run (None when tracking is off); ``fresh``: created now (private mode)."""
    from dpfeta.rundir import start_tracker

    return start_tracker(
        cfg,
        ws,
        params={**cfg.public_flat(), **_plan_params(plan)},
        tags={"dpfeta.kind": "sweep", "dpfeta.tune_mode": plan.mode},
        fresh=fresh,
    )


CENTRAL_DIR = "central"  # the sweep's shared central images (<sweep>/central), read by every trial


def shared_central(cfg: config_mod.Config, n: int, ws: Workspace, plan: SweepPlan) -> None:
    """M1 once for the whole sweep (``tune.central`` shared): the pipeline's central stage in the
    sweep's folder, opened as a ``RunDir`` over the sweep's own ``ledger.json`` (the query alone,
    marked shared). Its crash rules are the stage's: counted and committed before the images are
    written, never run twice (a rerun finds ``central/`` or finishes the counted query). It also puts
    the images in the sweep's ``release/central`` (they are released whatever trial is selected)."""
    from dpfeta import data, pipeline
    from dpfeta.rundir import RunDir
    from dpfeta.runplan import check_train_size

    sc = plan.shared_central
    ledger = privacy.Ledger(accountant=plan.accountant, delta=cfg.privacy.delta, n=n, seeded=cfg.run.seed is not None)
    ledger.add(
        "central", noise_multiplier=sc.noise_multiplier, sample_rate=sc.sample_rate, count=sc.rounds, shared=True
    )
    run = RunDir(cfg, ws, ledger)
    run.open_ledger()  # the stored one, checked to be this query's (a rerun never plans it again)
    if run.done(CENTRAL_DIR) and run.published(CENTRAL_DIR):
        return  # done (resume): no data read, and the query is never run again
    splits = data.load_splits(cfg)  # validates the data before any spend
    check_train_size(n, len(splits.train))
    with quiet_accountant():
        pipeline.stage_central(run, splits.train)
    log.info(
        "sweep '%s': shared central images in %s (epsilon %.4f alone; every trial reads them)",
        cfg.run.name,
        ws.url(CENTRAL_DIR),
        sc.epsilon,
    )


def _final_run(cfg: config_mod.Config, n: int, params: dict, final_fn: Optional[FinalFn], ws: Workspace) -> dict:
    """Public mode: the best hyperparameters, one run on the sensitive data with the whole budget,
    in ``<sweep>/final`` (the same storage as the sweep)."""
    final_cfg = config_mod.replace(cfg, {**params, "run.dir": ws.url(), "run.name": "final"})
    with quiet_accountant():
        final_plan = privacy.plan(privacy.resolve(final_cfg, n), n)
    if final_fn is None:
        from dpfeta import pipeline

        final_fn = pipeline.run
    result = final_fn(final_cfg)
    final = {"dir": Storage(final_cfg.run_location()).uri, "sigma": final_plan.noise_multiplier, "result": result}
    return {"epsilon": final_plan.epsilon, "final": final}  # summary.json's key "sigma" is published
