"""The audit table: ledger epsilon vs epsilon_lb (both estimators) per build, and the audit's cost.

    python bench/audit.py [--config configs/digits.yaml] [--epsilons 10 1] [--canaries 1000]
                          [--mutants] [--cost] [--set KEY=VALUE ...]

1. The correct build: ``dpfeta.audit.run_audit`` (gradient canaries, Ray Train, run.num_workers=2) at
   each epsilon of ``--epsilons``; the bound must stay at or below the ledger's DP-SGD epsilon.
2. ``--mutants``: every broken build of tests/audit_mutants.py at the first epsilon (the run's sigma, q,
   T, C); the bound must go above the ledger's epsilon. The two builds whose leak needs a setting of
   its own are audited there (as in tests/test_audit.py) and the table says so.
3. ``--cost``: a normal DP-SGD stage of the same config (``fit_finetune``, no canaries) and the audit's
   DP-SGD stage, side by side on the same machine; the ratio of their wall times.

Prints one Markdown table (paste into bench/README.md) and a JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mutants live with the tests

import ray  # noqa: E402

import audit_mutants as mutants  # noqa: E402
from dpfeta import audit, config, distributed, pipeline  # noqa: E402

# Settings where the two mutants that the run's (sigma, q, T) cannot show are shown (tests/test_audit.py).
OWN_SETTING = {
    "no noise when rank 0's batch is empty": ["data.val_fraction=0.45", "data.test_fraction=0.45", "central.rounds=0",
                                             "finetune.init=scratch", "finetune.batch_size=1", "finetune.epochs=2.2",
                                             "privacy.epsilon=2"],
    "fixed batch instead of Poisson": ["central.rounds=0", "finetune.init=scratch", "finetune.batch_size=62.9",
                                       "finetune.epochs=2", "privacy.epsilon=2"],
}
OWN_CANARIES = {"fixed batch instead of Poisson": 4000}


def row(build: str, report: dict, setting: str) -> dict:
    b = report["bounds"]
    return {"build": build, "setting": setting, "epsilon_ledger": report["epsilon_ledger"],
            "epsilon_dpsgd": report["epsilon_dpsgd"], "one_run": b["one_run"]["epsilon"], "fdp": b["fdp"]["epsilon"],
            "r": b["fdp"]["guesses"], "m": report["canaries"], "violation": report["violation"],
            "seconds": report["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--mutants", action="store_true")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(mutants)
    tmp = Path(tempfile.mkdtemp(prefix="dpfeta-audit-bench-"))
    base = [*args.overrides, "run.num_workers=2", "run.cpus_per_worker=1", "tracking.enabled=false",
            f"run.dir={tmp}"]

    def load(*extra: str) -> config.Config:
        return pipeline.resolve_config(args.config, [*base, *extra])

    rows = []
    for eps in args.epsilons:
        cfg = load(f"privacy.epsilon={eps:g}", f"run.name=correct-{eps:g}")
        rows.append(row("correct", audit.run_audit(cfg, canaries=args.canaries), "the run's"))
        print(json.dumps(rows[-1]), flush=True)
        if args.cost:
            pl = pipeline.plan_run(cfg)
            train, _ = pipeline.read_data(cfg, pl)
            start = time.perf_counter()
            distributed.fit_finetune(cfg, train=train, plan=pl, init_dir=None, out_dir=tmp / f"plain-{eps:g}")
            plain = time.perf_counter() - start
            print(json.dumps({"epsilon": eps, "plain_dpsgd_s": round(plain, 1), "audit_dpsgd_s": rows[-1]["seconds"],
                              "ratio": round(rows[-1]["seconds"] / plain, 3)}), flush=True)
    if args.mutants:
        builds = [(name, {"dp_step": cls}) for name, cls in mutants.DP_STEPS.items()]
        builds += [(name, {"sampler": cls}) for name, cls in mutants.SAMPLERS.items()]
        for i, (name, broken) in enumerate(builds):
            own = OWN_SETTING.get(name)
            cfg = load(f"privacy.epsilon={args.epsilons[0]:g}", f"run.name=mutant-{i}", *(own or []))
            report = audit.run_audit(cfg, canaries=OWN_CANARIES.get(name, args.canaries) if own else args.canaries,
                                     **broken)
            rows.append(row(name, report, "own: " + " ".join(own) if own else "the run's"))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| build | setting | ledger eps (total / DP-SGD) | eps_lb one-run | eps_lb f-DP | r | m | eps_lb > eps |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['setting']} | {r['epsilon_ledger']:.3f} / {r['epsilon_dpsgd']:.3f} | "
              f"{r['one_run']:.3f} | {r['fdp']:.3f} | {r['r']} | {r['m']} | {'yes' if r['violation'] else 'no'} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
