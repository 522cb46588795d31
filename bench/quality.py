"""Quality on digits: DP-FETA (warm-up) vs DPDM-style (no warm-up) at equal DP-SGD compute, + non-private.

For each epsilon and seed:

* ``dp-feta``: the full pipeline of configs/digits.yaml (central images spend their share, warm-up,
  DP-SGD with the rest of the budget);
* ``dpdm``: ``finetune.init=scratch`` and ``central.rounds=0``: the whole budget goes to DP-SGD, with
  the same DP-SGD compute (same expected batch, epochs hence T, K, C, learning rate);
* ``dp-feta-central`` (only when asked for): ``dp-feta`` with 80 % of the budget on one round of
  central images, the low-epsilon setting (what ``central.rounds``/``epsilon_share: auto`` of
  configs/digits.yaml choose at epsilon 1 and 2, docs/privacy.md §3a);
* ``non-private`` (once per seed, epsilon = inf): the same U-Net trained without DP on the real
  training split for ``warmup.steps + T * B / warmup.batch_size`` steps (the same number of images as
  warm-up plus DP-SGD see), then sampled and evaluated the same way.

Every run is an ordinary resumable run directory under ``--root`` (rerun = resume). Prints a
Markdown table of mean +- sd accuracy (reference CNN on the real test split) and FID (kind named).

    python bench/quality.py                      # 3 seeds, epsilon 1 and 10 (hours on 2 cores)
    python bench/quality.py --seeds 1 --set sample.num_samples=500   # a first look
    python bench/quality.py --methods dp-feta-central --epsilons 1   # the low-epsilon variant
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfeta import config, data, pipeline, privacy  # noqa: E402

METHODS = {
    "dp-feta": ["finetune.init=warmup"],
    "dpdm": ["finetune.init=scratch", "central.rounds=0"],
    # not in the default set: the low-epsilon variant (bench/README.md, "Quality on digits"): most of the budget
    # to one round of central images, so that a class mean over ~120 records is recognisable at eps = 1
    "dp-feta-central": ["finetune.init=warmup", "central.epsilon_share=0.8", "central.rounds=1"],
}
DEFAULT_METHODS = ["dp-feta", "dpdm", "non-private"]
log = logging.getLogger("bench.quality")


def private_run(base: str, overrides: list[str], name: str, root: Path) -> dict:
    cfg = pipeline.resolve_config(base, [*overrides, f"run.name={name}", f"run.dir={root}"])
    return pipeline.run(cfg, echo=log.info)


def nonprivate_run(base: str, overrides: list[str], name: str, root: Path, seed: int) -> dict:
    """No DP at all: the U-Net trained on the real training split (an upper bound, epsilon = inf)."""
    import torch

    from dpfeta import evaluate, images, sample, warmup

    cfg = config.load(base, [*overrides, f"run.name={name}", f"run.dir={root}", f"run.seed={seed}"])
    out = cfg.run_dir()
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())
    n = data.public_train_size(cfg)
    steps = privacy.dpsgd_steps(epochs=cfg.finetune.epochs, sample_rate=cfg.finetune.batch_size / n)
    total = cfg.warmup.steps + math.ceil(steps * cfg.finetune.batch_size / cfg.warmup.batch_size)
    cfg = config.replace(cfg, {"warmup.steps": total, "warmup.randaug_magnitude": 0})
    splits = data.load_splits(cfg)
    summary = warmup.train_warmup(
        cfg, splits.train, out / "checkpoints" / "nonprivate", generator=torch.Generator().manual_seed(seed)
    )
    denoiser = sample.load_denoiser(summary["checkpoint"], cfg, weights="ema")
    x, y = sample.generate(denoiser, cfg, cfg.sample.num_samples, generator=torch.Generator().manual_seed(seed + 3))
    images.save_class_grid(x, y, out / "grid.png")
    synthetic = data.ImageSet(x.numpy(), y.numpy().astype(np.int64), cfg.data.num_classes)
    result = {"epsilon": math.inf, "steps": total, **evaluate.evaluate(cfg, synthetic, splits)}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def flat(result: dict) -> dict:
    """eval.json's nondp and dp sections beside its head: digits' test split is carved out of the source,
    so its metrics sit in the nondp section (an operator's benchmark, not a release)."""
    return {**result.get("nondp", {}), **result.get("dp", {}), **result}


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f} ± {sd:.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(rows: list[dict]) -> str:
    kinds = sorted({r.get("fid_kind", "?") for r in rows})
    lines = [
        f"| epsilon | method | seeds | accuracy (CNN, real test) | logreg | FID ({', '.join(kinds)}) |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    for (eps, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(
            f"| {eps:g} | {method} | {len(rs)} | {mean_sd([r['accuracy'] for r in rs])} | "
            f"{mean_sd([r.get('logreg_accuracy') for r in rs])} | {mean_sd([r.get('fid') for r in rs])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[*METHODS, "non-private"])
    parser.add_argument("--root", default="runs/quality", help="run directories (rerun = resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = Path(args.root).resolve()
    common = ["tracking.enabled=false", *args.overrides]
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)  # one local Ray for every run
    rows, start = [], time.perf_counter()
    for seed in range(args.seeds):
        for method in args.methods:
            for eps in [math.inf] if method == "non-private" else args.epsilons:
                t0 = time.perf_counter()
                if method == "non-private":
                    result = nonprivate_run(args.config, common, f"nonprivate-s{seed}", root, seed)
                else:
                    name = f"eps{eps:g}-{method}-s{seed}"
                    result = private_run(
                        args.config,
                        [*common, *METHODS[method], f"privacy.epsilon={eps}", f"run.seed={seed}"],
                        name,
                        root,
                    )
                result = flat(result)
                rows.append({"target": eps, "method": method, "seed": seed, **result})
                (root / "quality.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")  # partial
                print(
                    f"[{time.perf_counter() - start:.0f}s] eps={eps:g} {method} seed {seed}: accuracy "
                    f"{result['accuracy']:.3f}, FID {result.get('fid')} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    ray.shutdown()
    (root / "quality.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(table(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f}s wall time; details in {root / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
