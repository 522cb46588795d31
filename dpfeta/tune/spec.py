"""What a trial is given: the sweep's ``TrialSpec`` (shipped once to every trial), the
``TrialContext`` a trial function gets, the trial's config and its opaque id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dpfeta import config as config_mod
from dpfeta import privacy
from dpfeta.privacy.sweep import SweepPlan
from dpfeta.rundir import RunDir
from dpfeta.storage import Storage, Workspace


@dataclass
class TrialContext:
    """What a trial function gets: its config (noise multiplier fixed), its run folder (plan, ledger, MLflow run)
    and the Tune seams."""

    cfg: config_mod.Config  # search-space values applied, privacy.noise_multiplier = the trial's own
    params: dict[str, Any]
    run: RunDir  # the trial's folder in the sweep's storage; its plan: noise multiplier, q, T; its ledger M1, M2 (+ M3)
    mode: str
    n: int
    trial_id: str

    @property
    def plan(self) -> privacy.Plan:
        return self.run.plan

    @property
    def ledger(self) -> privacy.Ledger:
        return self.run.ledger

    @property
    def ws(self) -> Workspace:
        return self.run.ws

    @property
    def out_dir(self) -> Path:
        """The trial's files on this machine: its folder, or a scratch copy (object store)."""
        return self.run.ws.local

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
    plan: SweepPlan
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


def trial_config(spec: TrialSpec, params: dict, trial_id: str) -> config_mod.Config:
    updates = dict(params)
    updates.update({"run.dir": Storage(spec.sweep_dir).child("trials").uri, "run.name": trial_id})
    if spec.tracking_uri:
        updates["tracking.uri"] = spec.tracking_uri
    if not spec.log_trials:
        updates["tracking.enabled"] = False
    cfg = config_mod.replace(config_mod.from_dict(spec.base), updates)
    config_mod.validate_against_n(cfg, spec.n)
    return cfg
