"""One DP-FETA run: central images -> warm-up -> DP fine-tune -> sample -> evaluate.

Run directory ``cfg.run_dir()``::

    config.json      the resolved config (central sigma fixed); a resume must match it
    ledger.json      every mechanism, steps taken, composed epsilon; updated after each spending stage
    central/         DP central images (M1) + grid.png
    checkpoints/     warmup/ (no privacy cost), finetune/ (M2, Ray Train)
    samples/         synthetic set (images/<label>/*.png), grid.png, samples.json
    eval.json        epsilon (composed total), delta, accountant; "dp" and "nondp" metric sections
    release/         exactly what may be published (dpfeta.release): central images, the final
                     weights, samples, DP metrics, ledger.json, config.json, release.json, README.md
    mlflow_run.json  the MLflow run this directory logs into

Every stage is skipped when its output exists, so rerunning the same command resumes. The privacy
plan is printed before any data is read; sigma is decided once, stored in ledger.json, and never
recalibrated on resume (a stored plan above the target is refused). A spending stage is recorded in
ledger.json *before* its output touches the disk, so the ledger never under-reports.

Where each stage runs (the Ray session, GPU tasks from a CPU head) is ``cluster``'s business.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dpfeta import config as config_mod
from dpfeta import cluster, data, privacy, release, rng, runlock, tracking
from dpfeta.config import Config

log = logging.getLogger(__name__)

# Sections whose change makes a run directory's outputs or ledger invalid.
RESUME_SECTIONS = ("data", "central", "model", "diffusion", "warmup", "finetune", "privacy")


# --------------------------------------------------------------------------------------------
# Set-up: plan, run directory, ledger, Ray
# --------------------------------------------------------------------------------------------


def resolve_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The one way in (CLI, ray_jobs/, tune, bench): load and validate the config, then fix every
    privacy-derived value from public facts (today the central noise), before any data is read."""
    cfg = config_mod.load(path, list(overrides))
    return privacy.resolve(cfg, data.public_train_size(cfg))


def plan_run(cfg: Config) -> privacy.Plan:
    """The privacy plan from public facts only (no data is read)."""
    n = data.public_train_size(cfg)
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)
    if cfg.finetune.init == "warmup" and cfg.central.rounds == 0:
        raise ValueError("config key 'central.rounds': expected >= 1 with finetune.init=warmup "
                         "(the warm-up trains on the central images), got 0; use finetune.init=scratch")
    if cfg.finetune.init == "warmup" and cfg.warmup.steps == 0:
        raise ValueError("config key 'warmup.steps': expected >= 1 with finetune.init=warmup, got 0; "
                         "use finetune.init=scratch for no warm-up")
    return privacy.plan(cfg, n)


def budget_text(cfg: Config, pl: privacy.Plan) -> str:
    return (f"privacy plan for run '{cfg.run.name}' (no data read yet)\n" + privacy.plan_table(pl))


def _check_resume(cfg: Config, run_dir: Path) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved, now = json.loads(saved_path.read_text()), cfg.to_dict()
    changed = [f"{s}.{k}" for s in RESUME_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    if changed:
        raise ValueError(f"run directory '{run_dir}' was started with a different config ({', '.join(changed[:6])}"
                         f"{' ...' if len(changed) > 6 else ''}); rerun with the same config to resume, "
                         f"or pick a new run.name")


def open_ledger(run_dir: Path, pl: privacy.Plan) -> privacy.Plan:
    """Load ledger.json (resume: its sigma is kept, never recalibrated) or write the planned one.

    Refuses a stored ledger of another plan, and a stored plan whose epsilon (recomputed now) is
    above the target (e.g. after an accountant upgrade): continuing it would end above the target.
    """
    path = run_dir / "ledger.json"
    if not path.is_file():
        pl.ledger.save(path)
        return pl
    ledger = privacy.Ledger.load(path)
    pl.ledger.check_same_plan(ledger, where=f"'{path}'")
    sigma = ledger.get("dpsgd").noise_multiplier
    if not math.isclose(sigma, pl.noise_multiplier, rel_tol=1e-6):
        log.warning("resume: keeping the stored sigma=%.6g (the config now calibrates to %.6g)", sigma, pl.noise_multiplier)
    planned = ledger.epsilon(planned=True)
    if planned > pl.target_epsilon * (1 + 1e-9):
        raise ValueError(f"'{path}' holds a plan of epsilon={planned:.6g} (recomputed by this version's "
                         f"{ledger.accountant} accountant), above the target privacy.epsilon={pl.target_epsilon:g}; "
                         "it cannot be resumed within the budget: start a new run.name")
    return dataclasses.replace(pl, noise_multiplier=sigma, ledger=ledger, epsilon=planned)


def record(run_dir: Path, pl: privacy.Plan, name: str, count: int) -> float:
    """Record ``count`` compositions of mechanism ``name`` taken; save ledger.json; return total epsilon."""
    pl.ledger.record_steps(name, count)
    pl.ledger.save(run_dir / "ledger.json")
    eps = pl.ledger.epsilon()
    if name == "central":
        tracking.log_dp_metrics({"epsilon": eps}, step=0)
    return eps


def release_facts(cfg: Config) -> dict:
    """Public facts of a release beyond privacy.PUBLIC_FACTS (where the test split comes from)."""
    return {"test split": data.test_split_fact(cfg)[1]}


def publish(cfg: Config, run_dir: Path, pl: privacy.Plan, metrics: Optional[dict] = None) -> None:
    """Refresh the release record (ledger, config, card) and send release/ files to MLflow."""
    release.record(run_dir, kind="run", ledger=pl.ledger, public_config=cfg.public_dict(), metrics=metrics,
                   extra_facts=release_facts(cfg))
    root = release.release_dir(run_dir)
    for name in (release.LEDGER_FILE, release.CONFIG_FILE, release.RECORD_FILE, release.CARD_FILE,
                 release.METRICS_FILE):
        if (root / name).is_file():
            tracking.log_artifact(root / name)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def stage_central(cfg: Config, run_dir: Path, pl: privacy.Plan, train: data.ImageSet) -> Optional[data.ImageSet]:
    """M1: the DP central images (skipped when central/ exists)."""
    from dpfeta import central

    out, tmp = run_dir / "central", run_dir / "central.tmp"
    if cfg.central.rounds == 0:
        return None
    if out.is_dir():
        log.info("central: found %s, skipping", out)
        if not (release.release_dir(run_dir) / "central").is_dir():  # interrupted before it was published
            return _publish_central(cfg, run_dir, pl, out)
        return central.load_central(out)
    if pl.ledger.get("central").taken == cfg.central.rounds:  # counted, then interrupted before the move
        if not (tmp / "central.json").is_file():
            raise ValueError(f"run directory '{run_dir}': the central query was counted in ledger.json "
                             "(its budget is spent) but its output was lost before it was written; a new "
                             "query would spend again under the same ledger: start a new run.name")
        _replace_dir(tmp, out)
        return _publish_central(cfg, run_dir, pl, out)
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    result = central.central_images(cfg, train, generator=rng.seeded_generator(cfg.run.seed, stream="central"))
    if not math.isclose(result.noise_multiplier, pl.ledger.get("central").noise_multiplier, rel_tol=1e-9):
        raise RuntimeError("internal: the central noise differs from the ledger's; nothing was recorded")
    eps = record(run_dir, pl, "central", result.rounds)  # counted before the output touches the disk
    central.save_central(result, tmp)
    _replace_dir(tmp, out)
    log.info("central: %d images released in %.1fs; epsilon so far %.4f", len(result.images),
             time.perf_counter() - start, eps)
    return _publish_central(cfg, run_dir, pl, out)


def _publish_central(cfg: Config, run_dir: Path, pl: privacy.Plan, out: Path) -> data.ImageSet:
    from dpfeta import central

    shown = release.put_dir(run_dir, out, "central")
    publish(cfg, run_dir, pl)
    tracking.log_artifact(shown / "grid.png")
    return central.load_central(out)


def _warmup_task(cfg: Config, central_set: data.ImageSet, files: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    from dpfeta import warmup

    with tempfile.TemporaryDirectory() as tmp:
        cluster.unpack(files, Path(tmp))
        summary = warmup.train_warmup(cfg, central_set, tmp, generator=rng.seeded_generator(cfg.run.seed, stream="warmup"))
        return summary, cluster.pack(Path(tmp))


def stage_warmup(cfg: Config, run_dir: Path, central_set: Optional[data.ImageSet]) -> Optional[Path]:
    """Warm-up on the central images (post-processing, no privacy cost). Returns the checkpoint dir."""
    from dpfeta import checkpoint, warmup

    if cfg.finetune.init != "warmup":
        return None
    out = run_dir / "checkpoints" / "warmup"
    ckpt = out / "checkpoint"
    if checkpoint.exists(ckpt) and checkpoint.load(ckpt)["meta"].get("step") == cfg.warmup.steps:
        log.info("warmup: found a finished checkpoint at %s, skipping", ckpt)
        return ckpt
    start = time.perf_counter()
    if cluster.needs_remote(cfg):
        files = cluster.pack(out) if out.is_dir() else {}
        summary, files = cluster.run_on_gpu(cfg, _warmup_task, cfg, central_set, files)
        cluster.unpack(files, out)
    else:
        reporter = lambda m: tracking.log_dp_metrics({f"warmup/{k}": v for k, v in m.items()}, step=m.get("step"))
        summary = warmup.train_warmup(cfg, central_set, out, reporter=reporter,
                                      generator=rng.seeded_generator(cfg.run.seed, stream="warmup"))
    log.info("warmup: done in %.1fs (loss %s)", time.perf_counter() - start, summary.get("loss"))
    return Path(summary.get("checkpoint", ckpt)) if not cluster.needs_remote(cfg) else ckpt


def stage_finetune(cfg: Config, run_dir: Path, pl: privacy.Plan, train: data.ImageSet,
                   init_dir: Optional[Path], callbacks: Optional[list] = None) -> Path:
    """M2: DP-SGD on Ray Train (fit_finetune resumes, and returns at once when done); records the
    steps taken in ledger.json. Returns the directory of the final weights. ``callbacks``: Ray Train
    callbacks (a Tune trial passes TuneReportCallback)."""
    from dpfeta import distributed

    out = run_dir / "checkpoints" / "finetune"
    start = time.perf_counter()
    summary = out / "finetune.json"
    callbacks = list(callbacks or [])
    if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == pl.steps):
        cluster.connect(cfg)  # only when there is training to do: a finished run resumes without Ray
        callbacks += distributed.mlflow_callbacks()
    result = distributed.fit_finetune(cfg, train=train, plan=pl, init_dir=init_dir, out_dir=out,
                                      callbacks=callbacks)
    steps = int(result["steps"])
    if steps != pl.ledger.get("dpsgd").taken:
        record(run_dir, pl, "dpsgd", steps)
        tracking.log_epsilon_curve(pl.ledger)
        publish(cfg, run_dir, pl)
    eps = pl.ledger.epsilon()
    log.info("finetune: %d DP-SGD steps (%.1fs); composed epsilon %.4f (fine-tune reported %.4f)", steps,
             time.perf_counter() - start, eps, float(result.get("epsilon", float("nan"))))
    return Path(result.get("checkpoint", out / "checkpoint"))




def _sample_task(cfg: Config, ckpt_files: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    from dpfeta import sample

    with tempfile.TemporaryDirectory() as tmp:
        cluster.unpack(ckpt_files, Path(tmp))
        denoiser = sample.load_denoiser(tmp, cfg, weights="ema").to(cluster.device(cfg))
    g = rng.make_generator(cfg.run.seed, stream="sample")
    images, labels = sample.generate(denoiser, cfg, cfg.sample.num_samples, generator=g)
    return images.numpy(), labels.numpy()


def stage_sample(cfg: Config, run_dir: Path, weights_dir: Path) -> data.ImageSet:
    """Synthetic set from the EMA weights (post-processing)."""
    from dpfeta import evaluate, images

    out, tmp = run_dir / "samples", run_dir / "samples.tmp"
    if (out / "samples.json").is_file():
        log.info("sample: found %s, skipping", out)
        if not (release.release_dir(run_dir) / "samples").is_dir():  # interrupted before it was published
            tracking.log_artifact(release.put_dir(run_dir, out, "samples") / "grid.png")
        return evaluate.load_synthetic(out, cfg)
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    x, y = cluster.run_on_gpu(cfg, _sample_task, cfg, cluster.pack(weights_dir))
    images.save_class_folders(x, y, tmp / "images")
    images.save_class_grid(x, y, tmp / "grid.png")
    meta = {"num": int(len(y)), "sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
            "guidance": cfg.sample.guidance, "weights": "EMA", "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    _replace_dir(tmp, out)
    log.info("sample: %d images in %.1fs -> %s", len(y), meta["seconds"], out)
    tracking.log_artifact(release.put_dir(run_dir, out, "samples") / "grid.png")
    return data.ImageSet(x, y.astype(np.int64), cfg.data.num_classes)


def _evaluate_task(cfg: Config, synthetic: data.ImageSet, splits: data.Splits) -> dict:
    from dpfeta import evaluate

    return evaluate.evaluate(cfg, synthetic, splits)


def stage_evaluate(cfg: Config, run_dir: Path, pl: privacy.Plan, synthetic: data.ImageSet,
                   splits: data.Splits) -> dict:
    """eval.json (the operator's record: DP and non-DP sections) and release/metrics.json (DP only)."""
    path = run_dir / "eval.json"
    if path.is_file():
        log.info("evaluate: found %s, skipping", path)
        return json.loads(path.read_text())
    result = {**privacy.privacy_summary(pl), **cluster.run_on_gpu(cfg, _evaluate_task, cfg, synthetic, splits)}
    result["run_dir"] = str(run_dir)
    path.write_text(json.dumps(result, indent=2) + "\n")
    tracking.log_eval(result)
    tracking.log_artifact(path)  # operator view: under nondp/ (not a release file), nothing in release mode
    return result


def release_metrics(result: dict) -> dict:
    """What release/metrics.json holds: the privacy summary and the DP metrics, nothing non-DP."""
    keys = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "seeded")
    out = {k: result[k] for k in keys if k in result}
    out.update(result.get("dp", {}))
    out.update({k: result[k] for k in ("num_synthetic", "num_test", "test_split_public") if k in result})
    if "fid" in result.get("dp", {}):
        out.update({k: result[k] for k in ("fid_kind", "fid_reference", "fid_samples", "fid_weights")})
    return out



# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: Config, *, echo: Callable[[str], None] = print) -> dict:
    """The whole pipeline for a resolved config; returns eval.json's content."""
    start = time.perf_counter()
    pl = plan_run(cfg)
    echo(budget_text(cfg, pl))
    cluster.check_reachable(cfg)  # a dead or wrong address: an error now, not after the central query
    with runlock.hold(cfg.run_dir()):  # one process per run directory (and so per ledger)
        result, uri = _run(cfg, pl)
    result["seconds"] = round(time.perf_counter() - start, 1)
    echo(summary_text(cfg, result, uri))
    return result


def _run(cfg: Config, pl: privacy.Plan) -> tuple[dict, Optional[str]]:
    run_dir = cfg.run_dir()
    _check_resume(cfg, run_dir)
    cfg.dump(run_dir / "config.json")  # noise seed redacted
    pl = open_ledger(run_dir, pl)
    tracker = tracking.start_run(cfg, run_dir, params=tracking.run_params(cfg, pl),
                                 tags={"dpfeta.method": "dp-feta" if cfg.finetune.init == "warmup" else "dpdm"})
    status = "FAILED"
    try:
        splits = data.load_splits(cfg)  # validates the data before any privacy spend
        if len(splits.train) != pl.n:
            raise ValueError(f"data: the plan used N={pl.n} (public size) but the training split has "
                             f"{len(splits.train)} records; set data.n_train to the true size")
        central_set = stage_central(cfg, run_dir, pl, splits.train)
        init_dir = stage_warmup(cfg, run_dir, central_set)
        weights = stage_finetune(cfg, run_dir, pl, splits.train, init_dir)
        synthetic = stage_sample(cfg, run_dir, weights)
        result = stage_evaluate(cfg, run_dir, pl, synthetic, splits)
        model = release.put_model(run_dir, weights)
        publish(cfg, run_dir, pl, metrics=release_metrics(result))
        for name in ("ema.pt", "meta.json"):
            tracking.log_artifact(model / name)
        status = "FINISHED"
    finally:
        tracking.end_run(status)
        cluster.shutdown()
    return result, tracker.uri if tracker else None


def summary_text(cfg: Config, result: dict, uri: Optional[str]) -> str:
    from dpfeta.evaluate import fid_label, metric

    def shown(name: str, fmt: str) -> str:
        value, is_dp = metric(result, name)
        if value is None:
            return "withheld (release mode: " + ("; ".join(result.get("withheld", [])) or "not computed") + ")"
        return format(value, fmt) + ("" if is_dp else " [non-DP: sensitive test data, not in release/]")

    logreg, _ = metric(result, "logreg_accuracy")
    lines = [
        f"dpfeta run '{cfg.run.name}' done in {result.get('seconds', 0):.0f}s",
        f"  epsilon   {result['epsilon']:.4f} spent (target {result['epsilon_target']:g}, delta {result['delta']:g}, "
        f"{result['accountant']}; composed over every mechanism)",
        f"  accuracy  {shown('accuracy', '.4f')} (reference CNN trained on {result.get('num_synthetic')} synthetic "
        f"images, tested on {result.get('num_test')} real test images)"
        + (f"; logistic regression {logreg:.4f}" if logreg is not None else ""),
        f"  FID       {shown('fid', '.2f')} [{fid_label(result)}; reference: {result.get('fid_reference')}]",
        f"  release   {release.release_dir(cfg.run_dir())}  (what may be published: README.md is its card)",
        f"  run dir   {cfg.run_dir()}  (eval.json, ledger.json, checkpoints: operator-internal)",
    ]
    if uri:
        lines.append(f"  MLflow    {tracking.ui_command(uri)}")
    return "\n".join(lines)
