"""bf16 vs fp32 on digits, in one process: speed, and what bf16 does to losses, gradients and samples.

    python bench/precision.py [--train-steps 150] [--curve-steps 30] [--seeds 3]

Per seed: an fp32 U-Net (configs/digits.yaml) is trained non-privately on the real digits training
split for ``--train-steps`` warm-up steps (the warm-up code path), then, on those weights:

* **warm-up loss curve**: ``--curve-steps`` further warm-up steps from the same weights, optimiser
  state and generator, once in fp32 and once in bf16; the mean loss of each and the largest
  relative gap between the two curves;
* **DP-SGD**: the per-example gradients (64 examples x K=4, the digits micro-batch) in bf16 vs fp32:
  cosine and norm ratio per example, and the difference of the privatised update (noise off);
* **sampling**: 64 images with the DDIM sampler (16 steps) from the same generator: mean absolute
  uint8 pixel difference and the fraction of pixels that differ by more than 8 levels;
* **speed**: seconds per warm-up step and per DP-SGD step, bf16 / fp32 (interleaved).

On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 is emulated and ~10x slower; this bench
still measures its numerics, which are those of native bf16 (bf16 operands, fp32 accumulation).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfeta import config, data, dpsgd, finetune, precision, sample, warmup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_fp32(cfg, images, labels, steps: int, seed: int):
    denoiser = sample.build_denoiser(cfg)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.warmup.lr)
    gen, augment = torch.Generator().manual_seed(seed), warmup.augmentation(cfg)
    for _ in range(steps):
        warmup._train_step(denoiser, optimizer, images, labels, cfg, gen, augment)
    return denoiser, optimizer, gen


def curves(cfg, denoiser, optimizer, gen, images, labels, steps: int):
    out, seconds = {}, {}
    for prec in ("fp32", "bf16"):
        c = config.replace(cfg, {"run.precision": prec})
        d = copy.deepcopy(denoiser)
        o = type(optimizer)(d.parameters(), lr=cfg.warmup.lr)
        o.load_state_dict(optimizer.state_dict())
        g = torch.Generator()
        g.set_state(gen.get_state())
        losses, times, augment = [], [], warmup.augmentation(c)
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(warmup._train_step(d, o, images, labels, c, g, augment)[0])
            times.append(time.perf_counter() - start)
        out[prec], seconds[prec] = np.array(losses), statistics.median(times)
    return out, seconds


def dp_gradients(cfg, denoiser, images, labels, seed: int):
    K, batch = cfg.finetune.noise_multiplicity, 64
    x = images[:batch].float() / 127.5 - 1
    y = labels[:batch]
    grads, updates, seconds = {}, {}, {}
    for prec in ("fp32", "bf16"):
        net = copy.deepcopy(denoiser.net)
        private = dpsgd.DPSGD(
            net,
            noise_multiplier=0.0,
            max_grad_norm=cfg.finetune.max_grad_norm,
            expected_batch_size=batch,
            noise_multiplicity=K,
            physical_batch_size=batch * K,
            noise_generator=None,
            precision=prec,
        )
        captured = []
        original = private._clip_and_add

        def spy(g, losses, total, stats, original=original, captured=captured):
            captured.append(torch.cat(g, dim=1).clone())
            original(g, losses, total, stats)

        private._clip_and_add = spy
        gen = torch.Generator().manual_seed(seed)

        def rows(module, a, b, draws, gen=gen):
            return finetune.EDM.loss_rows(module, a, b, cfg, gen, draws)

        start = time.perf_counter()
        private.privatise(x, y, rows)
        seconds[prec] = time.perf_counter() - start
        grads[prec] = captured[0]
        updates[prec] = torch.cat([p.grad.flatten() for p in private.params])
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=1)
    ratio = grads["bf16"].norm(dim=1) / grads["fp32"].norm(dim=1)
    update_gap = ((updates["bf16"] - updates["fp32"]).norm() / updates["fp32"].norm()).item()
    return cosine, ratio, update_gap, seconds


def samples(cfg, denoiser, seed: int):
    out = {}
    for prec in ("fp32", "bf16"):
        c = config.replace(
            cfg, {"run.precision": prec, "sample.sampler": "ddim", "sample.steps": 16, "sample.batch_size": 64}
        )
        out[prec], _ = sample.generate(denoiser, c, 64, generator=torch.Generator().manual_seed(seed), progress=False)
    diff = (out["bf16"].int() - out["fp32"].int()).abs().float()
    return diff.mean().item(), (diff > 8).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--curve-steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.load(ROOT / "configs/digits.yaml", ["warmup.randaug_magnitude=0"])
    train = data.load_splits(cfg).train
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    print(
        f"bench/precision.py: torch {torch.__version__}, native bf16 {precision.bf16_native('cpu')}, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; digits N={len(train)}"
    )
    print(
        "| seed | warm-up loss fp32 | bf16 | max rel. gap | DP grad cosine min / mean | norm ratio min-max | "
        "update gap | sample |Δ| (uint8) | pixels > 8 | warm-up s/step bf16÷fp32 | DP step bf16÷fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        denoiser, optimizer, gen = train_fp32(cfg, images, labels, args.train_steps, seed)
        loss, seconds = curves(cfg, denoiser, optimizer, gen, images, labels, args.curve_steps)
        gap = np.max(np.abs(loss["bf16"] - loss["fp32"]) / loss["fp32"])
        cosine, ratio, update_gap, dp_seconds = dp_gradients(cfg, denoiser, images, labels, seed)
        pixel, far = samples(cfg, denoiser.eval(), seed)
        print(
            f"| {seed} | {loss['fp32'].mean():.4f} | {loss['bf16'].mean():.4f} | {gap:.3f} | "
            f"{cosine.min():.4f} / {cosine.mean():.4f} | {ratio.min():.3f}-{ratio.max():.3f} | {update_gap:.4f} | "
            f"{pixel:.2f} | {far:.4f} | {seconds['bf16'] / seconds['fp32']:.1f} | "
            f"{dp_seconds['bf16'] / dp_seconds['fp32']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
