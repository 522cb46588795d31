"""Ray Jobs entry point for one DP-FETA run: parse -> resolve config -> print budget -> pipeline.run.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml \
        -- python ray_jobs/pipeline.py --config configs/mnist_28/eps_1.yaml [--set run.num_workers=[2,8]]

Inside a job, Ray sets RAY_ADDRESS, so the pipeline joins the cluster instead of starting one.
Resubmitting the same command (same run.name) resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from dpfeta import config, data, pipeline, privacy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = config.load(args.config, args.overrides)
        cfg = privacy.resolve(cfg, data.public_train_size(cfg))
        pipeline.run(cfg)  # prints the budget before any data is read
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ray_jobs/pipeline.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
