"""Blown-out samples: the share of saturated images after warm-up and after DP fine-tuning.

    python bench/blowout.py                                   # 16 and 28 px, both augmentations
    python bench/blowout.py --resolutions 28 --no-finetune    # warm-up only (minutes)

For each resolution and each warm-up augmentation (torchvision's full RandAugment, i.e.
``warmup.randaug_exclude=[]``, against the default that leaves Equalize out) it runs the digits
pipeline (configs/digits.yaml, ``central.rounds=5``: 50 central images, ``--warmup-steps`` steps)
with a fixed seed, then samples ``--num`` images (balanced labels) from the warm-up EMA and from the
fine-tuned EMA with the EDM (stochastic Heun) and DDIM (Euler) samplers, and prints the share of
blown-out images (``dpfeta.images.blown_out``: more than 30 % of the pixels in the top half of the
intensity range; none of the real 28 px digits, but the 16 px digits fill the frame: their own share
is printed as the floor) together with the same share among the warm-up's
augmented training images. Run directories live under ``--root`` (rerun = resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfeta import central, config, data, images, pipeline, privacy, sample  # noqa: E402
from dpfeta.warmup import augmentation  # noqa: E402

AUGMENTATIONS = {"full RandAugment": "[]", "no Equalize (default)": "[Equalize]"}
log = logging.getLogger("bench.blowout")


def augmented_share(cfg: config.Config, central_dir: Path, *, repeats: int = 20) -> float:
    """Share of blown-out images among the warm-up's augmented training images."""
    x = torch.from_numpy(central.load_central(central_dir).images)
    g = torch.Generator().manual_seed(0)
    augment = augmentation(cfg)
    batches = [augment(x, g) for _ in range(repeats)]
    return float(images.blown_out(torch.cat(batches).numpy()).mean())


def sample_shares(cfg: config.Config, weights: Path, num: int, out: Path) -> dict[str, float]:
    denoiser = sample.load_denoiser(weights, cfg, weights="ema")
    shares = {}
    for sampler in ("edm", "ddim"):
        c = config.replace(cfg, {"sample.sampler": sampler, "sample.batch_size": 100})
        x, y = sample.generate(denoiser, c, num, generator=torch.Generator().manual_seed(7), progress=False)
        out.mkdir(parents=True, exist_ok=True)
        images.save_class_grid(x, y, out / f"grid-{sampler}.png")
        np.save(out / f"samples-{sampler}.npy", x.numpy())
        shares[sampler] = float(images.blown_out(x.numpy()).mean())
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 28])
    parser.add_argument("--warmup-steps", type=int, default=800)
    parser.add_argument("--num", type=int, default=200, help="samples per sampler and model")
    parser.add_argument("--no-finetune", action="store_true", help="warm-up only")
    parser.add_argument("--root", default="runs/blowout")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    root, rows, start = Path(args.root).resolve(), [], time.perf_counter()
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    for resolution in args.resolutions:
        for label, exclude in AUGMENTATIONS.items():
            name = f"r{resolution}-{'full' if exclude == '[]' else 'noeq'}"
            overrides = [
                f"data.resolution={resolution}",
                "central.rounds=5",
                f"warmup.steps={args.warmup_steps}",
                f"warmup.randaug_exclude={exclude}",
                "run.seed=0",
                "tracking.enabled=false",
                f"sample.num_samples={args.num}",
                "eval.classifier_epochs=5",
                "eval.logreg=false",
                "eval.fid.inception_weights=null",
                f"run.name={name}",
                f"run.dir={root}",
                *args.overrides,
            ]
            if args.no_finetune:
                overrides.append("finetune.epochs=0.001")
            cfg = config.load(args.config, overrides)
            cfg = privacy.resolve(cfg, data.public_train_size(cfg))
            t0 = time.perf_counter()
            result = pipeline.run(cfg, echo=log.info)
            run_dir = cfg.run_dir()
            row = {
                "resolution": resolution,
                "augmentation": label,
                "augmented_training_images": augmented_share(cfg, run_dir / "central"),
                "after_warmup": sample_shares(cfg, run_dir / "checkpoints" / "warmup", args.num, run_dir / "warmup"),
            }
            if not args.no_finetune:
                row["after_finetune"] = sample_shares(
                    cfg, run_dir / "checkpoints" / "finetune", args.num, run_dir / "finetune"
                )
                row["accuracy"] = result["accuracy"]
            row["seconds"] = round(time.perf_counter() - t0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    stages = ["after_warmup"] + ([] if args.no_finetune else ["after_finetune"])
    print(
        "\n| px | warm-up augmentation | augmented training images | "
        + " | ".join(f"{s.replace('_', ' ')}: {m}" for s in stages for m in ("EDM", "DDIM"))
        + " |"
    )
    print("|---|---|---|" + "---|" * (2 * len(stages)))
    for r in rows:
        cells = [f"{r[s][m]:.1%}" for s in stages for m in ("edm", "ddim")]
        print(
            f"| {r['resolution']} | {r['augmentation']} | {r['augmented_training_images']:.1%} | "
            + " | ".join(cells)
            + " |"
        )
    (root / "blowout.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f}s, {args.num} samples per cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
