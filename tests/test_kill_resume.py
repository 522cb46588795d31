"""The driver killed (SIGKILL of its whole process group: the driver and the local Ray it started)
during the warm-up, during DP-SGD and during sampling; each rerun of the same command resumes from the
last committed stage and step, and the run ends with the planned T and epsilon, each mechanism counted
once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from dpfeta import pipeline, privacy

pytestmark = [pytest.mark.slow, pytest.mark.long]
REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    *TINY,
    "central.rounds=2",
    "central.batch_size=600",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "warmup.steps=100",
    "warmup.checkpoint_every=20",
    "warmup.log_every=20",
    "finetune.batch_size=128",
    "finetune.epochs=1",
    "finetune.checkpoint_every=1",
    "sample.num_samples=100",
    "sample.shard_size=20",
    "sample.batch_size=20",
    "sample.steps=16",
    "eval.fid.num_samples=100",
    "run.name=killed",
]


def _start(run_dir: Path, log: Path) -> subprocess.Popen:
    config = run_dir.parent / "killed.yaml"
    config.write_text("run: {name: killed}\n")
    sets = [a for o in [*OVERRIDES, f"run.dir={run_dir}"] for a in ("--set", o)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dpfeta", "run", "--config", str(config), *sets],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
            proc.wait(timeout=30)
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ray_steps(run: Path) -> int:
    return max((int(p.name[5:]) for p in run.glob("checkpoints/finetune/ray/*/step_*")), default=0)


def test_sigkill_in_each_stage_then_rerun_resumes_with_the_same_epsilon(tmp_path):
    root = tmp_path / "runs"
    run = root / "killed"
    logs = [tmp_path / f"attempt{i}.log" for i in range(4)]

    # 1. killed during the warm-up, after its step-40 checkpoint
    proc = _start(root, logs[0])
    _kill_when(
        proc,
        lambda: (_json(run / "checkpoints/warmup/checkpoint/meta.json") or {}).get("step", 0) >= 40,
        "a warm-up checkpoint at step >= 40",
    )
    ledger = privacy.Ledger.from_state_dict(_json(run / "ledger.json"))
    assert ledger.get("central").taken == 2 and ledger.get("dpsgd").taken == 0

    # 2. killed during DP-SGD, after its step-2 checkpoint; the warm-up resumed, not from 0
    proc = _start(root, logs[1])
    _kill_when(proc, lambda: _ray_steps(run) >= 2, "a DP-SGD checkpoint at step >= 2")
    text = logs[1].read_text() + (run / "logs" / "dpfeta.log").read_text()  # INFO lines go to the run's log
    resumed = [int(line.split("(steps ")[1].split("..")[0]) for line in text.splitlines() if "warmup: done" in line]
    assert resumed and resumed[0] >= 40, text[-3000:]

    # 3. killed during sampling, after its first shard
    proc = _start(root, logs[2])
    _kill_when(proc, lambda: any((run / "checkpoints/sample").glob("*.json")), "a finished sampling shard")
    first_shards = {p.name: p.read_text() for p in (run / "checkpoints/sample").glob("*.json")}

    # 4. the rerun finishes
    proc = _start(root, logs[3])
    assert proc.wait(timeout=600) == 0, logs[3].read_text()[-3000:]
    for name, text in first_shards.items():  # finished shards were not redone
        assert (run / "checkpoints/sample" / name).read_text() == text

    cfg = pipeline.resolve_config(None, [*OVERRIDES, f"run.dir={root}"])
    pl = pipeline.plan_run(cfg)
    final = privacy.Ledger.from_state_dict(_json(run / "ledger.json"))
    assert {m.name: m.taken for m in final.mechanisms} == {"central": 2, "dpsgd": pl.steps}  # each counted once
    assert math.isclose(final.epsilon(), pl.epsilon, rel_tol=1e-9)
    assert math.isclose(_json(run / "eval.json")["epsilon"], pl.epsilon, rel_tol=1e-9)
    assert len(list((run / "samples/images").rglob("*.png"))) == 100
    assert not (run / "run.lock").exists()  # each killed holder was taken over, the last one released
    print("SIGKILL resume: warm-up resumed from step", resumed[0], "; epsilon", final.epsilon(), "= plan", pl.epsilon)
