"""Image conversions and PNG I/O: uint8 [N,C,H,W] <-> float in [-1, 1], PNG/JPEG codecs, grids, the one
class-folder layout (its writer and its reader). torch is imported only by the functions that take or
return tensors."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    import torch

    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (rounded, clamped), on the CPU."""
    import torch

    return ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _pil(image: np.ndarray) -> Image.Image:
    """[C,H,W] uint8 -> PIL image ('L' for one channel, 'RGB' for three)."""
    if image.shape[0] == 1:
        return Image.fromarray(image[0])
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))


def decode_image(data: bytes | Path, where: str) -> np.ndarray:
    """PNG/JPEG -> uint8 [C, H, W] with C = 1 (greyscale) or 3; names ``where`` when corrupt."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "LA", "I;16", "I"):
                img = img.convert("L") if mode in ("1", "LA") else img
                arr = np.asarray(img)
                if arr.dtype != np.uint8:
                    arr = (arr.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
                return arr[None]
            arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
            if mode == "P" and np.all(arr == arr[:1]):
                return np.ascontiguousarray(arr[:1])  # greyscale palette
            return np.ascontiguousarray(arr)
    except UnidentifiedImageError:
        raise ValueError(f"unreadable or corrupt image {where}: not a PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"unreadable or corrupt image {where}: {exc}") from None


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG bytes."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _numpy_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    images = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N,C,H,W] with C in (1, 3), got {images.dtype} {tuple(images.shape)}")
    return images


def make_grid(
    images: torch.Tensor | np.ndarray, *, nrow: int | None = None, pad: int = 1, pad_value: int = 128
) -> np.ndarray:
    """Tile N images, ``nrow`` per row (default ceil(sqrt(N))), into one uint8 array
    [C, rows*(H+pad)+pad, min(nrow, N)*(W+pad)+pad] with ``pad_value`` padding: torchvision's
    ``make_grid`` (which turns one channel into three: the first is kept for greyscale)."""
    import torch
    from torchvision.utils import make_grid as tv_make_grid

    images = _numpy_uint8(images)
    n, c = images.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = tv_make_grid(torch.from_numpy(np.ascontiguousarray(images)), nrow=nrow, padding=pad, pad_value=pad_value)
    return np.ascontiguousarray(grid[:c].numpy())


def save_grid(images: torch.Tensor | np.ndarray, path: Path | str, *, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a grid PNG; ``scale`` enlarges it (nearest) for viewing small images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _pil(make_grid(images, nrow=nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


# The one class-folder layout (torchvision's and Hugging Face's ImageFolder), written by sampling, the
# central query and `dpfeta export`, read by the data loader, the evaluation and the warm-up:
# ``<root>/<label>/<index>.png``, label and index as zero-padded decimals (text order is number order),
# PNGs of mode L (one channel) or RGB (three). The reader also takes the folders a user brings: JPEGs,
# and class names that are not numbers (labels by sorted name).
LABEL_DIGITS = 6
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def class_folder(label: int, *, digits: int = LABEL_DIGITS) -> str:
    """A label's folder name: the label, zero-padded to ``digits``."""
    return f"{int(label):0{digits}d}"


def class_file(label: int, index: int, *, digits: int = LABEL_DIGITS) -> str:
    """``<label>/<index>.png`` relative to the root: the label ``digits`` wide, the index six."""
    return f"{class_folder(label, digits=digits)}/{int(index):06d}.png"


def save_class_folders(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    out_dir: Path | str,
    *,
    start: int = 0,
    digits: int = LABEL_DIGITS,
) -> None:
    """Write image ``i`` to ``out_dir/<label>/<start + i>.png`` (``class_file``)."""
    images = _numpy_uint8(images)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if len(labels) != len(images):
        raise ValueError(f"expected one label per image, got {len(labels)} labels for {len(images)} images")
    out_dir = Path(out_dir)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = out_dir / class_file(label, start + i, digits=digits)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image))


def class_folder_files(root: Path | str) -> list[tuple[Path, int]]:
    """(image file, label) of the class folders under ``root``, by folder name then by index; numeric
    folder names are the labels ("000003" -> 3), other names are numbered in sorted order."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if all(p.name.isdigit() for p in folders):
        labelled = [(int(p.name), p) for p in folders]
    else:
        labelled = list(enumerate(folders))
    files = []
    for label, folder in labelled:
        found = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        found.sort(key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0, f.name))
        files += [(f, label) for f in found]
    return files


def stack_images(images: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
    """[C, H, W] arrays of one shape -> [N, C, H, W]; a mixed shape is refused naming its file."""
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8)
    ref = images[0].shape
    for img, name in zip(images, names):
        if img.shape != ref:
            raise ValueError(
                f"mixed shapes in {where}: expected every image to be {ref} (C,H,W) like "
                f"{names[0]}, found {img.shape} in {name}"
            )
    return np.stack(images)


def read_class_folders(
    root: Path | str, *, channels: int | None = None, where: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The class folders under ``root`` -> (uint8 [N, C, H, W], int64 [N]), in ``class_folder_files``
    order; ``channels`` converts every image to 1 (grey) or 3 (RGB). Empty when there are none."""
    files = class_folder_files(root)
    names = [f"'{f}'" for f, _ in files]
    arrays = [_channels(decode_image(f, name), channels) for (f, _), name in zip(files, names)]
    labels = np.array([label for _, label in files], np.int64)
    return stack_images(arrays, names, where or f"image folder '{root}'"), labels


def _channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is None or image.shape[0] == channels:
        return image
    arr = np.asarray(_pil(image).convert("L" if channels == 1 else "RGB"))
    return arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_class_folders(root: Path | str, *, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``read_class_folders`` of a synthetic set: refused when ``root`` holds no images."""
    images, labels = read_class_folders(root, channels=channels)
    if not len(labels):
        raise ValueError(f"expected PNG files in class folders '{root}/<label>/*.png', found none")
    return images, labels


def save_class_grid(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    path: Path | str,
    *,
    per_class: int = 10,
    scale: int = 2,
) -> Path:
    """Grid with one row per class (ascending), its first ``per_class`` images; gaps stay black."""
    images = _numpy_uint8(images)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    classes = np.unique(labels)
    tiles = np.zeros((len(classes) * per_class, *images.shape[1:]), dtype=np.uint8)
    for row, c in enumerate(classes):
        picked = images[labels == c][:per_class]
        tiles[row * per_class : row * per_class + len(picked)] = picked
    return save_grid(tiles, path, nrow=per_class, scale=scale)


def blown_out(images: torch.Tensor | np.ndarray, *, level: int = 128, share: float = 0.3) -> np.ndarray:
    """bool [N]: images with more than ``share`` of their pixels at ``level`` or above.

    The default (over 30 % of the pixels in the top half of the intensity range) flags the bright
    noise images a diffusion model samples once it has learnt them (at 28 px on digits: 32-49 % of their
    pixels, against at most 29 % for the other samples and 4 % for real digits; MNIST digits cover
    ~19 % of the frame). It is meant for dark-background data: the 16 px digits fill the frame
    (up to 43 %), so there it also flags real images; compare with ``blown_out`` of the real data.
    """
    x = _numpy_uint8(images)
    return (x >= level).reshape(len(x), -1).mean(1) > share
