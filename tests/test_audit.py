"""The gradient-canary audit: canaries through the real DP-SGD step, a correct build stays below the
ledger's epsilon, each deliberately broken build (tests/audit_mutants.py) goes above it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import audit_mutants as mutants
import numpy as np
import pytest
import torch
from torch import nn

from dpfeta import audit, canaries, checkpoint, config, data, finetune, privacy

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
SETTINGS = (
    "data.resolution=8",
    "central.rounds=0",
    "finetune.init=scratch",
    "finetune.batch_size=125.8",
    "finetune.epochs=2",
    "finetune.noise_multiplicity=1",
    "finetune.physical_batch_size=16",
    "finetune.checkpoint_every=0",
    "finetune.log_every=0",
    "privacy.epsilon=2",
    "privacy.accountant=rdp",
    "tracking.enabled=false",
)
M = 1000


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cfg = config.load(None, [*SETTINGS, f"run.dir={tmp_path_factory.mktemp('runs')}"])
    return cfg, data.load_splits(cfg).train


def _with_canaries(cfg, train, m):
    """(plan of the split without canaries, the split with m canaries, the inclusion bits); seed 0."""
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    shard = canaries.with_canaries(train, canaries.canary_records(cfg, included), rng)
    return privacy.plan(cfg, len(train)), shard, included


def _scores_of(cfg, train, m=M, **kwargs):
    """Train in process with a reporter that keeps the final model; return (plan, scores, included, sums)."""
    pl, shard, included = _with_canaries(cfg, train, m)
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


def test_the_report_says_when_m_canaries_cannot_show_a_violation():
    """At delta 1e-5 even a perfect separation of 1,000 canaries certifies at most 8.49 (f-DP): below the
    DP-SGD epsilon of the digits run at epsilon 10 (9.41); 4,000 reach above it."""
    top = audit.ceiling(1000, 1e-5)
    assert top == pytest.approx({"one_run": 4.755, "fdp": 8.491}, abs=2e-3)
    assert audit.ceiling(4000, 1e-5)["fdp"] > 10.5
    bound = {"epsilon": 2.4, "guesses": 56, "correct": 54}
    report = {
        "mode": "gradient",
        "build": "correct",
        "canaries": 1000,
        "included": 500,
        "noise_multiplier": 1.05,
        "sample_rate": 0.2,
        "steps": 50,
        "max_grad_norm": 1.0,
        "workers": 2,
        "seconds": 60.0,
        "epsilon_ledger": 10.0,
        "epsilon_dpsgd": 9.41,
        "delta": 1e-5,
        "accountant": "pld",
        "confidence": 0.95,
        "bounds": {"one_run": bound, "fdp": bound},
        "ideal": None,
        "auroc": 0.8,
        "epsilon_lb": 2.4,
        "violation": False,
        "ceiling": top,
    }
    assert "no violation could be seen" in audit.report_text(report)
    assert "no violation could be seen" not in audit.report_text({**report, "epsilon_dpsgd": 0.95})


def test_bad_requests_are_refused_before_any_work():
    for m in (0, 1, -5, 2.5, True):
        with pytest.raises(ValueError, match="--canaries"):
            audit.check_request(canaries=m, mode="gradient")
    with pytest.raises(ValueError, match="--mode"):
        audit.check_request(canaries=10, mode="input-space")
    with pytest.raises(ValueError, match="--mode input .* not implemented yet; use --mode gradient"):
        audit.check_request(canaries=10, mode="input")


@pytest.mark.slow
def test_cli_refuses_bad_canaries_without_reading_data(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpfeta",
            "audit",
            "--config",
            "configs/digits.yaml",
            "--set",
            f"run.dir={tmp_path}",
            "--canaries",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2 and "--canaries" in proc.stderr
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Two ranks: a plain torch.distributed group (the per-rank mutants), and Ray Train (the correct build)
# --------------------------------------------------------------------------------------------

RANK_BUILDS = ("correct", "one rank's examples unclipped", "no noise when rank 0's batch is empty")
RANK_CANARIES = 400
NOISE_RANK_RECORDS = 8  # rank 0's shard: its local batch is empty at 0.9^8 ~ 43 % of the T = 20 steps


def _rank_child(rank: int, port: int, cfg, train, out: str) -> None:
    """One rank of a 2-process gloo group: each build of RANK_BUILDS in turn, rank 0 saves the scores.

    Uneven shards, as ``streaming_split(equal=False)`` may give: the noise rank (0) holds a few records,
    rank 1 the rest and so nearly every canary. That is the setting where 'no noise when rank 0's batch
    is empty' can leak (at the run's even split rank 0's batch is never empty); the correct build runs
    on the same split and must stay below.
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = config.replace(cfg, {"run.seed": 0})
        pl, records, included = _with_canaries(cfg, train, RANK_CANARIES)
        plan = dataclasses.replace(pl, n=pl.n + RANK_CANARIES)
        index = np.arange(len(records))
        index = index[:NOISE_RANK_RECORDS] if rank == 0 else index[NOISE_RANK_RECORDS:]
        shard = data.ImageSet(records.images[index], records.labels[index], records.num_classes)
        for name in RANK_BUILDS:
            task = canaries.canary_task(canaries=RANK_CANARIES, base=TOY, dp_step=mutants.DP_STEPS.get(name))
            kept = {}

            def reporter(metrics, ckpt, kept=kept):
                if ckpt is not None:
                    kept.update(checkpoint.load(ckpt)["model"])

            finetune.train_finetune(
                cfg,
                shard,
                plan=plan,
                init_dir=None,
                resume_dir=None,
                task=task,
                reporter=reporter,
                worker=finetune.Worker(rank, 2),
            )
            if rank == 0:
                np.save(Path(out) / f"{RANK_BUILDS.index(name)}.npy", kept["scores"].numpy())
        if rank == 0:
            np.save(Path(out) / "included.npy", included)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_mutants_are_detected_in_a_two_process_group(digits, tmp_path):
    """The two per-rank bugs on 2 ranks (gloo, spawned processes; Ray Train adds nothing to the DP step
    but ~1 minute of start-up: bench/audit.py audits them on Ray Train): both go above epsilon, the
    correct build on the same uneven split stays below."""
    import socket

    import torch.multiprocessing as mp

    cfg, train = digits
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_child, args=(rank, port, cfg, train, str(tmp_path))) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    included = np.load(tmp_path / "included.npy")
    pl = privacy.plan(cfg, len(train))
    for i, name in enumerate(RANK_BUILDS):
        eps_lb, found = _eps_lb(pl, np.load(tmp_path / f"{i}.npy"), included)
        if name == "correct":
            assert eps_lb <= pl.epsilon, found
        else:
            assert eps_lb > pl.epsilon, (name, found)


@pytest.fixture(scope="module")
def audit_ray(local_ray):
    """The session's local Ray (tests/conftest.py), the toy task and the mutants pickled by value to it."""
    local_ray.cloudpickle.register_pickle_by_value(mutants)
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy task
    return local_ray


RAY = ("run.num_workers=2", "run.cpus_per_worker=1")


@pytest.mark.slow
@pytest.mark.long
def test_ray_audit_of_the_correct_build(digits, audit_ray, tmp_path):
    """``run_audit`` end to end on Ray Train, 2 workers: below epsilon, the report and histogram under
    nondp/, no release and no run folder."""
    cfg, _ = digits
    cfg = config.load(None, [*SETTINGS, *RAY, f"run.dir={tmp_path}", "run.name=digits"])
    report = audit.run_audit(cfg, canaries=M, seed=1, base=TOY, echo=lambda s: None)
    assert report["epsilon_lb"] <= report["epsilon_dpsgd"] and not report["violation"]
    assert report["workers"] == 2 and report["canaries"] == M
    folder = tmp_path / "digits-audit"
    assert json.loads((folder / "nondp" / "audit.json").read_text())["canaries"] == M
    assert (folder / "nondp" / "audit_scores.png").stat().st_size > 0
    assert not (folder / "release").exists() and not (tmp_path / "digits").exists()
