"""One DP-FETA run: central images -> warm-up -> DP fine-tune -> sample -> evaluate.

Run directory ``cfg.run_dir()``: its layout and crash protocol are ``dpfeta.rundir``'s.

``run.dir`` may be an object-store URI (``s3://bucket/runs``): the run's folder is then a prefix
there, the driver writes each file to a private scratch folder and commits it (``storage.Workspace``:
a file atomically, a folder followed by its ``_COMMITTED`` marker), workers and GPU tasks read and
write the store themselves, and Ray Train keeps its checkpoints there. Nothing of the run stays on
the driver's disk.

Every stage takes the run's ``RunDir`` (``dpfeta.rundir``: the folder, the ledger, the release, the
MLflow run) and follows its protocol: skipped when its output exists (``done``), so rerunning the same
command resumes; a spending stage counts in ledger.json *before* its output touches the disk
(``spend``), so the ledger never under-reports. The privacy plan is printed before any data is read
(``runplan``); sigma is decided once, stored in ledger.json, and never recalibrated on resume.
``train_and_sample`` is the stage sequence, shared with a sweep's trial (``tune.trial``).

Where each stage runs (the Ray session, GPU tasks from a CPU head) is ``cluster``'s business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

from dpfeta import (
    central,
    checkpoint,
    cluster,
    console,
    data,
    distributed,
    evaluate,
    images,
    privacy,
    progress,
    release,
    rng,
    rundir,
    runlock,
    sample,
    tracking,
    warmup,
)
from dpfeta.config import Config
from dpfeta.rundir import RunDir
from dpfeta.runplan import budget_text, check_train_size, plan_run, resolve_config, summary_text  # noqa: F401
from dpfeta.storage import Storage, Workspace

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Stages: each takes the run's RunDir
# --------------------------------------------------------------------------------------------


def stage_central(run: RunDir, train) -> Optional[data.ImageSet]:
    """M1: the DP central images (skipped when central/ exists). ``train``: an ImageSet, or a Ray
    Dataset of the training split (the same Ray Data aggregation as ``dpfeta central``)."""
    cfg = run.cfg
    if cfg.central.rounds == 0:
        return None
    if run.done("central"):
        log.info("central: found %s, skipping", run.url("central"))
        return _publish_central(run) if not run.published("central") else central.load_central(run.path("central"))
    if run.ledger.get("central").taken == cfg.central.rounds:  # counted, then interrupted before the commit
        _check_counted_output(run)
        run.land("central")
        return _publish_central(run)
    start = time.perf_counter()
    with run.output("central") as tmp:
        with progress.stage("central", total=cfg.central.rounds, unit="round", desc="central query"):
            result = central.central_images(cfg, train, generator=rng.seeded_generator(cfg.run.seed, stream="central"))
            if not math.isclose(result.noise_multiplier, run.ledger.get("central").noise_multiplier, rel_tol=1e-9):
                raise RuntimeError("internal: the central noise differs from the ledger's; nothing was recorded")
            eps = run.spend("central", result.rounds)  # counted (and committed) before the output is written
            progress.position("central", result.rounds, eps=eps)
        central.save_central(result, tmp)
    log.info(
        "central: %d images released in %.1fs; epsilon so far %.4f",
        len(result.images),
        time.perf_counter() - start,
        eps,
    )
    return _publish_central(run)


def _check_counted_output(run: RunDir) -> None:
    """The query was counted but central/ was never committed: its output must be in the scratch folder."""
    if (run.scratch("central") / "central.json").is_file():
        return
    if run.ledger.get("central").shared:
        raise RuntimeError(
            f"'{run.url()}': the central images are a sweep's shared query (run once and "
            "counted in its ledger), but neither central/ nor the counted query's output "
            "is there; a second query under the same ledger would spend again: start a "
            "new run.name"
        )
    raise ValueError(
        f"run directory '{run.url()}': the central query was counted in ledger.json "
        "(its budget is spent) but its output was lost before it was written; a new "
        "query would spend again under the same ledger: start a new run.name"
    )


def _publish_central(run: RunDir) -> data.ImageSet:
    shown = run.publish_dir(run.path("central"), "central")
    run.publish()
    run.log_artifact(shown / "grid.png")
    return central.load_central(run.path("central"))


WARMUP_DIR = "checkpoints/warmup"
WARMUP_CKPT = f"{WARMUP_DIR}/checkpoint"


def stage_warmup(run: RunDir, central_set: Optional[data.ImageSet]) -> Optional[Storage]:
    """Warm-up on the central images (post-processing, no privacy cost). Returns where its checkpoint
    is (a location of the run's storage, read by the workers)."""
    cfg = run.cfg
    if cfg.finetune.init != "warmup":
        return None
    where = run.location(WARMUP_CKPT)
    if run.done(WARMUP_CKPT) and checkpoint.load(run.path(WARMUP_CKPT))["meta"].get("step") == cfg.warmup.steps:
        log.info("warmup: found a finished checkpoint at %s, skipping", where.uri)
        return where
    start = time.perf_counter()
    here, reporter = run.tracker if not cluster.needs_remote(cfg) else None, None  # a Ray task gets no MLflow run
    if here is not None:
        reporter = lambda m: here.log_dp_metrics({f"warmup/{k}": v for k, v in m.items()}, step=m.get("step"))
    summary = cluster.run_on_gpu(cfg, warmup.train_warmup_stored, cfg, central_set, run.location(WARMUP_DIR), reporter)
    log.info(
        "warmup: done in %.1fs (steps %d..%d, loss %s)",
        time.perf_counter() - start,
        summary.get("resumed_from", 0),
        summary.get("step", 0),
        summary.get("loss"),
    )
    return where


FINETUNE_DIR = "checkpoints/finetune"


def stage_finetune(run: RunDir, train, init: Optional[Storage], callbacks: Optional[list] = None) -> Path:
    """M2: DP-SGD on Ray Train (fit_finetune resumes, and returns at once when done); records the
    steps taken in ledger.json. Returns the local directory of the final weights (committed to the
    storage). ``callbacks``: Ray Train callbacks (a Tune trial passes TuneReportCallback)."""
    cfg, pl, rel = run.cfg, run.plan, FINETUNE_DIR
    start = time.perf_counter()
    for name in ("plan.json", "finetune.json", "ledger.json", "checkpoint"):
        run.done(f"{rel}/{name}")
    out = run.path(rel)
    summary = out / "finetune.json"
    callbacks, live = list(callbacks or []), []
    with contextlib.ExitStack() as relay:
        if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == pl.steps):
            cluster.connect(cfg)  # only when there is training to do: a finished run resumes without Ray
            live = distributed.mlflow_callbacks(run.tracker)  # rank 0's reports, epsilon included, live to MLflow
            callbacks += live + relay.enter_context(progress.train_relay("dpsgd"))
        result = distributed.fit_finetune(
            cfg, train=train, plan=pl, init_dir=init, out_dir=out, callbacks=callbacks, storage=run.remote_location(rel)
        )
    for name in ("plan.json", "checkpoint", "ledger.json", "finetune.json"):  # the summary last: "done"
        run.commit(f"{rel}/{name}")
    steps = int(result["steps"])
    run.ledger.groups = [dict(g) for g in result.get("groups", run.ledger.groups)]  # public: sizes per attempt
    if steps != run.ledger.get("dpsgd").taken:
        run.spend("dpsgd", steps)
        if not live:  # no live curve from the workers' reports: the curve from the ledger
            tracking.log_epsilon_curve(run.tracker, run.ledger)
        run.publish()
    log.info(
        "finetune: %d DP-SGD steps (%.1fs); composed epsilon %.4f (fine-tune reported %.4f)",
        steps,
        time.perf_counter() - start,
        run.ledger.epsilon(),
        float(result.get("epsilon", float("nan"))),
    )
    return out / "checkpoint"


SHARDS = "checkpoints/sample"  # one marker per finished sampling shard (operator-internal)


def stage_sample_shards(run: RunDir, weights: Storage) -> list[dict]:
    """Sample in shards of ``sample.shard_size`` balanced labels, as concurrent tasks over every GPU
    the cluster has (or one after the other here); finished shards (their marker) are skipped."""
    cfg, s = run.cfg, run.cfg.sample
    labels = sample.balanced_labels(s.num_samples, cfg.data.num_classes).numpy()
    out, marks = run.location("samples"), run.location(SHARDS)
    calls, done = [], []
    for index, start in enumerate(range(0, s.num_samples, s.shard_size)):
        if marks.is_file(f"{index:05d}.json"):
            done.append(marks.read_json(f"{index:05d}.json"))
        else:
            calls.append((cfg, weights, out, marks, index, start, labels[start : start + s.shard_size]))
    if done:
        log.info("sample: %d of %d shards already done, sampling %d", len(done), len(done) + len(calls), len(calls))
    return done + cluster.map_on_gpu(cfg, sample.sample_shard, calls)


def stage_sample(run: RunDir, weights: Path | Storage) -> data.ImageSet:
    """Synthetic set from the EMA weights (post-processing): shards written to the storage by the
    sampling tasks, then the grid and ``samples.json``, the folder committed last."""
    synthetic = None
    if not (run.done("samples") and run.path("samples/samples.json").is_file()):
        begin = time.perf_counter()
        shards = stage_sample_shards(run, run.stored(weights))
        run.pull("samples")
        synthetic = evaluate.load_synthetic(run.path("samples"), run.cfg)  # read once: the grid and the evaluation
        x, y = synthetic.images, synthetic.labels
        images.save_class_grid(x, y, run.path("samples/grid.png"))
        s = run.cfg.sample
        meta = {
            "num": int(len(y)),
            "sampler": s.sampler,
            "steps": s.steps,
            "guidance": s.guidance,
            "weights": "EMA",
            "shards": len(shards),
            "seconds": round(time.perf_counter() - begin, 1),
        }
        if len(y) != s.num_samples:
            raise RuntimeError(f"sample: expected {s.num_samples} images from {len(shards)} shards, found {len(y)}")
        run.path("samples/samples.json").write_text(json.dumps(meta, indent=2) + "\n")  # locally: "done"
        run.commit_files("samples", ("grid.png", "samples.json"))
        log.info(
            "sample: %d images in %d shards, %.1fs -> %s", len(y), len(shards), meta["seconds"], run.url("samples")
        )
    else:
        log.info("sample: found %s, skipping", run.url("samples"))
    if not run.published("samples"):  # new, or interrupted before it was published
        run.log_artifact(run.publish_dir(run.path("samples"), "samples") / "grid.png")
    return synthetic if synthetic is not None else evaluate.load_synthetic(run.path("samples"), run.cfg)


def train_and_sample(run: RunDir, train, *, callbacks: Optional[list] = None) -> tuple[Path, data.ImageSet]:
    """The stage sequence of a run and of a sweep's trial, each stage resumable: central images (M1)
    -> warm-up -> DP fine-tuning (M2) -> sampling -> the final weights into release/model.
    Returns (the final weights' local folder, the synthetic set)."""
    cfg = run.cfg
    central_set = stage_central(run, train)
    with progress.stage("warmup", total=cfg.warmup.steps, unit="step", desc="warm-up", lazy=True):
        init = stage_warmup(run, central_set)
    with progress.stage("dpsgd", total=run.plan.steps, unit="step", desc="DP-SGD", lazy=True):
        weights = stage_finetune(run, train, init, callbacks=callbacks)
    with progress.stage("sample", total=cfg.sample.num_samples, unit="img", desc="sampling", lazy=True):
        synthetic = stage_sample(run, weights)
    run.publish_model(weights)
    return weights, synthetic


def _evaluate_task(cfg: Config, synthetic: data.ImageSet, splits: Optional[data.Splits]) -> dict:
    """Where a GPU is (or here). ``splits`` None: a prepared folder, whose validation and test parts
    the task reads itself (the driver never holds them)."""
    return evaluate.evaluate(cfg, synthetic, splits if splits is not None else data.load_prepared_eval(cfg))


def stage_evaluate(run: RunDir, synthetic: data.ImageSet, splits: Optional[data.Splits]) -> dict:
    """eval.json (the operator's record: DP and non-DP sections) and release/metrics.json (DP only)."""
    if run.done("eval.json"):
        log.info("evaluate: found %s, skipping", run.url("eval.json"))
        return json.loads(run.path("eval.json").read_text())
    result = {
        **privacy.privacy_summary(run.plan),
        **cluster.run_on_gpu(run.cfg, _evaluate_task, run.cfg, synthetic, splits),
    }
    result["run_dir"] = run.url()
    with run.output("eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    tracking.log_eval(run.tracker, result)
    run.log_artifact(run.path("eval.json"))  # operator view: under nondp/ (not a release file), nothing in release mode
    return result


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: Config, *, echo: Callable[[str], None] = print) -> dict:
    """The whole pipeline for a resolved config; returns eval.json's content."""
    start = time.perf_counter()
    pl = plan_run(cfg)
    echo(budget_text(cfg, pl))
    cluster.check_reachable(cfg)  # a dead or wrong address: an error now, not after the central query
    ws = Workspace(cfg.run_location())
    try:
        if ws.is_remote:
            ws.remote.check_writable()  # a missing bucket, no permission, no endpoint: an error now
        say = (lambda text: None) if console.quiet() else echo
        say(f"run '{cfg.run.name}': writing to {ws.url()}")
        with runlock.hold(ws.remote), rundir.log_file(ws):  # one process per run directory (and so per ledger)
            result, uri = _run(cfg, pl, ws, say)
    finally:
        ws.close()
    result["seconds"] = round(time.perf_counter() - start, 1)
    echo(summary_text(cfg, result, uri))
    return result


def read_data(cfg: Config, pl: privacy.Plan):
    """(training data, splits for the evaluation or None), validated before any budget is spent.

    A folder written by ``dpfeta prepare`` (``data.source: parquet``) stays where it is: the driver
    reads its ``meta.json`` only; the central query and the DP-SGD workers read the training shards
    with Ray Data on the cluster, and the evaluation task reads the validation and test parts itself.
    Any other source is read, validated and split here (and its training split shipped to Ray).
    """
    meta = data.prepared_meta(cfg.data.path) if cfg.data.source == "parquet" and cfg.data.path else None
    if meta is not None:
        data.check_prepared(cfg, meta)
        n = int(meta["sizes"]["train"])
        check_train_size(pl.n, n, f"'{cfg.data.path}/meta.json' says the training split")
        cluster.connect(cfg)
        log.info("data: the prepared training split at %s (N=%d) is read on the cluster by Ray Data", cfg.data.path, n)
        return data.read_prepared(cfg.data.path, "train"), None
    splits = data.load_splits(cfg)
    check_train_size(pl.n, len(splits.train))
    return splits.train, splits


def _run(
    cfg: Config, pl: privacy.Plan, ws: Workspace, say: Callable[[str], None] = lambda text: None
) -> tuple[dict, Optional[str]]:
    run = RunDir.open(cfg, pl, ws=ws, tags={"dpfeta.method": "dp-feta" if cfg.finetune.init == "warmup" else "dpdm"})
    tracker = run.tracker
    if tracker is not None:
        tracker.set_tags(tracking.code_version_tags())
        say(f"MLflow: {tracking.run_link(tracker)}")
    say(f"log: {ws.url(console.LOG_FILE)} (Ray's and the libraries' output; --verbose shows it here)")
    status = "FAILED"
    try:
        train, splits = read_data(cfg, run.plan)  # validates the data before any privacy spend
        weights, synthetic = train_and_sample(run, train)
        result = stage_evaluate(run, synthetic, splits)
        run.publish(metrics=release.public_metrics(result))
        _log_model(run)
        if tracker is not None:
            tracker.set_tags({"mlflow.note.content": tracking.run_description(result)})
        status = "FINISHED"
    finally:
        run.log_artifact(ws.path(console.LOG_FILE), "logs")  # operator view: nondp/logs (none in release mode)
        run.close(status)
        cluster.shutdown()
    return result, tracker.uri if tracker else None


def _log_model(run: RunDir) -> None:
    """The release weights to MLflow: the files, and the pyfunc model (``mlflow_model``)."""
    if run.tracker is None:
        return
    from dpfeta import mlflow_model  # loads MLflow: only for a run that logs

    model = release.release_dir(run.ws.local) / "model"
    for name in ("ema.pt", "meta.json"):
        run.log_artifact(model / name)
    mlflow_model.log_release_model(run.tracker, run.cfg.tracking.register_as)
