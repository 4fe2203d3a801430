"""Automatic artifact masks for whole slides (``restore_slide --masks auto --mask-model DIR``).

The exported segmenter runs on the working grid reduced ``downsample`` times (GrandQC-style: lower magnification is
much cheaper; the segmenter then sees ``downsample`` x more context per tile), on overlapping tiles of tissue only
(tiles without tissue in ``source.tissue()`` are skipped and predicted clean). Each tile writes only its core, the
part nearer to its centre than to any neighbour's, so the stitched map has no tile-border artifacts and needs no
accumulation buffer. Probabilities are thresholded into a bool map kept in a disk-backed ``.npy`` (memory stays
bounded on large slides); the map is upsampled to the working grid by nearest-neighbour lookup when windows are read
(:class:`~datamodules.slide_masks.ImageMask`). The finished map is cached next to a JSON key, so a rerun (or
another DDP rank) with the same slide, model and settings reuses it.
"""

import hashlib
import json
import secrets
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from datamodules.slide_masks import ImageMask
from datamodules.slides import SlideInputError, TileGrid, file_fingerprint
from lightning_modules.components.segmenters import load_segmenter, segment_images
from lightning_modules.components.slide_store import write_json_atomic


def _key_fingerprint(obj: dict) -> str:
    """Short SHA-256 of a JSON-serialisable dict."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cores(starts: tuple[int, ...], tile: int, length: int) -> list[tuple[int, int]]:
    """[a, b) core of each tile along one axis: split every overlap at its middle."""
    bounds = [0] + [(starts[i] + starts[i - 1] + tile) // 2 for i in range(1, len(starts))] + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def predict_slide_mask(
    model_dir: Path,
    source,
    info,
    *,
    downsample: int,
    out: Path,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    threshold: float | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[ImageMask, dict]:
    """Predict (or reuse) the artifact map of a slide and wrap it as a mask of the working grid.

    Args:
        model_dir: Exported segmenter folder.
        source: The slide (``read_region``, ``tissue``, ``tissue_scale``).
        info: Its :class:`~datamodules.slides.SlideInfo`.
        downsample: Predict on the working grid reduced this many times (integer >= 1).
        out: Cache file (``.npy``); ``out.with_suffix(".json")`` holds its key and figures.
        tile: Segmenter tile side at the reduced grid (a multiple of its stride).
        overlap: Tile overlap at the reduced grid.
        batch_size: Tiles per forward pass.
        threshold: Probability threshold (default: the segmenter's).
        device: Torch device.
        progress: Show a progress bar.

    Returns:
        The mask and ``{"model", "downsample", "threshold", "tiles", "tiles_predicted", "seconds", "shape"}``.

    Raises:
        SlideInputError: Missing or unreadable segmenter, bad downsample / tile.
    """
    try:
        net = load_segmenter(model_dir, device=device)
    except (FileNotFoundError, ValueError, OSError, RuntimeError, KeyError) as err:
        raise SlideInputError(f"--mask-model {model_dir}: {err}") from None
    threshold = net.config.threshold if threshold is None else threshold
    if downsample < 1 or tile % net.stride:
        raise SlideInputError(
            f"--mask-downsample {downsample} must be >= 1 and --mask-tile {tile} a multiple of "
            f"the segmenter's {net.stride} px stride"
        )
    h, w = -(-info.shape[0] // downsample), -(-info.shape[1] // downsample)
    key = {
        "slide": file_fingerprint(info.path),
        "level": info.level,
        "to_level0": info.to_level0,
        "model": file_fingerprint(model_dir),
        "downsample": downsample,
        "threshold": threshold,
        "tile": tile,
        "overlap": overlap,
        "shape": [h, w],
    }
    fingerprint = _key_fingerprint(key)
    meta_path = out.with_suffix(".json")
    if out.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        figures = json.loads(meta_path.read_text())["figures"]
        mask = np.load(out, mmap_mode="r")
        return ImageMask.from_array(mask, info.shape, name=str(out), fingerprint=fingerprint, kind="auto"), figures
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp.npy")  # unique: ranks may predict at once
    mask = np.lib.format.open_memmap(tmp, mode="w+", dtype=bool, shape=(h, w))
    grid = TileGrid.build((h, w), tile, overlap)
    tissue, ts = source.tissue(), source.tissue_scale
    cols, rows = _cores(grid.xs, tile, w), _cores(grid.ys, tile, h)
    todo = []
    for i in range(len(grid)):
        x, y, tw, th = grid.box(i)
        t = tissue[
            y * downsample // ts : -(-(y + th) * downsample // ts),
            x * downsample // ts : -(-(x + tw) * downsample // ts),
        ]
        if t.any():
            todo.append(i)
    bar = tqdm(total=len(todo), desc="artifact mask", unit="tile", disable=not progress)
    for b in range(0, len(todo), batch_size):
        chunk, images = todo[b : b + batch_size], []
        for i in chunk:
            x, y, tw, th = grid.box(i)
            gx, gy = x * downsample, y * downsample
            gw, gh = min(tw * downsample, info.shape[1] - gx), min(th * downsample, info.shape[0] - gy)
            rgb = source.read_region(gx, gy, gw, gh)
            if downsample > 1:
                rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
            images.append(rgb)
        probs = segment_images(net, images, size=(tile, tile), batch_size=len(chunk))
        for i, p in zip(chunk, probs, strict=True):
            r, c = divmod(i, grid.ncols)
            (x0, x1), (y0, y1), (x, y, _, _) = cols[c], rows[r], grid.box(i)
            mask[y0:y1, x0:x1] = p[y0 - y : y1 - y, x0 - x : x1 - x] > threshold
        bar.update(len(chunk))
    bar.close()
    mask.flush()
    del mask
    tmp.replace(out)
    figures = {
        "model": str(model_dir),
        "downsample": downsample,
        "threshold": threshold,
        "tiles": len(grid),
        "tiles_predicted": len(todo),
        "seconds": time.perf_counter() - start,
        "shape": [h, w],
    }
    write_json_atomic(meta_path, {"key": key, "figures": figures})
    mask = np.load(out, mmap_mode="r")
    return ImageMask.from_array(mask, info.shape, name=str(out), fingerprint=fingerprint, kind="auto"), figures
