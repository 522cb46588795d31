"""`dpfeta export`: a release folder's synthetic images as imagefolder / parquet / hf datasets, balanced
by default, with a card that states the ledger's epsilon; it opens nothing outside release/ and loads
back with `datasets` offline. A fake release built with the real writers (images, privacy, release);
no Ray, no torch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dpfeta
from dpfeta import cli, config, export, images, privacy, release
from dpfeta.data import sources

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (5, 3, 4)  # released images per class: unbalanced

_touched: list[str] | None = None  # paths opened or listed while recording (an audit hook cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if (
        _touched is not None
        and event in ("open", "os.listdir", "os.scandir")
        and args
        and isinstance(args[0], (str, bytes, os.PathLike))
    ):
        _touched.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording_reads():
    """The paths the code in the block opens or lists."""
    global _touched
    _touched = []
    try:
        yield _touched
    finally:
        _touched = None


def released_images(counts=COUNTS, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic images of ``make_release`` and their labels, by class."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).integers(0, 256, size=(len(labels), channels, 8, 8), dtype=np.uint8), labels


def make_release(
    run: Path, counts=COUNTS, *, finished: bool = True, metrics: dict | None = None, channels: int = 1
) -> privacy.Ledger:
    """A run directory whose release/ holds class folders of PNGs, a ledger, a record and metrics, as
    ``dpfeta run`` writes them; and operator-internal files beside it that an export must not read."""
    cfg = config.load(None, [f"data.num_classes={len(counts)}", "run.name=fake", f"run.dir={run.parent}"])
    x, labels = released_images(counts, channels)
    images.save_class_folders(x, labels, release.release_dir(run) / "samples" / "images")
    ledger = privacy.Ledger(accountant="rdp", delta=1e-5, n=1000)
    ledger.add("central", noise_multiplier=5.0, sample_rate=0.3, count=2, taken=2)
    ledger.add("dpsgd", noise_multiplier=2.0, sample_rate=0.1, count=30, taken=30 if finished else 10)
    metrics = {"epsilon": ledger.epsilon(), "delta": 1e-5, "accuracy": 0.8123} if metrics is None else metrics
    release.record(run, kind="run", ledger=ledger, public_config=cfg.public_dict(), metrics=metrics)
    # operator-internal: other images, a non-DP evaluation (never exported)
    images.save_class_folders(np.zeros((6, 1, 8, 8), np.uint8), np.arange(6) % len(counts), run / "samples" / "images")
    (run / "eval.json").write_text(json.dumps({"nondp": {"accuracy": 0.99}}))
    return ledger


def released_bytes(run: Path) -> set[bytes]:
    return {p.read_bytes() for p in (release.release_dir(run) / "samples" / "images").rglob("*.png")}


def read_parquet(path: Path) -> tuple[list[bytes], list[int], dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"huggingface"])
    return [row["bytes"] for row in table.column("image").to_pylist()], table.column("label").to_pylist(), meta


def exported(out: Path, fmt: str) -> tuple[list[bytes], list[int]]:
    """(PNG bytes, labels) of an export, read with pyarrow / the file system (no `datasets`)."""
    if fmt == "imagefolder":
        files = sorted((out / "train").glob("*/*.png"))
        return [f.read_bytes() for f in files], [int(f.parent.name) for f in files]
    data, labels, meta = read_parquet(out / export.PARQUET_FILE[fmt])
    assert meta["info"]["features"]["label"] == {"_type": "ClassLabel", "names": ["0", "1", "2"]}
    assert set(table_columns(out / export.PARQUET_FILE[fmt])) == {"image", "label"}
    return data, labels


def table_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_is_balanced_and_its_card_states_the_ledgers_epsilon(tmp_path, fmt):
    run = tmp_path / "runs" / "fake"
    ledger = make_release(run)
    out = tmp_path / "out"
    with recording_reads() as touched:
        summary = export.export(run, out, fmt=fmt)
    inside_run = [p for p in touched if Path(p).is_relative_to(run)]
    assert inside_run and all(Path(p).is_relative_to(run / "release") for p in inside_run), inside_run
    data, labels = exported(out, fmt)
    assert Counter(labels) == {0: 3, 1: 3, 2: 3}  # the smallest class count, 3
    assert set(data) <= released_bytes(run) and len(set(data)) == 9  # released PNGs only, unchanged
    for png in data:
        assert Image.open(io.BytesIO(png)).size == (8, 8)
    card = (out / "README.md").read_text()
    eps = ledger.epsilon()
    assert 0.5 < eps < 20 and summary["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert f"epsilon = {eps:.4f}, delta = 1e-05" in card
    assert (
        "accountant: rdp" in card
        and privacy.NEIGHBOURING_RELATION in card
        and "N (training-split size, public): 1000" in card
    )
    assert "DP-FETA" in card and f"dpfeta {dpfeta.__version__}" in card
    assert "| 0 | 3 | 5 |" in card and "| 1 | 3 | 3 |" in card and "| 2 | 3 | 4 |" in card  # exported / released
    assert "- accuracy: 0.8123" in card and "0.99" not in card  # DP metrics.json only, never eval.json
    assert "not on this export's selection" in card
    meta = json.loads((out / export.METADATA_FILE).read_text())
    assert meta["counts"] == {"0": 3, "1": 3, "2": 3} and meta["balanced"] is True
    assert privacy.Ledger.from_state_dict(meta["ledger"]).epsilon() == pytest.approx(eps)
    assert card.startswith("---\n") == (fmt == "hf")  # the Hugging Face YAML header
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary folder was renamed into place


def test_per_class_and_no_balance(tmp_path):
    run = tmp_path / "run"
    make_release(run)
    export.export(run, tmp_path / "two", fmt="imagefolder", per_class=2)
    assert Counter(exported(tmp_path / "two", "imagefolder")[1]) == {0: 2, 1: 2, 2: 2}
    summary = export.export(run, tmp_path / "all", fmt="parquet", per_class=None)
    assert Counter(exported(tmp_path / "all", "parquet")[1]) == dict(enumerate(COUNTS))
    assert summary["balanced"] is False and "Not balanced" in (tmp_path / "all" / "README.md").read_text()
    with pytest.raises(ValueError, match=r"--per-class 4: .*class\(es\) \{1: 3\}.*at most 3 per class"):
        export.export(run, tmp_path / "four", fmt="hf", per_class=4)
    assert not (tmp_path / "four").exists()


def test_a_missing_class_refuses_a_balanced_export(tmp_path):
    run = tmp_path / "run"
    make_release(run, counts=(4, 0, 2))
    with pytest.raises(ValueError, match=r"no synthetic images of class\(es\) \[1\].*--no-balance"):
        export.export(run, tmp_path / "out")
    export.export(run, tmp_path / "out", per_class=None)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["counts"] == {"0": 4, "1": 0, "2": 2}


def test_label_names_sort_as_labels_past_ten_classes(tmp_path):
    run = tmp_path / "run"
    make_release(run, counts=(1,) * 12)
    export.export(run, tmp_path / "out", fmt="imagefolder")
    names = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert names == [f"{i:02d}" for i in range(12)] == export.class_names(12)


@pytest.mark.parametrize("channels", [1, 3])
def test_an_imagefolder_export_loads_back_with_the_data_loader(tmp_path, channels):
    """One class-folder layout: what `dpfeta export` writes (folders "00".."11", PNGs L or RGB), the
    `imagefolder` data source reads back with the same pixels, labels and order."""
    counts = (2, 1, 3) + (1,) * 9
    run, out = tmp_path / "run", tmp_path / "out"
    make_release(run, counts=counts, channels=channels)
    export.export(run, out, fmt="imagefolder", per_class=None)
    cfg = config.load(None, [f"data.num_classes={len(counts)}", "data.source=imagefolder", f"data.path={out}"])
    part = sources.read_source(cfg)["train"]
    x, labels = released_images(counts, channels)
    assert part.images.dtype == np.uint8 and np.array_equal(part.images, x)
    assert np.array_equal(part.labels, labels)
    modes = {Image.open(f).mode for f in (out / "train").rglob("*.png")}
    assert modes == {"L" if channels == 1 else "RGB"}


def test_a_release_without_dp_metrics_says_so(tmp_path):
    run = tmp_path / "run"
    make_release(
        run,
        metrics={
            "epsilon": 1.0,
            "noise_multiplier": 2.0,
            "num_synthetic": 12,
            "num_test": 359,
            "test_split_public": False,
        },
    )
    export.export(run, tmp_path / "out")
    evaluation = (tmp_path / "out" / "README.md").read_text().split("## Evaluation")[1].split("## Loading")[0]
    assert "no evaluation metric" in evaluation and "num_test 359, test_split_public False" in evaluation
    assert "noise_multiplier" not in evaluation


def test_a_release_folder_itself_can_be_exported(tmp_path):
    run = tmp_path / "run"
    make_release(run)
    export.export(release.release_dir(run), tmp_path / "out", fmt="parquet")
    assert len(exported(tmp_path / "out", "parquet")[1]) == 9


def test_refusals_name_what_is_wrong(tmp_path):
    run = tmp_path / "run"
    make_release(run)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out '.*busy': expected a new or empty folder"):
        export.export(run, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="outside the release folder"):
        export.export(run, release.release_dir(run) / "export")
    with pytest.raises(ValueError, match=r"--format: expected one of imagefolder, parquet, hf, got 'csv'"):
        export.export(run, tmp_path / "x", fmt="csv")
    with pytest.raises(ValueError, match="expected a run or sweep directory holding release/"):
        export.export(tmp_path / "nowhere", tmp_path / "x")
    empty = tmp_path / "empty"
    make_release(empty)
    for png in (release.release_dir(empty) / "samples").rglob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match=r"samples/images': expected the released synthetic images"):
        export.export(empty, tmp_path / "x")
    unfinished = tmp_path / "unfinished"
    make_release(unfinished, finished=False)
    with pytest.raises(ValueError, match=r"unfinished run \(dpsgd 10 of 30"):
        export.export(unfinished, tmp_path / "x")
    (busy / "keep.txt").unlink()
    export.export(run, busy)  # an empty folder is fine
    assert (busy / "README.md").is_file() and not (tmp_path / "x").exists()


@pytest.mark.slow  # a subprocess
def test_cli_export_prints_the_summary_and_refuses_with_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    ledger = make_release(run)
    out = tmp_path / "out"
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--format", "parquet"]) == 0
    printed = capsys.readouterr().out
    assert "exported 9 synthetic images (0: 3, 1: 3, 2: 3) as parquet" in printed
    assert f"epsilon {ledger.epsilon():.4f}" in printed
    proc = subprocess.run(
        [sys.executable, "-m", "dpfeta", "export", "--run", str(run), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"dpfeta export: error: --out '{out}': expected a new or empty folder, it exists and is not empty"
    ]
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "o2"), "--per-class", "2"]) == 0
    assert (
        cli.main(["export", "--run", str(run), "--out", str(tmp_path / "o3"), "--per-class", "2", "--no-balance"]) == 2
    )
    assert "--per-class 2 and --no-balance: expected one of them" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize(
    "fmt, loader", [("imagefolder", "imagefolder"), ("parquet", "parquet"), ("hf", "parquet"), ("hf", None)]
)
def test_the_export_loads_with_datasets_offline(tmp_path, monkeypatch, fmt, loader):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    run = tmp_path / "run"
    ledger = make_release(run)
    out = tmp_path / "out"
    export.export(run, out, fmt=fmt)
    cache = str(tmp_path / "hf-cache")
    if loader is None:  # the folder itself: its README's YAML header says where the data is
        ds = datasets.load_dataset(str(out), cache_dir=cache)
    else:
        ds = datasets.load_dataset(loader, data_dir=str(out / "data" if fmt == "parquet" else out), cache_dir=cache)
    train = ds["train"]
    assert train.features["label"].names == ["0", "1", "2"]  # a ClassLabel, not a bare int
    assert isinstance(train.features["image"], datasets.Image)
    assert Counter(train["label"]) == {0: 3, 1: 3, 2: 3}
    first = train[0]["image"]
    assert first.size == (8, 8) and first.mode == "L"
    pixels = {np.asarray(Image.open(io.BytesIO(b))).tobytes() for b in released_bytes(run)}
    assert np.asarray(first).tobytes() in pixels
    card = (out / "README.md").read_text()
    assert f"epsilon = {ledger.epsilon():.4f}" in card


def test_an_export_from_and_to_object_storage(tmp_path, s3_bucket):
    """``--run s3://...`` reads only the run's release/ from the store; ``--out s3://...`` is committed."""
    from dpfeta.storage import Storage

    run = tmp_path / "runs" / "fake"
    ledger = make_release(run)
    (run / "eval.json").write_text('{"nondp": {"accuracy": 0.99}}')  # operator-internal: never read
    store = Storage(f"{s3_bucket}/runs/fake")
    for path in sorted(run.rglob("*")):
        if path.is_file():
            store.write_bytes(path.relative_to(run).as_posix(), path.read_bytes())
    summary = export.export(store.uri, f"{s3_bucket}/exports/fake", fmt="imagefolder")
    out = Storage(f"{s3_bucket}/exports/fake")
    assert out.committed("") and summary["out"] == out.uri
    pngs = [f for f in out.list_files("train") if f.endswith(".png")]
    assert len(pngs) == 9 and Counter(f.split("/")[0] for f in pngs) == {"0": 3, "1": 3, "2": 3}
    card = out.read_text("README.md")
    assert f"epsilon = {ledger.epsilon():.4f}" in card and "0.99" not in card
    with pytest.raises(ValueError, match=r"--out 's3://.*/exports/fake': expected a new or empty location"):
        export.export(store.uri, out.uri)
    with pytest.raises(ValueError, match=r"--run 's3://.*/runs/none': expected a run with a release/ folder"):
        export.export(f"{s3_bucket}/runs/none", tmp_path / "x")
