"""uint8 <-> [-1, 1] conversions and PNG grids / class folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from dpfeta.images import (
    load_class_folders,
    make_grid,
    save_class_folders,
    save_class_grid,
    save_grid,
    to_float,
    to_uint8,
)


def test_uint8_float_round_trip_is_exact():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_float(values)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_uint8(x), values)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(TypeError):
        to_float(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_class_folders_round_trip(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, channels, 6, 6), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 11, 0, 1])
    save_class_folders(images, labels, tmp_path)
    assert (tmp_path / "000011" / "000004.png").is_file()
    read, read_labels = load_class_folders(tmp_path)
    order = np.argsort(labels, kind="stable")
    assert np.array_equal(read, images[order]) and np.array_equal(read_labels, labels[order])
    with pytest.raises(ValueError, match="PNG"):
        load_class_folders(tmp_path / "missing")


def test_grids(tmp_path):
    images = np.full((5, 1, 4, 4), 255, dtype=np.uint8)
    grid = make_grid(images, nrow=3)
    assert grid.shape == (1, 2 * 5 + 1, 3 * 5 + 1) and grid[0, 1, 1] == 255 and grid[0, 0, 0] == 128
    assert save_grid(images, tmp_path / "g.png", scale=2).is_file()
    save_class_grid(images, np.array([0, 0, 1, 1, 1]), tmp_path / "c.png", per_class=2, scale=1)
    read = np.asarray(Image.open(tmp_path / "c.png"))
    assert read.shape == (2 * 5 + 1, 2 * 5 + 1)


def test_grids_are_torchvision_make_grid_with_the_same_layout():
    """images.make_grid is torchvision's (greyscale kept as one channel); central.grid scales first."""
    from torchvision.utils import make_grid as tv_make_grid

    from dpfeta import central

    rng = np.random.default_rng(1)
    for channels in (1, 3):
        images = rng.integers(0, 256, (7, channels, 4, 5), dtype=np.uint8)
        grid = make_grid(images, nrow=3, pad=2, pad_value=7)
        expected = tv_make_grid(torch.from_numpy(images), nrow=3, padding=2, pad_value=7).numpy()[:channels]
        assert grid.shape == (channels, 3 * 6 + 2, 3 * 7 + 2) and np.array_equal(grid, expected)
        # image i sits at row i // nrow, column i % nrow
        assert np.array_equal(grid[:, 2 + 6 : 2 + 6 + 4, 2 + 7 * 2 : 2 + 7 * 2 + 5], images[5])
    digits = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    c_grid = central.grid(digits, columns=2)  # each image scaled x4 to >= 32 px, white padding 2
    assert c_grid.shape == (1, 2 * 34 + 2, 2 * 34 + 2) and c_grid[0, 0, 0] == 255
    assert np.array_equal(c_grid[0, 2 + 34 : 2 + 34 + 32 : 4, 2 : 2 + 32 : 4], digits[2, 0])
