"""DP-SGD fine-tuning on Ray Train V2: disjoint shards, lock-step workers, resume to exactly T.

``fit_finetune`` is the driver. It stores the plan once (``plan.json``: sigma is never
recalibrated), turns the training split into a materialised Ray Dataset and launches a
``TorchTrainer`` whose workers each read a disjoint shard (``ExactSplit``: every record in exactly
one shard, nothing dropped) and run ``finetune.train_finetune``. Rank 0 reports metrics and
checkpoints through ``ray.train.report``; every rank reports the same number of times. After a
worker failure or an elastic resize, Ray restarts the group and every worker resumes from the
latest checkpoint (model, EMA, optimiser, step, ledger, sigma), re-reading its shard for the new
group size; shards may differ between attempts, which Poisson sampling allows at every step.

Resume = rerun: the same ``out_dir`` gives the same ``RunConfig(name, storage_path)``, so Ray
restores its checkpoint history and the run continues; a finished run returns at once.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from ray.train import DataConfig

from dpfeta import checkpoint, cluster, data, finetune, privacy, tracking
from dpfeta.config import Config
from dpfeta.storage import Storage

logger = logging.getLogger(__name__)

FAULT_MARKER = "fault_injected"


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


class ExactSplit(DataConfig):
    """``DataConfig`` whose split datasets use ``streaming_split(equal=False)``.

    Ray's default ``equal=True`` drops up to W-1 rows to even the shards, in a data-dependent way
    (docs/privacy.md §4); here every record goes to exactly one worker. Datasets not split are handed
    whole to every worker, as in Ray.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in split:
                for rank, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = it
            else:
                for rank in range(world_size):
                    output[rank][name] = ds.iterator()
        return output


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _ray_reporter(rank: int) -> finetune.Reporter:
    import ray.train

    def report(metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        name = f"step_{metrics['step']:08d}" if ckpt is not None else None
        ray.train.report(metrics, checkpoint=ckpt if rank == 0 else None, checkpoint_dir_name=name)

    return report


def _fault(fail_at_step: Optional[int], marker: Path, rank: int, world_size: int):
    """Test hook: the last rank raises once, at ``fail_at_step``, in the first attempt that gets there."""
    if fail_at_step is None:
        return None

    def before_step(step: int) -> None:
        if step == fail_at_step and rank == world_size - 1 and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")

    return before_step


def _hooks(fault, hook, rank: int, world_size: int):
    """The fault hook and a test's ``before_step(step, rank, world_size)``, as one ``before_step(step)``."""
    if fault is None and hook is None:
        return None

    def before_step(step: int) -> None:
        if hook is not None:
            hook(step, rank, world_size)
        if fault is not None:
            fault(step)

    return before_step


def _check_cover(shard_size: int, n: int, device: torch.device) -> None:
    """The shards must hold N records in total, the N the accountant was given."""
    import torch.distributed as dist

    total = torch.tensor([shard_size], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if int(total) != n:
        raise ValueError(
            f"expected the worker shards to cover the N={n} training records of the plan, found {int(total)}"
        )


@contextmanager
def _local_init(init: Optional[Storage]):
    """The warm-up checkpoint as a local folder on this worker: read from the run's storage (an
    object store: downloaded to a temporary folder), never from a path of the driver's disk."""
    if init is None or init.is_local:
        yield None if init is None else str(init.local_path)
        return
    with tempfile.TemporaryDirectory(prefix="dpfeta-init-") as tmp:
        init.get_dir("", tmp)
        yield tmp


def _count_nodes(world_size: int) -> int:
    """How many distinct Ray nodes the worker group spans (one all-gather, once per attempt)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * world_size
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    plan: privacy.Plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    d = cfg.data
    shard = data.materialize_shard(
        ray.train.get_dataset_shard("train"),
        num_classes=d.num_classes,
        image_shape=(d.channels, d.resolution, d.resolution),
    )
    _check_cover(len(shard), plan.n, device)
    latest = ray.train.get_checkpoint()
    with (
        latest.as_directory() if latest is not None else nullcontext(None) as resume_dir,
        _local_init(config["init"]) as init_dir,
    ):
        finetune.train_finetune(
            cfg,
            shard,
            plan=plan,
            init_dir=init_dir,
            resume_dir=resume_dir,
            reporter=_ray_reporter(rank),
            worker=finetune.Worker(rank, world_size, str(device), _count_nodes(world_size)),
            task=config["task"],
            before_step=_hooks(
                _fault(config["fail_at_step"], Path(config["fault_marker"]), rank, world_size),
                config.get("before_step"),
                rank,
                world_size,
            ),
        )


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _store_plan(plan: privacy.Plan, path: Path) -> None:
    """Write the plan once; a rerun must bring the same sigma, q, T and N (``privacy.check_resume``)."""
    if path.is_file():
        privacy.check_resume(json.loads(path.read_text()), plan, where=f"'{path}'")
        return
    path.write_text(json.dumps(privacy.plan_json(plan), indent=2) + "\n")


def _trainer(
    cfg: Config,
    config: dict[str, Any],
    dataset,
    out_dir: Path,
    callbacks: Optional[list] = None,
    storage: Optional[Storage] = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.run
    return TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker={"CPU": r.cpus_per_worker, **r.worker_resources},
            placement_strategy=r.placement,
            elastic_resize_monitor_interval_s=r.resize_interval_s,
        ),
        run_config=RunConfig(
            name=f"{r.name}-finetune",
            storage_path=storage.fs_path("ray") if storage is not None else str(out_dir / "ray"),
            storage_filesystem=storage.filesystem if storage is not None else None,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
        datasets={"train": dataset},
        dataset_config=ExactSplit(datasets_to_split=["train"]),
    )


def fit_finetune(
    cfg: Config,
    *,
    train: Any,
    plan: privacy.Plan,
    init_dir: Path | str | None,
    out_dir: Path | str,
    fail_at_step: Optional[int] = None,
    task: finetune.Task = finetune.EDM,
    callbacks: Optional[list] = None,
    storage: Optional[Storage] = None,
    before_step: Optional[Callable[[int, int, int], None]] = None,
) -> dict[str, Any]:
    """Run DP-SGD fine-tuning on Ray Train; returns the final metrics (``epsilon``, ``steps``, ...).

    ``train``: the training split as an ``ImageSet`` or a Ray Dataset (columns image, label).
    ``init_dir``: the warm-up output or its checkpoint (DP-FETA), or None (from scratch: the DPDM
    baseline; refused with an ``init_dir`` when ``finetune.init=scratch``).
    Writes ``out_dir/checkpoint`` (raw and EMA weights, optimiser, meta with the ledger),
    ``out_dir/ledger.json``, ``out_dir/plan.json`` and ``out_dir/finetune.json``.
    ``fail_at_step`` (tests): the last rank raises once at that step. ``task``: tests swap the model.
    ``before_step(step, rank, world_size)`` (tests): called on every rank before every step.
    ``callbacks``: Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` inside a trial.
    ``init_dir`` may be a ``Storage`` location (the workers read it from there). ``storage``: an
    object-store location for Ray Train's checkpoints (``out_dir`` is then the driver's scratch copy
    of the small files; the caller commits them), so that no worker needs the driver's disk.
    """
    if cfg.finetune.init == "scratch" and init_dir is not None:
        raise ValueError(
            f"config key 'finetune.init': 'scratch' trains from a fresh network, got "
            f"init_dir={str(init_dir)!r}; set finetune.init=warmup to start from it"
        )
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "checkpoint"
    summary_path = out_dir / "finetune.json"
    _store_plan(plan, out_dir / "plan.json")
    if summary_path.is_file() and checkpoint.exists(final):
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == plan.steps:
            logger.info("finetune: '%s' already holds the final checkpoint (step %d)", out_dir, plan.steps)
            return summary
    if isinstance(init_dir, Storage) and init_dir.is_local:
        init_dir = init_dir.local_path
    if init_dir is not None and not isinstance(init_dir, Storage):
        init_dir = Storage(checkpoint.find(Path(init_dir).expanduser().resolve()))
    if init_dir is not None and not init_dir.is_local and not init_dir.committed(""):
        raise ValueError(f"expected a committed warm-up checkpoint at '{init_dir.uri}', found none")
    logger.info("finetune: starting from %s", init_dir.uri if init_dir else "scratch (DPDM baseline)")
    if init_dir is None and any(m.name == "central" for m in plan.ledger.mechanisms):
        logger.warning(
            "finetune from scratch with central.rounds=%d: the central query's budget is counted "
            "but its images are unused (central.rounds=0 gives DP-SGD the whole budget)",
            cfg.central.rounds,
        )

    cluster.connect(cfg)
    dataset = (data.to_ray_dataset(train) if isinstance(train, data.ImageSet) else train).materialize()
    config = {
        "cfg": cfg,
        "plan": plan,
        "init": init_dir,
        "task": task,
        "fail_at_step": fail_at_step,
        "fault_marker": str(out_dir / FAULT_MARKER),
        "before_step": before_step,
    }
    result = _trainer(cfg, config, dataset, out_dir, callbacks, storage).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune: Ray Train returned no checkpoint (error: {result.error})")

    # Copy the final checkpoint out of Ray's storage; write the ledger and the summary.
    with result.checkpoint.as_directory() as last:
        state = checkpoint.load(last)
    meta = state["meta"]
    if meta["step"] != plan.steps:
        raise RuntimeError(f"finetune: the last checkpoint is at step {meta['step']}, expected T={plan.steps}")
    checkpoint.save(final, model=state["model"], ema=state["ema"], optimizer=state["optimizer"], meta=meta)
    ledger = privacy.Ledger.from_state_dict(meta["ledger"])
    ledger.save(out_dir / "ledger.json")
    summary = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
    summary.update(
        {
            "epsilon": ledger.epsilon(),
            "steps": meta["step"],
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "n": plan.n,
            "accountant": plan.accountant,
            "delta": plan.delta,
            "init": "warmup" if init_dir is not None else "scratch",
            "checkpoint": str(final),
            "world_size": meta["world_size"],
            "nodes": meta.get("nodes", 1),
            "groups": ledger.groups,
        }
    )
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def mlflow_callbacks(tracker: Optional[tracking.Tracker]) -> list:
    """A Ray Train callback logging rank 0's reports (``epsilon``, ``finetune/*``, ``nondp/*``) to the
    run of ``tracker`` (None: no callback).

    It runs in the Train controller; a local sqlite store is only used when the cluster is one node
    (on several nodes the controller may sit on another machine: use an http tracking server).
    """
    import ray
    from ray.train import UserCallback

    if tracker is None or (tracker.uri.startswith("sqlite:") and len(ray.nodes()) > 1):
        return []
    run = {"uri": tracker.uri, "run_id": tracker.run_id, "nondp": tracker.nondp, "epsilon_name": tracker.epsilon_name}

    class MLflowReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report = dict(metrics[0]) if metrics else {}
            step = int(report.get("step", 0))
            sink = tracking.Tracker(**run)
            if "nimg" in report:  # step * q * N: the expected count, public
                sink.log_dp_metrics({"finetune/nimg": report["nimg"]}, step=step)
            if "epsilon" in report:  # the composed total after this step: public (the plan's alone)
                sink.log_dp_metrics({"epsilon": report["epsilon"]}, step=step)
            # the step time depends on the realised batch sizes (docs/privacy.md §7): not a DP value
            nondp = {k: v for k, v in report.items() if k.startswith(tracking.NONDP_PREFIX)}
            if "sec_per_step" in report:
                nondp["finetune/sec_per_step"] = report["sec_per_step"]
            sink.log_nondp_metrics(nondp, step=step)

    return [MLflowReport()]
