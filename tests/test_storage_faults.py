"""Write faults on the run's object store (a full disk, a refused upload) at the ledger and at a
checkpoint: one clear error, no half-written object in place of a good one, the ledger never below
what was released, and a rerun after the fault completes with the same epsilon."""

from __future__ import annotations

import pytest

from dpfeta import data, pipeline, privacy
from dpfeta.rundir import RunDir
from dpfeta.storage import Storage, StorageError, Workspace


def _cfg(tiny_cfg, bucket, name):
    cfg = tiny_cfg(
        f"run.dir={bucket}/runs",
        f"run.name={name}",
        "central.rounds=2",
        "central.batch_size=600",
        "central.noise_multiplier=null",
        "central.epsilon_share=0.3",
        "finetune.batch_size=128",
        "warmup.steps=2",
    )
    return privacy.resolve(cfg, data.public_train_size(cfg))


def _open(cfg, ws, pl) -> RunDir:
    run = RunDir.of(cfg, ws, pl)
    run.open_ledger()
    return run


def test_a_failed_ledger_commit_stops_before_the_central_images_are_written(
    s3_bucket, tiny_cfg, faulty_storage, one_thread
):
    cfg = _cfg(tiny_cfg, s3_bucket, "ledgerfault")
    train = data.load_splits(cfg).train
    ws = Workspace(cfg.run_location())
    run = _open(cfg, ws, pipeline.plan_run(cfg))
    faulty_storage("ledger.json")  # the next ledger write fails: the one recording the central query
    with pytest.raises(StorageError, match=r"ledger.json': writing failed.*No space left"):
        pipeline.stage_central(run, train)
    ws.close()
    store = Storage(cfg.run_location())
    stored = privacy.Ledger.from_state_dict(store.read_json("ledger.json"))
    assert stored.get("central").taken == 0  # the good (planned) ledger, whole
    assert not store.committed("central") and not store.exists("central")  # and nothing released
    assert not any(".tmp-" in f for f in store.list_files(temporaries=True))

    # the fault is gone: a new process resumes; the query is counted once
    ws = Workspace(cfg.run_location())
    central_set = pipeline.stage_central(_open(cfg, ws, pipeline.plan_run(cfg)), train)
    assert len(central_set) == 2 * cfg.data.num_classes and store.committed("central")
    again = privacy.Ledger.from_state_dict(store.read_json("ledger.json"))
    assert again.get("central").taken == 2 and again.get("dpsgd").taken == 0
    ws.close()


def test_a_failed_checkpoint_upload_is_not_taken_as_a_checkpoint(s3_bucket, tiny_cfg, faulty_storage, one_thread):
    cfg = _cfg(tiny_cfg, s3_bucket, "ckptfault")
    train = data.load_splits(cfg).train
    ws = Workspace(cfg.run_location())
    run = _open(cfg, ws, pipeline.plan_run(cfg))
    central_set = pipeline.stage_central(run, train)
    faulty_storage("checkpoint/ema.pt")  # one file of the warm-up checkpoint's upload fails
    with pytest.raises(StorageError, match=r"checkpoints/warmup/checkpoint/ema.pt': writing failed"):
        pipeline.stage_warmup(run, central_set)
    store = Storage(cfg.run_location())
    assert not store.committed("checkpoints/warmup/checkpoint")  # no marker: a reader ignores the folder
    ws.close()
    ws = Workspace(cfg.run_location())  # a new process, the fault gone: warm-up redone, then committed
    run = _open(cfg, ws, run.plan)
    init = pipeline.stage_warmup(run, pipeline.stage_central(run, train))
    assert init.uri == f"{cfg.run_location()}/checkpoints/warmup/checkpoint" and store.committed(
        "checkpoints/warmup/checkpoint"
    )
    from dpfeta import checkpoint

    ws.fetch("checkpoints/warmup/checkpoint")
    assert checkpoint.load(ws.path("checkpoints/warmup/checkpoint"))["meta"]["step"] == cfg.warmup.steps
    assert privacy.Ledger.from_state_dict(store.read_json("ledger.json")).get("central").taken == 2  # not spent twice
    ws.close()
