"""The small outputs of a slide restoration: provenance mask, overlay preview, package versions, areas."""

import importlib.metadata
import platform

import cv2
import numpy as np

from datamodules.imageio import write_image_atomic

MASK_MAX_SIDE = 8192  # OUT.mask.png is reduced by a power of two until its longer side fits


def mask_scale_for(shape: tuple[int, int], max_side: int = MASK_MAX_SIDE, cap: int = 256) -> int:
    """Smallest power of two s (at most ``cap``) with ``max(shape) / s <= max_side``."""
    s = 1
    while max(shape) > max_side * s and s < cap:
        s *= 2
    return s


def mask_image(mask, shape: tuple[int, int], scale: int = 1, rows: int = 256) -> np.ndarray:
    """Bool (ceil(H / scale), ceil(W / scale)) picture of a window-readable mask (any pixel of a block marks it).

    Read ``rows`` grid rows at a time (``rows`` a multiple of ``scale``), so the grid-sized mask is never built.
    """
    from datamodules.slide_masks import block_any

    h, w = shape
    parts = []
    for y0 in range(0, h, rows):
        strip = mask.window(0, y0, w, min(rows, h - y0))
        parts.append(block_any(strip, scale) if scale > 1 else strip)
    return np.concatenate(parts)


def write_preview(path, small: np.ndarray, synthetic: np.ndarray, boxes: dict[str, list], scale: float) -> None:
    """Overlay PNG: synthetic pixels tinted green with their outline, flagged tiles outlined in red.

    Args:
        path: Destination PNG.
        small: uint8 (h, w, 3) reduced output level.
        synthetic: Bool provenance mask at any resolution (resized to ``small`` by nearest neighbour).
        boxes: ``{"flagged": [(x, y, w, h)...], "restored": [...]}`` in working-grid pixels.
        scale: ``small`` pixels per working-grid pixel.
    """
    h, w = small.shape[:2]
    syn = cv2.resize(synthetic.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = small.astype(np.float32)
    out[syn] = 0.7 * out[syn] + 0.3 * np.array([0, 255, 0], np.float32)
    out = np.round(out).astype(np.uint8)
    contours, _ = cv2.findContours(syn.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 160, 0), 1)
    for x, y, bw, bh in boxes.get("flagged", []):
        p0 = (int(x * scale), int(y * scale))
        p1 = (max(p0[0], int((x + bw) * scale) - 1), max(p0[1], int((y + bh) * scale) - 1))
        cv2.rectangle(out, p0, p1, (255, 0, 0), 1)
    write_image_atomic(path, out)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape a restored slide."""
    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "lightning",
        "diffusers",
        "numpy",
        "opencv-python-headless",
        "openslide-python",
        "openslide-bin",
        "tifffile",
        "imagecodecs",
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def area_mm2(pixels: int, mpp: float | None) -> float | None:
    """Area of ``pixels`` square pixels of side ``mpp`` microns in mm^2 (None without mpp)."""
    return None if mpp is None else pixels * (mpp * 1e-3) ** 2
