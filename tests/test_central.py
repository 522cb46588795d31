"""M1, the DP central-image query: sensitivity, Poisson sampling, noise scale, divisor, RNG, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfeta import central, config, privacy
from dpfeta.data import ImageSet
from dpfeta.images import class_file


def make_cfg(k: int = 10, **updates) -> config.Config:
    base = {
        "data.num_classes": k,
        "data.resolution": 8,
        "central.rounds": 5,
        "central.batch_size": 200.0,
        "central.noise_multiplier": 2.0,
        "finetune.batch_size": 8,
        "privacy.delta": 1e-5,
    }
    base.update({key.replace("__", "."): v for key, v in updates.items()})
    return config.replace(config.Config(), base)


def random_set(n: int, k: int = 10, size: int = 8, channels: int = 1, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    return ImageSet(images, np.arange(n, dtype=np.int64) % k, k)


def constant_set(n: int, value: int, k: int = 10, size: int = 8) -> ImageSet:
    return ImageSet(np.full((n, 1, size, size), value, np.uint8), np.arange(n, dtype=np.int64) % k, k)


# --------------------------------------------------------------------------------------------
# Sensitivity: neighbouring datasets (one record added/removed) -> sums differ by <= Delta
# --------------------------------------------------------------------------------------------


def test_sensitivity_is_sqrt_d_over_4():
    assert central.sensitivity((1, 28, 28), 2) == pytest.approx(14.0)  # MNIST, docs/reference-implementation.md §1.1
    assert central.sensitivity((3, 32, 32), 2) == pytest.approx(math.sqrt(3072 / 4))
    assert central.sensitivity((1, 16, 16), 2) == 8.0


@pytest.mark.parametrize("value", [255, 37])
def test_adding_a_record_moves_the_sums_by_at_most_delta(value):
    d = random_set(300)
    extra = ImageSet(np.full((1, 1, 8, 8), value, np.uint8), np.array([3]), 10)
    d_plus = ImageSet(np.concatenate([d.images, extra.images]), np.concatenate([d.labels, extra.labels]), 10)
    delta = central.sensitivity((1, 8, 8), 2)
    # Same seed: the first 300 rows of the mask are shared, the added record gets its own draw.
    sums = central._local_sums(d, rounds=40, sample_rate=0.5, downsample=2, rng=np.random.default_rng(1))
    sums_plus = central._local_sums(d_plus, rounds=40, sample_rate=0.5, downsample=2, rng=np.random.default_rng(1))
    diff = sums_plus - sums
    norms = np.sqrt((diff**2).reshape(40, -1).sum(1))
    assert norms.max() <= delta + 1e-9
    assert np.allclose(diff[:, [k for k in range(10) if k != 3]], 0.0)  # one class sum moves
    included = norms > 0
    assert 5 < included.sum() < 35  # the added record was sampled in some rounds, not all
    assert np.allclose(norms[included], delta * value / 255)  # its pooled image's norm


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**31), rounds=st.integers(1, 4), remove=st.integers(0, 29))
def test_removing_any_record_moves_the_sums_by_at_most_delta(n, seed, rounds, remove):
    rng = np.random.default_rng(seed)
    d = random_set(n, k=3, size=4, channels=3, seed=seed)
    masks = central.poisson_masks(n, rounds, 0.7, rng)
    i = remove % n
    full = central.class_sums(d.images, d.labels, masks, num_classes=3, downsample=2)
    keep = np.arange(n) != i
    less = central.class_sums(d.images[keep], d.labels[keep], masks[keep], num_classes=3, downsample=2)
    norms = np.sqrt(((full - less) ** 2).reshape(rounds, -1).sum(1))
    assert norms.max() <= central.sensitivity((3, 4, 4), 2) + 1e-9


# --------------------------------------------------------------------------------------------
# Poisson sampling: fresh Bernoulli(q_c) per record per round
# --------------------------------------------------------------------------------------------


def test_inclusion_frequency_is_q_and_batch_sizes_vary_like_a_binomial():
    n, rounds, q = 500, 400, 0.3
    ones = constant_set(n, 255, k=5, size=4)  # pooled pixel 1.0: sums count the sampled records
    sums = central._local_sums(
        ones, rounds=rounds, sample_rate=q, downsample=2, rng=np.random.default_rng(5), chunk=128
    )
    counts = sums[:, :, 0, 0, 0].sum(1)  # records sampled per round
    assert abs(counts.sum() / (n * rounds) - q) < 5 * math.sqrt(q * (1 - q) / (n * rounds))
    assert counts.var() == pytest.approx(n * q * (1 - q), rel=0.3)  # not a fixed-size batch
    masks = central.poisson_masks(n, rounds, q, np.random.default_rng(6))
    freq = masks.mean(1)  # per record
    assert abs(freq.mean() - q) < 0.005
    assert freq.std() == pytest.approx(math.sqrt(q * (1 - q) / rounds), rel=0.15)
    corr = np.corrcoef(masks[:, :50].T)[np.triu_indices(50, 1)]
    assert np.abs(corr).max() < 0.25  # rounds are independent


# --------------------------------------------------------------------------------------------
# Noise scale and the public divisor
# --------------------------------------------------------------------------------------------


def test_noise_std_on_an_all_zero_dataset():
    cfg = make_cfg(central__rounds=50, central__batch_size=200.0, central__noise_multiplier=2.0)
    means, params = central.noisy_class_means(cfg, constant_set(1000, 0), generator=torch.Generator().manual_seed(0))
    expected = 2.0 * 4.0 / (0.2 * 1000 / 10)  # sigma_c * Delta / (q_c N / classes) = 0.4
    assert params["sensitivity"] == 4.0 and params["expected_count"] == 20.0
    assert means.shape == (50, 10, 1, 4, 4)
    assert means.std() == pytest.approx(expected, rel=0.05)
    assert abs(means.mean()) < 5 * expected / math.sqrt(means.size)


def test_divides_by_the_public_expected_count_not_the_realised_one():
    images = np.zeros((100, 1, 8, 8), np.uint8)
    labels = np.zeros(100, np.int64)
    images[:10], labels[:10] = 255, 1  # class 1: 10 saturated records of 100 (imbalanced)
    cfg = make_cfg(k=2, central__rounds=2, central__batch_size=100.0, central__noise_multiplier=1e-9)
    means, params = central.noisy_class_means(cfg, ImageSet(images, labels, 2))
    assert params["sample_rate"] == 1.0 and params["expected_count"] == 50.0
    assert np.allclose(means[:, 1], 10 / 50) and np.allclose(means[:, 0], 0.0)  # not 10/10 = 1
    result = central.central_images(cfg, ImageSet(images, labels, 2))
    assert (result.images[result.labels == 1] == 51).all()  # round(0.2 * 255)


# --------------------------------------------------------------------------------------------
# RNG: a test seed reproduces, OS entropy does not
# --------------------------------------------------------------------------------------------


def test_seed_reproduces_and_os_entropy_differs():
    cfg, train = make_cfg(), random_set(1000)
    a = central.central_images(cfg, train, generator=torch.Generator().manual_seed(3))
    b = central.central_images(cfg, train, generator=torch.Generator().manual_seed(3))
    c = central.central_images(cfg, train, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    x, y = central.central_images(cfg, train), central.central_images(cfg, train)
    assert not np.array_equal(x.images, y.images)
    assert x.images.shape == (50, 1, 8, 8) and x.images.dtype == np.uint8
    assert np.array_equal(x.labels, np.tile(np.arange(10), 5))


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


def test_postprocess_clamp_upsample_median_sharpen():
    flat = central.postprocess(np.full((2, 1, 4, 4), 0.5), resolution=8)
    assert flat.shape == (2, 1, 8, 8) and (flat == 128).all()  # sharpen keeps constants
    assert (central.postprocess(np.full((1, 3, 4, 4), 7.0), resolution=8) == 255).all()  # clamp
    spike = np.zeros((1, 1, 8, 8))
    spike[0, 0, 3, 3] = 1.0
    assert central.postprocess(spike, resolution=8, sharpen=False).max() == 0  # 3x3 median
    assert central.postprocess(spike, resolution=8, median=False, sharpen=False).max() == 255
    step = np.zeros((1, 1, 8, 8))
    step[..., :4], step[..., 4:] = 100 / 255, 150 / 255
    grey = central.postprocess(step, resolution=8, median=False)
    assert grey[0, 0, 4, 3] == 50 and grey[0, 0, 4, 4] == 200  # [[0,-1,0],[-1,5,-1],[0,-1,0]]
    rgb = central.postprocess(np.repeat(step, 3, axis=1), resolution=8, median=False)
    assert rgb[0, :, 4, 3].tolist() == [100] * 3  # sharpen: greyscale only by default


# --------------------------------------------------------------------------------------------
# Release: files and ledger; nothing else is written
# --------------------------------------------------------------------------------------------


def test_release_writes_images_grid_ledger_only(tmp_path):
    cfg = make_cfg(central__rounds=3, finetune__batch_size=200)  # a short DP-SGD plan: PLD calibrates in a second
    result, ledger = central.release(cfg, random_set(1000), tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    expected = ["central.json", "grid.png", "ledger.json"]
    expected += [f"images/{class_file(k, 10 * r + k)}" for k in range(10) for r in range(3)]  # the one layout
    assert files == sorted(expected)
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["mechanisms"] == [
        {
            "name": "central",
            "kind": "poisson_gaussian",
            "noise_multiplier": 2.0,
            "sample_rate": 0.2,
            "planned": 3,
            "taken": 3,
            "shared": False,
        }
    ]
    # privacy.accountant auto: the central ledger uses the accountant the whole run's plan picks (PLD)
    eps = privacy.epsilon_of(result.event(), delta=1e-5, accountant="pld")
    assert saved["accountant"] == "pld" and eps < privacy.epsilon_of(result.event(), delta=1e-5, accountant="rdp")
    assert saved["epsilon_spent"] == pytest.approx(eps) and ledger.epsilon() == pytest.approx(eps)
    back = central.load_central(tmp_path)
    order = np.lexsort((np.arange(30) // 10, result.labels))  # class-major, then round
    assert back.num_classes == 10 and np.array_equal(back.labels, result.labels[order])
    assert np.array_equal(back.images, result.images[order])
    grid = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 34 + 2, 10 * 34 + 2)  # 8 px cells scaled x4, 2 px gaps


def test_zero_rounds_release_nothing_and_spend_nothing(tmp_path):
    cfg = make_cfg(central__rounds=0, privacy__accountant="rdp")  # the plan's accountant is not the point here
    result, ledger = central.release(cfg, random_set(1000), tmp_path)
    assert result.images.shape == (0, 1, 8, 8) and ledger.epsilon() == 0.0


def test_calibrated_central_noise_is_used():
    cfg = make_cfg(central__noise_multiplier=None, central__epsilon_share=0.1, privacy__epsilon=10.0)
    _, params = central.noisy_class_means(cfg, random_set(1000))
    eps = privacy.epsilon_of(
        privacy.central_event(noise_multiplier=params["noise_multiplier"], sample_rate=0.2, rounds=5),
        delta=1e-5,
        accountant="rdp",
    )
    assert eps <= 1.0 and eps == pytest.approx(1.0, rel=1e-3)
