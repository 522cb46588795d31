"""Elastic DP-SGD and preemption-safe stages on a multi-node ``ray.cluster_utils.Cluster`` (a head and
worker nodes on this machine) with the run's storage on the local S3 endpoint.

(a) scale up: one worker node, a second joins mid-run -> the group grows; T and epsilon exact.
(b) node loss: a worker node dies mid-DP-SGD -> the group shrinks to the minimum and finishes; T, eps exact.
(c) the node running the warm-up dies -> the retried warm-up resumes from its last committed checkpoint.
(d) a node dies while sampling -> its shard is redone elsewhere; finished shards are kept as they were.

Each test is bounded (a few minutes on 2 cores) and marked: run them alone with ``pytest -m multinode``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from pathlib import Path

import pytest

from dpfeta import data, distributed, pipeline, privacy, warmup
from dpfeta.rundir import RunDir
from dpfeta.storage import Storage, Workspace

pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.long]

DEADLINE_S = 240  # no test waits longer than this for an event of the cluster
# A dead node is noticed in ~2 s instead of Ray's default ~30 s (health checks of the GCS).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


@pytest.fixture
def make_cluster(s3_endpoint, monkeypatch):
    """``make_cluster(nodes=[{resources}, ...])``: a 1-CPU head (the driver's Ray Data, the Train
    controller) plus 1-CPU worker nodes; shut down at the end of the test."""
    import ray
    from ray.cluster_utils import Cluster

    made = []
    # After a node loss the controller may still see its resources for a moment and wait for a
    # group that cannot start: give up on it after 15 s (Ray's default 60 s), then shrink.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")

    if ray.is_initialized():  # the session's local Ray (conftest.local_ray): this test needs its own cluster
        ray.shutdown()

    def make(nodes):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_DEATH},
        )
        workers = [cluster.add_node(num_cpus=1, resources=dict(r)) for r in nodes]
        cluster.wait_for_nodes()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        made.append(cluster)
        return cluster, workers

    yield make
    ray.shutdown()
    for cluster in made:
        cluster.shutdown()


def _cfg(tiny_cfg, bucket, name, address, *extra):
    cfg = tiny_cfg(f"run.dir={bucket}/runs", f"run.name={name}", f"run.ray_address={address}", *extra)
    return privacy.resolve(cfg, data.public_train_size(cfg))


def _when(condition, what: str, poll: float = 0.3):
    """Wait until ``condition()`` is true (bounded); returns its value."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")


def _in_thread(fn):
    """Run the stage in a thread (the cluster's nodes can only be added and removed from the main
    thread); ``result()`` joins it and returns its value or raises its error."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join(timeout=DEADLINE_S * 2)
        assert not thread.is_alive(), "the stage did not finish"
        if "error" in out:
            raise out["error"]
        return out["value"]

    result.alive = thread.is_alive
    return result


def _registered_step(store: Storage) -> int:
    """The last checkpoint step the Train controller has registered (its snapshot in the storage, written
    after each registration): what a restarted group resumes from. A checkpoint folder alone is not enough:
    a node lost between the upload and the controller's poll leaves it unregistered."""
    try:
        snapshots = [f for f in store.list_files("ray") if f.endswith("checkpoint_manager_snapshot.json")]
        steps = [int(m) for f in snapshots for m in re.findall(r"step_(\d{8})", store.read_text(f"ray/{f}"))]
    except Exception:  # noqa: BLE001 - the snapshot replaced while read: ask again at the next poll
        return -1
    return max(steps, default=-1)


# DP-SGD: from scratch (no central query), 1-CPU workers only on nodes offering the "dpsgd" resource.
DPSGD = (
    "finetune.init=scratch",
    "central.rounds=0",
    "finetune.batch_size=128",
    "finetune.epochs=3",
    "finetune.checkpoint_every=1",
    "run.num_workers=[1,2]",
    "run.worker_resources={dpsgd: 1}",
    "run.resize_interval_s=1",
    "run.max_failures=3",
)


def _by_value() -> None:
    """The hooks below travel to Ray workers by value (this test module is not importable there)."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_while_one_worker(step: int, rank: int, world_size: int) -> None:
    """Keeps a one-worker group busy until the second node has joined (test hook)."""
    if world_size == 1:
        time.sleep(0.5)


class PaceTwoWorkers:
    """Test hook for the node-loss test: every step a 2-worker group runs leaves a marker ``two-<step>``
    in ``marks`` and takes 0.4 s; until one has run, a 1-worker group is slowed too, so that a group
    that started small (the resource view of Ray's autoscaling coordinator can lag on a loaded machine)
    has time to grow before the run ends. After the shrink the last group runs at full speed."""

    def __init__(self, marks: Path):
        self.marks = marks

    def __call__(self, step: int, rank: int, world_size: int) -> None:
        if world_size == 2:
            (self.marks / f"two-{step:08d}").touch()
            time.sleep(0.4)
        elif not any(self.marks.glob("two-*")):
            time.sleep(0.5)

    def first_step_of_two(self) -> int:
        steps = sorted(int(p.name[4:]) for p in self.marks.glob("two-*"))
        return steps[0] if steps else -1


def _fit(cfg, bucket_prefix, tmp_path, hook):
    _by_value()
    pl = pipeline.plan_run(cfg)
    train = data.load_splits(cfg).train
    store = Storage(bucket_prefix)
    summary = distributed.fit_finetune(
        cfg, train=train, plan=pl, init_dir=None, out_dir=tmp_path / "ft", storage=store, before_step=hook
    )
    return pl, summary


def test_a_scale_up_grows_the_group_and_keeps_T_and_epsilon(make_cluster, s3_bucket, tiny_cfg, tmp_path, one_thread):
    cluster, _ = make_cluster([{"dpsgd": 1}])
    cfg = _cfg(tiny_cfg, s3_bucket, "up", cluster.address, *DPSGD)
    fixed = pipeline.plan_run(_cfg(tiny_cfg, s3_bucket, "fixed", cluster.address, *DPSGD, "run.num_workers=1"))
    store = Storage(f"{s3_bucket}/runs/up/ft")
    result = _in_thread(lambda: _fit(cfg, store.uri, tmp_path, slow_while_one_worker))
    _when(lambda: _registered_step(store) >= 2, "the first registered checkpoints")
    cluster.add_node(num_cpus=1, resources={"dpsgd": 1})
    pl, summary = result()
    sizes = [g["world_size"] for g in summary["groups"]]
    assert sizes[0] == 1 and sizes[-1] == 2, summary["groups"]  # grew when the node joined
    assert summary["groups"][-1]["nodes"] == 2 and 0 < summary["groups"][-1]["step"] < pl.steps
    assert summary["steps"] == pl.steps == fixed.steps and summary["noise_multiplier"] == fixed.noise_multiplier
    assert math.isclose(summary["epsilon"], fixed.epsilon, rel_tol=1e-9)  # the same as a fixed-size run
    print("scale up: groups", summary["groups"], "epsilon", summary["epsilon"], "fixed-size", fixed.epsilon)


def test_b_a_lost_node_shrinks_the_group_and_keeps_T_and_epsilon(
    make_cluster, s3_bucket, tiny_cfg, tmp_path, one_thread
):
    import ray

    cluster, nodes = make_cluster([{"dpsgd": 1}, {"dpsgd": 1}])
    cfg = _cfg(tiny_cfg, s3_bucket, "down", cluster.address, *DPSGD)
    fixed = pipeline.plan_run(_cfg(tiny_cfg, s3_bucket, "fixed", cluster.address, *DPSGD, "run.num_workers=2"))
    store = Storage(f"{s3_bucket}/runs/down/ft")
    # Both worker nodes' resources are seen before the group starts (on a loaded machine a raylet can be
    # late, and the elastic group would start, and stay, at one worker).
    ray.init(address=cluster.address, log_to_driver=False)
    _when(lambda: ray.available_resources().get("dpsgd", 0) >= 2, "both worker nodes' resources")
    pace = PaceTwoWorkers(tmp_path / "marks")
    pace.marks.mkdir()
    result = _in_thread(lambda: _fit(cfg, store.uri, tmp_path, pace))
    _when(lambda: pace.first_step_of_two() >= 0, "a step of a 2-worker group")
    # A checkpoint of the 2-worker group is registered (its entry in the ledger survives the restart).
    _when(lambda: _registered_step(store) > pace.first_step_of_two(), "a registered checkpoint of the 2-worker group")
    cluster.remove_node(nodes[1], allow_graceful=False)
    pl, summary = result()
    sizes = [g["world_size"] for g in summary["groups"]]
    assert 2 in sizes and sizes[-1] == 1, summary["groups"]  # a 2-worker group, then shrunk to the minimum
    assert summary["steps"] == pl.steps == fixed.steps and summary["noise_multiplier"] == fixed.noise_multiplier
    assert math.isclose(summary["epsilon"], fixed.epsilon, rel_tol=1e-9)
    print("node loss: groups", summary["groups"], "epsilon", summary["epsilon"], "fixed-size", fixed.epsilon)


# Warm-up and sampling as Ray tasks on nodes offering the "stage" resource.
STAGES = (
    "run.stage_placement=cluster",
    "run.stage_resources={stage: 1}",
    "model.channels=16",
    "central.rounds=1",
    "central.batch_size=600",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "finetune.batch_size=128",
)


def _node_of(cluster, nodes, node_id):
    return next(n for n in nodes if n.node_id == node_id)


def test_c_a_lost_warmup_node_resumes_from_the_last_checkpoint(make_cluster, s3_bucket, tiny_cfg, one_thread):
    cluster, nodes = make_cluster([{"stage": 1}, {"stage": 1}])
    cfg = _cfg(
        tiny_cfg,
        s3_bucket,
        "warm",
        cluster.address,
        *STAGES,
        "warmup.steps=400",
        "warmup.batch_size=128",
        "warmup.checkpoint_every=20",
        "warmup.log_every=20",
    )
    ws = Workspace(cfg.run_location())
    run = RunDir.of(cfg, ws, pipeline.plan_run(cfg))
    run.open_ledger()
    central_set = pipeline.stage_central(run, data.load_splits(cfg).train)
    store = ws.remote.child(pipeline.WARMUP_DIR)
    result = _in_thread(lambda: cluster_run_warmup(cfg, ws, central_set))
    latest = _when(
        lambda: (
            store.is_file(warmup.LATEST)
            and store.read_json(warmup.LATEST)["step"] >= 40
            and store.read_json(warmup.LATEST)
        ),
        "a committed warm-up checkpoint at step >= 40",
    )
    killed = [latest]
    cluster.remove_node(_node_of(cluster, nodes, latest["node"]), allow_graceful=False)
    summary = result()
    assert summary["step"] == cfg.warmup.steps
    assert killed[0]["step"] <= summary["resumed_from"] < cfg.warmup.steps  # not from step 0
    assert store.read_json(warmup.LATEST)["node"] != killed[0]["node"]  # finished on the other node
    assert ws.remote.committed(pipeline.WARMUP_CKPT)
    print("warm-up resumed from step", summary["resumed_from"], "after the node died at step >=", killed[0]["step"])
    ws.close()


def cluster_run_warmup(cfg, ws, central_set):
    from dpfeta import cluster as cluster_mod

    return cluster_mod.run_on_gpu(
        cfg, warmup.train_warmup_stored, cfg, central_set, ws.remote.child(pipeline.WARMUP_DIR)
    )


def test_d_a_lost_sampling_shard_is_redone_alone(make_cluster, s3_bucket, tiny_cfg, tmp_path, one_thread):
    from dpfeta import checkpoint, sample

    cluster, nodes = make_cluster([{"stage": 1}, {"stage": 1}])
    cfg = _cfg(
        tiny_cfg,
        s3_bucket,
        "samp",
        cluster.address,
        *STAGES,
        "sample.num_samples=400",
        "sample.shard_size=40",
        "sample.batch_size=40",
        "sample.steps=24",
    )
    ws = Workspace(cfg.run_location())
    net = sample.build_denoiser(cfg).net  # any weights: sampling is what is tested
    checkpoint.save(tmp_path / "w", model=net, ema=net, meta={"stage": "test", "config": cfg.public_dict()})
    ws.remote.put_dir(tmp_path / "w", "checkpoints/finetune/checkpoint")
    weights = ws.remote.child("checkpoints/finetune/checkpoint")
    marks = ws.remote.child(pipeline.SHARDS)

    def two_on_one_node():
        found = {f: marks.read_json(f) for f in marks.list_files()}
        nodes_done = [m["node"] for m in found.values()]
        return found if any(nodes_done.count(n) >= 2 for n in nodes_done) else None

    run = RunDir.of(cfg, ws, pipeline.plan_run(cfg))
    result = _in_thread(lambda: pipeline.stage_sample_shards(run, weights))
    before = _when(two_on_one_node, "two finished shards on one node")
    done_by = [m["node"] for m in before.values()]
    victim = max(set(done_by), key=done_by.count)
    cluster.remove_node(_node_of(cluster, nodes, victim), allow_graceful=False)
    shards = result()
    after = {f: marks.read_json(f) for f in marks.list_files()}
    assert len(shards) == len(after) == 10 and sum(m["num"] for m in after.values()) == 400
    for name, meta in before.items():  # shards finished before the loss were not redone
        assert after[name] == meta
    assert any(m["node"] == victim for m in after.values())  # the dead node's finished shards are kept
    images = [f for f in ws.remote.list_files("samples") if f.endswith(".png")]
    assert len(images) == 400
    print("sampling: victim", victim, "finished before the loss", len(before), "shards")
    ws.close()
