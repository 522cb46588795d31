"""The release of a run: an unseeded run in release mode end to end (OS entropy), what release/
holds, what MLflow receives (only files of release/), and the step-by-step CLI composing the same
ledger as ``dpfeta run``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dpfeta import cli, config, data, pipeline, privacy, release

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TINY = ["data.resolution=8", "central.rounds=2", "central.noise_multiplier=null", "central.epsilon_share=0.3",
        "central.batch_size=600", "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1",
        "model.attn_resolutions=[]", "model.emb_channels=16", "warmup.steps=3", "warmup.batch_size=16",
        "warmup.checkpoint_every=3", "finetune.batch_size=128", "finetune.epochs=0.15",
        "finetune.noise_multiplicity=1", "finetune.physical_batch_size=64", "finetune.checkpoint_every=2",
        "finetune.log_every=1", "privacy.epsilon=10", "sample.steps=2", "sample.num_samples=30",
        "sample.batch_size=30", "eval.classifier_epochs=1", "eval.fid.num_samples=30", "run.cpus_per_worker=1",
        "eval.fid.inception_weights=null"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def unseeded(tmp_path_factory):
    """``dpfeta run`` in release mode (tracking.nondp: false), no run.seed: OS entropy throughout."""
    root = tmp_path_factory.mktemp("release")
    cfg = config.load(None, [*TINY, f"run.dir={root}", "run.name=unseeded", "tracking.nondp=false"])
    assert cfg.run.seed is None
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    lines: list[str] = []
    result = pipeline.run(cfg, echo=lines.append)
    return cfg, result, lines


def test_an_unseeded_run_spends_exactly_its_plan(unseeded):
    cfg, result, _ = unseeded
    pl = pipeline.plan_run(cfg)
    ledger = privacy.Ledger.load(cfg.run_dir() / "ledger.json")
    assert {m.name: m.taken for m in ledger.mechanisms} == {"central": 2, "dpsgd": pl.steps}
    assert ledger.seeded is False
    assert result["epsilon"] == pytest.approx(pl.epsilon, rel=1e-9) and result["epsilon"] <= cfg.privacy.epsilon
    assert result["epsilon"] == pytest.approx(10.0, rel=1e-3)  # calibrated to the target


def test_release_holds_exactly_the_covered_outputs(unseeded):
    cfg, result, lines = unseeded
    root = release.release_dir(cfg.run_dir())
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    fixed = {"README.md", "release.json", "metrics.json", "ledger.json", "config.json", "model/ema.pt",
             "model/model.pt", "model/meta.json", "central/grid.png", "central/central.json",
             "samples/grid.png", "samples/samples.json"}
    assert fixed <= files
    assert {f.split("/")[0] for f in files - fixed} <= {"central", "samples"}  # the images themselves
    assert not [f for f in files if f.endswith((".tmp", "optimizer.pt", "extra.pt"))]
    record = json.loads((root / "release.json").read_text())
    assert record["epsilon"] == pytest.approx(result["epsilon"]) and record["seeded"] is False
    assert record["n"] == data.public_train_size(cfg) and record["neighbouring_relation"] == privacy.NEIGHBOURING_RELATION
    assert any(f.startswith("test split: sensitive") for f in record["public_facts"])
    card = (root / "README.md").read_text()
    assert f"epsilon = {result['epsilon']:.4f}" in card and "seeded: false" in card
    # digits' test split is carved out of the sensitive source: no accuracy or FID in the release
    metrics = json.loads((root / "metrics.json").read_text())
    assert "accuracy" not in metrics and "fid" not in metrics and metrics["epsilon"] == pytest.approx(result["epsilon"])
    assert result["dp"] == {} and result["nondp"] == {} and len(result["withheld"]) == 2
    assert "withheld" in lines[-1] and str(root) in lines[-1]


def test_release_mode_mlflow_receives_only_files_of_release(unseeded):
    from mlflow import MlflowClient

    cfg, _, _ = unseeded
    record = json.loads((cfg.run_dir() / "mlflow_run.json").read_text())
    client = MlflowClient(record["uri"])

    def walk(path=None):
        for a in client.list_artifacts(record["run_id"], path):
            yield from (walk(a.path) if a.is_dir else [a.path])

    logged = list(walk())
    root = release.release_dir(cfg.run_dir())
    assert {"release/ledger.json", "release/release.json", "release/model/ema.pt", "release/samples/grid.png",
            "release/central/grid.png"} <= set(logged)
    for path in logged:
        assert path.startswith("release/") and (root / path[len("release/"):]).is_file(), path
    run = client.get_run(record["run_id"])
    assert not [k for k in run.data.metrics if k.startswith("nondp/")]
    assert "accuracy" not in run.data.metrics  # measured on sensitive records: withheld


def _cli(tmp_path: Path, *argv: str, extra: tuple[str, ...] = ()) -> int:
    yaml_path = tmp_path / "empty.yaml"
    yaml_path.write_text("{}\n")
    args = [argv[0], "--config", str(yaml_path), *argv[1:]]
    for item in [*TINY, f"run.dir={tmp_path}", "run.name=staged", "tracking.enabled=false", *extra]:
        args += ["--set", item]
    return cli.main(args)


def test_the_step_by_step_cli_composes_the_same_ledger_as_dpfeta_run(unseeded, tmp_path, capsys):
    _, result, _ = unseeded
    c, w, f = tmp_path / "central", tmp_path / "warmup", tmp_path / "finetune"
    assert _cli(tmp_path, "central", "--out", str(c)) == 0
    assert _cli(tmp_path, "central", "--out", str(c)) == 2  # a folder that already spent: refused
    assert "already holds" in capsys.readouterr().err
    # fine-tuning from a warm-up of central images made with another plan is refused
    assert _cli(tmp_path, "warmup", "--central", str(c), "--out", str(w)) == 0
    assert privacy.Ledger.load(w / "ledger.json").epsilon() == pytest.approx(
        privacy.Ledger.load(c / "ledger.json").epsilon())
    assert _cli(tmp_path, "finetune", "--init", str(w), "--out", str(f), extra=("central.rounds=3",)) == 2
    assert "different spend" in capsys.readouterr().err and not (f / "ledger.json").exists()
    assert _cli(tmp_path, "finetune", "--init", str(w), "--out", str(f)) == 0
    staged = privacy.Ledger.load(f / "ledger.json")
    assert {m.name: m.taken for m in staged.mechanisms} == {"central": 2, "dpsgd": result["steps"]}
    assert staged.epsilon() == pytest.approx(result["epsilon"], rel=1e-9)  # the same total as dpfeta run
    assert f"composed epsilon {result['epsilon']:.4f}" in capsys.readouterr().out
