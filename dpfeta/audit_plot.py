"""The audit's score histogram as a PNG, drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 420, 50
COLOURS = {"included": (214, 69, 65), "excluded": (52, 101, 164)}


def score_histogram(
    included: np.ndarray, excluded: np.ndarray, path: Path | str, *, bins: int = 50, title: str = "canary scores"
) -> Path:
    """Overlaid histograms (outlines) of included and excluded canaries' scores; returns ``path``."""
    values = np.concatenate([included, excluded]).astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {
        name: np.histogram(np.clip(x, lo, hi), edges)[0] for name, x in (("included", included), ("excluded", excluded))
    }
    top = max(1, max(int(c.max(initial=0)) for c in counts.values()))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = MARGIN, MARGIN, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    step = (x1 - x0) / bins
    for name, c in counts.items():
        for i, n in enumerate(c):
            if n:
                draw.rectangle(
                    [x0 + i * step, y1 - (y1 - y0) * n / top, x0 + (i + 1) * step, y1], outline=COLOURS[name], width=2
                )
    draw.line([x0, y1, x1, y1], fill="black")
    draw.line([x0, y0, x0, y1], fill="black")
    draw.text((x0, 15), title, fill="black")
    draw.text((x0, y1 + 8), f"{lo:.3g}", fill="black")
    draw.text((x1 - 40, y1 + 8), f"{hi:.3g}", fill="black")
    draw.text((5, y0), str(top), fill="black")
    for k, name in enumerate(COLOURS):
        draw.text((x1 - 150, y0 + 15 * k), f"{name} ({len(included if k == 0 else excluded)})", fill=COLOURS[name])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
