"""One trial: its config and noise multiplier, its run folder (a ``RunDir`` in the sweep's storage), the trial
function (the pipeline's stage sequence by default), the DP score (M3, ``tune.score``), its result
stored once (a rerun never draws a second noisy score), under an opaque id (``tune.spec``)."""

from __future__ import annotations

import json
import logging
import shutil

from dpfeta import config as config_mod
from dpfeta import tracking
from dpfeta.privacy.accounting import quiet_accountant
from dpfeta.privacy.trial import trial_noise_multiplier, trial_plan
from dpfeta.rundir import LEDGER_FILE, RunDir
from dpfeta.runplan import check_train_size
from dpfeta.storage import Storage, Workspace
from dpfeta.tune.score import score
from dpfeta.tune.spec import TrialContext, TrialSpec, trial_config, trial_id

log = logging.getLogger(__name__)

RESULT_FILE = "trial_result.json"
RELEASE_PARTS = ("central", "model", "samples")  # what a sweep's release copies from the selected trial


def run_trial(spec: TrialSpec, params: dict, trial_id: str) -> dict:
    """One trial: calibrate its noise multiplier, run the trial function, add the DP score. Returns the result.

    Idempotent: a trial that already scored returns its stored result (a rerun after a driver crash
    must not draw a second noisy score); the pipeline stages resume from the trial directory. The
    trial's folder lives in the sweep's storage (``<sweep>/trials/<id>``); on an object store this
    process works in a scratch copy and commits each file (the result last), whatever node it is on.
    """
    cfg = trial_config(spec, params, trial_id)
    ws = Workspace(cfg.run_location())
    try:
        if spec.log_trials:
            return _run_trial(spec, cfg, ws, params, trial_id)
        with tracking.off():  # a private sweep's trial logs nowhere, whatever its process inherited
            return _run_trial(spec, cfg, ws, params, trial_id)
    finally:
        ws.close()


def _run_trial(spec: TrialSpec, cfg: config_mod.Config, ws: Workspace, params: dict, trial_id: str) -> dict:
    if ws.fetch(RESULT_FILE):
        log.info("trial %s: already scored, returning %s", trial_id, ws.url(RESULT_FILE))
        return json.loads(ws.path(RESULT_FILE).read_text())
    noise_multiplier = trial_noise_multiplier(spec.plan, cfg, spec.n)
    plan = trial_plan(spec.plan, cfg, spec.n, noise_multiplier)
    if spec.plan.central == "shared":
        _shared_central(spec, ws)
    cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": noise_multiplier})
    run = RunDir.of(cfg, ws, plan)
    run.write_config()  # the trial's resolved config, its noise multiplier included
    if spec.log_trials and spec.parent_run_id:
        tags = {
            "mlflow.parentRunId": spec.parent_run_id,
            "dpfeta.trial_id": trial_id,
            "dpfeta.sweep": Storage(spec.sweep_dir).uri.rstrip("/").rsplit("/", 1)[-1],
            "dpfeta.tune_mode": spec.plan.mode,
        }
        run.start_tracker(
            params={**tracking.run_params(cfg, plan), **{f"trial/{k}": v for k, v in params.items()}},
            tags=tags,
            trial=True,
        )
    ctx = TrialContext(cfg=cfg, params=dict(params), run=run, mode=spec.plan.mode, n=spec.n, trial_id=trial_id)
    try:
        result = score(spec, run.plan, dict(spec.trial_fn(ctx) or {}), trial_id)  # counted in run.ledger
        result.update(sigma=noise_multiplier, id=trial_id, trial_done=1)  # published key "sigma"; "trial_id" is Ray's
        _record(spec, run, result)  # the count of the score before its result touches the disk
        with run.output(RESULT_FILE) as tmp:  # last: "scored"
            tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    except BaseException:
        run.close("FAILED")
        raise
    if run.tracker is not None:
        # The released total only; one trial's own composition is not a total (naive/public modes only:
        # private sweeps make no per-trial runs).
        run.tracker.log_dp_metrics({k: result[k] for k in ("score", "sigma", "epsilon_total") if k in result})
        run.tracker.log_nondp_metrics({k: result[k] for k in ("epsilon_trial",) if k in result})
        run.log_artifact(run.path("trial_ledger.json"))
        run.close()
    return result


def _record(spec: TrialSpec, run: RunDir, result: dict) -> None:
    """The trial's ledgers (``trial_ledger.json``; the pipeline's ``ledger.json``, if the trial function
    opened one, now with the score counted) and the release parts it left uncommitted, committed."""
    plan = run.plan
    record = {
        **run.ledger.state_dict(),
        "epsilon_trial": result.get("epsilon_trial"),
        "epsilon_if_all_trials_were_this_one": plan.epsilon,
        "epsilon_total": spec.plan.epsilon,
    }
    run.path("trial_ledger.json").write_text(json.dumps(record, indent=2) + "\n")
    run.commit("trial_ledger.json")
    if run.path(LEDGER_FILE).is_file():
        with quiet_accountant():
            run.save_ledger()
    for part in RELEASE_PARTS:  # what the trial function left for the release and did not commit
        rel = f"release/{part}"
        if run.path(rel).is_dir():
            run.commit_once(rel)


def _shared_central(spec: TrialSpec, ws: Workspace) -> None:
    """Copy the sweep's central images (run once, before the trials) into this trial's ``central/``,
    where the central stage finds them and skips its query."""
    if ws.fetch("central"):
        return
    src = Workspace(Storage(spec.sweep_dir))
    try:
        if not src.fetch("central"):
            raise RuntimeError(
                f"internal: the sweep's shared central images are missing from "
                f"{src.url('central')}; a trial never runs its own query in tune.central=shared"
            )
        shutil.copytree(src.path("central"), ws.path("central"), dirs_exist_ok=True)
    finally:
        src.close()
    ws.commit("central")


def pipeline_trial(ctx: TrialContext) -> dict:
    """The real trial: the pipeline's stage sequence in the trial's folder (``train_and_sample``, each
    stage resumable; rank 0's DP-SGD reports reach Tune through TuneReportCallback), then the count of
    correct predictions on the validation split by the reference CNN trained on the synthetic set
    (scored as M3 by the caller)."""
    from dpfeta import data, evaluate, pipeline

    ctx.run.open_ledger()  # resume: the stored sigma is kept
    splits = data.load_splits(ctx.cfg)  # validates before any privacy spend
    check_train_size(ctx.n, len(splits.train))
    if len(splits.val) == 0 and ctx.mode != "public":
        raise ValueError(
            "the DP selection score needs a validation split: set data.val_fraction > 0 (or give the source a val part)"
        )
    _, synthetic = pipeline.train_and_sample(ctx.run, splits.train, callbacks=ctx.train_callbacks())
    e = ctx.cfg.eval
    model = evaluate.train_classifier(
        synthetic,
        epochs=e.classifier_epochs,
        batch_size=e.classifier_batch_size,
        lr=e.classifier_lr,
        label="selection CNN (synthetic)",
    )
    val = splits.test if ctx.mode == "public" and len(splits.val) == 0 else splits.val
    correct = int((evaluate.predict(model, val.images) == val.labels).sum())
    return {"correct": correct, "val_size": len(val), "steps": ctx.ledger.get("dpsgd").taken}


def _trainable(config: dict, spec: TrialSpec) -> None:
    """The Tune function trainable: one trial of sweep.json's list, its final result reported to Tune."""
    from ray import tune

    trial = config["trial"]
    tune.report(run_trial(spec, trial["params"], trial_id(spec, trial)))
