"""`dpfeta evaluate --protocol dpimagebench`: DPImageBench's downstream protocol (three classifiers, noisy
validation selection, FID against the training split), on digits at 8 px."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY

from dpfeta import config, data, evaluate
from dpfeta.evaluate import dpimagebench
from dpfeta.images import save_class_folders
from dpfeta.nn.benchnets import CLASSIFIERS, resnet, resnext, wide_resnet


def test_protocol_delta_is_one_over_n_log_n():
    # DPImageBench's values (anchors §1.5): MNIST 55,000 -> 1.67e-6, CIFAR-10 45,000 -> 2.07e-6
    assert dpimagebench.protocol_delta(55_000) == pytest.approx(1.67e-6, rel=3e-3)
    assert dpimagebench.protocol_delta(45_000) == pytest.approx(2.07e-6, rel=3e-3)
    assert dpimagebench.protocol_delta(1000) == 1 / (1000 * math.log(1000))


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 28)])
def test_the_classifiers_take_any_size_and_channel_count(name, channels, size):
    model = CLASSIFIERS[name](channels, 7)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_depths_that_do_not_fit_the_family_are_refused():
    for make, depth in ((resnet, 9), (wide_resnet, 5), (resnext, 12)):
        with pytest.raises(ValueError, match="depth of 2 \\+"):
            make(1, 10, depth=depth)


def digits_config(*overrides: str) -> config.Config:
    return config.load("configs/digits.yaml", [*TINY, *overrides])


@pytest.fixture(scope="module")
def digits():
    cfg = digits_config("tracking.nondp=true", "run.seed=0")
    return cfg, data.load_splits(cfg)


@pytest.mark.slow  # three classifiers x 4 epochs + an offline FID CNN: ~10 s
def test_real_digits_as_the_synthetic_set_give_high_accuracy_and_the_selection_follows_the_noise(digits):
    """The real training split stands in for a perfect generator: each classifier learns 8 px digits; with
    epsilon huge the noisy choice is the clean one, the oracle is never below the selected accuracy."""
    cfg, splits = digits
    result = dpimagebench.evaluate_protocol(
        cfg, splits.train, splits, epsilon=1e9, epochs=4, noise=np.random.default_rng(0)
    )
    r = result["nondp"]
    assert set(r["classifiers"]) == {"resnet", "wrn", "resnext"}
    for name, c in r["classifiers"].items():
        assert c["accuracy"] > 0.6, (name, c)
        assert c["accuracy"] == c["accuracy_at_clean_validation"]  # Laplace(1e-9) cannot change the argmax
        assert c["oracle_test_accuracy"] >= c["accuracy"] and 1 <= c["selected_epoch"] <= 4
    accs = [c["accuracy"] for c in r["classifiers"].values()]
    assert r["accuracy_mean"] == pytest.approx(np.mean(accs)) and r["accuracy_std"] == pytest.approx(np.std(accs))
    assert np.isfinite(r["fid"]) and result["fid_reference"].startswith("train split")
    assert result["num_val"] == len(splits.val) > 0 and result["num_test"] == len(splits.test)
    n = len(splits.train)
    assert result["protocol_delta"] == 1 / (n * math.log(n))
    assert result["delta_within_protocol"] == (cfg.privacy.delta <= 1 / (n * math.log(n)))
    # noise a thousand times the validation size: the choice is the noise's, not the data's
    noisy = dpimagebench.train_and_select(
        "resnet", splits.train, splits, epsilon=1e-3 / len(splits.val), epochs=4,
        noise=np.random.default_rng(1), seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    clean = dpimagebench.train_and_select(
        "resnet", splits.train, splits, epsilon=1e9, epochs=4,
        noise=np.random.default_rng(1), seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    assert noisy["accuracy_at_clean_validation"] == clean["accuracy_at_clean_validation"]  # same training
    draws = np.random.default_rng(1).laplace(0.0, 1e3 * len(splits.val), 4)
    assert noisy["selected_epoch"] == int(np.argmax(draws)) + 1


def test_the_cli_path_writes_its_own_file_and_refuses_release_mode_and_no_validation_split(tmp_path, digits):
    cfg, splits = digits
    x, y = splits.train.images[:300], splits.train.labels[:300]
    save_class_folders(x, y, tmp_path / "samples")
    result = evaluate.evaluate_samples(cfg, tmp_path / "samples", protocol="dpimagebench", epochs=1)
    written = json.loads((tmp_path / "samples" / "eval-dpimagebench.json").read_text())
    assert written["protocol"] == "dpimagebench" and written["epochs"] == 1 == result["epochs"]
    assert written["epsilon"] is None and written["num_synthetic"] == 300  # no ledger beside the samples
    assert not (tmp_path / "samples" / "eval.json").exists()
    release = digits_config("tracking.nondp=false")
    with pytest.raises(ValueError, match="tracking.nondp: true"):
        evaluate.evaluate_samples(release, tmp_path / "samples", protocol="dpimagebench")
    no_val = digits_config("tracking.nondp=true", "data.val_fraction=0")
    with pytest.raises(ValueError, match="validation split"):
        evaluate.evaluate_samples(no_val, tmp_path / "samples", protocol="dpimagebench")
    with pytest.raises(ValueError, match="--protocol one of"):
        evaluate.evaluate_samples(cfg, tmp_path / "samples", protocol="dpimage")
