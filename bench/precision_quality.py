"""bf16 vs fp32 on whole private runs: the same seeded run twice, once per precision, one process.

    python bench/precision_quality.py [--device cuda] [--seeds 3] [--epsilon 10] [--samples-out S.npz]

Each run is the pipeline's stages called in this process on one device, without Ray, MLflow or
a run directory (a benchmark, not a release): the DP central images (``central.central_images``),
the warm-up (``warmup.train_warmup``), DP-SGD (``finetune.train_finetune`` with the plan of
``pipeline.plan_run``), sampling (``sample.generate``, balanced labels) and the evaluation
(``evaluate.evaluate``: reference CNN on the real test split, FID of the kind found). With
``run.seed`` set, fp32 and bf16 runs of one seed draw the same central noise, batches, diffusion
noise and DP noise, so each pair differs by the compute precision alone.

Per run it prints the accuracy, the FID, the warm-up and fine-tune loss curves (every
``log_every`` steps) and the seconds of each stage; at the end a table of mean +- sd per precision
and the paired differences. ``--samples-out`` saves every run's synthetic images (uint8) and labels
in one ``.npz`` so that they can be evaluated again elsewhere (e.g. with the Inception FID on a
machine that has its weights: ``--evaluate S.npz``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import mean_sd  # noqa: E402  (bench/quality.py, beside this file)

from dpfeta import central, data, evaluate, finetune, pipeline, precision, rng, sample, warmup  # noqa: E402


def _metrics(ev: dict) -> dict:
    """accuracy, logreg accuracy, FID and its kind of an ``evaluate.evaluate`` result (dp and nondp)."""
    flat = {**ev.get("nondp", {}), **ev.get("dp", {})}
    return {
        "accuracy": flat.get("accuracy"),
        "logreg_accuracy": flat.get("logreg_accuracy"),
        "fid": flat.get("fid"),
        "fid_kind": ev.get("fid_kind"),
    }


def one_run(
    config: str, overrides: list[str], *, seed: int, prec: str, epsilon: float, device: torch.device, work: Path
) -> dict:
    cfg = pipeline.resolve_config(
        config,
        [
            "tracking.enabled=false",
            "tracking.nondp=true",
            f"run.seed={seed}",
            f"privacy.epsilon={epsilon}",
            f"run.precision={prec}",
            f"run.use_gpu={'true' if device.type == 'cuda' else 'false'}",
            *overrides,
        ],
    )
    plan = pipeline.plan_run(cfg)
    splits = data.load_splits(cfg)
    seconds: dict[str, float] = {}

    def stage(name, fn):
        precision._sync(device)
        start = time.perf_counter()
        out = fn()
        precision._sync(device)
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    result = stage(
        "central",
        lambda: central.central_images(cfg, splits.train, generator=rng.seeded_generator(seed, stream="central")),
    )
    warm_curve: list[tuple[int, float]] = []
    stage(
        "warmup",
        lambda: warmup.train_warmup(
            cfg,
            result.imageset(),
            work / "warmup",
            generator=rng.seeded_generator(seed, stream="warmup"),
            reporter=lambda m: warm_curve.append((m["step"], m["loss"])),
        ),
    )
    reporter = finetune.LocalReporter(work / "finetune")
    final = stage(
        "finetune",
        lambda: finetune.train_finetune(
            cfg,
            splits.train,
            plan=plan,
            init_dir=work / "warmup",
            resume_dir=None,
            reporter=reporter,
            worker=finetune.Worker(device=str(device)),
        ),
    )
    denoiser = sample.load_denoiser(reporter.directory, cfg, weights="ema").to(device)
    x, y = stage(
        "sample",
        lambda: sample.generate(
            denoiser, cfg, cfg.sample.num_samples, progress=False, generator=rng.make_generator(seed, stream="sample")
        ),
    )
    synthetic = data.ImageSet(x.numpy(), y.numpy().astype(np.int64), cfg.data.num_classes)
    ev = stage("evaluate", lambda: evaluate.evaluate(cfg, synthetic, splits))
    return {
        "seed": seed,
        "precision": prec,
        "epsilon_target": epsilon,
        "epsilon": final.get("epsilon"),
        "noise_multiplier": plan.noise_multiplier,
        "steps": plan.steps,
        **_metrics(ev),
        "warmup_loss": warm_curve,
        "finetune_loss": [(h["step"], h.get("nondp/loss")) for h in reporter.history if "nondp/loss" in h],
        "seconds": seconds,
        "images": x.numpy(),
        "labels": y.numpy(),
    }


def summary(rows: list[dict]) -> str:
    lines = [
        "| precision | runs | accuracy | logreg | FID | warm-up loss (last) | fine-tune loss (mean) | "
        "warm-up s | DP-SGD s | sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prec in dict.fromkeys(r["precision"] for r in rows):
        rs = [r for r in rows if r["precision"] == prec]
        warm = [r["warmup_loss"][-1][1] for r in rs if r["warmup_loss"]]
        tune = [float(np.mean([v for _, v in r["finetune_loss"]])) for r in rs if r["finetune_loss"]]
        lines.append(
            f"| {prec} | {len(rs)} | {mean_sd([r['accuracy'] for r in rs])} | "
            f"{mean_sd([r['logreg_accuracy'] for r in rs])} | {mean_sd([r['fid'] for r in rs])} | "
            f"{mean_sd(warm)} | {mean_sd(tune)} | {mean_sd([r['seconds']['warmup'] for r in rs])} | "
            f"{mean_sd([r['seconds']['finetune'] for r in rs])} | {mean_sd([r['seconds']['sample'] for r in rs])} |"
        )
    pairs = {}
    for r in rows:
        pairs.setdefault(r["seed"], {})[r["precision"]] = r
    diffs = [p["bf16"]["accuracy"] - p["fp32"]["accuracy"] for p in pairs.values() if {"bf16", "fp32"} <= set(p)]
    if diffs:
        lines.append(f"\npaired accuracy difference bf16 - fp32 over {len(diffs)} seed(s): {mean_sd(diffs)}")
        speed = [
            p["fp32"]["seconds"]["finetune"] / p["bf16"]["seconds"]["finetune"]
            for p in pairs.values()
            if {"bf16", "fp32"} <= set(p)
        ]
        lines.append(
            f"DP-SGD stage speed-up bf16 / fp32 (whole stage, per seed): {', '.join(f'{s:.2f}' for s in speed)}"
        )
    return "\n".join(lines)


def evaluate_saved(config: str, overrides: list[str], paths: list[Path]) -> None:
    """Evaluate the runs saved by ``--samples-out`` here (e.g. with the Inception FID)."""
    rows, splits = [], None
    for path in paths:
        saved = np.load(path, allow_pickle=False)
        for i, r in enumerate(json.loads(str(saved["meta"]))):
            cfg = pipeline.resolve_config(
                config, ["tracking.enabled=false", "tracking.nondp=true", f"run.seed={r['seed']}", *overrides]
            )
            if splits is None:  # split by data.split_seed, not run.seed: read once
                splits = data.load_splits(cfg)
            synthetic = data.ImageSet(saved[f"images_{i}"], saved[f"labels_{i}"].astype(np.int64), cfg.data.num_classes)
            r = {**r, **_metrics(evaluate.evaluate(cfg, synthetic, splits))}
            print(
                f"seed {r['seed']} {r['precision']}: accuracy {r['accuracy']:.3f}, "
                f"FID {r['fid']:.1f} ({r['fid_kind']})",
                flush=True,
            )
            rows.append(r)
    print(summary(rows))


def save(rows: list[dict], json_out: Path | None, samples_out: Path | None) -> None:
    meta = [{k: v for k, v in r.items() if k not in ("images", "labels")} for r in rows]
    if json_out is not None:
        json_out.write_text(json.dumps(meta, indent=2) + "\n")
    if samples_out is not None:
        arrays = {f"images_{i}": r["images"] for i, r in enumerate(rows)}
        arrays.update({f"labels_{i}": r["labels"] for i, r in enumerate(rows)})
        np.savez_compressed(samples_out, meta=np.array(json.dumps(meta)), **arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--samples-out", type=Path, default=None, help="save every run's images to this .npz")
    parser.add_argument("--json-out", type=Path, default=None, help="save every run's numbers to this .json")
    parser.add_argument(
        "--evaluate", type=Path, nargs="+", default=None, help="evaluate saved .npz files here, train nothing"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP convergence warnings
    if args.evaluate is not None:
        evaluate_saved(args.config, args.overrides, args.evaluate)
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"bench/precision_quality.py: {args.config}, epsilon {args.epsilon:g}, {args.seeds} seed(s), "
        f"{name}, torch {torch.__version__}",
        flush=True,
    )
    rows, start = [], time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for prec in args.precisions:
            with tempfile.TemporaryDirectory(prefix="dpfeta-precq-") as tmp:
                r = one_run(
                    args.config,
                    args.overrides,
                    seed=seed,
                    prec=prec,
                    epsilon=args.epsilon,
                    device=device,
                    work=Path(tmp),
                )
            rows.append(r)
            save(rows, args.json_out, args.samples_out)  # after every run: a cut-off run keeps the rest
            print(
                f"[{time.perf_counter() - start:.0f}s] seed {seed} {prec}: accuracy {r['accuracy']:.3f}, "
                f"FID {r['fid']:.1f} ({r['fid_kind']}), eps {r['epsilon']:.3f}, stages {r['seconds']}, "
                f"warm-up loss {[round(v, 4) for _, v in r['warmup_loss']]}, "
                f"fine-tune loss {[round(v, 4) for _, v in r['finetune_loss']]}",
                flush=True,
            )
    print(summary(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
