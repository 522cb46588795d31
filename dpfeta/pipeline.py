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

``run.dir`` may be an object-store URI (``s3://bucket/runs``): the run's folder is then a prefix
there, the driver writes each file to a private scratch folder and commits it (``storage.Workspace``:
a file atomically, a folder followed by its ``_COMMITTED`` marker), workers and GPU tasks read and
write the store themselves, and Ray Train keeps its checkpoints there. Nothing of the run stays on
the driver's disk.

Every stage is skipped when its output exists, so rerunning the same command resumes. The privacy
plan is printed before any data is read; sigma is decided once, stored in ledger.json, and never
recalibrated on resume (a stored plan above the target is refused). A spending stage is recorded in
ledger.json *before* its output touches the disk, so the ledger never under-reports.

Where each stage runs (the Ray session, GPU tasks from a CPU head) is ``cluster``'s business.
"""

from __future__ import annotations

import contextlib
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
from dpfeta import cluster, console, data, privacy, progress, release, rng, runlock, storage, tracking
from dpfeta.config import Config
from dpfeta.storage import Storage, Workspace

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


def _check_resume(cfg: Config, ws: Workspace | Path) -> None:
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if not ws.fetch("config.json"):
        return
    saved_path, run_dir = ws.path("config.json"), ws.url()
    saved, now = json.loads(saved_path.read_text()), cfg.to_dict()
    changed = [f"{s}.{k}" for s in RESUME_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    if changed:
        raise ValueError(f"run directory '{run_dir}' was started with a different config ({', '.join(changed[:6])}"
                         f"{' ...' if len(changed) > 6 else ''}); rerun with the same config to resume, "
                         f"or pick a new run.name")


def open_ledger(ws: Workspace | Path, pl: privacy.Plan) -> privacy.Plan:
    """Load ledger.json (resume: its sigma is kept, never recalibrated) or write the planned one.

    Refuses a stored ledger of another plan, and a stored plan whose epsilon (recomputed now) is
    above the target (e.g. after an accountant upgrade): continuing it would end above the target.
    """
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    path = ws.path("ledger.json")
    if not ws.fetch("ledger.json"):
        pl.ledger.save(path)
        ws.commit("ledger.json")
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


def record(ws: Workspace, pl: privacy.Plan, name: str, count: int) -> float:
    """Record ``count`` compositions of mechanism ``name`` taken; save and commit ledger.json (a failed
    commit raises here, before the mechanism's output is written); return the total epsilon."""
    pl.ledger.record_steps(name, count)
    pl.ledger.save(ws.path("ledger.json"))
    ws.commit("ledger.json")
    eps = pl.ledger.epsilon()
    if name == "central":
        tracking.log_dp_metrics({"epsilon": eps}, step=0)
    return eps


def release_facts(cfg: Config) -> dict:
    """Public facts of a release beyond privacy.PUBLIC_FACTS (where the test split comes from)."""
    return {"test split": data.test_split_fact(cfg)[1]}


def publish(cfg: Config, ws: Workspace, pl: privacy.Plan, metrics: Optional[dict] = None) -> None:
    """Refresh the release record (ledger, config, card), commit it and send release/ files to MLflow."""
    run_dir = ws.local
    release.record(run_dir, kind="run", ledger=pl.ledger, public_config=cfg.public_dict(), metrics=metrics,
                   extra_facts=release_facts(cfg))
    root = release.release_dir(run_dir)
    for name in (release.LEDGER_FILE, release.CONFIG_FILE, release.RECORD_FILE, release.CARD_FILE,
                 release.METRICS_FILE):
        if (root / name).is_file():
            ws.commit(f"{release.RELEASE_DIR}/{name}")
            tracking.log_artifact(root / name)
    if (root / "model" / "meta.json").is_file():  # restated by the record (the release's epsilon and ledger)
        ws.commit(f"{release.RELEASE_DIR}/model/meta.json")


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _put_release_dir(ws: Workspace, src: Path, name: str) -> Path:
    """Copy a stage's folder into release/<name> and commit it."""
    shown = release.put_dir(ws.local, src, name)
    ws.commit(f"{release.RELEASE_DIR}/{name}")
    return shown


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def stage_central(cfg: Config, ws: Workspace, pl: privacy.Plan, train) -> Optional[data.ImageSet]:
    """M1: the DP central images (skipped when central/ exists). ``train``: an ImageSet, or a Ray
    Dataset of the training split (the same Ray Data aggregation as ``dpfeta central``)."""
    from dpfeta import central

    out, tmp = ws.path("central"), ws.path("central.tmp")
    if cfg.central.rounds == 0:
        return None
    if ws.fetch("central"):
        log.info("central: found %s, skipping", ws.url("central"))
        if not ws.fetch(f"{release.RELEASE_DIR}/central"):  # interrupted before it was published
            return _publish_central(cfg, ws, pl, out)
        return central.load_central(out)
    mech = pl.ledger.get("central")
    if mech.taken == cfg.central.rounds:  # counted, then interrupted before the commit
        if not (tmp / "central.json").is_file():
            if mech.shared:
                raise RuntimeError(f"'{ws.url()}': the central images are a sweep's shared query (run once and "
                                   "counted in its ledger), but neither central/ nor the counted query's output "
                                   "is there; a second query under the same ledger would spend again: start a "
                                   "new run.name")
            raise ValueError(f"run directory '{ws.url()}': the central query was counted in ledger.json "
                             "(its budget is spent) but its output was lost before it was written; a new "
                             "query would spend again under the same ledger: start a new run.name")
        _replace_dir(tmp, out)
        ws.commit("central")
        return _publish_central(cfg, ws, pl, out)
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    with progress.stage("central", total=cfg.central.rounds, unit="round", desc="central query"):
        result = central.central_images(cfg, train, generator=rng.seeded_generator(cfg.run.seed, stream="central"))
        if not math.isclose(result.noise_multiplier, pl.ledger.get("central").noise_multiplier, rel_tol=1e-9):
            raise RuntimeError("internal: the central noise differs from the ledger's; nothing was recorded")
        eps = record(ws, pl, "central", result.rounds)  # counted (and committed) before the output is written
        progress.position("central", result.rounds, eps=eps)
    central.save_central(result, tmp)
    _replace_dir(tmp, out)
    ws.commit("central")
    log.info("central: %d images released in %.1fs; epsilon so far %.4f", len(result.images),
             time.perf_counter() - start, eps)
    return _publish_central(cfg, ws, pl, out)


def _publish_central(cfg: Config, ws: Workspace, pl: privacy.Plan, out: Path) -> data.ImageSet:
    from dpfeta import central

    shown = _put_release_dir(ws, out, "central")
    publish(cfg, ws, pl)
    tracking.log_artifact(shown / "grid.png")
    return central.load_central(out)


WARMUP_DIR = "checkpoints/warmup"
WARMUP_CKPT = f"{WARMUP_DIR}/checkpoint"
LATEST = "latest.json"


def _node_id() -> Optional[str]:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _warmup_task(cfg: Config, central_set: data.ImageSet, out: Storage, report: bool = False) -> dict:
    """The warm-up, where a GPU is (a Ray task) or here. On an object store every periodic checkpoint
    (``warmup.checkpoint_every``) is committed as ``step-<n>/`` and named by ``latest.json``, and a
    task restarted on another node (a lost node: Ray retries it) resumes from there, not from step 0;
    the final checkpoint is committed as ``checkpoint/``, where the DP-SGD workers read it."""
    from dpfeta import warmup

    with tempfile.TemporaryDirectory(prefix="dpfeta-warmup-") as tmp:
        local, on_checkpoint = out.local_path, None
        if local is None:
            local = Path(tmp)
            if out.is_file(LATEST):
                out.get_dir(out.read_json(LATEST)["dir"], local / "checkpoint")

            def on_checkpoint(ckpt_dir: Path, step: int) -> None:
                rel = f"step-{step:08d}"
                previous = out.read_json(LATEST)["dir"] if out.is_file(LATEST) else None
                out.put_dir(ckpt_dir, rel)
                out.write_json(LATEST, {"step": step, "dir": rel, "node": _node_id()})  # the switch: one atomic object
                if previous not in (None, rel):
                    out.delete(previous)

        reporter = None
        if report:
            reporter = lambda m: tracking.log_dp_metrics({f"warmup/{k}": v for k, v in m.items()}, step=m.get("step"))
        summary = warmup.train_warmup(cfg, central_set, local, reporter=reporter, on_checkpoint=on_checkpoint,
                                      generator=rng.seeded_generator(cfg.run.seed, stream="warmup"))
        if out.local_path is None:
            out.put_dir(local / "checkpoint", "checkpoint")
        return {k: v for k, v in summary.items() if k != "checkpoint"}


def stage_warmup(cfg: Config, ws: Workspace, central_set: Optional[data.ImageSet]) -> Optional[Storage]:
    """Warm-up on the central images (post-processing, no privacy cost). Returns where its checkpoint
    is (a location of the run's storage, read by the workers)."""
    from dpfeta import checkpoint

    if cfg.finetune.init != "warmup":
        return None
    where = ws.remote.child(WARMUP_CKPT)
    if ws.fetch(WARMUP_CKPT) and checkpoint.load(ws.path(WARMUP_CKPT))["meta"].get("step") == cfg.warmup.steps:
        log.info("warmup: found a finished checkpoint at %s, skipping", where.uri)
        return where
    start = time.perf_counter()
    summary = cluster.run_on_gpu(cfg, _warmup_task, cfg, central_set, ws.remote.child(WARMUP_DIR),
                                 not cluster.needs_remote(cfg))
    log.info("warmup: done in %.1fs (steps %d..%d, loss %s)", time.perf_counter() - start,
             summary.get("resumed_from", 0), summary.get("step", 0), summary.get("loss"))
    return where


def stage_finetune(cfg: Config, ws: Workspace, pl: privacy.Plan, train,
                   init: Optional[Storage], callbacks: Optional[list] = None) -> Path:
    """M2: DP-SGD on Ray Train (fit_finetune resumes, and returns at once when done); records the
    steps taken in ledger.json. Returns the local directory of the final weights (committed to the
    storage). ``callbacks``: Ray Train callbacks (a Tune trial passes TuneReportCallback)."""
    from dpfeta import distributed

    rel = "checkpoints/finetune"
    start = time.perf_counter()
    for name in ("plan.json", "finetune.json", "ledger.json", "checkpoint"):
        ws.fetch(f"{rel}/{name}")
    out = ws.path(rel)
    summary = out / "finetune.json"
    callbacks, live = list(callbacks or []), []
    with contextlib.ExitStack() as relay:
        if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == pl.steps):
            cluster.connect(cfg)  # only when there is training to do: a finished run resumes without Ray
            live = distributed.mlflow_callbacks()  # rank 0's reports, epsilon included, live to MLflow
            callbacks += live + relay.enter_context(progress.train_relay("dpsgd"))
        result = distributed.fit_finetune(cfg, train=train, plan=pl, init_dir=init, out_dir=out, callbacks=callbacks,
                                          storage=ws.remote.child(rel) if ws.is_remote else None)
    for name in ("plan.json", "checkpoint", "ledger.json", "finetune.json"):  # the summary last: "done"
        ws.commit(f"{rel}/{name}")
    steps = int(result["steps"])
    pl.ledger.groups = [dict(g) for g in result.get("groups", pl.ledger.groups)]  # public: sizes per attempt
    if steps != pl.ledger.get("dpsgd").taken:
        record(ws, pl, "dpsgd", steps)
        if not live:  # no live curve from the workers' reports: the curve from the ledger
            tracking.log_epsilon_curve(pl.ledger)
        publish(cfg, ws, pl)
    eps = pl.ledger.epsilon()
    log.info("finetune: %d DP-SGD steps (%.1fs); composed epsilon %.4f (fine-tune reported %.4f)", steps,
             time.perf_counter() - start, eps, float(result.get("epsilon", float("nan"))))
    return out / "checkpoint"


SHARDS = "checkpoints/sample"  # one marker per finished sampling shard (operator-internal)


def _sample_shard(cfg: Config, weights: Storage, out: Storage, marks: Storage, index: int, start: int,
                  labels: np.ndarray) -> dict:
    """One sampling shard, where a GPU is (a Ray task) or here: read the EMA weights from the storage,
    write ``images/<label>/<start+i>.png`` to ``out`` (each file atomically), then the shard's marker.
    A shard redone after a lost node rewrites the same names."""
    from dpfeta import images, sample

    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpfeta-sample-") as tmp:
        src = weights.local_path
        if src is None:
            src = Path(tmp) / "weights"
            weights.get_dir("", src)
        denoiser = sample.load_denoiser(src, cfg, weights="ema").to(cluster.device(cfg))
        g = rng.make_generator(cfg.run.seed, stream="sample", rank=index)
        x, y = sample.generate(denoiser, cfg, len(labels), generator=g, labels=torch_labels(labels))
        staged = out.local_path if out.is_local else Path(tmp) / "samples"
        images.save_class_folders(x, y, staged / "images", start=start)
        if not out.is_local:
            for path in sorted((staged / "images").rglob("*.png")):
                out.write_bytes(path.relative_to(staged).as_posix(), path.read_bytes())
    meta = {"index": index, "start": start, "num": int(len(labels)), "seconds": round(time.perf_counter() - begin, 1),
            "node": _node_id()}
    marks.write_json(f"{index:05d}.json", meta)
    return meta


def torch_labels(labels: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(labels, np.int64))


def stage_sample_shards(cfg: Config, ws: Workspace, weights: Storage) -> list[dict]:
    """Sample in shards of ``sample.shard_size`` balanced labels, as concurrent tasks over every GPU
    the cluster has (or one after the other here); finished shards (their marker) are skipped."""
    from dpfeta import sample

    s = cfg.sample
    labels = sample.balanced_labels(s.num_samples, cfg.data.num_classes).numpy()
    out, marks = ws.remote.child("samples"), ws.remote.child(SHARDS)
    calls, done = [], []
    for index, start in enumerate(range(0, s.num_samples, s.shard_size)):
        if marks.is_file(f"{index:05d}.json"):
            done.append(marks.read_json(f"{index:05d}.json"))
        else:
            calls.append((cfg, weights, out, marks, index, start, labels[start:start + s.shard_size]))
    if done:
        log.info("sample: %d of %d shards already done, sampling %d", len(done), len(done) + len(calls), len(calls))
    return done + cluster.map_on_gpu(cfg, _sample_shard, calls)


def _stored(ws: Workspace, path: Path | Storage) -> Storage:
    """A folder of the run as a storage location a task can read (committed first if need be)."""
    if isinstance(path, Storage):
        return path
    if not ws.is_remote:
        return Storage(path)
    rel = Path(path).resolve().relative_to(ws.local.resolve()).as_posix()
    if not ws.remote.committed(rel):
        ws.commit(rel)
    return ws.remote.child(rel)


def stage_sample(cfg: Config, ws: Workspace, weights: Path | Storage) -> data.ImageSet:
    """Synthetic set from the EMA weights (post-processing): shards written to the storage by the
    sampling tasks, then the grid and ``samples.json``, the folder committed last."""
    from dpfeta import evaluate, images

    synthetic = None
    if not (ws.fetch("samples") and ws.path("samples/samples.json").is_file()):
        begin = time.perf_counter()
        shards = stage_sample_shards(cfg, ws, _stored(ws, weights))
        if ws.is_remote:
            ws.remote.get_files("samples", ws.path("samples"))
        synthetic = evaluate.load_synthetic(ws.path("samples"), cfg)  # read once: the grid and the evaluation
        x, y = synthetic.images, synthetic.labels
        images.save_class_grid(x, y, ws.path("samples/grid.png"))
        s = cfg.sample
        meta = {"num": int(len(y)), "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "weights": "EMA",
                "shards": len(shards), "seconds": round(time.perf_counter() - begin, 1)}
        if len(y) != s.num_samples:
            raise RuntimeError(f"sample: expected {s.num_samples} images from {len(shards)} shards, found {len(y)}")
        ws.path("samples/samples.json").write_text(json.dumps(meta, indent=2) + "\n")  # locally: "done"
        if ws.is_remote:
            for name in ("grid.png", "samples.json"):
                ws.remote.write_bytes(f"samples/{name}", ws.path(f"samples/{name}").read_bytes())
            ws.remote.mark_committed("samples")
        log.info("sample: %d images in %d shards, %.1fs -> %s", len(y), len(shards), meta["seconds"], ws.url("samples"))
    else:
        log.info("sample: found %s, skipping", ws.url("samples"))
    if not ws.fetch(f"{release.RELEASE_DIR}/samples"):  # new, or interrupted before it was published
        tracking.log_artifact(_put_release_dir(ws, ws.path("samples"), "samples") / "grid.png")
    return synthetic if synthetic is not None else evaluate.load_synthetic(ws.path("samples"), cfg)


def _evaluate_task(cfg: Config, synthetic: data.ImageSet, splits: Optional[data.Splits]) -> dict:
    """Where a GPU is (or here). ``splits`` None: a prepared folder, whose validation and test parts
    the task reads itself (the driver never holds them)."""
    from dpfeta import evaluate

    return evaluate.evaluate(cfg, synthetic, splits if splits is not None else data.load_prepared_eval(cfg))


def stage_evaluate(cfg: Config, ws: Workspace, pl: privacy.Plan, synthetic: data.ImageSet,
                   splits: Optional[data.Splits]) -> dict:
    """eval.json (the operator's record: DP and non-DP sections) and release/metrics.json (DP only)."""
    path = ws.path("eval.json")
    if ws.fetch("eval.json"):
        log.info("evaluate: found %s, skipping", ws.url("eval.json"))
        return json.loads(path.read_text())
    result = {**privacy.privacy_summary(pl), **cluster.run_on_gpu(cfg, _evaluate_task, cfg, synthetic, splits)}
    result["run_dir"] = ws.url()
    path.write_text(json.dumps(result, indent=2) + "\n")
    ws.commit("eval.json")
    tracking.log_eval(result)
    tracking.log_artifact(path)  # operator view: under nondp/ (not a release file), nothing in release mode
    return result


def put_model(ws: Workspace, weights: Path) -> Path:
    """The final weights into release/model, committed."""
    model = release.put_model(ws.local, weights)
    ws.commit(f"{release.RELEASE_DIR}/model")
    return model


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
    ws = Workspace(cfg.run_location())
    try:
        if ws.is_remote:
            ws.remote.check_writable()  # a missing bucket, no permission, no endpoint: an error now
        say = (lambda text: None) if console.quiet() else echo
        say(f"run '{cfg.run.name}': writing to {ws.url()}")
        with runlock.hold(ws.remote), _log_file(ws):  # one process per run directory (and so per ledger)
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
        if n != pl.n:
            raise ValueError(f"data: the plan used N={pl.n} (public size) but '{cfg.data.path}/meta.json' "
                             f"says the training split has {n} records; set data.n_train to the true size")
        cluster.connect(cfg)
        log.info("data: the prepared training split at %s (N=%d) is read on the cluster by Ray Data",
                 cfg.data.path, n)
        return data.read_prepared(cfg.data.path, "train"), None
    splits = data.load_splits(cfg)
    if len(splits.train) != pl.n:
        raise ValueError(f"data: the plan used N={pl.n} (public size) but the training split has "
                         f"{len(splits.train)} records; set data.n_train to the true size")
    return splits.train, splits


@contextlib.contextmanager
def _log_file(ws: Workspace):
    """``<run dir>/logs/dpfeta.log`` (appended on resume), committed at the end of the run."""
    ws.fetch(console.LOG_FILE)
    try:
        with console.log_file(ws.path(console.LOG_FILE)):
            yield
    finally:
        try:
            ws.commit(console.LOG_FILE)
        except storage.StorageError as exc:
            log.warning("could not commit the run's log %s (%s)", ws.url(console.LOG_FILE), exc)


def _run(cfg: Config, pl: privacy.Plan, ws: Workspace,
         say: Callable[[str], None] = lambda text: None) -> tuple[dict, Optional[str]]:
    _check_resume(cfg, ws)
    cfg.dump(ws.path("config.json"))  # noise seed redacted
    ws.commit("config.json")
    pl = open_ledger(ws, pl)
    ws.fetch(tracking.RUN_FILE)
    tracker = tracking.start_run(cfg, ws.local, params=tracking.run_params(cfg, pl),
                                 tags={"dpfeta.method": "dp-feta" if cfg.finetune.init == "warmup" else "dpdm"})
    if tracker is not None and ws.path(tracking.RUN_FILE).is_file():
        ws.commit(tracking.RUN_FILE)
    if tracker is not None:
        tracker.set_tags(tracking.code_version_tags())
        say(f"MLflow: {tracking.run_link(tracker)}")
    say(f"log: {ws.url(console.LOG_FILE)} (Ray's and the libraries' output; --verbose shows it here)")
    status = "FAILED"
    try:
        train, splits = read_data(cfg, pl)  # validates the data before any privacy spend
        central_set = stage_central(cfg, ws, pl, train)
        with progress.stage("warmup", total=cfg.warmup.steps, unit="step", desc="warm-up", lazy=True):
            init = stage_warmup(cfg, ws, central_set)
        with progress.stage("dpsgd", total=pl.steps, unit="step", desc="DP-SGD", lazy=True):
            weights = stage_finetune(cfg, ws, pl, train, init)
        with progress.stage("sample", total=cfg.sample.num_samples, unit="img", desc="sampling", lazy=True):
            synthetic = stage_sample(cfg, ws, weights)
        result = stage_evaluate(cfg, ws, pl, synthetic, splits)
        model = put_model(ws, weights)
        publish(cfg, ws, pl, metrics=release_metrics(result))
        for name in ("ema.pt", "meta.json"):
            tracking.log_artifact(model / name)
        tracking.log_release_model(cfg.tracking.register_as)  # the release weights as an MLflow model
        tracking.describe_run(result)
        status = "FINISHED"
    finally:
        tracking.log_artifact(ws.path(console.LOG_FILE), "logs")  # operator view: nondp/logs (none in release mode)
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
        f"  release   {Storage(cfg.run_location()).url(release.RELEASE_DIR)}  (what may be published: README.md is its card)",
        f"  run dir   {cfg.run_location()}  (eval.json, ledger.json, checkpoints: operator-internal)",
    ]
    if uri:
        lines.append(f"  MLflow    {tracking.ui_command(uri)}")
    return "\n".join(lines)
