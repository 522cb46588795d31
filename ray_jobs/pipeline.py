"""Ray Jobs entry point for one DP-FETA run (the same flags as ``dpfeta run``):

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml \
        -- python ray_jobs/pipeline.py --config configs/mnist_28/eps_1.yaml [--set 'run.num_workers=[2,8]']

Inside a job, Ray sets RAY_ADDRESS, so the pipeline joins the cluster instead of starting one.
Resubmitting the same command (same run.name) resumes the run where it stopped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from dpfeta import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
