"""Whole slides for restoration: open any slide or plain image at a working level, fingerprint it, tile it.

:func:`open_slide` returns a :class:`SlideSource` (any format OpenSlide reads, at ``level`` or resampled to ``mpp``)
or, for plain PNG/JPEG/strip TIFF files, an :class:`ImageSource` at level 0. Either way the working grid is
``source.shape()`` and ``source.read_region`` reads one window, so a slide is never held whole in memory.
:func:`grid_boxes` lays square tiles with a given overlap over that grid so that every pixel is covered and the last
tile of a row/column ends at the border.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.imageio import IMAGE_SUFFIXES, ImageReadError
from datamodules.sources import MPP_TOLERANCE, ImageSource, SlideSource, _import_openslide

logger = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 4 << 20


class SlideInputError(ValueError):
    """A slide, mask or setting cannot be used; the message names the file or value and what to do."""


@dataclass(frozen=True)
class SlideInfo:
    """Facts about the working grid of an opened slide.

    Attributes:
        path: The slide file.
        shape: (H, W) of the working grid.
        mpp: Microns per pixel of the grid, or None when the file carries no resolution.
        level: Pyramid level read (0 for plain images).
        to_level0: Level-0 pixels per working-grid pixel (level downsample x resample factor).
        level0_shape: (H, W) of level 0.
        vendor: OpenSlide's format name, or ``"image"`` for plain images.
    """

    path: Path
    shape: tuple[int, int]
    mpp: float | None
    level: int
    to_level0: float
    level0_shape: tuple[int, int]
    vendor: str


def _tiff_mpp(path: Path) -> float | None:
    """Microns per pixel from a plain TIFF's resolution tags, or None."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            num, den = res.value
            per_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit else 2)
            return per_um / (num / den) if per_um and num else None
    except Exception:  # no tags or not a TIFF tifffile reads: no resolution, not an error
        return None


def open_slide(
    path: str | os.PathLike, *, level: int | None = None, mpp: float | None = None
) -> tuple[SlideSource | ImageSource, SlideInfo]:
    """Open a slide (OpenSlide) or a plain image at its working level.

    Args:
        path: Slide file (.svs, .ndpi, .mrxs, tiled .tif, ...) or plain image (.png, .jpg, strip .tif).
        level: Pyramid level; plain images only have level 0.
        mpp: Target microns per pixel (see :class:`SlideSource`); plain images must already be at that resolution.

    Returns:
        The source (``read_region``, ``shape``, ``tissue``) and its :class:`SlideInfo`.

    Raises:
        SlideInputError: Missing or unreadable file, bad level, or an mpp the file cannot honour.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideInputError(f"slide {path} does not exist; check the --slide path")
    openslide = _import_openslide()
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception as err:  # OpenSlide raises on some unreadable files instead of returning None
        raise SlideInputError(f"slide {path}: OpenSlide cannot read it ({err}); is the file complete?") from None
    if fmt is not None:
        try:
            src = SlideSource(path, level=level, mpp=mpp)
            slide = src._handle()
            w0, h0 = slide.level_dimensions[0]
            src.read_region(0, 0, 1, 1)
        except (ValueError, openslide.OpenSlideError) as err:
            raise SlideInputError(f"slide {path}: {err}") from None
        info = SlideInfo(path, src.shape(), src.mpp, src.level, src.level_downsample * src.factor, (h0, w0), fmt)
        return src, info
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SlideInputError(
            f"slide {path}: neither OpenSlide nor the image reader recognises this file; pass a whole-slide file "
            f"or an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    if level not in (None, 0):
        raise SlideInputError(f"slide {path} is a plain image with one level; pass --level 0 or no --level")
    src = ImageSource(path, cache=True)
    try:
        shape = src.shape()
    except ImageReadError as err:
        raise SlideInputError(str(err)) from None
    own = _tiff_mpp(path)
    if mpp is not None and (own is None or abs(own - mpp) > MPP_TOLERANCE * mpp):
        raise SlideInputError(
            f"slide {path} is a plain image ({'no' if own is None else f'{own:.4g} um/px'} resolution metadata) and "
            f"cannot be resampled to --mpp {mpp}; drop --mpp or convert it to a pyramidal TIFF"
        )
    return src, SlideInfo(path, shape, own, 0, 1.0, shape, "image")


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap content fingerprint of a (possibly huge) file: size + SHA-256 of its first and last 4 MiB.

    A folder (e.g. .mrxs data, a model directory) is fingerprinted file by file in sorted order.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(path).as_posix() if path.is_dir() else p.name}:{size}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                f.seek(size - _FINGERPRINT_BYTES)
                h.update(f.read())
            elif size > _FINGERPRINT_BYTES:
                h.update(f.read())
    return h.hexdigest()[:16]


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - overlap``, the last tile ending at ``length``.

    A grid shorter than one tile gets a single tile at 0 (read smaller and padded by the restorer).
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """A grid of overlapping square tiles over an (H, W) pixel grid; tile ``i`` is row ``i // ncols``.

    Attributes:
        shape: (H, W) of the pixel grid.
        tile: Tile side in pixels.
        overlap: Requested overlap between neighbours (the last tile may overlap more).
        xs: Left columns of the tile columns.
        ys: Top rows of the tile rows.
    """

    shape: tuple[int, int]
    tile: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @classmethod
    def build(cls, shape: tuple[int, int], tile: int, overlap: int) -> "TileGrid":
        """Grid for ``shape`` with ``tile`` px tiles overlapping by ``overlap`` px (0 <= overlap < tile)."""
        if tile < 8 or not 0 <= overlap < tile // 2 + 1:
            raise SlideInputError(f"--tile {tile} / --overlap {overlap}: need tile >= 8 and 0 <= overlap <= tile / 2")
        h, w = shape
        xs, ys = axis_starts(w, tile, overlap), axis_starts(h, tile, overlap)
        return cls(tuple(shape), tile, overlap, tuple(xs), tuple(ys))

    @property
    def ncols(self) -> int:
        """Tiles per row."""
        return len(self.xs)

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of tile ``index``, clipped to the grid (smaller than ``tile`` only on tiny grids)."""
        r, c = divmod(index, self.ncols)
        x, y = self.xs[c], self.ys[r]
        return x, y, min(self.tile, self.shape[1] - x), min(self.tile, self.shape[0] - y)

    def overlapping(self, x0: int, y0: int, x1: int, y1: int) -> list[int]:
        """Indices of the tiles that intersect the box [x0, x1) x [y0, y1)."""
        xs, ys = np.asarray(self.xs), np.asarray(self.ys)
        cols = np.nonzero((xs < x1) & (xs + self.tile > x0))[0]
        rows = np.nonzero((ys < y1) & (ys + self.tile > y0))[0]
        return [int(r) * self.ncols + int(c) for r in rows for c in cols]

    def ramps(self, index: int) -> tuple[int, int, int, int]:
        """Blend ramp widths (left, right, top, bottom): the overlap with the neighbour on that side, 0 at borders."""
        r, c = divmod(index, self.ncols)
        x, y, w, h = self.box(index)
        left = self.xs[c - 1] + self.tile - x if c > 0 else 0
        right = x + w - self.xs[c + 1] if c + 1 < self.ncols else 0
        top = self.ys[r - 1] + self.tile - y if r > 0 else 0
        bottom = y + h - self.ys[r + 1] if r + 1 < len(self.ys) else 0
        return left, right, top, bottom
