"""``dpfeta export``: a run's released synthetic images as a dataset others can load, with its card.

Reads only the run's ``release/`` folder (``release.py``: what the reported epsilon covers), never
operator-internal files, so the export may be published as it is. Selecting, balancing and
re-packing released images is post-processing of a DP output: it costs no privacy, and the export
carries the release's (epsilon, delta), accountant and neighbouring relation in its card. Formats::

    imagefolder   train/<label>/<i>.png                 README.md (card), export.json
    parquet       data/train-00000.parquet              README.md (card), export.json
    hf            data/train-00000-of-00001.parquet     README.md with the Hugging Face YAML header
                                                         (configs, dataset_info), export.json

The Parquet files hold ``image`` (struct {bytes, path}: the Hugging Face ``Image`` feature) and
``label`` (int64) and carry the ``datasets`` features (``ClassLabel`` names) in their schema
metadata. The output is written to a temporary sibling folder and renamed into place; an output
folder that exists and is not empty is refused. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import yaml

import dpfeta
from dpfeta import images as images_mod
from dpfeta import privacy, release, storage

FORMATS = ("imagefolder", "parquet", "hf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARQUET_FILE = {"parquet": "data/train-00000.parquet", "hf": "data/train-00000-of-00001.parquet"}
METADATA_FILE = "export.json"
# metrics.json keys that are privacy parameters (stated in the card's privacy section), and facts about
# the evaluation rather than results of it
PRIVACY_KEYS = frozenset({"epsilon", "delta", "accountant", "seeded", "noise_multiplier", "sample_rate", "steps"})
CONTEXT_KEYS = frozenset(
    {"num_synthetic", "num_test", "test_split_public", "fid_kind", "fid_reference", "fid_samples", "fid_weights"}
)


@dataclass(frozen=True)
class Release:
    """What an export reads from a release folder."""

    root: Path
    images: dict[int, list[Path]]  # label -> its PNG files, sorted
    num_classes: int
    ledger: privacy.Ledger
    record: dict  # release.json
    metrics: dict  # metrics.json (DP metrics only), {} when the run has none
    config: dict  # config.json (the public config), {} when absent
    samples: dict  # samples/samples.json (sampler, steps, guidance), {} when absent


def release_root(run: Path | str) -> Path:
    """The release folder of a run or sweep directory (``<run>/release``), or ``run`` itself when it
    is a release folder (holds ``release.json``)."""
    run = Path(run)
    if "://" in str(run):
        raise ValueError(f"--run '{run}': expected a local run directory; copy a remote release/ folder first")
    if (run / release.RELEASE_DIR).is_dir():
        return run / release.RELEASE_DIR
    if (run / release.RECORD_FILE).is_file():
        return run
    raise ValueError(
        f"--run '{run}': expected a run or sweep directory holding release/ (or a release folder "
        f"holding {release.RECORD_FILE}), found neither"
    )


def read_release(run: Path | str) -> Release:
    """Read and check a release folder: synthetic images, ledger, record; refuse an unfinished run."""
    root = release_root(run)
    record = _read_json(root / release.RECORD_FILE, required=True)
    ledger = privacy.Ledger.from_state_dict(_read_json(root / release.LEDGER_FILE, required=True))
    unfinished = [f"{m.name} {m.taken} of {m.planned}" for m in ledger.mechanisms if m.taken < m.planned]
    if unfinished:
        raise ValueError(
            f"'{root / release.LEDGER_FILE}' records an unfinished run ({', '.join(unfinished)} "
            "compositions taken); finish it (rerun 'dpfeta run') before exporting"
        )
    config = _read_json(root / release.CONFIG_FILE)
    images = _class_folders(root / "samples" / "images")
    num_classes = int(config.get("data", {}).get("num_classes", max(images) + 1))
    if max(images) >= num_classes:
        raise ValueError(
            f"'{root}/samples/images': expected labels 0..{num_classes - 1} (data.num_classes="
            f"{num_classes}), got a folder for label {max(images)}"
        )
    return Release(
        root=root,
        images=images,
        num_classes=num_classes,
        ledger=ledger,
        record=record,
        metrics=_read_json(root / release.METRICS_FILE),
        config=config,
        samples=_read_json(root / "samples" / "samples.json"),
    )


def _read_json(path: Path, *, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ValueError(f"'{path}' not found: expected a release folder written by 'dpfeta run' or 'dpfeta tune'")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{path}': invalid JSON at line {exc.lineno} ({exc.msg})") from None


def _class_folders(root: Path) -> dict[int, list[Path]]:
    """``root/<label>/<i>.png`` (``images.class_folder_files``) -> {label: its files}; refuses a release
    without samples."""
    images: dict[int, list[Path]] = {}
    for path, label in images_mod.class_folder_files(root):
        images.setdefault(label, []).append(path)
    if not images:
        raise ValueError(
            f"'{root}': expected the released synthetic images as <label>/*.png, found none "
            "(the run has not reached sampling; finish it first)"
        )
    return dict(sorted(images.items()))


def class_digits(num_classes: int) -> int:
    """The width of the exported label folders: the last label's digits (text order is label order)."""
    return len(str(num_classes - 1))


def class_names(num_classes: int) -> list[str]:
    """Label names, zero-padded so that sorting them as text keeps the label order ("00".."11"): the
    export's folder names (``images.class_file``) and its ClassLabel names."""
    return [images_mod.class_folder(label, digits=class_digits(num_classes)) for label in range(num_classes)]


def select(images: dict[int, list[Path]], num_classes: int, per_class: Union[int, str, None]) -> dict[int, list[Path]]:
    """Each class's first ``per_class`` files; ``"min"``: the smallest class count (balanced); ``None``:
    all files (unbalanced). A class with fewer images than asked is refused, not padded."""
    if per_class is None:
        return dict(images)
    counts = {label: len(images.get(label, [])) for label in range(num_classes)}
    if per_class == "min":
        per_class = min(counts.values())
        if per_class == 0:
            empty = [label for label, n in counts.items() if n == 0]
            raise ValueError(
                f"the release has no synthetic images of class(es) {empty}: a balanced export is "
                "empty; use --no-balance to export the classes it has"
            )
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"--per-class: expected an integer >= 1, got {per_class!r}")
    short = {label: n for label, n in counts.items() if n < per_class}
    if short:
        raise ValueError(
            f"--per-class {per_class}: the release has fewer images of class(es) {short} "
            f"(label: count); expected at most {min(counts.values())} per class"
        )
    return {label: images[label][:per_class] for label in range(num_classes)}


def export(run: Path | str, out: Path | str, *, fmt: str = "hf", per_class: Union[int, str, None] = "min") -> dict:
    """Write the release's synthetic images to ``out`` in format ``fmt``; return the export's metadata.

    ``per_class``: ``"min"`` (balanced at the smallest class count, the default), an integer, or
    ``None`` (every image, unbalanced). ``run`` and ``out`` may be object-store URIs (``s3://...``):
    the run's ``release/`` is read from there (nothing else), the export is written to a scratch
    folder and committed to ``out`` (its files, then a ``_COMMITTED`` marker)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if storage.is_uri(run) or storage.is_uri(out):
        return _export_via_storage(run, out, fmt=fmt, per_class=per_class)
    out = _check_out(out)
    rel = read_release(run)
    if out.resolve().is_relative_to(rel.root.resolve()):
        raise ValueError(f"--out '{out}': expected a folder outside the release folder '{rel.root}'")
    chosen = select(rel.images, rel.num_classes, per_class)
    meta = metadata(rel, chosen, fmt=fmt, balanced=per_class is not None)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # a sibling: the rename stays on one filesystem
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        rows = _rows(chosen, rel.num_classes)
        if fmt == "imagefolder":
            for source, path, _ in rows:
                (tmp / "train" / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / "train" / path)
        else:
            write_parquet(rows, tmp / PARQUET_FILE[fmt], class_names(rel.num_classes))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(card(rel, meta))
        os.replace(tmp, out)  # an empty folder at `out` is replaced too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**meta, "out": str(out)}


def _export_via_storage(run: Path | str, out: Path | str, *, fmt: str, per_class) -> dict:
    import tempfile

    target = storage.Storage(out) if storage.is_uri(out) else None
    if target is not None and target.list_files():
        raise ValueError(f"--out '{out}': expected a new or empty location, it holds files")
    with tempfile.TemporaryDirectory(prefix="dpfeta-export-") as tmp:
        local_run = run
        if storage.is_uri(run):
            source = storage.Storage(run)
            if not source.list_files(release.RELEASE_DIR):
                raise ValueError(f"--run '{run}': expected a run with a release/ folder, found none there")
            local_run = Path(tmp) / "run"
            source.get_files(release.RELEASE_DIR, local_run / release.RELEASE_DIR)  # release/ only
        local_out = Path(tmp) / "out" if target is not None else Path(out)
        meta = export(local_run, local_out, fmt=fmt, per_class=per_class)
        if target is not None:
            target.put_dir(local_out, "")
    return {**meta, "out": str(out)}


def _check_out(out: Path | str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out '{out}': expected a new or empty folder, it exists and is not empty")
    return out


def _rows(chosen: dict[int, list[Path]], num_classes: int) -> list[tuple[Path, str, int]]:
    """(source file, relative path ``images.class_file``, label) for every exported image; checks PNGs.
    The files are copied as they are: the PNGs ``images.save_class_folders`` wrote for the release."""
    rows = []
    for label, files in sorted(chosen.items()):
        for i, source in enumerate(files):
            with open(source, "rb") as f:
                if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                    raise ValueError(f"'{source}': expected a PNG image (the release's samples), got another file")
            rows.append((source, images_mod.class_file(label, i, digits=class_digits(num_classes)), label))
    return rows


def hf_features(names: list[str]) -> dict:
    """The ``datasets`` features (``Features.to_dict()`` form): an Image and a ClassLabel."""
    return {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}


def write_parquet(rows: list[tuple[Path, str, int]], path: Path, names: list[str]) -> Path:
    """One Parquet file: ``image`` {bytes, path}, ``label`` int64, features in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("image", image_type), ("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": hf_features(names)}})},
    )
    images = [{"bytes": source.read_bytes(), "path": name} for source, name, _ in rows]
    table = pa.table(
        {
            "image": pa.array(images, type=image_type),
            "label": pa.array([label for _, _, label in rows], type=pa.int64()),
        },
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def metadata(rel: Release, chosen: dict[int, list[Path]], *, fmt: str, balanced: bool) -> dict:
    """export.json: how the export was made and what privacy statement covers it."""
    names = class_names(rel.num_classes)
    rec = rel.record
    return {
        "format": fmt,
        "dpfeta_version": dpfeta.__version__,
        "method": "DP-FETA"
        if any(m.name == "central" and m.planned > 0 for m in rel.ledger.mechanisms)
        else "DPDM (DP-SGD from scratch)",
        "epsilon": stated_epsilon(rel),
        "delta": rel.ledger.delta,
        "accountant": rel.ledger.accountant,
        "neighbouring_relation": rec.get("neighbouring_relation", privacy.NEIGHBOURING_RELATION),
        "n": rel.ledger.n,
        "seeded": rel.ledger.seeded,
        "config_sha256": rec.get("config_sha256"),
        "release_kind": rec.get("kind", "run"),
        "classes": names,
        "balanced": balanced,
        "num_images": sum(len(files) for files in chosen.values()),
        "counts": {names[label]: len(chosen.get(label, [])) for label in range(rel.num_classes)},
        "released_counts": {names[label]: len(rel.images.get(label, [])) for label in range(rel.num_classes)},
        "ledger": rel.ledger.to_json(),
    }


def stated_epsilon(rel: Release) -> float:
    """The composed total: the ledger's epsilon, or the release's stated one where larger (a sweep's
    bound over the whole search)."""
    return max(rel.ledger.epsilon(), float(rel.record.get("epsilon", 0.0)))


def card(rel: Release, meta: dict) -> str:
    """README.md of the export: (for ``hf``) the Hugging Face YAML header, then the card for people."""
    header = ""
    if meta["format"] == "hf":
        header = "---\n" + yaml.safe_dump(hf_card_header(meta), sort_keys=False) + "---\n\n"
    return header + "\n".join(_card_lines(rel, meta)) + "\n"


def hf_card_header(meta: dict) -> dict:
    """The dataset card's YAML header: the data files and features ``datasets`` reads."""
    names = {str(label): name for label, name in enumerate(meta["classes"])}  # as datasets writes them
    return {
        "pretty_name": "dpfeta synthetic images",
        "tags": ["synthetic", "differential-privacy", "dp-feta"],
        "task_categories": ["image-classification"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {  # datasets reads the features (ClassLabel names) from here
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": names}}},
            ],
        },
    }


def _card_lines(rel: Release, meta: dict) -> list[str]:
    data = rel.config.get("data", {})
    source = data.get("name") or data.get("source", "unknown")
    sampled = ", ".join(f"{k} {rel.samples[k]}" for k in ("sampler", "steps", "guidance") if k in rel.samples)
    lines = [
        f"# Synthetic images, (epsilon = {meta['epsilon']:.4f}, delta = {meta['delta']:g})-differentially private",
        "",
        f"{meta['num_images']} synthetic images in {len(meta['classes'])} classes, generated by a class-conditional "
        f"diffusion model trained on a sensitive image set (data source: {source}) with {meta['method']} by dpfeta "
        f"{meta['dpfeta_version']}" + (f" (sampling: {sampled})" if sampled else "") + ", and exported from its "
        f"release folder with `dpfeta export --format {meta['format']}`. No real image is in this dataset.",
        "",
        "## Privacy",
        "",
        f"The model, and so every image here, is (epsilon = {meta['epsilon']:.4f}, delta = {meta['delta']:g})-"
        "differentially private with respect to the sensitive training split: epsilon is the composed total over "
        f"every mechanism that touched the data, computed by the {meta['accountant']} accountant (dp_accounting).",
        "",
        f"- neighbouring relation: {meta['neighbouring_relation']}",
        f"- N (training-split size, public): {meta['n']}",
        f"- accountant: {meta['accountant']}",
        f"- seeded: {str(meta['seeded']).lower()}"
        + (" (a fixed seed was used for sampling and noise: tests or reproduction only)" if meta["seeded"] else ""),
        f"- config sha256: {meta['config_sha256']}",
        "- public facts: " + "; ".join(rel.record.get("public_facts", privacy.PUBLIC_FACTS)),
        "",
        "| mechanism | noise multiplier | sample rate | compositions |",
        "|---|---|---|---|",
        *[f"| {m.name} | {m.noise_multiplier:.4f} | {m.sample_rate:.5g} | {m.taken} |" for m in rel.ledger.mechanisms],
        "",
        "Selecting and re-packing released images is post-processing: it costs no privacy. The full ledger "
        f"is in {METADATA_FILE}.",
        "",
        "## Contents",
        "",
        f"{'Balanced' if meta['balanced'] else 'Not balanced'}: "
        + (
            f"the first {min(meta['counts'].values())} released images of each class."
            if meta["balanced"]
            else "every released image."
        ),
        "",
        "| label | images | in the release |",
        "|---|---|---|",
        *[f"| {name} | {meta['counts'][name]} | {meta['released_counts'][name]} |" for name in meta["classes"]],
        "",
        "## Evaluation",
        "",
    ]
    shown = {k: v for k, v in sorted(rel.metrics.items()) if k not in PRIVACY_KEYS}
    if set(shown) - CONTEXT_KEYS:
        lines += [
            "From the release's metrics.json (DP metrics only), computed on the whole released synthetic set "
            f"({rel.metrics.get('num_synthetic', 'all')} images), not on this export's selection:",
            "",
        ]
        lines += [f"- {k}: {v}" for k, v in shown.items()]
    else:
        lines += [
            "The release holds no evaluation metric: only metrics against a public test set are DP and "
            "released; an accuracy or FID against a sensitive test split is not"
            + (" (release/metrics.json: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")." if shown else ".")
        ]
    return lines + ["", "## Loading", "", "```", _loading_hint(meta["format"]), "```"]


def _loading_hint(fmt: str) -> str:
    if fmt == "imagefolder":
        return (
            'datasets.load_dataset("imagefolder", data_dir="THIS_FOLDER")'
            '  # or torchvision ImageFolder("THIS_FOLDER/train")'
        )
    if fmt == "parquet":
        return 'datasets.load_dataset("parquet", data_dir="THIS_FOLDER/data")  # or pyarrow.parquet.read_table'
    return 'datasets.load_dataset("THIS_FOLDER")  # or load_dataset("parquet", data_dir="THIS_FOLDER/data")'
