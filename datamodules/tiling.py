"""Tissue detection and grid tiling.

``tissue_mask`` separates stained tissue from bright, grey glass in brightfield H&E: a pixel is tissue if it is
coloured (HSV saturation above an Otsu threshold clamped to [8, 20] of 255, so that an image that is all tissue is not
split in two by Otsu) or dark (HSV value below 200, so grey/black material is not mistaken for glass). Glass on the
bundled slide has saturation 0-5 and value about 243, pale tissue (template 4) saturation 13-70. The decision is
taken on a ``downsample``-times smaller copy, cleaned with a morphological opening (drops dust specks) and closing
(fills nuclei-free gaps and lumina smaller than a few pixels), then upsampled. Pen ink is saturated and counts as
"tissue": this detector only answers "is there something on the glass here".

``grid_tiles`` enumerates a regular grid of square tiles inside a rectangle and keeps those whose tissue fraction
reaches ``min_tissue``; fractions come from an integral image, so it is O(pixels + tiles).
"""

from dataclasses import dataclass

import cv2
import numpy as np

_SAT_CLAMP = (8, 20)
_DARK_VALUE = 200


def tissue_mask(rgb: np.ndarray, *, downsample: int = 4) -> np.ndarray:
    """Foreground (tissue) mask of a brightfield RGB image.

    Args:
        rgb: uint8 array of shape (H, W, 3), RGB.
        downsample: Work on an image this many times smaller (INTER_AREA); 1 = full resolution.

    Returns:
        bool array of shape (H, W), True = tissue (or anything else on the glass), False = glass background.

    Raises:
        ValueError: Wrong dtype, shape, or a non-positive ``downsample``.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
        raise ValueError(f"tissue_mask expects a non-empty uint8 (H, W, 3) RGB image, got {rgb.dtype} {rgb.shape}")
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    h, w = rgb.shape[:2]
    small_w, small_h = max(1, round(w / downsample)), max(1, round(h / downsample))
    small = rgb if downsample == 1 else cv2.resize(rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    sat_t = float(np.clip(otsu, *_SAT_CLAMP))
    fg = ((sat > sat_t) | (val < _DARK_VALUE)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    if fg.shape != (h, w):
        fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST)
    return fg.astype(bool)


@dataclass(frozen=True)
class TileRef:
    """A square tile of a source, in the grid that ``TileSource.shape`` / ``read_region`` address.

    Attributes:
        source: Name of the source (``TileSource.name``).
        x: Left column of the tile.
        y: Top row of the tile.
        size: Side length in pixels.
        tissue: Tissue fraction of the tile in [0, 1].
        level: Pyramid level the source reads from (informative: for a slide opened with ``mpp`` the grid is that
            level resampled, see ``SlideSource``).
    """

    source: str
    x: int
    y: int
    size: int
    tissue: float
    level: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with exclusive ends."""
        return self.x, self.y, self.x + self.size, self.y + self.size


def grid_tiles(
    tissue: np.ndarray,
    *,
    size: int,
    stride: int | None = None,
    min_tissue: float = 0.5,
    region: tuple[int, int, int, int] | None = None,
    source: str = "",
    scale: int = 1,
    shape: tuple[int, int] | None = None,
    level: int = 0,
) -> list[TileRef]:
    """Tiles on a regular grid, fully inside ``region``, with tissue fraction >= ``min_tissue``.

    Args:
        tissue: bool array (h, w), True = tissue; one mask pixel covers ``scale`` x ``scale`` image pixels.
        size: Tile side in image pixels.
        stride: Grid step in image pixels (default ``size``: non-overlapping tiles).
        min_tissue: Minimum tissue fraction in [0, 1] (0 keeps every tile).
        region: (x0, y0, x1, y1) in image pixels, exclusive ends; default the whole image. The grid starts at
            (x0, y0) and no tile crosses the region's edge.
        source: Name stored in each ``TileRef``.
        scale: Image pixels per mask pixel (1 = mask at full resolution). With scale > 1 a tile's fraction is
            measured over the mask pixels its footprint touches.
        shape: Image (H, W); default ``tissue.shape * scale``.
        level: Stored in each ``TileRef``.

    Returns:
        TileRefs in row-major order (top to bottom, left to right).

    Raises:
        ValueError: Bad size/stride/min_tissue/scale, or a region outside the image.
    """
    if tissue.ndim != 2:
        raise ValueError(f"tissue must be a 2-D bool mask, got shape {tissue.shape}")
    stride = size if stride is None else stride
    if size < 1 or stride < 1 or scale < 1:
        raise ValueError(f"size, stride and scale must be >= 1, got size={size} stride={stride} scale={scale}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    img_h, img_w = shape if shape is not None else (tissue.shape[0] * scale, tissue.shape[1] * scale)
    x0, y0, x1, y1 = region if region is not None else (0, 0, img_w, img_h)
    if not (0 <= x0 <= x1 <= img_w and 0 <= y0 <= y1 <= img_h):
        raise ValueError(f"region {(x0, y0, x1, y1)} is not inside the image of width {img_w} and height {img_h}")
    xs = np.arange(x0, x1 - size + 1, stride)
    ys = np.arange(y0, y1 - size + 1, stride)
    if xs.size == 0 or ys.size == 0:
        return []
    integral = cv2.integral(tissue.astype(np.uint8), sdepth=cv2.CV_64F)  # (h + 1, w + 1)
    mh, mw = tissue.shape
    mx0, my0 = np.minimum(xs // scale, mw), np.minimum(ys // scale, mh)
    mx1, my1 = np.minimum(-(-(xs + size) // scale), mw), np.minimum(-(-(ys + size) // scale), mh)
    area = np.maximum((my1 - my0)[:, None] * (mx1 - mx0)[None, :], 1)
    count = (
        integral[my1[:, None], mx1[None, :]]
        - integral[my0[:, None], mx1[None, :]]
        - integral[my1[:, None], mx0[None, :]]
        + integral[my0[:, None], mx0[None, :]]
    )
    frac = count / area
    keep_r, keep_c = np.nonzero(frac >= min_tissue)
    return [
        TileRef(source, int(xs[c]), int(ys[r]), size, float(frac[r, c]), level)
        for r, c in zip(keep_r, keep_c, strict=True)
    ]
