"""Where epsilon = 10 loses on digits (issue 29): an ablation that separates the stages.

Every row is paired with ``default`` (configs/digits.yaml as shipped) seed by seed: the same run.seed,
hence the same central images and warm-up wherever the row leaves them alone, and the same sampling
noise. Two kinds of rows:

* trained: a whole run through the real pipeline (central images, warm-up, DP-SGD on Ray Train,
  sampling, evaluation) with some keys changed, at the same total epsilon unless said otherwise:

  - ``clip-only``: DP-SGD at sigma = 0.01 (no noise to speak of) with the same T, batch, K and clipping;
    the central images and warm-up are the default's (its sigma_c and rounds, read from its ledger).
    Not private (epsilon ~ 3e5): what the DP-SGD noise costs;
  - ``epochs-x2``: 20 epochs (T = 100) at the same epsilon (sigma grows);
  - ``central 95%`` (only when named, for low epsilon): one round of central images with 95 % of the
    budget instead of ``auto``'s cap of 80 %;
  - ``batch-x2``: expected batch 512 at the same epochs (T = 25, the same compute);
  - ``K=1``: one noise draw per example instead of 4 (a quarter of the compute);

* derived: the default run's own weights sampled again (no training, no privacy cost: post-processing),
  with the pipeline's sampling noise (stream "sample", shard 0) and evaluation:

  - ``warm-up only``: the warm-up's EMA weights, before any DP-SGD step (what DP-SGD adds);
  - ``raw weights``: DP-SGD's last weights instead of their EMA;
  - ``sampler 64 steps``, ``guidance 1``: the sampler's steps and the CFG scale.

Each run is an ordinary resumable run directory under ``--root`` (rerun = resume); ``ablation.json`` is
rewritten after every row. Prints a Markdown table: accuracy (reference CNN on the real test split) mean
+- sd over the seeds, the paired difference to ``default``, the Inception FID.

    python bench/ablation.py --set eval.fid.num_samples=250              # 3 seeds, every row
    python bench/ablation.py --rows default "warm-up only" --seeds 1     # a first look
    python bench/ablation.py --epsilon 1 --rows default "warm-up only" "central 95%" batch-x2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import flat, mean_sd, private_run  # noqa: E402

from dpfeta import config, data, evaluate, images, rng, sample  # noqa: E402

log = logging.getLogger("bench.ablation")


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...] = ()
    derived: str | None = None  # a checkpoint folder of the default run: sample it again, no training
    weights: str = "ema"
    says: str = ""


ROWS = [
    Row("default", says="configs/digits.yaml as shipped"),
    Row("warm-up only", derived="checkpoints/warmup", says="the warm-up's EMA weights, no DP-SGD step"),
    Row("raw weights", derived="checkpoints/finetune", weights="model", says="DP-SGD's last weights, no EMA"),
    Row("sampler 64 steps", ("sample.steps=64",), derived="checkpoints/finetune", says="64 Heun steps, not 32"),
    Row("guidance 1", ("sample.guidance=1",), derived="checkpoints/finetune", says="CFG scale 1, not 0"),
    Row("clip-only", says="DP-SGD sigma 0.01: clipping without noise (not private)"),
    Row("K=1", ("finetune.noise_multiplicity=1",), says="1 noise draw per example, not 4"),
    Row("batch-x2", ("finetune.batch_size=512",), says="expected batch 512, T halves (same compute)"),
    Row("epochs-x2", ("finetune.epochs=20",), says="20 epochs: T doubles, sigma grows"),
    # a low-epsilon row (not in the default set): what auto's 80 % cap leaves on the table
    Row("central 95%", ("central.rounds=1", "central.epsilon_share=0.95"), says="1 round at 95 % of the budget"),
]
BY_NAME = {r.name: r for r in ROWS}
LOW_EPSILON = ("central 95%",)


def clip_only_overrides(default_dir: Path) -> list[str]:
    """The default run's central images (its sigma_c and rounds, from its ledger) and DP-SGD at
    sigma 0.01, under a target so large that the plan accepts it (RDP: PLD's grid at sigma 0.01 is
    pointless)."""
    mechanisms = {m["name"]: m for m in json.loads((default_dir / "ledger.json").read_text())["mechanisms"]}
    c = mechanisms["central"]
    return [
        f"central.rounds={c['planned']}",
        f"central.noise_multiplier={c['noise_multiplier']!r}",
        "central.epsilon_share=0.5",  # inert with both fixed; a number instead of auto
        "privacy.epsilon=1e6",
        "privacy.noise_multiplier=0.01",
        "privacy.accountant=rdp",
    ]


def derived_run(base: str, overrides: list[str], row: Row, default_dir: Path, name: str, root: Path, seed: int) -> dict:
    """The default run's weights sampled again as the pipeline samples (stream "sample", shard 0,
    balanced labels: with the default's own weights and keys, the same images) and evaluated as the
    pipeline evaluates."""
    import torch

    cfg = config.load(base, [*overrides, *row.overrides, f"run.name={name}", f"run.dir={root}", f"run.seed={seed}"])
    out = cfg.run_dir()
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    denoiser = sample.load_denoiser(default_dir / row.derived, cfg, weights=row.weights)
    labels = sample.balanced_labels(cfg.sample.num_samples, cfg.data.num_classes)
    generator = rng.make_generator(seed, stream="sample", rank=0)
    with torch.no_grad():
        x, y = sample.generate(denoiser, cfg, len(labels), generator=generator, labels=labels)
    images.save_class_folders(x, y, out / "samples" / "images")  # read back as the pipeline reads its own
    synthetic = evaluate.load_synthetic(out / "samples", cfg)
    result = {"derived_from": str(default_dir / row.derived), "weights": row.weights}
    result.update(evaluate.evaluate(cfg, synthetic, data.load_splits(cfg)))
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def signed(text: str) -> str:
    """'0.072 ± 0.012' -> '+0.072 ± 0.012' (a difference reads better with its sign)."""
    return text if text.startswith(("-", "—")) else "+" + text


def table(rows: list[dict]) -> str:
    lines = [
        "| row | what changes | seeds | accuracy (CNN, real test) | Δ vs default (paired) | FID (inception) |",
        "|---|---|---|---|---|---|",
    ]
    default = {r["seed"]: r["accuracy"] for r in rows if r["row"] == "default"}
    for row in ROWS:
        rs = [r for r in rows if r["row"] == row.name]
        if not rs:
            continue
        deltas = [r["accuracy"] - default[r["seed"]] for r in rs if r["seed"] in default]
        delta = "—" if row.name == "default" else signed(mean_sd(deltas))
        lines.append(
            f"| {row.name} | {row.says} | {len(rs)} | {mean_sd([r['accuracy'] for r in rs])} | "
            f"{delta} | {mean_sd([r.get('fid') for r in rs])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--rows", nargs="+", default=[r.name for r in ROWS if r.name not in LOW_EPSILON], choices=list(BY_NAME)
    )
    parser.add_argument("--root", default="runs/ablation", help="run directories (rerun = resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = Path(args.root).resolve()
    common = ["tracking.enabled=false", f"privacy.epsilon={args.epsilon:g}", *args.overrides]
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)  # one local Ray for every run
    rows, start = [], time.perf_counter()
    wanted = [BY_NAME[name] for name in dict.fromkeys(args.rows)]  # in the order given
    if any(r.derived or r.name == "clip-only" for r in wanted) and "default" not in args.rows:
        wanted.insert(0, BY_NAME["default"])  # the rows it derives from
    for row in wanted:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            default_dir = root / f"eps{args.epsilon:g}-default-s{seed}"
            name = f"eps{args.epsilon:g}-{row.name.replace(' ', '-').replace('=', '')}-s{seed}"
            if row.derived:
                result = derived_run(args.config, common, row, default_dir, name, root, seed)
            else:
                extra = clip_only_overrides(default_dir) if row.name == "clip-only" else list(row.overrides)
                result = private_run(args.config, [*common, *extra, f"run.seed={seed}"], name, root)
            result = flat(result)
            rows.append({"row": row.name, "seed": seed, **result})
            (root / "ablation.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")  # partial
            print(
                f"[{time.perf_counter() - start:.0f}s] {row.name} seed {seed}: accuracy {result['accuracy']:.3f}, "
                f"FID {result.get('fid')} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    ray.shutdown()
    print(table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f}s wall time; details in {root / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
