"""Ray Jobs entry point for a sweep (the same flags as ``dpfeta tune``):

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml \
        -- python ray_jobs/tune.py --config configs/mnist_28/eps_1.yaml \
           --set 'tune.search_space={"central.rounds": {"type": "randint", "lower": 2, "upper": 8}}'

Inside a job, Ray sets RAY_ADDRESS, so the sweep joins the cluster instead of starting one.
Resubmitting the same command (same run.name) resumes the sweep: finished trials are kept, the trial
count and every sigma stay as first planned. What may be published is the sweep's release/ folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from dpfeta import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
