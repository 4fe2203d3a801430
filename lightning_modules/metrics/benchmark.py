"""Throughput of the full region-wise metric set.

Usage::

    python -m lightning_modules.metrics.benchmark                      # CPU, batch 8 and 1, 256x256
    python -m lightning_modules.metrics.benchmark --device cuda --mode paper --repeats 20

Prints tiles/s of ``RegionMetrics.update`` (all four regions, all five metrics) per batch size. Images are real H&E
tiles from the ``histoqc`` sample templates when that package is installed (random texture otherwise), degraded with
Gaussian noise and a painted rectangle that is also the artifact mask.
"""

import argparse
import importlib.util
import logging
import os
import time

import numpy as np
import torch

from lightning_modules.metrics.masked import RegionMetrics

log = logging.getLogger(__name__)


def _clean_tiles(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 ``(size, size, 3)`` RGB tiles: crops of histoqc's H&E templates, or random texture without them."""
    spec = importlib.util.find_spec("histoqc")
    if spec is not None and spec.submodule_search_locations:
        import cv2

        folder = os.path.join(spec.submodule_search_locations[0], "data", "templates")
        templates = [cv2.imread(os.path.join(folder, f"template{i}.png"))[:, :, ::-1] for i in range(1, 5)]
        tiles = []
        for i in range(n):
            t = templates[i % 4]
            y, x = rng.integers(0, t.shape[0] - size + 1), rng.integers(0, t.shape[1] - size + 1)
            tiles.append(t[y : y + size, x : x + size])
        return np.stack(tiles)
    log.warning("histoqc not installed: benchmarking on random texture instead of real H&E")
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def make_batch(batch_size: int, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A degraded/clean/mask triple in the suite's conventions: ``(B,3,H,W)`` in [-1, 1] twice, ``(B,1,H,W)`` 0/1."""
    rng = np.random.default_rng(seed)
    clean = _clean_tiles(batch_size, size, rng)
    noisy = np.clip(clean + rng.normal(0.0, 8.0, clean.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((batch_size, 1, size, size), np.float32)
    top, left = size // 3, size // 4
    noisy[:, top : top + size // 4, left : left + size // 3] = (150, 60, 160)
    mask[:, :, top : top + size // 4, left : left + size // 3] = 1.0

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    return to_tensor(noisy), to_tensor(clean), torch.from_numpy(mask)


def tiles_per_second(batch_size: int, repeats: int, device: str, mode: str, size: int = 256) -> float:
    """Tiles per second of ``RegionMetrics.update`` (plus one compute), averaged over ``repeats`` after a warm-up."""
    preds, target, mask = (t.to(device) for t in make_batch(batch_size, size))
    metric = RegionMetrics(mode=mode).to(device)
    metric.update(preds, target, mask)  # warm-up: filter-bank cache, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        metric.update(preds, target, mask)
    metric.compute()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch_size * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; prints one line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("standard", "paper"), default="standard")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"device={args.device} threads={torch.get_num_threads()} mode={args.mode} size={args.size}")
    for bs in args.batch_sizes:
        rate = tiles_per_second(bs, args.repeats, args.device, args.mode, args.size)
        print(f"batch {bs:3d}: {rate:8.2f} tiles/s  (4 regions x l2, mse, psnr, ssim, fsim)")


if __name__ == "__main__":
    main()
