"""Sensitive image data in: sources, the deterministic split, validation, Ray Data shards.

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

import contextlib
import gzip
import io
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from dpfeta import config as config_mod

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TORCHVISION_SIZES = {"MNIST": 60000, "FashionMNIST": 60000, "CIFAR10": 50000}
DIGITS_SIZE = 1797
SPLIT_DIRS = ("train", "val", "test")


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
    alone. Metrics on a sensitive test split are non-DP (privacy.md §7)."""
    d = cfg.data
    if d.test_path is not None:
        return True, f"a separate public test set (data.test_path={d.test_path})"
    if d.test_is_public:
        return True, f"the source's own test part, declared public (data.test_is_public: true; {d.source} {d.path or ''})".rstrip()
    return False, ("sensitive (part of the data source, not declared public): metrics on it are non-DP, "
                   "reported under nondp/ and left out of the release")


@dataclass
class _Part:
    """One part of a source before fitting: images [N, C, H, W] uint8, labels, where it came from."""

    images: np.ndarray
    labels: np.ndarray
    where: str


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_splits(cfg: config_mod.Config) -> Splits:
    """Read, validate, fit and split ``cfg.data``; raises ValueError before any privacy spend."""
    d = cfg.data
    parts = _read_source(cfg)
    for name, part in parts.items():
        _check_part(part, cfg, name)
    _check_same_shape(parts)
    fitted = {name: _fit(p.images, d.resolution, d.channels, p.where) for name, p in parts.items()}
    train_part = parts["train"]
    idx_train, idx_val, idx_test = split_indices(
        len(train_part.labels), val_fraction=d.val_fraction, test_fraction=d.test_fraction,
        seed=d.split_seed, has_val="val" in parts, has_test="test" in parts)

    def take(name: str, index: np.ndarray | None) -> ImageSet:
        images, labels = fitted[name], parts[name].labels
        if index is not None:
            images, labels = images[index], labels[index]
        return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64), d.num_classes)

    if d.test_is_public and "test" not in parts and d.test_path is None:
        raise ValueError(f"config key 'data.test_is_public': expected a source with its own test part "
                         f"(data.source={d.source} at {d.path!r} has none, so the test split is carved out "
                         f"of the sensitive data); set data.test_path to a separate public test set, or false")
    if d.test_path is not None:
        test = _read_test_set(cfg)
    else:
        test = take("test", None) if "test" in parts else take("train", idx_test)
    splits = Splits(
        train=take("train", idx_train),
        val=take("val", None) if "val" in parts else take("train", idx_val),
        test=test, test_public=test_split_fact(cfg)[0])
    _check_train(splits.train, cfg, train_part.where)
    log.info("data %s: train %d, val %d, test %d images of shape %s", d.source, len(splits.train),
             len(splits.val), len(splits.test), tuple(splits.train.images.shape[1:]))
    return splits


def _read_test_set(cfg: config_mod.Config) -> ImageSet:
    """``data.test_path``: a separate test set in the source's format (its test part, else all of it)."""
    d = cfg.data
    if d.source == "digits":
        raise ValueError("config key 'data.test_path': expected a source read from a path "
                         "(digits has none; its test split is carved out of the sensitive set), got "
                         f"{d.test_path!r}")
    if d.path is not None and same_location(d.test_path, d.path):
        raise ValueError(f"config key 'data.test_path': expected a set apart from the sensitive data.path, "
                         f"got the same location {d.test_path!r}")
    tcfg = config_mod.replace(cfg, {"data.path": d.test_path, "data.test_path": None})
    parts = _read_source(tcfg)
    part = parts.get("test", parts["train"])
    _check_part(part, tcfg, "test")
    images = _fit(part.images, d.resolution, d.channels, part.where)
    return ImageSet(np.ascontiguousarray(images), part.labels.astype(np.int64), d.num_classes)


def same_location(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def split_indices(m: int, *, val_fraction: float, test_fraction: float, seed: int,
                  has_val: bool = False, has_test: bool = False):
    """The documented split rule: (train, val, test) sorted index arrays into a part of size m."""
    perm = np.random.default_rng(seed).permutation(m)
    n_test = 0 if has_test else int(test_fraction * m + 0.5)
    n_val = 0 if has_val else int(val_fraction * m + 0.5)
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return np.sort(train), np.sort(val), np.sort(test)


def public_train_size(cfg: config_mod.Config) -> int:
    """N of the training split from public facts: ``data.n_train``, else counts or file metadata.

    Reads no pixels (except that an ``npz`` label array is loaded to learn its length).
    """
    d = cfg.data
    if d.n_train is not None:
        return d.n_train
    m, has_val, has_test = _source_size(cfg)
    train, _, _ = split_indices(m, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                seed=d.split_seed, has_val=has_val, has_test=has_test)
    return len(train)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_part(part: _Part, cfg: config_mod.Config, name: str) -> None:
    d = cfg.data
    if name == "train" and len(part.labels) == 0:
        raise ValueError(f"empty dataset: expected at least one training image in {part.where}, found 0")
    if part.images.ndim != 4 or len(part.images) != len(part.labels):
        raise ValueError(f"{part.where}: expected as many labels as images, found "
                         f"{len(part.labels)} labels for {len(part.images)} images")
    c = part.images.shape[1]
    if c != d.channels and not (c == 1 and d.channels == 3):
        raise ValueError(f"wrong channel count in {part.where}: expected data.channels={d.channels}, "
                         f"found {c}-channel images")
    if len(part.labels):
        lo, hi = int(part.labels.min()), int(part.labels.max())
        if lo < 0 or hi >= d.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels outside 0..{d.num_classes - 1} (data.num_classes={d.num_classes}) "
                             f"in {part.where}: found label {bad} (labels span {lo}..{hi})")


def _check_same_shape(parts: dict[str, _Part]) -> None:
    ref = parts["train"]
    for part in parts.values():
        if len(part.labels) and part.images.shape[1:] != ref.images.shape[1:]:
            raise ValueError(f"mixed shapes: expected images of shape {ref.images.shape[1:]} (C,H,W) "
                             f"as in {ref.where}, found {part.images.shape[1:]} in {part.where}")


def _check_train(train: ImageSet, cfg: config_mod.Config, where: str) -> None:
    d, n = cfg.data, len(train)
    if n == 0:
        raise ValueError(f"empty dataset: the training split of {where} has 0 images after holding out "
                         f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction}")
    if d.n_train is not None and n != d.n_train:
        raise ValueError(f"data.n_train: expected a training split of N={d.n_train} records (the public "
                         f"N used for accounting), found N={n} in {where}")
    counts = np.bincount(train.labels, minlength=d.num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f"a class with no record: expected every class 0..{d.num_classes - 1} "
                         f"(data.num_classes={d.num_classes}) in the training split of {where}, "
                         f"found none of class {int(empty[0])}")
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)


# --------------------------------------------------------------------------------------------
# Fitting to the configured resolution and channels
# --------------------------------------------------------------------------------------------


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
        out[:, :, lo:lo + h, lo:lo + w] = images
        return out
    log.info("resizing %s from %dx%d to %dx%d", where, h, w, resolution, resolution)
    return _resize(images, resolution)


def _resize(images: np.ndarray, resolution: int, chunk: int = 4096) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start:start + chunk]).float()
        down = x.shape[-1] > resolution or x.shape[-2] > resolution
        y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=down)
        out.append(y.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Arrays [N,H,W], [N,H,W,C] or [N,C,H,W] (C in 1,3,4) of uint8 / ints 0..255 / floats in [0,1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ValueError(f"{where}: expected images [N,H,W], [N,H,W,C] or [N,C,H,W] with C in "
                             f"1, 3, found shape {x.shape}")
    else:
        raise ValueError(f"{where}: expected an image array of 3 or 4 dimensions, found shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.size == 0:
        return x.astype(np.uint8)
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(x.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.ascontiguousarray(np.round(x * 255.0).astype(np.uint8))
    if lo >= 0 and hi <= 255 and np.all(x == np.round(x)):
        return np.ascontiguousarray(x.astype(np.uint8))
    raise ValueError(f"{where}: expected pixel values in 0..255 (integers) or [0, 1] (floats), "
                     f"found {x.dtype} values in [{lo:g}, {hi:g}]")


def _to_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1 and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        y = y.argmax(1)  # one-hot
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or (y.size and not np.all(y == np.round(y))):
        raise ValueError(f"{where}: expected integer class labels [N] (or one-hot [N, classes]), "
                         f"found {y.dtype} labels of shape {y.shape}")
    return y.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _read_source(cfg: config_mod.Config) -> dict[str, _Part]:
    d = cfg.data
    readers = {"digits": _read_digits, "idx": _read_idx_source, "imagefolder": _read_imagefolder_source,
               "npz": _read_npz, "parquet": _read_parquet_source, "torchvision": _read_torchvision}
    return readers[d.source](d)


def _source_size(cfg: config_mod.Config) -> tuple[int, bool, bool]:
    """(size of the training part, has a val part, has a test part) without reading pixels."""
    d = cfg.data
    if d.source == "digits":
        return DIGITS_SIZE, False, False
    if d.source == "torchvision":
        if d.name not in TORCHVISION_SIZES:
            raise ValueError(f"data.name: expected one of {', '.join(TORCHVISION_SIZES)}, got {d.name!r}")
        try:  # the root on disk; its canonical size when it is yet to be downloaded
            import torchvision

            root = str(Path(str(d.path)).expanduser())
            return len(getattr(torchvision.datasets, d.name)(root=root, train=True)), False, True
        except RuntimeError:
            return TORCHVISION_SIZES[d.name], False, True
    if d.source == "idx":
        root = _existing(d.path, "data.path")
        header = _idx_header(_idx_file(root, "train", "labels"))
        return header[0], False, _idx_file(root, "t10k", "labels", required=False) is not None
    if d.source == "npz":
        with np.load(_existing(d.path, "data.path")) as z:
            key = _npz_key(z, ("y", "labels"), d.path)
            return len(z[key]), "y_val" in z.files, "y_test" in z.files
    if d.source == "imagefolder":
        groups = _split_groups(_existing(d.path, "data.path"))
        return len(_list_images(groups["train"])), "val" in groups, "test" in groups
    fs, groups = _parquet_groups(d.path)
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in groups["train"])
    return rows, "val" in groups, "test" in groups


def _existing(path: Optional[str], key: str) -> Path:
    if path is None or not Path(path).expanduser().exists():
        raise ValueError(f"missing path: expected {key} to name an existing file or folder, "
                         f"found nothing at '{path}'")
    return Path(path).expanduser()


def _read_digits(d) -> dict[str, _Part]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return {"train": _Part(images, bunch.target.astype(np.int64), "scikit-learn digits")}


# IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------


def _idx_file(root: Path, part: str, kind: str, required: bool = True) -> Optional[Path]:
    dim = 3 if kind == "images" else 1
    names = [f"{part}-{kind}{sep}idx{dim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (root / name).is_file():
            return root / name
    if required:
        raise ValueError(f"missing path: expected an IDX file {names[0]} (or {names[1]}) in "
                         f"data.path='{root}', found none")
    return None


def _idx_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise ValueError(f"unreadable or corrupt IDX file '{path}': {exc}") from None


def _idx_header(path: Path, raw: bytes | None = None) -> tuple[int, ...]:
    if raw is None:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            try:
                raw = fh.read(4 + 4 * 4)
            except (OSError, EOFError) as exc:
                raise ValueError(f"unreadable or corrupt IDX file '{path}': {exc}") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise ValueError(f"corrupt IDX file '{path}': expected the magic bytes 00 00 08 <ndim> of "
                         f"unsigned-byte data, found {raw[:4].hex(' ')}")
    return struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])


def _read_idx(path: Path) -> np.ndarray:
    raw = _idx_bytes(path)
    dims = _idx_header(path, raw)
    offset = 4 + 4 * len(dims)
    if len(raw) - offset != math.prod(dims):
        raise ValueError(f"corrupt IDX file '{path}': expected {math.prod(dims)} data bytes for shape "
                         f"{dims}, found {len(raw) - offset}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _read_idx_source(d) -> dict[str, _Part]:
    root = _existing(d.path, "data.path")
    parts = {}
    for part, name in (("train", "train"), ("t10k", "test")):
        img_path = _idx_file(root, part, "images", required=part == "train")
        if img_path is None:
            continue
        images, labels = _read_idx(img_path), _read_idx(_idx_file(root, part, "labels"))
        parts[name] = _Part(_to_nchw(images, f"'{img_path}'"), _to_labels(labels, str(img_path)),
                            f"'{img_path}'")
    return parts


# Image folders ------------------------------------------------------------------------------


def _split_groups(root: Path) -> dict[str, Path]:
    """``root`` itself as the training part, or its train/ [val/] [test/] sub-folders."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" in subdirs and subdirs <= set(SPLIT_DIRS):
        return {name: root / name for name in SPLIT_DIRS if name in subdirs}
    return {"train": root}


def _class_folders(root: Path) -> list[tuple[int, Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if all(p.name.isdigit() for p in folders):
        return [(int(p.name), p) for p in folders]  # "000003" -> 3
    return list(enumerate(folders))


def _list_images(root: Path) -> list[tuple[Path, int]]:
    files = []
    for label, folder in _class_folders(root):
        images = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        images.sort(key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0, f.name))
        files += [(f, label) for f in images]
    return files


def decode_image(data: bytes | Path, where: str) -> np.ndarray:
    """PNG/JPEG -> uint8 [C, H, W] with C = 1 (greyscale) or 3; names ``where`` when corrupt."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "LA", "I;16", "I"):
                img = img.convert("L") if mode in ("1", "LA") else img
                arr = np.asarray(img)
                if arr.dtype != np.uint8:
                    arr = (arr.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
                return arr[None]
            arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
            if mode == "P" and np.all(arr == arr[:1]):
                return np.ascontiguousarray(arr[:1])  # greyscale palette
            return np.ascontiguousarray(arr)
    except UnidentifiedImageError:
        raise ValueError(f"unreadable or corrupt image {where}: not a PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"unreadable or corrupt image {where}: {exc}") from None


def _stack(images: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8)
    ref = images[0].shape
    for img, name in zip(images, names):
        if img.shape != ref:
            raise ValueError(f"mixed shapes in {where}: expected every image to be {ref} (C,H,W) like "
                             f"{names[0]}, found {img.shape} in {name}")
    return np.stack(images)


def read_image_folder(root: Path, where: str | None = None) -> _Part:
    """Class sub-folders of PNG/JPEG files; numeric folder names are labels, others sorted."""
    files = _list_images(root)
    names = [f"'{f}'" for f, _ in files]
    images = [decode_image(f, name) for (f, _), name in zip(files, names)]
    labels = np.array([label for _, label in files], np.int64)
    where = where or f"image folder '{root}'"
    return _Part(_stack(images, names, where), labels, where)


def _read_imagefolder_source(d) -> dict[str, _Part]:
    root = _existing(d.path, "data.path")
    if not root.is_dir():
        raise ValueError(f"data.path: expected a folder of class sub-folders, found the file '{root}'")
    return {name: read_image_folder(path) for name, path in _split_groups(root).items()}


# npz ------------------------------------------------------------------------------------------


def _npz_key(z, keys: tuple[str, ...], path) -> str:
    for key in keys:
        if key in z.files:
            return key
    raise ValueError(f"npz '{path}': expected an array named {' or '.join(keys)}, found {z.files}")


def _read_npz(d) -> dict[str, _Part]:
    path = _existing(d.path, "data.path")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable npz file '{path}': {exc}") from None
    with z:
        parts = {"train": (_npz_key(z, ("x", "images"), path), _npz_key(z, ("y", "labels"), path))}
        for name in ("val", "test"):
            if f"x_{name}" in z.files:
                parts[name] = (f"x_{name}", _npz_key(z, (f"y_{name}",), path))
        out = {}
        for name, (xk, yk) in parts.items():
            where = f"npz '{path}' arrays {xk}/{yk}"
            out[name] = _Part(_to_nchw(z[xk], where), _to_labels(z[yk], where), where)
    return out


# Parquet (local or any pyarrow filesystem URI) ---------------------------------------------


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _parquet_groups(path: Optional[str]):
    import pyarrow.fs as pafs

    fs, root = _filesystem(str(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"missing path: expected data.path to name a Parquet file or folder, found "
                         f"nothing at '{path}'")
    if info.type == pafs.FileType.File:
        return fs, {"train": [root]}
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    groups: dict[str, list[str]] = {}
    top = {f[len(root):].lstrip("/").split("/")[0] for f in files if "/" in f[len(root):].lstrip("/")}
    layout = "train" in top
    for f in files:
        first = f[len(root):].lstrip("/").split("/")[0]
        groups.setdefault(first if layout and first in SPLIT_DIRS else "train", []).append(f)
    if not groups.get("train"):
        raise ValueError(f"empty dataset: expected .parquet files under '{path}', found none")
    return fs, groups


def _read_parquet_file(fs, path: str) -> _Part:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"Parquet file '{path}'"
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"unreadable or corrupt {where}: {exc}") from None
    image_col = next((c for c in ("image", "img") if c in table.column_names), None)
    label_col = next((c for c in ("label", "labels") if c in table.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(f"{where}: expected columns 'image' (encoded bytes) and 'label', found "
                         f"{table.column_names}")
    column = table.column(image_col).combine_chunks()
    if pa.types.is_struct(column.type):  # Hugging Face datasets: {bytes, path}
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"{where}: expected column '{image_col}' of PNG/JPEG bytes, found {column.type}")
    names = [f"in {where} row {i}" for i in range(len(column))]
    images = [decode_image(b, name) for b, name in zip(column.to_pylist(), names)]
    labels = _to_labels(table.column(label_col).to_numpy(), where)
    return _Part(_stack(images, names, where), labels, where)


def _read_parquet_source(d) -> dict[str, _Part]:
    fs, groups = _parquet_groups(d.path)
    out = {}
    for name, files in groups.items():
        pieces = [_read_parquet_file(fs, f) for f in files]
        pieces = [p for p in pieces if len(p.labels)] or pieces[:1]
        where = pieces[0].where if len(pieces) == 1 else f"Parquet files under '{d.path}' ({name})"
        _check_same_shape({"train": pieces[0], **{p.where: p for p in pieces[1:]}})
        out[name] = _Part(np.concatenate([p.images for p in pieces]),
                          np.concatenate([p.labels for p in pieces]), where)
    return out


# torchvision ------------------------------------------------------------------------------


def _read_torchvision(d) -> dict[str, _Part]:
    import torchvision

    if d.name not in TORCHVISION_SIZES:
        raise ValueError(f"data.name: expected one of {', '.join(TORCHVISION_SIZES)}, got {d.name!r}")
    if not d.download:
        _existing(d.path, "data.path")
    cls = getattr(torchvision.datasets, d.name)
    out = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=str(Path(d.path).expanduser()), train=train, download=d.download)
        except RuntimeError as exc:
            raise ValueError(f"torchvision {d.name}: expected the dataset under data.path='{d.path}' "
                             f"({exc}); set data.download: true to fetch it") from None
        images = np.asarray(ds.data)
        where = f"torchvision {d.name} ({name}) at '{d.path}'"
        out[name] = _Part(_to_nchw(images, where), _to_labels(np.asarray(ds.targets), where), where)
    return out


# --------------------------------------------------------------------------------------------
# Parquet shards and Ray Data
# --------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def prepare(cfg: config_mod.Config, out_uri: str, *, rows_per_shard: int = 8192) -> str:
    """Write the validated splits as Parquet shards (``image`` PNG bytes, ``label`` int64).

    Layout: ``out_uri/{train,val,test}/part-00000.parquet ...`` plus ``meta.json`` (public facts:
    sizes, shape, classes). ``data.source: parquet`` with ``data.path: out_uri`` reads it back with
    the same splits; ``read_prepared`` gives the Ray Dataset a cluster reads.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = load_splits(cfg)
    fs, root = _filesystem(out_uri)
    meta = {"num_classes": cfg.data.num_classes, "shape": list(splits.train.images.shape[1:]),
            "sizes": {}, "source": cfg.data.source}
    for name in SPLIT_DIRS:
        split = getattr(splits, name)
        fs.create_dir(f"{root}/{name}", recursive=True)
        for shard, start in enumerate(range(0, max(len(split), 1), rows_per_shard)):
            part = split.subset(slice(start, start + rows_per_shard))
            table = pa.table({"image": pa.array([encode_png(x) for x in part.images], pa.binary()),
                              "label": pa.array(part.labels, pa.int64())})
            pq.write_table(table, f"{root}/{name}/part-{shard:05d}.parquet", filesystem=fs)
        meta["sizes"][name] = len(split)
    with fs.open_output_stream(f"{root}/meta.json") as fh:
        fh.write(json.dumps(meta, indent=2).encode())
    return out_uri


def _decode_batch(batch: dict) -> dict:
    images = np.stack([decode_image(bytes(b), f"row {i}") for i, b in enumerate(batch["image"])])
    return {"image": images, "label": np.asarray(batch["label"], np.int64)}


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
        columns = {"image": ArrowTensorArray.from_numpy(imageset.images[lo:hi]),
                   "label": pa.array(imageset.labels[lo:hi], pa.int64())}
        if index:
            columns["index"] = pa.array(np.arange(lo, hi, dtype=np.int64))
        tables.append(pa.table(columns))
    return ray.data.from_arrow(tables)


def materialize_shard(iterator, *, num_classes: int | None = None,
                      image_shape: Iterable[int] | None = None, batch_size: int = 4096) -> ImageSet:
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


@contextlib.contextmanager
def ray_session(cfg: config_mod.Config, *, num_cpus: int | None = None):
    """Use the running Ray, else connect to ``run.ray_address`` (or RAY_ADDRESS), else start a local one.

    Only a Ray started here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
