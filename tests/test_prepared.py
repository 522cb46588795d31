"""Prepared Parquet folders (``dpfeta prepare``): what the driver reads of them (meta.json only) and
the checks made before any budget is spent."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpfeta import config, data, pipeline, privacy


def _cfg(tmp_path, *extra):
    cfg = config.load(
        None,
        [
            "data.resolution=8",
            "central.noise_multiplier=null",
            "central.epsilon_share=0.3",
            "finetune.batch_size=128",
            "tracking.enabled=false",
            f"run.dir={tmp_path}/runs",
            *extra,
        ],
    )
    return privacy.resolve(cfg, data.public_train_size(cfg))


def test_prepare_writes_shards_with_a_row_index_and_public_meta(tmp_path):
    digits = _cfg(tmp_path)
    out = tmp_path / "prepared"
    data.prepare(digits, str(out), rows_per_shard=500)
    splits = data.load_splits(digits)
    meta = data.prepared_meta(str(out))
    assert meta["sizes"] == {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    assert meta["shape"] == [1, 8, 8] and meta["num_classes"] == 10
    table = pq.read_table(out / "train")
    assert sorted(table.column("index").to_pylist()) == list(range(len(splits.train)))
    assert data.prepared_meta(str(tmp_path)) is None  # a folder without meta.json is not a prepared one


def test_the_driver_reads_only_meta_and_eval_parts(tmp_path, monkeypatch):
    digits = _cfg(tmp_path)
    out = tmp_path / "prepared"
    data.prepare(digits, str(out), rows_per_shard=500)
    cfg = _cfg(tmp_path, "data.source=parquet", f"data.path={out}")
    pl = pipeline.plan_run(cfg)
    monkeypatch.setattr(data, "load_splits", lambda *_: pytest.fail("the driver read the whole dataset"))
    connected = []
    monkeypatch.setattr(pipeline.cluster, "connect", lambda c: connected.append(c))
    monkeypatch.setattr(data, "read_prepared", lambda uri, split: ("ray dataset", uri, split))
    train, splits = pipeline.read_data(cfg, pl)
    assert train == ("ray dataset", str(out), "train") and splits is None and connected
    ev = data.load_prepared_eval(cfg)  # what the evaluation task reads: no training rows
    assert len(ev.train) == 0 and len(ev.test) == data.prepared_meta(str(out))["sizes"]["test"]
    assert ev.test.images.shape[1:] == (1, 8, 8) and ev.test.labels.max() < 10


@pytest.mark.slow  # writes and rewrites Parquet folders (~6 s): make test
def test_a_prepared_folder_of_another_shape_or_size_is_refused_before_spend(tmp_path):
    out = tmp_path / "prepared"
    data.prepare(_cfg(tmp_path), str(out), rows_per_shard=500)
    n = data.prepared_meta(str(out))["sizes"]["train"]
    cfg = _cfg(tmp_path, "data.source=parquet", f"data.path={out}", "data.resolution=16", f"data.n_train={n}")
    with pytest.raises(ValueError, match=r"prepared with images of shape \[1, 8, 8\].*expects \[1, 16, 16\]"):
        pipeline.read_data(cfg, pipeline.plan_run(cfg))
    cfg = _cfg(tmp_path, "data.source=parquet", f"data.path={out}", f"data.n_train={n - 1}")
    with pytest.raises(ValueError, match=f"expected N={n - 1}.*says {n}"):
        pipeline.read_data(cfg, pipeline.plan_run(cfg))


def test_the_central_query_refuses_labels_out_of_range_before_noise():
    from dpfeta import central

    batch = {"image": np.zeros((4, 1, 8, 8), np.uint8), "label": np.array([0, 1, 12, 3])}
    with pytest.raises(ValueError, match=r"labels out of range: expected 0..9.*found 0..12"):
        central._block_sums(batch, rounds=1, sample_rate=0.5, num_classes=10, downsample=1, seed=None)
