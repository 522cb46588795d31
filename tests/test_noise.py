"""The DP-SGD noise sampler (docs/privacy.md §5): float64 draws, not fp32 Box-Muller on a 24-bit lattice."""

from __future__ import annotations

import math

import torch

from dpfeta import dpsgd

N = 1 << 22  # enough pairs far out in the tail (radius^2 > 2 ln(2^24 / 1000)) to see the lattice


def lattice_fraction(z: torch.Tensor) -> float:
    """The audit's check (E3): torch draws normals on the CPU in blocks of 16, element j paired with j + 8 by
    Box-Muller, u = exp(-(z_j^2 + z_{j+8}^2) / 2). With 24-bit uniforms u * 2^24 is an integer; far in the
    tail (u * 2^24 < 1000) it can be recovered exactly even from fp32 values. Returns the fraction of such
    pairs whose u * 2^24 lies within 0.01 of an integer (~0.02 for continuous u)."""
    blocks = z.double().view(-1, 16)
    k = torch.exp(-(blocks[:, :8] ** 2 + blocks[:, 8:] ** 2) / 2) * 2.0**24
    tail = k[k < 1000]
    assert len(tail) > 50, len(tail)
    return float(((tail - tail.round()).abs() < 0.01).double().mean())


def test_the_check_finds_fp32_box_muller():
    """The check can fail: torch's fp32 normal is on the lattice, and bounded at sqrt(2 ln 2^24) = 5.77."""
    z = torch.normal(0.0, 1.0, (N,), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert lattice_fraction(z) > 0.9
    assert z.abs().max() <= math.sqrt(2 * math.log(2**24)) + 1e-4


def test_the_noise_sampler_is_off_the_lattice():
    z = dpsgd.gaussian_noise(N, 1.0, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float64
    assert lattice_fraction(z) < 0.1
    assert abs(float(z.std()) - 1.0) < 3e-3 and abs(float(z.mean())) < 3e-3


def test_the_noise_is_scaled_and_on_the_generator_device():
    z = dpsgd.gaussian_noise(1 << 16, 3.5, torch.Generator().manual_seed(1))
    assert z.device.type == "cpu" and len(z) == 1 << 16
    assert abs(float(z.std()) / 3.5 - 1.0) < 0.02
