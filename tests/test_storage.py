"""The storage layer on a local folder and on a local S3 endpoint: atomic commits, folders with
markers, clear errors naming the URI before any budget is spent, write faults that keep the old file."""

from __future__ import annotations

import json
import pickle

import pytest
from conftest import FaultyFilesystem

from dpfeta import storage
from dpfeta.storage import Storage, StorageError, Workspace


def _roundtrip(store: Storage, tmp_path):
    store.write_json("a/ledger.json", {"eps": 1.0})
    assert store.read_json("a/ledger.json") == {"eps": 1.0} and store.is_file("a/ledger.json")
    assert not store.exists("a/none.json")
    src = tmp_path / "src"
    (src / "images" / "3").mkdir(parents=True)
    (src / "images" / "3" / "0.png").write_bytes(b"png")
    (src / "grid.png").write_bytes(b"grid")
    assert not store.committed("samples")
    store.put_dir(src, "samples")
    assert store.committed("samples")
    assert store.list_files("samples") == ["_COMMITTED", "grid.png", "images/3/0.png"]
    got = tmp_path / "got"
    assert sorted(store.get_dir("samples", got)) == ["grid.png", "images/3/0.png"]
    assert (got / "images" / "3" / "0.png").read_bytes() == b"png"
    clone = pickle.loads(pickle.dumps(store))  # travels to Ray workers as its URI
    assert clone == store and clone.read_json("a/ledger.json") == {"eps": 1.0}
    assert clone.child("a").read_json("ledger.json") == {"eps": 1.0}
    store.delete("samples")
    assert not store.committed("samples") and store.list_files("samples") == []
    assert not any(".tmp-" in name for name in store.list_files(temporaries=True))  # no temporary object left behind


def test_local_folder(tmp_path):
    store = Storage(tmp_path / "runs" / "r")
    assert store.is_local and store.url("x") == str(tmp_path / "runs" / "r" / "x")
    _roundtrip(store, tmp_path)


def test_s3_prefix(s3_bucket, tmp_path):
    store = Storage(f"{s3_bucket}/runs/r")
    assert not store.is_local and store.url("x/y.json") == f"{s3_bucket}/runs/r/x/y.json"
    assert store.fs_path("ray") == f"{s3_bucket[5:]}/runs/r/ray"  # Ray's storage_path with storage_filesystem
    _roundtrip(store, tmp_path)
    store.check_writable()


def test_workspace_commits_to_the_store_and_a_new_one_fetches(s3_bucket):
    ws = Workspace(f"{s3_bucket}/runs/w")
    assert ws.is_remote and ws.local.is_dir()
    ws.path("ledger.json").write_text("{}")
    ws.commit("ledger.json")
    (ws.path("central/images")).mkdir(parents=True)
    ws.path("central/central.json").write_text('{"rounds": 2}')
    ws.commit("central")
    scratch = ws.local
    ws.close()
    assert not scratch.exists()  # nothing of the run stays on this disk
    again = Workspace(f"{s3_bucket}/runs/w")
    assert again.fetch("ledger.json") and again.fetch("central") and not again.fetch("eval.json")
    assert json.loads(again.path("central/central.json").read_text()) == {"rounds": 2}
    again.close()


def test_a_local_workspace_is_the_run_folder_itself(tmp_path):
    ws = Workspace(tmp_path / "r")
    assert not ws.is_remote and ws.local == tmp_path / "r"
    assert not ws.fetch("ledger.json")
    ws.commit("anything")  # nothing to do: the folder is the storage
    ws.close()


def test_an_unsupported_scheme_is_refused_naming_the_uri():
    with pytest.raises(ValueError, match=r"storage 'ftp://host/runs'.*not supported.*s3://"):
        Storage("ftp://host/runs")


def test_a_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-dpfeta/runs.*Nothing was spent"):
        Storage("s3://no-such-bucket-dpfeta/runs").check_writable()


def test_an_unreachable_endpoint_is_a_clear_error(s3_endpoint, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=r"s3://somewhere/runs.*(connect|Connect)"):
        Storage("s3://somewhere/runs").check_writable()


def test_no_write_permission_is_a_clear_error(s3_endpoint, monkeypatch):
    """A user allowed to read only (IAM enforced by a second moto server): refused on the probe."""
    import boto3
    import moto.settings
    from conftest import start_s3_server

    server, endpoint = start_s3_server()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="read-only-bucket")
        iam = boto3.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="reader")
        iam.put_user_policy(
            UserName="reader",
            PolicyName="read",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # enforce IAM from now on
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(StorageError, match=r"s3://read-only-bucket/runs.*(Access Denied|ACCESS_DENIED)"):
            Storage("s3://read-only-bucket/runs").check_writable()
    finally:
        server.stop()


def test_a_failed_write_keeps_the_previous_object(s3_bucket):
    store = Storage(f"{s3_bucket}/runs/f")
    store.write_json("ledger.json", {"taken": 3})
    real = store.filesystem
    store._fs = FaultyFilesystem(real, [["ledger.json", 1]])
    with pytest.raises(StorageError, match=r"s3://.*/runs/f/ledger.json': writing failed.*No space left"):
        store.write_json("ledger.json", {"taken": 4})
    store._fs = real
    assert store.read_json("ledger.json") == {"taken": 3}  # the good one, whole
    assert store.list_files(temporaries=True) == ["ledger.json"]  # and no temporary object left


def test_a_failed_local_write_keeps_the_previous_file(tmp_path, monkeypatch):
    store = Storage(tmp_path)
    store.write_text("ledger.json", "good")
    real_replace = storage.os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        store.write_text("ledger.json", "half")
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert store.read_text("ledger.json") == "good" and [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_a_run_on_a_missing_bucket_is_refused_before_any_spend(s3_endpoint, tiny_cfg, monkeypatch, tmp_path):
    from dpfeta import data, pipeline, privacy

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(
        "run.dir=s3://no-such-bucket-dpfeta/runs",
        "central.noise_multiplier=null",
        "central.epsilon_share=0.3",
        "finetune.batch_size=128",
    )
    cfg = privacy.resolve(cfg, data.public_train_size(cfg))
    lines: list[str] = []
    with pytest.raises(StorageError, match=r"storage 's3://no-such-bucket-dpfeta/runs/digits/.*Nothing was spent"):
        pipeline.run(cfg, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("privacy plan")  # the plan, then the refusal
    assert list(tmp_path.iterdir()) == []  # and nothing written here
