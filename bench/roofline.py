"""Every stage against this machine's own limit: achieved FLOP/s / matmul FLOP/s, one process.

    python bench/roofline.py [--threads 1] [--bf16 auto|on|off] [--reps 3] [--models digits mnist]
    python bench/roofline.py --device cuda --mnist-batch 64 --digits-batch 256 --sample-images 2048

The limit is the best rate of a square fp32 matrix multiply (and bf16, where measured) timed in this
process right before and right after every timed repetition of a stage (same threads, allocator and
load; ``dpfeta.precision.matmul_rate``); the repetition with the median fraction is reported.
Each stage's FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on an untimed call
(matmuls, convolutions, attention; elementwise work counts 0, as in any roofline of this kind):

* **warm-up step**: ``warmup._train_step`` (RandAugment, EDM loss of ``warmup.batch_size`` x K rows,
  backward, Adam), the stage's own code;
* **DP-SGD step**: ``dpsgd.DPSGD.privatise`` + Adam on B examples x K rows; FLOPs = the *model*
  FLOPs of a plain forward and backward of the same rows (the arithmetic the step must do; the
  per-example weight gradients are the same products, grouped per example). The executed FLOPs are
  not shown: the counter charges a grouped convolution's weight gradient ``groups`` times over;
* **sampling**: ``sample.generate`` with the EDM Heun sampler, eager and ``torch.compile``d
  (``sample.compile=true``, timed after an untimed call that compiles), and the eager fp32
  ``no_grad`` path it replaced (the "before"), FLOPs = images x (2N - 1) x one denoiser evaluation;
* **evaluation**: a training step of the downstream CNN and its feature extraction (the FID features).

Digits is configs/digits.yaml (16 px, 218,769 parameters); MNIST is the configs/mnist_28 U-Net
(28 px, 1,485,217 parameters) with a small batch so that it runs on a CPU. ``--bf16 auto`` measures
bf16 only where the device multiplies bf16 natively (``dpfeta.precision.bf16_native``); ``on``
forces it (emulated bf16 on a CPU without AVX512-BF16/AMX is ~100x slower: minutes).
``--device cuda`` runs every stage on the GPU (``run.use_gpu``), against the GPU's own matmul rates
(fp32 without TF32, bf16); cuDNN may use TF32 for fp32 convolutions (PyTorch's default), so an fp32
stage can exceed 1.0 of the fp32 matmul rate there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfeta import config, dpsgd, finetune, precision, sample, warmup  # noqa: E402
from dpfeta.nn import count_parameters  # noqa: E402
from dpfeta.nn.cnn import CNN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"digits": ROOT / "configs/digits.yaml", "mnist": ROOT / "configs/mnist_28/eps_1.yaml"}


@dataclass
class Row:
    model: str
    stage: str
    precision: str
    unit: str  # what the rate counts
    per_second: float
    flops_per_unit: float
    peak_fp32: float
    peak_bf16: float | None
    note: str = ""

    @property
    def flops(self) -> float:
        return self.per_second * self.flops_per_unit


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, reps: int, *, warm: bool = True) -> float:
    """Median seconds of ``reps`` calls (after one untimed call if ``warm``)."""
    if warm:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Bench:
    def __init__(
        self,
        name: str,
        path: Path,
        *,
        precisions: list[str],
        reps: int,
        mnist_batch: int,
        sample_steps: int,
        sample_images: int,
        device: torch.device = torch.device("cpu"),
        digits_batch: int | None = None,
    ):
        self.name, self.reps, self.precisions, self.device = name, reps, precisions, device
        self.cfg = config.load(path, ["run.seed=0", f"run.use_gpu={'true' if device.type == 'cuda' else 'false'}"])
        self.mnist_batch, self.sample_steps, self.sample_images = mnist_batch, sample_steps, sample_images
        self.digits_batch = digits_batch
        self.rows: list[Row] = []

    def measure(self, fn, prec: str, reps: int, *, warm: bool = True) -> float:
        """Seconds of ``fn``, each rep bracketed by matmul-rate measurements (shared machines: the
        load moves within seconds); keeps the rep with the median fraction and its roofline."""
        device = self.device

        def synced():
            fn()
            precision._sync(device)

        if warm:
            synced()
        bf16 = precision.matmul_rate(torch.bfloat16, device, seconds=0.3) if prec == "bf16" else None
        runs = []
        for _ in range(reps):
            before = precision.matmul_rate(torch.float32, device, seconds=0.15)
            seconds = timed(synced, 1, warm=False)
            peak = (before * precision.matmul_rate(torch.float32, device, seconds=0.15)) ** 0.5
            runs.append((1.0 / (seconds * peak), seconds, peak))
        _, seconds, peak = sorted(runs)[len(runs) // 2]
        self.last_peaks = (peak, bf16)
        return seconds

    def add(self, stage: str, prec: str, unit: str, per_second: float, flops_per_unit: float, note: str = ""):
        fp32, bf16 = self.last_peaks
        self.rows.append(Row(self.name, stage, prec, unit, per_second, flops_per_unit, fp32, bf16, note))

    def with_precision(self, prec: str) -> config.Config:
        return config.replace(self.cfg, {"run.precision": prec})

    # Stages -----------------------------------------------------------------------------------

    def warmup_step(self, prec: str) -> None:
        cfg = self.with_precision(prec)
        w, d = cfg.warmup, cfg.data
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (256, d.channels, d.resolution, d.resolution), dtype=torch.uint8, generator=gen)
        labels = torch.randint(d.num_classes, (256,), generator=gen)
        denoiser = sample.build_denoiser(cfg).to(self.device)
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=w.lr)

        augment = warmup.augmentation(cfg)

        def step():
            warmup._train_step(denoiser, optimizer, images, labels, cfg, gen, augment)

        flops = count_flops(step)
        seconds = self.measure(step, prec, self.reps)
        rows = w.batch_size * w.noise_multiplicity
        self.add(
            "warm-up step",
            prec,
            "rows/s",
            rows / seconds,
            flops / rows,
            f"batch {w.batch_size} x K={w.noise_multiplicity}, RandAugment included",
        )

    def dpsgd_step(self, prec: str) -> None:
        cfg = self.with_precision(prec)
        f, d = cfg.finetune, cfg.data
        batch = (
            (self.digits_batch or f.physical_batch_size // f.noise_multiplicity)
            if self.name == "digits"
            else self.mnist_batch
        )
        rows = batch * f.noise_multiplicity
        gen = torch.Generator(device=self.device).manual_seed(0)
        images = torch.rand(batch, d.channels, d.resolution, d.resolution, generator=gen, device=self.device) * 2 - 1
        labels = torch.randint(d.num_classes, (batch,), generator=gen, device=self.device)
        net = finetune.build_network(cfg, finetune.EDM, finetune.Worker(device=str(self.device)))
        model_flops = self._model_flops(cfg, net, images, labels)
        optimizer = torch.optim.Adam(net.parameters(), lr=f.lr)
        private = dpsgd.DPSGD(
            net,
            noise_multiplier=1.0,
            max_grad_norm=f.max_grad_norm,
            expected_batch_size=batch,
            noise_multiplicity=f.noise_multiplicity,
            physical_batch_size=rows,
            noise_generator=torch.Generator(device=self.device).manual_seed(1),
            precision=prec,
        )

        def rows_fn(module, x, y, draws):
            return finetune.EDM.loss_rows(module, x, y, cfg, gen, draws)

        def step():
            private.privatise(images, finetune.EDM.prepare_labels(labels, cfg, gen), rows_fn)
            optimizer.step()

        seconds = self.measure(step, prec, self.reps)
        self.add(
            "DP-SGD step", prec, "rows/s", rows / seconds, model_flops / rows, f"{batch} x K={f.noise_multiplicity}"
        )

    @staticmethod
    def _model_flops(cfg: config.Config, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
        """FLOPs of a plain forward + backward of the step's B*K rows (no per-example machinery)."""
        gen = torch.Generator(device=images.device).manual_seed(0)
        K = cfg.finetune.noise_multiplicity

        def fwd_bwd():
            finetune.EDM.loss_rows(net, images, labels, cfg, gen, range(K)).sum().backward()

        flops = count_flops(fwd_bwd)
        net.zero_grad(set_to_none=True)
        return flops

    def sampling(self, prec: str) -> None:
        d = self.cfg.data
        num = self.sample_images or (128 if d.resolution <= 16 else 32)
        cfg = config.replace(
            self.with_precision(prec),
            {
                "sample.sampler": "edm",
                "sample.steps": self.sample_steps,
                "sample.guidance": 0.0,
                "sample.batch_size": num,
                "sample.compile": "false",
            },
        )
        s = cfg.sample
        dev = self.device
        denoiser = sample.build_denoiser(cfg).to(dev).eval()
        x = torch.randn(64, d.channels, d.resolution, d.resolution, device=dev)
        with torch.no_grad():  # counts one evaluation, and warms the allocator and oneDNN up
            per_eval = (
                count_flops(
                    lambda: denoiser(x, torch.ones(64, device=dev), torch.zeros(64, dtype=torch.long, device=dev))
                )
                / 64
            )
        per_image = per_eval * (2 * s.steps - 1)

        def new():
            sample.generate(denoiser, cfg, num, generator=torch.Generator().manual_seed(0), progress=False)

        compiled_cfg = config.replace(cfg, {"sample.compile": "true"})

        def compiled():  # sample.compile=true; the untimed first call compiles
            sample.generate(denoiser, compiled_cfg, num, generator=torch.Generator().manual_seed(0), progress=False)

        def before():  # the path generate() took before the speed work: fp32, no_grad, config batch
            gen = torch.Generator().manual_seed(0)
            labels = torch.randint(d.num_classes, (num,), generator=gen)
            with torch.no_grad():
                for y in labels.split(s.batch_size):
                    latents = torch.randn(len(y), d.channels, d.resolution, d.resolution, generator=gen).to(dev)
                    sample.sample_batch(denoiser, cfg, latents, y.to(dev), null_label=d.num_classes, generator=gen)

        runs = [
            ("sampling (EDM Heun)", new, False, f"generate(), eager, {num} images, {s.steps} steps"),
            ("sampling, compiled", compiled, True, f"generate(), sample.compile=true, {num} images"),
        ]
        if prec == "fp32":
            runs.append(("sampling, before", before, False, f"eager no_grad, batch {s.batch_size}"))
        for stage, fn, warm, note in runs:
            seconds = self.measure(fn, prec, max(1, self.reps // 2), warm=warm)
            self.add(
                stage,
                prec,
                "images/s",
                num / seconds,
                per_image,
                note + f"; {num / seconds * s.steps / 32:.1f} img/s at 32 steps",
            )

    def evaluation(self, prec: str) -> None:
        if prec != "fp32":  # the downstream CNN and the FID features are fp32 (evaluate.py)
            return
        cfg, d = self.cfg, self.cfg.data
        dev = self.device
        cnn = CNN(in_channels=d.channels, num_classes=d.num_classes, resolution=d.resolution).to(dev)
        optimizer = torch.optim.Adam(cnn.parameters(), lr=cfg.eval.classifier_lr)
        gen = torch.Generator().manual_seed(0)
        batch = cfg.eval.classifier_batch_size
        x = (torch.rand(batch, d.channels, d.resolution, d.resolution, generator=gen) * 2 - 1).to(dev)
        y = torch.randint(d.num_classes, (batch,), generator=gen).to(dev)
        features_in = (torch.rand(500, d.channels, d.resolution, d.resolution, generator=gen) * 2 - 1).to(dev)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(cnn(x), y).backward()
            optimizer.step()

        def features():
            with torch.no_grad():
                cnn.features(features_in)

        for stage, fn, items, note in [
            ("eval: classifier step", train_step, batch, f"batch {batch}"),
            ("eval: FID features", features, 500, "offline CNN, batch 500"),
        ]:
            flops = count_flops(fn)
            seconds = self.measure(fn, prec, self.reps)
            self.add(stage, prec, "images/s", items / seconds, flops / items, note)

    def run(self, stages: list[str]) -> list[Row]:
        for prec in self.precisions:
            for stage in stages:
                getattr(self, stage)(prec)
        return self.rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | stage | precision | rate | GFLOP/unit | GFLOP/s | ÷ fp32 matmul | ÷ bf16 matmul | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bf16 = f"{r.flops / r.peak_bf16:.2f}" if r.peak_bf16 else "-"
        lines.append(
            f"| {r.model} | {r.stage} | {r.precision} | {r.per_second:.1f} {r.unit} | "
            f"{r.flops_per_unit / 1e9:.3f} | {r.flops / 1e9:.1f} | {r.flops / r.peak_fp32:.2f} | {bf16} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared VMs)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["warmup_step", "dpsgd_step", "sampling", "evaluation"],
        choices=["warmup_step", "dpsgd_step", "sampling", "evaluation"],
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every stage and the matmul rates there)")
    parser.add_argument("--mnist-batch", type=int, default=4, help="MNIST DP-SGD examples (x K=32 rows)")
    parser.add_argument(
        "--digits-batch",
        type=int,
        default=None,
        help="digits DP-SGD examples (x K=4 rows; default: the config's physical batch)",
    )
    parser.add_argument("--sample-steps", type=int, default=8, help="sampler steps N (rates scale as 1/N)")
    parser.add_argument("--sample-images", type=int, default=None, help="default: 128 (16 px), 32 (28 px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    native = precision.bf16_native(device)
    precisions = ["fp32"] + (["bf16"] if args.bf16 == "on" or (args.bf16 == "auto" and native) else [])
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"bench/roofline.py: torch {torch.__version__}, {where}, "
        f"native bf16 {native}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '(glibc malloc)'}"
    )
    rows = []
    for name in args.models:
        bench = Bench(
            name,
            MODELS[name],
            precisions=precisions,
            reps=args.reps,
            mnist_batch=args.mnist_batch,
            sample_steps=args.sample_steps,
            sample_images=args.sample_images,
            device=device,
            digits_batch=args.digits_batch,
        )
        print(f"{name}: U-Net {count_parameters(sample.build_denoiser(bench.cfg)):,} parameters", flush=True)
        rows += bench.run(args.stages)
    print("\n" + table(rows))
    peaks = [r.peak_fp32 for r in rows]
    print(
        f"\nfp32 matmul rate over the run: {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s; "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    if "bf16" in precisions:
        for name in args.models:
            for stage in ("warm-up step", "DP-SGD step", "sampling (EDM Heun)", "sampling, compiled"):
                pair = {r.precision: r for r in rows if r.model == name and r.stage == stage}
                if len(pair) == 2:
                    print(
                        f"{name} {stage}: bf16 / fp32 throughput = "
                        f"{pair['bf16'].per_second / pair['fp32'].per_second:.2f}"
                    )


if __name__ == "__main__":
    main()
