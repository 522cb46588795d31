"""CPU throughput of the U-Net: sampler images/s and non-private fwd+bwd examples/s.

    python bench/sampling.py [--steps 4] [--batch 32] [--threads N]

For the digits (16 px, configs/digits.yaml) and MNIST (28 px, configs/mnist_28/eps_10.yaml) models
with random weights (speed does not depend on them): the EDM stochastic Heun sampler (2N-1
denoiser evaluations), the same with CFG (each evaluation on a doubled batch), the deterministic
Euler/DDIM sampler (N evaluations), and one training step (EDM loss, K=1, Adam). Sampler rates
scale as 1/steps: the images/s at the config's own step count is printed too. Each sampler runs once
after one untimed denoiser call. Allocator and load matter on small shared VMs (jemalloc via LD_PRELOAD
speeds small tensors up): LD_PRELOAD and the load average are printed with the numbers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from dpfeta import config
from dpfeta.diffusion import ddim_sampler, edm_loss, edm_sampler
from dpfeta.nn import count_parameters
from dpfeta.sample import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"digits": ROOT / "configs/digits.yaml", "mnist": ROOT / "configs/mnist_28/eps_10.yaml"}


def _timed(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def bench_config(name: str, path: Path, *, steps: int, batch: int, reps: int) -> None:
    cfg = config.load(path)
    d, s, dc = cfg.data, cfg.sample, cfg.diffusion
    denoiser = build_denoiser(cfg)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, d.channels, d.resolution, d.resolution, generator=gen)
    labels = torch.randint(d.num_classes, (batch,), generator=gen)
    grid = dict(sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho, null_label=d.num_classes)
    churn = dict(churn=s.churn, s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise, generator=gen)
    print(
        f"\n{name}: {d.resolution}x{d.resolution}x{d.channels}, U-Net {count_parameters(denoiser):,} "
        f"parameters, batch {batch}, {steps} sampler steps (config: {s.steps})"
    )

    denoiser.eval()
    with torch.no_grad():
        denoiser(latents, torch.ones(batch), labels)  # warm-up (allocator, oneDNN primitives)
    samplers = {
        "edm (Heun, churn)": (
            2 * steps - 1,
            lambda: edm_sampler(denoiser, latents, labels, steps=steps, guidance=0.0, **grid, **churn),
        ),
        "edm + CFG w=1": (
            2 * (2 * steps - 1),
            lambda: edm_sampler(denoiser, latents, labels, steps=steps, guidance=1.0, **grid, **churn),
        ),
        "ddim (Euler)": (steps, lambda: ddim_sampler(denoiser, latents, labels, steps=steps, guidance=0.0, **grid)),
    }
    with torch.no_grad():
        for label, (evals, run) in samplers.items():
            seconds = _timed(run, 1)
            at_config = batch / seconds * steps / s.steps
            print(
                f"  sample {label:18s} {batch / seconds:8.2f} images/s  ({evals} evaluations of "
                f"the batch in {seconds:.2f} s; ~{at_config:.3g} images/s at {s.steps} steps)"
            )

    denoiser.train()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-4)
    images = torch.rand(batch, d.channels, d.resolution, d.resolution, generator=gen) * 2 - 1

    def train_step() -> None:
        loss = edm_loss(
            denoiser,
            images,
            labels,
            P_mean=dc.P_mean,
            P_std=dc.P_std,
            sigma_data=dc.sigma_data,
            label_drop_prob=dc.label_drop_prob,
            num_classes=d.num_classes,
            K=1,
            generator=gen,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()

    train_step()  # warm-up
    seconds = _timed(train_step, reps)
    print(f"  train fwd+bwd+Adam       {batch / seconds:8.1f} examples/s  ({seconds:.3f} s/step, non-private)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="sampler steps N")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '(glibc malloc)'}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for name, path in CONFIGS.items():
        bench_config(name, path, steps=args.steps, batch=args.batch, reps=args.reps)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
