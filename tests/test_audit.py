"""The gradient-canary audit: canaries through the real DP-SGD step, a correct build stays below the
ledger's epsilon, each deliberately broken build (tests/audit_mutants.py) goes above it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import audit_mutants as mutants
from dpfeta import audit, canaries, checkpoint, config, data, dpsgd, finetune, privacy

# A linear stand-in for the U-Net (the canary block does not depend on the network); small gradients.
PIXELS = 64


def _toy_build(cfg):
    return nn.Linear(PIXELS, 1)


def _toy_loss_rows(module, images, labels, cfg, generator, draws):
    out = module(images.flatten(1)).squeeze(1)
    return (0.01 * out.pow(2)).repeat_interleave(len(draws))


def _adam(params, cfg):
    return torch.optim.Adam(params, lr=1e-3)


TOY = finetune.Task(build=_toy_build, loss_rows=_toy_loss_rows, optimizer=_adam)

# DP-SGD alone at epsilon = 2 over digits at 8x8 (N = 1,258): q = 0.1, T = 20; m = 1,000 canaries.
SETTINGS = ("data.resolution=8", "central.rounds=0", "finetune.init=scratch", "finetune.batch_size=125.8",
            "finetune.epochs=2", "finetune.noise_multiplicity=1", "finetune.physical_batch_size=16",
            "finetune.checkpoint_every=0", "finetune.log_every=0", "privacy.epsilon=2", "privacy.accountant=rdp",
            "tracking.enabled=false")
M = 1000


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cfg = config.load(None, [*SETTINGS, f"run.dir={tmp_path_factory.mktemp('runs')}"])
    return cfg, data.load_splits(cfg).train


def _scores_of(cfg, train, m=M, **kwargs):
    """Train in process with a reporter that keeps the final model; return (plan, scores, included, sums)."""
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    shard = canaries.with_canaries(train, canaries.canary_records(cfg, included), rng)
    pl = privacy.plan(cfg, len(train))
    plan = dataclasses.replace(pl, n=pl.n + m)
    task = canaries.canary_task(canaries=m, base=TOY, **kwargs)
    kept = {}

    def reporter(metrics, ckpt):
        if ckpt is not None:
            kept.update(checkpoint.load(ckpt)["model"])

    cfg = config.replace(cfg, {"run.seed": 0})
    finetune.train_finetune(cfg, shard, plan=plan, init_dir=None, resume_dir=None, task=task, reporter=reporter)
    return pl, kept["scores"].numpy(), included, kept["sums"].numpy()


def _eps_lb(pl, scores, included):
    found = audit.bounds(scores, included, delta=pl.delta)
    return max(b.epsilon for b in found.values()), found


def test_canaries_enter_the_dp_step_like_records(digits, one_thread):
    """Included canaries add ~C per sampled step in units of C/(qN); excluded ones see noise only."""
    cfg, train = digits
    pl, scores, included, sums = _scores_of(cfg, train)
    expected = pl.sample_rate * pl.steps  # clipped to C: one unit per sampled step
    assert abs(sums[included].mean() - expected) < 4 * np.sqrt(pl.steps) * pl.noise_multiplier / np.sqrt(included.sum())
    assert abs(sums[~included].mean()) < 4 * np.sqrt(pl.steps) * pl.noise_multiplier / np.sqrt((~included).sum())
    assert sums[~included].std() == pytest.approx(np.sqrt(pl.steps) * pl.noise_multiplier, rel=0.2)
    eps_lb, _ = _eps_lb(pl, scores, included)
    assert eps_lb <= pl.epsilon


@pytest.mark.parametrize("name", ["noise off", "noise std / 10", "clipping off", "clipping after the sum"])
def test_single_process_mutants_are_detected(digits, one_thread, name):
    cfg, train = digits
    pl, scores, included, _ = _scores_of(cfg, train, dp_step=mutants.DP_STEPS[name])
    eps_lb, found = _eps_lb(pl, scores, included)
    assert eps_lb > pl.epsilon, (name, found)


def test_fixed_batch_is_detected_where_it_can_be(digits, one_thread):
    """A batch reused at every step: the q m / 2 included canaries in it get T times the signal, a
    separation of sqrt(T) / sigma ~ mu / q. Detected with many canaries and a small q (m = 4,000, q = 0.05)."""
    cfg, train = digits
    cfg = config.replace(cfg, {"finetune.batch_size": 62.9})
    pl, scores, included, _ = _scores_of(cfg, train, m=4000, sampler=mutants.FixedBatch)
    eps_lb, found = _eps_lb(pl, scores, included)
    assert eps_lb > pl.epsilon, found


def test_bad_requests_are_refused_before_any_work():
    for m in (0, 1, -5, 2.5, True):
        with pytest.raises(ValueError, match="--canaries"):
            audit.check_request(canaries=m, mode="gradient")
    with pytest.raises(ValueError, match="--mode"):
        audit.check_request(canaries=10, mode="input-space")


def test_cli_refuses_bad_canaries_without_reading_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpfeta", "audit", "--config", "configs/digits.yaml",
                           "--set", f"run.dir={tmp_path}", "--canaries", "0"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "--canaries" in proc.stderr
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# On Ray Train, 2 workers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(mutants)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy task
    yield
    ray.shutdown()


RAY = ("run.num_workers=2", "run.cpus_per_worker=1")


@pytest.mark.slow
def test_ray_audit_of_the_correct_build_and_two_rank_mutants(digits, local_ray, tmp_path):
    """One audit per build, 2 workers: correct stays below, the two per-rank bugs go above."""
    cfg, _ = digits
    cfg = config.load(None, [*SETTINGS, *RAY, f"run.dir={tmp_path}", "run.name=digits"])
    report = audit.run_audit(cfg, canaries=M, seed=1, base=TOY, echo=lambda s: None)
    assert report["epsilon_lb"] <= report["epsilon_dpsgd"] and not report["violation"]
    folder = tmp_path / "digits-audit"
    assert json.loads((folder / "nondp" / "audit.json").read_text())["canaries"] == M
    assert (folder / "nondp" / "audit_scores.png").stat().st_size > 0
    assert not (folder / "release").exists() and not (tmp_path / "digits").exists()
    # ~180 records and a batch of 1 on average: rank 0's local batch is empty at ~1/3 of the T = 396 steps.
    sparse = config.load(None, [*SETTINGS, *RAY, f"run.dir={tmp_path}", "run.name=sparse", "data.val_fraction=0.45",
                                "data.test_fraction=0.45", "central.batch_size=100", "finetune.batch_size=1",
                                "finetune.epochs=2.2"])
    for name, settings in (("one rank's examples unclipped", cfg), ("no noise when rank 0's batch is empty", sparse)):
        report = audit.run_audit(settings, canaries=400, seed=2, base=TOY, dp_step=mutants.DP_STEPS[name],
                                 echo=print)
        assert report["violation"], (name, report["bounds"])
