"""EDM diffusion math: preconditioning, the per-example loss, samplers (imports torch only).

Karras et al. 2022 ("EDM") as used by DPDM / DP-FETA (docs/reference-implementation.md §4.2, §5). Randomness always
comes from an injected ``torch.Generator``; draws happen on the generator's device and are moved
to the data's device, so a CPU generator works for a GPU model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
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
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), labels)


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def edm_loss_rows(
    denoiser: Denoiser,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    P_mean: float,
    P_std: float,
    sigma_data: float,
    label_drop_prob: float,
    num_classes: int,
    K: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
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
    sigma = (randn((batch * K, 1, 1, 1), generator, x) * P_std + P_mean).exp()
    noise = randn(tuple(x.shape), generator, x) * sigma
    drop = _rand((batch,), generator, x) < label_drop_prob
    y = torch.where(drop, torch.full_like(labels, num_classes), labels).repeat_interleave(K, dim=0)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised = denoiser(x + noise, sigma.flatten(), y)
    return (weight * (denoised - x) ** 2).flatten(1).mean(1)


def edm_loss(denoiser: Denoiser, images: torch.Tensor, labels: torch.Tensor, *, K: int = 1, **kwargs) -> torch.Tensor:
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
        both = denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, torch.full_like(labels, null_label)])
        )
        cond, uncond = both.chunk(2)
        return (1 + guidance) * cond - guidance * uncond

    return denoise


def edm_sampler(
    denoiser: Denoiser,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    churn: float,
    s_min: float,
    s_max: float,
    s_noise: float,
    guidance: float,
    null_label: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
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
            x_hat = x + (t_hat**2 - t_cur**2) ** 0.5 * s_noise * randn(tuple(x.shape), generator, x)
        # Euler step, then the second-order correction except on the last step.
        d_cur = (x_hat - denoise(x_hat, t_hat * ones, labels)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < steps - 1:
            d_prime = (x - denoise(x, t_next * ones, labels)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def ddim_sampler(
    denoiser: Denoiser,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    guidance: float,
    null_label: int,
) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE over the N grid points, then D(x, sigma_min)."""
    denoise = guided(denoiser, guidance, null_label)
    t_steps = time_grid(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[:-1].tolist()
    ones = latents.new_ones(latents.shape[0])
    x = latents * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = x + (t_next - t_cur) * (x - denoise(x, t_cur * ones, labels)) / t_cur
    return denoise(x, t_steps[-1] * ones, labels)
