"""Ray Jobs entry point for a sweep: parse -> resolve config -> print the sweep plan -> tune.run_sweep.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml \
        -- python ray_jobs/tune.py --config configs/mnist_28/eps_1.yaml \
           --set 'tune.search_space={"central.rounds": {"type": "randint", "lower": 2, "upper": 8}}'

Inside a job, Ray sets RAY_ADDRESS, so the sweep joins the cluster instead of starting one.
Resubmitting the same command (same run.name) resumes the sweep (Tuner.restore): finished trials
are kept, the trial count and every sigma stay as first planned.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from dpfeta import config, data, privacy, tune  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config with a tune: section (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = config.load(args.config, args.overrides)
        cfg = privacy.resolve(cfg, data.public_train_size(cfg))
        tune.run_sweep(cfg, echo=print)  # prints the sweep plan before any data is read
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ray_jobs/tune.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
