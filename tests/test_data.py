"""Data sources, the split rule, fitting, and validation before any privacy spend."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpfeta import config, data
from dpfeta.data import splits as splits_mod
from dpfeta.images import encode_png

K = 4  # classes in the small synthetic sets


def make_cfg(**updates) -> config.Config:
    base = {
        "data.num_classes": K,
        "data.resolution": 8,
        "data.val_fraction": 0.0,
        "data.test_fraction": 0.0,
        "central.batch_size": 8,
        "finetune.batch_size": 8,
        "privacy.delta": 1e-4,
    }
    base.update({k.replace("__", "."): v for k, v in updates.items()})
    return config.replace(config.Config(), base)


def toy(n: int = 40, size: int = 8, channels: int = 1, seed: int = 0):
    """n images [n, size, size(, channels)] uint8 with a row-unique pixel, balanced labels."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    return images, np.arange(n) % K


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    raw = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def write_folder(root, images: np.ndarray, labels: np.ndarray, names=None, ext=".png") -> None:
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / (names[label] if names else f"{label:06d}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}{ext}")


def png(img: np.ndarray) -> bytes:
    return encode_png(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))


def write_parquet(path, images, labels, hf: bool = False) -> None:
    blobs = [png(x) for x in images]
    column = pa.array([{"bytes": b, "path": None} for b in blobs]) if hf else pa.array(blobs, pa.binary())
    pq.write_table(pa.table({"image": column, "label": pa.array(labels, pa.int64())}), path)


# --------------------------------------------------------------------------------------------
# The split rule and digits
# --------------------------------------------------------------------------------------------


def test_split_rule_is_the_documented_permutation():
    train, val, test = data.split_indices(100, val_fraction=0.1, test_fraction=0.2, seed=7)
    perm = np.random.default_rng(7).permutation(100)
    assert np.array_equal(test, np.sort(perm[:20])) and np.array_equal(val, np.sort(perm[20:30]))
    assert np.array_equal(train, np.sort(perm[30:]))
    assert len(set(train) | set(val) | set(test)) == 100
    train, val, test = data.split_indices(100, val_fraction=0.1, test_fraction=0.2, seed=7, has_test=True)
    assert (len(train), len(val), len(test)) == (90, 10, 0)


def test_digits_default_split():
    cfg = make_cfg(data__num_classes=10, data__resolution=16, data__val_fraction=0.1, data__test_fraction=0.2)
    s = data.load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (1258, 180, 359)
    assert s.train.images.shape == (1258, 1, 16, 16) and s.train.images.dtype == np.uint8
    assert s.train.labels.dtype == np.int64 and s.train.images.max() == 255
    assert data.public_train_size(cfg) == 1258
    again = data.load_splits(cfg)
    assert np.array_equal(again.train.images, s.train.images)
    # digits are 8x8 values 0..16 -> 0..255, bilinearly upsampled to 16x16.
    import torch
    from sklearn.datasets import load_digits

    src = torch.tensor(np.round(load_digits().images * 255 / 16))[:, None]
    train_idx, _, _ = data.split_indices(1797, val_fraction=0.1, test_fraction=0.2, seed=0)
    ref = torch.nn.functional.interpolate(src[train_idx], size=(16, 16), mode="bilinear").round()
    assert np.array_equal(s.train.images, ref.numpy().astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Loaders on small files written here
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_train_and_t10k(tmp_path, gz):
    x, y = toy(40, size=28)
    xt, yt = toy(12, size=28, seed=1)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", x, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", y, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", xt, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", yt, gz)
    cfg = make_cfg(
        data__source="idx",
        data__path=str(tmp_path),
        data__resolution=32,
        data__val_fraction=0.25,
        data__test_fraction=0.3,
    )
    s = data.load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 12)  # test = t10k, val from train
    assert np.array_equal(s.test.images[:, 0, 2:30, 2:30], xt)  # 28 -> 32: zero-padded
    assert s.test.images[:, :, :2].max() == 0
    train_idx, _, _ = data.split_indices(40, val_fraction=0.25, test_fraction=0.3, seed=0, has_test=True)
    assert np.array_equal(s.train.images[:, 0, 2:30, 2:30], x[train_idx])
    assert np.array_equal(s.train.labels, y[train_idx])
    assert data.public_train_size(cfg) == 30


def test_imagefolder_loader_numeric_and_named_classes(tmp_path):
    x, y = toy(20)
    write_folder(tmp_path / "num", x, y)  # 000000 .. 000003
    s = data.load_splits(make_cfg(data__source="imagefolder", data__path=str(tmp_path / "num")))
    order = np.lexsort((np.arange(20), y))  # files sorted by class folder, then name
    got = {(int(lab), img.tobytes()) for img, lab in zip(s.train.images, s.train.labels)}
    assert got == {(int(lab), img[None].tobytes()) for img, lab in zip(x[order], y[order])}
    assert data.public_train_size(make_cfg(data__source="imagefolder", data__path=str(tmp_path / "num"))) == 20

    names = ["zebra", "ant", "cat", "dog"]  # sorted: ant=0, cat=1, dog=2, zebra=3
    xr, _ = toy(8, channels=3)
    write_folder(tmp_path / "named", xr, np.arange(8) % 4, names=names, ext=".png")
    s = data.load_splits(
        make_cfg(
            data__source="imagefolder",
            data__path=str(tmp_path / "named"),
            data__channels=3,
            central__batch_size=4,
            finetune__batch_size=4,
        )
    )
    assert s.train.images.shape == (8, 3, 8, 8)
    by_label = {int(lab): img for img, lab in zip(s.train.images, s.train.labels)}
    assert np.array_equal(by_label[sorted(names).index("zebra")], xr[4].transpose(2, 0, 1))


def test_imagefolder_train_test_layout_and_jpeg(tmp_path):
    x, y = toy(16, size=16)
    write_folder(tmp_path / "train", x[:12], y[:12], ext=".jpg")
    write_folder(tmp_path / "test", x[12:], y[12:], ext=".JPEG")
    s = data.load_splits(make_cfg(data__source="imagefolder", data__path=str(tmp_path), data__test_fraction=0.4))
    assert (len(s.train), len(s.test)) == (12, 4)
    assert s.train.images.shape == (12, 1, 8, 8)  # 16 -> 8 resized


def test_npz_loader_layouts(tmp_path):
    x, y = toy(24, channels=3)
    xt, yt = toy(8, channels=3, seed=3)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32) / 255, y=y, x_test=xt, y_test=np.eye(K)[yt])
    cfg = make_cfg(data__source="npz", data__path=str(tmp_path / "d.npz"), data__channels=3)
    s = data.load_splits(cfg)
    assert np.array_equal(s.train.images, x.transpose(0, 3, 1, 2))  # NHWC floats -> NCHW uint8
    assert np.array_equal(s.test.labels, yt)  # one-hot -> index
    np.savez(tmp_path / "g.npz", images=x[..., 0], labels=y)
    cfg = make_cfg(data__source="npz", data__path=str(tmp_path / "g.npz"), data__channels=3)
    s = data.load_splits(cfg)
    assert np.array_equal(s.train.images, np.repeat(x[:, None, :, :, 0], 3, axis=1))  # grey -> RGB


def test_parquet_loader_file_folder_and_hf(tmp_path):
    x, y = toy(20)
    write_parquet(tmp_path / "one.parquet", x, y)
    s = data.load_splits(make_cfg(data__source="parquet", data__path=str(tmp_path / "one.parquet")))
    assert np.array_equal(s.train.images[:, 0], x) and np.array_equal(s.train.labels, y)
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "test").mkdir()
    write_parquet(tmp_path / "ds" / "train" / "a.parquet", x[:10], y[:10], hf=True)
    write_parquet(tmp_path / "ds" / "train" / "b.parquet", x[10:16], y[10:16])
    write_parquet(tmp_path / "ds" / "test" / "a.parquet", x[16:], y[16:])
    cfg = make_cfg(data__source="parquet", data__path=f"file://{tmp_path}/ds")
    s = data.load_splits(cfg)
    assert np.array_equal(s.train.images[:, 0], x[:16]) and np.array_equal(s.test.labels, y[16:])
    assert data.public_train_size(cfg) == 16


def test_prepare_writes_shards_that_read_back_as_the_same_splits(tmp_path):
    cfg = make_cfg(data__num_classes=10, data__resolution=16, data__val_fraction=0.1, data__test_fraction=0.2)
    out = data.prepare(cfg, str(tmp_path / "prepared"), rows_per_shard=500)
    files = sorted(p.relative_to(tmp_path / "prepared").as_posix() for p in (tmp_path / "prepared").rglob("*.*"))
    assert files == [
        "meta.json",
        "test/part-00000.parquet",
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "train/part-00002.parquet",
        "val/part-00000.parquet",
    ]
    back = data.load_splits(config.replace(cfg, {"data.source": "parquet", "data.path": out}))
    ref = data.load_splits(cfg)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(back, name).images, getattr(ref, name).images)
        assert np.array_equal(getattr(back, name).labels, getattr(ref, name).labels)


def test_fit_rules():
    x = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 1, 28, 28).astype(np.uint8)
    assert np.array_equal(splits_mod._fit(x, 32, 1, "t")[:, :, 2:30, 2:30], x)  # pad
    up = splits_mod._fit(np.full((1, 1, 8, 8), 77, np.uint8), 16, 3, "t")  # upsample + replicate
    assert up.shape == (1, 3, 16, 16) and (up == 77).all()
    down = splits_mod._fit(np.full((1, 1, 32, 32), 200, np.uint8), 16, 1, "t")
    assert down.shape == (1, 1, 16, 16) and (down == 200).all()


# --------------------------------------------------------------------------------------------
# Validation: each a clear ValueError naming expected and found, before any privacy spend
# --------------------------------------------------------------------------------------------


def _npz(tmp_path, x, y, **cfg):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return make_cfg(data__source="npz", data__path=str(tmp_path / "d.npz"), **cfg)


def _case_missing_path(tmp_path):
    return make_cfg(data__source="idx", data__path=str(tmp_path / "nope")), r"missing path.*nope"


def _case_missing_idx_file(tmp_path):
    return make_cfg(data__source="idx", data__path=str(tmp_path)), r"train-images-idx3-ubyte.*found none"


def _case_corrupt_idx(tmp_path):
    x, y = toy(40)
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    return (
        make_cfg(data__source="idx", data__path=str(tmp_path)),
        r"corrupt IDX file '.*train-images-idx3-ubyte': expected 2560 data bytes .* found 2555",
    )


def _case_empty_folder(tmp_path):
    for k in range(K):
        (tmp_path / str(k)).mkdir()
    return make_cfg(data__source="imagefolder", data__path=str(tmp_path)), r"empty dataset.*found 0"


def _case_corrupt_image(tmp_path):
    x, y = toy(12)
    write_folder(tmp_path, x, y)
    (tmp_path / "000002" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return make_cfg(data__source="imagefolder", data__path=str(tmp_path)), r"corrupt image '.*000002/2\.png'"


def _case_corrupt_parquet_image(tmp_path):
    x, y = toy(12)
    pq.write_table(
        pa.table({"image": pa.array([png(i) for i in x[:-1]] + [b"garbage"], pa.binary()), "label": pa.array(y)}),
        tmp_path / "d.parquet",
    )
    return (
        make_cfg(data__source="parquet", data__path=str(tmp_path / "d.parquet")),
        r"corrupt image in Parquet file '.*d\.parquet' row 11",
    )


def _case_mixed_shapes(tmp_path):
    x, y = toy(12)
    write_folder(tmp_path, x, y)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "000001" / "zz.png")
    return (
        make_cfg(data__source="imagefolder", data__path=str(tmp_path)),
        r"mixed shapes.*expected every image to be \(1, 8, 8\).*found \(1, 10, 10\) in '.*zz\.png'",
    )


def _case_mixed_shapes_train_test(tmp_path):
    x, y = toy(40)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=toy(8, size=10)[0], y_test=y[:8])
    return (
        make_cfg(data__source="npz", data__path=str(tmp_path / "d.npz")),
        r"mixed shapes: expected images of shape \(1, 8, 8\).*found \(1, 10, 10\)",
    )


def _case_wrong_channels(tmp_path):
    x, y = toy(40, channels=3)
    return _npz(tmp_path, x, y), r"wrong channel count.*expected data.channels=1, found 3-channel"


def _case_label_out_of_range(tmp_path):
    x, y = toy(40)
    y[5] = K
    return _npz(tmp_path, x, y), rf"labels outside 0..{K - 1} .*found label {K}"


def _case_negative_label(tmp_path):
    x, y = toy(40)
    y[3] = -1
    return _npz(tmp_path, x, y), r"labels outside 0..3 .*found label -1"


def _case_class_without_record(tmp_path):
    x, y = toy(40)
    y[y == 2] = 1
    return _npz(tmp_path, x, y), r"a class with no record.*found none of class 2"


def _case_batch_too_large(tmp_path):
    x, y = toy(40)
    return _npz(tmp_path, x, y, central__batch_size=41), r"central.batch_size.*<= N=40.*got 41"


def _case_delta_too_large(tmp_path):
    x, y = toy(40)
    return _npz(tmp_path, x, y, privacy__delta=0.03), r"delta < 1/N = 0.025 \(N=40\), got 0.03"


def _case_n_train_mismatch(tmp_path):
    x, y = toy(40)
    return _npz(tmp_path, x, y, data__n_train=60000), r"expected a training split of N=60000 .*found N=40"


def _case_bad_pixels(tmp_path):
    x, y = toy(40)
    return _npz(tmp_path, x.astype(np.float32) - 128, y), r"expected pixel values in 0..255 .*found float32"


def _case_npz_keys(tmp_path):
    x, y = toy(40)
    np.savez(tmp_path / "d.npz", pixels=x, y=y)
    return (
        make_cfg(data__source="npz", data__path=str(tmp_path / "d.npz")),
        r"expected an array named x or images, found \['pixels', 'y'\]",
    )


def _case_torchvision_missing(tmp_path):
    (tmp_path / "root").mkdir()
    return (
        make_cfg(data__source="torchvision", data__name="MNIST", data__path=str(tmp_path / "root")),
        r"torchvision MNIST: expected the dataset .*set data.download: true",
    )


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_validation_errors(tmp_path, case):
    cfg, pattern = case(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        data.load_splits(cfg)


def test_at_least_ten_validation_cases():
    assert len(CASES) >= 10


def test_torchvision_mnist_root_on_disk(tmp_path):
    x, y = toy(40, size=28)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for part, (images, labels) in {"train": (x, y), "t10k": (x[:12], y[:12])}.items():
        write_idx(raw / f"{part}-images-idx3-ubyte", images)
        write_idx(raw / f"{part}-labels-idx1-ubyte", labels)
    cfg = make_cfg(
        data__source="torchvision",
        data__name="MNIST",
        data__path=str(tmp_path),
        data__resolution=28,
        data__val_fraction=0.1,
    )
    s = data.load_splits(cfg)
    train_idx, val_idx, _ = data.split_indices(40, val_fraction=0.1, test_fraction=0, seed=0, has_test=True)
    assert np.array_equal(s.train.images[:, 0], x[train_idx]) and np.array_equal(s.val.labels, y[val_idx])
    assert len(s.test) == 12 and data.public_train_size(cfg) == 36
    assert data.public_train_size(config.replace(cfg, {"data.path": str(tmp_path / "none")})) == 54000


def test_the_test_split_is_public_only_when_the_config_says_so_and_it_is_separate(tmp_path):
    x, y = toy(24)
    xt, yt = toy(8, seed=3)
    np.savez(tmp_path / "with_test.npz", x=x, y=y, x_test=xt, y_test=yt)
    np.savez(tmp_path / "train_only.npz", x=x, y=y)
    np.savez(tmp_path / "public_test.npz", x=xt, y=yt)
    # carved out of the source: sensitive, whatever else is set
    carved = make_cfg(data__source="npz", data__path=str(tmp_path / "train_only.npz"), data__test_fraction=0.25)
    assert data.load_splits(carved).test_public is False and data.test_split_fact(carved)[0] is False
    with pytest.raises(ValueError, match="data.test_is_public"):  # cannot declare a carved split public
        data.load_splits(config.replace(carved, {"data.test_is_public": True}))
    # the source's own test part: sensitive by default, public when declared
    own = make_cfg(data__source="npz", data__path=str(tmp_path / "with_test.npz"))
    assert data.load_splits(own).test_public is False
    declared = data.load_splits(config.replace(own, {"data.test_is_public": True}))
    assert declared.test_public is True and np.array_equal(declared.test.labels, yt)
    # a separate public test set by path: read in the source's format, public
    sep = config.replace(carved, {"data.test_path": str(tmp_path / "public_test.npz")})
    s = data.load_splits(sep)
    assert s.test_public is True and np.array_equal(s.test.images[:, 0], xt) and len(s.train) == 18
    assert "data.test_path" in data.test_split_fact(sep)[1]
    with pytest.raises(ValueError, match="apart from the sensitive"):  # the sensitive file itself: refused
        data.load_splits(config.replace(carved, {"data.test_path": str(tmp_path / "train_only.npz")}))
    with pytest.raises(ValueError, match="digits has none"):
        data.load_splits(config.load(None, [f"data.test_path={tmp_path / 'public_test.npz'}"]))
