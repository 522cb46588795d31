"""MLflow on a cluster: the artifacts go to the object store (the local S3 endpoint), so nothing
lives only on the head; read back through MLflow."""

from __future__ import annotations

from dpfeta import config, release, tracking


def test_artifacts_land_in_the_bucket_and_read_back(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from dpfeta.storage import Storage

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)  # MLflow's boto3 client, like a server's
    db = tmp_path / "mlflow.db"
    cfg = config.load(
        None,
        [
            f"run.dir={tmp_path}/runs",
            "run.name=s3art",
            f"tracking.uri=sqlite:///{db}",
            f"tracking.artifact_location={s3_bucket}/mlflow",
            "tracking.experiment=s3",
        ],
    )
    run_dir = cfg.run_dir()
    card = release.release_dir(run_dir) / release.CARD_FILE
    card.parent.mkdir(parents=True)
    card.write_text("# release card\nepsilon 1.0\n")
    tracker = tracking.start_run(cfg, run_dir)
    assert tracker is not None
    tracker.log_artifact(card)
    tracker.end()

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith(f"{s3_bucket}/mlflow/")
    keys = Storage(f"{s3_bucket}/mlflow").list_files()
    assert any(k.endswith("artifacts/release/README.md") for k in keys), keys
    got = client.download_artifacts(tracker.run_id, "release/README.md", str(tmp_path / "back"))
    assert open(got).read() == "# release card\nepsilon 1.0\n"
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "runs" / "mlartifacts").exists()
