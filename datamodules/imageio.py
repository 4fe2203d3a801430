"""Robust image and mask I/O: every odd file either becomes uint8 RGB with a logged warning, or a clear error.

Conventions (docs/ARCHITECTURE.md): images are ``uint8`` arrays of shape ``(H, W, 3)`` in RGB order; masks are
``bool`` arrays of shape ``(H, W)`` with ``True`` = artifact; mask files are 8-bit PNGs with 255 = artifact.

Decoding policy of :func:`read_image` (each conversion logs one warning naming the file):

- grayscale (``L``, ``1``) -> replicated to RGB;
- ``RGBA`` / ``LA`` / palette with transparency -> alpha-composited onto white (glass is white in brightfield);
- palette -> RGB;
- 16-bit integer -> 8-bit by scaling ``v * 255 / 65535`` (PNG bit depth is read from the header, because Pillow
  silently truncates 16-bit RGB PNGs);
- float (TIFF) in ``[0, 1]`` -> scaled by 255; float in ``[0, 255]`` -> rounded; anything else is an error;
- missing, zero-byte, truncated or non-image files, and images smaller than ``min_size`` -> :class:`ImageReadError`.

Writes go to a temporary file in the destination folder followed by ``os.replace``, so a crash never leaves a
half-written image under the final name, and OpenCV's encoders write no timestamps, so identical arrays give
byte-identical files.
"""

import logging
import os
import secrets
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LOSSLESS_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
_FIX = "re-export it as an 8-bit RGB PNG or remove it from the folder"


class ImageReadError(ValueError):
    """A file could not be turned into an image; the message names the file, the problem and what to do."""


def _fail(path: Path, problem: str) -> ImageReadError:
    return ImageReadError(f"{path}: {problem}; {_FIX}.")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; ImageReadError when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such {what}; check the path or remove it from the file list.")
    if path.stat().st_size == 0:
        raise _fail(path, f"{what} is empty (0 bytes)")
    return path


def _png_bit_depth(path: Path) -> int | None:
    """Bit depth from a PNG's IHDR chunk, or None if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return None
    return head[24]


def _decode_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        if page.planarconfig == 2 and arr.ndim == 3:  # separate planes: (C, H, W)
            arr = np.moveaxis(arr, 0, -1)
    return arr


def _decode(path: Path) -> tuple[np.ndarray, list[str]]:
    """Decode a file into an array (H, W[, C]) in RGB(A) order plus notes on what it was."""
    notes: list[str] = []
    if _png_bit_depth(path) == 16:
        arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise _fail(path, "16-bit PNG could not be decoded (truncated or corrupt)")
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]
        return arr, notes
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            return _decode_tiff(path), notes
        except Exception as err:  # tifffile raises many types for bad files; fall back to Pillow below
            logger.debug("tifffile could not read %s (%s); trying Pillow", path, err)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                has_alpha = "transparency" in im.info
                notes.append("palette image expanded to RGB" + (" (with transparency)" if has_alpha else ""))
                im = im.convert("RGBA" if has_alpha else "RGB")
            elif im.mode in ("PA",):
                im = im.convert("RGBA")
            elif im.mode == "CMYK":
                notes.append("CMYK converted to RGB")
                im = im.convert("RGB")
            elif im.mode in ("YCbCr", "LAB", "HSV"):
                notes.append(f"{im.mode} converted to RGB")
                im = im.convert("RGB")
            return np.asarray(im), notes
    except UnidentifiedImageError:
        raise _fail(path, "not a recognised image format (is it really an image?)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise _fail(path, f"could not be decoded ({err}); the file is probably truncated or corrupt") from None


def _to_uint8(arr: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """Scale any supported dtype to uint8, recording what was done."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        notes.append("1-bit image scaled to 0/255")
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 65535):
        notes.append(f"16-bit values (max {int(arr.max()) if arr.size else 0}) scaled to 8-bit by 255/65535")
        return np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _fail(path, "float image contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            notes.append("float image in [0, 1] scaled by 255")
            return np.round(arr * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            notes.append(f"float image in [{lo:.3g}, {hi:.3g}] taken as 0..255 and rounded")
            return np.round(arr).astype(np.uint8)
        raise _fail(path, f"float image has values in [{lo:.4g}, {hi:.4g}], expected [0, 1] or [0, 255]")
    raise _fail(path, f"unsupported pixel type {arr.dtype}")


def _to_rgb(arr: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """Turn (H, W), (H, W, 1|2|3|4) uint8 into (H, W, 3) RGB, compositing alpha onto white."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        notes.append("grayscale replicated to RGB")
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise _fail(path, f"unsupported array shape {arr.shape}, expected (H, W) or (H, W, 1|2|3|4)")
    if arr.shape[2] == 3:
        return arr
    color = np.repeat(arr[..., :1], 3, axis=2) if arr.shape[2] == 2 else arr[..., :3]
    alpha = arr[..., -1:].astype(np.float32) / 255.0
    notes.append(("LA" if arr.shape[2] == 2 else "RGBA") + " alpha composited onto white")
    return np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def read_image(path: str | os.PathLike, *, min_size: int | None = None) -> np.ndarray:
    """Read an image file as RGB, converting unusual formats with a logged warning.

    Args:
        path: Image file (PNG, JPEG, TIFF, BMP or anything Pillow reads).
        min_size: If given, both height and width must be at least this many pixels.

    Returns:
        uint8 array of shape (H, W, 3), RGB, values in [0, 255].

    Raises:
        ImageReadError: The file is missing, empty, truncated, not an image, has unsupported values, or is smaller
            than ``min_size``; the message names the file and suggests re-exporting or removing it.
    """
    path = _existing_file(path, "file")
    arr, notes = _decode(path)
    rgb = np.ascontiguousarray(_to_rgb(_to_uint8(arr, path, notes), path, notes))
    if notes:
        logger.warning("%s: converted on read: %s", path, "; ".join(notes))
    if min_size is not None and min(rgb.shape[:2]) < min_size:
        h, w = rgb.shape[:2]
        raise ImageReadError(
            f"{path}: image is {h}x{w} (HxW) but at least {min_size}x{min_size} is required; "
            "use a smaller tile size or remove the image."
        )
    return rgb


def read_mask(
    path: str | os.PathLike,
    *,
    convention: Literal["artifact", "keep"] = "artifact",
    shape: tuple[int, int] | None = None,
    threshold: int | None = None,
) -> np.ndarray:
    """Read a binary mask file.

    Args:
        path: Mask image; single channel, or several identical channels.
        convention: ``"artifact"`` if nonzero marks the artifact (this project), ``"keep"`` if nonzero marks pixels
            to keep (RePaint / the authors' ``gt_keep_mask`` files); ``"keep"`` masks are inverted.
        shape: Expected (H, W); a different size raises.
        threshold: If given, any value ``> threshold`` is set (for anti-aliased or JPEG masks); otherwise the values
            must be exactly {0, 255} or {0, 1}.

    Returns:
        bool array of shape (H, W), True = artifact.

    Raises:
        ImageReadError: Unreadable file, non-binary values, differing channels, or a size different from ``shape``.
        ValueError: Unknown ``convention``.
    """
    if convention not in ("artifact", "keep"):
        raise ValueError(f"convention must be 'artifact' or 'keep', got {convention!r}")
    path = _existing_file(path, "mask file")
    arr, _ = _decode(path)
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[2], 3))):
            raise ImageReadError(f"{path}: mask has differing colour channels; save it as a single-channel PNG.")
        arr = arr[..., 0]
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ImageReadError(
            f"{path}: mask is {arr.shape[0]}x{arr.shape[1]} (HxW) but the image is {shape[0]}x{shape[1]}; "
            "masks must have the image's size."
        )
    if threshold is not None:
        mask = arr > threshold
    else:
        values = np.unique(arr)
        if set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
            mask = arr > 0
        else:
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise ImageReadError(
                f"{path}: mask must contain only {{0, 255}} or {{0, 1}} but has {len(values)} values ({shown}); "
                "re-export it as a binary PNG with 255 = artifact and 0 = clean (threshold soft or JPEG masks first)"
            )
    return ~mask if convention == "keep" else mask


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _encode(path: Path, array: np.ndarray) -> bytes:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    bgr = array[..., ::-1] if array.ndim == 3 else array
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode a {array.shape} {array.dtype} array as {suffix}")
    return buf.tobytes()


def write_image_atomic(path: str | os.PathLike, rgb_uint8: np.ndarray) -> None:
    """Write an RGB image atomically; the format follows the suffix (PNG recommended, byte-deterministic).

    Args:
        path: Destination; parent folders are created.
        rgb_uint8: uint8 array of shape (H, W, 3), RGB.

    Raises:
        ValueError: Wrong dtype/shape or unsupported suffix.
    """
    arr = np.asarray(rgb_uint8)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"write_image_atomic expects uint8 (H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    path = Path(path)
    _write_bytes_atomic(path, _encode(path, arr))


def write_mask_atomic(path: str | os.PathLike, mask_bool: np.ndarray) -> None:
    """Write a binary mask atomically as an 8-bit single-channel image, 255 = artifact, 0 = clean.

    Args:
        path: Destination with a lossless suffix (.png, .tif, .tiff, .bmp).
        mask_bool: bool array of shape (H, W), True = artifact (0/1 integer arrays are accepted too).

    Raises:
        ValueError: Not 2-D, values other than 0/1, or a lossy suffix such as .jpg.
    """
    arr = np.asarray(mask_bool)
    if arr.ndim != 2:
        raise ValueError(f"write_mask_atomic expects a (H, W) mask, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"write_mask_atomic expects bool or 0/1 values, got values {np.unique(arr)[:8]}")
        arr = arr.astype(bool)
    path = Path(path)
    if path.suffix.lower() not in _LOSSLESS_SUFFIXES:
        raise ValueError(f"{path}: masks need a lossless format; use one of {', '.join(_LOSSLESS_SUFFIXES)}")
    _write_bytes_atomic(path, _encode(path, arr.astype(np.uint8) * 255))


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under ``root`` with a suffix in :data:`IMAGE_SUFFIXES` (case-insensitive).

    Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.png`` or temporary files) are ignored.

    Args:
        root: Folder to scan.
        recursive: Also scan sub-folders.

    Returns:
        Paths sorted by their POSIX path relative to ``root``, so the order is the same on every machine.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, expected a folder of images")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = []
    for p in candidates:
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
