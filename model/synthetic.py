"""Synthetic camera frames (no dataset needed): a table-top-like scene with a gradient
background, a few coloured objects and mild noise. Used by the demo, tests and benchmarks."""
from __future__ import annotations

import numpy as np


def synthetic_rgb(seed: int = 0, height: int = 480, width: int = 640) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    img = top + (bottom - top) * (yy / max(height - 1, 1))[..., None]
    img += 20 * np.sin(xx / max(width, 1) * rng.uniform(2, 8))[..., None]
    for _ in range(rng.integers(3, 7)):  # ellipses and boxes ("objects")
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.04, 0.2) * height, rng.uniform(0.04, 0.2) * width
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        img[mask] = 0.3 * img[mask] + 0.7 * colour
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
