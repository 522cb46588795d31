"""Where code runs: the one Ray session, the device, stages as GPU tasks.

One rule for every command (``run``, ``tune``, ``central``, ``finetune``, ``prepare``, ``ray_jobs/``):
``run.ray_address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it) -> connect there; otherwise start
a private local cluster (``address="local"``), never silently joining one whose address file a dead
or foreign cluster left on disk. Only a cluster started here is shut down by ``shutdown()``.

When ``run.use_gpu`` is set and the driver has no GPU (a CPU head node), ``run_on_gpu`` runs a stage
as a one-GPU Ray task; files travel through the object store (``pack``/``unpack``), so no shared
filesystem is needed for them.

No runtime_env is set here: Ray hands a job's env to every task and actor (a sweep's trials too), so it
must not carry the MLflow run (docs/privacy.md §7); what a worker needs travels as an argument.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from dpfeta import console
from dpfeta.config import Config

log = logging.getLogger(__name__)

RAY_DATA_HEADROOM_CPUS = 2  # logical CPUs a local cluster keeps for Ray Data beside the workers
_started = False  # this process started the local cluster (and shuts it down)


def address(cfg: Config) -> Optional[str]:
    """The cluster to connect to: ``run.ray_address``, else ``RAY_ADDRESS``, else None (start one)."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None


REACH_TIMEOUT_S = 15.0  # how long an explicit address may take to answer before it is an error


def check_reachable(cfg: Config, *, timeout: Optional[float] = None) -> None:
    """An explicit cluster address must answer (a TCP connection to its GCS or client port) within
    ``timeout`` seconds; otherwise a clear error, raised before any budget is spent (Ray itself would
    retry "Failed to connect to GCS" for minutes). No address: nothing to check."""
    import socket
    import time

    timeout = REACH_TIMEOUT_S if timeout is None else timeout
    where = address(cfg)
    if not where or where in ("auto", "local") or where.startswith(("http://", "https://")):
        return
    hostport = where.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"Ray address {where!r} (run.ray_address or RAY_ADDRESS): expected host:port or ray://host:port"
        )
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=min(3.0, timeout)):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise ValueError(
        f"the Ray cluster at {where} (run.ray_address or RAY_ADDRESS) did not answer within "
        f"{timeout:.0f} s ({last}); start it, fix the address, or unset both to run on a "
        "private local cluster. Nothing was spent"
    )


def connect(cfg: Config, *, num_cpus: Optional[int] = None) -> None:
    """Connect to the configured cluster, else start a private local one (once per process)."""
    global _started
    import ray

    if ray.is_initialized():
        return
    where = address(cfg)
    if where:
        check_reachable(cfg)
        log.info("ray: connecting to %s", where)
        ray.init(address=where, **console.ray_init_kwargs())
        console.after_ray_init()  # worker output and Ray's logs to the run's log file
        return
    if num_cpus is None:
        workers = cfg.run.num_workers[1] if isinstance(cfg.run.num_workers, tuple) else cfg.run.num_workers
        num_cpus = math.ceil(workers * cfg.run.cpus_per_worker) + RAY_DATA_HEADROOM_CPUS
    log.info("ray: starting a local cluster with %d logical CPUs", num_cpus)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **console.ray_init_kwargs())
    console.after_ray_init()
    _started = True


def shutdown() -> None:
    """Stop the local cluster if this process started it (a cluster we connected to stays up)."""
    global _started
    if _started:
        import ray

        ray.shutdown()
        _started = False


@contextlib.contextmanager
def session(cfg: Config, *, num_cpus: Optional[int] = None):
    """``connect`` for the block; a cluster started here is shut down at its end."""
    import ray

    if ray.is_initialized():
        yield
        return
    connect(cfg, num_cpus=num_cpus)
    try:
        yield
    finally:
        shutdown()


def device(cfg: Config):
    """``cuda`` when ``run.use_gpu`` and this process sees a GPU, else ``cpu``."""
    import torch

    return torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")


def node_id() -> Optional[str]:
    """The Ray node this process runs on (None outside a Ray session)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def needs_remote(cfg: Config) -> bool:
    """Stages (warm-up, sampling, evaluation) go to Ray tasks: ``run.stage_placement: cluster``, or
    ``auto`` with a GPU asked for and none in this process (a CPU head node)."""
    placement = cfg.run.stage_placement
    if placement != "auto":
        return placement == "cluster"
    if not cfg.run.use_gpu:
        return False
    import torch

    return not torch.cuda.is_available()


STAGE_RETRIES = 3  # a stage task whose node is lost is retried elsewhere (it resumes from the storage)


def _task(cfg: Config, fn: Callable):
    import ray

    connect(cfg)
    return ray.remote(
        num_gpus=1 if cfg.run.use_gpu else 0,
        num_cpus=cfg.run.cpus_per_worker,
        resources=dict(cfg.run.stage_resources) or None,
        max_retries=STAGE_RETRIES,
    )(fn)


def run_on_gpu(cfg: Config, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` here, or as a Ray task (one GPU when ``run.use_gpu``) per ``needs_remote``."""
    if not needs_remote(cfg):
        return fn(*args)
    import ray

    return ray.get(_task(cfg, fn).remote(*args))


def map_on_gpu(cfg: Config, fn: Callable, calls: list[tuple]) -> list[Any]:
    """``[fn(*args) for args in calls]``: here one after the other, or as concurrent Ray tasks over every
    GPU (or CPU slot) the cluster has. A task whose node is lost is retried alone."""
    if not needs_remote(cfg):
        return [fn(*args) for args in calls]
    import ray

    task = _task(cfg, fn)
    return ray.get([task.remote(*args) for args in calls])


def pack(directory: Path) -> dict[str, bytes]:
    """A folder's files as {relative path: bytes}, to travel through the object store."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def unpack(files: dict[str, bytes], directory: Path) -> None:
    for rel, blob in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(blob)
