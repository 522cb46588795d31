"""Fixed per-step cost of each stage: a zero-cost network through the real code path.

    python bench/overhead.py [--steps 60] [--stages dpsgd,ray,warmup,sample,fid] [--threads 1]

The network is ``Identity``: a per-pixel linear map of the channels started at the identity (``C*C + C``
parameters: 2 for greyscale), so its arithmetic is ~0 and what a step costs is everything around it. On the digits
config (configs/digits.yaml: N = 1,258 training images at 16 px, the run's report and checkpoint
intervals) it measures, in ms per step:

* ``dpsgd``: ``finetune.train_finetune`` in this process (LocalReporter): Poisson masks, the EDM loss
  rows, per-example gradients, clipping, noise, Adam, EMA, epsilon at each report, checkpoints. With
  the PLD and the RDP accountant: what the epsilon curve costs when steps are this fast.
* ``ray``: the same through ``distributed.fit_finetune`` (Ray Train, Ray Data shards, the all-reduce
  of one worker group, reports and checkpoints to Ray's storage), amortised: (wall(T2) - wall(T1)) /
  (T2 - T1), so the start of the worker group cancels out (T1 run before and after T2, averaged).
* ``warmup``: ``warmup.train_warmup`` at batch 64 with its RandAugment and central-image batches, and
  with RandAugment off (the difference is the augmentation).
* ``sample``: ``sample.generate`` (EDM Heun), per network evaluation of a 250-image batch.
* ``fid``: the Inception loader path (uint8 -> 299 px bilinear, channels-last, features back to
  float64) with a TorchScript extractor that only averages its input, per image.

Beside them, the compute of the reference networks: the digits and MNIST U-Nets' model FLOPs per
DP-SGD step (forward + backward, 512 rows for MNIST), and what the overhead is as a share of a GPU step
of the MNIST U-Net, estimated from the H200's measured DP-step rate (bench/README.md, "bf16 on an
H200": 0.44 of ~50 TFLOP/s fp32). Absolute times on a shared CPU move with its load: compare rows
printed by one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpfeta import config, distributed, finetune, privacy, sample, warmup
from dpfeta.data import ImageSet
from dpfeta.diffusion import EDMPrecond
from dpfeta.evaluate import fid

ROOT = Path(__file__).resolve().parents[1]
DIGITS, MNIST = ROOT / "configs/digits.yaml", ROOT / "configs/mnist_28/eps_1.yaml"
H200_DP_FLOPS = 0.44 * 50e12  # the MNIST DP step's fp32 rate on the H200 (bench/README.md)


class Identity(nn.Module):
    """A denoiser network of ~0 FLOPs: a linear map of the channels (per pixel) started at the identity.

    Not a 1x1 convolution: on a CPU ``conv2d`` with one input and one output channel takes its slow
    path (4 ms forward and 10 ms forward + backward for 256 x 1 x 16 x 16, 15x the linear map's), which
    the first version of this bench counted as overhead."""

    def __init__(self, cfg: config.Config):
        super().__init__()
        c = cfg.data.channels
        self.num_classes = cfg.data.num_classes
        self.mix = nn.Linear(c, c)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(c))
            self.mix.bias.zero_()

    @classmethod
    def from_config(cls, cfg: config.Config) -> "Identity":
        return cls(cfg)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.mix(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


IDENTITY = dataclasses.replace(finetune.EDM, build=Identity.from_config)


def digits_cfg(root: Path, *overrides: str) -> config.Config:
    return config.load(
        DIGITS,
        [
            f"run.dir={root}",
            "central.noise_multiplier=4.0",
            "privacy.noise_multiplier=1.05",
            "privacy.epsilon=50",
            "tracking.enabled=false",
            *overrides,
        ],
    )


def fake_digits(cfg: config.Config, n: int = 1258) -> ImageSet:
    d = cfg.data
    rng = np.random.default_rng(0)
    return ImageSet(
        rng.integers(0, 256, (n, d.channels, d.resolution, d.resolution), dtype=np.uint8),
        rng.integers(0, d.num_classes, n).astype(np.int64),
        d.num_classes,
    )


def epochs_for(steps: int, q: float) -> float:
    return steps * q - 1e-6


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _prime() -> None:
    """Pay the process's one-time costs before any timing: the first optimiser imports torch._dynamo (~1 s,
    which a 20-step stage would otherwise count as ~50 ms a step), Opacus and the accountants load."""
    import opacus  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    privacy.epsilon_of(privacy.poisson_gaussian(0.1, 1.0, 2), delta=1e-5, accountant="pld")


def _dpsgd_step(steps: int, *overrides: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = digits_cfg(Path(tmp), "finetune.init=scratch", *overrides)
        train = fake_digits(cfg)
        cfg = config.replace(cfg, {"finetune.epochs": epochs_for(steps, cfg.finetune.batch_size / len(train))})
        plan = privacy.plan(cfg, len(train))
        reporter = finetune.LocalReporter(Path(tmp) / "ckpt")
        start = time.perf_counter()
        finetune.train_finetune(cfg, train, plan=plan, init_dir=None, resume_dir=None, reporter=reporter, task=IDENTITY)
        return (time.perf_counter() - start) / plan.steps


def bench_dpsgd(steps: int) -> dict[str, float]:
    """The step at the config's batch with each accountant, and with RDP at a quarter of the batch: the
    two batches split the step into a part per row (the EDM loss's element-wise work, noise draws, per-row
    hooks: it grows with B * K * pixels) and a fixed part (the intercept)."""
    out = {}
    for accountant in ("pld", "rdp"):
        out[f"DP-SGD step, one process, {accountant.upper()} epsilon at each report"] = _dpsgd_step(
            steps, f"privacy.accountant={accountant}"
        )
    cfg = digits_cfg(Path(tempfile.gettempdir()))
    big = cfg.finetune.batch_size
    small = big / 4
    quarter = _dpsgd_step(steps, "privacy.accountant=rdp", f"finetune.batch_size={small:g}")
    full = out["DP-SGD step, one process, RDP epsilon at each report"]
    rows = big * cfg.finetune.noise_multiplicity
    per_row = (full - quarter) / (rows - rows / 4)
    out[f"DP-SGD step, RDP, expected batch {small:g} (a quarter)"] = quarter
    out["  its fixed part (intercept of the two batches)"] = full - per_row * rows
    out[f"  its part per 1,000 rows (B x K; {rows:g} rows at batch {big:g})"] = per_row * 1000
    return out


def bench_ray(steps: int) -> dict[str, float]:
    walls: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # short, long, short: the first worker group of a process starts slower (imports, Ray Data's
        # first dataset), which would otherwise shrink the difference
        for i, t in enumerate((max(steps // 6, 5), steps, max(steps // 6, 5))):
            cfg = digits_cfg(Path(tmp), "privacy.accountant=rdp", "finetune.init=scratch", f"run.name=r{t}-{i}")
            train = fake_digits(cfg)
            cfg = config.replace(cfg, {"finetune.epochs": epochs_for(t, cfg.finetune.batch_size / len(train))})
            plan = privacy.plan(cfg, len(train))
            start = time.perf_counter()
            distributed.fit_finetune(
                cfg, train=train, plan=plan, init_dir=None, out_dir=Path(tmp) / f"r{t}-{i}", task=IDENTITY
            )
            walls.setdefault(plan.steps, []).append(time.perf_counter() - start)
    (t1, w1), (t2, w2) = sorted((t, float(np.mean(w))) for t, w in walls.items())
    return {
        f"DP-SGD step, Ray Train 1 worker, amortised over T={t1}..{t2} (RDP)": (w2 - w1) / (t2 - t1),
        f"  (the stage's fixed start: {w1 - t1 * (w2 - w1) / (t2 - t1):.1f} s)": float("nan"),
    }


def bench_warmup(steps: int) -> dict[str, float]:
    out = {}
    original = warmup.UNet
    warmup.UNet = Identity  # the warm-up builds UNet.from_config
    try:
        for magnitude in (3, 0):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = digits_cfg(
                    Path(tmp),
                    f"warmup.steps={steps}",
                    f"warmup.randaug_magnitude={magnitude}",
                    "warmup.checkpoint_every=200",
                    "warmup.log_every=50",
                )
                central = fake_digits(cfg, n=64)  # 64 images: a batch of 64, the goal's
                start, cpu = time.perf_counter(), time.thread_time()
                warmup.train_warmup(cfg, central, Path(tmp) / "warmup")
                label = "RandAugment on" if magnitude else "RandAugment off"
                out[f"warm-up step, batch 64, {label}"] = (time.perf_counter() - start) / steps
                # one thread does the whole warm-up step: its CPU time is what the step costs without
                # the neighbours' load (a loaded machine stretches the wall time, not this)
                out[f"  the same, CPU time of the thread ({label})"] = (time.thread_time() - cpu) / steps
    finally:
        warmup.UNet = original
    return out


def bench_sample() -> dict[str, float]:
    cfg = digits_cfg(Path(tempfile.gettempdir()), "sample.compile=false")
    denoiser = EDMPrecond(Identity(cfg), cfg.diffusion.sigma_data)
    num = cfg.sample.batch_size * 2
    start = time.perf_counter()
    sample.generate(denoiser, cfg, num, generator=torch.Generator().manual_seed(0), progress=False)
    evaluations = 2 * cfg.sample.steps - 1  # Heun: two per step but the last
    return {
        f"sampler, per network evaluation of {cfg.sample.batch_size} images": (time.perf_counter() - start)
        / (2 * evaluations)
    }


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 683)[:, :2048]


def bench_fid() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mean.pt"
        torch.jit.script(_Mean()).save(str(path))
        extract = fid.load_inception(path)
        images = np.random.default_rng(0).integers(0, 256, (256, 1, 16, 16), dtype=np.uint8)
        extract(images[:16])
        start = time.perf_counter()
        extract(images)
        return {"FID loader, per image (resize to 299, layout, features out)": (time.perf_counter() - start) / 256}


def model_flops(path: Path, rows: int) -> float:
    """Forward + backward FLOPs of ``rows`` rows of the config's U-Net (FlopCounterMode, 2 rows scaled)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config.load(path)
    d = cfg.data
    net = finetune.build_network(cfg, finetune.EDM, finetune.Worker())
    x = torch.randn(2, d.channels, d.resolution, d.resolution)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(2), torch.zeros(2, dtype=torch.int64)).square().sum().backward()
    return counter.get_total_flops() / 2 * rows


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", default="dpsgd,ray,warmup,sample,fid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    stages = set(args.stages.split(","))
    _prime()
    results: dict[str, float] = {}
    if "dpsgd" in stages:
        results.update(bench_dpsgd(args.steps))
    if "ray" in stages:
        results.update(bench_ray(args.steps))
    if "warmup" in stages:
        results.update(bench_warmup(args.steps))
    if "sample" in stages:
        results.update(bench_sample())
    if "fid" in stages:
        results.update(bench_fid())
    mnist_flops, digits_flops = model_flops(MNIST, 512), model_flops(DIGITS, 256)
    mnist_step = mnist_flops / H200_DP_FLOPS  # model FLOPs at the measured DP-step rate
    print(
        f"\nload average {os.getloadavg()[0]:.1f}, {args.threads} thread(s); reference compute: digits U-Net "
        f"DP step (256 rows) {digits_flops / 1e9:.0f} GFLOP; MNIST U-Net DP step (512 rows) "
        f"{mnist_flops / 1e9:.0f} GFLOP = ~{1e3 * mnist_step:.0f} ms on an H200 (estimated)"
    )
    print(f"{'stage (zero-cost network)':<72} {'ms/step':>9} {'÷ MNIST GPU step':>17}")
    for name, seconds in results.items():
        if np.isnan(seconds):
            print(name)
            continue
        print(f"{name:<72} {1e3 * seconds:9.2f} {seconds / mnist_step:17.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
