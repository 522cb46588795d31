"""Shared test fixtures: one tiny config factory, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from dpfeta import config

# A config small enough for every stage to run in seconds on one CPU (8x8 digits, a ~9k-parameter U-Net).
TINY = ("data.resolution=8", "model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
        "model.attn_resolutions=[]", "model.emb_channels=16", "warmup.batch_size=16", "warmup.checkpoint_every=2",
        "warmup.log_every=1", "finetune.noise_multiplicity=1", "finetune.checkpoint_every=1",
        "finetune.log_every=1", "sample.steps=2", "sample.num_samples=40", "sample.batch_size=40",
        "eval.classifier_epochs=1", "eval.classifier_batch_size=32", "eval.logreg=false", "eval.fid.num_samples=40",
        "eval.fid.inception_weights=null",  # the offline FID: Inception at 299 px costs minutes on a CPU
        "tracking.enabled=false")


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides)``: the tiny config in this test's folder, ``--set``-style overrides on top."""
    def make(*overrides: str) -> config.Config:
        return config.load(None, [*TINY, f"run.dir={tmp_path}", *overrides])

    return make


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning makes 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
