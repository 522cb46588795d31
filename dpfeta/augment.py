"""RandAugment for a whole batch at once, on the batch's device: the warm-up's augmentation.

The same distribution as torchvision's ``RandAugment(num_ops, magnitude=m)`` applied image by image
with m ~ U{1..max_magnitude} per image (the official DP-FETA warm-up, docs/reference-implementation.md
§3), and the same pixels for the same draws: per image, ``num_ops`` ops drawn uniformly from the
ops left after ``exclude``, each signed op negated with probability 1/2, magnitudes from torchvision's
31 bins, nearest interpolation, zero fill (``tests/test_augment.py`` checks every op at 8 bins from 0 to 30,
both signs, against torchvision). It replaces torchvision applied image by image on the host: on a CPU the two cost
about the same (bench/README.md, per-step overhead); on a GPU this one runs where the model is, with no
per-image loop on the host and no copy of the augmented batch.

All random draws come from ``generator`` (a CPU generator; torch's global RNG is not touched), so a
run is reproducible from its warm-up generator's state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpfeta.config.schema import RANDAUG_OPS

OPS = RANDAUG_OPS  # torchvision's RandAugment ops, in its order (warmup.randaug_exclude names them)
SIGNED = frozenset(("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
SIGNED |= {"Brightness", "Color", "Contrast", "Sharpness"}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
NUM_BINS = 31  # torchvision's num_magnitude_bins


def magnitude(op: str, level: int, height: int, width: int) -> float:
    """torchvision's magnitude of ``op`` at bin ``level`` (0..30) for an image of height x width, unsigned."""
    n = NUM_BINS
    table = {
        "ShearX": torch.linspace(0.0, 0.3, n),
        "ShearY": torch.linspace(0.0, 0.3, n),
        "TranslateX": torch.linspace(0.0, 150.0 / 331.0 * width, n),
        "TranslateY": torch.linspace(0.0, 150.0 / 331.0 * height, n),
        "Rotate": torch.linspace(0.0, 30.0, n),
        "Brightness": torch.linspace(0.0, 0.9, n),
        "Color": torch.linspace(0.0, 0.9, n),
        "Contrast": torch.linspace(0.0, 0.9, n),
        "Sharpness": torch.linspace(0.0, 0.9, n),
        "Posterize": 8 - (torch.arange(n) / ((n - 1) / 4)).round().int(),
        "Solarize": torch.linspace(255.0, 0.0, n),
    }
    return float(table[op][level].item()) if op in table else 0.0


def _inverse_affine(
    center: tuple[float, float], angle: float, translate: tuple[float, float], shear: tuple[float, float]
) -> list[float]:
    """The output-to-input affine map of a rotation by ``angle`` degrees and a shear (degrees) about
    ``center`` followed by ``translate``, in pixel units about the image centre (scale 1); the
    arithmetic of torchvision's tensor ``affine``/``rotate``, so that the float32 grids agree bit for bit."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _theta(op: str, value: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix of a geometric op at a signed magnitude ``value``."""
    corner = (-width * 0.5, -height * 0.5)  # the shears are about the top-left corner, as in torchvision
    if op == "ShearX":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(value)), 0.0))
    if op == "ShearY":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(value))))
    if op == "TranslateX":
        return _inverse_affine((0.0, 0.0), 0.0, (float(int(value)), 0.0), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(value))), (0.0, 0.0))
    if op == "Rotate":
        return _inverse_affine((0.0, 0.0), -value, (0.0, 0.0), (0.0, 0.0))
    raise ValueError(f"expected a geometric op ({', '.join(GEOMETRIC)}), got {op!r}")


class RandAugment:
    """RandAugment over batches of uint8 images [B, C, H, W] (C = 1 or 3) of one size, on their device.

    The tables (affine matrices and photometric factors per op, bin and sign) are built once per image
    size and device; a call draws each image's magnitude, ops and signs from ``generator`` and applies
    each op to the images that drew it, all of them at once.
    """

    def __init__(self, *, num_ops: int, max_magnitude: int, exclude: tuple[str, ...] = ()):
        unknown = sorted(set(exclude) - set(OPS))
        if unknown:
            raise ValueError(f"expected RandAugment ops to exclude among {', '.join(OPS)}, got {unknown}")
        if not 0 <= max_magnitude < NUM_BINS:
            raise ValueError(f"expected a magnitude in [0, {NUM_BINS - 1}], got {max_magnitude}")
        self.num_ops, self.max_magnitude = int(num_ops), int(max_magnitude)
        self.ops = tuple(op for op in OPS if op not in set(exclude))
        if not self.ops and self.num_ops > 0 and self.max_magnitude > 0:
            raise ValueError(f"expected at least one RandAugment op left after excluding {list(exclude)}")
        self._tables: dict[tuple, dict[str, torch.Tensor]] = {}

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(magnitude bins [n] in 1..M, op indices into ``self.ops`` [num_ops, n], signs [num_ops, n] in {-1, 1})."""
        levels = torch.randint(1, self.max_magnitude + 1, (n,), generator=generator)
        ops = torch.randint(len(self.ops), (self.num_ops, n), generator=generator)
        signs = 1 - 2 * torch.randint(2, (self.num_ops, n), generator=generator)
        return levels, ops, signs

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.max_magnitude == 0 or self.num_ops == 0:
            return images
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [B, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        levels, ops, signs = self.draw(len(images), generator)
        return self.apply(images, levels, ops, signs)

    def apply(self, images: torch.Tensor, levels: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """The ops of ``draw`` applied in order: slot by slot, each op to the images that drew it.

        Per slot one host sync (the count of each op), the images grouped by op with one stable sort,
        and the five geometric ops in one warp."""
        device = images.device
        tables = self._table(images.shape[-2], images.shape[-1], device)
        levels, ops, signs = levels.to(device), ops.to(device), signs.to(device)
        side = (signs < 0).long()  # 0: +magnitude, 1: -magnitude
        out = images.clone()  # each op reads its images (a gathered copy) before writing them back
        for slot in range(self.num_ops):
            drawn = ops[slot]
            counts = torch.bincount(drawn, minlength=len(self.ops)).tolist()
            groups = torch.argsort(drawn, stable=True).split(counts)
            for op, index, count in zip(self.ops, groups, counts):
                if count == 0 or op == "Identity" or op in GEOMETRIC:
                    continue
                value = tables[op][levels[index], side[slot, index]] if op in tables else None
                out[index] = _PHOTOMETRIC[op](out[index], value)
            if sum(c for op, c in zip(self.ops, counts) if op in GEOMETRIC):
                index = tables["geometric"][drawn].nonzero().squeeze(1)
                theta = tables["affine"][drawn[index], levels[index], side[slot, index]]
                out[index] = _warp(out[index], theta)
        return out

    def _table(self, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
        key = (height, width, str(device))
        if key not in self._tables:
            table: dict[str, torch.Tensor] = {}
            affine = torch.zeros(len(self.ops), NUM_BINS, 2, 6, dtype=torch.float64)
            for k, op in enumerate(self.ops):
                if op in GEOMETRIC:
                    for level in range(NUM_BINS):
                        value = magnitude(op, level, height, width)
                        affine[k, level, 0] = torch.tensor(_theta(op, value, height, width), dtype=torch.float64)
                        affine[k, level, 1] = torch.tensor(_theta(op, -value, height, width), dtype=torch.float64)
                elif op in ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize"):
                    values = [magnitude(op, level, height, width) for level in range(NUM_BINS)]
                    signed = [[v, -v if op in SIGNED else v] for v in values]
                    table[op] = torch.tensor(signed, dtype=torch.float64, device=device)
            table["affine"] = affine.to(torch.float32).view(len(self.ops), NUM_BINS, 2, 2, 3).to(device)
            table["geometric"] = torch.tensor([op in GEOMETRIC for op in self.ops], device=device)
            self._tables[key] = table
        return self._tables[key]


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine warp of uint8 images by per-image inverse matrices theta [B, 2, 3]
    (pixel units about the centre), zero fill: torchvision's grid, batched."""
    b, _, h, w = images.shape
    x = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=images.device)
    y = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=images.device)
    base = torch.stack([x.expand(h, w), y.unsqueeze(1).expand(h, w), torch.ones(h, w, device=images.device)], -1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=images.device)
    grid = torch.bmm(base.reshape(1, h * w, 3).expand(b, -1, -1), theta.transpose(1, 2) / scale).view(b, h, w, 2)
    out = F.grid_sample(images.to(theta.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * images + (1 - ratio) * other per image, clamped and truncated to uint8 (torchvision's blend)."""
    r = ratio.view(-1, 1, 1, 1)
    return (r.float() * images + (1.0 - r).float() * other).clamp(0, 255).to(torch.uint8)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Luma as uint8 [B, 1, H, W] (truncated, as torchvision's rgb_to_grayscale); grey images as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(1)


def _brightness(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), 1.0 + value)


def _color(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return images if images.shape[1] == 1 else _blend(images, _grey(images), 1.0 + value)


def _contrast(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    mean = _grey(images).to(torch.float32).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, 1.0 + value)


def _sharpness(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    c = images.shape[1]
    kernel = torch.ones(3, 3, dtype=torch.float32, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    blurred = images.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(images.to(torch.float32), kernel, groups=c).round().to(torch.uint8)
    return _blend(images, blurred, 1.0 + value)


def _posterize(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    bits = value.to(torch.int64)
    mask = (-(2 ** (8 - bits))).view(-1, 1, 1, 1)  # two's complement: keep the top ``bits`` bits
    return (images.to(torch.int64) & mask).to(torch.uint8)


def _solarize(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    threshold = value.to(torch.float32).view(-1, 1, 1, 1)
    return torch.where(images.to(torch.float32) >= threshold, 255 - images, images)


def _autocontrast(images: torch.Tensor, _value: torch.Tensor | None) -> torch.Tensor:
    low = images.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    high = images.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(low), 255.0 / (high - low))
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((images - low) * scale).clamp(0, 255).to(torch.uint8)


def _equalize(images: torch.Tensor, _value: torch.Tensor | None) -> torch.Tensor:
    """Histogram equalisation per image and channel (torchvision's lookup table), batched."""
    b, c, h, w = images.shape
    flat = images.reshape(b * c, h * w).to(torch.int64)
    offset = torch.arange(b * c, device=images.device).unsqueeze(1) * 256
    hist = torch.bincount((flat + offset).reshape(-1), minlength=b * c * 256).view(b * c, 256)
    top = flat.amax(dim=1, keepdim=True)  # the last non-empty bin
    step = torch.div(hist.sum(1, keepdim=True) - hist.gather(1, top), 255, rounding_mode="floor")
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.view(b, c, h, w).to(torch.uint8)


_PHOTOMETRIC = {
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
