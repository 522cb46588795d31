"""One trial: its config and sigma, the trial function (the pipeline's stages by default), the DP
score (M3), its result stored once (a rerun never draws a second noisy score), under an opaque id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from dp_accounting import dp_event

from dpfeta import config as config_mod
from dpfeta import privacy
from dpfeta.privacy.accounting import quiet_accountant
from dpfeta.privacy.sweep import dp_score, trial_plan, trial_sigma
from dpfeta.storage import Storage, Workspace

log = logging.getLogger(__name__)

@dataclass
class TrialContext:
    """What a trial function gets: its config (sigma fixed), plan and ledger, and the Tune seams."""

    cfg: config_mod.Config  # search-space values applied, privacy.noise_multiplier = this trial's sigma
    params: dict[str, Any]
    plan: privacy.Plan  # sigma, q, T; its ledger holds M1, M2 (+ M3 and the repeat wrapper when tuned)
    out_dir: Path  # the trial's files on this machine (== ws.local): its folder, or a scratch copy
    mode: str
    n: int
    trial_id: str
    ws: Optional[Workspace] = None  # the trial's folder in the sweep's storage (a local path or a URI)

    @property
    def ledger(self) -> privacy.Ledger:
        return self.plan.ledger

    def report(self, metrics: dict[str, Any]) -> None:
        """Intermediate metrics to Tune (DP or data-independent values only)."""
        from ray import tune

        tune.report(dict(metrics))

    def train_callbacks(self) -> list:
        """Callbacks for the TorchTrainer's RunConfig: rank 0's reports go on to Tune (Train V2)."""
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]


TrialFn = Callable[[TrialContext], dict]


FinalFn = Callable[[config_mod.Config], dict]


@dataclass
class TrialSpec:
    """Everything a trial needs, shipped once through ``tune.with_parameters``."""

    base: dict  # the resolved base config (proxy data in public mode)
    plan: dict  # sweep_plan(...)
    n: int  # N of the training split the trials use
    sweep_dir: str  # the sweep's folder: a local path or an object-store URI
    trial_fn: TrialFn
    tracking_uri: Optional[str] = None
    parent_run_id: Optional[str] = None
    log_trials: bool = True
    seed: Optional[int] = None  # run.seed (tests): seeds the score noise; None = OS entropy
    id_key: str = ""  # secret key of the opaque trial ids (sweep.json)


def opaque_id(key: str, name: str) -> str:
    """A trial's public id: a keyed hash of its name in the sweep (whose counter tells its position)."""
    return hashlib.blake2b(name.encode(), key=bytes.fromhex(key), digest_size=8).hexdigest()


def trial_id(spec: TrialSpec, trial: dict) -> str:
    """The opaque id of an entry of sweep.json's ``trials`` (the same on every resume)."""
    return opaque_id(spec.id_key, f"trial-{int(trial['index'])}")


def _trial_config(spec: TrialSpec, params: dict, trial_id: str) -> config_mod.Config:
    updates = dict(params)
    updates.update({"run.dir": Storage(spec.sweep_dir).child("trials").uri, "run.name": trial_id})
    if spec.tracking_uri:
        updates["tracking.uri"] = spec.tracking_uri
    if not spec.log_trials:
        updates["tracking.enabled"] = False
    cfg = config_mod.replace(config_mod.from_dict(spec.base), updates)
    config_mod.validate_against_n(cfg, spec.n)
    return cfg


RESULT_FILE = "trial_result.json"
RELEASE_PARTS = ("central", "model", "samples")  # what a sweep's release copies from the selected trial


def run_trial(spec: TrialSpec, params: dict, trial_id: str) -> dict:
    """One trial: calibrate its sigma, run the trial function, add the DP score. Returns the result.

    Idempotent: a trial that already scored returns its stored result (a rerun after a driver crash
    must not draw a second noisy score); the pipeline stages resume from the trial directory. The
    trial's folder lives in the sweep's storage (``<sweep>/trials/<id>``); on an object store this
    process works in a scratch copy and commits each file (the result last), whatever node it is on.
    """
    from dpfeta import tracking

    cfg = _trial_config(spec, params, trial_id)
    ws = Workspace(cfg.run_location())
    try:
        if spec.log_trials:
            return _run_trial(spec, cfg, ws, params, trial_id)
        with tracking.off():  # a private sweep's trial logs nowhere, whatever its process inherited
            return _run_trial(spec, cfg, ws, params, trial_id)
    finally:
        ws.close()


def _run_trial(spec: TrialSpec, cfg: config_mod.Config, ws: Workspace, params: dict, trial_id: str) -> dict:
    from dpfeta import tracking

    out_dir = ws.local
    if ws.fetch(RESULT_FILE):
        log.info("trial %s: already scored, returning %s", trial_id, ws.url(RESULT_FILE))
        return json.loads(ws.path(RESULT_FILE).read_text())
    sigma = trial_sigma(spec.plan, cfg, spec.n)
    plan = trial_plan(spec.plan, cfg, spec.n, sigma)
    if spec.plan.get("central") == "shared":
        _shared_central(spec, ws)
    cfg = config_mod.replace(cfg, {"privacy.noise_multiplier": sigma})
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(out_dir / "config.json")  # the trial's resolved config, its sigma included
    ws.commit("config.json")
    tracker = None
    if spec.log_trials and spec.parent_run_id:
        tags = {"mlflow.parentRunId": spec.parent_run_id, "dpfeta.trial_id": trial_id,
                "dpfeta.sweep": Storage(spec.sweep_dir).uri.rstrip("/").rsplit("/", 1)[-1],
                "dpfeta.tune_mode": spec.plan["mode"]}
        trial_params = {**tracking.run_params(cfg, plan), **{f"trial/{k}": v for k, v in params.items()}}
        ws.fetch(tracking.RUN_FILE)
        tracker = tracking.start_run(cfg, out_dir, params=trial_params, tags=tags, trial=True)
        if tracker is not None and ws.path(tracking.RUN_FILE).is_file():
            ws.commit(tracking.RUN_FILE)
    ctx = TrialContext(cfg=cfg, params=dict(params), plan=plan, out_dir=out_dir,
                       mode=spec.plan["mode"], n=spec.n, trial_id=trial_id, ws=ws)
    try:
        out = dict(spec.trial_fn(ctx) or {})
        plan = ctx.plan  # the trial function may have reopened it (resume)
        result = _score(spec, plan, out, trial_id)
        result.update(sigma=sigma, id=trial_id, trial_done=1)  # "trial_id" is Ray's own (a counter)
        record = {**plan.ledger.state_dict(), "epsilon_trial": result.get("epsilon_trial"),
                  "epsilon_if_all_trials_were_this_one": plan.epsilon, "epsilon_total": spec.plan["epsilon"]}
        (out_dir / "trial_ledger.json").write_text(json.dumps(record, indent=2) + "\n")
        ws.commit("trial_ledger.json")
        if (out_dir / "ledger.json").is_file():  # the pipeline's ledger, now with the score recorded
            with quiet_accountant():
                plan.ledger.save(out_dir / "ledger.json")
            ws.commit("ledger.json")
        for part in RELEASE_PARTS:  # what the trial function left for the release and did not commit
            rel = f"release/{part}"
            if ws.is_remote and ws.path(rel).is_dir() and not ws.remote.committed(rel):
                ws.commit(rel)
        tmp = out_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out_dir / RESULT_FILE)
        ws.commit(RESULT_FILE)  # last: "scored"
    except BaseException:
        if tracker is not None:
            tracking.end_run("FAILED")
        raise
    if tracker is not None:
        # The released total only; one trial's own composition is not a total (naive/public modes only:
        # private sweeps make no per-trial runs).
        tracker.log_dp_metrics({k: result[k] for k in ("score", "sigma", "epsilon_total") if k in result})
        tracker.log_nondp_metrics({k: result[k] for k in ("epsilon_trial",) if k in result})
        tracker.log_artifact(out_dir / "trial_ledger.json")
        tracking.end_run()
    return result


def _shared_central(spec: TrialSpec, ws: Workspace) -> None:
    """Copy the sweep's central images (run once, before the trials) into this trial's ``central/``,
    where the central stage finds them and skips its query."""
    if ws.fetch("central"):
        return
    src = Workspace(Storage(spec.sweep_dir))
    try:
        if not src.fetch("central"):
            raise RuntimeError(f"internal: the sweep's shared central images are missing from "
                               f"{src.url('central')}; a trial never runs its own query in tune.central=shared")
        shutil.copytree(src.path("central"), ws.path("central"), dirs_exist_ok=True)
    finally:
        src.close()
    ws.commit("central")


def _score(spec: TrialSpec, plan: privacy.Plan, out: dict, trial_id: str) -> dict:
    """The trial's result: its metrics, the score (DP in private/naive mode) and its epsilon."""
    mode = spec.plan["mode"]
    result = {k: v for k, v in out.items() if k not in ("correct", "val_size")}
    result["epsilon_total"] = spec.plan["epsilon"]
    has_count = "correct" in out and "val_size" in out
    if mode == "public":  # the proxy is public: the exact accuracy is free
        if has_count:
            result["score"] = int(out["correct"]) / int(out["val_size"])
        return result
    if not has_count:
        raise ValueError("a trial function must return 'correct' and 'val_size' (the count of correct "
                         f"validation predictions and the public validation size), got {sorted(out)}")
    seed = None if spec.seed is None else [spec.seed, zlib.crc32(trial_id.encode())]
    result["score"] = dp_score(int(out["correct"]), int(out["val_size"]), sigma_v=spec.plan["score_noise"],
                               rng=np.random.default_rng(seed))
    result["val_size"] = int(out["val_size"])  # public (a data-independent rule on the public N), never "correct"
    plan.ledger.record_steps("selection", 1)
    for mech in plan.ledger.mechanisms:  # a stage that did not record its steps: count the whole plan
        if mech.taken == 0:
            plan.ledger.record_steps(mech.name, mech.planned)
    with quiet_accountant():
        result["epsilon_trial"] = privacy.epsilon_of(
            dp_event.ComposedDpEvent([m.event(m.taken) for m in plan.ledger.mechanisms]),
            delta=plan.delta, accountant=spec.plan["accountant"])
    return result


def pipeline_trial(ctx: TrialContext) -> dict:
    """The real trial, through the pipeline's stages in the trial directory (each resumable):
    central images (M1) -> warm-up -> DP fine-tuning on the TorchTrainer (M2; rank 0's reports
    reach Tune through TuneReportCallback) -> sampling -> the count of correct predictions on the
    validation split by the reference CNN trained on the synthetic set (scored as M3 by the caller).
    """
    from dpfeta import data, evaluate, pipeline

    cfg, ws = ctx.cfg, ctx.ws if ctx.ws is not None else Workspace(ctx.out_dir)
    pl = pipeline.open_ledger(ws, ctx.plan)  # resume: the stored sigma is kept
    ctx.plan = pl
    splits = data.load_splits(cfg)  # validates before any privacy spend
    if len(splits.train) != ctx.n:
        raise ValueError(f"data: the sweep plan used N={ctx.n} but the training split has "
                         f"{len(splits.train)} records; set data.n_train to the true size")
    if len(splits.val) == 0 and ctx.mode != "public":
        raise ValueError("the DP selection score needs a validation split: set data.val_fraction > 0 "
                         "(or give the source a val part)")
    central_set = pipeline.stage_central(cfg, ws, pl, splits.train)
    init = pipeline.stage_warmup(cfg, ws, central_set)
    weights = pipeline.stage_finetune(cfg, ws, pl, splits.train, init, callbacks=ctx.train_callbacks())
    synthetic = pipeline.stage_sample(cfg, ws, weights)
    pipeline.put_model(ws, weights)  # the trial's release/ (central, samples, model) if selected
    e = cfg.eval
    model = evaluate.train_classifier(synthetic, epochs=e.classifier_epochs, batch_size=e.classifier_batch_size,
                                      lr=e.classifier_lr, label="selection CNN (synthetic)")
    val = splits.test if ctx.mode == "public" and len(splits.val) == 0 else splits.val
    correct = int((evaluate.predict(model, val.images) == val.labels).sum())
    return {"correct": correct, "val_size": len(val), "steps": pl.ledger.get("dpsgd").taken}


def _trainable(config: dict, spec: TrialSpec) -> None:
    """The Tune function trainable: one trial of sweep.json's list, its final result reported to Tune."""
    from ray import tune

    trial = config["trial"]
    tune.report(run_trial(spec, trial["params"], trial_id(spec, trial)))

