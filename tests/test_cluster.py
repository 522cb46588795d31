"""cluster: one rule for where Ray runs, the device, stages as GPU tasks, file packing."""

from __future__ import annotations

import pytest

from dpfeta import cluster


class FakeRay:
    def __init__(self):
        self.calls, self.up, self.stopped = [], False, 0

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.calls.append(kwargs)
        self.up = True

    def shutdown(self):
        self.up, self.stopped = False, self.stopped + 1


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = FakeRay()
    for name in ("is_initialized", "init", "shutdown"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_started", False)
    return fake


def test_without_an_address_a_private_local_cluster_is_started_and_stopped(fake_ray, tiny_cfg):
    cfg = tiny_cfg("run.num_workers=2", "run.cpus_per_worker=1")
    with cluster.session(cfg):
        (call,) = fake_ray.calls
        assert call["address"] == "local"  # never whatever cluster an address file on disk names
        assert call["num_cpus"] == 2 + cluster.RAY_DATA_HEADROOM_CPUS
    assert fake_ray.stopped == 1


@pytest.mark.parametrize("where", ["config", "env"])
def test_an_explicit_address_is_joined_and_left_running(fake_ray, tiny_cfg, monkeypatch, where):
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        cfg = tiny_cfg()
    else:
        cfg = tiny_cfg("run.ray_address=10.0.0.1:6379")
    with cluster.session(cfg):
        pass
    assert [c["address"] for c in fake_ray.calls] == ["10.0.0.1:6379"] and fake_ray.stopped == 0


def test_a_running_session_is_reused(fake_ray, tiny_cfg):
    fake_ray.up = True
    with cluster.session(tiny_cfg()):
        pass
    cluster.connect(tiny_cfg())
    assert fake_ray.calls == [] and fake_ray.stopped == 0


def test_cpu_runs_stages_in_process_and_files_round_trip(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    assert str(cluster.device(cfg)) == "cpu" and not cluster.needs_remote(cfg)
    assert cluster.run_on_gpu(cfg, lambda a, b: a + b, 2, 3) == 5
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.bin").write_bytes(b"\x00\x01")
    packed = cluster.pack(tmp_path / "a")
    cluster.unpack(packed, tmp_path / "c")
    assert packed == {"b/f.bin": b"\x00\x01"} and (tmp_path / "c" / "b" / "f.bin").read_bytes() == b"\x00\x01"
