"""What a user sees on the console of ``dpfeta run`` (issue 14): the budget table first, the run
directory and MLflow link, one progress bar per stage, the summary last; no Ray internals, no
absl or library warnings (they are in <run dir>/logs/dpfeta.log); ``--quiet`` drops the bars."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.long]

TINY = [
    "data.resolution=8",
    "central.rounds=2",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "central.batch_size=600",
    "model.channels=8",
    "model.channel_mult=[1]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.emb_channels=16",
    "warmup.steps=3",
    "warmup.batch_size=16",
    "warmup.checkpoint_every=3",
    "warmup.log_every=1",
    "finetune.batch_size=128",
    "finetune.epochs=0.15",
    "finetune.noise_multiplicity=1",
    "finetune.physical_batch_size=64",
    "finetune.checkpoint_every=2",
    "finetune.log_every=1",
    "privacy.epsilon=10",
    "sample.steps=2",
    "sample.num_samples=30",
    "sample.batch_size=30",
    "eval.classifier_epochs=1",
    "eval.logreg=false",
    "eval.fid.num_samples=30",
    "run.cpus_per_worker=1",
    "eval.fid.inception_weights=null",
    "run.name=console",
]
NOISE = (
    "PlacementGroupCleaner",
    "(pid=",
    "(TrainController",
    "RayTrainWorker",
    "SplitCoordinator",
    "Started a local Ray instance",
    "absl",
    "_compute_log_a_frac",
    "failed to converge",
    "Warning",
    "mlflow.store",
    "Running Dataset",
    "Downloading artifacts",
)
BARS = ("central query", "warm-up", "DP-SGD", "sampling", "evaluation")


def dpfeta_run(root: Path, *flags: str) -> subprocess.CompletedProcess:
    (root / "empty.yaml").write_text("{}\n")
    argv = ["run", "--config", str(root / "empty.yaml"), *flags]
    for item in [*TINY, f"run.dir={root}"]:
        argv += ["--set", item]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    code = f"import sys; from dpfeta import cli; sys.exit(cli.main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    proc = dpfeta_run(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def lines(text: str) -> list[str]:
    """Console lines as a user sees them (tqdm redraws with carriage returns)."""
    return [part for line in text.splitlines() for part in line.split("\r") if part.strip()]


def test_budget_table_first_summary_last_and_no_ray_or_library_noise(first):
    root, proc = first
    out, err = lines(proc.stdout), lines(proc.stderr)
    assert out[0] == "privacy plan for run 'console' (no data read yet)", out[:3]
    assert out[1].split() == ["mechanism", "sigma", "q", "count", "eps", "alone"]
    assert out[-7].startswith("dpfeta run 'console' done in"), out[-8:]
    assert out[-1].startswith("  MLflow    mlflow ui --backend-store-uri sqlite:///")
    starts = [i for i, line in enumerate(out) if line.startswith(("run 'console': writing to", "MLflow: ", "log: "))]
    assert len(starts) == 3 and starts[0] > 1 and starts[-1] < len(out) - 7, out
    assert f"{root}/console/logs/dpfeta.log" in out[starts[2]]
    noisy = [line for line in out + err if any(word in line for word in NOISE)]
    assert not noisy, noisy[:10]
    assert not [line for line in err if " INFO " in line or " WARNING " in line], err[:10]
    # the noise went to the log file of the run, with Ray's worker lines
    logged = (root / "console" / "logs" / "dpfeta.log").read_text()
    assert "(TrainController pid=" in logged and "ray.workers" in logged and "dpfeta.pipeline INFO" in logged


def test_one_bar_per_stage_with_rate_eta_and_epsilon(first):
    _, proc = first
    err = lines(proc.stderr)
    final = {}
    for line in err:
        for name in BARS:
            if line.startswith(name):
                final[name] = line
    assert set(final) == set(BARS), err
    for line in final.values():
        assert "100%|" in line and "/s" in line or "s/" in line, line  # a rate (it/s or s/it)
        assert "<" in line, line  # elapsed<remaining
    assert "eps=10" in final["DP-SGD"] and "2/2" in final["DP-SGD"]
    assert "2/2" in final["central query"] and "eps=2.67" in final["central query"]
    assert "30/30" in final["sampling"] and "3/3" in final["warm-up"]


def test_quiet_drops_the_bars_and_the_start_lines(first):
    """Rerun with sampling and evaluation to redo: --quiet shows no bar; without it they are shown."""
    root, _ = first
    run_dir = root / "console"

    def redo_sampling() -> None:
        from dpfeta import pipeline

        for rel in ("samples", pipeline.SHARDS, "release/samples", "eval.json"):
            path = run_dir / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    redo_sampling()
    quiet = dpfeta_run(root, "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = lines(quiet.stdout)
    assert out[0].startswith("privacy plan for run 'console'") and out[-7].startswith("dpfeta run 'console' done")
    assert not [line for line in out if line.startswith(("run 'console': writing", "MLflow: ", "log: "))], out
    assert not [line for line in lines(quiet.stderr) if line.startswith(BARS) or "%|" in line], quiet.stderr
    assert (run_dir / "samples" / "grid.png").is_file()  # it did sample again
    redo_sampling()
    normal = dpfeta_run(root)
    assert normal.returncode == 0, normal.stderr[-3000:]
    assert [line for line in lines(normal.stderr) if line.startswith("sampling") and "30/30" in line]
