"""MLflow tracking: absolute store, resume into the same run, nondp suppression, best effort."""

from __future__ import annotations

import json

import pytest

from dpfeta import config, tracking


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    for var in tracking.RUN_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One store for the module: creating a fresh sqlite schema takes seconds."""
    return tmp_path_factory.mktemp("tracking") / "runs"


def cfg_for(root, name, *extra):
    return config.load(None, [f"run.dir={root}", f"run.name={name}", *extra])


def metrics(t: tracking.Tracker) -> dict:
    return dict(t.client.get_run(t.run_id).data.metrics)


def test_default_uri_is_absolute_sqlite_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, ["run.dir=rel/runs"])
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/rel/runs/mlflow.db"
    assert tracking.tracking_uri(cfg).startswith("sqlite:////")  # four slashes: absolute
    monkeypatch.setenv(tracking.ENV_URI, "http://mlflow:5000")
    assert tracking.tracking_uri(cfg) == "http://mlflow:5000"
    assert tracking.tracking_uri(config.replace(cfg, {"tracking.uri": "sqlite:////x.db"})) == "sqlite:////x.db"


def test_run_resumes_params_once_and_artifacts_stay_under_run_dir(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(root, "resume")
    t = tracking.start_run(cfg, params={"a": 1, "b": "x"})
    t.log_dp_metrics({"epsilon": 0.5}, step=3)
    (tmp_path / "f.json").write_text("{}")
    t.log_artifact(tmp_path / "f.json")
    t.end()
    again = tracking.start_run(cfg, params={"a": 2, "c": 3})  # a changed: kept, no crash
    assert again.run_id == t.run_id
    run = again.client.get_run(again.run_id)
    assert run.data.params == {"a": "1", "b": "x", "c": "3"}
    assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()
    assert json.loads((cfg.run_dir() / tracking.RUN_FILE).read_text())["run_id"] == t.run_id


@pytest.mark.parametrize("nondp", [True, False])
def test_nondp_metrics_are_prefixed_or_dropped(root, nondp):
    t = tracking.start_run(cfg_for(root, f"nondp-{str(nondp).lower()}", f"tracking.nondp={str(nondp).lower()}"))
    t.log_nondp_metrics({"loss": 0.3, "nondp/grad_norm": 2.0}, step=1)
    t.log_dp_metrics({"epsilon": 1.0}, step=1)
    got = metrics(t)
    assert got["epsilon"] == 1.0
    if nondp:
        assert got["nondp/loss"] == 0.3 and got["nondp/grad_norm"] == 2.0
    else:
        assert not [k for k in got if k.startswith("nondp/") or k in ("loss", "grad_norm")]
    with pytest.raises(ValueError, match="non-DP"):
        t.log_dp_metrics({"nondp/loss": 1.0})


def test_no_process_learns_a_run_from_the_environment(root, monkeypatch):
    """A run is never found through MLFLOW_RUN_ID & co. (Ray hands a job's env to every task and actor,
    a private sweep's trials included), nor through a process-wide current run: dpfeta logs through the
    ``Tracker`` handle ``start_run`` returns, and nothing else."""
    t = tracking.start_run(cfg_for(root, "worker", "tracking.nondp=false"))
    t.end()
    monkeypatch.setenv(tracking.ENV_URI, t.uri)
    monkeypatch.setenv(tracking.ENV_RUN_ID, t.run_id)
    assert not hasattr(tracking, "current") and not hasattr(tracking, "_current")
    assert not hasattr(tracking, "log_dp_metrics")  # no module-level logger to reach a run by
    assert metrics(t) == {}


def test_off_hides_the_variables(root, monkeypatch):
    import os

    t = tracking.start_run(cfg_for(root, "off"))
    monkeypatch.setenv(tracking.ENV_RUN_ID, t.run_id)
    with tracking.off():
        assert tracking.ENV_RUN_ID not in os.environ
    assert os.environ[tracking.ENV_RUN_ID] == t.run_id
    t.end()


def test_tracking_failures_never_raise(root):
    cfg = cfg_for(root, "broken", "tracking.uri=bogus://nowhere")
    assert tracking.setup(cfg) is None and tracking.start_run(cfg) is None
    broken = tracking.Tracker("bogus://nowhere", "0" * 32, nondp=True)
    for _ in range(tracking.MAX_FAILURES + 1):
        broken.log_dp_metrics({"epsilon": 1.0}, step=1)
    assert broken.enabled is False
    assert tracking.start_run(cfg_for(root, "disabled", "tracking.enabled=false")) is None


def test_the_noise_seed_is_never_logged_nor_stored(root):
    from dpfeta import data, pipeline, privacy

    cfg = cfg_for(
        root, "seeded", "run.seed=1234567", "data.resolution=8", "finetune.batch_size=64", "central.batch_size=64"
    )
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    t = tracking.start_run(cfg, params=tracking.run_params(cfg, pipeline.plan_run(cfg)))
    t.log_params({"run.seed": 1234567, "other": 1})  # the Tracker redacts, whatever the caller passes
    run = t.client.get_run(t.run_id)
    assert run.data.params["run.seed"] == config.SEED_REDACTED
    assert "1234567" not in json.dumps(run.data.params)
    cfg.dump(root / "config.json")
    text = (root / "config.json").read_text()
    assert "1234567" not in text and json.loads(text)["run"]["seed"] == config.SEED_REDACTED
    assert cfg.run.seed == 1234567  # the live config keeps it (tests reproduce)


@pytest.mark.parametrize("nondp", [True, False])
def test_artifacts_outside_release_go_under_nondp_or_nowhere(root, nondp):
    from dpfeta import release

    cfg = cfg_for(root, f"artifacts-{nondp}", f"tracking.nondp={str(nondp).lower()}")
    t = tracking.start_run(cfg)
    run_dir = cfg.run_dir()
    release.write_json(run_dir, "metrics.json", {"epsilon": 1.0})
    (run_dir / "central").mkdir(exist_ok=True)
    (run_dir / "central" / "grid.png").write_bytes(b"png")
    shown = release.put_dir(run_dir, run_dir / "central", "central")
    (run_dir / "eval.json").write_text("{}")
    t.log_artifact(release.release_dir(run_dir) / "metrics.json")
    t.log_artifact(shown / "grid.png")
    t.log_artifact(run_dir / "eval.json")  # not a release file
    t.log_artifact(run_dir / "eval.json", "evaluation")

    def walk(path=None):
        for a in t.client.list_artifacts(t.run_id, path):
            yield from (walk(a.path) if a.is_dir else [a.path])

    logged = set(walk())
    expected = {"release/metrics.json", "release/central/grid.png"}
    if nondp:
        expected |= {"nondp/eval.json", "nondp/evaluation/eval.json"}
    assert logged == expected
