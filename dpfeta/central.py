"""M1: the DP central-image query (docs/privacy.md §2; docs/reference-implementation.md §1, its caveat (a) fixed).

For each of ``central.rounds`` rounds, every record of the training split is included independently
with probability q_c = central.batch_size / N (fresh randomness each round). Per round and class the
query releases

    (S_rk + N(0, (sigma_c * Delta)^2 I)) / (q_c * N / classes),

where S_rk is the **sum** of the sampled records' images of class k after ``central.downsample``-fold
average pooling of x / 255 in [0, 1]. One record moves one S_rk by at most Delta = sqrt(d) / f in L2
(d = C*H*W at full resolution, f = downsample; sqrt(d/4) for f = 2), since its pooled image has d/f^2
coordinates in [0, 1] (average pooling keeps them there). The divisor is the *public* expected class
count, never a realised count. Clamping to [0, 1], bilinear upsampling, uint8 rounding, a 3x3 median
filter and (greyscale) a 3x3 sharpening filter are post-processing.

The sums are computed in one pass per block, for all rounds at once: in-process over an ``ImageSet``,
or as a Ray Data ``map_batches`` over the blocks of a Ray Dataset whose per-block partial sums are
added on the driver. Masks, sums and noise never leave memory; only the noisy release is written.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dpfeta import config as config_mod
from dpfeta import privacy
from dpfeta.data import ImageSet, read_image_folder
from dpfeta.images import encode_png, save_class_folders
from dpfeta.privacy.auto import sensitivity  # Delta of M1, one definition (the auto rule uses it too)

log = logging.getLogger(__name__)

SHARPEN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))


@dataclass
class CentralResult:
    images: np.ndarray  # uint8 [rounds * classes, C, H, W]; image r * classes + k is round r, class k
    labels: np.ndarray  # int64
    sample_rate: float  # q_c
    rounds: int
    noise_multiplier: float  # sigma_c
    sensitivity: float  # Delta
    expected_count: float  # q_c * N / classes, the public divisor
    num_classes: int

    def event(self):
        return privacy.central_event(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, rounds=self.rounds
        )

    def imageset(self) -> ImageSet:
        return ImageSet(self.images, self.labels, self.num_classes)


# --------------------------------------------------------------------------------------------
# The mechanism, piece by piece
# --------------------------------------------------------------------------------------------


def pool(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [B, C, H, W] -> float64 [B, C, H/f, W/f] in [0, 1] by f x f average pooling."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // factor, factor, w // factor, factor).astype(np.float64)
    return x.mean(axis=(3, 5)) / 255.0


def poisson_masks(n: int, rounds: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """bool [n, rounds]: record i is in round r's sample with probability q, independently."""
    return rng.random((n, rounds)) < sample_rate


def class_sums(
    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, *, num_classes: int, downsample: int
) -> np.ndarray:
    """float64 [rounds, classes, C, h, w]: per round and class, the sum of the sampled pooled images."""
    x = pool(images, downsample)
    onehot = labels[:, None] == np.arange(num_classes)[None, :]  # [B, K]
    weights = (masks[:, :, None] & onehot[:, None, :]).astype(np.float64)  # [B, rounds, K]
    sums = np.einsum("brk,bd->rkd", weights, x.reshape(len(x), math.prod(x.shape[1:])))
    return sums.reshape(masks.shape[1], num_classes, *x.shape[1:])


def noisy_means(
    sums: np.ndarray, *, noise_multiplier: float, sensitivity: float, expected_count: float, rng: np.random.Generator
) -> np.ndarray:
    """The Gaussian mechanism on the sums, divided by the public expected count (pre-clamp)."""
    noise = rng.normal(0.0, noise_multiplier * sensitivity, size=sums.shape)
    return (sums + noise) / expected_count


def postprocess(
    means: np.ndarray, *, resolution: int, median: bool = True, sharpen: Optional[bool] = None
) -> np.ndarray:
    """float [M, C, h, w] -> uint8 [M, C, R, R]: clamp, bilinear upsample, round, median, sharpen."""
    if len(means) == 0:
        return np.zeros((0, means.shape[1], resolution, resolution), np.uint8)
    x = torch.from_numpy(np.asarray(means, np.float32)).clamp(0.0, 1.0)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 255.0).round().clamp(0.0, 255.0)
    m, c, h, w = x.shape
    if median:
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        shifts = [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]
        x = torch.stack(shifts).median(dim=0).values
    if sharpen if sharpen is not None else c == 1:
        kernel = torch.tensor(SHARPEN_KERNEL).expand(c, 1, 3, 3)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=c).round().clamp(0.0, 255.0)
    return x.to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------
# The query over an ImageSet (in process) or a Ray Dataset (distributed aggregation)
# --------------------------------------------------------------------------------------------


def _local_sums(
    train: ImageSet, *, rounds: int, sample_rate: float, downsample: int, rng: np.random.Generator, chunk: int = 8192
) -> np.ndarray:
    total = 0.0
    for start in range(0, len(train), chunk):
        part = train.subset(slice(start, start + chunk))
        masks = poisson_masks(len(part), rounds, sample_rate, rng)
        total = total + class_sums(
            part.images, part.labels, masks, num_classes=train.num_classes, downsample=downsample
        )
    return total


def _block_sums(
    batch: dict, *, rounds: int, sample_rate: float, num_classes: int, downsample: int, seed: Optional[int]
) -> dict:
    """One block's partial sums. OS entropy per block unless seeded (then keyed by the row index)."""
    if seed is None:
        rng = np.random.default_rng()
    else:
        rng = np.random.default_rng([seed, int(batch["index"][0]), len(batch["index"])])
    images, labels = np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):  # before any noise: nothing spent
        raise ValueError(
            f"labels out of range: expected 0..{num_classes - 1} (data.num_classes), found "
            f"{int(labels.min())}..{int(labels.max())} in a block of the training data"
        )
    masks = poisson_masks(len(labels), rounds, sample_rate, rng)
    sums = class_sums(images, labels, masks, num_classes=num_classes, downsample=downsample)
    return {"sums": sums[None]}


def _ray_sums(
    dataset, *, rounds: int, sample_rate: float, num_classes: int, downsample: int, seed: Optional[int]
) -> np.ndarray:
    if seed is not None and "index" not in dataset.schema().names:
        raise ValueError(
            "a seeded central query on a Ray Dataset needs an 'index' column "
            "(data.to_ray_dataset(..., index=True)); unseeded runs do not"
        )
    partial = dataset.map_batches(
        _block_sums,
        batch_format="numpy",
        batch_size=None,
        fn_kwargs=dict(
            rounds=rounds, sample_rate=sample_rate, num_classes=num_classes, downsample=downsample, seed=seed
        ),
    )
    total = 0.0
    for batch in partial.iter_batches(batch_size=None, batch_format="numpy"):
        total = total + batch["sums"].sum(axis=0)
    return total


def _dataset_facts(train) -> tuple[int, tuple[int, ...]]:
    """(N, image shape) of an ImageSet or a Ray Dataset (from its schema and row count)."""
    if isinstance(train, ImageSet):
        return len(train), tuple(train.images.shape[1:])
    shape = train.schema().types[train.schema().names.index("image")].shape
    return train.count(), tuple(shape)


def noisy_class_means(
    cfg: config_mod.Config, train, *, generator: Optional[torch.Generator] = None
) -> tuple[np.ndarray, dict]:
    """The Gaussian release before post-processing: float [rounds, classes, C, h, w] and its parameters.

    ``train``: an ImageSet (sums in process) or a ray.data.Dataset (sums over its blocks). Sampling
    and noise come from OS entropy unless ``generator`` is given (tests, reproduction).
    """
    n, shape = _dataset_facts(train)
    if cfg.data.n_train is not None and n != cfg.data.n_train:
        raise ValueError(f"data.n_train: expected N={cfg.data.n_train} training records, found N={n}")
    if privacy.AUTO in (cfg.central.rounds, cfg.central.epsilon_share):  # a run's config comes resolved
        cfg = privacy.resolve(cfg, n)
    c, k = cfg.central, cfg.data.num_classes
    if not 0 < c.batch_size <= n:
        raise ValueError(f"central.batch_size: expected an expected sample size <= N={n}, got {c.batch_size:g}")
    params = dict(
        sample_rate=c.batch_size / n,
        sensitivity=sensitivity(shape, c.downsample),
        noise_multiplier=privacy.central_noise(cfg, n),  # configured, or calibrated
        expected_count=c.batch_size / k,
    )  # q_c * N / classes
    if generator is None:
        seeds = np.random.SeedSequence()
    else:
        seeds = np.random.SeedSequence(int(torch.randint(0, 2**62, (1,), generator=generator)))
    mask_seq, noise_seq = seeds.spawn(2)
    q = params["sample_rate"]
    if c.rounds == 0:
        sums = np.zeros((0, k, shape[0], shape[1] // c.downsample, shape[2] // c.downsample))
    elif isinstance(train, ImageSet):
        sums = _local_sums(
            train, rounds=c.rounds, sample_rate=q, downsample=c.downsample, rng=np.random.default_rng(mask_seq)
        )
    else:
        seed = None if generator is None else int(mask_seq.generate_state(1, np.uint64)[0] >> 1)
        sums = _ray_sums(train, rounds=c.rounds, sample_rate=q, num_classes=k, downsample=c.downsample, seed=seed)
    means = noisy_means(
        sums,
        noise_multiplier=params["noise_multiplier"],
        sensitivity=params["sensitivity"],
        expected_count=params["expected_count"],
        rng=np.random.default_rng(noise_seq),
    )
    return means, params


def central_images(cfg: config_mod.Config, train, *, generator: Optional[torch.Generator] = None) -> CentralResult:
    """Run M1 on ``train`` (ImageSet: in process; ray.data.Dataset: distributed over its blocks)."""
    c, k = cfg.central, cfg.data.num_classes
    means, params = noisy_class_means(cfg, train, generator=generator)
    rounds = means.shape[0]  # central.rounds, resolved (auto) by noisy_class_means
    images = postprocess(
        means.reshape(-1, *means.shape[2:]),
        resolution=means.shape[-1] * c.downsample,
        median=c.median_filter,
        sharpen=c.sharpen,
    )
    labels = np.tile(np.arange(k, dtype=np.int64), rounds)
    log.info(
        "central query: %d rounds x %d classes, q_c=%.4g, sigma_c=%.4g, Delta=%.4g, divisor=%.4g",
        rounds,
        k,
        params["sample_rate"],
        params["noise_multiplier"],
        params["sensitivity"],
        params["expected_count"],
    )
    return CentralResult(images, labels, rounds=rounds, num_classes=k, **params)


# --------------------------------------------------------------------------------------------
# Release: files, ledger
# --------------------------------------------------------------------------------------------


def save_central(result: CentralResult, out_dir: Path | str) -> Path:
    """Write ``images/<class>/<i>.png`` (``images.save_class_folders``), ``grid.png`` (rows: rounds) and
    ``central.json``."""
    out, classes = Path(out_dir), result.num_classes
    (out / "images").mkdir(parents=True, exist_ok=True)
    if len(result.images):
        save_class_folders(result.images, result.labels, out / "images")
    if len(result.images):
        (out / "grid.png").write_bytes(encode_png(grid(result.images, columns=classes)))
    meta = {
        "rounds": result.rounds,
        "num_classes": classes,
        "sample_rate": result.sample_rate,
        "noise_multiplier": result.noise_multiplier,
        "sensitivity": result.sensitivity,
        "expected_count": result.expected_count,
        "shape": list(result.images.shape[1:]),
    }
    (out / "central.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def grid(images: np.ndarray, *, columns: int, pad: int = 2, min_cell: int = 32) -> np.ndarray:
    """uint8 [M, C, H, W] -> one uint8 [C, H', W'] image, ``columns`` per row, scaled to >= min_cell."""
    from dpfeta.images import make_grid

    scale = max(1, math.ceil(min_cell / images.shape[2]))
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    return make_grid(images, nrow=columns, pad=pad, pad_value=255)


def load_central(directory: Path | str) -> ImageSet:
    """The central images written by ``save_central`` as an ImageSet (labels from folder names)."""
    directory = Path(directory)
    meta_path = directory / "central.json"
    part = read_image_folder(directory / "images", f"central images in '{directory}'")
    classes = json.loads(meta_path.read_text())["num_classes"] if meta_path.is_file() else int(part.labels.max()) + 1
    return ImageSet(part.images, part.labels, classes)


def check_fresh_out(out_dir: Path | str) -> Path:
    """Refuse a folder that already holds a central query's ledger (its budget is spent)."""
    out = Path(out_dir)
    if (out / "ledger.json").is_file():
        raise ValueError(
            f"'{out}' already holds central images and their ledger.json (budget spent); "
            "a new query would spend again: choose a new --out"
        )
    return out


def release(
    cfg: config_mod.Config, train, out_dir: Path | str, *, generator: Optional[torch.Generator] = None
) -> tuple[CentralResult, privacy.Ledger]:
    """Run M1, write ``ledger.json`` (the central mechanism taken) and then the images to ``out_dir``.

    Refuses an ``out_dir`` that already holds a ledger: a second query would spend again, and the
    folder's ledger would count one. The ledger is written before the images touch the disk.
    """
    out = check_fresh_out(out_dir)
    result = central_images(cfg, train, generator=generator)
    n = _dataset_facts(train)[0]
    accountant = cfg.privacy.accountant
    if accountant == "auto":  # the accountant the whole run's plan picks, so fine-tuning composes onto it
        accountant = privacy.plan(cfg, n).accountant
    ledger = privacy.Ledger(accountant=accountant, delta=cfg.privacy.delta, n=n, seeded=generator is not None)
    if result.rounds:
        ledger.add(
            "central",
            noise_multiplier=result.noise_multiplier,
            sample_rate=result.sample_rate,
            count=result.rounds,
            taken=result.rounds,
        )
    out.mkdir(parents=True, exist_ok=True)
    ledger.save(out / "ledger.json")
    save_central(result, out)
    return result, ledger
