"""Sensitive image data in: the deterministic split, validation and fitting (``load_splits``).

Every source yields ``ImageSet``s (uint8 [N, C, H, W] + int64 labels) fitted to ``data.resolution``
and ``data.channels``. Errors in the user's data are ``ValueError``s naming what was expected and what
was found, raised by ``load_splits`` before any privacy budget is spent.

Split rule (public and data-independent, so it reveals nothing about the records): let M be the size
of the source's training part and ``P = numpy.random.default_rng(data.split_seed).permutation(M)``.
If the source has no test part, ``P[:round(test_fraction*M)]`` is the test split; if it has no
validation part, the next ``round(val_fraction*M)`` indices are the validation split (held out for
private selection, disjoint from training). The remaining indices, in source order, are the training
split. Sources with a test part: ``idx`` (t10k files), ``torchvision`` (train=False), ``npz``
(``x_test``/``y_test``), and ``imagefolder``/``parquet`` folders laid out as ``train/ [val/] [test/]``
(the layout ``dpfeta prepare`` writes). ``digits`` (1,797 images) has none: with the defaults it
splits into 1,258 train / 180 val / 359 test.

Fitting rule: a source resolution s < r with r % s == 0 is upsampled (bilinear), s < r otherwise is
zero-padded centrally (MNIST 28 -> 32), s > r (or non-square) is resized (antialiased bilinear).
One-channel images are replicated to three when ``data.channels=3``; any other channel mismatch is
an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpfeta import config as config_mod
from dpfeta.data.sources import _check_same_shape, _Part, read_source, source_size

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    num_classes: int

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.num_classes)


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    test_public: bool = False  # True only for a separate test set the config declares public


def test_split_fact(cfg: config_mod.Config) -> tuple[bool, str]:
    """(is the test split public?, the public fact saying where it comes from), from the config
    alone. Metrics on a sensitive test split are non-DP (docs/privacy.md §7)."""
    d = cfg.data
    if d.test_path is not None:
        return True, f"a separate public test set (data.test_path={d.test_path})"
    if d.test_is_public:
        return (
            True,
            f"the source's own test part, declared public "
            f"(data.test_is_public: true; {d.source} {d.path or ''})".rstrip(),
        )
    return False, (
        "sensitive (part of the data source, not declared public): metrics on it are non-DP, "
        "reported under nondp/ and left out of the release"
    )


def load_splits(cfg: config_mod.Config) -> Splits:
    """Read, validate, fit and split ``cfg.data``; raises ValueError before any privacy spend."""
    d = cfg.data
    parts = read_source(cfg)
    for name, part in parts.items():
        _check_part(part, cfg, name)
    _check_same_shape(parts)
    fitted = {name: _fit(p.images, d.resolution, d.channels, p.where) for name, p in parts.items()}
    train_part = parts["train"]
    idx_train, idx_val, idx_test = split_indices(
        len(train_part.labels),
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        has_val="val" in parts,
        has_test="test" in parts,
    )

    def take(name: str, index: np.ndarray | None) -> ImageSet:
        images, labels = fitted[name], parts[name].labels
        if index is not None:
            images, labels = images[index], labels[index]
        return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64), d.num_classes)

    if d.test_is_public and "test" not in parts and d.test_path is None:
        raise ValueError(
            f"config key 'data.test_is_public': expected a source with its own test part "
            f"(data.source={d.source} at {d.path!r} has none, so the test split is carved out "
            f"of the sensitive data); set data.test_path to a separate public test set, or false"
        )
    if d.test_path is not None:
        test = _read_test_set(cfg)
    else:
        test = take("test", None) if "test" in parts else take("train", idx_test)
    splits = Splits(
        train=take("train", idx_train),
        val=take("val", None) if "val" in parts else take("train", idx_val),
        test=test,
        test_public=test_split_fact(cfg)[0],
    )
    _check_train(splits.train, cfg, train_part.where)
    log.info(
        "data %s: train %d, val %d, test %d images of shape %s",
        d.source,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        tuple(splits.train.images.shape[1:]),
    )
    return splits


def _read_test_set(cfg: config_mod.Config) -> ImageSet:
    """``data.test_path``: a separate test set in the source's format (its test part, else all of it)."""
    d = cfg.data
    if d.source == "digits":
        raise ValueError(
            "config key 'data.test_path': expected a source read from a path "
            "(digits has none; its test split is carved out of the sensitive set), got "
            f"{d.test_path!r}"
        )
    if d.path is not None and same_location(d.test_path, d.path):
        raise ValueError(
            f"config key 'data.test_path': expected a set apart from the sensitive data.path, "
            f"got the same location {d.test_path!r}"
        )
    tcfg = config_mod.replace(cfg, {"data.path": d.test_path, "data.test_path": None})
    parts = read_source(tcfg)
    part = parts.get("test", parts["train"])
    _check_part(part, tcfg, "test")
    images = _fit(part.images, d.resolution, d.channels, part.where)
    return ImageSet(np.ascontiguousarray(images), part.labels.astype(np.int64), d.num_classes)


def same_location(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def split_indices(
    m: int, *, val_fraction: float, test_fraction: float, seed: int, has_val: bool = False, has_test: bool = False
):
    """The documented split rule: (train, val, test) sorted index arrays into a part of size m."""
    perm = np.random.default_rng(seed).permutation(m)
    n_test = 0 if has_test else int(test_fraction * m + 0.5)
    n_val = 0 if has_val else int(val_fraction * m + 0.5)
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def public_train_size(cfg: config_mod.Config) -> int:
    """N of the training split from public facts: ``data.n_train``, else counts or file metadata.

    Reads no pixels (except that an ``npz`` label array is loaded to learn its length).
    """
    d = cfg.data
    if d.n_train is not None:
        return d.n_train
    m, has_val, has_test = source_size(cfg)
    train, _, _ = split_indices(
        m,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        has_val=has_val,
        has_test=has_test,
    )
    return len(train)


def _check_part(part: _Part, cfg: config_mod.Config, name: str) -> None:
    d = cfg.data
    if name == "train" and len(part.labels) == 0:
        raise ValueError(f"empty dataset: expected at least one training image in {part.where}, found 0")
    if part.images.ndim != 4 or len(part.images) != len(part.labels):
        raise ValueError(
            f"{part.where}: expected as many labels as images, found "
            f"{len(part.labels)} labels for {len(part.images)} images"
        )
    c = part.images.shape[1]
    if c != d.channels and not (c == 1 and d.channels == 3):
        raise ValueError(
            f"wrong channel count in {part.where}: expected data.channels={d.channels}, found {c}-channel images"
        )
    if len(part.labels):
        lo, hi = int(part.labels.min()), int(part.labels.max())
        if lo < 0 or hi >= d.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"labels outside 0..{d.num_classes - 1} (data.num_classes={d.num_classes}) "
                f"in {part.where}: found label {bad} (labels span {lo}..{hi})"
            )


def _check_train(train: ImageSet, cfg: config_mod.Config, where: str) -> None:
    d, n = cfg.data, len(train)
    if n == 0:
        raise ValueError(
            f"empty dataset: the training split of {where} has 0 images after holding out "
            f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction}"
        )
    if d.n_train is not None and n != d.n_train:
        raise ValueError(
            f"data.n_train: expected a training split of N={d.n_train} records (the public "
            f"N used for accounting), found N={n} in {where}"
        )
    counts = np.bincount(train.labels, minlength=d.num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(
            f"a class with no record: expected every class 0..{d.num_classes - 1} "
            f"(data.num_classes={d.num_classes}) in the training split of {where}, "
            f"found none of class {int(empty[0])}"
        )
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)


def _fit(images: np.ndarray, resolution: int, channels: int, where: str) -> np.ndarray:
    if images.shape[1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=1)
    n, c, h, w = images.shape
    if n == 0:
        return np.zeros((0, c, resolution, resolution), np.uint8)
    if (h, w) == (resolution, resolution):
        return images
    if h == w and h < resolution and resolution % h != 0:
        lo = (resolution - h) // 2
        out = np.zeros((n, images.shape[1], resolution, resolution), np.uint8)
        out[:, :, lo : lo + h, lo : lo + w] = images
        return out
    log.info("resizing %s from %dx%d to %dx%d", where, h, w, resolution, resolution)
    return _resize(images, resolution)


def _resize(images: np.ndarray, resolution: int, chunk: int = 4096) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start : start + chunk]).float()
        down = x.shape[-1] > resolution or x.shape[-2] > resolution
        y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=down)
        out.append(y.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)
