"""Artifact masks for whole slides, read window by window so a slide-sized mask is never built.

Two kinds, one interface (``window(x, y, w, h) -> bool (h, w)`` in the working grid, True = artifact, plus a cheap
``maybe_any`` pre-check):

- :class:`ImageMask`: a mask image aligned to any pyramid level of the slide (nonzero = artifact). It is scaled to the
  working grid by the ratio of sizes with nearest-neighbour lookup; a different aspect ratio is refused.
- :class:`PolygonMask`: QuPath GeoJSON (a Feature, FeatureCollection, list of Features or bare geometry) with Polygon
  / MultiPolygon geometries in level-0 pixel coordinates (holes supported). Each window is rasterised on demand by
  :func:`fill_polygon` (pixel-centre sampling, even-odd rule per polygon, union over polygons), which is exactly
  translation invariant: any window equals the same part of a whole-grid rasterisation. ``cv2.fillPoly`` is not (its
  edge pixels move with the window origin) and rounds vertices to whole pixels (a 10 x 10 px square fills 11 x 11).
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from datamodules.imageio import ImageReadError, read_mask
from datamodules.slides import SlideInfo, SlideInputError

logger = logging.getLogger(__name__)

_BLOCK = 16  # ImageMask occupancy block (mask pixels)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def block_any(mask: np.ndarray, block: int, rows: int = 1024) -> np.ndarray:
    """Bool (ceil(h / block), ceil(w / block)): whether each block of ``mask`` holds a True pixel.

    Works ``rows`` mask rows at a time, so a disk-backed (memmap) mask is never loaded whole.
    """
    h, w = mask.shape
    bh, bw = -(-h // block), -(-w // block)
    out = np.zeros((bh, bw), bool)
    step = max(block, rows // block * block)
    for y0 in range(0, h, step):
        chunk = np.asarray(mask[y0 : y0 + step], dtype=bool)
        ch = -(-chunk.shape[0] // block) * block
        padded = np.zeros((ch, bw * block), bool)
        padded[: chunk.shape[0], :w] = chunk
        out[y0 // block : y0 // block + ch // block] = padded.reshape(ch // block, block, bw, block).any(axis=(1, 3))
    return out


class ImageMask:
    """A binary mask covering the whole slide at any level, looked up in the working grid.

    Args:
        path: Mask image (PNG/TIFF...); nonzero = artifact.
        grid_shape: (H, W) of the working grid.
        what: Name of the option in error messages.

    Raises:
        SlideInputError: Unreadable mask, or an aspect ratio different from the slide's.
    """

    kind = "image"

    def __init__(self, path: str | os.PathLike, grid_shape: tuple[int, int], *, what: str = "--masks") -> None:
        self.path = Path(path)
        try:
            mask = read_mask(self.path, threshold=0)
        except ImageReadError as err:
            raise SlideInputError(f"{what}: {err}") from None
        self._setup(mask, grid_shape, f"{what} {self.path}")
        self.fingerprint = _sha(self.path)

    @classmethod
    def from_array(
        cls, mask: np.ndarray, grid_shape: tuple[int, int], *, name: str, fingerprint: str, kind: str = "array"
    ) -> "ImageMask":
        """The same lookup over a bool (h, w) array (may be a read-only memmap) covering the whole slide."""
        self = cls.__new__(cls)
        self.path, self.kind, self.fingerprint = Path(name), kind, fingerprint
        self._setup(mask, grid_shape, name)
        return self

    def _setup(self, mask: np.ndarray, grid_shape: tuple[int, int], what: str) -> None:
        self.mask = mask
        (mh, mw), (h, w) = mask.shape, grid_shape
        self.sy, self.sx = mh / h, mw / w  # mask pixels per grid pixel
        tol = 0.005 + 2.0 / min(mh, mw)
        if abs(self.sx / self.sy - 1.0) > tol:
            raise SlideInputError(
                f"{what}: mask is {mh}x{mw} (HxW, aspect {mw / mh:.4f}) but the slide grid is {h}x{w} "
                f"(aspect {w / h:.4f}); a mask must cover the whole slide at one of its levels, so its aspect ratio "
                "must match"
            )
        self.shape = (h, w)
        self.occupancy = block_any(mask, _BLOCK)

    def _index(self, start: int, n: int, scale: float, size: int) -> np.ndarray:
        return np.minimum(((np.arange(start, start + n) + 0.5) * scale).astype(np.int64), size - 1)

    def maybe_any(self, x: int, y: int, w: int, h: int) -> bool:
        """False only when the window certainly holds no artifact pixel (block occupancy test)."""
        r0, r1 = int(y * self.sy) // _BLOCK, int(np.ceil((y + h) * self.sy)) // _BLOCK + 1
        c0, c1 = int(x * self.sx) // _BLOCK, int(np.ceil((x + w) * self.sx)) // _BLOCK + 1
        return bool(self.occupancy[r0:r1, c0:c1].any())

    def window(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Bool (h, w) artifact mask of the grid window with top-left (x, y)."""
        if not self.maybe_any(x, y, w, h):
            return np.zeros((h, w), bool)
        rows = self._index(y, h, self.sy, self.mask.shape[0])
        cols = self._index(x, w, self.sx, self.mask.shape[1])
        block = np.asarray(self.mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], dtype=bool)
        return block[np.ix_(rows - rows[0], cols - cols[0])]


def _geometries(obj, path: Path) -> list[dict]:
    """Every geometry dict inside a GeoJSON object (Feature, FeatureCollection, list, geometry)."""
    if isinstance(obj, list):
        return [g for item in obj for g in _geometries(item, path)]
    if not isinstance(obj, dict) or "type" not in obj:
        raise SlideInputError(f"--masks {path}: not GeoJSON (expected a Feature, FeatureCollection or geometry)")
    kind = obj["type"]
    if kind == "FeatureCollection":
        return _geometries(obj.get("features", []), path)
    if kind == "Feature":
        return [] if obj.get("geometry") is None else _geometries(obj["geometry"], path)
    if kind == "GeometryCollection":
        return _geometries(obj.get("geometries", []), path)
    return [obj]


def read_geojson_polygons(path: str | os.PathLike) -> list[list[np.ndarray]]:
    """Polygons of a GeoJSON file, each a list of rings (exterior first, then holes) as float (N, 2) x, y arrays.

    Raises:
        SlideInputError: Unreadable JSON, malformed coordinates, or no Polygon / MultiPolygon at all.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SlideInputError(f"--masks {path}: cannot read GeoJSON ({err}); export the annotations again") from None
    polygons, skipped = [], {}
    for geom in _geometries(obj, path):
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind not in ("Polygon", "MultiPolygon"):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        try:
            for poly in [coords] if kind == "Polygon" else coords:
                rings = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in poly]
                if not rings or any(r.ndim != 2 or len(r) < 3 or not np.isfinite(r).all() for r in rings):
                    raise ValueError("a ring has fewer than 3 finite points")
                polygons.append(rings)
        except (TypeError, ValueError, IndexError) as err:
            raise SlideInputError(f"--masks {path}: malformed {kind} coordinates ({err})") from None
    if skipped:
        logger.warning("%s: ignored non-polygon geometries %s", path, skipped)
    if not polygons:
        raise SlideInputError(f"--masks {path}: no Polygon or MultiPolygon annotations found; draw area annotations")
    return polygons


def _edges(rings: list[np.ndarray]) -> np.ndarray:
    """Float (E, 4) non-horizontal edges x0, y0, x1, y1 of closed rings."""
    segs = [np.concatenate([r, np.roll(r, -1, axis=0)], axis=1) for r in rings]
    e = np.concatenate(segs)
    return e[e[:, 1] != e[:, 3]]


def fill_polygon(edges: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Rasterise one polygon (exterior + holes, even-odd) into the window [x, x + w) x [y, y + h).

    A pixel (row i, column j) is inside when its centre (j + 0.5, i + 0.5) is; edges are half-open in y, so shared
    edges and vertices are counted once. Only the window's own rows and integer offsets enter the arithmetic, so the
    result does not depend on where the window starts.

    Args:
        edges: Float (E, 4) x0, y0, x1, y1 from :func:`_edges`, in grid pixels.
        x: Left column of the window.
        y: Top row of the window.
        w: Window width.
        h: Window height.

    Returns:
        Bool (h, w), True inside the polygon.
    """
    out = np.zeros((h, w + 1), np.int32)
    lo, hi = np.minimum(edges[:, 1], edges[:, 3]), np.maximum(edges[:, 1], edges[:, 3])
    e = edges[(hi > y) & (lo < y + h)]
    if len(e):
        yc = (y + np.arange(h) + 0.5)[:, None]
        lo, hi = np.minimum(e[:, 1], e[:, 3]), np.maximum(e[:, 1], e[:, 3])
        cross = (yc >= lo) & (yc < hi)
        xi = np.where(cross, e[:, 0] + (yc - e[:, 1]) * (e[:, 2] - e[:, 0]) / (e[:, 3] - e[:, 1]), np.inf)
        xi = np.sort(xi, axis=1)
        if xi.shape[1] % 2:
            xi = np.concatenate([xi, np.full((h, 1), np.inf)], axis=1)
        a, b = xi[:, 0::2], xi[:, 1::2]
        valid = np.isfinite(a) & np.isfinite(b)
        rows = np.broadcast_to(np.arange(h)[:, None], a.shape)[valid]
        start = np.clip(np.ceil(a[valid] - 0.5) - x, 0, w).astype(np.int64)
        end = np.clip(np.ceil(b[valid] - 0.5) - x, 0, w).astype(np.int64)
        np.add.at(out, (rows, start), 1)
        np.add.at(out, (rows, end), -1)
    return np.cumsum(out, axis=1)[:, :w] > 0


class PolygonMask:
    """GeoJSON polygons in level-0 pixels, rasterised per window in the working grid.

    Args:
        path: GeoJSON file (QuPath "Export objects as GeoJSON").
        info: The opened slide (level-0 size and the working grid's scale).

    Raises:
        SlideInputError: See :func:`read_geojson_polygons`; a polygon entirely outside the slide.
    """

    kind = "geojson"

    def __init__(self, path: str | os.PathLike, info: SlideInfo) -> None:
        self.path = Path(path)
        h0, w0 = info.level0_shape
        self.polygons, boxes = [], []
        for i, rings in enumerate(read_geojson_polygons(self.path)):
            lo, hi = rings[0].min(axis=0), rings[0].max(axis=0)
            if hi[0] < 0 or hi[1] < 0 or lo[0] > w0 or lo[1] > h0:
                raise SlideInputError(
                    f"--masks {self.path}: polygon {i} (x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}) lies "
                    f"outside the slide ({w0}x{h0} px at level 0, WxH); GeoJSON must be in level-0 pixel coordinates "
                    "of this slide"
                )
            if lo[0] < -1 or lo[1] < -1 or hi[0] > w0 + 1 or hi[1] > h0 + 1:
                logger.warning("%s: polygon %d extends past the slide border; clipped", self.path, i)
            grid = [r / info.to_level0 for r in rings]  # level-0 px -> working grid px; pixel j spans [j, j + 1)
            self.polygons.append(_edges(grid))
            boxes.append((*np.floor(grid[0].min(axis=0)), *np.ceil(grid[0].max(axis=0))))
        self.boxes = np.asarray(boxes, dtype=np.float64)  # (N, 4) x0, y0, x1, y1 of each exterior ring, grid px
        self.shape = info.shape
        self.fingerprint = _sha(self.path)

    def _hits(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        b = self.boxes
        return np.nonzero((b[:, 0] <= x + w) & (b[:, 2] >= x) & (b[:, 1] <= y + h) & (b[:, 3] >= y))[0]

    def maybe_any(self, x: int, y: int, w: int, h: int) -> bool:
        """False only when no polygon's bounding box touches the window."""
        return len(self._hits(x, y, w, h)) > 0

    def window(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Bool (h, w) artifact mask of the grid window with top-left (x, y)."""
        out = np.zeros((h, w), bool)
        for i in self._hits(x, y, w, h):
            out |= fill_polygon(self.polygons[i], x, y, w, h)
        return out


def load_mask(spec: str, info: SlideInfo, *, what: str = "--masks") -> ImageMask | PolygonMask:
    """A mask from ``--masks``: a ``.geojson`` / ``.json`` file or a mask image.

    Raises:
        SlideInputError: Missing file, ``auto`` (predicted masks are built by ``restore_slide --mask-model``), or any
            problem of the mask itself.
    """
    if spec == "auto":
        raise SlideInputError(
            f"{what} auto needs an artifact segmenter: pass --mask-model DIR (an exported segmenter), or a mask image "
            "or GeoJSON file"
        )
    path = Path(spec)
    if not path.is_file():
        raise SlideInputError(f"{what} {path} does not exist; pass a mask image or a QuPath GeoJSON file")
    if path.suffix.lower() in (".geojson", ".json"):
        return PolygonMask(path, info)
    return ImageMask(path, info.shape, what=what)
