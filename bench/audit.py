"""The audit table: ledger epsilon vs epsilon_lb (both estimators) per build, and the audit's cost.

    python bench/audit.py [--config configs/digits.yaml] [--epsilons 10 1] [--canaries 1000]
                          [--mutants] [--cost] [--set KEY=VALUE ...] [--mutant-set KEY=VALUE ...]

1. The correct build: ``dpfeta.audit.run_audit`` (gradient canaries, Ray Train, run.num_workers=2) at
   each epsilon of ``--epsilons``; the bound must stay at or below the ledger's DP-SGD epsilon.
2. ``--mutants``: every broken build of tests/audit_mutants.py at the first epsilon (the run's sigma, q,
   T, C); the bound must go above the ledger's epsilon. The two builds whose leak needs a setting of
   its own are audited there and the table says so. ``--mutant-set``: overrides for the mutant rows
   only (e.g. a smaller network: the canary block does not depend on it).
3. ``--cost``: at the first epsilon, the audit's DP-SGD stage and a normal one of the same config
   (``fit_finetune``, no canaries) in the order audit, plain, plain, audit; the ratio of their wall times
   for each order (the second audit is also a second seed of the correct build).

Prints one Markdown table (paste into bench/README.md), the cost pairs and a JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mutants live with the tests

import audit_mutants as mutants  # noqa: E402
import ray  # noqa: E402

from dpfeta import audit, cluster, config, distributed, pipeline  # noqa: E402

# Settings where the two mutants that the run's (sigma, q, T) cannot show are shown (tests/test_audit.py).
OWN_SETTING = {
    "no noise when rank 0's batch is empty": [
        "data.val_fraction=0.45",
        "data.test_fraction=0.45",
        "central.rounds=0",
        "central.batch_size=100",
        "finetune.init=scratch",
        "finetune.batch_size=1",
        "finetune.epochs=2.2",
        "privacy.epsilon=2",
    ],
    "fixed batch instead of Poisson": [
        "central.rounds=0",
        "finetune.init=scratch",
        "finetune.batch_size=62.9",
        "finetune.epochs=2",
        "privacy.epsilon=2",
    ],
}
OWN_CANARIES = {"fixed batch instead of Poisson": 4000}


def row(build: str, report: dict, setting: str) -> dict:
    b = report["bounds"]
    return {
        "build": build,
        "setting": setting,
        "epsilon_ledger": report["epsilon_ledger"],
        "epsilon_dpsgd": report["epsilon_dpsgd"],
        "one_run": b["one_run"]["epsilon"],
        "fdp": b["fdp"]["epsilon"],
        "r": b["fdp"]["guesses"],
        "m": report["canaries"],
        "violation": report["violation"],
        "seconds": report["seconds"],
        "sigma": report["noise_multiplier"],
        "q": report["sample_rate"],
        "T": report["steps"],
    }


def _stage(folder: Path) -> dict:
    """Wall seconds and the last report's seconds per step of a DP-SGD stage (its finetune.json)."""
    summary = json.loads((folder / "finetune.json").read_text())
    return {"sec_per_step": round(summary.get("sec_per_step", float("nan")), 3)}


def stamp() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"commit {commit}, {time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, {cpu}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--mutants", action="store_true")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--mutant-set", dest="mutant_overrides", action="append", default=[])
    parser.add_argument(
        "--builds",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these rows: 'correct' and/or mutant names (default: all asked for)",
    )
    args = parser.parse_args()
    print(stamp(), flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # One local Ray for every run (as cluster.connect would start it: the workers' CPUs and Ray Data's).
    ray.init(address="local", num_cpus=2 + cluster.RAY_DATA_HEADROOM_CPUS, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(mutants)
    tmp = Path(tempfile.mkdtemp(prefix="dpfeta-audit-bench-"))
    base = [*args.overrides, "run.num_workers=2", "run.cpus_per_worker=1", "tracking.enabled=false", f"run.dir={tmp}"]

    def load(*extra: str) -> config.Config:
        return pipeline.resolve_config(args.config, [*base, *extra])

    def correct(cfg: config.Config, label: str) -> dict:
        rows.append(row(label, audit.run_audit(cfg, canaries=args.canaries), "the run's"))
        rows[-1].update(_stage(audit.audit_dir(cfg) / "nondp" / "train"))
        print(json.dumps(rows[-1]), flush=True)
        return rows[-1]

    def plain(cfg: config.Config, name: str) -> dict:
        pl = pipeline.plan_run(cfg)
        train, _ = pipeline.read_data(cfg, pl)
        start = time.perf_counter()
        distributed.fit_finetune(cfg, train=train, plan=pl, init_dir=None, out_dir=tmp / name)
        out = {"seconds": round(time.perf_counter() - start, 1), **_stage(tmp / name)}
        print(json.dumps({"plain": name, **out}), flush=True)
        return out

    rows, pairs = [], []
    for k, eps in enumerate(args.epsilons):
        cfg = load(f"privacy.epsilon={eps:g}", f"run.name=correct-{eps:g}")
        if args.builds is not None and "correct" not in args.builds:
            continue
        first = correct(cfg, "correct")
        if args.cost and k == 0:
            pairs.append(("audit first", first, plain(cfg, "plain-1")))
            second = plain(cfg, "plain-2")
            cfg2 = load(f"privacy.epsilon={eps:g}", f"run.name=correct-{eps:g}-again")
            pairs.append(("plain first", correct(cfg2, "correct (second seed)"), second))
    if args.mutants:
        builds = [(name, {"dp_step": cls}) for name, cls in mutants.DP_STEPS.items()]
        builds += [(name, {"sampler": cls}) for name, cls in mutants.SAMPLERS.items()]
        for i, (name, broken) in enumerate(builds):
            if args.builds is not None and name not in args.builds:
                continue
            own = OWN_SETTING.get(name)
            cfg = load(
                f"privacy.epsilon={args.epsilons[0]:g}", f"run.name=mutant-{i}", *args.mutant_overrides, *(own or [])
            )
            report = audit.run_audit(
                cfg, canaries=OWN_CANARIES.get(name, args.canaries) if own else args.canaries, **broken
            )
            rows.append(row(name, report, "own: " + " ".join(own) if own else "the run's"))
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| build | setting | ledger ε (total / DP-SGD) | σ, q, T | ε_lb one-run | ε_lb f-DP | r (f-DP) | m "
        "| ε_lb > ε | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['build']} | {r['setting']} | {r['epsilon_ledger']:.3f} / {r['epsilon_dpsgd']:.3f} | "
            f"{r['sigma']:.3f}, {r['q']:.4g}, {r['T']} | {r['one_run']:.3f} | {r['fdp']:.3f} | {r['r']} | "
            f"{r['m']} | {'yes' if r['violation'] else 'no'} | {r['seconds']:.0f} |"
        )
    for order, a, p in pairs:
        print(
            f"cost ({order}): audit {a['seconds']:.1f} s ({a['sec_per_step']:.3f} s/step), plain "
            f"{p['seconds']:.1f} s ({p['sec_per_step']:.3f} s/step); ratio {a['seconds'] / p['seconds']:.3f} "
            f"(per step {a['sec_per_step'] / p['sec_per_step']:.3f})"
        )
    print(stamp(), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
