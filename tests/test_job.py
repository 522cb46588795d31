"""End to end through Ray Jobs: a local head, `ray job submit` of a tiny run, MLflow and privacy checks.

The head is started with `ray start --head` on non-default ports with its own --temp-dir and
RAY_AUTH_MODE=disabled, and stopped by the pids of its own processes (never a bare `ray stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpfeta import config, data, pipeline, privacy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.long]

TINY = """
data: {source: digits, resolution: 8, channels: 1, num_classes: 10}
central: {rounds: 2, noise_multiplier: null, epsilon_share: 0.3, batch_size: 600}
model: {channels: 8, channel_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], emb_channels: 16}
warmup: {steps: 4, batch_size: 16, checkpoint_every: 2, log_every: 2}
finetune: {batch_size: 128, epochs: 0.2, noise_multiplicity: 1, physical_batch_size: 64,
           checkpoint_every: 1, log_every: 1}
privacy: {epsilon: 10, delta: 1.0e-5}
sample: {steps: 2, num_samples: 40, batch_size: 40}
eval: {classifier_epochs: 1, fid: {num_samples: 40, inception_weights: null}}
run: {dir: RUNS, name: job, num_workers: 1, cpus_per_worker: 1, seed: 918273645}
"""


# --------------------------------------------------------------------------------------------
# The head, stopped by pid
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out[int(p.name)] = (ppid, cmd)
    return out


def cluster_pids(markers: list[str]) -> dict[int, str]:
    """Processes whose command line names this head (its temp dir or GCS port), and their children."""
    procs = _processes()
    own = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers)}
    while True:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in own} - own
        if not children:
            break
        own |= children
    own.discard(os.getpid())
    return {pid: procs[pid][1] for pid in own}


def stop_cluster(markers: list[str], timeout: float = 10.0) -> None:
    """SIGTERM the raylet, then the other daemons, then the GCS; SIGKILL what is left."""

    def order(cmd: str) -> int:
        return 0 if "raylet" in cmd else 2 if "gcs_server" in cmd else 1

    for pid, _cmd in sorted(cluster_pids(markers).items(), key=lambda kv: order(kv[1])):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while cluster_pids(markers) and time.time() < deadline:
        time.sleep(0.5)
    for pid in cluster_pids(markers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="dpj", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = (_free_port() for _ in range(7))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--num-cpus=3",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            # non-default agent ports too: another Ray on the host holds the defaults
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        stop_cluster([temp, f":{gcs}"])
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(head, tmp_path_factory):
    """Submit the tiny run as a Ray job; returns its config, run dir and the submit output."""
    root = tmp_path_factory.mktemp("job")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY.replace("RUNS", str(root / "runs")))
    argv = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["dashboard"],
        "--submission-id",
        f"dpfeta-{root.name}",
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(REPO / "ray_jobs" / "runtime_env.yaml"),
        "--",
        "python",
        "ray_jobs/pipeline.py",
        "--config",
        str(cfg_path),
    ]
    deadline = time.time() + 180
    while True:  # right after `ray start` the job agent may not be up yet
        sub = subprocess.run(argv, env=head["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in sub.stdout + sub.stderr or time.time() > deadline:
            break
        time.sleep(3)
    cfg = config.load(cfg_path)
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    return {
        "cfg": cfg,
        "cfg_path": cfg_path,
        "run_dir": cfg.run_dir(),
        "submit": sub,
        "head": head,
        "id": f"dpfeta-{root.name}",
    }


# --------------------------------------------------------------------------------------------
# Sensitive pixels
# --------------------------------------------------------------------------------------------


def training_copies(canvas: np.ndarray, train: np.ndarray, scales=(1, 2, 3, 4)) -> int:
    """How many windows of ``canvas`` [C,H,W] equal a training image [C,h,w], at any offset and any
    nearest-neighbour scale up to 4 (grids upscale small images)."""
    from numpy.lib.stride_tricks import sliding_window_view

    keys = {img.tobytes() for img in train}
    c, h, w = train.shape[1:]
    hits = 0
    for s in scales:
        for a in range(s):
            for b in range(s):
                sub = np.ascontiguousarray(canvas[:, a::s, b::s])
                if sub.shape[1] < h or sub.shape[2] < w:
                    continue
                windows = sliding_window_view(sub, (c, h, w))[0]
                for row in windows:
                    hits += sum(np.ascontiguousarray(win).tobytes() in keys for win in row)
    return hits


def read_png(path: Path, channels: int) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"))
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def test_copy_detector_finds_planted_training_images(tmp_path):
    from dpfeta import central, images

    cfg = config.load(None, ["data.resolution=8", "finetune.batch_size=64", "central.batch_size=64"])
    train = data.load_splits(cfg).train
    images.save_class_grid(train.images[:20], train.labels[:20], tmp_path / "grid.png")  # scale 2, pad 1
    planted = read_png(tmp_path / "grid.png", 1)
    assert training_copies(planted, train.images) >= 10
    c_grid = central.grid(train.images[:10], columns=5)  # central grid layout: scaled to >= 32 px
    assert training_copies(c_grid, train.images) >= 10
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 60, 60)).astype(np.uint8)
    assert training_copies(noise, train.images) == 0


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def test_job_succeeded_with_epsilon_within_budget(job):
    from ray.job_submission import JobStatus, JobSubmissionClient

    sub = job["submit"]
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    status = JobSubmissionClient(job["head"]["dashboard"]).get_job_status(job["id"])
    assert status == JobStatus.SUCCEEDED
    assert "privacy plan for run 'job'" in sub.stdout and "composed epsilon" in sub.stdout
    result = json.loads((job["run_dir"] / "eval.json").read_text())
    cfg = job["cfg"]
    assert 0 < result["epsilon"] <= cfg.privacy.epsilon
    assert result["delta"] == cfg.privacy.delta and cfg.privacy.accountant == "auto"
    assert result["accountant"] == "pld"  # auto: the tighter of RDP and PLD for a single run
    assert result["steps"] == result["steps_planned"] > 0
    # digits' test split is carved out of the sensitive source: accuracy and FID are non-DP
    assert result["dp"] == {} and 0 <= result["nondp"]["accuracy"] <= 1
    assert result["fid_kind"] == "offline-cnn" and result["nondp"]["fid"] >= 0
    ledger = json.loads((job["run_dir"] / "ledger.json").read_text())
    assert ledger["epsilon_spent"] == pytest.approx(result["epsilon"])
    assert {m["name"]: m["taken"] for m in ledger["mechanisms"]} == {"central": 2, "dpsgd": result["steps"]}
    for name in (
        "config.json",
        "central/grid.png",
        "samples/grid.png",
        "checkpoints/warmup/checkpoint/meta.json",
        "checkpoints/finetune/checkpoint/ema.pt",
    ):
        assert (job["run_dir"] / name).is_file(), name


def _mlflow_run(job):
    from mlflow import MlflowClient

    record = json.loads((job["run_dir"] / "mlflow_run.json").read_text())
    assert record["uri"] == f"sqlite:///{job['run_dir'].parent / 'mlflow.db'}"
    client = MlflowClient(record["uri"])
    return client, client.get_run(record["run_id"])


def _artifacts(client, run_id, path=None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_mlflow_run_has_epsilon_curve_params_and_grids(job):
    client, run = _mlflow_run(job)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "epsilon")
    steps = sorted((m.step, m.value) for m in history)
    result = json.loads((job["run_dir"] / "eval.json").read_text())
    assert steps[0] == (0, pytest.approx(result["epsilon_per_mechanism"]["central"]))
    assert steps[-1] == (result["steps"], pytest.approx(result["epsilon"]))
    assert len(steps) >= 2 and all(a[1] <= b[1] + 1e-9 for a, b in zip(steps, steps[1:]))  # grows with steps
    # Rank 0's reports, forwarded live by the Train callback: public ones by name, the rest under nondp/.
    assert len(client.get_metric_history(run.info.run_id, "finetune/nimg")) == result["steps"]
    assert len(client.get_metric_history(run.info.run_id, "nondp/loss")) == result["steps"]
    assert "loss" not in run.data.metrics and "finetune/loss" not in run.data.metrics
    params = run.data.params
    for key in (
        "dp.noise_multiplier",
        "dp.q",
        "dp.T",
        "dp.delta",
        "dp.accountant",
        "privacy.epsilon",
        "model.channels",
    ):
        assert key in params, key
    files = _artifacts(client, run.info.run_id)
    for name in (
        "release/samples/grid.png",
        "release/central/grid.png",
        "release/config.json",
        "release/ledger.json",
        "release/release.json",
        "release/model/ema.pt",
        "nondp/eval.json",
    ):
        assert name in files, (name, files)
    assert all(f.startswith(("release/", "nondp/")) for f in files), files


def test_nothing_logged_or_stored_copies_training_pixels(job):
    """Every PNG logged to MLflow or written in the run dir is compared with the training split."""
    cfg = job["cfg"]
    train = data.load_splits(cfg).train
    client, run = _mlflow_run(job)
    local = Path(client.download_artifacts(run.info.run_id, "", str(job["run_dir"].parent / "artifacts-check")))
    pngs = sorted(local.rglob("*.png")) + sorted(job["run_dir"].rglob("*.png"))
    assert len(pngs) > 10
    for png in pngs:
        assert training_copies(read_png(png, cfg.data.channels), train.images) == 0, png
    pixel_count = int(np.prod(train.images.shape[1:]))
    seed = str(cfg.run.seed)  # the noise seed is redacted everywhere (docs/privacy.md §7)
    assert seed not in json.dumps(run.data.params) and seed not in json.dumps(run.data.tags)
    stored = sorted(job["run_dir"].rglob("*.json"))  # config.json, checkpoint meta.json, release/, ledgers
    assert len(stored) >= 8 and any(p.name == "meta.json" for p in stored)
    for js in stored:
        assert seed not in js.read_text(), js
    assert json.loads((job["run_dir"] / "release" / "release.json").read_text())["seeded"] is True
    for js in local.rglob("*.json"):  # no dumps of pixel arrays or per-example data, no noise seed
        assert seed not in js.read_text(), js

        def walk(node):
            if isinstance(node, list):  # a list of numbers as long as an image: a pixel dump
                assert len(node) < pixel_count or all(isinstance(v, str) for v in node), (js, len(node))
                for v in node:
                    walk(v)
            elif isinstance(node, dict):
                for v in node.values():
                    walk(v)

        walk(json.loads(js.read_text()))
    for key, value in run.data.metrics.items():  # scalars under known names only
        assert np.isfinite(value)
        assert key.split("/")[0] in {
            "epsilon",
            "epsilon_final",
            "warmup",
            "finetune",
            "accuracy",
            "logreg_accuracy",
            "fid",
            "nondp",
        }, key


def test_rerun_resumes_without_spending_again(job):
    """The same config again, in this process: every stage is found, the ledger is unchanged."""
    before = (job["run_dir"] / "ledger.json").read_text()
    result = pipeline.run(config.replace(job["cfg"], {"run.ray_address": job["head"]["gcs"]}), echo=lambda s: None)
    assert (job["run_dir"] / "ledger.json").read_text() == before
    assert result["epsilon"] == json.loads(before)["epsilon_spent"]
