"""Write a pyramidal tiled TIFF that OpenSlide opens (generic-tiff), strip by strip, in bounded memory.

Layout (verified with openslide-bin 4.0.1, see ENVIRONMENT.md): each level is one page, tiled 256 x 256, RGB,
zlib with horizontal predictor (lossless) or JPEG, resolution in pixels per centimetre, ``subfiletype=1`` on the
reduced levels. Level k + 1 is level k averaged over 2 x 2 blocks (odd last rows/columns dropped) and is produced
while level k is written: its rows go to a raw temporary file, which the next page then reads strip by strip. Memory
is a few strips of ``tile`` rows of the level's width, whatever the slide size. The file is built under a temporary
name and renamed into place, so a crash never leaves a half-written OUT.tif.
"""

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

StripFn = Callable[[int, int], np.ndarray]


def downsample2(rgb: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) -> (h // 2, w // 2, 3), the rounded mean of each 2 x 2 block."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    blocks = rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def _raw_strips(path: Path, width: int) -> StripFn:
    def read(y0: int, y1: int) -> np.ndarray:
        n = (y1 - y0) * width * 3
        return np.fromfile(path, dtype=np.uint8, count=n, offset=y0 * width * 3).reshape(y1 - y0, width, 3)

    return read


def write_pyramid(
    path: str | os.PathLike,
    strips: StripFn,
    shape: tuple[int, int],
    *,
    mpp: float | None,
    tile: int = 256,
    jpeg: bool = False,
    quality: int = 90,
    description: str = "",
    keep_max_side: int = 2048,
    on_strip: Callable[[int], None] | None = None,
) -> dict:
    """Write ``OUT.tif`` from a function that returns its level-0 rows.

    Args:
        path: Output file.
        strips: ``strips(y0, y1) -> uint8 (y1 - y0, W, 3)``; called once per ``tile`` rows, top to bottom.
        shape: (H, W) of level 0.
        mpp: Microns per pixel of level 0 (None: no resolution tags).
        tile: TIFF tile side.
        jpeg: JPEG (lossy, ``quality``) instead of lossless zlib.
        quality: JPEG quality.
        description: ImageDescription of level 0 (OpenSlide shows it as ``openslide.comment``).
        keep_max_side: The first level whose longer side is at most this is returned in memory (for previews).
        on_strip: Called with the number of level-0 rows after each level-0 strip (progress bars).

    Returns:
        ``{"levels": [(H, W), ...], "small": uint8 array of the first level within keep_max_side, "small_level": k}``.
    """
    import tifffile

    path = Path(path)
    tag = secrets.token_hex(6)
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    raws: list[Path] = []
    h, w = shape
    levels, small, small_level = [], None, None
    codec = (
        {"compression": "jpeg", "compressionargs": {"level": quality}}
        if jpeg
        else {"compression": "zlib", "predictor": True}
    )
    if keep_max_side < tile:
        raise ValueError(f"keep_max_side {keep_max_side} must be at least the tile size {tile}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=h * w * 3 * 4 // 3 > 2**31) as tw:
            read, k = strips, 0
            while True:
                levels.append((h, w))
                keep = small is None and max(h, w) <= keep_max_side
                kept: list[np.ndarray] = []
                raw = path.with_name(f".{path.name}.{tag}.level{k + 1}.raw")
                raws.append(raw)
                last = max(h, w) <= tile or min(h, w) < 2
                nxt = open(raw, "wb")  # closed below, after tifffile has pulled every tile

                def tiles(read=read, h=h, w=w, k=k, nxt=nxt, keep=keep, kept=kept, last=last) -> Iterator[np.ndarray]:
                    # everything about a strip happens before its last tile is yielded: tifffile stops pulling
                    # after the last tile, so code after the final ``yield`` would never run
                    for y0 in range(0, h, tile):
                        rows = read(y0, min(h, y0 + tile))
                        if not last:
                            nxt.write(downsample2(rows).tobytes())
                        if keep:
                            kept.append(rows)
                        if k == 0 and on_strip is not None:
                            on_strip(rows.shape[0])
                        for x0 in range(0, w, tile):
                            block = np.zeros((tile, tile, 3), np.uint8)
                            part = rows[:, x0 : x0 + tile]
                            block[: part.shape[0], : part.shape[1]] = part
                            yield block

                level_mpp = None if mpp is None else mpp * 2**k
                try:
                    tw.write(
                        tiles(),
                        shape=(h, w, 3),
                        dtype=np.uint8,
                        tile=(tile, tile),
                        photometric="rgb",
                        resolution=None if level_mpp is None else (1e4 / level_mpp, 1e4 / level_mpp),
                        resolutionunit="CENTIMETER" if level_mpp is not None else None,
                        subfiletype=1 if k else 0,
                        description=description if k == 0 else None,
                        metadata=None,
                        **codec,
                    )
                finally:
                    nxt.close()
                if keep:
                    small, small_level = np.concatenate(kept), k
                if last:
                    break
                read, h, w, k = _raw_strips(raw, w // 2), h // 2, w // 2, k + 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for raw in raws:
            raw.unlink(missing_ok=True)
    return {"levels": levels, "small": small, "small_level": small_level}
