"""Ray Data: the training split as Parquet shards (``dpfeta prepare``), Ray Datasets of an ImageSet,
and a worker's shard materialised once (the exact split is ``distributed.ExactSplit``)."""

from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np

from dpfeta import config as config_mod
from dpfeta.data.sources import SPLIT_DIRS, _filesystem, _read_parquet_file
from dpfeta.data.splits import ImageSet, Splits, load_splits
from dpfeta.images import decode_image, encode_png


def prepare(cfg: config_mod.Config, out_uri: str, *, rows_per_shard: int = 8192) -> str:
    """Write the validated splits as Parquet shards (``image`` PNG bytes, ``label`` int64).

    Layout: ``out_uri/{train,val,test}/part-00000.parquet ...`` (columns ``image``, ``label`` and
    ``index``, the row number, which keys a seeded central query) plus ``meta.json`` (public facts:
    sizes, shape, classes). ``data.source: parquet`` with ``data.path: out_uri`` reads it back with
    the same splits; ``read_prepared`` gives the Ray Dataset a cluster reads.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = load_splits(cfg)
    fs, root = _filesystem(out_uri)
    meta = {
        "num_classes": cfg.data.num_classes,
        "shape": list(splits.train.images.shape[1:]),
        "sizes": {},
        "source": cfg.data.source,
    }
    for name in SPLIT_DIRS:
        split = getattr(splits, name)
        fs.create_dir(f"{root}/{name}", recursive=True)
        for shard, start in enumerate(range(0, max(len(split), 1), rows_per_shard)):
            part = split.subset(slice(start, start + rows_per_shard))
            table = pa.table(
                {
                    "image": pa.array([encode_png(x) for x in part.images], pa.binary()),
                    "label": pa.array(part.labels, pa.int64()),
                    "index": pa.array(np.arange(start, start + len(part), dtype=np.int64)),
                }
            )
            pq.write_table(table, f"{root}/{name}/part-{shard:05d}.parquet", filesystem=fs)
        meta["sizes"][name] = len(split)
    with fs.open_output_stream(f"{root}/meta.json") as fh:
        fh.write(json.dumps(meta, indent=2).encode())
    return out_uri


def _decode_batch(batch: dict) -> dict:
    images = np.stack([decode_image(bytes(b), f"row {i}") for i, b in enumerate(batch["image"])])
    out = {"image": images, "label": np.asarray(batch["label"], np.int64)}
    if "index" in batch:
        out["index"] = np.asarray(batch["index"], np.int64)
    return out


def prepared_meta(uri: str) -> dict | None:
    """``meta.json`` of a folder written by ``prepare`` (sizes, shape, classes), else None."""
    import pyarrow.fs as pafs

    try:
        fs, root = _filesystem(str(uri))
        if fs.get_file_info(f"{root}/meta.json").type != pafs.FileType.File:
            return None
        with fs.open_input_stream(f"{root}/meta.json") as fh:
            meta = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and {"sizes", "shape", "num_classes"} <= set(meta) else None


def check_prepared(cfg: config_mod.Config, meta: dict) -> None:
    """The prepared folder must hold what the config describes (before any budget is spent)."""
    d = cfg.data
    shape = [d.channels, d.resolution, d.resolution]
    if list(meta["shape"]) != shape or int(meta["num_classes"]) != d.num_classes:
        raise ValueError(
            f"data.path '{d.path}' was prepared with images of shape {meta['shape']} and "
            f"{meta['num_classes']} classes; the config expects {shape} and data.num_classes="
            f"{d.num_classes}: run 'dpfeta prepare' with this config"
        )
    if d.n_train is not None and int(meta["sizes"]["train"]) != d.n_train:
        raise ValueError(
            f"data.n_train: expected N={d.n_train} training records, '{d.path}/meta.json' says {meta['sizes']['train']}"
        )


def load_prepared_eval(cfg: config_mod.Config) -> Splits:
    """The validation and test splits of a prepared folder (the training split is not read: the
    evaluation needs none), or of ``data.test_path``."""
    import pyarrow.fs as pafs

    from dpfeta.data.splits import _read_test_set, test_split_fact

    d = cfg.data
    fs, root = _filesystem(d.path)
    parts = {}
    for name in ("val", "test"):
        files = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(f"{root}/{name}", recursive=True, allow_not_found=True))
            if f.path.endswith(".parquet")
        )
        pieces = [_read_parquet_file(fs, f) for f in files]
        if pieces:
            parts[name] = ImageSet(
                np.concatenate([p.images for p in pieces]),
                np.concatenate([p.labels for p in pieces]).astype(np.int64),
                d.num_classes,
            )
        else:
            parts[name] = ImageSet(
                np.zeros((0, d.channels, d.resolution, d.resolution), np.uint8), np.zeros(0, np.int64), d.num_classes
            )
    test = _read_test_set(cfg) if d.test_path is not None else parts["test"]
    empty = ImageSet(
        np.zeros((0, d.channels, d.resolution, d.resolution), np.uint8), np.zeros(0, np.int64), d.num_classes
    )
    return Splits(train=empty, val=parts["val"], test=test, test_public=test_split_fact(cfg)[0])


def read_prepared(uri: str, split: str = "train"):
    """The Ray Dataset (columns image uint8 [C,H,W], label) of a split written by ``prepare``."""
    import ray

    fs, root = _filesystem(uri)
    ds = ray.data.read_parquet(f"{root}/{split}", filesystem=fs)
    return ds.map_batches(_decode_batch, batch_format="numpy")


def to_ray_dataset(imageset: ImageSet, *, num_blocks: int | None = None, index: bool = False):
    """ImageSet -> Ray Dataset with columns ``image`` (uint8 [C,H,W]) and ``label`` (int64).

    ``index=True`` adds an int64 ``index`` column (row number; used for seeded reproduction).
    The default block count gives >= 16 blocks of <= 16 MB so that ``streaming_split`` and
    distributed aggregations have work to spread.
    """
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    n = len(imageset)
    if num_blocks is None:
        num_blocks = max(16, math.ceil(imageset.images.nbytes / (16 << 20)))
    bounds = np.linspace(0, n, min(max(num_blocks, 1), max(n, 1)) + 1).astype(int)
    tables = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        columns = {
            "image": ArrowTensorArray.from_numpy(imageset.images[lo:hi]),
            "label": pa.array(imageset.labels[lo:hi], pa.int64()),
        }
        if index:
            columns["index"] = pa.array(np.arange(lo, hi, dtype=np.int64))
        tables.append(pa.table(columns))
    return ray.data.from_arrow(tables)


def materialize_shard(
    iterator, *, num_classes: int | None = None, image_shape: Iterable[int] | None = None, batch_size: int = 4096
) -> ImageSet:
    """Read this worker's whole shard once into memory (``ray.train.get_dataset_shard("train")``).

    Call it once per run: ``streaming_split(..., equal=False)`` gives every record to exactly one
    worker within one pass, but may assign rows differently in a second pass. ``image_shape`` (C,H,W)
    shapes an empty shard; ``num_classes`` defaults to max label + 1 (pass the config's value).
    """
    images, labels = [], []
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images.append(np.asarray(batch["image"], np.uint8))
        labels.append(np.asarray(batch["label"], np.int64))
    if images:
        x, y = np.concatenate(images), np.concatenate(labels)
    else:
        x, y = np.zeros((0, *(image_shape or (1, 1, 1))), np.uint8), np.zeros(0, np.int64)
    k = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    return ImageSet(x, y, k)
