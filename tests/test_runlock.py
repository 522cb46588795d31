"""Faults around the workers: a second process on one run directory, a dead cluster address."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from dpfeta import cluster, pipeline, runlock


def test_a_second_process_on_the_same_run_directory_is_refused_and_the_lock_is_released(tmp_path):
    with runlock.hold(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
        with pytest.raises(ValueError, match=rf"in use by another dpfeta process \(pid {holder['pid']} on host"):
            with runlock.hold(tmp_path):
                pass
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    with runlock.hold(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / runlock.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": time.time() - 60})
    )
    with runlock.hold(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] != gone.pid


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(ValueError, match="on host elsewhere"):
        with runlock.hold(tmp_path):
            pass


@pytest.mark.slow  # seconds of waiting on a dead address, the run's plan
def test_a_dead_cluster_address_is_a_clear_error_in_bounded_time_before_any_spend(tiny_cfg, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cluster, "REACH_TIMEOUT_S", 2.0)
    cfg = pipeline.resolve_config(
        "configs/digits.yaml",
        [
            "data.resolution=8",
            f"run.dir={tiny_cfg().run.dir}",
            f"run.ray_address=127.0.0.1:{port}",
            "tracking.enabled=false",
        ],
    )
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"127.0.0.1:{port}.*did not answer within"):
        cluster.check_reachable(cfg, timeout=2.0)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="did not answer"):
        pipeline.run(cfg, echo=lambda line: None)
    assert not (cfg.run_dir() / "ledger.json").exists()  # refused before the run directory was touched
    with pytest.raises(ValueError, match="expected host:port"):
        cluster.check_reachable(pipeline.resolve_config(None, ["run.ray_address=nonsense"]))


SLOW_COMMAND = """
import sys, time
from dpfeta import cli

def slow(args, cfg):
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        if "--slow-cleanup" in sys.argv:
            time.sleep(60)  # a second Ctrl-C must not wait for this
    return 0

cli.COMMANDS[0] = ("budget", slow, "a slow stand-in", [("--slow-cleanup", {"action": "store_true"})])
sys.exit(cli.main(["budget", "--config", "configs/digits.yaml", *sys.argv[1:]]))
"""


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    "signals, extra", [(["SIGTERM"], []), (["SIGINT"], []), (["SIGINT", "SIGINT"], ["--slow-cleanup"])]
)
def test_an_interrupt_stops_cleanly_and_a_second_one_at_once(signals, extra):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMMAND, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.5)
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert time.monotonic() - start < 20 and rc == 130, err
    if len(signals) == 1:  # the clean stop says so; the second signal exits without a word
        assert f"interrupted ({signals[0]}); stopped cleanly" in err and "rerun the same command" in err
