"""Sensitive image data in: ``sources`` (readers and metadata sizes), ``splits`` (the documented
split rule, validation and fitting; raises before any privacy spend), ``shards`` (Parquet shards and
Ray Datasets for the workers). Imports neither torch nor Ray at import time."""

from dpfeta.data.shards import (
    check_prepared,
    load_prepared_eval,
    materialize_shard,
    prepare,
    prepared_meta,
    read_prepared,
    to_ray_dataset,
)
from dpfeta.data.sources import read_image_folder
from dpfeta.data.splits import (
    ImageSet,
    Splits,
    load_splits,
    public_train_size,
    same_location,
    split_indices,
    test_split_fact,
)

__all__ = [
    "ImageSet",
    "Splits",
    "check_prepared",
    "load_prepared_eval",
    "load_splits",
    "materialize_shard",
    "prepared_meta",
    "prepare",
    "public_train_size",
    "read_image_folder",
    "read_prepared",
    "same_location",
    "split_indices",
    "test_split_fact",
    "to_ray_dataset",
]
