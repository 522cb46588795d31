"""DP-SGD on Ray Train with two workers on one local Ray: exact shards, noise added once, lock-step
with empty local batches, fault injection with resume to the same T and epsilon."""

from __future__ import annotations

import json
import math
import sys
import threading

import numpy as np
import pytest
import torch

from dpfeta import checkpoint, config, data, distributed, finetune, privacy
from dpfeta.data import ImageSet

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

N, SIGMA, C = 20, 2.0, 1.0
SETTINGS = {  # q = 1/20 over N = 20: expected batch 1, i.e. 0.5 per worker; T = ceil(0.3 / q) = 6
    "data.resolution": 8,
    "data.num_classes": 3,
    "model.channels": 8,
    "model.channel_mult": [1, 2],
    "model.num_res_blocks": 1,
    "model.attn_resolutions": [4],
    "model.emb_channels": 16,
    "central.rounds": 1,
    "central.noise_multiplier": 50.0,
    "central.batch_size": 5,
    "finetune.init": "scratch",
    "finetune.batch_size": 1,
    "finetune.epochs": 0.3,
    "finetune.noise_multiplicity": 2,
    "finetune.max_grad_norm": C,
    "finetune.physical_batch_size": 4,
    "finetune.checkpoint_every": 2,
    "finetune.log_every": 2,
    "privacy.noise_multiplier": SIGMA,
    "privacy.epsilon": 1000.0,
    "run.num_workers": 2,
    "run.cpus_per_worker": 0.5,
    "run.max_failures": 1,
    "run.seed": 0,
    "run.name": "faulted",
}


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """The session's local Ray (conftest); the zero-signal Task below travels by value."""
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def numbered(n: int) -> ImageSet:
    """Records whose first two pixels spell their row number."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return ImageSet(images, np.arange(n, dtype=np.int64) % 3, 3)


def test_exact_split_gives_every_record_to_exactly_one_worker():
    train, workers = numbered(101), 3  # Ray's default equal=True would drop 2 rows here
    split = distributed.ExactSplit(datasets_to_split=["train"])
    iterators = split.configure({"train": data.to_ray_dataset(train)}, workers, None, None)
    shards: list = [None] * workers

    def consume(rank: int) -> None:  # split iterators must be consumed concurrently
        shards[rank] = data.materialize_shard(iterators[rank]["train"], num_classes=3, image_shape=(1, 8, 8))

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(workers)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    ids = np.concatenate([s.images[:, 0, 0, 0].astype(int) + 256 * s.images[:, 0, 0, 1].astype(int) for s in shards])
    assert sorted(ids.tolist()) == list(range(101)) and all(len(s) > 0 for s in shards)


# Zero signal on the real model: the EDM loss times 0 gives every example a zero gradient, so
# SGD(lr=1) moves each parameter by the noise alone, -sum_t noise_t / (q N) after T steps, with std
# sqrt(T) sigma C / (q N) if the noise is added once per step, sqrt(2) times that if per rank.
def zero_signal_rows(module, images, labels, cfg, generator, draws):
    return finetune.EDM.loss_rows(module, images, labels, cfg, generator, draws) * 0.0


def sgd(params, cfg):
    return torch.optim.SGD(params, lr=1.0)


ZERO_SIGNAL = finetune.Task(build=finetune.EDM.build, loss_rows=zero_signal_rows, optimizer=sgd)


@pytest.fixture(scope="module")
def faulted(_ray, tmp_path_factory):
    """Two workers, expected local batch 0.5, rank 1 raises once at step 3 (checkpoints every 2)."""
    cfg = config.replace(config.Config(), {**SETTINGS, "run.dir": str(tmp_path_factory.mktemp("runs"))})
    plan = privacy.plan(cfg, N)
    summary = distributed.fit_finetune(
        cfg,
        train=numbered(N),
        plan=plan,
        init_dir=None,
        out_dir=cfg.run_dir() / "finetune",
        fail_at_step=3,
        task=ZERO_SIGNAL,
    )
    return summary, plan, cfg


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in state.values()])


def test_two_workers_add_the_noise_once_and_stay_in_lock_step_with_empty_batches(faulted):
    summary, plan, cfg = faulted
    assert plan.steps == 6 and plan.sample_rate * N / 2 == pytest.approx(0.5)
    assert summary["steps"] == plan.steps and summary["world_size"] == 2  # both ranks took all T steps
    start = flat(finetune.build_network(cfg, ZERO_SIGNAL, finetune.Worker()).state_dict())
    update = flat(checkpoint.load(summary["checkpoint"])["model"]) - start
    predicted = math.sqrt(plan.steps) * SIGMA * C / (plan.sample_rate * N)
    measured = update.std().item()
    assert update.numel() > 10_000 and abs(measured / predicted - 1) < 0.1, (measured, predicted)
    assert measured < 0.8 * math.sqrt(2) * predicted  # noise added by each rank: sqrt(2) x predicted
    ledger = json.loads((cfg.run_dir() / "finetune" / "ledger.json").read_text())
    assert ledger["epsilon_spent"] == pytest.approx(summary["epsilon"])
    assert [m["taken"] for m in ledger["mechanisms"]] == [1, plan.steps]  # central counted, T steps


def test_a_worker_fault_resumes_from_the_checkpoint_to_the_same_T_and_epsilon(faulted, tmp_path):
    summary, plan, cfg = faulted
    out = cfg.run_dir() / "finetune"
    assert (out / distributed.FAULT_MARKER).exists()  # the fault was raised
    meta = checkpoint.load(summary["checkpoint"])["meta"]
    assert meta["attempt_first_step"] == 2  # the last attempt restarted from the step-2 checkpoint
    # The same run without a fault, in one process.
    reference = finetune.train_finetune(
        cfg,
        numbered(N),
        plan=plan,
        init_dir=None,
        resume_dir=None,
        reporter=finetune.LocalReporter(tmp_path / "ckpt"),
        task=ZERO_SIGNAL,
    )
    assert summary["steps"] == meta["step"] == reference["step"] == plan.steps
    assert summary["epsilon"] == pytest.approx(reference["epsilon"], rel=1e-12)
    again = distributed.fit_finetune(cfg, train=numbered(N), plan=plan, init_dir=None, out_dir=out)
    assert again == summary  # a finished run is not run again
