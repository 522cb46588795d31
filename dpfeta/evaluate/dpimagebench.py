"""DPImageBench's downstream protocol (Gong et al., CCS 2025; `dpfeta evaluate --protocol dpimagebench`), so
that a synthetic set's numbers line up with the literature's tables (../shared/reference/anchors.md §1.5):

* three classifiers trained on the synthetic set: ResNet, WRN, ResNeXt (``dpfeta.nn.benchnets``; CPU-sized
  members of those families, not DPImageBench's exact networks), Adam lr 0.01, StepLR (x0.2 every 40 % of the
  epochs: 20 of 50), batch 256, 50 epochs, EMA 0.9999 with warm-up, inputs in [-1, 1];
* after every epoch the EMA weights are scored on the **sensitive validation split**: the correct count plus
  Laplace(1/epsilon) noise; the reported accuracy is the **test** accuracy at the epoch of the best noisy
  score (also given: at the best clean validation score, and the best test accuracy, the "oracle" that the
  protocol exists to avoid); the protocol's number is the mean over the three classifiers;
* FID against the **training split** (DPImageBench's reference), with the run's FID features
  (``eval.fid``: Inception from local weights, else the offline CNN);
* DPImageBench sets delta = 1/(N ln N) for the training split's N; the result says whether the run's delta
  is at most that.

Privacy: every number here is computed on sensitive splits (validation, test, training), and the noisy
selection's cost is not in the run's ledger (DPImageBench does not account it either), so the result is a
non-DP operator benchmark under ``nondp``: refused in release mode (``tracking.nondp: false``), never in
``release/``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time

import numpy as np
import torch

from dpfeta import images as images_mod
from dpfeta import progress
from dpfeta.config import Config
from dpfeta.data import ImageSet, Splits
from dpfeta.evaluate.classifier import _device, _epoch
from dpfeta.evaluate.fid import fid_reference
from dpfeta.nn.benchnets import CLASSIFIERS

log = logging.getLogger(__name__)

EPOCHS, BATCH_SIZE, LR, LR_DECAY = 50, 256, 0.01, 0.2  # DPImageBench, sets other than CIFAR
# EMA 0.9999 with warm-up, DPImageBench's: classifier._epoch's CLASSIFIER_EMA, as for the reference CNN


def protocol_delta(n: int) -> float:
    """DPImageBench's delta for a training split of N records: 1 / (N ln N)."""
    return 1.0 / (n * math.log(n))


def check_request(cfg: Config, splits: Splits) -> None:
    """Refuse, before any training, what the protocol cannot measure."""
    if not cfg.tracking.nondp:
        raise ValueError(
            "expected tracking.nondp: true for --protocol dpimagebench: it selects epochs on the sensitive "
            "validation split and measures on the test and training splits, so its numbers are non-DP "
            "(operator-internal), got tracking.nondp: false (release mode)"
        )
    if len(splits.val) == 0:
        raise ValueError(
            "expected a sensitive validation split (data.val_fraction > 0): the protocol selects each "
            f"classifier's epoch on it, got data.val_fraction={cfg.data.val_fraction} (0 validation records)"
        )


@torch.no_grad()
def _correct(model: torch.nn.Module, data: ImageSet, device: torch.device, batch: int = 1000) -> int:
    x, y = images_mod.to_float(data.images), torch.from_numpy(data.labels)
    return sum(
        int((model(xb.to(device)).argmax(1).cpu() == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch))
    )


def _score(ema, model, splits: Splits, device: torch.device, epsilon: float, noise: np.random.Generator) -> dict:
    """The EMA weights (with the model's BatchNorm statistics) on the validation and test splits."""
    with torch.no_grad():
        for mine, theirs in zip(ema.buffers(), model.buffers()):
            mine.copy_(theirs)
    ema.eval()
    val = _correct(ema, splits.val, device)
    return {
        "val_correct": val,
        "noisy_val": val + float(noise.laplace(0.0, 1.0 / epsilon)),
        "test_accuracy": _correct(ema, splits.test, device) / len(splits.test),
    }


def train_and_select(
    name: str,
    synthetic: ImageSet,
    splits: Splits,
    *,
    epsilon: float,
    epochs: int,
    noise: np.random.Generator,
    seed: int,
    device: torch.device,
) -> dict:
    """One classifier of the protocol: trained on ``synthetic``, its epoch chosen on the noisy validation score."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c = synthetic.images.shape[1]
        model = CLASSIFIERS[name](c, synthetic.num_classes).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        decay_every = max(1, round(0.4 * epochs))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=LR_DECAY)
        x_all, y_all = images_mod.to_float(synthetic.images), torch.from_numpy(synthetic.labels)
        history, step, key = [], 0, f"dpimagebench/{name}"
        with progress.stage(key, total=epochs, unit="epoch", desc=f"DPImageBench: {name}"):
            for _ in range(epochs):
                step = _epoch(model, ema, optimizer, x_all, y_all, batch_size=BATCH_SIZE, device=device, step=step)
                scheduler.step()
                history.append(_score(ema, model, splits, device, epsilon, noise))
                progress.advance(key, accuracy=f"{history[-1]['test_accuracy']:.3f}")
    noisy = int(np.argmax([h["noisy_val"] for h in history]))
    clean = int(np.argmax([h["val_correct"] for h in history]))
    return {
        "accuracy": history[noisy]["test_accuracy"],
        "selected_epoch": noisy + 1,
        "accuracy_at_clean_validation": history[clean]["test_accuracy"],
        "oracle_test_accuracy": max(h["test_accuracy"] for h in history),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def evaluate_protocol(
    cfg: Config,
    synthetic: ImageSet,
    splits: Splits,
    *,
    epsilon: float,
    epochs: int = EPOCHS,
    seed: int = 0,
    noise: np.random.Generator | None = None,
) -> dict:
    """The protocol on ``synthetic`` (see the module docstring); ``epsilon`` sets the selection noise.
    ``noise``: the Laplace draws' generator (default: OS entropy)."""
    check_request(cfg, splits)
    if epochs < 1:
        raise ValueError(f"expected --epochs >= 1, got {epochs}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"expected a finite epsilon > 0 for the selection noise Laplace(1/epsilon), got {epsilon}")
    start, device = time.perf_counter(), _device(cfg)
    noise = noise if noise is not None else np.random.default_rng()
    per = {
        name: train_and_select(
            name, synthetic, splits, epsilon=epsilon, epochs=epochs, noise=noise, seed=seed + i, device=device
        )
        for i, name in enumerate(CLASSIFIERS)
    }
    accs = [r["accuracy"] for r in per.values()]
    reference = fid_reference(cfg, dataclasses.replace(splits, test=splits.train), seed=seed)
    n = len(splits.train)
    result = {
        "protocol": "dpimagebench",
        "nondp": {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)),
            "classifiers": per,
            "fid": reference.fid(synthetic.images[: cfg.eval.fid.num_samples]),
        },
        "fid_kind": reference.kind,
        "fid_reference": f"train split ({reference.num_reference} real images)",
        "selection": f"test accuracy at the best validation correct count + Laplace(1/{epsilon:g}), per classifier",
        "epochs": epochs,
        "num_synthetic": len(synthetic),
        "num_val": len(splits.val),
        "num_test": len(splits.test),
        "protocol_delta": protocol_delta(n),
        "delta_within_protocol": cfg.privacy.delta <= protocol_delta(n),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    log.info("dpimagebench: accuracy %.4f +- %.4f, FID %.2f", np.mean(accs), np.std(accs), result["nondp"]["fid"])
    return result
