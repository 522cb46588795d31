"""DP-SGD fine-tuning, one worker's loop: a plain function with a Reporter seam.

``train_finetune`` runs the T logical steps of the plan on this worker's disjoint shard
(docs/privacy.md §2 M2, §4, §5): Poisson sampling over the shard, the privatised gradient of
``dpsgd.DPSGD`` (all-reduced with noise once for the group), Adam, and the EMA, updated on logical
steps only. It starts from the warm-up's raw weights with a fresh optimiser and a fresh EMA
(DP-FETA), from scratch (the DPDM baseline), or from a checkpoint, which restores model, EMA,
optimiser, step and ledger; sigma always comes from the plan decided once by the driver, and a
resumed run checks that it is the same and continues to exactly T.

Every ``log_every``/``checkpoint_every`` steps (and at T) every rank calls the reporter the same
number of times; rank 0 passes the metrics (step, nimg, epsilon spent = the composed total so far
including the central query, sec/step, and ``nondp/*`` only when ``tracking.nondp``) and, at
checkpoint steps, a checkpoint directory. ``distributed.py`` turns the reporter into
``ray.train.report``; ``LocalReporter`` runs it in one process (tests, benchmarks).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dpfeta import checkpoint, dpsgd, precision, privacy, rng
from dpfeta.config import Config
from dpfeta.diffusion import EDMPrecond, edm_loss_rows
from dpfeta.images import to_float
from dpfeta.nn import UNet, count_parameters, update_ema

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], Optional[Path]], None]  # (metrics, checkpoint dir or None)


# --------------------------------------------------------------------------------------------
# What is trained
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """The network, its per-row loss and its optimiser: the EDM U-Net (``EDM``) or a test stand-in.

    ``loss_rows(module, images [-1,1] [b,C,H,W], labels [b], cfg, generator, draws) -> [b*len(draws)]``,
    the rows of noise draws ``draws`` (a sub-range of range(K)) of each example, contiguous per example;
    ``module`` is the network under Opacus' hooks. ``prepare_labels(labels, cfg, generator)``, if set,
    runs once per example and logical step before the batch is cut into micro-batches (so an example
    whose K draws are split keeps one label decision).
    """

    build: Callable[[Config], nn.Module]
    loss_rows: Callable[[nn.Module, torch.Tensor, torch.Tensor, Config, torch.Generator, range], torch.Tensor]
    optimizer: Callable[[list[nn.Parameter], Config], torch.optim.Optimizer]
    prepare_labels: Optional[Callable[[torch.Tensor, Config, torch.Generator], torch.Tensor]] = None
    # The DP step and the sampler (``dpsgd.DPSGD``/``dpsgd.PoissonSampler`` or a subclass): the seam through
    # which ``dpfeta audit`` adds its gradient canaries (and its mutation tests their broken builds).
    dp_step: Callable[..., dpsgd.DPSGD] = dpsgd.DPSGD
    sampler: Callable[..., dpsgd.PoissonSampler] = dpsgd.PoissonSampler


def _edm_loss_rows(
    module: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, generator: torch.Generator, draws: range
) -> torch.Tensor:
    """EDM loss rows of ``len(draws)`` noise draws per example; labels come already dropped."""
    d = cfg.diffusion
    return edm_loss_rows(
        EDMPrecond(module, d.sigma_data),
        images,
        labels,
        P_mean=d.P_mean,
        P_std=d.P_std,
        sigma_data=d.sigma_data,
        label_drop_prob=0.0,
        num_classes=cfg.data.num_classes,
        K=len(draws),
        generator=generator,
    )


def _drop_labels(labels: torch.Tensor, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """CFG label dropout: each example's label becomes the null class with ``label_drop_prob``, once
    for all its K draws (reference-implementation.md §4.2)."""
    drop = torch.rand(len(labels), generator=generator, device=generator.device).to(labels.device)
    null = torch.full_like(labels, cfg.data.num_classes)
    return torch.where(drop < cfg.diffusion.label_drop_prob, null, labels)


def _adam(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.finetune.lr)


EDM = Task(build=UNet.from_config, loss_rows=_edm_loss_rows, optimizer=_adam, prepare_labels=_drop_labels)


@dataclass(frozen=True)
class Worker:
    """This process in the worker group (torch.distributed initialised when world_size > 1)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    nodes: int = 1  # distinct Ray nodes in the group (a public fact in each checkpoint's meta)


# --------------------------------------------------------------------------------------------
# Start points
# --------------------------------------------------------------------------------------------


def start_ledger(plan: privacy.Plan) -> privacy.Ledger:
    """The plan's ledger with the central query counted as spent (it precedes fine-tuning)."""
    ledger = privacy.Ledger.from_state_dict(plan.ledger.state_dict())
    for mech in ledger.mechanisms:
        if mech.name == "central" and mech.taken < mech.planned:
            ledger.record_steps("central", mech.planned)
    return ledger


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Totals since the last report (the nondp/ ones are not DP)."""

    steps: int = 0
    examples: int = 0
    clipped: int = 0
    loss_sum: float = 0.0
    start: float = 0.0

    def add(self, stats: dpsgd.StepStats) -> None:
        self.steps += 1
        self.examples += stats.examples
        self.clipped += stats.clipped
        self.loss_sum += stats.loss_sum


def _broadcast(module: nn.Module, worker: Worker) -> None:
    if worker.world_size > 1 and dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def build_network(cfg: Config, task: Task, worker: Worker) -> nn.Module:
    """The network on its device; seeded initialisation with run.seed, else rank 0's is broadcast."""
    with torch.random.fork_rng(devices=[]):
        if cfg.run.seed is not None:
            torch.manual_seed(cfg.run.seed)
        net = task.build(cfg)
    return net.to(worker.device)


def train_finetune(
    cfg: Config,
    shard: Any,
    *,
    plan: privacy.Plan,
    init_dir: Path | str | None,
    resume_dir: Path | str | None,
    reporter: Reporter,
    worker: Worker = Worker(),
    task: Task = EDM,
    before_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run logical steps until ``plan.steps`` on this worker's shard (an ``ImageSet``-like object).

    ``init_dir``: warm-up output (raw weights; fresh Adam and EMA) or None (from scratch);
    ``resume_dir``: a checkpoint written by this loop, which takes precedence. ``before_step(step)``
    is a test hook (fault injection). Returns the final metrics of this rank.
    """
    f = cfg.finetune
    device = torch.device(worker.device)
    net = build_network(cfg, task, worker)
    optimizer = task.optimizer([p for p in net.parameters() if p.requires_grad], cfg)
    ema, step = None, 0
    if resume_dir is not None:
        state = checkpoint.load(resume_dir, map_location=device)
        checkpoint.check_model(state["meta"], cfg, resume_dir, doing="resume")
        privacy.check_resume(state["meta"], plan, where=f"checkpoint '{resume_dir}'")  # sigma, q, T, N
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        ema.load_state_dict(state["ema"])
        ledger = privacy.Ledger.from_state_dict(state["meta"]["ledger"])
        step, start = int(state["meta"]["step"]), "checkpoint step %d" % state["meta"]["step"]
    else:
        if init_dir is not None:
            source = checkpoint.find(init_dir)
            state = checkpoint.load(source, map_location=device)
            checkpoint.check_model(state["meta"], cfg, source)
            net.load_state_dict(state["model"])
        ledger = start_ledger(plan)
        start = f"warm-up weights {init_dir}" if init_dir is not None else "scratch"
    _broadcast(net, worker)
    ledger.groups.append({"step": step, "world_size": worker.world_size, "nodes": worker.nodes})
    if ema is None:  # fresh EMA of the start weights
        ema = copy.deepcopy(net).eval().requires_grad_(False)

    # Generators: OS entropy per attempt unless run.seed (then distinct per stream, rank and start).
    seed = cfg.run.seed
    sampler = task.sampler(
        len(shard),
        sample_rate=plan.sample_rate,
        generator=rng.make_generator(seed, stream="sample", rank=worker.rank, step=step),
    )
    loss_generator = rng.make_generator(seed, stream="loss", rank=worker.rank, step=step, device=device)
    noise_generator = (
        rng.make_generator(seed, stream="noise", rank=worker.rank, step=step, device=device)
        if worker.rank == 0
        else None
    )
    private = task.dp_step(
        net,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=f.max_grad_norm,
        expected_batch_size=plan.sample_rate * plan.n,
        noise_multiplicity=f.noise_multiplicity,
        physical_batch_size=f.physical_batch_size,
        noise_generator=noise_generator,
        grad_sample_mode=f.grad_sample_mode,
        precision=precision.resolve(cfg.run.precision, device),
    )
    images = torch.as_tensor(shard.images).to(device)
    labels = torch.as_tensor(shard.labels).to(device)

    def loss_rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: range) -> torch.Tensor:
        return task.loss_rows(module, x, y, cfg, loss_generator, draws)

    def batch_labels(index: torch.Tensor) -> torch.Tensor:
        if task.prepare_labels is None:
            return labels[index]
        return task.prepare_labels(labels[index], cfg, loss_generator)

    if worker.rank == 0:
        logger.info(
            "finetune: %s, %d parameters, shard %d of N=%d on %d worker(s), sigma=%.4f q=%.5g "
            "T=%d, from step %d, %s compute",
            start,
            count_parameters(net),
            len(images),
            plan.n,
            worker.world_size,
            plan.noise_multiplier,
            plan.sample_rate,
            plan.steps,
            step,
            private.precision,
        )
    # epsilon at a report depends on the plan only: rank 0 composes the curve on a thread from here on.
    curve = (
        privacy.EpsilonCurve(
            ledger, "dpsgd", [t for t in range(step + 1, plan.steps + 1) if _reports_at(t, cfg, plan)[0]]
        )
        if worker.rank == 0
        else None
    )
    window, metrics, first_step = _Window(start=time.perf_counter()), {}, step
    net.train()
    try:
        while step < plan.steps:
            if before_step is not None:
                before_step(step)
            # Sample this worker's Poisson batch and privatise its gradient.
            index = sampler.sample().to(device)
            stats = private.privatise(to_float(images[index]), batch_labels(index), loss_rows)
            if stats.workers != worker.world_size:
                raise RuntimeError(f"lock-step broken: {stats.workers} of {worker.world_size} ranks at step {step}")
            # Optimiser step on the logical batch.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ledger.record_steps("dpsgd", step)
            # Update EMA.
            update_ema(ema, net, num_updates=step, decay=f.ema_decay)
            window.add(stats)

            # Report and checkpoint.
            report, save = _reports_at(step, cfg, plan)
            if report:
                metrics = _metrics(cfg, plan, curve, ledger, step, window) if worker.rank == 0 else {"step": step}
                _report(
                    reporter,
                    metrics,
                    save and worker.rank == 0,
                    cfg=cfg,
                    plan=plan,
                    ledger=ledger,
                    net=net,
                    ema=ema,
                    optimizer=optimizer,
                    step=step,
                    worker=worker,
                    first_step=first_step,
                )
                window = _Window(start=time.perf_counter())
    finally:
        if curve is not None:
            curve.close()
    return metrics or {"step": step, "epsilon": ledger.epsilon(), "steps": plan.steps}


def _reports_at(step: int, cfg: Config, plan: privacy.Plan) -> tuple[bool, bool]:
    """(report, checkpoint) after logical step ``step``: every log_every/checkpoint_every steps and at T."""
    f = cfg.finetune
    save = step == plan.steps or (f.checkpoint_every > 0 and step % f.checkpoint_every == 0)
    return save or (f.log_every > 0 and step % f.log_every == 0), save


def _spent(curve: privacy.EpsilonCurve, ledger: privacy.Ledger, step: int) -> float:
    """The composed epsilon after ``step``: the curve's point, which is the ledger's own composition at
    that step (checked: the curve was built from this ledger's mechanisms and counts)."""
    if not curve.matches(ledger, step):
        raise RuntimeError(f"internal: the epsilon curve was not composed from this ledger at step {step}")
    return curve.at(step)


def _metrics(
    cfg: Config, plan: privacy.Plan, curve: privacy.EpsilonCurve, ledger: privacy.Ledger, step: int, window: _Window
) -> dict[str, Any]:
    """Rank 0's report: public quantities, then nondp/ ones only when tracking.nondp."""
    # sec_per_step first: the window times the steps, not a wait for the curve's epsilon below
    sec_per_step = (time.perf_counter() - window.start) / max(window.steps, 1)
    out = {
        "step": step,
        "steps": plan.steps,
        "nimg": round(step * plan.sample_rate * plan.n),
        "epsilon": _spent(curve, ledger, step),
        "noise_multiplier": plan.noise_multiplier,
        "sec_per_step": sec_per_step,
    }
    if cfg.tracking.nondp:
        examples = max(window.examples, 1)
        out.update(
            {
                "nondp/loss": window.loss_sum / examples,
                "nondp/clip_fraction": window.clipped / examples,
                "nondp/batch": window.examples / max(window.steps, 1),
            }
        )
    logger.info(
        "finetune step %d/%d nimg %d eps %.4f sec/step %.3f%s",
        step,
        plan.steps,
        out["nimg"],
        out["epsilon"],
        out["sec_per_step"],
        f" nondp/loss {out['nondp/loss']:.4f}" if "nondp/loss" in out else "",
    )
    return out


def _report(
    reporter: Reporter,
    metrics: dict[str, Any],
    save: bool,
    *,
    cfg: Config,
    plan: privacy.Plan,
    ledger: privacy.Ledger,
    net: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    worker: Worker,
    first_step: int,
) -> None:
    if not save:
        reporter(metrics, None)
        return
    meta = {
        "stage": "finetune",
        "step": step,
        "steps": plan.steps,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "n": plan.n,
        "expected_batch": plan.sample_rate * plan.n,
        "epsilon": metrics.get("epsilon"),
        "ledger": ledger.state_dict(),
        "world_size": worker.world_size,
        "nodes": worker.nodes,
        "attempt_first_step": first_step,
        "config": cfg.public_dict(),
    }
    with tempfile.TemporaryDirectory(prefix="dpfeta-finetune-") as tmp:
        path = checkpoint.save(Path(tmp) / "checkpoint", model=net, ema=ema, optimizer=optimizer, meta=meta)
        reporter(metrics, path)


class LocalReporter:
    """The reporter of a one-process run: keeps every report and the latest checkpoint in ``directory``."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.history: list[dict[str, Any]] = []

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            tmp = self.directory.with_name(self.directory.name + ".incoming")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(self.directory, ignore_errors=True)
            tmp.rename(self.directory)

    def resume_dir(self) -> Optional[Path]:
        return self.directory if checkpoint.exists(self.directory) else None
