"""The GPU check behind bench/gpu_check.sh: a whole ``dpfeta run`` on one GPU, no downloads.

    python bench/gpu_check.py [--out DIR] [--dry-run]

1. Writes an MNIST-shaped IDX dataset (28x28 greyscale, 10 classes; 12,000 train and 2,000 t10k images)
   made from scikit-learn's bundled 8x8 digits: upsampled, shifted by up to 2 px, with pixel noise.
2. Runs ``dpfeta run`` on it with configs/mnist_28/eps_10.yaml, shortened to fit ~5 minutes (warm-up 300
   steps, DP-SGD 2 epochs at an expected batch of 512 x K=32, 1,000 samples at 64 EDM steps, FID on
   1,000) with ``run.use_gpu=true``: DP-SGD on Ray Train (one GPU worker), sampling and evaluation as
   GPU tasks, logging to the console (``-v``). ``nvidia-smi`` samples the GPU's utilisation every 100 ms meanwhile.
3. Prints per stage the wall time (from the first log line of the stage to the first of the next) and
   the GPU-busy fraction (mean ``utilization.gpu``: the share of time a kernel was running), then the
   DP step's model FLOP/s (FlopCounterMode: forward + backward per row, times q N K rows, over the
   last report's ``sec_per_step``) as a fraction of the GPU's fp32 matmul rate measured afterwards.

Without a GPU it says so, writes the dataset and prints ``dpfeta budget`` for it (no training), and
exits 0. ``--dry-run`` does that on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/mnist_28/eps_10.yaml"
OVERRIDES = [
    "run.use_gpu=true",
    "run.num_workers=1",
    "run.cpus_per_worker=2",
    "data.n_train=12000",
    "warmup.steps=300",
    "warmup.checkpoint_every=300",
    "finetune.batch_size=512",
    "finetune.epochs=2",
    "finetune.physical_batch_size=4096",
    "finetune.checkpoint_every=10",
    "finetune.log_every=5",
    "sample.num_samples=1000",
    "sample.batch_size=500",
    "sample.steps=64",
    "sample.churn=10",
    "eval.fid.num_samples=1000",
    "eval.classifier_epochs=5",
    "tracking.enabled=false",
    "run.name=gpu_check",
]
STAGES = [
    ("central query", "central"),
    ("warm-up", "warmup"),
    ("DP-SGD", "finetune"),
    ("sampling", "sampl"),
    ("evaluation", "evaluat"),
]


def write_idx(folder: Path, train: int = 12000, test: int = 2000) -> None:
    """MNIST-shaped IDX files from the bundled 8x8 digits (upsampled 3.5x, shifted, noisy)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    base = F.interpolate(base, size=(24, 24), mode="bilinear", align_corners=False)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", train), ("t10k", test)):
        pick = rng.integers(0, len(base), n)
        canvas = np.zeros((n, 28, 28), dtype=np.float32)
        for i, (j, dx, dy) in enumerate(zip(pick, rng.integers(0, 5, n), rng.integers(0, 5, n))):
            canvas[i, dy : dy + 24, dx : dx + 24] = base[j, 0].numpy()
        canvas = np.clip(canvas + rng.normal(0, 0.05, canvas.shape), 0, 1)
        images = (canvas * 255).round().astype(np.uint8)
        labels = digits.target[pick].astype(np.uint8)
        (folder / f"{part}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (folder / f"{part}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def sample_gpu(samples: list, stop: threading.Event) -> None:
    """(time, utilization.gpu %) every 100 ms from nvidia-smi, until ``stop``."""
    proc = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if stop.is_set():
                break
            if line.strip().split(",")[0].strip().isdigit():
                samples.append((time.time(), float(line.split(",")[0])))
    finally:
        proc.terminate()


def run_logged(command: list[str], env: dict) -> list[tuple[float, str]]:
    """Run ``command``, echo and time-stamp each output line."""
    lines = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip()))
        print(line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"gpu_check: dpfeta run failed with exit code {proc.returncode}")
    return lines


def stage_windows(lines: list[tuple[float, str]], end: float) -> list[tuple[str, float, float]]:
    """(stage, start, end): from the first line naming a stage to the first line of the next one."""
    starts = []
    for name, marker in STAGES:
        first = next((t for t, text in lines if marker in text.lower()), None)
        if first is not None:
            starts.append((name, first))
    starts.sort(key=lambda s: s[1])
    return [(name, t, starts[i + 1][1] if i + 1 < len(starts) else end) for i, (name, t) in enumerate(starts)]


def dp_fraction(run_dir: Path) -> str:
    """The DP step's model FLOP/s as a fraction of the GPU's fp32 matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dpfeta import config, finetune, precision

    summary = json.loads((run_dir / "finetune" / "finetune.json").read_text())
    cfg = config.load(CONFIG, OVERRIDES)
    d = cfg.data
    net = finetune.build_network(cfg, finetune.EDM, finetune.Worker(device="cuda"))
    x = torch.randn(2, d.channels, d.resolution, d.resolution, device="cuda")
    with FlopCounterMode(display=False) as counter:
        net(
            x, torch.zeros(2, device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda")
        ).square().sum().backward()
    rows = summary["sample_rate"] * summary["n"] * cfg.finetune.noise_multiplicity
    rate = counter.get_total_flops() / 2 * rows / summary["sec_per_step"]
    matmul = precision.matmul_rate(torch.float32, "cuda")
    return (
        f"DP step: {rows:.0f} rows in {summary['sec_per_step']:.3f} s (last report window) = "
        f"{rate / 1e12:.2f} TFLOP/s = {rate / matmul:.2f} of the fp32 matmul rate ({matmul / 1e12:.1f} TFLOP/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="a folder for the data and the run (default: temporary)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU-side checks only")
    args = parser.parse_args()
    import torch

    out = args.out or Path(tempfile.mkdtemp(prefix="dpfeta-gpu-check-"))
    data = out / "mnist_like"
    write_idx(data)
    overrides = [*OVERRIDES, f"data.path={data}", f"run.dir={out / 'runs'}"]
    sets = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    dpfeta = [sys.executable, "-m", "dpfeta"]
    gpu = torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
    if args.dry_run or not gpu:
        print(
            "gpu_check: "
            + ("--dry-run" if args.dry_run else "no CUDA GPU (or no nvidia-smi) on this machine")
            + f": wrote the MNIST-shaped set to {data} and checked the plan only; nothing was trained."
        )
        run_logged([*dpfeta, "budget", "--config", str(CONFIG), *sets], env)
        return
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_gpu, args=(samples, stop), daemon=True)
    sampler.start()
    start = time.time()
    lines = run_logged([*dpfeta, "-v", "run", "--config", str(CONFIG), *sets], env)
    end = time.time()
    stop.set()
    print(f"\ngpu_check on {torch.cuda.get_device_name(0)}: whole run {end - start:.0f} s")
    print(f"{'stage':<14} {'wall s':>8} {'GPU busy':>9}")
    for name, t0, t1 in stage_windows(lines, end):
        busy = [u for t, u in samples if t0 <= t < t1]
        print(f"{name:<14} {t1 - t0:8.1f} {np.mean(busy) / 100 if busy else float('nan'):9.2f}")
    print(dp_fraction(out / "runs" / "gpu_check"))


if __name__ == "__main__":
    main()
