"""Render a gallery PNG of every artifact type on real H&E tiles, with the exact masks.

Example:
    python -m datamodules.gallery --out docs/gallery.png --seed 0

One row per artifact type: for each of ``--columns`` real tiles (bundled sample slides, test split) the corrupted
tile and below it the mask outlined on the clean tile. The first column shows the clean tile for reference.
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from datamodules.artifacts import ARTIFACT_TYPES
from datamodules.datasets import sample_rng
from datamodules.imageio import write_image_atomic
from datamodules.sources import bundled_sources
from datamodules.splits import tiles_for_split

MASK_COLOUR = (0, 200, 255)


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Tint the artifact pixels of ``rgb`` uint8 (H, W, 3) and outline the mask; returns a new uint8 image."""
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(MASK_COLOUR, np.float32)
    out = out.round().astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, MASK_COLOUR, 1)
    return out


def label(img: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner of a copy of ``img`` (white on a dark box)."""
    out = img.copy()
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    cv2.rectangle(out, (0, 0), (w + 6, h + 8), (20, 20, 20), -1)
    cv2.putText(out, text, (3, h + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def render_gallery(*, seed: int = 0, columns: int = 4, size: int = 256, pad: int = 4) -> np.ndarray:
    """Gallery image uint8 (rows, cols, 3): per type, corrupted tiles over mask overlays."""
    sources = bundled_sources()
    tiles = tiles_for_split(sources, "test", size=size, stride=size, min_tissue=0.7)
    picks = [tiles[int(i)] for i in np.linspace(0, len(tiles) - 1, columns).round()]
    clean = [sources[s].read_region(r.x, r.y, r.size, r.size) for s, r in picks]
    gap = lambda h: np.full((h, pad, 3), 255, np.uint8)  # noqa: E731
    rows = [np.concatenate(sum(([label(c, "clean" if j == 0 else ""), gap(size)] for j, c in enumerate(clean)), []), 1)]
    for t_idx, (name, spec_cls) in enumerate(ARTIFACT_TYPES.items()):
        spec = spec_cls()
        top, bottom = [], []
        for j, tile in enumerate(clean):
            corrupted, mask = spec.apply(tile, sample_rng(seed, "test", 1000 * t_idx + j))
            top += [label(corrupted, f"{name} {100 * mask.mean():.1f}%"), gap(size)]
            bottom += [mask_overlay(tile, mask), gap(size)]
        rows += [np.concatenate(top, 1), np.concatenate(bottom, 1)]
    width = rows[0].shape[1]
    sep = np.full((pad, width, 3), 255, np.uint8)
    return np.concatenate(sum(([r, sep] for r in rows), []), 0)


def main(argv: list[str] | None = None) -> int:
    """Write the gallery PNG."""
    p = argparse.ArgumentParser(prog="python -m datamodules.gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/gallery.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    write_gallery(args.out, seed=args.seed, columns=args.columns, size=args.size)
    return 0


def write_gallery(out: Path, *, seed: int = 0, columns: int = 4, size: int = 256) -> Path:
    """Render the gallery (see :func:`render_gallery`) and write it atomically to ``out`` (a PNG path)."""
    img = render_gallery(seed=seed, columns=columns, size=size)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomic(out, img)
    print(f"wrote {out} ({img.shape[1]}x{img.shape[0]})")
    return out


if __name__ == "__main__":
    sys.exit(main())
