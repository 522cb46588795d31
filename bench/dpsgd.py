"""Cost of DP-SGD: step time vs non-private, where the time goes, memory vs K, 2 workers vs 1.

    python bench/dpsgd.py [--threads 1] [--reps 3] [--mnist-batch 8] [--skip-ratio|memory|ray]

1. Step time, DP / non-private, measured interleaved in one process for the digits
   (configs/digits.yaml: batch = its physical batch, its K) and MNIST (configs/mnist_28/eps_1.yaml
   model, K=32, a small batch so that it runs on a CPU) U-Nets. Both steps see the same B*K rows of
   the EDM loss and end with Adam; the DP step adds per-example gradients (K folded in the hooks),
   clipping, noise and the division by q N. One extra DP step is split into forward / autograd
   backward / per-example gradient hooks / clipping + noise + optimiser hand-off.
2. Peak memory of one DP step of 256 rows (fresh subprocess each, RSS above the pre-step level),
   digits and MNIST U-Nets: K=1 vs K=32 at the same rows per micro-batch (``physical_batch_size``
   counts rows; at 16 rows a K=32 example is split in two parts), and stock Opacus (per-row
   gradients, folded afterwards) at K=32 on digits.
3. Ray Train throughput of the digits fine-tune, 2 workers / 1 worker (1 CPU each, local Ray),
   timed over the second half of the steps; beside it what two workers must lose: the all-reduce of
   the step's buffer (gloo, 2 processes on this machine; digits and MNIST parameter counts) and the
   Poisson imbalance (a lock-step group waits for the larger of the workers' batches: E[max] / mean,
   simulated with the fine-tune's sample rate).

Ratios only: absolute times on a shared 2-core VM move with its load (printed) and allocator
(LD_PRELOAD printed: jemalloc changes small-tensor timings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpfeta import config, dpsgd, finetune
from dpfeta.nn import count_parameters

ROOT = Path(__file__).resolve().parents[1]
DIGITS, MNIST = ROOT / "configs/digits.yaml", ROOT / "configs/mnist_28/eps_1.yaml"
MODELS = {"digits": DIGITS, "mnist": MNIST}


def setup(path: Path, batch: int, K: int):
    cfg = config.replace(config.load(path), {"finetune.noise_multiplicity": K, "run.seed": 0})
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, d.channels, d.resolution, d.resolution, generator=g) * 2 - 1
    labels = torch.randint(d.num_classes, (batch,), generator=g)
    net = finetune.build_network(cfg, finetune.EDM, finetune.Worker())
    loss_generator = torch.Generator().manual_seed(1)

    def rows(module, x, y, draws=range(K)):
        return finetune.EDM.loss_rows(module, x, y, cfg, loss_generator, draws)

    return cfg, net, images, labels, rows


def nonprivate_step(net, rows, images, labels):
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        rows(net, images, labels).mean().backward()
        optimizer.step()

    return step


def private_step(net, rows, images, labels, K, physical=None, mode="hooks"):
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)
    private = dpsgd.DPSGD(
        net,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=len(images),
        noise_multiplicity=K,
        physical_batch_size=physical or len(images) * K,
        noise_generator=torch.Generator().manual_seed(2),
        grad_sample_mode=mode,
    )

    def step():
        private.privatise(images, labels, rows)
        optimizer.step()

    return step, private


def breakdown(step, rows_holder) -> dict[str, float]:
    """One DP step split into forward, autograd backward, per-example hooks, clip/noise/rest."""
    times = {"forward": 0.0, "backward (autograd, without hooks)": 0.0, "per-example hooks": 0.0}
    original_grad, original_hook = torch.autograd.grad, dpsgd.FoldedGradSampleModule._per_example
    original_rows = rows_holder[0]

    def timed_rows(*a):
        start = time.perf_counter()
        out = original_rows(*a)
        times["forward"] += time.perf_counter() - start
        return out

    def timed_grad(*a, **k):
        start = time.perf_counter()
        out = original_grad(*a, **k)
        times["backward (autograd, without hooks)"] += time.perf_counter() - start
        return out

    def timed_hook(self, *a):
        start = time.perf_counter()
        out = original_hook(self, *a)
        times["per-example hooks"] += time.perf_counter() - start
        return out

    torch.autograd.grad, dpsgd.FoldedGradSampleModule._per_example = timed_grad, timed_hook
    rows_holder[0] = timed_rows
    try:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    finally:
        torch.autograd.grad, dpsgd.FoldedGradSampleModule._per_example = original_grad, original_hook
        rows_holder[0] = original_rows
    times["backward (autograd, without hooks)"] -= times["per-example hooks"]
    times["clip + accumulate + noise + Adam"] = total - sum(times.values())
    return {k: v / total for k, v in times.items()} | {"total_s": total}


def bench_ratio(name: str, path: Path, batch: int, K: int | None, reps: int) -> None:
    cfg = config.load(path)
    K = K or cfg.finetune.noise_multiplicity
    cfg, net, images, labels, rows = setup(path, batch, K)
    holder = [rows]
    dp_net = finetune.build_network(cfg, finetune.EDM, finetune.Worker())
    steps = {"non-private": nonprivate_step(net, rows, images, labels)}
    steps["DP"], _ = private_step(dp_net, lambda *a: holder[0](*a), images, labels, K)
    for step in steps.values():  # warm-up (oneDNN primitives, allocator)
        step()
    times = {k: [] for k in steps}
    for _ in range(reps):  # interleaved, so load changes hit both
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n{name}: U-Net {count_parameters(net):,} parameters, batch {batch} x K={K} = {batch * K} rows "
        f"of {cfg.data.resolution}x{cfg.data.resolution}, {reps} interleaved reps (median)"
    )
    print(
        f"  non-private {med['non-private']:.3f} s/step   DP {med['DP']:.3f} s/step   "
        f"ratio DP / non-private = {med['DP'] / med['non-private']:.2f}  (goal <= 1.5)"
    )
    parts = breakdown(steps["DP"], holder)
    print("  DP step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in parts.items() if k != "total_s"))


# --------------------------------------------------------------------------------------------
# Memory (one fresh process per measurement)
# --------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak of this process image; ru_maxrss would include the parent's)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(model: str, batch: int, K: int, physical: int, mode: str) -> None:
    from opacus.grad_sample import GradSampleModule

    cfg, net, images, labels, rows = setup(MODELS[model], batch, K)
    try:  # reset the peak to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = _status_mb("VmRSS")
    if mode == "folded":
        step, _ = private_step(net, rows, images, labels, K, physical=physical)
        step()
    else:  # stock Opacus: per-row gradients, folded after the backward pass
        module = GradSampleModule(net, loss_reduction="sum")
        rows(module, images, labels, range(K)).view(batch, K).mean(1).sum().backward()
        [p.grad_sample.view(batch, K, -1).sum(1) for p in net.parameters()]
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_above_start_mb": peak - before}))


def bench_memory(threads: int, models: list[str]) -> None:
    """Peak memory of one logical step of 256 rows: K=1 vs K=32 at the same rows per micro-batch."""
    print("\nmemory of one DP step of 256 rows (peak RSS above the pre-step level, fresh process each):")
    for model in models:
        cases = [
            ("K=1,  256 examples, micro-batch 64 rows", 256, 1, 64, "folded"),
            ("K=32,   8 examples, micro-batch 64 rows", 8, 32, 64, "folded"),
            ("K=1,  256 examples, micro-batch 16 rows", 256, 1, 16, "folded"),
            ("K=32,   8 examples, micro-batch 16 rows (split)", 8, 32, 16, "folded"),
        ]
        if model == "digits":
            cases.append(("K=32, 8 examples, stock Opacus per-row, 256 rows", 8, 32, 256, "stock"))
        results = {}
        for label, batch, K, physical, mode in cases:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    model,
                    str(batch),
                    str(K),
                    str(physical),
                    mode,
                    "--threads",
                    str(threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_start_mb"]
            print(f"  {model:<6} {label:<50} {results[label]:8.0f} MB", flush=True)
        values = list(results.values())
        print(
            f"  {model}: peak K=32 / K=1 at equal rows per micro-batch: 64 rows {values[1] / values[0]:.2f}, "
            f"16 rows {values[3] / values[2]:.2f}"
        )


# --------------------------------------------------------------------------------------------
# Ray Train: 2 workers vs 1
# --------------------------------------------------------------------------------------------


def _allreduce_child(rank: int, sizes: list[int], reps: int, port: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for size in sizes:
        buffer = torch.zeros(size)
        dist.all_reduce(buffer)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - start)
        if rank == 0:
            out.put((size, statistics.median(times)))
    dist.destroy_process_group()


def bench_allreduce(sizes: dict[str, int], reps: int = 20) -> None:
    """Median seconds of one all-reduce of DPSGD's fp32 buffer (parameters + 4 statistics), 2 ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_allreduce_child, args=(rank, [n + 4 for n in sizes.values()], reps, port, out))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for name in sizes:
        size, seconds = out.get()
        print(
            f"  all-reduce of the DP-SGD buffer, {name} ({size:,} fp32): {seconds * 1e3:.1f} ms "
            f"(gloo, 2 ranks, median of {reps})"
        )


def poisson_imbalance(n: int, batch: float, workers: int = 2, draws: int = 20000) -> float:
    """E[max over workers of the Poisson batch] / its mean: what a lock-step group waits for."""
    shard, q = n // workers, batch / n
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        counts = torch.distributions.Binomial(shard, torch.full((draws, workers), q)).sample()
    return float(counts.max(1).values.mean() / (shard * q))


def bench_ray(steps: int, batch: float = 64.0) -> None:
    import ray

    from dpfeta import data, distributed, privacy

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = config.load(DIGITS)
    train = data.load_splits(base).train
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = config.replace(
                base,
                {
                    "central.rounds": 0,
                    "finetune.init": "scratch",
                    "finetune.batch_size": batch,
                    "finetune.epochs": steps * batch / len(train),
                    "finetune.checkpoint_every": 0,
                    "finetune.log_every": steps // 2,
                    "privacy.noise_multiplier": 1.0,
                    "privacy.epsilon": 1e6,
                    "run.num_workers": workers,
                    "run.cpus_per_worker": 1.0,
                    "run.dir": tmp,
                    "run.name": f"w{workers}",
                    "tracking.nondp": False,
                },
            )
            plan = privacy.plan(cfg, len(train))
            summary = distributed.fit_finetune(
                cfg, train=train, plan=plan, init_dir=None, out_dir=Path(tmp) / f"w{workers}"
            )
            rates[workers] = batch / summary["sec_per_step"]
            print(
                f"  {workers} worker(s): {summary['sec_per_step']:.2f} s/step "
                f"over steps {steps // 2 + 1}..{plan.steps}, "
                f"{rates[workers]:.1f} examples/s"
            )
    ray.shutdown()
    print(f"  throughput 2 workers / 1 worker = {rates[2] / rates[1]:.2f}  (2 cores, 1 thread per worker)")
    imbalance = poisson_imbalance(len(train), batch)
    print(
        f"  Poisson imbalance at this batch: E[max of 2 workers' batches] / mean = {imbalance:.3f}, so at "
        f"most {2 / imbalance:.2f} with free communication and nothing else on the cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared VMs)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mnist-batch", type=int, default=8, help="examples per MNIST step (x K=32 rows)")
    parser.add_argument("--ray-steps", type=int, default=6, help="T of the Ray runs (the last half is timed)")
    parser.add_argument("--ray-batch", type=float, default=64.0, help="expected logical batch of the Ray runs")
    parser.add_argument("--skip-ratio", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--memory-models", nargs="+", default=["digits", "mnist"], choices=list(MODELS))
    parser.add_argument(
        "--memory-child", nargs=5, metavar=("MODEL", "BATCH", "K", "ROWS", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        model, batch, K, physical, mode = args.memory_child
        memory_child(model, int(batch), int(K), int(physical), mode)
        return
    print(
        f"bench/dpsgd.py: torch {torch.__version__}, {args.threads} thread(s), load average "
        f"{os.getloadavg()[0]:.1f}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '(glibc malloc)')}"
    )
    if not args.skip_ratio:
        bench_ratio("digits", DIGITS, config.load(DIGITS).finetune.physical_batch_size, None, args.reps)
        bench_ratio("MNIST", MNIST, args.mnist_batch, None, args.reps)
    if not args.skip_memory:
        bench_memory(args.threads, args.memory_models)
    if not args.skip_ray:
        print(f"\nRay Train, digits fine-tune (batch {args.ray_batch:g}, K=4), local Ray with 2 CPUs:")
        bench_ray(args.ray_steps, args.ray_batch)
        bench_allreduce(
            {
                "digits": count_parameters(
                    finetune.build_network(config.load(DIGITS), finetune.EDM, finetune.Worker())
                ),
                "MNIST": count_parameters(finetune.build_network(config.load(MNIST), finetune.EDM, finetune.Worker())),
            }
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
