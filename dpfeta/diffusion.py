"""EDM diffusion: preconditioning, the per-example loss, samplers and batched generation.

Karras et al. 2022 ("EDM") as used by DPDM / DP-FETA (docs/method.md §4.2, §5). Randomness always
comes from an injected ``torch.Generator``; draws happen on the generator's device and are moved
to the data's device, so a CPU generator works for a GPU model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dpfeta import checkpoint, images
from dpfeta.config import Config
from dpfeta.nn.unet import UNet

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


# ------------------------------------------------------------------------------------------
# Preconditioning
# ------------------------------------------------------------------------------------------


class EDMPrecond(nn.Module):
    """D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y), with c_noise = ln(sigma) / 4."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    @property
    def null_label(self) -> int:
        return self.net.num_classes

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for a tensor of noise levels."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), labels)


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


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def edm_loss_rows(denoiser: Denoiser, images: torch.Tensor, labels: torch.Tensor, *, P_mean: float,
                  P_std: float, sigma_data: float, label_drop_prob: float, num_classes: int, K: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Per-row EDM loss [B*K]; rows b*K .. b*K+K-1 are the K noise draws of example b.

    ln sigma ~ N(P_mean, P_std^2), weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    each row is the pixel mean of lambda (D(x + sigma n) - x)^2. The label of an example is replaced by
    the null class ``num_classes`` with probability ``label_drop_prob`` once, then repeated K times.
    Draw order (sigma, noise, label drop) makes K draws of one batch equal K=1 on the repeated batch.
    """
    if K < 1:
        raise ValueError(f"expected K >= 1 noise draws, got {K}")
    batch = images.shape[0]
    x = images.repeat_interleave(K, dim=0)
    sigma = (_randn((batch * K, 1, 1, 1), generator, x) * P_std + P_mean).exp()
    noise = _randn(tuple(x.shape), generator, x) * sigma
    drop = _rand((batch,), generator, x) < label_drop_prob
    y = torch.where(drop, torch.full_like(labels, num_classes), labels).repeat_interleave(K, dim=0)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    denoised = denoiser(x + noise, sigma.flatten(), y)
    return (weight * (denoised - x) ** 2).flatten(1).mean(1)


def edm_loss(denoiser: Denoiser, images: torch.Tensor, labels: torch.Tensor, *, K: int = 1,
             **kwargs) -> torch.Tensor:
    """Per-example EDM loss [B]: the mean of ``edm_loss_rows`` over each example's K draws."""
    return edm_loss_rows(denoiser, images, labels, K=K, **kwargs).view(images.shape[0], K).mean(1)


# ------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------


def time_grid(steps: int, *, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM noise levels t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0 (float64, [N+1])."""
    if steps < 2:
        raise ValueError(f"expected steps >= 2, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def guided(denoiser: Denoiser, guidance: float, null_label: int) -> Denoiser:
    """Classifier-free guidance (1 + w) D(x, y) - w D(x, null); w = 0 returns ``denoiser`` itself."""
    if guidance == 0:
        return denoiser

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        torch.cat([labels, torch.full_like(labels, null_label)]))
        cond, uncond = both.chunk(2)
        return (1 + guidance) * cond - guidance * uncond

    return denoise


def edm_sampler(denoiser: Denoiser, latents: torch.Tensor, labels: torch.Tensor, *, steps: int,
                sigma_min: float, sigma_max: float, rho: float, churn: float, s_min: float,
                s_max: float, s_noise: float, guidance: float, null_label: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """EDM stochastic Heun sampler; ``latents`` ~ N(0, I). gamma_i = min(churn/N, 1) (DP-FETA's cap)."""
    denoise = guided(denoiser, guidance, null_label)
    t_steps = time_grid(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).tolist()
    ones = latents.new_ones(latents.shape[0])
    x = latents * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Increase the noise level temporarily (churn).
        gamma = min(churn / steps, 1.0) if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = x
        if gamma > 0:
            x_hat = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * s_noise * _randn(tuple(x.shape), generator, x)
        # Euler step, then the second-order correction except on the last step.
        d_cur = (x_hat - denoise(x_hat, t_hat * ones, labels)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < steps - 1:
            d_prime = (x - denoise(x, t_next * ones, labels)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def ddim_sampler(denoiser: Denoiser, latents: torch.Tensor, labels: torch.Tensor, *, steps: int,
                 sigma_min: float, sigma_max: float, rho: float, guidance: float,
                 null_label: int) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE over the N grid points, then D(x, sigma_min)."""
    denoise = guided(denoiser, guidance, null_label)
    t_steps = time_grid(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[:-1].tolist()
    ones = latents.new_ones(latents.shape[0])
    x = latents * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = x + (t_next - t_cur) * (x - denoise(x, t_cur * ones, labels)) / t_cur
    return denoise(x, t_steps[-1] * ones, labels)


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


@torch.no_grad()
def generate(denoiser: EDMPrecond, cfg: Config, num: int, *, generator: torch.Generator | None,
             progress: bool = True, labels: torch.Tensor | None = None,
             out_dir: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num`` images in batches of ``cfg.sample.batch_size`` -> (uint8 [N,C,H,W], int64 [N]).

    Labels default to uniform random classes (as the official code); the null class is never drawn.
    With ``out_dir``, writes ``out_dir/images/<label>/<i>.png`` and ``out_dir/grid.png``.
    """
    d = cfg.data
    device = next(denoiser.parameters()).device
    if labels is None:
        labels = torch.randint(d.num_classes, (num,), generator=generator,
                               device=generator.device if generator is not None else "cpu")
    labels = labels.to(torch.int64).cpu()
    if len(labels) != num:
        raise ValueError(f"expected {num} labels, got {len(labels)}")
    was_training = denoiser.training
    denoiser.eval()
    out, start, done = [], time.perf_counter(), 0
    for batch_labels in labels.split(cfg.sample.batch_size):
        like = torch.empty(0, device=device)
        latents = _randn((len(batch_labels), d.channels, d.resolution, d.resolution), generator, like)
        x = sample_batch(denoiser, cfg, latents, batch_labels.to(device), null_label=d.num_classes,
                         generator=generator)
        out.append(images.to_uint8(x))
        done += len(batch_labels)
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
