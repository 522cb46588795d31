"""Compute precision of the network: fp32, or bf16 autocast, chosen per device by measurement.

``run.precision`` is ``fp32`` (the default), ``bf16`` or ``auto``. Only the network's forward and
backward run under ``torch.autocast(dtype=bfloat16)``; parameters, optimiser state, losses, the
sampler's state and every piece of privacy arithmetic (per-example gradients once computed,
clipping, sums, noise) stay fp32 (privacy.md §5; ``dpsgd.py`` enforces its part).

``auto`` picks bf16 only where the device multiplies bf16 matrices natively (CUDA with bf16 support;
a CPU whose oneDNN has a bf16 path, i.e. AVX512-BF16 or AMX) **and** a bf16 matrix multiply measured
in this process is at least ``AUTO_MIN_SPEEDUP`` times the fp32 one; otherwise fp32. Without a
native path bf16 is emulated and far slower (measured on a 2-core AVX2 VM: matmul 0.8 vs 70 GFLOP/s,
a digits U-Net training step 10x slower), so it is not even timed there.

The matmul ratio is a ceiling, not a measurement of the model: on an H200 (bf16 matmul ~15x fp32)
the digits and MNIST U-Nets ran their warm-up step at 0.55-0.87x, DP-SGD step at 0.79-1.00x and
sampling at 0.99-1.15x of fp32 under bf16 (bench/README.md, "bf16 on an H200"): small convolutions at 16-28 px are
bound by kernel launches, layout conversions and normalisation, not by matrix arithmetic. Hence
fp32 is the default, and bf16 is for models where ``bench/roofline.py --device cuda`` shows a gain.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch

from dpfeta.config import PRECISIONS

logger = logging.getLogger(__name__)

AUTO_MIN_SPEEDUP = 1.5


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` has a native (not emulated) bf16 matrix multiply."""
    kind = device_type(device)
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    size: int | None = None,
    seconds: float = 0.5,
) -> float:
    """Best FLOP/s of a square ``size`` x ``size`` matrix multiply in ``dtype`` on ``device``.

    The roofline of this process: the same threads, allocator and load as the work it is compared
    with. ``size`` defaults to 1024 on CPU (fits L2/L3 tiling, several GEMM micro-kernels per thread)
    and 4096 on GPU; repeats for about ``seconds`` after one untimed call.
    """
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


@functools.lru_cache(maxsize=None)
def _auto(device: str, threads: int) -> str:
    if not bf16_native(device):
        logger.info("precision auto on %s: fp32 (no native bf16 matrix multiply)", device)
        return "fp32"
    fp32, bf16 = matmul_rate(torch.float32, device), matmul_rate(torch.bfloat16, device)
    choice = "bf16" if bf16 >= AUTO_MIN_SPEEDUP * fp32 else "fp32"
    logger.info(
        "precision auto on %s: %s (matmul bf16 %.0f vs fp32 %.0f GFLOP/s)", device, choice, bf16 / 1e9, fp32 / 1e9
    )
    return choice


def resolve(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``run.precision`` on ``device`` (``auto`` measured once per process)."""
    if precision not in PRECISIONS:
        raise ValueError(f"expected run.precision one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    key = device.type if device.type != "cuda" else f"cuda:{device.index or 0}"
    return _auto(key, torch.get_num_threads())


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision`` bf16 (``auto`` resolved), else a no-op."""
    if resolve(precision, device) == "bf16":
        return torch.autocast(device_type(device), dtype=torch.bfloat16)
    return contextlib.nullcontext()
