"""The downstream classifiers of the evaluation (docs/reference-implementation.md §6.2): the reference CNN trained on a
synthetic set (Adam, EMA weights tested), predictions, accuracy, and a logistic-regression baseline."""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpfeta import cluster, progress
from dpfeta import images as images_mod
from dpfeta.config import Config
from dpfeta.data import ImageSet
from dpfeta.nn import update_ema
from dpfeta.nn.cnn import CNN

log = logging.getLogger(__name__)

CLASSIFIER_EMA = 0.9999  # docs/reference-implementation.md §6.2


def _device(cfg: Config) -> torch.device:
    return cluster.device(cfg)


def train_classifier(
    train: ImageSet,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    label: str = "classifier",
) -> CNN:
    """Train the reference CNN on ``train``; returns its EMA copy in eval mode.

    Initialisation, dropout (CPU) and batch order come from ``seed``; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_classifier(train, epochs=epochs, batch_size=batch_size, lr=lr, device=device, label=label)


def _train_classifier(
    train: ImageSet, *, epochs: int, batch_size: int, lr: float, device: torch.device | str, label: str
) -> CNN:
    _, c, h, _ = train.images.shape
    model = CNN(in_channels=c, num_classes=train.num_classes, resolution=h).to(device)
    ema = CNN(in_channels=c, num_classes=train.num_classes, resolution=h).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = images_mod.to_float(train.images)
    y_all = torch.from_numpy(train.labels)
    step, start = 0, time.perf_counter()
    with progress.stage(f"evaluate/{label}", total=epochs, unit="epoch", desc=f"evaluation: {label}"):
        for epoch in range(epochs):
            step = _epoch(model, ema, optimizer, x_all, y_all, batch_size=batch_size, device=device, step=step)
            progress.advance(f"evaluate/{label}")
            if epoch + 1 == epochs or (epoch + 1) % 10 == 0:
                log.info(
                    "%s epoch %d/%d (%d steps, %.1fs)", label, epoch + 1, epochs, step, time.perf_counter() - start
                )
    return ema


def _epoch(
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str,
    step: int,
) -> int:
    """One epoch over a fresh permutation, the EMA updated every step; returns the step count after it."""
    model.train()
    for idx in torch.randperm(len(y_all)).split(batch_size):
        loss = F.cross_entropy(model(x_all[idx].to(device)), y_all[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        update_ema(ema, model, num_updates=step, decay=CLASSIFIER_EMA)
    return step


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
