"""Shared test fixtures: one tiny config factory, one intra-op thread, one local Ray for the session, a
local S3 endpoint, storage faults; the tier markers (tests/README.md).

Tiers: ``slow`` (starts Ray, a subprocess or a moto S3 server, or trains more than a few steps) is left
out of ``make check``; ``long`` (minutes each) runs only in ``make ci``; ``gpu`` is skipped without CUDA.
A test that uses ``local_ray``, ``s3_endpoint`` or ``s3_bucket`` is marked ``slow`` here, by its fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

from dpfeta import config

SLOW_FIXTURES = {"local_ray", "s3_endpoint", "s3_bucket"}


def pytest_collection_modifyitems(config, items):
    """``slow`` for every test that needs Ray or the S3 server; ``gpu`` tests skipped without CUDA."""
    no_cuda = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    cuda = torch.cuda.is_available()
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(no_cuda)


# A config small enough for every stage to run in seconds on one CPU (8x8 digits, a ~9k-parameter U-Net).
TINY = (
    "data.resolution=8",
    "model.channels=8",
    "model.channel_mult=[1]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.emb_channels=16",
    "warmup.batch_size=16",
    "warmup.checkpoint_every=2",
    "warmup.log_every=1",
    "finetune.noise_multiplicity=1",
    "finetune.checkpoint_every=1",
    "finetune.log_every=1",
    "sample.steps=2",
    "sample.num_samples=40",
    "sample.batch_size=40",
    "eval.classifier_epochs=1",
    "eval.classifier_batch_size=32",
    "eval.logreg=false",
    "eval.fid.num_samples=40",
    "eval.fid.inception_weights=null",  # the offline FID: Inception at 299 px costs minutes on a CPU
    "tracking.enabled=false",
)
# The smallest U-Net with every code path (two resolutions, attention at 4x4), 3 classes at 8x8: the base of
# the unit tests of the network, the samplers, warm-up, DP-SGD and bf16.
TINY_UNET = (
    "data.resolution=8",
    "data.num_classes=3",
    "model.channels=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "model.emb_channels=16",
)


def tiny_config(*overrides: str, base: tuple[str, ...] = TINY) -> config.Config:
    """A config from ``base`` (``TINY``: a whole run in seconds; ``TINY_UNET``) and ``--set``-style overrides."""
    return config.load(None, [*base, *overrides])


LOCAL_RAY_CPUS = 4  # the most any test's placement asks for (two 1-CPU workers + Ray Data, Tune trials)


@pytest.fixture(scope="session")
def _ray_session():
    """Whether this session started Ray (and so must stop it at the end)."""
    started: list[bool] = []
    yield started
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """A private local Ray (``LOCAL_RAY_CPUS`` CPUs, no dashboard), started once per session and shared by
    every module that asks for it; started again only if a test in between stopped it (a multi-node
    cluster test, a fake-GPU session). Never a cluster found on disk (``address="local"``)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=LOCAL_RAY_CPUS, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        _ray_session.append(True)
    return ray


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides)``: the tiny config in this test's folder, ``--set``-style overrides on top."""

    def make(*overrides: str) -> config.Config:
        return tiny_config(f"run.dir={tmp_path}", *overrides)

    return make


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """A test that points MLflow's fluent API at its store (``mlflow.set_tracking_uri`` also exports
    MLFLOW_TRACKING_URI) must not redirect the tests after it."""
    import os

    from mlflow.tracking._tracking_service import utils as uri_state

    before_global, before_env = uri_state._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    uri_state._tracking_uri = before_global
    if before_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before_env


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test (restored after it): on a shared 2-core machine OpenMP spinning
    makes 2 threads many times slower, and the tests' tensors are too small to gain from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a local S3 endpoint (moto's server on 127.0.0.1), started by the tests themselves ----------------
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_s3_server():
    """(server, endpoint URL) of a fresh moto S3 server on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server for the session; the AWS variables point every client of this process (and
    of Ray nodes started after it) at it."""
    import os

    server, endpoint = start_s3_server()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """``s3://<a new bucket>`` on the session's endpoint."""
    import uuid

    import boto3

    name = f"dpfeta-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


class FaultyFilesystem:
    """A pyarrow filesystem wrapper: the next ``times`` output streams whose path contains ``match``
    (``rules``: [[match, times], ...]) write half their bytes and fail on close, as an upload whose
    last part is refused or a disk that fills. Every other call goes to the real filesystem."""

    def __init__(self, inner, rules: list):
        self.inner, self.rules = inner, rules

    def open_output_stream(self, path, *args, **kwargs):
        stream = self.inner.open_output_stream(path, *args, **kwargs)
        for rule in self.rules:
            if rule[0] in path and rule[1] > 0:
                rule[1] -= 1
                return _FailingStream(stream)
        return stream

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _FailingStream:
    def __init__(self, inner):
        self.inner = inner

    def write(self, data):
        return self.inner.write(data[: max(1, len(data) // 2)])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()
        raise OSError(28, "No space left on device")


@pytest.fixture
def faulty_storage(monkeypatch):
    """``faulty_storage(match, times=1)``: the next ``times`` writes to an object store whose path
    contains ``match`` fail (every ``Storage`` made from now on in this test)."""
    from dpfeta.storage import Storage

    rules: list = []
    real_open = Storage._open

    def _open(self):
        fs = real_open(self)
        if self.is_local or isinstance(fs, FaultyFilesystem):
            return fs
        self._fs = FaultyFilesystem(fs, rules)
        return self._fs

    monkeypatch.setattr(Storage, "_open", _open)

    def add(match: str, times: int = 1) -> None:
        rules.append([match, times])

    return add
