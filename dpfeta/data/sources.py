"""The data sources: readers for digits, IDX, image folders, npz, Parquet and torchvision roots, and
their training-part sizes from metadata alone (``source_size``: no pixels read). Each yields parts
(``train``, optional ``val``/``test``) of uint8 [N, C, H, W] images and int64 labels."""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dpfeta import config as config_mod
from dpfeta.images import class_folder_files, decode_image, read_class_folders, stack_images

TORCHVISION_SIZES = {"MNIST": 60000, "FashionMNIST": 60000, "CIFAR10": 50000}


DIGITS_SIZE = 1797


SPLIT_DIRS = ("train", "val", "test")


@dataclass
class _Part:
    """One part of a source before fitting: images [N, C, H, W] uint8, labels, where it came from."""

    images: np.ndarray
    labels: np.ndarray
    where: str


def _check_same_shape(parts: dict[str, _Part]) -> None:
    ref = parts["train"]
    for part in parts.values():
        if len(part.labels) and part.images.shape[1:] != ref.images.shape[1:]:
            raise ValueError(
                f"mixed shapes: expected images of shape {ref.images.shape[1:]} (C,H,W) "
                f"as in {ref.where}, found {part.images.shape[1:]} in {part.where}"
            )


def read_source(cfg: config_mod.Config) -> dict[str, _Part]:
    d = cfg.data
    readers = {
        "digits": _read_digits,
        "idx": _read_idx_source,
        "imagefolder": _read_imagefolder_source,
        "npz": _read_npz,
        "parquet": _read_parquet_source,
        "torchvision": _read_torchvision,
    }
    return readers[d.source](d)


def source_size(cfg: config_mod.Config) -> tuple[int, bool, bool]:
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
        return len(class_folder_files(groups["train"])), "val" in groups, "test" in groups
    fs, groups = _parquet_groups(d.path)
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in groups["train"])
    return rows, "val" in groups, "test" in groups


def _existing(path: Optional[str], key: str) -> Path:
    if path is None or not Path(path).expanduser().exists():
        raise ValueError(f"missing path: expected {key} to name an existing file or folder, found nothing at '{path}'")
    return Path(path).expanduser()


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Arrays [N,H,W], [N,H,W,C] or [N,C,H,W] (C in 1,3,4) of uint8 / ints 0..255 / floats in [0,1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ValueError(
                f"{where}: expected images [N,H,W], [N,H,W,C] or [N,C,H,W] with C in 1, 3, found shape {x.shape}"
            )
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
    raise ValueError(
        f"{where}: expected pixel values in 0..255 (integers) or [0, 1] (floats), "
        f"found {x.dtype} values in [{lo:g}, {hi:g}]"
    )


def _to_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1 and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        y = y.argmax(1)  # one-hot
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or (y.size and not np.all(y == np.round(y))):
        raise ValueError(
            f"{where}: expected integer class labels [N] (or one-hot [N, classes]), "
            f"found {y.dtype} labels of shape {y.shape}"
        )
    return y.astype(np.int64)


def _read_digits(d) -> dict[str, _Part]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return {"train": _Part(images, bunch.target.astype(np.int64), "scikit-learn digits")}


def _idx_file(root: Path, part: str, kind: str, required: bool = True) -> Optional[Path]:
    dim = 3 if kind == "images" else 1
    names = [f"{part}-{kind}{sep}idx{dim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (root / name).is_file():
            return root / name
    if required:
        raise ValueError(
            f"missing path: expected an IDX file {names[0]} (or {names[1]}) in data.path='{root}', found none"
        )
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
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            try:
                raw = fh.read(4 + 4 * 4)
            except (OSError, EOFError) as exc:
                raise ValueError(f"unreadable or corrupt IDX file '{path}': {exc}") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise ValueError(
            f"corrupt IDX file '{path}': expected the magic bytes 00 00 08 <ndim> of "
            f"unsigned-byte data, found {raw[:4].hex(' ')}"
        )
    return struct.unpack(f">{raw[3]}I", raw[4 : 4 + 4 * raw[3]])


def _read_idx(path: Path) -> np.ndarray:
    raw = _idx_bytes(path)
    dims = _idx_header(path, raw)
    offset = 4 + 4 * len(dims)
    if len(raw) - offset != math.prod(dims):
        raise ValueError(
            f"corrupt IDX file '{path}': expected {math.prod(dims)} data bytes for shape "
            f"{dims}, found {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _read_idx_source(d) -> dict[str, _Part]:
    root = _existing(d.path, "data.path")
    parts = {}
    for part, name in (("train", "train"), ("t10k", "test")):
        img_path = _idx_file(root, part, "images", required=part == "train")
        if img_path is None:
            continue
        images, labels = _read_idx(img_path), _read_idx(_idx_file(root, part, "labels"))
        parts[name] = _Part(_to_nchw(images, f"'{img_path}'"), _to_labels(labels, str(img_path)), f"'{img_path}'")
    return parts


def _split_groups(root: Path) -> dict[str, Path]:
    """``root`` itself as the training part, or its train/ [val/] [test/] sub-folders."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" in subdirs and subdirs <= set(SPLIT_DIRS):
        return {name: root / name for name in SPLIT_DIRS if name in subdirs}
    return {"train": root}


def read_image_folder(root: Path, where: str | None = None) -> _Part:
    """Class sub-folders of PNG/JPEG files (``images.read_class_folders``: the one class-folder layout)."""
    where = where or f"image folder '{root}'"
    return _Part(*read_class_folders(root, where=where), where)


def _read_imagefolder_source(d) -> dict[str, _Part]:
    root = _existing(d.path, "data.path")
    if not root.is_dir():
        raise ValueError(f"data.path: expected a folder of class sub-folders, found the file '{root}'")
    return {name: read_image_folder(path) for name, path in _split_groups(root).items()}


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
        raise ValueError(
            f"missing path: expected data.path to name a Parquet file or folder, found nothing at '{path}'"
        )
    if info.type == pafs.FileType.File:
        return fs, {"train": [root]}
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    groups: dict[str, list[str]] = {}
    top = {f[len(root) :].lstrip("/").split("/")[0] for f in files if "/" in f[len(root) :].lstrip("/")}
    layout = "train" in top
    for f in files:
        first = f[len(root) :].lstrip("/").split("/")[0]
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
        raise ValueError(f"{where}: expected columns 'image' (encoded bytes) and 'label', found {table.column_names}")
    column = table.column(image_col).combine_chunks()
    if pa.types.is_struct(column.type):  # Hugging Face datasets: {bytes, path}
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"{where}: expected column '{image_col}' of PNG/JPEG bytes, found {column.type}")
    names = [f"in {where} row {i}" for i in range(len(column))]
    images = [decode_image(b, name) for b, name in zip(column.to_pylist(), names)]
    labels = _to_labels(table.column(label_col).to_numpy(), where)
    return _Part(stack_images(images, names, where), labels, where)


def _read_parquet_source(d) -> dict[str, _Part]:
    fs, groups = _parquet_groups(d.path)
    out = {}
    for name, files in groups.items():
        pieces = [_read_parquet_file(fs, f) for f in files]
        pieces = [p for p in pieces if len(p.labels)] or pieces[:1]
        where = pieces[0].where if len(pieces) == 1 else f"Parquet files under '{d.path}' ({name})"
        _check_same_shape({"train": pieces[0], **{p.where: p for p in pieces[1:]}})
        out[name] = _Part(np.concatenate([p.images for p in pieces]), np.concatenate([p.labels for p in pieces]), where)
    return out


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
            raise ValueError(
                f"torchvision {d.name}: expected the dataset under data.path='{d.path}' "
                f"({exc}); set data.download: true to fetch it"
            ) from None
        images = np.asarray(ds.data)
        where = f"torchvision {d.name} ({name}) at '{d.path}'"
        out[name] = _Part(_to_nchw(images, where), _to_labels(np.asarray(ds.targets), where), where)
    return out
