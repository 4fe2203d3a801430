"""Spatially disjoint train/val/test splits: no tile of one split overlaps a tile of another.

Rules (also in docs/DATA.md):

1. **Large images** (at least as many ``block``-sized blocks as there are splits): the image is cut into a grid of
   blocks at least ``block`` px wide and tall whose edges tile it exactly; blocks are dealt to splits so that each
   split's share of *tissue* matches its fraction (greedy on the largest deficit, most-tissue blocks first, seeded
   tie-break; each split first gets one of the top blocks). Without a tissue mask every block weighs the same.
   Horizontally adjacent blocks of the same split are merged into one region so tiles may straddle their shared edge.
2. **Many small images** (fewer blocks than splits each, e.g. 500x500 templates or 224 px dataset tiles), when there
   are at least as many of them as splits: whole images are dealt to splits by the same rule, so tissue from one
   image never appears in two splits.
3. **Few small images**: each is cut into strips along its longer side, widths proportional to the fractions, in a
   seeded order. Narrow strips may hold no tile of a large size.

Tiles are then taken per region with ``grid_tiles(..., region=r)``, so a tile never crosses a region edge; tiles of
different splits may touch along an edge but never share a pixel.
"""

import logging
import zlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np

from datamodules.sources import TileSource
from datamodules.tiling import TileRef, grid_tiles

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: Mapping[str, float] = MappingProxyType({"train": 0.7, "val": 0.15, "test": 0.15})
Box = tuple[int, int, int, int]


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    fr = dict(fractions)
    if not fr or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fr}")
    return fr


def _deal(weights: np.ndarray, fractions: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Assign items with the given weights to splits so each split's weight share approaches its fraction.

    Args:
        weights: float (N,) item weights (tissue pixels), >= 0.
        fractions: Split name -> fraction (sums to 1).
        rng: Breaks ties between equal weights.

    Returns:
        Split name per item.
    """
    names = [k for k, v in fractions.items() if v > 0]
    target = np.array([fractions[k] for k in names])
    order = np.lexsort((rng.permutation(len(weights)), -weights))  # heaviest first, seeded among ties
    got = np.zeros(len(names))
    out = [""] * len(weights)
    seed_first = len(weights) >= len(names)
    first_round = list(rng.permutation(len(names))) if seed_first else []
    total = 0.0
    for item in order:
        w = float(weights[item]) if weights.sum() > 0 else 1.0
        total += w
        s = first_round.pop(0) if first_round else int(np.argmax(target * total - got))
        got[s] += w
        out[item] = names[s]
    return out


def _edges(length: int, n: int) -> list[int]:
    return [round(i * length / n) for i in range(n + 1)]


def n_blocks(shape: tuple[int, int], block: int) -> int:
    """Number of blocks :func:`split_regions` cuts an image of ``shape`` (H, W) into."""
    return max(1, shape[0] // block) * max(1, shape[1] // block)


def split_regions(
    shape: tuple[int, int],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    *,
    block: int = 512,
    seed: int = 0,
    tissue: np.ndarray | None = None,
    tissue_scale: int = 1,
) -> dict[str, list[Box]]:
    """Partition one image into rectangles per split (rules 1 and 3 of the module docstring).

    Args:
        shape: (H, W) of the image.
        fractions: Split name -> fraction, non-negative, summing to 1.
        block: Target block side in pixels.
        seed: Seeds the assignment; same arguments give the same result.
        tissue: Optional bool tissue mask (one pixel per ``tissue_scale`` image pixels) used to balance tissue.
        tissue_scale: Image pixels per tissue-mask pixel.

    Returns:
        Split name -> list of (x0, y0, x1, y1) boxes with exclusive ends; boxes of all splits tile the image without
        overlap. Every name in ``fractions`` is a key (possibly with an empty list).

    Raises:
        ValueError: Bad fractions, shape or block.
    """
    fr = _check_fractions(fractions)
    h, w = shape
    if h < 1 or w < 1 or block < 1:
        raise ValueError(f"shape and block must be positive, got shape={shape} block={block}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[Box]] = {k: [] for k in fr}
    active = [k for k, v in fr.items() if v > 0]
    if n_blocks(shape, block) >= len(active):
        xe, ye = _edges(w, max(1, w // block)), _edges(h, max(1, h // block))
        boxes = [(xe[i], ye[j], xe[i + 1], ye[j + 1]) for j in range(len(ye) - 1) for i in range(len(xe) - 1)]
        if tissue is None:
            weights = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=float)
        else:
            s = tissue_scale
            weights = np.array(
                [tissue[b[1] // s : -(-b[3] // s), b[0] // s : -(-b[2] // s)].sum() for b in boxes], dtype=float
            )
        for box, name in zip(boxes, _deal(weights, fr, rng), strict=True):
            last = out[name][-1] if out[name] else None
            if last is not None and last[1] == box[1] and last[2] == box[0]:  # same row, adjacent: merge
                out[name][-1] = (last[0], last[1], box[2], box[3])
            else:
                out[name].append(box)
        return out
    horizontal = w >= h
    length = w if horizontal else h
    order = [active[i] for i in rng.permutation(len(active))]
    cum = np.cumsum([0.0] + [fr[k] for k in order])
    cuts = [round(c * length) for c in cum]
    for name, a, b in zip(order, cuts[:-1], cuts[1:], strict=True):
        if b > a:
            out[name].append((a, 0, b, h) if horizontal else (0, a, w, b))
    return out


def _source_seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def assign_regions(
    sources: Sequence[TileSource],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    *,
    block: int = 512,
    seed: int = 0,
) -> list[dict[str, list[Box]]]:
    """Regions per split for every source (rules 1-3 of the module docstring).

    Returns:
        One dict per source: split name -> list of (x0, y0, x1, y1) boxes.
    """
    fr = _check_fractions(fractions)
    active = [k for k, v in fr.items() if v > 0]
    small = [i for i, s in enumerate(sources) if n_blocks(s.shape(), block) < len(active)]
    out: list[dict[str, list[Box]]] = [{} for _ in sources]
    if len(small) >= len(active):
        weights = np.array([float(sources[i].tissue().sum()) for i in small])
        for i, name in zip(small, _deal(weights, fr, np.random.default_rng(seed)), strict=True):
            h, w = sources[i].shape()
            out[i] = {k: ([(0, 0, w, h)] if k == name else []) for k in fr}
    for i, src in enumerate(sources):
        if not out[i]:
            out[i] = split_regions(
                src.shape(),
                fr,
                block=block,
                seed=_source_seed(seed, src.name),
                tissue=src.tissue(),
                tissue_scale=src.tissue_scale,
            )
    return out


def tiles_for_split(
    sources: Sequence[TileSource],
    split: str,
    *,
    size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    block: int | None = None,
) -> list[tuple[int, TileRef]]:
    """Tiles of one split across all sources.

    Args:
        sources: The sources, in a fixed order (the returned index refers to it).
        split: A key of ``fractions``.
        size: Tile side in source pixels.
        stride: Grid step (default ``size``).
        min_tissue: Minimum tissue fraction per tile.
        seed: Seeds the split assignment (not the tiles, which are a deterministic grid).
        fractions: Split name -> fraction.
        block: Block side for large images; default ``max(512, 2 * size)`` so every block holds several tiles.

    Returns:
        (source index, TileRef) pairs, sources in order, tiles row-major within each region.

    Raises:
        ValueError: Unknown split or bad fractions.
    """
    if split not in fractions:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(fractions)}")
    block = max(512, 2 * size) if block is None else block
    out: list[tuple[int, TileRef]] = []
    for i, (src, regions) in enumerate(
        zip(sources, assign_regions(sources, fractions, block=block, seed=seed), strict=True)
    ):
        tissue = src.tissue()
        for region in regions[split]:
            refs = grid_tiles(
                tissue,
                size=size,
                stride=stride,
                min_tissue=min_tissue,
                region=region,
                source=src.name,
                scale=src.tissue_scale,
                shape=src.shape(),
                level=getattr(src, "level", 0),
            )
            out.extend((i, r) for r in refs)
    if not out:
        logger.warning(
            "split %r has no tiles of size %d (min_tissue=%.2f) in %d sources", split, size, min_tissue, len(sources)
        )
    return out
