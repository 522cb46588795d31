"""The batched RandAugment (dpfeta.augment) against torchvision's, which the warm-up used image by image.

Three checks: every op at a spread of magnitude bins and both signs gives torchvision's pixels; the draws
(ops, bins, signs) have RandAugment's frequencies, excluded ops never drawn; and whole-pipeline outputs of
the two have the same distribution (two-sample KS on per-image statistics).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandAugment as TorchRandAugment
from torchvision.transforms.autoaugment import _apply_op

from dpfeta.augment import OPS, SIGNED, RandAugment, magnitude

LEVELS = (0, 1, 2, 3, 5, 9, 15, 30)  # the warm-up uses 1..M with M = 3 by default; 30 is the largest bin


def _images(channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (4, channels, size, size), generator=g, dtype=torch.uint8)
    flat = torch.full((1, channels, size, size), 77, dtype=torch.uint8)  # AutoContrast/Equalize: nothing to stretch
    narrow = (torch.rand(1, channels, size, size, generator=g) * 40 + 100).to(torch.uint8)
    return torch.cat([noise, flat, narrow])


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16), (1, 28)])
def test_every_op_gives_torchvisions_pixels(channels, size):
    images = _images(channels, size)
    augment = RandAugment(num_ops=1, max_magnitude=30)
    n = len(images)
    for k, op in enumerate(augment.ops):
        for level in LEVELS:
            for sign in (1, -1):
                value = magnitude(op, level, size, size) * (sign if op in SIGNED else 1)
                ours = augment.apply(images, torch.full((n,), level), torch.full((1, n), k), torch.full((1, n), sign))
                theirs = torch.stack(
                    [_apply_op(x, op, value, interpolation=InterpolationMode.NEAREST, fill=None) for x in images]
                )
                assert torch.equal(ours, theirs), (op, level, sign, (ours != theirs).sum().item())


def test_the_draws_have_randaugments_frequencies_and_exclude_holds():
    augment = RandAugment(num_ops=2, max_magnitude=3, exclude=("Equalize", "Solarize"))
    assert augment.ops == tuple(op for op in OPS if op not in ("Equalize", "Solarize"))
    n = 30_000
    levels, ops, signs = augment.draw(n, torch.Generator().manual_seed(1))
    assert levels.min() == 1 and levels.max() == 3 and ops.max() < len(augment.ops)

    def near(count: int, total: int, p: float) -> bool:  # within 4.5 binomial sd
        return abs(count - total * p) <= 4.5 * np.sqrt(total * p * (1 - p))

    assert all(near(int((levels == m).sum()), n, 1 / 3) for m in (1, 2, 3))
    assert all(near(int((ops == k).sum()), 2 * n, 1 / len(augment.ops)) for k in range(len(augment.ops)))
    assert near(int((signs < 0).sum()), 2 * n, 0.5)
    # the two slots are drawn independently: the same op twice as often as chance says
    same = int((ops[0] == ops[1]).sum())
    assert near(same, n, 1 / len(augment.ops))


def test_excluded_ops_never_touch_an_image():
    """Every op but Posterize excluded: the output is torchvision's Posterize at each image's drawn bin."""
    images = _images(1, 16, seed=3)
    augment = RandAugment(num_ops=1, max_magnitude=30, exclude=tuple(op for op in OPS if op != "Posterize"))
    g = torch.Generator().manual_seed(2)
    levels, _, _ = augment.draw(len(images), torch.Generator().set_state(g.get_state()))
    out = augment(images, g)
    bits = [magnitude("Posterize", int(m), 16, 16) for m in levels]
    nearest = InterpolationMode.NEAREST
    expected = torch.stack([_apply_op(x, "Posterize", b, nearest, None) for x, b in zip(images, bits)])
    assert torch.equal(out, expected)


def _torchvision_pipeline(images: torch.Tensor, num_ops: int, max_magnitude: int, exclude: tuple[str, ...], seed: int):
    """The warm-up's former augmentation: torchvision's RandAugment per image, m ~ U{1..M}, ops excluded."""

    class Excluding(TorchRandAugment):
        def _augmentation_space(self, num_bins, image_size):
            space = super()._augmentation_space(num_bins, image_size)
            return {name: op for name, op in space.items() if name not in exclude}

    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, max_magnitude + 1, (len(images),), generator=g).tolist()
    transforms = {m: Excluding(num_ops=num_ops, magnitude=m) for m in set(levels)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transforms[m](x) for x, m in zip(images, levels)])


def test_the_augmented_distribution_matches_torchvisions():
    """The warm-up's setting (2 ops, M = 3, no Equalize) on copies of real-looking images: per-image mean,
    share of dark pixels and total variation have the same distribution as torchvision's (KS, p > 1e-3)."""
    g = torch.Generator().manual_seed(5)
    digit = torch.zeros(1, 16, 16)
    digit[:, 3:13, 6:10] = 200.0  # a bar on a dark background, plus noise: a central image's look
    base = (digit + torch.randn(8, 1, 16, 16, generator=g) * 30).clamp(0, 255).to(torch.uint8)
    images = base.repeat(250, 1, 1, 1)  # 2,000 images
    exclude = ("Equalize",)
    ours = RandAugment(num_ops=2, max_magnitude=3, exclude=exclude)(images, torch.Generator().manual_seed(6))
    theirs = _torchvision_pipeline(images, 2, 3, exclude, seed=7)

    def statistics(x: torch.Tensor) -> dict[str, np.ndarray]:
        f = x.float()
        return {
            "mean": f.mean(dim=(1, 2, 3)).numpy(),
            "dark": (f < 32).float().mean(dim=(1, 2, 3)).numpy(),
            "tv": (f[..., 1:] - f[..., :-1]).abs().mean(dim=(1, 2, 3)).numpy(),
        }

    a, b = statistics(ours), statistics(theirs)
    for key in a:
        assert stats.ks_2samp(a[key], b[key]).pvalue > 1e-3, key
    # the share of images an op changed at all (small bins leave many as they are: 0.55 for both here)
    changed = [float((x != images).flatten(1).any(1).float().mean()) for x in (ours, theirs)]
    assert changed[0] > 0.4 and abs(changed[0] - changed[1]) < 4.5 * np.sqrt(0.25 / len(images) * 2), changed


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="RandAugment ops to exclude"):
        RandAugment(num_ops=2, max_magnitude=3, exclude=("Blur",))
    with pytest.raises(ValueError, match=r"magnitude in \[0, 30\]"):
        RandAugment(num_ops=2, max_magnitude=31)
    with pytest.raises(ValueError, match="uint8 images"):
        RandAugment(num_ops=2, max_magnitude=3)(torch.zeros(2, 1, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="at least one RandAugment op"):
        RandAugment(num_ops=2, max_magnitude=3, exclude=OPS)
