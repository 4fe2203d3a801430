"""DDP check for RegionMetrics, run by tests/test_metrics.py in a subprocess.

Two CPU processes (gloo, torch.multiprocessing.spawn) each update a metric with their own, uneven share of a batch of
real H&E tiles; ``compute()`` syncs the sum states and must equal a single-process metric fed the whole batch on
every rank. Exits non-zero on any mismatch; prints ``DDP metrics OK`` on success.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.metrics.benchmark import make_batch
from lightning_modules.metrics.masked import RegionMetrics

WORLD_SIZE = 2
SIZE = 64


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five degraded/clean/mask triples at 64x64; image 2 has an empty artifact mask."""
    preds, target, mask = make_batch(5, size=SIZE, seed=1)
    mask[2] = 0
    return preds, target, mask


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        preds, target, mask = _data()
        share = slice(0, 3) if rank == 0 else slice(3, 5)  # uneven split: 3 + 2 images
        metric = RegionMetrics(prefix="test/")
        metric.update(preds[share], target[share], mask[share])
        synced = metric.compute()
        reference = RegionMetrics(prefix="test/", sync_on_compute=False)
        reference.update(preds, target, mask)
        expected = reference.compute()
        assert synced.keys() == expected.keys()
        for key, value in expected.items():
            if not torch.allclose(synced[key], value, rtol=1e-10, atol=0, equal_nan=True):
                raise AssertionError(f"rank {rank}: {key} = {synced[key].item()} != {value.item()}")
        assert synced["test/artifact/n_empty"].item() == 1
    finally:
        dist.destroy_process_group()


def main() -> int:
    """Spawn the workers; return the process exit code."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD_SIZE, join=True)
    print("DDP metrics OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
