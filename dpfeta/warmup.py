"""Warm-up ("easy" stage): non-private training of the denoiser on the DP central images.

The central images are already differentially private, so this stage is post-processing: its
losses and samples may be logged freely. As in DP-FETA's ``pretrain_dpp_base.py``
(docs/reference-implementation.md §3):
RandAugment with ``warmup.randaug_ops`` ops and a magnitude drawn uniformly from {1..M} per image
(without the ops in ``warmup.randaug_exclude``: Equalize by default; batched on the model's device,
``dpfeta.augment``),
Adam, EMA with warm-up, classifier-free-guidance label dropout, the EDM loss with K noise draws.

Resume = rerun: the latest checkpoint under ``out_dir/checkpoint`` (raw weights, EMA, Adam state,
the generator state and ``meta.json`` with config and step) is restored and training continues to
``warmup.steps``; a finished run returns at once. ``train_warmup_stored`` runs it against the run's
storage (a GPU task or here), relaying every checkpoint to an object store so that a retried task resumes.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dpfeta import checkpoint, cluster, precision, progress, rng
from dpfeta.augment import RandAugment
from dpfeta.config import Config
from dpfeta.diffusion import EDMPrecond, edm_loss
from dpfeta.images import load_class_folders, to_float
from dpfeta.nn import UNet, count_parameters, update_ema
from dpfeta.storage import Storage

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]


def central_arrays(central: Any, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Central images as (uint8 [N,C,H,W], int64 [N]) from an ImageSet-like object or a PNG folder.

    A folder is ``DIR/images/<label>/*.png`` (``dpfeta central`` output) or ``DIR/<label>/*.png``.
    """
    if isinstance(central, (str, Path)):
        root = Path(central)
        root = root / "images" if (root / "images").is_dir() else root
        images, labels = load_class_folders(root, channels=cfg.data.channels)
    else:
        images, labels = np.asarray(central.images), np.asarray(central.labels)
        if central.num_classes != cfg.data.num_classes:
            raise ValueError(
                f"expected central images with data.num_classes={cfg.data.num_classes} "
                f"classes, got num_classes={central.num_classes}"
            )
    d = cfg.data
    if images.dtype != np.uint8 or images.shape[1:] != (d.channels, d.resolution, d.resolution):
        raise ValueError(
            f"expected central images uint8 [N,{d.channels},{d.resolution},{d.resolution}] "
            f"(data.channels, data.resolution), got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0 or len(labels) != len(images):
        raise ValueError(
            f"expected a non-empty set with one label per image, got {len(images)} images and {len(labels)} labels"
        )
    if labels.min() < 0 or labels.max() >= d.num_classes:
        raise ValueError(f"expected labels in [0, {d.num_classes}), got [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def augmentation(cfg: Config) -> RandAugment:
    """The warm-up's RandAugment (``warmup.randaug_*``), batched on the images' device."""
    w = cfg.warmup
    return RandAugment(num_ops=w.randaug_ops, max_magnitude=w.randaug_magnitude, exclude=w.randaug_exclude)


def _batch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch without replacement; all N images (shuffled) when N <= batch_size."""
    return torch.randperm(n, generator=generator)[:batch_size]


def _device(cfg: Config) -> torch.device:
    return cluster.device(cfg)


def _restore(
    ckpt_dir: Path,
    cfg: Config,
    net: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    state = checkpoint.load(ckpt_dir)
    checkpoint.check_model(state["meta"], cfg, ckpt_dir, doing="resume")
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["extra"]["generator"])
    return state["meta"]


def _train_step(
    denoiser: EDMPrecond,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    augment: RandAugment | None = None,
) -> tuple[float, int]:
    """One Adam step on an augmented batch of uint8 ``images`` (``train_warmup`` keeps them on the model's
    device); returns (mean loss, batch size). ``augment``: built once by the caller (``augmentation``)."""
    w, dc = cfg.warmup, cfg.diffusion
    device = next(denoiser.parameters()).device
    augment = augment if augment is not None else augmentation(cfg)
    # Draw a batch and augment it (on the model's device).
    idx = _batch_indices(len(images), w.batch_size, generator)
    x = to_float(augment(images[idx.to(images.device)].to(device), generator))
    # Loss (K noise draws per image, CFG label drop; the network in run.precision) and optimiser step.
    with precision.autocast(cfg.run.precision, device):
        loss = edm_loss(
            denoiser,
            x,
            labels[idx.to(labels.device)].to(device),
            P_mean=dc.P_mean,
            P_std=dc.P_std,
            sigma_data=dc.sigma_data,
            label_drop_prob=dc.label_drop_prob,
            num_classes=cfg.data.num_classes,
            K=w.noise_multiplicity,
            generator=generator,
        ).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), len(idx)


def train_warmup(
    cfg: Config,
    central: Any,
    out_dir: Path | str,
    *,
    reporter: Reporter | None = None,
    generator: torch.Generator | None = None,
    ledger: dict | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> dict[str, Any]:
    """Train on the central images for ``warmup.steps`` steps; resumable. Returns a summary dict.

    ``reporter(metrics)`` gets {step, nimg, loss, sec_per_step} every ``warmup.log_every`` steps.
    Without ``generator``: seeded by ``run.seed``, else OS entropy. ``ledger``: the state of the
    central images' ledger, carried in every checkpoint's meta so fine-tuning composes it.
    """
    w = cfg.warmup
    images, labels = central_arrays(central, cfg)
    ckpt_dir = Path(out_dir) / "checkpoint"
    if generator is None:
        generator = rng.make_generator(cfg.run.seed, stream="warmup")

    # Model, EMA, optimiser; restored from the latest checkpoint if there is one.
    with torch.random.fork_rng(devices=[]):  # initial weights from ``generator`` too
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        net = UNet.from_config(cfg).to(_device(cfg))
    denoiser = EDMPrecond(net, cfg.diffusion.sigma_data)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=w.lr)
    meta = _restore(ckpt_dir, cfg, net, ema, optimizer, generator) if checkpoint.exists(ckpt_dir) else {}
    images, labels = images.to(_device(cfg)), labels.to(_device(cfg))
    augment = augmentation(cfg)
    step, loss = int(meta.get("step", 0)), meta.get("loss")
    params = count_parameters(net)
    logger.info(
        "warmup: %d central images, U-Net %d parameters, %s from step %d of %d, %s compute",
        len(images),
        params,
        "resuming" if step else "starting",
        step,
        w.steps,
        precision.resolve(cfg.run.precision, _device(cfg)),
    )

    start_step, start_time = step, time.perf_counter()
    window, window_start = [], time.perf_counter()
    while step < w.steps:
        batch_loss, batch = _train_step(denoiser, optimizer, images, labels, cfg, generator, augment)
        step += 1
        # Update EMA.
        update_ema(ema, net, num_updates=step, decay=w.ema_decay)
        window.append(batch_loss)
        progress.position("warmup", step, loss=batch_loss)  # central images only: public
        # Report and checkpoint.
        if step == w.steps or (w.log_every > 0 and step % w.log_every == 0):
            loss, sec_per_step = float(np.mean(window)), (time.perf_counter() - window_start) / len(window)
            logger.info(
                "warmup step %d/%d nimg %d loss %.4f sec/step %.3f", step, w.steps, step * batch, loss, sec_per_step
            )
            if reporter is not None:
                reporter({"step": step, "nimg": step * batch, "loss": loss, "sec_per_step": sec_per_step})
            window, window_start = [], time.perf_counter()
        if step == w.steps or (w.checkpoint_every > 0 and step % w.checkpoint_every == 0):
            meta = {
                "stage": "warmup",
                "step": step,
                "nimg": step * batch,
                "loss": loss,
                "parameters": params,
                "config": cfg.public_dict(),
            }
            if ledger is not None:
                meta["ledger"] = ledger
            checkpoint.save(
                ckpt_dir, model=net, ema=ema, optimizer=optimizer, meta=meta, extra={"generator": generator.get_state()}
            )
            if on_checkpoint is not None:  # e.g. commit it to the run's storage (preemption-safe)
                on_checkpoint(ckpt_dir, step)

    return {
        "step": step,
        "steps_run": step - start_step,
        "resumed_from": start_step,
        "loss": loss,
        "parameters": params,
        "seconds": time.perf_counter() - start_time,
        "checkpoint": str(ckpt_dir),
    }


LATEST = "latest.json"  # on an object store: names the newest committed periodic checkpoint


def train_warmup_stored(cfg: Config, central: Any, out: Storage, reporter: Reporter | None = None) -> dict[str, Any]:
    """``train_warmup`` into the run's storage ``out``, where a GPU is (a Ray task) or here. On an object
    store every periodic checkpoint (``warmup.checkpoint_every``) is committed as ``step-<n>/`` and named
    by ``latest.json``, and a task restarted on another node (a lost node: Ray retries it) resumes from
    there, not from step 0; the final checkpoint is committed as ``checkpoint/``, where the DP-SGD
    workers read it. ``reporter``: given only when the warm-up runs in the driver's process."""
    with tempfile.TemporaryDirectory(prefix="dpfeta-warmup-") as tmp:
        local, on_checkpoint = out.local_path, None
        if local is None:
            local = Path(tmp)
            if out.is_file(LATEST):
                out.get_dir(out.read_json(LATEST)["dir"], local / "checkpoint")

            def on_checkpoint(ckpt_dir: Path, step: int) -> None:
                rel = f"step-{step:08d}"
                previous = out.read_json(LATEST)["dir"] if out.is_file(LATEST) else None
                out.put_dir(ckpt_dir, rel)
                # the switch: one atomic object
                out.write_json(LATEST, {"step": step, "dir": rel, "node": cluster.node_id()})
                if previous not in (None, rel):
                    out.delete(previous)

        summary = train_warmup(
            cfg,
            central,
            local,
            reporter=reporter,
            on_checkpoint=on_checkpoint,
            generator=rng.seeded_generator(cfg.run.seed, stream="warmup"),
        )
        if out.local_path is None:
            out.put_dir(local / "checkpoint", "checkpoint")
        return {k: v for k, v in summary.items() if k != "checkpoint"}
