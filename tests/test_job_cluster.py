"""cluster.yaml / cluster-gcp.yaml / ray_jobs/runtime_env.yaml are valid for Ray 2.60 and say what the runbook says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_cluster_yaml_matches_the_launcher_schema_and_the_runbook(name):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(cluster, schema)
    head = cluster["available_node_types"][cluster["head_node_type"]]
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8) and cluster["max_workers"] == 8
    assert "GPU" not in head["resources"]
    assert cluster["docker"]["image"].startswith("rayproject/ray:2.60.0") and "gpu" in cluster["docker"]["image"]
    assert any("pip install" in c and "dpfeta" in c for c in cluster["setup_commands"])
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    assert any("mlflow server" in c for c in cluster["head_start_ray_commands"])


def test_runtime_env_is_valid_and_keeps_data_out_of_the_upload():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    for pattern in ("runs/", ".venv/", "*.db", "data/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"


@pytest.mark.parametrize("name, command", [("pipeline.py", "run"), ("tune.py", "tune")])
def test_ray_jobs_entry_points_are_thin_calls_of_the_cli(name, command):
    text = (REPO / "ray_jobs" / name).read_text()
    assert len(text.splitlines()) <= 30 and f'cli.main(["{command}"' in text and "ray job submit" in text
