"""What a private sweep publishes, checked on the path users take (docs/privacy.md §7, "what an observer of the
published run sees"): ``dpfeta tune`` as a subprocess with no Ray running, real trials (central -> warm-up ->
DP-SGD on Ray Train -> samples -> DP score, tiny sizes), release mode, K >= 5 trials.

The observer sees release/ (files, their names, counts and times), the MLflow run(s) of the sweep (params,
tags, metric histories, start and end times, artifacts, description) and the job's stdout/stderr. Nothing of
it may depend on K, the selected trial's position or another trial.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import conftest
import numpy as np
import pytest

from dpfeta import config, release, tune
from dpfeta.tune.space import draw_trials

pytestmark = [pytest.mark.slow, pytest.mark.long]  # K real trials on a Ray cluster the CLI starts: minutes

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "warmup.steps": {"type": "choice", "values": [1, 2]},
    "finetune.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-3},
}  # continuous: a draw names its index
SETTINGS = [
    # tiny real stages (an 8x8 U-Net of ~9k parameters, a few warm-up and DP-SGD steps)
    *conftest.TINY,
    "finetune.batch_size=64",
    "finetune.epochs=0.1",
    "central.noise_multiplier=2.0",
    "central.batch_size=100",
    "central.rounds=2",
    "run.cpus_per_worker=0.5",
    "run.max_failures=0",
    # the sweep: private, release mode, tracked; run.seed=7 draws K = 5 of a mean of 6 (and is redacted)
    "tune.privacy_mode=private",
    "tune.num_trials=6",
    "run.seed=7",
    "tune.search_seed=5",
    f"tune.search_space={json.dumps(SPACE)}",
    "tracking.enabled=true",
    "tracking.nondp=false",
    "run.name=integrity",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One private sweep through the CLI; returns (cfg, stdout+stderr, wall seconds)."""
    base = tmp_path_factory.mktemp("integrity")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    overrides = [*SETTINGS, f"run.dir={base / 'runs'}", f"tracking.uri={uri}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "dpfeta", "tune", "--config", "configs/digits.yaml"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    cfg = config.load("configs/digits.yaml", overrides)
    return cfg, proc.stdout + proc.stderr, wall


def _summary(cfg) -> dict:
    return json.loads((cfg.run_dir() / tune.SUMMARY_FILE).read_text())


def _runs(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps])
    return client, runs


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_the_sweep_ran_k_real_trials(sweep):
    cfg, _, _ = sweep
    summary = _summary(cfg)
    assert summary["num_trials"] >= 5
    assert all(r["status"] == "done" for r in summary["trials"])
    best = Path(summary["best"]["dir"])
    assert (best / "samples" / "grid.png").is_file()  # a real trial: its samples exist


def test_every_published_metric_history_has_one_entry(sweep):
    """No K-long history: the trials never learn the sweep's run (C1), and the run holds the result only."""
    cfg, _, _ = sweep
    client, runs = _runs(cfg)
    assert len(runs) == 1, [r.info.run_name for r in runs]  # private: no per-trial runs
    (run,) = runs
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == 1, (key, [(m.step, m.value) for m in history])
    assert set(run.data.metrics) == {"epsilon", "selected/score", "selected/noise_multiplier"}
    assert run.data.metrics["epsilon"] == pytest.approx(_summary(cfg)["epsilon"])
    logged = _artifacts(client, run.info.run_id)
    assert logged and all(p.startswith("release/") for p in logged), logged  # release mode: nothing else
    root = release.release_dir(cfg.run_dir())
    for path in logged:
        assert (root / path[len("release/") :]).is_file(), path


def test_the_published_run_is_created_when_the_result_is_known(sweep):
    """Its start..end span would be ~K trial durations if it were opened before the trials (M2)."""
    cfg, _, wall = sweep
    _, (run,) = _runs(cfg)
    span = (run.info.end_time - run.info.start_time) / 1000
    assert run.info.status == "FINISHED"
    assert span < min(15.0, wall / 5), (span, wall)


def test_every_file_of_the_release_carries_one_time(sweep):
    cfg, _, _ = sweep
    root = release.release_dir(cfg.run_dir())
    times = {p.stat().st_mtime for p in root.rglob("*")}
    assert len(times) == 1, sorted(times)[:3]


def test_nothing_published_names_k_a_position_or_another_trial(sweep):
    cfg, console, _ = sweep
    summary = _summary(cfg)
    k, best = summary["num_trials"], summary["best"]
    others = [r for r in summary["trials"] if r["trial_id"] != best["trial_id"]]
    client, (run,) = _runs(cfg)
    root = release.release_dir(cfg.run_dir())

    published = [(str(p), p.read_text(errors="replace")) for p in root.rglob("*") if p.is_file()]
    published += [(f"param {k_}", f"{k_}={v}") for k_, v in run.data.params.items()]
    published += [(f"tag {k_}", f"{k_}={v}") for k_, v in run.data.tags.items()]
    published += [("job output", console)]
    for where, text in published:
        assert not re.search(r"\b[0-9a-f]{5}_\d{5}\b", text), where  # Ray's trial counters
        assert "Number of trials" not in text and "trials already scored" not in text, where
        assert not re.search(rf"\b{k}\s+(trials|trial\(s\))", text), where
        assert "trials.csv" not in text or where == "job output", where
        for row in others:
            assert row["trial_id"] not in text, where
            assert not re.search(rf"(?<![\d.]){re.escape(str(row['score']))}(?!\d)", text), where
        # infrastructure: the tracking store and the run folder's path are not published (m8)
        if where != "job output":
            assert str(cfg.run.dir) not in text and cfg.tracking.uri not in text, where

    # the hyperparameter draws cannot be replayed: the search seed is a secret like run.seed (M1)
    public = json.loads((root / release.CONFIG_FILE).read_text())
    assert public["tune"]["search_seed"] == config.SEED_REDACTED == run.data.params["tune.search_seed"]
    assert public["run"]["seed"] == config.SEED_REDACTED
    record = json.loads((root / release.RECORD_FILE).read_text())
    assert record["seeded"] is True
    # ... and were the seed known, the release would give the position: the redaction is what protects it
    selected = json.loads((root / release.SELECTION_FILE).read_text())["selected"]["params"]
    replay = [t["params"] for t in draw_trials(SPACE, 50, cfg.tune.search_seed)]
    assert selected in replay


def test_the_released_numbers_state_the_sweep_bound(sweep):
    """ledger.json, release.json, the model's meta.json: the sweep's total, not the trial's own (m1); the
    validation split and the unit of privacy are stated (m3, m9)."""
    cfg, _, _ = sweep
    total = _summary(cfg)["epsilon"]
    root = release.release_dir(cfg.run_dir())
    ledger = json.loads((root / release.LEDGER_FILE).read_text())
    record = json.loads((root / release.RECORD_FILE).read_text())
    meta = json.loads((root / "model" / "meta.json").read_text())
    assert ledger["epsilon_spent"] == pytest.approx(total, rel=1e-9)
    assert ledger["epsilon_planned"] >= total * (1 - 1e-9)
    assert record["epsilon"] == pytest.approx(total, rel=1e-9)
    assert record["epsilon_planned"] >= total * (1 - 1e-9)
    assert meta["epsilon"] == pytest.approx(total, rel=1e-9)
    facts = " ".join(record["public_facts"])
    assert "validation split" in facts and re.search(r"validation split: \d+ records", facts)
    card = (root / release.CARD_FILE).read_text()
    assert "one record" in card and "group privacy" in card
    assert np.isfinite(total) and total <= cfg.privacy.epsilon * (1 + 1e-9)
