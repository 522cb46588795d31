"""Ray Data: the training split as a Dataset, disjoint worker shards, prepared Parquet, and the
central query as a distributed aggregation over blocks (the session's local Ray, conftest.local_ray)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from dpfeta import central, cli, config, data
from dpfeta.data import ImageSet

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("local_ray")


def numbered(n: int, k: int = 10, size: int = 8) -> ImageSet:
    """Records whose first two pixels spell their row number (to check shard membership)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return ImageSet(images, np.arange(n, dtype=np.int64) % k, k)


def row_ids(s: ImageSet) -> np.ndarray:
    return s.images[:, 0, 0, 0].astype(int) + 256 * s.images[:, 0, 0, 1].astype(int)


def test_dataset_columns_and_round_trip():
    train = numbered(300)
    ds = data.to_ray_dataset(train)
    assert ds.schema().names == ["image", "label"] and ds.count() == 300 and ds.num_blocks() == 16
    back = data.materialize_shard(ds.iterator(), num_classes=10)
    assert np.array_equal(back.images, train.images) and np.array_equal(back.labels, train.labels)


def test_streaming_split_shards_are_disjoint_and_cover_every_record():
    train, workers = numbered(1001), 3
    iterators = data.to_ray_dataset(train).streaming_split(workers, equal=False)
    shards: list = [None] * workers

    def consume(rank: int) -> None:  # iterators must be consumed concurrently
        shards[rank] = data.materialize_shard(iterators[rank], num_classes=10, image_shape=(1, 8, 8))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(workers)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    ids = np.concatenate([row_ids(s) for s in shards])
    assert sorted(ids.tolist()) == list(range(1001))  # every record exactly once
    assert all(len(s) > 0 for s in shards)
    for s in shards:  # labels travel with their images
        assert np.array_equal(s.labels, row_ids(s) % 10)


def test_prepared_parquet_reads_back_as_a_ray_dataset(tmp_path):
    cfg = config.replace(config.Config(), {"data.num_classes": 10, "finetune.batch_size": 100})
    uri = data.prepare(cfg, f"file://{tmp_path}/prep", rows_per_shard=400)
    ds = data.read_prepared(uri, "train")
    back = data.materialize_shard(ds.iterator(), num_classes=10)
    ref = data.load_splits(cfg).train
    order = np.lexsort([back.images.reshape(len(back), -1)[:, i] for i in range(255, -1, -1)])
    ref_order = np.lexsort([ref.images.reshape(len(ref), -1)[:, i] for i in range(255, -1, -1)])
    assert np.array_equal(back.images[order], ref.images[ref_order])
    assert np.array_equal(back.labels[order], ref.labels[ref_order])


def _cfg(**updates) -> config.Config:
    base = {
        "data.num_classes": 10,
        "data.resolution": 8,
        "central.rounds": 5,
        "central.batch_size": 300.0,
        "central.noise_multiplier": 2.0,
        "finetune.batch_size": 8,
    }
    base.update(updates)
    return config.replace(config.Config(), base)


def test_distributed_sums_equal_the_in_process_sums():
    train = numbered(1000)
    ds = data.to_ray_dataset(train, num_blocks=7)
    kwargs = dict(rounds=3, sample_rate=1.0, downsample=2)  # q = 1: no sampling randomness
    local = central._local_sums(train, rng=np.random.default_rng(0), **kwargs)
    remote = central._ray_sums(ds, num_classes=10, seed=None, **kwargs)
    assert remote.shape == (3, 10, 1, 4, 4) and np.allclose(remote, local)


def test_distributed_inclusion_frequency_and_independent_blocks():
    ones = ImageSet(np.full((600, 1, 4, 4), 255, np.uint8), np.arange(600, dtype=np.int64) % 10, 10)
    sums = central._ray_sums(
        data.to_ray_dataset(ones, num_blocks=6), rounds=200, sample_rate=0.25, num_classes=10, downsample=2, seed=None
    )
    counts = sums[:, :, 0, 0, 0].sum(1)
    assert abs(counts.mean() / 600 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (600 * 200))
    assert counts.var() == pytest.approx(600 * 0.25 * 0.75, rel=0.35)  # independent per record


def test_distributed_release_seeded_and_unseeded():
    cfg, train = _cfg(), numbered(1000)
    ds = data.to_ray_dataset(train, index=True)
    a = central.central_images(cfg, ds, generator=torch.Generator().manual_seed(1))
    b = central.central_images(cfg, ds, generator=torch.Generator().manual_seed(1))
    c = central.central_images(cfg, ds)
    assert a.images.shape == (50, 1, 8, 8) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    with pytest.raises(ValueError, match="needs an 'index' column"):
        central.central_images(cfg, data.to_ray_dataset(train), generator=torch.Generator().manual_seed(1))


def test_cli_central_writes_release_and_prints_epsilon(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "central: {rounds: 2, batch_size: 600, noise_multiplier: 4.0}\nfinetune: {batch_size: 256, epochs: 1}\n"
    )
    assert cli.main(["central", "--config", str(cfg_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    ledger = __import__("json").loads((tmp_path / "out" / "ledger.json").read_text())
    assert f"epsilon spent: {ledger['epsilon_spent']:.4f}" in out and ledger["n"] == 1258
    assert ledger["mechanisms"][0]["taken"] == 2 and ledger["mechanisms"][0]["sample_rate"] == 600 / 1258
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 20
    assert (tmp_path / "out" / "grid.png").is_file()
