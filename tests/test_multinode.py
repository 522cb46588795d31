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

from dpfeta import config, data, pipeline, privacy
from dpfeta.storage import Storage

from conftest import TINY

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


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

    port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    cluster.dashboard = f"http://127.0.0.1:{port}"
    for i in (1, 2):
        cluster.add_node(num_cpus=1, resources={f"node_w{i}": 1})
    cluster.wait_for_nodes()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request log
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_run_through_s3_with_workers_on_two_nodes(ray_cluster, s3_bucket, tiny_cfg, tmp_path_factory, monkeypatch):
    cwd, scratch = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("scratch")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the driver's scratch folders go
    data.prepare(tiny_cfg("finetune.batch_size=128"), f"{s3_bucket}/data/digits", rows_per_shard=400)  # the sensitive set, in the bucket
    cfg = tiny_cfg(f"run.dir={s3_bucket}/runs", "run.name=mn", "run.num_workers=2", "run.placement=STRICT_SPREAD",
                   "data.source=parquet", f"data.path={s3_bucket}/data/digits",
                   f"run.ray_address={ray_cluster.address}", "central.rounds=2", "central.batch_size=600",
                   "central.noise_multiplier=null", "central.epsilon_share=0.3", "warmup.steps=2",
                   "finetune.batch_size=128", "finetune.epochs=0.15", "finetune.checkpoint_every=2")
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
    for name in ("config.json", "ledger.json", "eval.json", "central/central.json", "central/grid.png",
                 "checkpoints/warmup/checkpoint/meta.json", "checkpoints/finetune/checkpoint/ema.pt",
                 "checkpoints/finetune/plan.json", "samples/samples.json", "samples/grid.png",
                 "release/ledger.json", "release/release.json", "release/README.md", "release/metrics.json",
                 "release/model/ema.pt", "release/samples/grid.png", "release/central/grid.png"):
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
    data.prepare(config.load(None, ["data.resolution=8", "finetune.batch_size=128"]), f"{s3_bucket}/data/digits",
                 rows_per_shard=400)
    overrides = [*TINY, f"run.dir={s3_bucket}/runs", "run.name=job", "run.num_workers=2", "run.placement=STRICT_SPREAD",
                 "data.source=parquet", f"data.path={s3_bucket}/data/digits", "central.rounds=2",
                 "central.batch_size=600", "central.noise_multiplier=null", "central.epsilon_share=0.3",
                 "warmup.steps=2", "finetune.batch_size=128", "finetune.epochs=0.15", "finetune.checkpoint_every=2"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    submission = f"dpfeta-{tmp_path.name[-20:]}"
    argv = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
            "--submission-id", submission, "--working-dir", str(repo), "--runtime-env",
            str(repo / "ray_jobs" / "runtime_env.yaml"), "--", "python", "ray_jobs/pipeline.py", "--config",
            "configs/digits.yaml", *sets]
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
    assert f"writing to {s3_bucket}/runs/job" in sub.stdout and "composed epsilon" in sub.stdout
    assert store.read_json("checkpoints/finetune/finetune.json")["nodes"] == 2
    for folder in ("central", "samples", "release/model", "release/samples"):
        assert store.committed(folder), folder
    assert store.is_file("eval.json") and store.is_file("release/README.md")
