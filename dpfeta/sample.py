"""The sampling stage: build or load the EMA denoiser from a checkpoint, generate the synthetic set in
batches with the configured sampler (EDM Heun or DDIM, classifier-free guidance), write class folders
and a grid. The math is ``diffusion``; this module adds the config, checkpoints and image files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dpfeta import checkpoint, images, precision
from dpfeta import progress as progress_bars
from dpfeta.config import Config
from dpfeta.diffusion import Denoiser, EDMPrecond, randn, ddim_sampler, edm_sampler
from dpfeta.nn.unet import UNet

logger = logging.getLogger(__name__)


def build_denoiser(cfg: Config) -> EDMPrecond:
    """A freshly initialised U-Net wrapped in EDM preconditioning, sized by ``cfg``."""
    return EDMPrecond(UNet.from_config(cfg), cfg.diffusion.sigma_data)


def load_denoiser(directory: Path | str, cfg: Config, *, weights: str = "ema") -> EDMPrecond:
    """Build the denoiser of ``cfg`` and load ``weights`` ("ema" or "model") from a checkpoint.

    ``directory`` is a checkpoint folder or a stage folder holding one as ``checkpoint/``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"expected weights='ema' or 'model', got {weights!r}")
    directory = Path(directory)
    if not checkpoint.exists(directory) and checkpoint.exists(directory / "checkpoint"):
        directory = directory / "checkpoint"
    state = checkpoint.load(directory)
    saved = state["meta"].get("config", {}).get("model")
    if saved is not None and saved != cfg.to_dict()["model"]:
        raise ValueError(f"checkpoint '{directory}' holds model={saved}, but the config asks for "
                         f"model={cfg.to_dict()['model']}")
    weights_dict = state[weights] if state[weights] is not None else state["model"]
    if all(key.startswith("net.") for key in weights_dict):  # saved as EDMPrecond, not its U-Net
        weights_dict = {key[len("net."):]: value for key, value in weights_dict.items()}
    denoiser = build_denoiser(cfg)
    denoiser.net.load_state_dict(weights_dict)
    return denoiser.eval()


def sample_batch(denoiser: Denoiser, cfg: Config, latents: torch.Tensor, labels: torch.Tensor, *,
                 null_label: int, generator: torch.Generator | None) -> torch.Tensor:
    """Run the sampler named by ``cfg.sample.sampler`` with its settings."""
    s = cfg.sample
    common = dict(steps=s.steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho,
                  guidance=s.guidance, null_label=null_label)
    if s.sampler == "edm":
        return edm_sampler(denoiser, latents, labels, churn=s.churn, s_min=s.s_min, s_max=s.s_max,
                           s_noise=s.s_noise, generator=generator, **common)
    if s.sampler == "ddim":
        return ddim_sampler(denoiser, latents, labels, **common)
    raise ValueError(f"config key 'sample.sampler': expected edm or ddim, got {s.sampler!r}")


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class num // C times, the first num % C classes once more."""
    if num < 0 or num_classes < 1:
        raise ValueError(f"expected num >= 0 and num_classes >= 1, got {num} and {num_classes}")
    return torch.arange(num, dtype=torch.int64) % num_classes


@torch.no_grad()
def generate(denoiser: EDMPrecond, cfg: Config, num: int, *, generator: torch.Generator | None,
             progress: bool = True, labels: torch.Tensor | None = None,
             out_dir: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num`` images in batches of ``cfg.sample.batch_size`` -> (uint8 [N,C,H,W], int64 [N]).

    Labels default to ``balanced_labels``: the same count per class (as benchmark protocols do; the
    official code draws them uniformly at random); the null class is never drawn.
    With ``out_dir``, writes ``out_dir/images/<label>/<i>.png`` and ``out_dir/grid.png``.
    """
    d = cfg.data
    device = next(denoiser.parameters()).device
    if labels is None:
        labels = balanced_labels(num, d.num_classes)
    labels = labels.to(torch.int64).cpu()
    if len(labels) != num:
        raise ValueError(f"expected {num} labels, got {len(labels)}")
    was_training = denoiser.training
    denoiser.eval()
    out, start, done = [], time.perf_counter(), 0
    for batch_labels in labels.split(cfg.sample.batch_size):
        like = torch.empty(0, device=device)
        latents = randn((len(batch_labels), d.channels, d.resolution, d.resolution), generator, like)
        # No autograd bookkeeping at all; the network in run.precision, the sampler state stays fp32.
        with torch.inference_mode(), precision.autocast(cfg.run.precision, device):
            x = sample_batch(denoiser, cfg, latents, batch_labels.to(device), null_label=d.num_classes,
                             generator=generator)
        out.append(images.to_uint8(x))  # functional, outside inference mode: an ordinary tensor
        done += len(batch_labels)
        progress_bars.advance("sample", len(batch_labels))
        if progress:
            rate = done / (time.perf_counter() - start)
            logger.info("sample %d/%d images (%.1f img/s, %s %d steps)", done, num, rate,
                        cfg.sample.sampler, cfg.sample.steps)
    denoiser.train(was_training)
    result = torch.cat(out) if out else torch.empty(0, d.channels, d.resolution, d.resolution,
                                                    dtype=torch.uint8)
    if out_dir is not None:
        images.save_class_folders(result, labels, Path(out_dir) / "images")
        images.save_class_grid(result, labels, Path(out_dir) / "grid.png")
    return result, labels

