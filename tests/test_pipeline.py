"""Pipeline pieces without Ray or MLflow: ledger resume, refusals, stage resume, epsilon curve, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpfeta import cli, cluster, config, data, pipeline, privacy, tracking
from dpfeta.rundir import RunDir
from dpfeta.storage import Workspace

BASE = [
    "data.resolution=8",
    "central.rounds=2",
    "central.batch_size=600",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "finetune.batch_size=128",
    "finetune.epochs=1",
    "privacy.epsilon=4",
    "tracking.enabled=false",
    "eval.classifier_epochs=1",
    "run.name=t",
    "privacy.accountant=rdp",  # the accountant is not the point here (PLD calibration: tests/test_accountant_pld.py)
    "eval.fid.inception_weights=null",
]  # offline FID: Inception at 299 px is minutes on a CPU


def make_cfg(tmp_path, *extra) -> config.Config:
    cfg = config.load(None, [*BASE, f"run.dir={tmp_path}", *extra])
    return privacy.resolve(cfg, data.public_train_size(cfg))


class Recorder:
    def __init__(self):
        self.dp: list[tuple[dict, int]] = []

    def log_dp_metrics(self, metrics, *, step=None):
        self.dp.append((dict(metrics), step))


def test_ledger_epsilon_counts_a_stage_taken_before_the_others(tmp_path):
    pl = pipeline.plan_run(make_cfg(tmp_path))
    assert pl.ledger.epsilon() == 0.0
    pl.ledger.record_steps("central", 2)
    central_alone = pl.ledger.per_mechanism(planned=False)["central"]
    assert central_alone > 0 and pl.ledger.epsilon() == pytest.approx(central_alone)
    pl.ledger.record_steps("dpsgd", pl.steps)
    assert pl.ledger.epsilon() == pytest.approx(pl.epsilon) and pl.epsilon <= 4


def _stored_with_sigma(tmp_path, factor: float):
    """A run directory whose ledger.json holds the plan with DP-SGD sigma scaled by ``factor``."""
    cfg = make_cfg(tmp_path)
    pl = pipeline.plan_run(cfg)
    cfg.run_dir().mkdir(parents=True)
    stored = privacy.Ledger.from_state_dict(pl.ledger.state_dict())
    stored.get("dpsgd").noise_multiplier = pl.noise_multiplier * factor
    stored.save(cfg.run_dir() / "ledger.json")
    return cfg, pl, cfg.run_dir()


def test_resume_refuses_a_stored_plan_above_the_target(tmp_path):
    cfg, _, run_dir = _stored_with_sigma(tmp_path, 0.9)  # e.g. planned by an older, looser accountant
    with pytest.raises(ValueError, match="above the target"):
        _open(cfg, run_dir, pipeline.plan_run(cfg))


def _open(cfg, run_dir, pl) -> RunDir:
    """The run folder ``run_dir`` of plan ``pl`` with its ledger opened (stored or written)."""
    run = RunDir.of(cfg, Workspace(run_dir), pl)
    run.open_ledger()
    return run


def test_resume_keeps_the_stored_sigma_and_refuses_another_plan(tmp_path):
    cfg, pl, run_dir = _stored_with_sigma(tmp_path, 1.01)  # e.g. calibrated by an older release
    resumed = _open(cfg, run_dir, pipeline.plan_run(cfg)).plan
    assert (
        resumed.noise_multiplier == pytest.approx(pl.noise_multiplier * 1.01)
        and resumed.ledger.get("dpsgd").noise_multiplier == resumed.noise_multiplier
    )
    with pytest.raises(ValueError, match="different privacy plan"):
        _open(cfg, run_dir, pipeline.plan_run(config.replace(cfg, {"finetune.epochs": 2})))


def test_a_changed_config_is_refused_but_sampling_settings_may_change(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.run_dir().mkdir(parents=True)
    cfg.dump(cfg.run_dir() / "config.json")
    pl = pipeline.plan_run(cfg)
    RunDir.of(
        config.replace(cfg, {"sample.steps": 8, "eval.classifier_epochs": 3}), Workspace(cfg.run_dir()), pl
    ).check_resume()
    with pytest.raises(ValueError, match="privacy.epsilon"):
        RunDir.of(config.replace(cfg, {"privacy.epsilon": 8}), Workspace(cfg.run_dir()), pl).check_resume()


def test_bad_data_fails_before_any_privacy_spend(tmp_path):
    cfg = make_cfg(tmp_path, "data.n_train=1000")  # the digits training split has 1258 records
    with pytest.raises(ValueError, match="1000"):
        pipeline.run(cfg, echo=lambda s: None)
    ledger = json.loads((cfg.run_dir() / "ledger.json").read_text())
    assert all(m["taken"] == 0 for m in ledger["mechanisms"]) and ledger["epsilon_spent"] == 0
    assert not (cfg.run_dir() / "central").exists()


def test_warmup_without_central_images_is_refused_before_data(tmp_path):
    with pytest.raises(ValueError, match="central.rounds"):
        pipeline.plan_run(make_cfg(tmp_path, "central.rounds=0"))


def test_central_stage_releases_once_and_finishes_an_interrupted_move(tmp_path):
    cfg = make_cfg(tmp_path, "run.seed=0")
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    run = _open(cfg, run_dir, pipeline.plan_run(cfg))
    pl, train = run.plan, data.load_splits(cfg).train
    first = pipeline.stage_central(run, train)
    assert len(first) == 2 * 10 and pl.ledger.get("central").taken == 2
    assert json.loads((run_dir / "ledger.json").read_text())["epsilon_spent"] > 0
    (run_dir / "central").rename(run_dir / "central.tmp")  # interrupted after recording, before the move
    again = pipeline.stage_central(_open(cfg, run_dir, pl), train)
    assert np.array_equal(np.sort(again.images.reshape(20, -1), 0), np.sort(first.images.reshape(20, -1), 0))
    assert pl.ledger.get("central").taken == 2 and not (run_dir / "central.tmp").exists()


def test_epsilon_curve_rises_from_the_central_query_to_the_total(tmp_path, monkeypatch):
    pl = pipeline.plan_run(make_cfg(tmp_path))
    pl.ledger.record_steps("central", 2)
    pl.ledger.record_steps("dpsgd", pl.steps)
    recorder = Recorder()
    tracking.log_epsilon_curve(recorder, pl.ledger, points=5)
    curve = [(step, m["epsilon"]) for m, step in recorder.dp]
    assert curve[0] == (0, pytest.approx(pl.ledger.per_mechanism(planned=False)["central"]))
    assert curve[-1] == (pl.steps, pytest.approx(pl.epsilon))
    assert all(a[1] < b[1] for a, b in zip(curve, curve[1:]))


def test_dpfeta_evaluate_cli_reads_the_ledger_beside_the_samples(tmp_path, capsys):
    from dpfeta import images

    cfg = make_cfg(tmp_path)
    run_dir = cfg.run_dir()
    pl = pipeline.plan_run(cfg)
    pl.ledger.record_steps("central", 2)
    run_dir.mkdir(parents=True)
    pl.ledger.save(run_dir / "ledger.json")
    test = data.load_splits(cfg).test
    images.save_class_folders(test.images[:60], test.labels[:60], run_dir / "samples" / "images")
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("{}\n")  # everything comes from --set
    argv = ["evaluate", "--config", str(yaml_path), "--samples", str(run_dir / "samples")]
    for item in [*BASE, f"run.dir={tmp_path}"]:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    out = json.loads((run_dir / "samples" / "eval.json").read_text())
    assert out["epsilon"] == pytest.approx(pl.ledger.epsilon())
    # digits' test split is carved out of the sensitive source: its metrics are non-DP
    assert out["fid_kind"] == "offline-cnn" and 0 <= out["nondp"]["accuracy"] <= 1 and out["dp"] == {}
    assert "accuracy" in capsys.readouterr().out


@pytest.fixture
def fake_gpu_ray():
    """A local Ray that advertises one (fake) GPU: tasks asking for it run on the CPU here."""
    import ray

    if ray.is_initialized():  # the session's shared local Ray (conftest.local_ray) has no GPU
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a Ray session of its own
def test_gpu_stages_run_as_ray_tasks_from_a_cpu_driver(tmp_path, fake_gpu_ray):
    """run.use_gpu on a driver without CUDA: warm-up, sampling and evaluation go to a GPU task and
    their files come back through the object store."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the driver has a GPU: stages run in process")
    cfg = make_cfg(
        tmp_path,
        "run.use_gpu=true",
        "run.seed=0",
        "model.channels=8",
        "model.channel_mult=[1]",
        "model.attn_resolutions=[]",
        "model.emb_channels=16",
        "warmup.steps=2",
        "warmup.batch_size=8",
        "sample.steps=2",
        "sample.num_samples=20",
        "sample.batch_size=20",
        "eval.fid.num_samples=20",
    )
    assert cluster.needs_remote(cfg)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    run = _open(cfg, run_dir, pipeline.plan_run(cfg))
    splits = data.load_splits(cfg)
    central_set = pipeline.stage_central(run, splits.train)
    ckpt = pipeline.stage_warmup(run, central_set)
    assert (ckpt.local_path / "meta.json").is_file() and (ckpt.local_path / "ema.pt").is_file()
    synthetic = pipeline.stage_sample(run, ckpt)
    assert len(synthetic) == 20 and (run_dir / "samples" / "grid.png").is_file()
    result = cluster.run_on_gpu(cfg, pipeline._evaluate_task, cfg, synthetic, splits)
    assert result["num_synthetic"] == 20 and result["fid_kind"] == "offline-cnn"
