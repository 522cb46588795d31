"""Sweeps on a local Ray (one for the module): each tuning mode end to end, MLflow parent/nested
runs, Train V2 reports reaching Tune, resume after the driver is killed, and one sweep through
the real pipeline stages (docs/privacy.md §6).

Trials use stand-in trial functions (a fixed "accuracy" per hyperparameter, counted on the real
validation-split size) except ``test_private_sweep_through_the_pipeline``; the accounting checks
build their events directly from dp_accounting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from dp_accounting import dp_event, rdp

from dpfeta import config, data, privacy, release, tune

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "central.rounds": {"type": "randint", "lower": 1, "upper": 4},
    "warmup.steps": {"type": "choice", "values": [1, 2]},
}
FAST = [
    "central.noise_multiplier=2.0",
    "central.batch_size=100",
    "central.rounds=2",
    "finetune.batch_size=64",
    "finetune.epochs=1",
    "tracking.enabled=false",
    "run.seed=1",
    "run.max_failures=0",
    f"tune.search_space={json.dumps(SPACE)}",
]
# Tiny real stages (a few warm-up and DP-SGD steps, an 8x8 U-Net of ~9k parameters).
TINY = [*conftest.TINY, "finetune.epochs=0.1", "run.cpus_per_worker=0.5"]
DELTA = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """The session's local Ray (conftest); trial functions defined here travel by value (the tests
    folder is not importable on workers)."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cfg(tmp_path, mode, *overrides):
    return config.load(
        "configs/digits.yaml",
        [*FAST, f"run.dir={tmp_path}", f"run.name={mode}", f"tune.privacy_mode={mode}", *overrides],
    )


def fake_trial(ctx):
    """Stand-in: more central rounds and warm-up score better; the count is out of the real val size.
    It leaves a stand-in release (central grid, model) naming its trial, to trace what is published."""
    marker = ctx.out_dir / "runs.txt"
    with marker.open("a") as f:
        f.write("run\n")
    for part in ("central", "model"):
        (ctx.out_dir / "release" / part).mkdir(parents=True, exist_ok=True)
        (ctx.out_dir / "release" / part / "stand-in.txt").write_text(f"output of trial {ctx.trial_id}\n")
    val_size = 180  # digits: 10 % of 1,797
    correct = 60 + 30 * ctx.cfg.central.rounds + 5 * ctx.cfg.warmup.steps
    if (ctx.out_dir.parents[1] / "SLOW").exists():  # <sweep dir>/SLOW: the resume test's slow trials
        time.sleep(4)
    return {"correct": correct, "val_size": val_size}


def _poisson_gaussian(q, sigma, count):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), count)


def _trial_event(trial_cfg_dict, sigma, n, sigma_v):
    c, f = trial_cfg_dict["central"], trial_cfg_dict["finetune"]
    q = f["batch_size"] / n
    parts = [_poisson_gaussian(q, sigma, math.ceil(f["epochs"] / q - 1e-9)), dp_event.GaussianDpEvent(sigma_v)]
    if c["rounds"]:
        parts.insert(0, _poisson_gaussian(c["batch_size"] / n, c["noise_multiplier"], c["rounds"]))
    return dp_event.ComposedDpEvent(parts)


def _rdp_epsilon(event):
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def _check_trials(summary, k):
    assert summary["num_trials"] == k and len(summary["trials"]) == k
    assert all(r["status"] == "done" for r in summary["trials"])
    best = max(summary["trials"], key=lambda r: r["score"])
    assert summary["best"]["trial_id"] == best["trial_id"]


def _mlflow(tmp_path, cfg):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return client, runs


def _artifacts(client, run_id, path=None):
    for a in client.list_artifacts(run_id, path):
        yield from (_artifacts(client, run_id, a.path) if a.is_dir else [a.path])


def test_private_sweep_accounts_the_whole_search(tmp_path):
    cfg = _cfg(tmp_path, "private", "tracking.enabled=true")  # run.seed=1: K = 3 trials
    summary = tune.run_sweep(cfg, trial_fn=fake_trial)
    _check_trials(summary, 3)
    n = data.public_train_size(cfg)
    state = json.loads((cfg.run_dir() / tune.SWEEP_FILE).read_text())
    t = cfg.tune
    # Independent: every realised trial (its own sigma and central rounds) repeated-and-selected
    # stays within the total, and the reference trial's bound is the reported total.
    for row in summary["trials"]:
        trial_cfg = json.loads((cfg.run_dir() / "trials" / row["trial_id"] / "config.json").read_text())
        assert trial_cfg["privacy"]["noise_multiplier"] == pytest.approx(row["sigma"])
        event = dp_event.RepeatAndSelectDpEvent(
            _trial_event(trial_cfg, row["sigma"], n, t.score_noise), t.num_trials, t.tnb_eta
        )
        assert _rdp_epsilon(event) <= cfg.privacy.epsilon
        assert row["sigma"] <= state["plan"]["trial_sigma"] * (1 + 1e-12)
    ref = state["plan"]["reference"]
    worst = dp_event.RepeatAndSelectDpEvent(
        dp_event.ComposedDpEvent(
            [
                _poisson_gaussian(ref["q_c"], ref["sigma_c"], ref["rounds"]),
                _poisson_gaussian(ref["q"], ref["sigma"], ref["steps"]),
                dp_event.GaussianDpEvent(t.score_noise),
            ]
        ),
        t.num_trials,
        t.tnb_eta,
    )
    assert ref["rounds"] == 3  # randint(1, 4): at most 3 rounds
    assert _rdp_epsilon(worst) == pytest.approx(summary["epsilon"], rel=1e-9)
    assert summary["epsilon"] <= cfg.privacy.epsilon and summary["epsilon"] == pytest.approx(10.0, rel=1e-3)
    # The release names the selected trial only (opaque id): no trial count, no other scores.
    root = release.release_dir(cfg.run_dir())
    record = json.loads((root / release.RECORD_FILE).read_text())
    selection = json.loads((root / release.SELECTION_FILE).read_text())
    assert selection["selected"]["id"] == summary["best"]["trial_id"] and "trials" not in selection
    assert record["epsilon"] == pytest.approx(summary["epsilon"]) and record["seeded"] is True
    assert (root / "central" / "stand-in.txt").read_text() == f"output of trial {summary['best']['trial_id']}\n"
    # MLflow: one run (no run per trial, whatever tracking.nondp says); the summary under nondp/ only.
    client, runs = _mlflow(tmp_path, cfg)
    (parent,) = runs
    assert parent.data.tags["dpfeta.selected"] == summary["best"]["trial_id"]
    assert parent.data.metrics["epsilon"] == pytest.approx(summary["epsilon"])
    logged = set(_artifacts(client, parent.info.run_id))
    assert {p for p in logged if not p.startswith("release/")} == {"nondp/summary.json", "nondp/trials.csv"}
    assert "release/release.json" in logged and "release/central/stand-in.txt" in logged


@pytest.mark.parametrize("nondp", [False, True])
def test_a_private_sweep_publishes_only_the_selected_trial(tmp_path, nondp, capfd):
    """K >= 5 trials drawn (a large mean); nothing published -- release/, MLflow params, tags, metric
    names and artifacts outside nondp/ -- tells a trial's position, another trial's score, K, or
    holds a non-selected trial's output; nor does the console (Ray job logs): no Tune trial table."""
    cfg = _cfg(
        tmp_path,
        "private",
        "tracking.enabled=true",
        f"tracking.nondp={str(nondp).lower()}",
        "tune.num_trials=12",
        "run.seed=3",
    )
    capfd.readouterr()
    summary = tune.run_sweep(cfg, trial_fn=fake_trial, echo=print)
    console = capfd.readouterr()
    assert "sweep plan for" in console.out and "selected" in console.out  # what dpfeta prints: no K
    for stream in (console.out, console.err):
        assert "Number of trials" not in stream and "num_trials" not in stream
    k = summary["num_trials"]
    assert k >= 5
    _check_trials(summary, k)
    selected = summary["best"]["trial_id"]
    others = [r for r in summary["trials"] if r["trial_id"] != selected]
    import re

    ray_ids = {
        m.group(0)
        for d in (cfg.run_dir() / tune.EXPERIMENT).iterdir()
        if d.is_dir()
        for m in [re.search(r"[0-9a-f]{5}_\d{5}", d.name)]
        if m
    }
    assert len(ray_ids) == k
    client, runs = _mlflow(tmp_path, cfg)
    (parent,) = runs  # no per-trial runs

    published = []  # (where, text)
    root = release.release_dir(cfg.run_dir())
    files = [p for p in root.rglob("*") if p.is_file()]
    published += [(str(p), p.read_text()) for p in files]
    published += [(f"param {k_}", f"{k_}={v}") for k_, v in parent.data.params.items()]
    published += [(f"tag {k_}", f"{k_}={v}") for k_, v in parent.data.tags.items() if not k_.startswith("mlflow.")]
    published += [(f"metric {k_}", f"{k_}={v}") for k_, v in parent.data.metrics.items()]
    artifacts = set(_artifacts(client, parent.info.run_id))
    for path in artifacts:
        if path.startswith("nondp/"):
            continue
        assert path.startswith("release/") and (root / path[len("release/") :]).is_file(), path
        local = client.download_artifacts(parent.info.run_id, path, str(tmp_path / "dl"))
        assert Path(local).read_bytes() == (root / path[len("release/") :]).read_bytes()
        published.append((f"artifact {path}", Path(local).read_text()))
    if not nondp:
        assert not [p for p in artifacts if p.startswith("nondp/")]

    for where, text in published:
        assert not re.search(r"_\d{5}\b", text), where  # Ray's counter ids: the trial's position
        for rid in ray_ids:
            assert rid not in text, where
        for row in others:
            assert row["trial_id"] not in text, where  # nor another trial's id, output or score
            # the score as a number, not as a substring of another (a score of 0.5 = 90.00 / 180 is in 0.577...)
            assert not re.search(rf"(?<![\d.]){re.escape(str(row['score']))}(?!\d)", text), where
        assert 'num_trials": ' + str(k) not in text and "trials.csv" not in text, where
    # names: the public config, the sweep plan, the released total and the selected trial only
    assert set(parent.data.params) <= set(cfg.public_flat()) | {
        f"sweep.{k}"
        for k in ("mode", "accountant", "epsilon", "trial_sigma", "single_sigma", "penalty", "score_noise", "trials")
    }
    assert set(parent.data.metrics) == {"epsilon", "selected/score", "selected/noise_multiplier"}
    assert {k for k in parent.data.tags if not k.startswith("mlflow.")} == {
        "dpfeta.kind",
        "dpfeta.tune_mode",
        "dpfeta.selected",
    }
    assert parent.data.params["run.seed"] == config.SEED_REDACTED
    assert (root / "model" / "stand-in.txt").read_text() == f"output of trial {selected}\n"
    assert "seeded" in json.loads((root / release.RECORD_FILE).read_text())


def test_shared_central_images_are_queried_once_for_the_whole_sweep(tmp_path):
    """No central key searched: the sweep queries the central images once, before the trials; every
    trial reads those; the release counts the query once, outside the repeat; a rerun never queries
    again, and a counted query whose images are lost is refused, not repeated."""
    space = {"warmup.steps": {"type": "choice", "values": [1, 2]}}
    cfg = _cfg(tmp_path, "private", "tune.num_trials=3", "run.seed=3", f"tune.search_space={json.dumps(space)}")
    summary = tune.run_sweep(cfg, trial_fn=fake_trial)
    k = summary["num_trials"]
    _check_trials(summary, k)
    root, sweep = release.release_dir(cfg.run_dir()), cfg.run_dir()
    assert summary["plan"]["central"] == "shared"
    (own,) = json.loads((sweep / "ledger.json").read_text())["mechanisms"]  # the sweep's: the query alone
    assert (own["name"], own["taken"], own["shared"]) == ("central", 2, True)
    central_files = sorted(p.relative_to(sweep / "central") for p in (sweep / "central").rglob("*") if p.is_file())
    assert "central.json" in {str(p) for p in central_files}
    for row in summary["trials"]:  # every trial holds the sweep's images, byte for byte
        trial = sweep / "trials" / row["trial_id"]
        for rel in central_files:
            assert (trial / "central" / rel).read_bytes() == (sweep / "central" / rel).read_bytes()
        assert json.loads((trial / "trial_ledger.json").read_text())["mechanisms"][0]["shared"] is True
    # the released ledger: the query once (shared), then the selected trial's DP-SGD + score, repeated
    ledger = json.loads((root / release.LEDGER_FILE).read_text())
    assert [(m["name"], m["shared"], m["taken"]) for m in ledger["mechanisms"]] == [
        ("central", True, 2),
        ("dpsgd", False, ledger["mechanisms"][1]["planned"]),
        ("selection", False, 1),
    ]
    n, t = data.public_train_size(cfg), cfg.tune
    q, steps = 64 / n, ledger["mechanisms"][1]["planned"]
    independent = _rdp_epsilon(
        dp_event.ComposedDpEvent(
            [
                _poisson_gaussian(100 / n, 2.0, 2),
                dp_event.RepeatAndSelectDpEvent(
                    dp_event.ComposedDpEvent(
                        [_poisson_gaussian(q, summary["best"]["sigma"], steps), dp_event.GaussianDpEvent(t.score_noise)]
                    ),
                    t.num_trials,
                    t.tnb_eta,
                ),
            ]
        )
    )
    assert independent == pytest.approx(summary["epsilon"], rel=1e-9) and summary["epsilon"] <= cfg.privacy.epsilon
    record = json.loads((root / release.RECORD_FILE).read_text())
    assert record["epsilon"] == pytest.approx(independent, rel=1e-9)
    assert "shared" in json.loads((root / release.SELECTION_FILE).read_text())["note"]
    # a rerun (a trial to score again) reuses the query: the sweep's images and ledger are untouched
    stamp = {p: p.stat().st_mtime_ns for p in (sweep / "central").rglob("*") if p.is_file()}
    stored_ledger = (sweep / "ledger.json").read_text()
    (sweep / tune.SUMMARY_FILE).unlink()
    (sweep / "trials" / summary["trials"][0]["trial_id"] / tune.RESULT_FILE).unlink()
    again = tune.run_sweep(cfg, trial_fn=fake_trial)
    _check_trials(again, k)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp and (sweep / "ledger.json").read_text() == stored_ledger
    # the counted query's images lost: refused (a second query would spend again), the ledger kept
    import shutil

    shutil.rmtree(sweep / "central")
    shutil.rmtree(root / "central")
    (sweep / tune.SUMMARY_FILE).unlink()
    with pytest.raises(RuntimeError, match="second query"):
        tune.run_sweep(cfg, trial_fn=fake_trial)
    assert (sweep / "ledger.json").read_text() == stored_ledger


def test_naive_sweep_composes_k_trials(tmp_path):
    cfg = _cfg(tmp_path, "naive", "tune.num_trials=3", "tune.scheduler=asha")
    summary = tune.run_sweep(cfg, trial_fn=fake_trial)
    _check_trials(summary, 3)
    n = data.public_train_size(cfg)
    events = []
    for row in summary["trials"]:
        trial_cfg = json.loads((cfg.run_dir() / "trials" / row["trial_id"] / "config.json").read_text())
        events.append(_trial_event(trial_cfg, row["sigma"], n, cfg.tune.score_noise))
    realised = _rdp_epsilon(dp_event.ComposedDpEvent(events))  # the three trials actually run
    assert realised <= summary["epsilon"] * (1 + 1e-9) <= cfg.privacy.epsilon
    assert summary["epsilon"] == pytest.approx(10.0, rel=1e-3)
    selection = json.loads((release.release_dir(cfg.run_dir()) / release.SELECTION_FILE).read_text())
    assert "composed" in selection["note"]


def _public_proxy(tmp_path) -> str:
    """A public proxy on disk: another dataset (npz), not the sensitive digits."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "proxy.npz"
    np.savez(path, x=rng.integers(0, 256, (1000, 8, 8), dtype=np.uint8), y=np.arange(1000) % 10)
    return str(path)


def test_public_sweep_refuses_the_sensitive_data_as_proxy(tmp_path):
    cfg = _cfg(tmp_path, "public", "tune.num_trials=3", "tune.proxy_data={split_seed: 7}", "tune.proxy_is_public=true")
    with pytest.raises(ValueError, match="same source"):
        tune.run_sweep(cfg, trial_fn=fake_trial)
    cfg = _cfg(
        tmp_path, "public", "tune.num_trials=3", f"tune.proxy_data={{source: npz, path: {_public_proxy(tmp_path)}}}"
    )
    with pytest.raises(ValueError, match="proxy_is_public"):
        tune.run_sweep(cfg, trial_fn=fake_trial)
    assert not (tmp_path / "public" / "trials").exists()


@pytest.mark.long  # the real pipeline in a sweep: minutes
def test_public_sweep_spends_only_the_final_run(tmp_path):
    finals = []

    def final_fn(final_cfg):
        finals.append(final_cfg)
        return {"accuracy": 0.5}

    proxy = _public_proxy(tmp_path)
    cfg = _cfg(
        tmp_path,
        "public",
        "tune.num_trials=3",
        "tune.proxy_is_public=true",
        f"tune.proxy_data={{source: npz, path: {proxy}, val_fraction: 0.2}}",
    )
    summary = tune.run_sweep(cfg, trial_fn=fake_trial, final_fn=final_fn)
    _check_trials(summary, 3)
    # trials ran on the proxy (its own split, its own N)
    trial_cfg = json.loads((cfg.run_dir() / "trials" / summary["best"]["trial_id"] / "config.json").read_text())
    assert trial_cfg["data"]["source"] == "npz" and trial_cfg["data"]["val_fraction"] == 0.2
    # the final run: the sensitive data, the best hyperparameters, the whole budget
    (final,) = finals
    assert final.data.source == "digits"
    assert final.central.rounds == summary["best"]["params"]["central.rounds"]
    n = data.public_train_size(cfg)
    q = 64 / n
    event = dp_event.ComposedDpEvent(
        [
            _poisson_gaussian(100 / n, 2.0, final.central.rounds),
            _poisson_gaussian(q, summary["final"]["sigma"], math.ceil(1 / q)),
        ]
    )
    # the final run is a single run: privacy.accountant auto accounts it with PLD, the tighter
    eps = privacy.epsilon_of(event, delta=cfg.privacy.delta, accountant="pld")
    assert summary["epsilon"] == pytest.approx(eps, rel=1e-6) and eps <= cfg.privacy.epsilon
    assert eps == pytest.approx(10.0, rel=2e-3) and _rdp_epsilon(event) > cfg.privacy.epsilon


def test_train_reports_reach_tune(tmp_path):
    """The Ray 2.60 Train V2 pattern: a TorchTrainer inside the trial, TuneReportCallback forwarding."""

    def trainer_trial(ctx):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        def loop(config):
            for step in range(1, 4):
                ray.train.report({"step": step, "epsilon": 0.1 * step})

        TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(
                name=f"train-{ctx.trial_id}", storage_path=str(ctx.out_dir / "ray"), callbacks=ctx.train_callbacks()
            ),
        ).fit()
        return {"correct": 100, "val_size": 180}

    cfg = _cfg(tmp_path, "naive", "tune.num_trials=1", "tune.search_space={}")
    summary = tune.run_sweep(cfg, trial_fn=trainer_trial)
    (trial,) = summary["trials"]
    rows = [
        json.loads(line)
        for line in next((tmp_path / "naive" / tune.EXPERIMENT).glob("*/result.json")).read_text().splitlines()
    ]
    assert [r.get("step") for r in rows[:3]] == [1, 2, 3]  # rank 0's reports, live
    assert rows[-1]["trial_done"] == 1 and rows[-1]["score"] == pytest.approx(trial["score"])


DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
from dpfeta import config, tune
sys.path.insert(0, {tests!r})
import ray, test_tune_ray
ray.cloudpickle.register_pickle_by_value(test_tune_ray)
from test_tune_ray import fake_trial
cfg = config.load("configs/digits.yaml", json.loads(sys.argv[1]))
tune.run_sweep(cfg, trial_fn=fake_trial)
"""


def test_resume_after_the_driver_is_killed(tmp_path):
    overrides = [*FAST, f"run.dir={tmp_path}", "run.name=resume", "tune.privacy_mode=private"]
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / "tests")))
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "SLOW").touch()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(overrides)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trials = tmp_path / "resume" / "trials"
    try:
        deadline = time.time() + 240
        while not list(trials.glob(f"*/{tune.RESULT_FILE}")):
            assert proc.poll() is None, "the driver ended before any trial finished"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
        proc.wait()
    finished = {p.parent.name for p in trials.glob(f"*/{tune.RESULT_FILE}")}
    assert 1 <= len(finished) < 3
    state = json.loads((tmp_path / "resume" / tune.SWEEP_FILE).read_text())
    assert not (tmp_path / "resume" / tune.SUMMARY_FILE).exists()

    (tmp_path / "resume" / "SLOW").unlink()
    cfg = config.load("configs/digits.yaml", overrides)  # the same command again
    summary = tune.run_sweep(cfg, trial_fn=fake_trial)
    _check_trials(summary, state["num_trials"])
    assert json.loads((tmp_path / "resume" / tune.SWEEP_FILE).read_text()) == state  # K and sigma kept
    for trial_id in finished:  # a finished trial is never trained or scored again
        assert (trials / trial_id / "runs.txt").read_text().count("run") == 1
        stored = json.loads((trials / trial_id / tune.RESULT_FILE).read_text())
        assert next(r for r in summary["trials"] if r["trial_id"] == trial_id)["score"] == stored["score"]
    # a finished sweep answers with its summary
    assert tune.run_sweep(cfg, trial_fn=fake_trial) == summary


@pytest.mark.long  # the real pipeline in a sweep: minutes
@pytest.mark.parametrize("central", ["per_trial", "shared"])
def test_private_sweep_through_the_pipeline(tmp_path, central):
    """The real trial: central -> warm-up -> DP-SGD on the TorchTrainer -> samples -> DP score.
    Shared: the sweep's own query, whose images the trial's central stage finds and does not redo."""
    space = SPACE if central == "per_trial" else {"warmup.steps": {"type": "choice", "values": [1, 2]}}
    cfg = _cfg(
        tmp_path,
        "private",
        *TINY,
        "run.seed=0",  # seed 0: K = 1 trial (the stages, once)
        f"tune.search_space={json.dumps(space)}",
        f"tune.central={central}",
    )
    summary = tune.run_sweep(cfg)
    (row,) = summary["trials"]
    trial_dir = Path(summary["best"]["dir"])
    assert row["status"] == "done" and -0.5 < row["score"] < 1.5  # a noisy accuracy (sigma_v / 180 ~ 0.06)
    ledger = json.loads((trial_dir / "ledger.json").read_text())
    assert [m["shared"] for m in ledger["mechanisms"]] == [central == "shared", False, False]
    if central == "shared":
        sweep = cfg.run_dir()
        assert json.loads((sweep / "ledger.json").read_text())["mechanisms"][0]["taken"] == 2
        for name in ("central.json", "grid.png"):
            assert (trial_dir / "central" / name).read_bytes() == (sweep / "central" / name).read_bytes()
        released = json.loads((release.release_dir(sweep) / release.LEDGER_FILE).read_text())
        assert released["mechanisms"] == ledger["mechanisms"] and released["groups"] == []  # groups: internal
        assert released["epsilon_spent"] == pytest.approx(summary["epsilon"])  # the sweep's bound
    taken = {m["name"]: m["taken"] for m in ledger["mechanisms"]}
    trial_cfg = json.loads((trial_dir / "config.json").read_text())
    q = trial_cfg["finetune"]["batch_size"] / data.public_train_size(cfg)
    assert taken == {"central": trial_cfg["central"]["rounds"], "dpsgd": math.ceil(0.1 / q - 1e-9), "selection": 1}
    assert ledger["repeat"] == {"mean": 3.0, "shape": 1.0}
    assert (trial_dir / "samples" / "grid.png").is_file()
    assert summary["epsilon"] <= cfg.privacy.epsilon
