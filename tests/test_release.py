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
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # the session's local Ray (conftest)

TINY = [
    "data.resolution=8",
    "central.rounds=2",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "central.batch_size=600",
    "model.channels=8",
    "model.channel_mult=[1, 2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.emb_channels=16",
    "warmup.steps=3",
    "warmup.batch_size=16",
    "warmup.checkpoint_every=3",
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
    "eval.fid.num_samples=30",
    "run.cpus_per_worker=1",
    "eval.fid.inception_weights=null",
    "privacy.accountant=rdp",
]  # one calibration per command in seconds; PLD plans: tests/test_accountant_pld.py


@pytest.fixture(scope="module")
def unseeded(local_ray, tmp_path_factory):
    """``dpfeta run`` in release mode (tracking.nondp: false), no run.seed: OS entropy throughout."""
    root = tmp_path_factory.mktemp("release")
    cfg = config.load(
        None,
        [*TINY, f"run.dir={root}", "run.name=unseeded", "tracking.nondp=false", "tracking.register_as=dpfeta-unseeded"],
    )
    assert cfg.run.seed is None
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    lines: list[str] = []
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    result = pipeline.run(cfg, echo=lines.append)
    # logging the model through MLflow's fluent API leaves the process's MLflow target as it was
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before, "the run left MLFLOW_TRACKING_URI set"
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
    fixed = {
        "README.md",
        "release.json",
        "metrics.json",
        "ledger.json",
        "config.json",
        "model/ema.pt",
        "model/model.pt",
        "model/meta.json",
        "central/grid.png",
        "central/central.json",
        "samples/grid.png",
        "samples/samples.json",
    }
    assert fixed <= files
    assert {f.split("/")[0] for f in files - fixed} <= {"central", "samples"}  # the images themselves
    assert not [f for f in files if f.endswith((".tmp", "optimizer.pt", "extra.pt"))]
    record = json.loads((root / "release.json").read_text())
    assert record["epsilon"] == pytest.approx(result["epsilon"]) and record["seeded"] is False
    assert (
        record["n"] == data.public_train_size(cfg) and record["neighbouring_relation"] == privacy.NEIGHBOURING_RELATION
    )
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
    assert {
        "release/ledger.json",
        "release/release.json",
        "release/model/ema.pt",
        "release/samples/grid.png",
        "release/central/grid.png",
    } <= set(logged)
    for path in logged:
        assert path.startswith("release/") and (root / path[len("release/") :]).is_file(), path
    run = client.get_run(record["run_id"])
    assert not [k for k in run.data.metrics if k.startswith("nondp/")]
    assert "accuracy" not in run.data.metrics  # measured on sensitive records: withheld


def _mlflow_run(cfg):
    import mlflow
    from mlflow import MlflowClient

    record = json.loads((cfg.run_dir() / "mlflow_run.json").read_text())
    mlflow.set_tracking_uri(record["uri"])
    client = MlflowClient(record["uri"])
    return client, client.get_run(record["run_id"])


def test_the_logged_mlflow_model_loads_and_samples_the_requested_labels(unseeded):
    import mlflow
    import numpy as np
    import pandas as pd

    cfg, _, _ = unseeded
    _, run = _mlflow_run(cfg)
    model = mlflow.pyfunc.load_model(run.data.tags["dpfeta.model_uri"])
    labels = [0, 3, 3, 9, 5]
    images = model.predict(pd.DataFrame({"label": labels}), params={"seed": 7, "steps": 2})
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8, type(images)
    assert images.shape == (len(labels), 1, 8, 8), f"expected ({len(labels)}, 1, 8, 8), got {images.shape}"
    again = model.predict(pd.DataFrame({"label": labels}), params={"seed": 7, "steps": 2})
    assert np.array_equal(images, again)  # a sampling seed reproduces (sampling is post-processing)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["label"] and model.metadata.saved_input_example_info is not None
    with pytest.raises(Exception, match="class ids in 0..9"):
        model.predict(pd.DataFrame({"label": [10]}))
    # registered under tracking.register_as, the same model
    registered = mlflow.pyfunc.load_model("models:/dpfeta-unseeded/1")
    assert registered.predict(pd.DataFrame({"label": [1, 2]}), params={"steps": 2}).shape == (2, 1, 8, 8)


def test_the_model_card_states_the_ledgers_epsilon(unseeded):
    import mlflow

    cfg, result, _ = unseeded
    client, run = _mlflow_run(cfg)
    ledger = privacy.Ledger.load(release.release_dir(cfg.run_dir()) / "ledger.json")
    record = json.loads((release.release_dir(cfg.run_dir()) / "release.json").read_text())
    [model] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    tags = model.tags
    assert float(tags["dp.epsilon"]) == pytest.approx(ledger.epsilon(), rel=1e-12), (
        tags["dp.epsilon"],
        ledger.epsilon(),
    )
    assert tags["dp.delta"] == f"{ledger.delta:g}" and tags["dp.accountant"] == ledger.accountant
    assert tags["dp.n"] == str(ledger.n) and tags["dp.config_sha256"] == record["config_sha256"]
    assert tags["dp.neighbouring_relation"] == privacy.NEIGHBOURING_RELATION
    version = client.get_model_version("dpfeta-unseeded", "1")
    assert f"epsilon = {ledger.epsilon():.4f}" in version.description and version.run_id == run.info.run_id
    assert float(version.tags["dp.epsilon"]) == pytest.approx(ledger.epsilon(), rel=1e-12)
    # the run: description, code version, the epsilon curve logged live by the workers' reports
    note = run.data.tags["mlflow.note.content"]
    assert f"epsilon = {result['epsilon']:.4f}" in note and "withheld" in note
    assert run.data.tags["dpfeta.torch_version"] and run.data.tags["dpfeta.ray_version"] == ray.__version__
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epsilon")}
    assert curve[result["steps"]] == pytest.approx(ledger.epsilon(), rel=1e-9) and 1 in curve


def test_release_mode_the_model_holds_only_release_files(unseeded):
    import mlflow

    cfg, _, _ = unseeded
    _, run = _mlflow_run(cfg)
    root = release.release_dir(cfg.run_dir())
    local = Path(mlflow.artifacts.download_artifacts(run.data.tags["dpfeta.model_uri"]))
    data_files = {p.name: p for p in (local / "artifacts").rglob("*") if p.is_file()}
    assert set(data_files) == {"ema.pt", "meta.json", "config.json", "release.json"}, sorted(data_files)
    for rel in ("model/ema.pt", "model/meta.json", "config.json", "release.json"):
        assert data_files[Path(rel).name].read_bytes() == (root / rel).read_bytes(), rel
    assert not [p for p in local.rglob("*") if p.name in ("optimizer.pt", "extra.pt", "eval.json", "dpfeta.log")]


def _cli(tmp_path: Path, *argv: str, extra: tuple[str, ...] = ()) -> int:
    yaml_path = tmp_path / "empty.yaml"
    yaml_path.write_text("{}\n")
    args = [argv[0], "--config", str(yaml_path), *argv[1:]]
    for item in [*TINY, f"run.dir={tmp_path}", "run.name=staged", "tracking.enabled=false", *extra]:
        args += ["--set", item]
    return cli.main(args)


@pytest.mark.long  # ~70 s of stage-by-stage CLI calls: in make ci, not in make test
def test_the_step_by_step_cli_composes_the_same_ledger_as_dpfeta_run(unseeded, tmp_path, capsys):
    _, result, _ = unseeded
    c, w, f = tmp_path / "central", tmp_path / "warmup", tmp_path / "finetune"
    assert _cli(tmp_path, "central", "--out", str(c)) == 0
    assert _cli(tmp_path, "central", "--out", str(c)) == 2  # a folder that already spent: refused
    assert "already holds" in capsys.readouterr().err
    # fine-tuning from a warm-up of central images made with another plan is refused
    assert _cli(tmp_path, "warmup", "--central", str(c), "--out", str(w)) == 0
    assert privacy.Ledger.load(w / "ledger.json").epsilon() == pytest.approx(
        privacy.Ledger.load(c / "ledger.json").epsilon()
    )
    assert _cli(tmp_path, "finetune", "--init", str(w), "--out", str(f), extra=("central.rounds=3",)) == 2
    assert "different spend" in capsys.readouterr().err and not (f / "ledger.json").exists()
    assert _cli(tmp_path, "finetune", "--init", str(w), "--out", str(f)) == 0
    staged = privacy.Ledger.load(f / "ledger.json")
    assert {m.name: m.taken for m in staged.mechanisms} == {"central": 2, "dpsgd": result["steps"]}
    assert staged.epsilon() == pytest.approx(result["epsilon"], rel=1e-9)  # the same total as dpfeta run
    assert f"composed epsilon {result['epsilon']:.4f}" in capsys.readouterr().out
