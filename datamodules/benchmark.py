"""Data throughput: can the restoration DataModule keep a GPU fed? Prints a table; not a timed test.

Usage::

    python -m datamodules.benchmark [--tile-size 256] [--batch-size 16] [--batches 20] [--workers 0,1,2]

For each worker count, iterates the train loader of ``ArtifactRestorationDataModule`` on the bundled real H&E (read
tile -> augment -> synthesise 1-2 artifacts -> tensors -> collate) and reports tiles/s after the first batch (worker
start-up excluded). Synthesis alone, per artifact type: ``python -m datamodules.artifacts.benchmark``.
"""

import argparse
import os
import time

from datamodules.restoration import ArtifactRestorationDataModule, CleanTileDataModule


def loader_throughput(dm: CleanTileDataModule, batches: int) -> float:
    """Tiles per second of ``dm.train_dataloader()`` over ``batches`` batches, after the first one."""
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["clean"])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Print tiles/s of the clean-only and the restoration train loaders for each worker count."""
    p = argparse.ArgumentParser(prog="python -m datamodules.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args(argv)
    print(
        f"bundled H&E, {args.tile_size}px tiles, batch {args.batch_size}, {args.batches} batches, {os.cpu_count()} CPUs"
    )
    print("| loader | workers | tiles/s |\n|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
        for name, cls in (
            ("clean tiles + augmentation", CleanTileDataModule),
            ("restoration (augment + synthesis)", ArtifactRestorationDataModule),
        ):
            dm = cls(tile_size=args.tile_size, batch_size=args.batch_size, num_workers=workers)
            dm.setup("fit")
            print(f"| {name} | {workers} | {loader_throughput(dm, args.batches):.0f} |", flush=True)


if __name__ == "__main__":
    main()
