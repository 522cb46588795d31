"""A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and two worker
nodes, each its own raylet and resources) with a local S3 endpoint as the run's only storage.

``dpfeta run`` on digits with 2 DP-SGD workers on different nodes, entirely through ``s3://`` (the
data prepared into the bucket and read there by Ray Data, the run folder a prefix of it): the job
finishes, epsilon and T are exact, every output is in the bucket, nothing is left on a local disk.
Run alone with ``pytest -m multinode``."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import pytest
from conftest import TINY

from dpfeta import config, data, pipeline, privacy
from dpfeta.storage import Storage

pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.long]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """Head (1 CPU: the driver's Ray Data and Train controller; the dashboard for job submission) +
    two 1-CPU worker nodes tagged ``node_w1``/``node_w2``. Started after the S3 endpoint so every
    raylet (and a job's driver) inherits its variables."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's local Ray (conftest.local_ray): this module needs its own cluster
        ray.shutdown()
    port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
        },
    )
    cluster.dashboard = f"http://127.0.0.1:{port}"
    for i in (1, 2):
        # Nodes on one machine share the head's session folder; each gets its own runtime-env folder,
        # as on separate machines: with a shared one, a worker node's agent deleted the job's
        # working_dir (its reference count there reached zero) while the job's driver ran in it.
        cluster.add_node(num_cpus=1, resources={f"node_w{i}": 1}, runtime_env_dir_name=f"runtime_resources_w{i}")
    cluster.wait_for_nodes()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request log
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_run_through_s3_with_workers_on_two_nodes(ray_cluster, s3_bucket, tiny_cfg, tmp_path_factory, monkeypatch):
    cwd, scratch = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("scratch")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the driver's scratch folders go
    data.prepare(
        tiny_cfg("finetune.batch_size=128"), f"{s3_bucket}/data/digits", rows_per_shard=400
    )  # the sensitive set, in the bucket
    cfg = tiny_cfg(
        f"run.dir={s3_bucket}/runs",
        "run.name=mn",
        "run.num_workers=2",
        "run.placement=STRICT_SPREAD",
        "data.source=parquet",
        f"data.path={s3_bucket}/data/digits",
        f"run.ray_address={ray_cluster.address}",
        "central.rounds=2",
        "central.batch_size=600",
        "central.noise_multiplier=null",
        "central.epsilon_share=0.3",
        "warmup.steps=2",
        "finetune.batch_size=128",
        "finetune.epochs=0.15",
        "finetune.checkpoint_every=2",
    )
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    pl = pipeline.plan_run(cfg)
    result = pipeline.run(cfg, echo=lambda _: None)

    # epsilon and T exact, as the plan said
    assert result["steps"] == pl.steps and math.isclose(result["epsilon"], pl.epsilon, rel_tol=1e-9)
    store = Storage(f"{s3_bucket}/runs/mn")
    ledger = store.read_json("ledger.json")
    assert {m["name"]: m["taken"] for m in ledger["mechanisms"]} == {"central": 2, "dpsgd": pl.steps}
    assert math.isclose(ledger["epsilon_spent"], pl.epsilon, rel_tol=1e-9)
    summary = store.read_json("checkpoints/finetune/finetune.json")
    assert summary["world_size"] == 2 and summary["nodes"] == 2  # the two DP-SGD workers on two nodes

    # every output in the bucket, committed
    files = set(store.list_files())
    for name in (
        "config.json",
        "ledger.json",
        "eval.json",
        "central/central.json",
        "central/grid.png",
        "checkpoints/warmup/checkpoint/meta.json",
        "checkpoints/finetune/checkpoint/ema.pt",
        "checkpoints/finetune/plan.json",
        "samples/samples.json",
        "samples/grid.png",
        "release/ledger.json",
        "release/release.json",
        "release/README.md",
        "release/metrics.json",
        "release/model/ema.pt",
        "release/samples/grid.png",
        "release/central/grid.png",
    ):
        assert name in files, name
    for folder in ("central", "samples", "checkpoints/warmup/checkpoint", "release/model", "release/samples"):
        assert store.committed(folder), folder
    assert any(f.startswith("checkpoints/finetune/ray/") for f in files)  # Ray Train's own checkpoints
    assert sum(f.startswith("samples/images/") for f in files) == cfg.sample.num_samples
    assert not any(".tmp" in f for f in store.list_files(temporaries=True)) and "run.lock" not in files
    assert json.loads(store.read_text("release/release.json"))["epsilon"] == pytest.approx(pl.epsilon, rel=1e-9)

    # nothing on a local disk: no run folder under the working directory, no scratch left behind
    assert list(cwd.iterdir()) == [] and [p for p in scratch.iterdir() if p.name.startswith("dpfeta")] == []

    # a rerun resumes from the bucket: nothing recomputed, nothing spent again
    again = pipeline.run(cfg, echo=lambda _: None)
    assert again["epsilon"] == result["epsilon"] and store.read_json("ledger.json") == ledger


def test_the_same_run_through_ray_job_submit(ray_cluster, s3_bucket, tmp_path):
    """``ray job submit`` to the multi-node cluster (runtime_env working_dir = this repository with
    its excludes): the job's driver runs on the head, the workers on the other nodes, every file in
    the bucket."""
    import subprocess
    import sys
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    repo = Path(__file__).resolve().parents[1]
    data.prepare(
        config.load(None, ["data.resolution=8", "finetune.batch_size=128"]),
        f"{s3_bucket}/data/digits",
        rows_per_shard=400,
    )
    overrides = [
        *TINY,
        f"run.dir={s3_bucket}/runs",
        "run.name=job",
        "run.num_workers=2",
        "run.placement=STRICT_SPREAD",
        "data.source=parquet",
        f"data.path={s3_bucket}/data/digits",
        "central.rounds=2",
        "central.batch_size=600",
        "central.noise_multiplier=null",
        "central.epsilon_share=0.3",
        "warmup.steps=2",
        "finetune.batch_size=128",
        "finetune.epochs=0.15",
        "finetune.checkpoint_every=2",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    submission = f"dpfeta-{tmp_path.name[-20:]}"
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_cluster.dashboard,
        "--submission-id",
        submission,
        "--working-dir",
        str(repo),
        "--runtime-env",
        str(repo / "ray_jobs" / "runtime_env.yaml"),
        "--",
        sys.executable,
        "ray_jobs/pipeline.py",
        "--config",
        "configs/digits.yaml",
        *sets,
    ]
    deadline = time.time() + 120
    while True:  # right after the head starts the job agent may not be up yet
        sub = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in sub.stdout + sub.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(submission) == JobStatus.SUCCEEDED
    cfg = config.load(repo / "configs" / "digits.yaml", overrides)
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    pl = pipeline.plan_run(cfg)
    store = Storage(f"{s3_bucket}/runs/job")
    ledger = store.read_json("ledger.json")
    assert {m["name"]: m["taken"] for m in ledger["mechanisms"]} == {"central": 2, "dpsgd": pl.steps}
    assert math.isclose(ledger["epsilon_spent"], pl.epsilon, rel_tol=1e-9)
    assert f"writing to {s3_bucket}/runs/job" in sub.stdout and "composed over every mechanism" in sub.stdout
    assert store.read_json("checkpoints/finetune/finetune.json")["nodes"] == 2
    for folder in ("central", "samples", "release/model", "release/samples"):
        assert store.committed(folder), folder
    assert store.is_file("eval.json") and store.is_file("release/README.md")


# -- sweeps: Ray Tune's experiment, every trial's folder and the release in the bucket --------------
SPACE = {
    "central.rounds": {"type": "randint", "lower": 1, "upper": 3},
    "warmup.steps": {"type": "choice", "values": [1, 2]},
}
SWEEP = [
    *TINY,
    "run.cpus_per_worker=0.5",
    "central.noise_multiplier=2.0",
    "central.batch_size=100",
    "finetune.batch_size=64",
    "finetune.epochs=0.1",
    "run.max_failures=0",
    "tune.privacy_mode=private",
    f"tune.search_space={json.dumps(SPACE)}",
]


def test_a_sweep_through_s3_keeps_nothing_on_the_driver(
    ray_cluster, s3_bucket, tiny_cfg, tmp_path_factory, monkeypatch
):
    """``dpfeta tune`` with run.dir an s3:// prefix: the real trial (central -> warm-up -> DP-SGD ->
    samples -> DP score) runs in a Tune trial on the cluster and writes its folder to the bucket;
    Tune's experiment state, the summary and the release are there too; a rerun answers from it."""
    from dpfeta import tune

    cwd, scratch = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("scratch")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = tiny_cfg(
        *SWEEP,
        f"run.dir={s3_bucket}/sweeps",
        "run.name=sw",
        "run.seed=0",  # seed 0: K = 1 trial
        f"run.ray_address={ray_cluster.address}",
    )
    summary = tune.run_sweep(cfg)

    store = Storage(f"{s3_bucket}/sweeps/sw")
    assert summary["dir"] == store.uri and summary["num_trials"] == 1
    (row,) = summary["trials"]
    assert row["status"] == "done" and summary["best"]["dir"] == store.url(f"trials/{row['trial_id']}")
    assert summary["epsilon"] <= cfg.privacy.epsilon * (1 + 1e-9)
    files = set(store.list_files())
    for name in (
        "sweep.json",
        "summary.json",
        "trials.csv",
        "release/selection.json",
        "release/release.json",
        "release/README.md",
        "release/ledger.json",
        "release/model/ema.pt",
        "release/samples/grid.png",
        "release/central/grid.png",
    ):
        assert name in files, name
    assert any(f.startswith("tune/experiment_state") for f in files), sorted(files)[:20]  # Tune's own state
    trial = store.child(f"trials/{row['trial_id']}")
    for name in ("config.json", "ledger.json", "trial_ledger.json", "trial_result.json", "samples/samples.json"):
        assert trial.is_file(name), name
    taken = {m["name"]: m["taken"] for m in trial.read_json("ledger.json")["mechanisms"]}
    trial_cfg = trial.read_json("config.json")
    q = trial_cfg["finetune"]["batch_size"] / data.public_train_size(cfg)
    assert taken == {"central": trial_cfg["central"]["rounds"], "dpsgd": math.ceil(0.1 / q - 1e-9), "selection": 1}
    assert store.read_json("release/selection.json")["selected"]["id"] == row["trial_id"]
    assert json.loads(store.read_text("release/release.json"))["epsilon"] == pytest.approx(summary["epsilon"])
    assert not any(".tmp" in f for f in store.list_files(temporaries=True)) and "run.lock" not in files

    # nothing on the driver's disk
    assert list(cwd.iterdir()) == [] and [p for p in scratch.iterdir() if p.name.startswith("dpfeta")] == []
    # a finished sweep answers from the bucket
    assert tune.run_sweep(cfg) == summary


def stand_in_trial(ctx):
    """A trial in seconds: a fixed accuracy per hyperparameter; each call leaves a marker in the bucket
    (to count how often a trial ran) and a stand-in release part; slow while ``<sweep>/SLOW`` exists."""
    import time
    import uuid

    sweep = ctx.ws.remote.uri.rsplit("/trials/", 1)[0]
    ctx.ws.remote.write_text(f"runs/{uuid.uuid4().hex}", "run\n")
    (ctx.out_dir / "release" / "model").mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "release" / "model" / "stand-in.txt").write_text(f"output of trial {ctx.trial_id}\n")
    if Storage(sweep).is_file("SLOW"):
        time.sleep(6)
    return {"correct": 60 + 30 * ctx.cfg.central.rounds + 5 * ctx.cfg.warmup.steps, "val_size": 180}


SWEEP_DRIVER = """
import json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import ray, test_multinode
ray.cloudpickle.register_pickle_by_value(test_multinode)
from dpfeta import config, tune
tune.run_sweep(config.load(None, json.loads(sys.argv[1])), trial_fn=test_multinode.stand_in_trial)
"""


def test_a_sweep_resumes_from_the_bucket_after_its_driver_is_killed(ray_cluster, s3_bucket, tmp_path):
    """The sweep's driver is SIGKILLed after a trial scored; the same command (another process, no
    local state) resumes from the bucket: K and sigma kept, a scored trial never runs again. The
    central query is the sweep's, shared (no central key searched): in the bucket, run once, every
    trial's copy equal to it, not run again on resume."""
    import signal
    import subprocess
    import sys
    import time

    from dpfeta import tune

    repo = Path(__file__).resolve().parents[1]
    shared = {"warmup.steps": {"type": "choice", "values": [1, 2]}}
    overrides = [
        *SWEEP,
        "tracking.enabled=false",
        f"run.dir={s3_bucket}/sweeps",
        "run.name=resume",
        "run.seed=1",
        f"run.ray_address={ray_cluster.address}",  # seed 1: K = 3 trials
        f"tune.search_space={json.dumps(shared)}",
    ]
    store = Storage(f"{s3_bucket}/sweeps/resume")
    store.write_text("SLOW", "")
    script = tmp_path / "driver.py"
    script.write_text(SWEEP_DRIVER.format(repo=str(repo), tests=str(repo / "tests")))
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(overrides)],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def scored():
        return {f.split("/")[0] for f in store.list_files("trials") if f.endswith("/" + tune.RESULT_FILE)}

    try:
        deadline = time.time() + 240
        while not scored():
            assert proc.poll() is None, "the sweep's driver ended before any trial scored"
            assert time.time() < deadline, "no trial scored in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
        proc.wait()
    finished = scored()
    state = store.read_json(tune.SWEEP_FILE)
    assert 1 <= len(finished) < state["num_trials"] == 3 and not store.is_file(tune.SUMMARY_FILE)
    runs_before = len(store.list_files("runs"))
    assert state["plan"]["central"] == "shared" and store.committed("central")
    central_json = store.read_bytes("central/central.json")
    rounds = state["plan"]["shared_central"]["rounds"]
    assert rounds >= 1 and store.read_json("ledger.json")["mechanisms"][0]["taken"] == rounds

    store.delete("SLOW")
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial function travels by value
    summary = tune.run_sweep(config.load(None, overrides), trial_fn=stand_in_trial)
    assert summary["num_trials"] == 3 and all(r["status"] == "done" for r in summary["trials"])
    assert store.read_json(tune.SWEEP_FILE) == state  # K and sigma kept
    for trial_id in finished:  # a scored trial is never run or scored again
        stored = store.read_json(f"trials/{trial_id}/{tune.RESULT_FILE}")
        assert next(r for r in summary["trials"] if r["trial_id"] == trial_id)["score"] == stored["score"]
    # the resumed driver ran at most the trials that had not scored (one may have started twice)
    assert len(store.list_files("runs")) - runs_before <= 3 - len(finished)
    assert store.is_file("release/model/stand-in.txt") and store.is_file(tune.SUMMARY_FILE)
    assert store.read_bytes("central/central.json") == central_json  # the query was not run again
    for row in summary["trials"]:
        assert store.read_bytes(f"trials/{row['trial_id']}/central/central.json") == central_json
    released = store.read_json("release/ledger.json")["mechanisms"]
    assert [(m["name"], m["shared"], m["taken"]) for m in released][0] == ("central", True, rounds)
    assert [m["name"] for m in released] == ["central", "dpsgd", "selection"]  # the query once
